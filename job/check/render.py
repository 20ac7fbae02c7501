"""The person-readable form of a ``CheckReport``: short sections, sizes in GiB/MiB, problems last."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from job.check.disk import describe_parts
from job.check.estimate import GIB
from job.oserrors import human_size

if TYPE_CHECKING:
    from job.check.report import CheckReport


def render_text(report: CheckReport) -> str:
    lines = [
        f"config: {report.config_path} (recipe {report.recipe_hash})",
        f"model: {report.model} ({report.precision})",
        f"warnings: {len(report.warnings)}",
        "",
        "access:",
    ]
    lines += [f"  {'ok  ' if a.ok else 'FAIL'} {a.what}: {a.uri}: {a.detail}" for a in report.access]
    lines += ["", "datasets:"]
    for d in report.datasets:
        where = "scanned" if d.scanned else "listed (not fetched yet)"
        lines.append(
            f"  {d.id} ({d.role}, repeats {d.repeats}, {where}): {d.images} images, {d.usable} usable, "
            f"{d.captions} distinct captions, {sum(d.skipped.values())} skipped"
        )
        if d.buckets:
            lines.append("    buckets: " + ", ".join(f"{w}x{h} ×{n}" for (w, h), n in d.buckets.items()))
        lines += [f"    skipped ×{n}: {reason}" for reason, n in d.skipped.most_common()]
        lines += [f"      e.g. {example}" for example in d.skipped_examples]
        lines += [f"    {line}" for line in d.dropped + d.padded]
    epochs = "∞" if math.isinf(report.epochs) else f"{report.epochs:.2f}"
    lines += [
        "",
        f"training: {report.steps} steps, {epochs} epochs, {report.batches_per_epoch} batches an epoch",
    ]
    if report.cache is not None:
        c = report.cache
        lines.append(
            f"cache: {_size(c.total_bytes)} ({c.latents} latents {_size(c.latent_bytes)}, "
            f"{c.texts} text embeddings {_size(c.text_bytes)})"
        )
    if report.vram is not None:
        v = report.vram
        estimate = (
            f"estimate, {v.unmeasured_precision} not yet measured on a GPU"
            if v.unmeasured_precision
            else "estimate"
        )
        lines += [
            f"peak VRAM ({estimate}): {v.peak_bytes / GIB:.1f} GiB at bucket {v.bucket[0]}x{v.bucket[1]}",
            f"  transformer {_count(v.parameters)} parameters (from {v.parameters_from}): "
            f"{_size(v.weights_bytes)} resident",
            f"  {v.training}: {_count(v.adapter_parameters)} parameters trained, "
            f"{_size(v.adapter_bytes)} {'with ' if v.training == 'LoKr' else ''}gradients; "
            f"optimizer state {_size(v.optimizer_bytes)}",
            f"  activations {_size(v.activation_bytes)}; CUDA context and allocator {_size(v.overhead_bytes)}",
        ]
        if v.vae_bytes:
            lines.append(f"  VAE for vae_cache_ondemand's encodes during training {_size(v.vae_bytes)}")
    if report.disk is not None:
        d = report.disk
        lines.append(
            f"disk (estimate) in {d.workdir}: about {human_size(d.total_bytes)} ({describe_parts(d)}); "
            f"{human_size(d.present_bytes)} already there, {human_size(d.free_bytes)} free"
        )
    if report.estimates_note:
        lines.append(f"note: {report.estimates_note}")
    lines.append("")
    if report.problems:
        lines.append(f"{len(report.problems)} problems:")
        lines += [f"  - [exit {code}] {message}" for code, message in report.problems]
    else:
        lines.append("config OK; ready to run")
    return "\n".join(lines)


def _size(count: int) -> str:
    if count >= GIB:
        return f"{count / GIB:.2f} GiB"
    return f"{count / 1024**2:.1f} MiB" if count >= 1024**2 else f"{count / 1024:.1f} KiB"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)
