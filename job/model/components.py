"""Loading what the caches need from an AuraFlow pipeline folder: the VAE, the text encoder and tokenizer,
and the image-size limits (VAE downsampling, transformer patch size and positional grid).

Everything is read from a local diffusers folder (``job.model.source.local_model_path`` says which:
the user's folder, or where ``lokr-job fetch`` put a Hub repo or a URI's mirror). torch, diffusers and
transformers are imported by the functions that load weights, so reading sizes stays cheap.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from job.config.schema import FLAVOUR_REPOS, JobConfig
from job.data.geometry import ModelGeometry
from job.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from diffusers import AuraFlowPipeline, AutoencoderKL
    from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

    from job.workdir import WorkDir

# AuraFlow's transformer (every flavour): used when a folder has no transformer/config.json to read.
AURAFLOW_PATCH_SIZE = 2
AURAFLOW_POS_EMBED_MAX_SIZE = 9216
# Every flavour's VAE is SDXL's (4 blocks: 8x downsampling), so a patch is 16 px.
_AURAFLOW_VAE_SCALE = 8

# Each flavour's pos_embed_max_size, for sizes checked before its transformer/config.json is fetched (the
# real one is read once it is).
FLAVOUR_POS_EMBED_MAX_SIZE = {
    # fal/AuraFlow: 64x64 patches (1024 px), the value diffusers' AuraFlowTransformer2DModel documents as
    # its default, written for this release (diffusers PR #8796; SimpleTuner's copy,
    # simpletuner/helpers/models/auraflow/transformer.py, keeps the docstring).
    "v0.1": 4096,
    # fal/AuraFlow-v0.2: 64x64 patches; its transformer holds 4096 positions (the shape in the traceback of
    # diffusers issue #9112), and it predates the per-aspect position selection made for v0.3 (PR #9182).
    "v0.2": 4096,
    # terminusresearch/auraflow-v0.3: 96x96 patches, 1536 px (its transformer config; DESIGN.md section 4).
    "v0.3": AURAFLOW_POS_EMBED_MAX_SIZE,
    # purplesmartai/pony-v7-base: generates at 1536x1536 natively (its release notes), which takes 96x96
    # patches. An assumption until fetched: the model's own config is then read and checked again.
    "pony": AURAFLOW_POS_EMBED_MAX_SIZE,
}


def job_geometry(job: JobConfig, folder: Path | None) -> ModelGeometry:
    """The sizes this job trains and renders at: the model's grid (read from ``folder``, the fetched model,
    or the flavour's when not fetched yet) with the config's ``aspect_bucket_alignment``."""
    if folder is not None:
        model = model_geometry(folder)
    else:
        # A flavour's own repo is sized as that flavour, whatever model_flavour says.
        model = flavour_geometry(_repo_flavour(job.model_source) or job.model_flavour)
    return replace(model, bucket_alignment=job.aspect_bucket_alignment)


def flavour_geometry(flavour: str) -> ModelGeometry:
    return ModelGeometry(
        alignment=_AURAFLOW_VAE_SCALE * AURAFLOW_PATCH_SIZE,
        max_patches=FLAVOUR_POS_EMBED_MAX_SIZE[flavour],
        latent_scale=_AURAFLOW_VAE_SCALE,
    )


def fetched_model_folder(job: JobConfig, workdir: WorkDir) -> Path | None:
    """The base model's local folder, or None when it is a Hub repo or URI not fetched yet."""
    from job.model.source import local_model_path

    try:
        return Path(local_model_path(job, workdir))
    except ConfigError:
        return None


def source_geometry(source: str) -> ModelGeometry | None:
    """The geometry of a base model named by a local folder or a flavour's Hub repo; None for another repo,
    known only once loaded (``pipeline_geometry``)."""
    folder = Path(source.removeprefix("file://")).expanduser()
    if (folder / "vae" / "config.json").is_file():
        return model_geometry(folder)
    flavour = _repo_flavour(source)
    return flavour_geometry(flavour) if flavour else None


def pipeline_geometry(pipeline: AuraFlowPipeline) -> ModelGeometry:
    config = pipeline.transformer.config
    return ModelGeometry(
        alignment=pipeline.vae_scale_factor * int(config.patch_size),
        max_patches=int(config.pos_embed_max_size),
    )


def _repo_flavour(source: str) -> str | None:
    """The flavour whose Hub repo ``source`` is, if any."""
    by_repo = {repo.lower(): flavour for flavour, repo in FLAVOUR_REPOS.items()}
    return by_repo.get(source.strip().lower())


def model_geometry(folder: Path) -> ModelGeometry:
    """Alignment and positional-grid size from the VAE and transformer configs."""
    vae = _read_config(folder / "vae" / "config.json")
    if vae is None:
        raise ConfigError(f"model folder {folder} has no readable vae/config.json")
    vae_scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    transformer = _read_config(folder / "transformer" / "config.json") or {}
    patch_size = int(transformer.get("patch_size", AURAFLOW_PATCH_SIZE))
    max_patches = int(transformer.get("pos_embed_max_size", AURAFLOW_POS_EMBED_MAX_SIZE))
    return ModelGeometry(alignment=vae_scale * patch_size, max_patches=max_patches, latent_scale=vae_scale)


def compute_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_device_type() -> str:
    """``compute_device().type``; with a CPU build of torch, answered without importing torch (most of a
    second), so a warm with nothing to encode stays light."""
    return "cpu" if _torch_is_cpu_build() else compute_device().type


def text_encoder_dtype_name(device_type: str) -> str:
    """bf16 on a GPU (how AuraFlow's UMT5 runs), float32 on a CPU (bf16 matmuls there are slow)."""
    return "bfloat16" if device_type == "cuda" else "float32"


def text_encoder_dtype(device: torch.device) -> torch.dtype:
    import torch

    return getattr(torch, text_encoder_dtype_name(device.type))


def _torch_is_cpu_build() -> bool:
    """Whether the installed torch was built without CUDA and ROCm (its version.py, read, not imported):
    such a torch never finds a GPU. Anything unexpected counts as "maybe a GPU": then torch is asked."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    try:
        text = (Path(spec.submodule_search_locations[0]) / "version.py").read_text(encoding="utf-8")
    except OSError:
        return False
    return all(re.search(rf"^{name}(: [^=]+)? = None$", text, re.MULTILINE) for name in ("cuda", "hip"))


def load_vae(
    folder: Path, device: torch.device, *, tiling: bool = False, slicing: bool = False
) -> AutoencoderKL:
    """The VAE in float32: SDXL's VAE overflows in half precision, and it encodes each image only once.
    ``tiling``/``slicing``: ``vae_enable_tiling``/``vae_enable_slicing`` (``use_vae_memory_options``)."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32)
    use_vae_memory_options(vae, tiling=tiling, slicing=slicing)
    return vae.to(device).eval().requires_grad_(False)


def use_vae_memory_options(vae: AutoencoderKL, *, tiling: bool, slicing: bool) -> None:
    """diffusers' own tiled (overlapping tiles, blended) and sliced (one image at a time) VAE passes."""
    if tiling:
        vae.enable_tiling()
    if slicing:
        vae.enable_slicing()


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
