"""The table: one row per configuration, every one with figures or the reason it has none; as markdown
(printed, and written beside the JSON that holds everything measured)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpu_check.rows import Profile, RowSpec

COLUMNS = (
    "row",
    "result",
    "s/step (n)",
    "× floor",
    "steps peak GiB alloc / reserved",
    "setup peak GiB reserved",
    "check est. GiB",
    "peak / est.",
    "setup s",
    "row s",
)
MARKDOWN = "gpu_check.md"
JSON = "gpu_check.json"


def derive(row: RowSpec, result: dict[str, Any], matmul_flops: float | None) -> dict[str, Any]:
    """The row's figures, with the ratios the issue asks for: to the physical floor, and of the measured
    peak (the larger of setup and steps, reserved: what the GPU must hold) to check's estimate."""
    derived = {**row.as_dict(), **result}
    flops, step_s = result.get("flops"), result.get("step_s")
    if flops and matmul_flops:
        derived["floor_s"] = flops / matmul_flops
        if step_s:
            derived["floor_ratio"] = step_s / derived["floor_s"]
    reserved = [
        (result.get(phase) or {}).get("reserved_gib") for phase in ("setup_peak", "steps_peak", "oom_peak")
    ]
    reserved = [value for value in reserved if value is not None]
    if reserved:
        derived["peak_reserved_gib"] = max(reserved)
        if result.get("estimate_gib"):
            derived["peak_over_estimate"] = derived["peak_reserved_gib"] / result["estimate_gib"]
    return derived


def _number(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table_line(row: dict[str, Any]) -> str:
    result = row["status"] if row["status"] == "ok" else f"{row['status']}: {row.get('reason', '')}"
    steps = row.get("step_times") or []
    step = f"{_number(row.get('step_s'), 3)} ({len(steps)})" if row.get("step_s") is not None else "–"
    peak = row.get("steps_peak") or {}
    setup_peak = row.get("setup_peak") or {}
    alloc_reserved = (
        f"{_number(peak.get('alloc_gib'), 2)} / {_number(peak.get('reserved_gib'), 2)}"
        if peak.get("alloc_gib") is not None
        else "–"
    )
    cells = (
        row["label"],
        result,
        step,
        _number(row.get("floor_ratio"), 2),
        alloc_reserved,
        _number(setup_peak.get("reserved_gib"), 2),
        _number(row.get("estimate_gib"), 2),
        _number(row.get("peak_over_estimate"), 2),
        _number(row.get("setup_s"), 1),
        _number(row.get("row_s"), 1),
    )
    return "| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |"


def header(report: dict[str, Any]) -> list[str]:
    profile: Profile = report["profile"]
    probe = report.get("probe") or {}
    packages = ", ".join(f"{k} {v}" for k, v in (probe.get("packages") or {}).items() if v)
    model = (
        "AuraFlow v0.3 config, random bf16 weights" if profile.model == "auraflow" else "the tiny AuraFlow"
    )
    lines = [
        f"gpu_check ({profile.name}), {report['date']}: `{report['command']}`",
        f"device: {probe.get('device', 'unknown')}, CUDA {probe.get('cuda') or '–'}, "
        f"Python {probe.get('python')}; {packages}",
        f"model: {model}; {profile.resolution} px, {profile.caption_tokens} caption tokens, batch 1, the seed's "
        f"LoKr, AdamW; median of {profile.steps} steps after {profile.warmup} warm-up",
    ]
    if probe.get("bf16_matmul_flops"):
        flops = {row["checkpointing"]: row["flops"] for row in report["rows"] if row.get("flops")}
        per_step = ", ".join(
            f"{flops[ckpt] / 1e12:.4g} TFLOP {'with' if ckpt else 'without'} checkpointing"
            for ckpt in sorted(flops, reverse=True)
        )
        lines.append(
            f"floor: a step's FLOPs ({per_step}) at the bf16 matmul rate, "
            f"{probe['bf16_matmul_flops'] / 1e12:.4g} TFLOP/s ({probe['matmul_side']}³)"
        )
    lines.append(f"offload files: {report['offload_dir']} ({report['offload_fs']})")
    return lines


def render(report: dict[str, Any]) -> str:
    lines = [*header(report), ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    lines += [table_line(row) for row in report["rows"]]
    lines.append("")
    lines.append(report["tiny_job_summary"])
    tiny = report["tiny_job"]
    if tiny.get("runs"):
        lines.append(
            "tiny job runs: "
            + ", ".join(f"{r['run']} exit {r['exit']} ({r['seconds']} s)" for r in tiny["runs"])
        )
    lines += [f"  differs: {difference}" for difference in tiny.get("differences", [])]
    lines.append(f"elapsed: {report['elapsed_s']:.0f} s")
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], text: str, out: Path) -> tuple[Path, Path]:
    """Write the rendered table and the report's data (everything measured) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    markdown, data = out / MARKDOWN, out / JSON
    markdown.write_text(text, encoding="utf-8")
    serialisable = {**report, "profile": report["profile"].as_dict()}
    data.write_text(json.dumps(serialisable, indent=2) + "\n", encoding="utf-8")
    return markdown, data
