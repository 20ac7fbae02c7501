#!/usr/bin/env python3
"""Every GPU measurement of lokr-job in one call: LoKr training steps of the full-size AuraFlow, as a table.

    python scripts/bench_gpu.py                 # on a CUDA machine: all six configurations
    python scripts/bench_gpu.py --only int8:ram # a subset (precision:offload, comma-separated)
    python scripts/bench_gpu.py --tiny-job      # and the tiny job end to end through the CLI
    python scripts/bench_gpu.py --dry-run       # anywhere: the FLOP count only

The transformer has AuraFlow v0.3's config (DESIGN §4) with random bf16 weights built on the GPU: the same
FLOPs and memory as the real one, no download. Each configuration (bf16 or int8-quanto, times no offload,
group offload in RAM with streams, group offload to disk with streams) gets a fresh model, the seed's LoKr
config, gradient checkpointing, batch 1 at 1024x1024 (128x128 latents) with 120 text tokens, the
flow-matching loss and an AdamW step; it reports the median seconds per step over ``--steps`` steps after
``--warmup``, the peak memory PyTorch allocated (``torch.cuda.max_memory_allocated``) and the ratio to a
floor: the step's FLOPs at the rate this GPU reaches on a large bf16 matmul.

FLOPs per step (the base model's work; LoKr's own is overhead, and shows in the ratio):

    linear layers:  2·P·T per pass, P weights applied to T tokens, each nn.Linear with the tokens of the
                    stream it acts on (image 4096, text 120+8 register tokens, or the one timestep vector).
                    Passes: forward, the checkpointed forward again in backward (block layers only), and
                    the input gradient (all layers whose input the loss reaches). The frozen base weights
                    get no weight gradient, so full training's 6·N·T is 4·N·T here, plus 2·N·T to recompute.
    attention:      4·S²·D a forward pass (QKᵀ and AV, S the joint sequence, D heads·head_dim), times
                    1 forward + 1 recompute + 2 backward (gradients of both operands of both products).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from job.model.architecture import AURAFLOW_TRANSFORMER
from job.model.tiny import default_dtype

VAE_DOWNSAMPLE = 8
PRECISIONS = ("bf16", "int8-quanto")
OFFLOADS = ("none", "ram", "disk")
PRECISION_NAMES = {"bf16": "bf16", "int8": "int8-quanto", "int8-quanto": "int8-quanto"}


# --- FLOPs ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepShape:
    image_tokens: int
    caption_tokens: int
    register_tokens: int

    @property
    def text_tokens(self) -> int:
        return self.caption_tokens + self.register_tokens

    @property
    def sequence(self) -> int:
        return self.image_tokens + self.text_tokens


@dataclass(frozen=True)
class FlopCount:
    linear_forward: float
    attention_forward: float
    step: float


def step_shape(config: dict[str, Any], resolution: int, caption_tokens: int) -> StepShape:
    patches = (resolution // VAE_DOWNSAMPLE // config["patch_size"]) ** 2
    # AuraFlow prepends 8 learned register tokens to the caption (its register_tokens parameter).
    return StepShape(image_tokens=patches, caption_tokens=caption_tokens, register_tokens=8)


def linear_tokens(name: str, shape: StepShape) -> int:
    """The tokens an AuraFlow nn.Linear acts on, from its place in the model."""
    image, text, both = shape.image_tokens, shape.text_tokens, shape.sequence
    timestep_only = (".norm1.", ".norm1_context.", "time_step_proj.", "norm_out.")
    if any(part in f".{name}" for part in timestep_only):
        return 1
    if name.startswith("joint_transformer_blocks."):
        if ".ff_context." in name or any(
            f".attn.{p}" in name for p in ("add_q", "add_k", "add_v", "to_add_out")
        ):
            return text
        return image
    if name.startswith("single_transformer_blocks."):
        return both
    if name in ("pos_embed.proj", "proj_out"):
        return image
    if name == "context_embedder":
        return shape.caption_tokens
    raise ValueError(f"bench_gpu does not know which tokens {name!r} acts on (a new diffusers AuraFlow?)")


def count_flops(config: dict[str, Any], shape: StepShape, checkpointing: bool = True) -> FlopCount:
    """The analytic FLOPs of one LoKr training step (see the module docstring), from a meta-device model."""
    from diffusers import AuraFlowTransformer2DModel

    with torch.device("meta"):
        model = AuraFlowTransformer2DModel(**config)
    recompute = 1 if checkpointing else 0
    linear_forward = step = 0.0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        forward = 2.0 * module.weight.numel() * linear_tokens(name, shape)
        in_block = "transformer_blocks." in name
        # The embedders' inputs (latents, caption, timestep) need no gradient; everything after them does.
        reaches_input = in_block or name == "proj_out"
        linear_forward += forward
        step += forward * (1 + (recompute if in_block else 0) + (1 if reaches_input else 0))
    blocks = config["num_mmdit_layers"] + config["num_single_dit_layers"]
    width = config["num_attention_heads"] * config["attention_head_dim"]
    attention_forward = blocks * 4.0 * shape.sequence**2 * width
    step += attention_forward * (1 + recompute + 2)
    return FlopCount(linear_forward, attention_forward, step)


# --- measuring -----------------------------------------------------------------------------------------


@dataclass
class Row:
    precision: str
    offload: str
    setup_s: float
    step_s: float
    peak_gib: float
    floor_s: float
    prefetch: str

    @property
    def ratio(self) -> float:
        return self.step_s / self.floor_s


def bf16_matmul_rate(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """FLOP/s of an n×n×n bf16 matmul on ``device`` (median of ``repeats``)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2.0 * n**3 / statistics.median(times)


