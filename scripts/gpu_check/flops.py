"""The physical floor of a training step: its FLOPs, and the rate this device reaches on a large bf16 matmul.

FLOPs per step (the base model's work; LoKr's own is overhead, and shows in the floor ratio):

    linear layers:  2·P·T per pass, P weights applied to T tokens, each nn.Linear with the tokens of the
                    stream it acts on (image 4096, text 120+8 register tokens, or the one timestep vector).
                    Passes: forward, the checkpointed forward again in backward (block layers only), and
                    the input gradient (all layers whose input the loss reaches). The frozen base weights
                    get no weight gradient, so full training's 6·N·T is 4·N·T here, plus 2·N·T to recompute.
    attention:      4·S²·D a forward pass (QKᵀ and AV, S the joint sequence, D heads·head_dim), times
                    1 forward + 1 recompute + 2 backward (gradients of both operands of both products).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

VAE_DOWNSAMPLE = 8
# AuraFlow prepends 8 learned register tokens to the caption (its register_tokens parameter).
REGISTER_TOKENS = 8


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
    return StepShape(image_tokens=patches, caption_tokens=caption_tokens, register_tokens=REGISTER_TOKENS)


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
    raise ValueError(f"gpu_check does not know which tokens {name!r} acts on (a new diffusers AuraFlow?)")


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


def bf16_matmul_rate(device: torch.device, n: int, repeats: int = 20) -> float:
    """FLOP/s of an n×n×n bf16 matmul on ``device`` (median of ``repeats``; CUDA events on a GPU, whose
    launches are asynchronous, the wall clock elsewhere)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            started = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - started)
    del a, b
    return 2.0 * n**3 / statistics.median(times)
