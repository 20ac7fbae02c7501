"""Analytic estimates for ``lokr-job check``: cache size on the work directory and peak training VRAM.

Nothing is allocated: the transformer is built on torch's meta device from its config (the model
source's ``transformer/config.json`` when it is local, else AuraFlow v0.3's) to count parameters, and
LoKr is attached to that meta model to count the adapter's. Activations follow Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models"): about 34·s·h bytes per transformer
block and sample in 16-bit with a fused attention kernel (no s² term), and only the block input (2·s·h
bytes) per block under gradient checkpointing, plus one block recomputed at a time.

Full-rank (``model_type: full``) follows the ZeRO paper's accounting (Rajbhandari et al. 2020) per GPU
of N: 16-bit weights whole (ZeRO-2) or a 1/N slice plus two blocks gathered at a time (ZeRO-3; none
resident with ``offload_param``), 16-bit gradients 1/N, and 12 bytes per parameter of fp32 master weights
and Adam moments 1/N (none on the GPU with ``offload_optimizer``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from job.config.loader import ResolvedConfig
from job.data.discovery import encodes_on_demand
from job.model.architecture import AURAFLOW_TRANSFORMER

GIB = 1024**3
UMT5_XL_WIDTH = 2048  # AuraFlow's text encoder d_model
LATENT_CHANNELS = 4
VAE_DOWNSAMPLE = 8
_ACTIVATION_BYTES_PER_TOKEN_WIDTH = 34
_CHECKPOINTED_BYTES_PER_TOKEN_WIDTH = 2
# CUDA context, cuBLAS workspaces and allocator fragmentation: seen as 1-2 GiB on every PyTorch job.
_RUNTIME_OVERHEAD = 1.5 * GIB
# fp32 master weight and two Adam moments per trained parameter, as ZeRO's mixed precision keeps them.
_FULL_RANK_OPTIMIZER_BYTES = 12
# Bytes a quantized Linear weight takes, by base_model_precision.
_QUANTIZED_LINEAR_BYTES = {
    "int8-quanto": 1.0,
    "int4-quanto": 0.5,
    "int8-torchao": 1.0,
    "fp8-torchao": 1.0,
    "nf4-bnb": 0.5 + 4 / 64,
}
# SDXL's VAE (AuraFlow's), all float32: what vae_cache_ondemand keeps on the GPU beside the transformer.
_VAE_PARAMETERS = 83_653_863
# Its encoder's widest feature maps (128 channels at full resolution, float32), a few alive at a time.
_VAE_ENCODE_MAPS = 3
_VAE_ENCODE_CHANNELS = 128
# Precisions no GPU run has measured yet (scripts/gpu_check measures each when a GPU is lent).
_UNMEASURED = frozenset({"int8-torchao", "fp8-torchao", "nf4-bnb"})
# Optimizer state tensors per adapter parameter (fp32 unless the optimizer says otherwise).
_OPTIMIZER_STATES = {
    "adamw": 2,
    "adamw_bf16": 2,
    "optimi-adamw": 2,
    "optimi-lion": 1,
    "bnb-lion8bit-paged": 1,
}


@dataclass(frozen=True)
class CacheEstimate:
    latent_bytes: int
    text_bytes: int
    latents: int
    texts: int

    @property
    def total_bytes(self) -> int:
        return self.latent_bytes + self.text_bytes


@dataclass(frozen=True)
class VramEstimate:
    parameters: int  # the transformer's
    adapter_parameters: int  # the trained ones: the LoKr's, or every one (full-rank)
    weights_bytes: int  # resident on the GPU (after group offload, or this GPU's ZeRO share)
    adapter_bytes: int  # LoKr weights and their gradients, or this GPU's share of the gradients (full-rank)
    optimizer_bytes: int
    activation_bytes: int
    overhead_bytes: int
    bucket: tuple[int, int]  # the largest bucket: activations grow with it
    parameters_from: str  # the config the parameters were counted from
    training: str = "LoKr"  # what trains: "LoKr", or "full-rank, ZeRO-<stage> over <N> GPU(s)"
    # Set when the weights' precision has not been measured on a GPU yet (its bytes a weight are reasoned).
    unmeasured_precision: str | None = None
    # vae_cache_ondemand: the VAE training encodes with, and what an encode of the largest bucket adds.
    vae_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        return (
            self.weights_bytes
            + self.adapter_bytes
            + self.optimizer_bytes
            + self.activation_bytes
            + self.overhead_bytes
            + self.vae_bytes
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak_bytes": self.peak_bytes, "peak_gib": round(self.peak_bytes / GIB, 2)}


def cache_estimate(
    buckets: dict[tuple[int, int], int], captions: int, *, max_tokens: int, text_width: int
) -> CacheEstimate:
    """Latents are float32 [4, H/8, W/8] per image; text embeddings 16-bit [L, D] (the GPU encoder's
    dtype) plus an int64 mask per distinct caption, validation prompts and the empty caption included."""
    latent = sum(
        count * LATENT_CHANNELS * (w // VAE_DOWNSAMPLE) * (h // VAE_DOWNSAMPLE) * 4
        for (w, h), count in buckets.items()
    )
    text = captions * max_tokens * (text_width * 2 + 8)
    return CacheEstimate(latent, text, sum(buckets.values()), captions)


def transformer_config(model_folder: Path | None) -> tuple[dict[str, Any], str]:
    """The transformer's config and where it came from."""
    if model_folder is not None:
        path = model_folder / "transformer" / "config.json"
        try:
            return json.loads(path.read_text(encoding="utf-8")), str(path)
        except (OSError, ValueError):
            pass
    return dict(AURAFLOW_TRANSFORMER), "AuraFlow v0.3 (the model source is not on this machine)"