def build_transformer(device: torch.device, config: dict[str, Any]) -> torch.nn.Module:
    """The transformer with random bf16 weights, allocated and initialised on ``device``."""
    from diffusers import AuraFlowTransformer2DModel

    with torch.device(device), default_dtype(torch.bfloat16):
        return AuraFlowTransformer2DModel(**config)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def job_for(precision: str, offload: str, offload_dir: Path):
    from job.config.schema import JobConfig

    settings: dict[str, Any] = {
        "data_backend_config": "multidatabackend.json",
        "lycoris_config": "lycoris_config.json",
        "max_train_steps": 1,
        "base_model_precision": precision,
        "gradient_checkpointing": True,
        "optimizer": "adamw",
        "mixed_precision": "bf16",
    }
    if offload != "none":
        # The seed's flags: block level, one block a group, streams; the disk path is the commented option.
        settings |= {
            "enable_group_offload": True,
            "group_offload_type": "block_level",
            "group_offload_blocks_per_group": 1,
            "group_offload_use_stream": True,
        }
    if offload == "disk":
        settings["group_offload_to_disk_path"] = str(offload_dir)
    return JobConfig.model_validate(settings)


@dataclass(frozen=True)
class Setup:
    """What every configuration shares: where it runs, the model's config and the step's shape."""

    device: torch.device
    model_config: dict[str, Any]
    resolution: int
    caption_tokens: int
    warmup: int
    steps: int
    offload_dir: str | None


