"""AuraFlow v0.3's transformer configuration (DESIGN.md §4): 6.8B parameters, a 96x96 patch grid.

Used where the real model is not on this machine: estimates before any download, and benchmarks that
build a full-size model with random weights (same FLOPs and memory as the real one).
"""

AURAFLOW_TRANSFORMER: dict[str, int] = {
    "attention_head_dim": 256,
    "num_attention_heads": 12,
    "num_mmdit_layers": 4,
    "num_single_dit_layers": 32,
    "joint_attention_dim": 2048,
    "caption_projection_dim": 3072,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,
    "sample_size": 64,
    "pos_embed_max_size": 9216,
}