def text_width(model_folder: Path | None) -> int:
    if model_folder is not None:
        try:
            config = json.loads((model_folder / "text_encoder" / "config.json").read_text(encoding="utf-8"))
            return int(config["d_model"])
        except (OSError, ValueError, KeyError):
            pass
    return UMT5_XL_WIDTH


def vram_estimate(
    cfg: ResolvedConfig, config: dict[str, Any], source: str, bucket: tuple[int, int], world_size: int = 1
) -> VramEstimate:
    job = cfg.job
    counts = _count_parameters(cfg, config)
    if job.model_type == "full":
        return _full_rank_estimate(cfg, config, source, bucket, world_size, counts)
    from job.model.transformer import load_dtype

    # The weights stay in the dtype training loads them in, except quantized Linear weights: one byte
    # (int8, fp8) or half of one (int4; scales are negligible), and nf4's half a byte plus its fp32 scale per
    # 64 weights. Not yet measured on a GPU for the torchao and bitsandbytes precisions.
    loaded = load_dtype(job).itemsize
    linear_bytes = _QUANTIZED_LINEAR_BYTES.get(job.base_model_precision, loaded)
    weight_bytes = linear_bytes * counts.linear_weights + loaded * (counts.total - counts.linear_weights)
    blocks = counts.blocks or 1
    if job.enable_group_offload:
        resident_blocks = min(
            blocks, job.group_offload_blocks_per_group * (2 if job.group_offload_use_stream else 1)
        )
        per_block = weight_bytes * counts.block_fraction / blocks
        weight_bytes = int(weight_bytes * (1 - counts.block_fraction) + per_block * resident_blocks)
    adapter_dtype_bytes = 2 if job.optimizer == "adamw_bf16" else 4
    adapter_bytes = 2 * counts.adapter * adapter_dtype_bytes  # weights and gradients
    states = _OPTIMIZER_STATES.get(job.optimizer, 2)
    state_bytes = 1 if job.optimizer == "bnb-lion8bit-paged" else adapter_dtype_bytes
    optimizer_bytes = states * counts.adapter * state_bytes
    activations = _activation_bytes(cfg, config, bucket, blocks)

    return VramEstimate(
        parameters=counts.total,
        adapter_parameters=counts.adapter,
        weights_bytes=int(weight_bytes),
        adapter_bytes=adapter_bytes,
        optimizer_bytes=optimizer_bytes,
        activation_bytes=activations,
        overhead_bytes=int(_RUNTIME_OVERHEAD),
        bucket=bucket,
        parameters_from=source,
        unmeasured_precision=job.base_model_precision if job.base_model_precision in _UNMEASURED else None,
        vae_bytes=_on_demand_vae_bytes(cfg, bucket, activations),
    )


def _on_demand_vae_bytes(cfg: ResolvedConfig, bucket: tuple[int, int], activation_bytes: int) -> int:
    """What training's on-demand encoding adds to the peak: the float32 VAE and an encode's feature maps.
    An encode runs while a batch is read, between steps, with the step's activations freed: the VAE's
    weights stay beside them unless ``offload_during_startup`` parks it in CPU memory."""
    job = cfg.job
    if not any(encodes_on_demand(job, dataset) for dataset in cfg.datasets):
        return 0
    width, height = bucket
    weights = _VAE_PARAMETERS * 4
    encode = _VAE_ENCODE_MAPS * _VAE_ENCODE_CHANNELS * width * height * 4
    if job.offload_during_startup:
        return max(0, weights + encode - activation_bytes)
    return weights + max(0, encode - activation_bytes)


