"""``lokr-job export``: the trained LoKr in a form other tools load.

The adapter file itself (``pytorch_lora_weights.safetensors``, LyCORIS's keys) loads in LyCORIS and in
lokr-job's ``infer``. diffusers cannot load it: ``load_lora_weights`` takes LoRA (PEFT) weights only, and
no diffusers loader reads LoKr's Kronecker factors. So the diffusers form is ``merged``: the base model's
transformer with the adapter merged into its weights at ``--scale`` (the same merge ``infer`` renders
with), saved in diffusers' layout (``transformer/config.json`` and safetensors, sharded past 10 GB), which
``AuraFlowPipeline.from_pretrained(base, transformer=AuraFlowTransformer2DModel.from_pretrained(...))``
and any tool that reads a diffusers AuraFlow transformer loads.

The folder is written under a temporary name and renamed into place whole, with ``export.json`` naming
the base model, the adapter's sha256, the scale and the dtype.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from job.errors import ConfigError
from job.files import replace_folder, sha256_file

if TYPE_CHECKING:
    from job.context import JobContext

log = logging.getLogger("lokr.export")

FORMATS = ("merged",)
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
RECORD = "export.json"
TRANSFORMER_DIR = "transformer"
MAX_SHARD_SIZE = "10GB"


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lokr-job export``. Unset ones come from ``--config`` when given (see run_export)."""
    parser.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="merged: the base transformer with the adapter merged in, in diffusers' layout",
    )
    parser.add_argument(
        "--adapter",
        metavar="PATH|URI",
        help="the LoKr adapter: a .safetensors file or its folder, local, s3:// or hf:// (default with "
        "--config: <workdir>/output)",
    )
    parser.add_argument(
        "--base-model",
        metavar="REPO|PATH",
        help="Hub repo id or local diffusers folder (default with --config: the config's model, fetched)",
    )
    parser.add_argument("--scale", type=float, default=1.0, help="the adapter's strength (default 1.0)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="bf16", help="the merged weights' dtype (default bf16)"
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="folder to write (default: <workdir>/output/export-<format>, else ./export-<format>)",
    )


def run_export(args: argparse.Namespace, ctx: JobContext | None) -> Path:
    """``lokr-job export``: the command line's values, else the config's output and model."""
    from job.infer import fetched_model

    if ctx is not None and ctx.config.job.model_type == "full":
        raise ConfigError(
            "export: a full-rank run's output/transformer/ already is a whole transformer in diffusers' "
            "layout; there is no adapter to merge"
        )
    base_model = args.base_model or (fetched_model(ctx) if ctx is not None else None)
    adapter = args.adapter or (ctx.workdir.output if ctx is not None else None)
    if not base_model or adapter is None:
        raise ConfigError("export: pass --config, or --base-model and --adapter")
    default_out = (ctx.workdir.output if ctx is not None else Path()) / f"export-{args.format}"
    out = export_merged(
        str(base_model),
        adapter,
        Path(args.out) if args.out else default_out,
        scale=args.scale,
        dtype=args.dtype,
    )
    print(out)
    return out


def export_merged(base_model: str, adapter: str | Path, out: Path, *, scale: float, dtype: str) -> Path:
    """Write ``out/transformer/`` (the merged transformer) and ``out/export.json``; return ``out``."""
    import torch
    from diffusers import AuraFlowTransformer2DModel

    from job.infer import local_adapter, merge_adapter
    from job.storage import is_remote

    if is_remote(base_model):
        raise ConfigError(
            f"export: base model {base_model!r} is a URI; give a Hub repo id (owner/name) or a local folder"
        )
    folder = Path(base_model).expanduser()
    own = folder.is_dir() and not (folder / TRANSFORMER_DIR).is_dir()
    try:
        transformer = AuraFlowTransformer2DModel.from_pretrained(
            base_model, subfolder=None if own else TRANSFORMER_DIR, torch_dtype=getattr(torch, DTYPES[dtype])
        )
    except OSError as exc:
        raise ConfigError(f"export: cannot load an AuraFlow transformer from {base_model!r}: {exc}") from exc
    with tempfile.TemporaryDirectory(prefix="lokr-adapter-") as scratch:
        adapter_file = local_adapter(str(adapter), Path(scratch))
        merge_adapter(transformer, adapter_file, scale)
        adapter_sha256 = sha256_file(adapter_file)
    record = {"format": "merged", "base_model": base_model, "adapter_sha256": adapter_sha256}
    record |= {"scale": scale, "dtype": dtype}

    def fill(folder: Path) -> None:
        transformer.save_pretrained(folder / TRANSFORMER_DIR, max_shard_size=MAX_SHARD_SIZE)
        (folder / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    replace_folder(out, fill)
    log.info("export: merged transformer (scale %g, %s) written to %s", scale, dtype, out / TRANSFORMER_DIR)
    return out
