"""Gradient checkpointing of the AuraFlow transformer's blocks, every block or every Nth one.

SimpleTuner's ``gradient_checkpointing_interval`` (its AuraFlow transformer, simpletuner/helpers/models/
auraflow/transformer.py, asks ``should_checkpoint_block`` in simpletuner/helpers/training/
gradient_checkpointing_interval.py) checkpoints block i of each stack (the joint blocks, then the single
blocks, each counted from 0) when i % N == 0; unset or 1 means every block. diffusers' AuraFlow transformer
hands each block to one checkpointing function, so that function decides per block here: the others run
as plain calls and keep their activations (more memory, less recomputation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import AuraFlowTransformer2DModel


def enable_block_checkpointing(transformer: AuraFlowTransformer2DModel, interval: int | None) -> None:
    if interval is None or interval <= 1:
        transformer.enable_gradient_checkpointing()
        return
    checkpointed = {
        id(block)
        for stack in (transformer.joint_transformer_blocks, transformer.single_transformer_blocks)
        for index, block in enumerate(stack)
        if index % interval == 0
    }

    def checkpoint_some(block: torch.nn.Module, *args: Any) -> Any:
        if id(block) not in checkpointed:
            return block(*args)
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)

    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_some)