def bench_config(precision: str, offload: str, setup: Setup, floor_s: float) -> Row:
    """Build, prepare, LoKr and offload a fresh model as training does, then time its training steps."""
    import json5

    from job.config.schema import LycorisConfig
    from job.model.lokr import attach_lokr
    from job.model.offload import apply_group_offload
    from job.model.transformer import prepare_base_model
    from job.tiny import LYCORIS_CONFIG_TEXT

    device, config = setup.device, setup.model_config
    with tempfile.TemporaryDirectory(dir=setup.offload_dir) as scratch:
        job = job_for(precision, offload, Path(scratch))
        transformer = prepare_base_model(build_transformer(device, config), job, device)
        lycoris = LycorisConfig.model_validate(json5.loads(LYCORIS_CONFIG_TEXT))
        network = attach_lokr(transformer, lycoris, seed=0)
        network.to(device=device, dtype=torch.float32).requires_grad_(True)
        started = time.perf_counter()
        offload_handle = apply_group_offload(transformer, job, Path(scratch), device)
        setup_s = time.perf_counter() - started
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-5)
        release_memory(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        shape = step_shape(config, setup.resolution, setup.caption_tokens)
        side = setup.resolution // VAE_DOWNSAMPLE
        generator = torch.Generator(device).manual_seed(0)
        times = []
        for step in range(setup.warmup + setup.steps):
            x0 = torch.randn(1, config["in_channels"], side, side, device=device, generator=generator)
            noise = torch.randn(x0.shape, device=device, generator=generator)
            text = torch.randn(
                1, shape.caption_tokens, config["joint_attention_dim"], device=device, generator=generator
            )
            sigma = torch.rand(1, device=device, generator=generator)
            synchronize(device)
            started = time.perf_counter()
            # As the training loop does: bf16 autocast, σ as the timestep, the flow-matching target in fp32.
            with torch.autocast(device.type, dtype=torch.bfloat16):
                noisy = ((1 - sigma) * x0 + sigma * noise).to(torch.bfloat16)
                prediction = transformer(
                    hidden_states=noisy, encoder_hidden_states=text.to(torch.bfloat16), timestep=sigma
                ).sample
            loss = torch.nn.functional.mse_loss(prediction.float(), noise - x0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            if step >= setup.warmup:
                times.append(time.perf_counter() - started)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        prefetch = "-"
        if offload_handle is not None:
            prefetch = f"{offload_handle.stats.prefetched}/{offload_handle.stats.onloads}"
            offload_handle.close()
        del transformer, network, optimizer, offload_handle
        release_memory(device)
    return Row(precision, offload, setup_s, statistics.median(times), peak, floor_s, prefetch)


def run_tiny_job(workdir: Path) -> list[str]:
    """The tiny job through the CLI, plainly and with the seed's group-offload flags: exit codes and times."""
    cli = [sys.executable, "-m", "job"]
    subprocess.run([*cli, "tiny", str(workdir / "tiny")], check=True)
    config = workdir / "tiny" / "config" / "config.json"
    variants = {
        "plain": [],
        "group offload": ["--set", "enable_group_offload=true", "--set", "group_offload_use_stream=true"],
    }
    lines = []
    for label, extra in variants.items():
        started = time.perf_counter()
        done = subprocess.run(
            [
                *cli,
                "run",
                "--config",
                str(config),
                "--workdir",
                str(workdir / label.replace(" ", "-")),
                *extra,
            ],
            check=False,
        )
        lines.append(f"tiny job, {label}: exit {done.returncode} in {time.perf_counter() - started:.1f} s")
    return lines


# --- output --------------------------------------------------------------------------------------------


def print_flops(count: FlopCount, shape: StepShape) -> None:
    print(
        f"step: batch 1, {shape.image_tokens} image tokens + {shape.text_tokens} text tokens "
        f"({shape.caption_tokens} caption + {shape.register_tokens} register), gradient checkpointing"
    )
    print(
        f"forward FLOPs: linear {count.linear_forward / 1e12:.2f} T, attention {count.attention_forward / 1e12:.2f} T"
    )
    print(f"FLOPs per training step: {count.step / 1e12:.2f} T")


def print_table(rows: list[Row]) -> None:
    header = f"{'precision':<12} {'offload':<8} {'setup s':>8} {'s/step':>8} {'peak GiB':>9} {'floor s':>8} {'ratio':>6} {'prefetched':>11}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.precision:<12} {r.offload:<8} {r.setup_s:>8.1f} {r.step_s:>8.3f} {r.peak_gib:>9.2f} "
            f"{r.floor_s:>8.3f} {r.ratio:>6.2f} {r.prefetch:>11}"
        )


def selected(only: str | None) -> list[tuple[str, str]]:
    everything = [(p, o) for p in PRECISIONS for o in OFFLOADS]
    if not only:
        return everything
    chosen = []
    for item in only.split(","):
        precision, _, offload = item.strip().partition(":")
        if PRECISION_NAMES.get(precision) not in PRECISIONS or offload not in OFFLOADS:
            raise SystemExit(
                f"--only: {item!r} is not precision:offload ({'/'.join(PRECISIONS)} : {'/'.join(OFFLOADS)})"
            )
        chosen.append((PRECISION_NAMES[precision], offload))
    return chosen


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10, help="measured steps per configuration (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before measuring (default 3)")
    parser.add_argument(
        "--resolution", type=int, default=1024, help="square image side in pixels (default 1024)"
    )
    parser.add_argument("--text-tokens", type=int, default=120, help="caption length in tokens (default 120)")
    parser.add_argument("--only", help="configurations to run, e.g. bf16:none,int8:disk (default: all six)")
    parser.add_argument("--offload-dir", help="where disk offload writes (default: the system temp folder)")
    parser.add_argument("--tiny-job", action="store_true", help="also run the tiny job end to end")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--dry-run", action="store_true", help="print the FLOP count only (no GPU needed)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = step_shape(AURAFLOW_TRANSFORMER, args.resolution, args.text_tokens)
    count = count_flops(AURAFLOW_TRANSFORMER, shape)
    print_flops(count, shape)
    if args.dry_run:
        return 0
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device (use --dry-run for the FLOP count)", file=sys.stderr)
        return 2
    configurations = selected(args.only)
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rate = bf16_matmul_rate(device)
    print(f"bf16 matmul (8192³): {rate / 1e12:.0f} TFLOP/s; floor {count.step / rate:.3f} s/step\n")
    setup = Setup(
        device,
        AURAFLOW_TRANSFORMER,
        args.resolution,
        args.text_tokens,
        args.warmup,
        args.steps,
        args.offload_dir,
    )
    rows = []
    for precision, offload in configurations:
        rows.append(bench_config(precision, offload, setup, count.step / rate))
        print(
            f"  {precision} / {offload}: {rows[-1].step_s:.3f} s/step, {rows[-1].peak_gib:.2f} GiB",
            flush=True,
        )
    print()
    print_table(rows)
    extra = []
    if args.tiny_job:
        with tempfile.TemporaryDirectory() as workdir:
            extra = run_tiny_job(Path(workdir))
        print("\n" + "\n".join(extra))
    if args.json:
        payload = {
            "device": torch.cuda.get_device_name(),
            "flops_per_step": count.step,
            "bf16_matmul_flops": rate,
            "rows": [asdict(r) | {"ratio": r.ratio} for r in rows],
            "tiny_job": extra,
            "env": {k: v for k, v in os.environ.items() if k.startswith(("CUDA", "PYTORCH"))},
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
