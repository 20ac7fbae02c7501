"""Loading what the caches need from an AuraFlow pipeline folder: the VAE, the text encoder and tokenizer,
and the image-size limits (VAE downsampling, transformer patch size and positional grid).

Everything is read from a local diffusers folder (``job.model.source.local_model_path`` says which:
the user's folder, or where ``lokr-job fetch`` put a Hub repo or a URI's mirror). torch, diffusers and
transformers are imported by the functions that load weights, so reading sizes stays cheap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from job.data.geometry import ModelGeometry
from job.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL
    from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

# AuraFlow's transformer (every flavour): used when a folder has no transformer/config.json to read.
AURAFLOW_PATCH_SIZE = 2
AURAFLOW_POS_EMBED_MAX_SIZE = 9216


def model_geometry(folder: Path) -> ModelGeometry:
    """Alignment and positional-grid size from the VAE and transformer configs."""
    vae = _read_config(folder / "vae" / "config.json")
    if vae is None:
        raise ConfigError(f"model folder {folder} has no readable vae/config.json")
    vae_scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    transformer = _read_config(folder / "transformer" / "config.json") or {}
    patch_size = int(transformer.get("patch_size", AURAFLOW_PATCH_SIZE))
    max_patches = int(transformer.get("pos_embed_max_size", AURAFLOW_POS_EMBED_MAX_SIZE))
    return ModelGeometry(alignment=vae_scale * patch_size, max_patches=max_patches)


def compute_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def text_encoder_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU (how AuraFlow's UMT5 runs), float32 on a CPU (bf16 matmuls there are slow)."""
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_vae(folder: Path, device: torch.device) -> AutoencoderKL:
    """The VAE in float32: SDXL's VAE overflows in half precision, and it encodes each image only once."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32)
    return vae.to(device).eval().requires_grad_(False)


def load_text_encoder(folder: Path, device: torch.device) -> tuple[PreTrainedTokenizerBase, UMT5EncoderModel]:
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(folder / "text_encoder", dtype=text_encoder_dtype(device))
    return tokenizer, encoder.to(device).eval().requires_grad_(False)


def _read_config(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