def _full_rank_estimate(
    cfg: ResolvedConfig,
    config: dict[str, Any],
    source: str,
    bucket: tuple[int, int],
    world_size: int,
    counts: _Counts,
) -> VramEstimate:
    job = cfg.job
    zero = (cfg.deepspeed or {}).get("zero_optimization", {})
    stage = int(zero.get("stage", 2))
    offloaded = {
        section: str((zero.get(section) or {}).get("device", "none")).lower() in ("cpu", "nvme")
        for section in ("offload_param", "offload_optimizer")
    }
    dtype_bytes = 4 if job.mixed_precision == "no" else 2
    blocks = counts.blocks or 1
    if stage == 3:
        # Each rank keeps its slice; the weights of the block being computed and the one prefetched are
        # gathered whole.
        gathered = 2 * dtype_bytes * counts.total * counts.block_fraction / blocks
        weights = gathered + (0 if offloaded["offload_param"] else dtype_bytes * counts.total / world_size)
    else:
        weights = dtype_bytes * counts.total
    optimizer = (
        0 if offloaded["offload_optimizer"] else _FULL_RANK_OPTIMIZER_BYTES * counts.total / world_size
    )
    return VramEstimate(
        parameters=counts.total,
        adapter_parameters=counts.total,
        weights_bytes=int(weights),
        adapter_bytes=int(dtype_bytes * counts.total / world_size),
        optimizer_bytes=int(optimizer),
        activation_bytes=_activation_bytes(cfg, config, bucket, blocks),
        overhead_bytes=int(_RUNTIME_OVERHEAD),
        bucket=bucket,
        parameters_from=source,
        training=f"full-rank, ZeRO-{stage} over {world_size} GPU(s)",
    )


def _activation_bytes(
    cfg: ResolvedConfig, config: dict[str, Any], bucket: tuple[int, int], blocks: int
) -> int:
    job = cfg.job
    width, height = bucket
    patch = int(config.get("patch_size", 2))
    tokens = (width // (VAE_DOWNSAMPLE * patch)) * (height // (VAE_DOWNSAMPLE * patch)) + job.max_token_length
    hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    per_block = _ACTIVATION_BYTES_PER_TOKEN_WIDTH * tokens * hidden * job.train_batch_size
    if job.gradient_checkpointing:
        kept = _CHECKPOINTED_BYTES_PER_TOKEN_WIDTH * tokens * hidden * job.train_batch_size
        return blocks * kept + per_block
    return blocks * per_block


@dataclass(frozen=True)
class _Counts:
    total: int
    linear_weights: int
    adapter: int
    blocks: int
    block_fraction: float  # of the weights, the share inside the transformer blocks (what offload moves)


def _count_parameters(cfg: ResolvedConfig, config: dict[str, Any]) -> _Counts:
    import torch
    from diffusers import AuraFlowTransformer2DModel

    from job.model.lokr import attach_lokr, reset_lycoris_preset

    known = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        transformer = AuraFlowTransformer2DModel.from_config(known)
    total = sum(p.numel() for p in transformer.parameters())
    linear = sum(m.weight.numel() for m in transformer.modules() if isinstance(m, torch.nn.Linear))
    block_lists = [transformer.joint_transformer_blocks, transformer.single_transformer_blocks]
    blocks = sum(len(b) for b in block_lists)
    in_blocks = sum(p.numel() for b in block_lists for p in b.parameters())
    adapter = 0
    if cfg.lycoris is not None and cfg.job.model_type == "lora":
        # Counting on a meta model: LyCORIS's notes and ours about wrapping belong to training's log.
        logging.disable(logging.WARNING)
        try:
            network = attach_lokr(transformer, cfg.lycoris, seed=0)
            adapter = sum(p.numel() for p in network.parameters())
        finally:
            logging.disable(logging.NOTSET)
            reset_lycoris_preset()
    return _Counts(total, linear, adapter, blocks, in_blocks / total if total else 0.0)


def steps_and_epochs(cfg: ResolvedConfig, batches_per_epoch: int) -> tuple[int, float]:
    """Optimizer steps and the epochs they make (as ``job.train.schedule.total_steps`` counts them)."""
    from job.train.schedule import total_steps

    job = cfg.job
    steps = total_steps(job, batches_per_epoch)
    epochs = steps * job.gradient_accumulation_steps / batches_per_epoch if batches_per_epoch else math.inf
    return steps, epochs
