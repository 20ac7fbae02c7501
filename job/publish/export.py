"""``lokr-job export``: the trained LoKr in a form other tools load.

``comfyui``: the adapter with its keys renamed for ComfyUI's loader. The file lokr-job trains names each
module LyCORIS's way (``lycoris_joint_transformer_blocks_0_attn_to_q.lokr_w1``), which ComfyUI maps for SD3
but not for AuraFlow; for AuraFlow it maps ``transformer.<diffusers module>`` keys (``comfy/utils.py``'s
``auraflow_to_diffusers``, read by ``comfy/lora.py``'s ``model_lora_keys_unet``). So each module's name is
looked up among the AuraFlow transformer's own Linear modules (built on the meta device from the base
model's config: no weights read) and written as ``transformer.joint_transformer_blocks.0.attn.to_q.lokr_w1``.
The tensors are unchanged: ComfyUI's LoKr patch (``comfy/weight_adapter/lokr.py``) adds
``strength · kron(w1, w2)``, scaled by ``alpha / rank`` only where a factor is low-rank, which is LyCORIS's
own merge. LyCORIS options ComfyUI's patch does not compute the same way (``rs_lora``, DoRA's
``dora_scale``, ``scalar``) are refused, naming them.

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
from job.publish.card import ADAPTER_FILENAME

if TYPE_CHECKING:
    from diffusers import AuraFlowTransformer2DModel

    from job.context import JobContext

log = logging.getLogger("lokr.export")

FORMATS = ("merged", "comfyui")
COMFYUI_FILE = "lokr-comfyui.safetensors"
# The parts of a LoKr module ComfyUI's patch reads; anything else (rs_lora's scaling, DoRA) it would
# apply differently or not at all.
COMFYUI_PARTS = frozenset(
    {"alpha", "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
)
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
RECORD = "export.json"
# A full-rank run's output is already the merged transformer, in diffusers' layout.
_FULL_RANK_EXPORT = (
    "it needs no export: its transformer/ folder is already a merged transformer diffusers loads"
)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lokr-job export``. Unset ones come from ``--config`` when given (see run_export)."""
    parser.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="merged: the base transformer with the adapter merged in, in diffusers' layout; comfyui: the "
        "adapter with the keys ComfyUI's loader maps for AuraFlow",
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
    from job.model.source import local_model_path

    if ctx is not None and ctx.config.job.model_type == "full":
        raise ConfigError(
            "export: a full-rank run's output/transformer/ already is a whole transformer in diffusers' "
            "layout; there is no adapter to merge"
        )
    base_model = args.base_model or (
        local_model_path(ctx.config.job, ctx.workdir) if ctx is not None else None
    )
    adapter = args.adapter or (ctx.workdir.output if ctx is not None else None)
    if not base_model or adapter is None:
        raise ConfigError("export: pass --config, or --base-model and --adapter")
    default_out = (ctx.workdir.output if ctx is not None else Path()) / f"export-{args.format}"
    out_dir = Path(args.out) if args.out else default_out
    if args.format == "comfyui":
        out = export_comfyui(str(base_model), adapter, out_dir)
    else:
        out = export_merged(str(base_model), adapter, out_dir, scale=args.scale, dtype=args.dtype)
    print(out)
    return out


def export_merged(base_model: str, adapter: str | Path, out: Path, *, scale: float, dtype: str) -> Path:
    """Write ``out/transformer/`` (the merged transformer) and ``out/export.json``; return ``out``."""
    import torch
    from diffusers import AuraFlowTransformer2DModel

    from job.train.output import MAX_SHARD_SIZE, TRANSFORMER_DIR

    try:
        transformer = AuraFlowTransformer2DModel.from_pretrained(
            base_model,
            subfolder=_transformer_subfolder(base_model),
            torch_dtype=getattr(torch, DTYPES[dtype]),
        )
    except OSError as exc:
        raise ConfigError(f"export: cannot load an AuraFlow transformer from {base_model!r}: {exc}") from exc
    with tempfile.TemporaryDirectory(prefix="lokr-adapter-") as scratch:
        adapter_file = local_adapter(str(adapter), Path(scratch), full_rank_hint=_FULL_RANK_EXPORT)
        merge_adapter_file(transformer, adapter_file, scale, name=adapter)
        adapter_sha256 = sha256_file(adapter_file)
    record = {"format": "merged", "base_model": base_model, "adapter_sha256": adapter_sha256}
    record |= {"scale": scale, "dtype": dtype}

    def fill(folder: Path) -> None:
        transformer.save_pretrained(folder / TRANSFORMER_DIR, max_shard_size=MAX_SHARD_SIZE)
        _write_record(folder, record)

    replace_folder(out, fill)
    log.info("export: merged transformer (scale %g, %s) written to %s", scale, dtype, out / TRANSFORMER_DIR)
    return out


