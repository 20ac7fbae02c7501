"""One row of the table, inside a worker process: a fresh transformer, prepared, LoKr'd and offloaded as
training does it, timed over training steps, with its peak memory and ``lokr-job check``'s estimate.

The model is AuraFlow v0.3's config with random bf16 weights built directly on the device (same FLOPs and
memory as the real one, no download), or on the dry run the tiny model's config on the CPU. The step is
the training loop's: batch 1, cached latents, bf16 autocast, σ as the timestep, the flow-matching loss in
fp32, an AdamW step on the seed's LoKr.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpu_check.flops import VAE_DOWNSAMPLE, count_flops, step_shape
from gpu_check.rows import Profile, RowSpec
from job.model.tiny import default_dtype

GIB = 2**30
StepCallback = Callable[[int, float, bool], None]  # (step index, seconds, is warm-up)


@dataclass(frozen=True)
class Setup:
    """What every row of one run shares: where it runs, the model's config and the step's shape."""

    device: torch.device
    model_config: dict[str, Any]
    profile: Profile
    offload_dir: str | None


def model_config(profile: Profile) -> dict[str, Any]:
    if profile.model == "tiny":
        from job.model.tiny import TRANSFORMER_CONFIG

        return dict(TRANSFORMER_CONFIG)
    from job.model.architecture import AURAFLOW_TRANSFORMER

    return dict(AURAFLOW_TRANSFORMER)


def job_for(row: RowSpec, profile: Profile, offload_dir: Path):
    """The JobConfig a user would write for this row (what the estimate reads and training obeys)."""
    from job.config.schema import JobConfig

    settings: dict[str, Any] = {
        "data_backend_config": "multidatabackend.json",
        "lycoris_config": "lycoris_config.json",
        "max_train_steps": 1,
        "base_model_precision": row.precision,
        "gradient_checkpointing": row.checkpointing,
        "optimizer": "adamw",
        "mixed_precision": "bf16",
        "tokenizer_max_length": profile.caption_tokens,
    }
    if row.offload != "none":
        settings |= {
            "enable_group_offload": True,
            "group_offload_type": "block_level",
            "group_offload_blocks_per_group": 1,
            "group_offload_use_stream": True,
        }
    if row.offload == "disk":
        settings["group_offload_to_disk_path"] = str(offload_dir)
    return JobConfig.model_validate(settings)


def seed_lycoris():
    import json5

    from job.config.schema import LycorisConfig
    from job.tiny import LYCORIS_CONFIG_TEXT

    return LycorisConfig.model_validate(json5.loads(LYCORIS_CONFIG_TEXT))


def vram_estimate_gib(job, setup: Setup) -> float:
    """``lokr-job check``'s peak VRAM estimate for this job at the profile's square bucket."""
    from job.check.estimate import vram_estimate
    from job.config.backends import TextEmbedsConfig
    from job.config.loader import ResolvedConfig

    cfg = ResolvedConfig(
        job=job,
        datasets=[],
        text_embeds=TextEmbedsConfig(),
        lycoris=seed_lycoris(),
        prompt_library={},
        deepspeed=None,
        config_path=Path("gpu_check"),
    )
    side = setup.profile.resolution
    source = f"gpu_check ({setup.profile.model} config)"
    return vram_estimate(cfg, setup.model_config, source, (side, side)).peak_bytes / GIB


def build_transformer(device: torch.device, config: dict[str, Any]) -> torch.nn.Module:
    """The transformer with random bf16 weights, allocated and initialised on ``device``."""
    from diffusers import AuraFlowTransformer2DModel

    with torch.device(device), default_dtype(torch.bfloat16):
        return AuraFlowTransformer2DModel(**config)


class Memory:
    """Peak memory torch's CUDA allocator saw (allocated by tensors, reserved from the driver); None on
    the CPU, where there is no VRAM to measure."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peaks(self) -> dict[str, float | None]:
        if not self.cuda:
            return {"alloc_gib": None, "reserved_gib": None}
        return {
            "alloc_gib": torch.cuda.max_memory_allocated(self.device) / GIB,
            "reserved_gib": torch.cuda.max_memory_reserved(self.device) / GIB,
        }


def row_facts(row: RowSpec, setup: Setup) -> dict[str, Any]:
    """What a row is known to need before it runs: its step FLOPs and check's estimate."""
    profile = setup.profile
    shape = step_shape(setup.model_config, profile.resolution, profile.caption_tokens)
    with tempfile.TemporaryDirectory() as scratch:
        estimate = vram_estimate_gib(job_for(row, profile, Path(scratch)), setup)
    return {
        "flops": count_flops(setup.model_config, shape, checkpointing=row.checkpointing).step,
        "estimate_gib": estimate,
    }


def measure_row(row: RowSpec, setup: Setup, on_step: StepCallback, result: dict[str, Any]) -> None:
    """Build, prepare, LoKr and offload a fresh model as training does, then time its training steps.

    Fills ``result`` as it goes, so that what was measured before an out-of-memory error is still reported.
    """
    from job.model.lokr import attach_lokr, reset_lycoris_preset
    from job.model.offload.apply import apply_group_offload
    from job.model.transformer import prepare_base_model

    device, config, profile = setup.device, setup.model_config, setup.profile
    memory = Memory(device)
    memory.reset()
    with tempfile.TemporaryDirectory(dir=setup.offload_dir) as scratch:
        result["phase"] = "build"
        started = time.perf_counter()
        job = job_for(row, profile, Path(scratch))
        transformer = build_transformer(device, config)
        if job.enable_group_offload:
            # A run with group offload keeps the loaded weights in host memory and prepares them there.
            transformer.to("cpu")
        result["build_s"] = time.perf_counter() - started
        # Set-up as training does it, from the weights where a run loads them: the build's own peak (random
        # weights made on the device) is no part of it.
        memory.reset()

        result["phase"] = "setup"
        started = time.perf_counter()
        transformer = prepare_base_model(transformer, job, device)
        network = attach_lokr(transformer, seed_lycoris(), seed=0)
        network.to(device=device, dtype=torch.float32).requires_grad_(True)
        offload = apply_group_offload(transformer, job, Path(scratch), device)
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-5)
        result["setup_s"] = time.perf_counter() - started
        result["setup_peak"] = memory.peaks()
        memory.reset()

        result["phase"] = "steps"
        shape = step_shape(config, profile.resolution, profile.caption_tokens)
        side = profile.resolution // VAE_DOWNSAMPLE
        generator = torch.Generator(device).manual_seed(0)
        times: list[float] = []
        result["step_times"] = times
        for step in range(profile.warmup + profile.steps):
            x0 = torch.randn(1, config["in_channels"], side, side, device=device, generator=generator)
            noise = torch.randn(x0.shape, device=device, generator=generator)
            text = torch.randn(
                1, shape.caption_tokens, config["joint_attention_dim"], device=device, generator=generator
            )
            sigma = torch.rand(1, device=device, generator=generator)
            synchronize(device)
            started = time.perf_counter()
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
            seconds = time.perf_counter() - started
            warmup = step < profile.warmup
            if not warmup:
                times.append(seconds)
            on_step(step, seconds, warmup)
        result["step_s"] = statistics.median(times) if times else None
        result["steps_peak"] = memory.peaks()
        if offload is not None:
            result["prefetched"] = f"{offload.stats.prefetched}/{offload.stats.onloads}"
            offload.close()
        result["phase"] = "done"
        del transformer, network, optimizer, offload
        reset_lycoris_preset()
        memory.reset()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