def export_comfyui(base_model: str, adapter: str | Path, out: Path) -> Path:
    """Write ``out/lokr-comfyui.safetensors`` (the adapter, keys for ComfyUI) and ``out/export.json``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    names = _linear_module_names(base_model)
    by_lycoris_name = {"lycoris_" + name.replace(".", "_"): name for name in names}
    with tempfile.TemporaryDirectory(prefix="lokr-adapter-") as scratch:
        adapter_file = local_adapter(str(adapter), Path(scratch), full_rank_hint=_FULL_RANK_EXPORT)
        with safe_open(str(adapter_file), "pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
            metadata = handle.metadata() or {}
        adapter_sha256 = sha256_file(adapter_file)
    _require_comfyui_parts(adapter, tensors, metadata)
    renamed = {}
    for key, tensor in tensors.items():
        module, part = key.split(".", 1)
        if module not in by_lycoris_name:
            raise ConfigError(
                f"export: adapter {adapter} holds module {module!r}, which is not a Linear module of the "
                f"AuraFlow transformer of {base_model!r}: was it trained on another model?"
            )
        renamed[f"transformer.{by_lycoris_name[module]}.{part}"] = tensor.contiguous()
    record = {"format": "comfyui", "base_model": base_model, "adapter_sha256": adapter_sha256}

    def fill(folder: Path) -> None:
        save_file(renamed, str(folder / COMFYUI_FILE), metadata={**metadata, "lokr_job_export": "comfyui"})
        _write_record(folder, record)

    replace_folder(out, fill)
    log.info("export: %d tensors renamed for ComfyUI in %s", len(renamed), out / COMFYUI_FILE)
    return out


def _write_record(folder: Path, record: dict[str, object]) -> None:
    (folder / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _require_comfyui_parts(adapter: str | Path, tensors: dict, metadata: dict[str, str]) -> None:
    # DoRA shows as dora_scale tensors; rs_lora (its sqrt-rank scale) only in the config.
    parts = {key.split(".", 1)[1] for key in tensors}
    settings = json.loads(metadata.get("lycoris_config", "{}"))
    problems = [f"{part!r} tensors" for part in sorted(parts - COMFYUI_PARTS)]
    problems += ["rs_lora: true"] if settings.get("rs_lora") else []
    if problems:
        raise ConfigError(
            f"export --format comfyui: adapter {adapter} uses {', '.join(problems)}, which ComfyUI's LoKr "
            "patch does not apply the way LyCORIS trained it; use --format merged"
        )


def _transformer_subfolder(base_model: str) -> str | None:
    """Where the base model's transformer is (``transformer_subfolder``); a URI is refused."""
    from job.model.transformer import transformer_subfolder
    from job.storage import is_remote

    if is_remote(base_model):
        raise ConfigError(
            f"export: base model {base_model!r} is a URI; give a Hub repo id (owner/name) or a local folder"
        )
    return transformer_subfolder(base_model)


def _linear_module_names(base_model: str) -> list[str]:
    """The AuraFlow transformer's Linear modules, from its config alone (built on the meta device)."""
    import torch
    from diffusers import AuraFlowTransformer2DModel

    subfolder = _transformer_subfolder(base_model)
    try:
        config = AuraFlowTransformer2DModel.load_config(base_model, subfolder=subfolder)
    except OSError as exc:
        raise ConfigError(
            f"export: cannot read the AuraFlow transformer's config from {base_model!r}: {exc}"
        ) from exc
    with torch.device("meta"):
        transformer = AuraFlowTransformer2DModel.from_config(config)
    return [name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)]


def merge_adapter(transformer: AuraFlowTransformer2DModel, adapter: str | Path, scale: float) -> None:
    """Merge a LoKr adapter (a local file, its folder, or an ``s3://``/``hf://`` URI) into
    ``transformer``'s weights at ``scale``: what ``infer`` renders with."""
    with tempfile.TemporaryDirectory(prefix="lokr-adapter-") as scratch:
        path = local_adapter(str(adapter), Path(scratch), full_rank_hint="pass it with --transformer")
        merge_adapter_file(transformer, path, scale, name=adapter)


def merge_adapter_file(
    transformer: AuraFlowTransformer2DModel, path: Path, scale: float, *, name: str | Path
) -> None:
    """Merge the LoKr adapter file ``path`` (``name`` as the user gave it) into ``transformer``'s weights at
    ``scale``, as training computed it: what ``infer`` renders with and ``export --format merged`` writes."""
    from lycoris import create_lycoris_from_weights

    from job.model.lokr import merge_lokr, reset_lycoris_preset, route_lycoris_logs

    # LyCORIS prints to stdout, where infer and export print their results: into our log instead.
    route_lycoris_logs()
    # Module names are matched under LyCORIS's prefix, which a training preset in this process may
    # have changed.
    reset_lycoris_preset()
    network, _ = create_lycoris_from_weights(scale, str(path), transformer)
    if not network.loras:
        raise ConfigError(f"adapter {name}: none of its modules exists in this base model's transformer")
    merge_lokr(network, scale)
    log.info("adapter merged: %d modules at scale %g", len(network.loras), scale)


def local_adapter(adapter: str, scratch: Path, *, full_rank_hint: str) -> Path:
    """The adapter file of ``adapter`` (a file, its folder, or a URI downloaded into ``scratch``);
    ``full_rank_hint`` says what to do when it is a full-rank output instead."""
    from job.storage import is_remote, join, storage_for
    from job.train.output import TRANSFORMER_DIR

    if is_remote(adapter):
        uri = adapter if adapter.endswith(".safetensors") else join(adapter, ADAPTER_FILENAME)
        local = scratch / ADAPTER_FILENAME
        storage_for(uri).download_file(uri, local)
        return local
    path = Path(adapter.removeprefix("file://")).expanduser()
    if path.is_dir():
        if not (path / ADAPTER_FILENAME).is_file() and (path / TRANSFORMER_DIR / "config.json").is_file():
            raise ConfigError(
                f"adapter {adapter!r} holds a full-rank transformer (model_type full), not a LoKr adapter: "
                f"{full_rank_hint}"
            )
        path = path / ADAPTER_FILENAME
    if not path.is_file():
        raise ConfigError(f"adapter {adapter!r}: no such file (give the .safetensors file or its folder)")
    return path
