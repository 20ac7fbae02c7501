"""``lokr-job infer``: images from the base model with a trained LoKr merged in, or with a full-rank
fine-tune's transformer in place of the base model's.

The adapter is merged into the transformer's weights (bf16 on CUDA, fp32 on CPU) and only then, if
asked, quantized to int8: LyCORIS cannot merge into quanto layers and silently does nothing there. A
full-rank transformer (``model_type: full``, ``output/transformer/``) is loaded in the same dtype and
replaces the base model's before the pipeline is built, so the base transformer is never loaded.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from job.config.flavours import DEFAULT_FLAVOUR, FLAVOUR_REPOS, flavour_of, token_limit
from job.errors import ConfigError
from job.progress import Progress
from job.publish.card import ADAPTER_FILENAME
from job.track.logs import adopt_library_loggers
from job.validate.prompts import safe_nickname, validation_prompts

if TYPE_CHECKING:
    import torch
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel

    from job.config.schema import JobConfig
    from job.context import JobContext

log = logging.getLogger("lokr.infer")

T = TypeVar("T")

# Used when neither the command line nor a config says otherwise.
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.5
DEFAULT_SIZE = 1024
DEFAULT_SEED = 42
_SIZE_KEY = "infer --width/--height"


def infer(
    base_model: str | Path,
    adapter: str | Path | None,
    prompts: Mapping[str, str] | Sequence[str],
    out_dir: Path,
    *,
    transformer: str | Path | None = None,
    scale: float = 1.0,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    width: int = DEFAULT_SIZE,
    height: int = DEFAULT_SIZE,
    seed: int = DEFAULT_SEED,
    int8: bool = False,
    negative_prompt: str = "",
    max_sequence_length: int = token_limit(DEFAULT_FLAVOUR),
    vae_tiling: bool = False,
    vae_slicing: bool = False,
) -> list[Path]:
    """Write one PNG per prompt to ``out_dir`` and return their paths.

    ``adapter`` is a ``.safetensors`` file, a folder holding ``pytorch_lora_weights.safetensors``, or an
    ``s3://``/``hf://`` URI of either; None renders the base model alone. ``transformer``, instead of an
    adapter, is a full-rank fine-tune that replaces the base model's transformer: its local folder
    (``config.json`` and the weights) or the output folder holding ``transformer/``. ``scale`` is the
    adapter's strength. ``prompts`` is a list, or a mapping nickname → prompt that names the files. Every
    image starts from ``seed``. ``vae_tiling``/``vae_slicing``: the config's ``vae_enable_*`` for the decode.
    """
    import torch

    from job.check.sizes import require_render_size
    from job.model.components import pipeline_geometry, source_geometry, use_vae_memory_options

    if adapter is not None and transformer is not None:
        raise ConfigError("infer: give a LoKr adapter or a full-rank transformer, not both")
    # A local folder or a flavour's repo tells its positional grid before minutes of loading; the loaded
    # transformer (perhaps a full-rank one) is checked again before anything renders.
    known = source_geometry(str(base_model))
    if known is not None:
        require_render_size(width, height, known, _SIZE_KEY)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipeline = _load_pipeline(
        str(base_model), torch.bfloat16 if device == "cuda" else torch.float32, transformer
    )
    require_render_size(width, height, pipeline_geometry(pipeline), _SIZE_KEY)
    if adapter is not None:
        from job.publish.export import merge_adapter

        merge_adapter(pipeline.transformer, adapter, scale)
    use_vae_memory_options(pipeline.vae, tiling=vae_tiling, slicing=vae_slicing)
    if int8:
        from optimum.quanto import freeze, qint8, quantize

        quantize(pipeline.transformer, weights=qint8)
        freeze(pipeline.transformer)
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=not sys.stderr.isatty())

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    named = _named(prompts)
    with Progress("infer", len(named), unit="img", interval_s=0) as progress:
        for name, prompt in named.items():
            image = pipeline(
                prompt=prompt,
                negative_prompt=negative_prompt,
                num_inference_steps=steps,
                guidance_scale=guidance,
                width=width,
                height=height,
                max_sequence_length=max_sequence_length,
                generator=torch.Generator("cpu").manual_seed(seed),
            ).images[0]
            path = out_dir / f"{name}.png"
            image.save(path)
            paths.append(path)
            progress.update()
    return paths


def _load_pipeline(base_model: str, dtype: torch.dtype, transformer: str | Path | None) -> AuraFlowPipeline:
    from diffusers import AuraFlowPipeline

    from job.storage import is_remote

    if is_remote(base_model):
        raise ConfigError(
            f"base model {base_model!r} is a URI; give a Hub repo id (owner/name) or a local diffusers folder"
        )
    # A component passed in is not loaded from the base model: a 6.8B transformer is not read twice.
    components = {} if transformer is None else {"transformer": _load_transformer(str(transformer), dtype)}
    try:
        pipeline = AuraFlowPipeline.from_pretrained(base_model, dtype=dtype, **components)
    except OSError as exc:
        raise ConfigError(f"cannot load an AuraFlow pipeline from {base_model!r}: {exc}") from exc
    adopt_library_loggers()
    return pipeline


def _load_transformer(given: str, dtype: torch.dtype) -> AuraFlowTransformer2DModel:
    from diffusers import AuraFlowTransformer2DModel

    folder = _transformer_folder(given)
    try:
        transformer = AuraFlowTransformer2DModel.from_pretrained(folder, dtype=dtype)
    except OSError as exc:
        raise ConfigError(f"cannot load an AuraFlow transformer from {folder}: {exc}") from exc
    log.info("full-rank transformer loaded from %s", folder)
    return transformer


def _transformer_folder(given: str) -> Path:
    """The folder holding the transformer's ``config.json``: ``given`` or its ``transformer/``."""
    from job.storage import is_remote
    from job.train.output import TRANSFORMER_DIR

    if is_remote(given):
        raise ConfigError(
            f"transformer {given!r}: give a local folder; download it first (hf download, aws s3 sync)"
        )
    path = Path(given.removeprefix("file://")).expanduser()
    for folder in (path / TRANSFORMER_DIR, path):
        if (folder / "config.json").is_file():
            return folder
    raise ConfigError(
        f"transformer {given!r}: no config.json there or in its {TRANSFORMER_DIR}/ (give the trained "
        f"transformer's folder or the output folder holding {TRANSFORMER_DIR}/)"
    )


def _named(prompts: Mapping[str, str] | Sequence[str]) -> dict[str, str]:
    if isinstance(prompts, Mapping):
        return {safe_nickname(name): prompt for name, prompt in prompts.items()}
    # Numbered, so two prompts that differ only in punctuation still get two files.
    return {f"{i:02d}-{safe_nickname(prompt)[:48]}": prompt for i, prompt in enumerate(prompts)}


def add_infer_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lokr-job infer``. Unset ones come from ``--config`` when given (see run_infer)."""
    parser.add_argument(
        "--adapter",
        metavar="PATH|URI",
        help=f"the LoKr adapter: a .safetensors file or a folder holding {ADAPTER_FILENAME}, local, s3:// "
        "or hf:// (default with a model_type lora --config: <workdir>/output)",
    )
    parser.add_argument(
        "--transformer",
        metavar="PATH",
        help="a full-rank fine-tune instead of an adapter: the trained transformer's local folder, or the "
        "output folder holding transformer/ (default with a model_type full --config: <workdir>/output)",
    )
    parser.add_argument(
        "--prompt",
        dest="prompts",
        action="append",
        metavar="TEXT",
        help="a prompt (repeatable; default with --config: the validation prompts)",
    )
    parser.add_argument(
        "--out", metavar="DIR", help="folder for the PNGs (default: <workdir>/output/infer, else ./infer)"
    )
    parser.add_argument("--scale", type=float, help="LoKr adapter strength (default 1.0)")
    parser.add_argument("--steps", type=int, metavar="N", help=f"inference steps (default {DEFAULT_STEPS})")
    parser.add_argument("--guidance", type=float, help=f"guidance scale (default {DEFAULT_GUIDANCE})")
    parser.add_argument("--width", type=int, help=f"image width, a multiple of 16 (default {DEFAULT_SIZE})")
    parser.add_argument("--height", type=int, help=f"image height, a multiple of 16 (default {DEFAULT_SIZE})")
    parser.add_argument("--seed", type=int, help=f"seed for every image (default {DEFAULT_SEED})")
    parser.add_argument(
        "--int8",
        action="store_true",
        help="quantize the transformer to int8, after merging an adapter (optimum-quanto)",
    )
    parser.add_argument("--negative-prompt", metavar="TEXT", help="negative prompt (default: none)")
    parser.add_argument(
        "--base-model",
        metavar="REPO|PATH",
        help="Hub repo id or local diffusers folder (default with --config: the config's model)",
    )
    parser.add_argument(
        "--model-flavour",
        choices=sorted(FLAVOUR_REPOS),
        help="without --config, the base model's flavour: prompts are padded to the length training used, "
        f"{token_limit(DEFAULT_FLAVOUR)} tokens, {token_limit('pony')} for pony (default: the flavour whose "
        f"Hub repo --base-model names, else {DEFAULT_FLAVOUR})",
    )


def run_infer(args: argparse.Namespace, ctx: JobContext | None) -> list[Path]:
    """``lokr-job infer``: the command line's values, else the config's validation settings, else defaults."""
    job = ctx.config.job if ctx is not None else None
    base_model = args.base_model or (_fetched_model(ctx) if ctx is not None else None)
    if not base_model:
        raise ConfigError("infer: pass --base-model (a Hub repo id or local folder) or --config")
    adapter, transformer = _trained_weights(args, ctx)
    prompts: Mapping[str, str] | Sequence[str] = args.prompts or (
        validation_prompts(ctx.config) if ctx else []
    )
    if not prompts:
        raise ConfigError("infer: pass at least one --prompt (the config has no validation prompts)")
    size = job.validation_sizes[0] if job else (DEFAULT_SIZE, DEFAULT_SIZE)
    out = Path(args.out) if args.out else (ctx.workdir.output / "infer" if ctx else Path("infer"))
    paths = infer(
        base_model,
        adapter,
        prompts,
        out,
        transformer=transformer,
        scale=_first(args.scale, 1.0),
        steps=_first(args.steps, job.validation_num_inference_steps if job else DEFAULT_STEPS),
        guidance=_first(args.guidance, job.validation_guidance if job else DEFAULT_GUIDANCE),
        width=_first(args.width, size[0]),
        height=_first(args.height, size[1]),
        seed=_first(args.seed, job.validation_seed if job else DEFAULT_SEED),
        int8=args.int8,
        negative_prompt=_first(args.negative_prompt, job.validation_negative_prompt if job else ""),
        max_sequence_length=_token_limit(args, job, base_model),
        vae_tiling=job.vae_enable_tiling if job else False,
        vae_slicing=job.vae_enable_slicing if job else False,
    )
    for path in paths:
        print(path)
    return paths


def _trained_weights(
    args: argparse.Namespace, ctx: JobContext | None
) -> tuple[str | Path | None, str | Path | None]:
    """(adapter, transformer), one of them set: the command line's, else the config's output folder."""
    output = ctx.workdir.output if ctx is not None else None
    full_config = ctx is not None and ctx.config.job.model_type == "full"
    if args.transformer is None and not full_config:
        adapter = args.adapter or output
        if adapter is None:
            raise ConfigError(
                "infer: pass --adapter (the trained .safetensors file or its folder), --transformer (a "
                "full-rank fine-tune) or --config"
            )
        return adapter, None
    # Full-rank: options that only shape a LoKr merge would be silently ignored, so refuse them.
    if args.adapter is not None:
        raise ConfigError(
            "infer: --adapter takes a LoKr adapter (model_type lora); a full-rank fine-tune is a whole "
            "transformer: pass its folder with --transformer (default with --config: <workdir>/output)"
        )
    if args.scale is not None:
        raise ConfigError("infer: --scale is a LoKr adapter's strength; a full-rank fine-tune has none")
    return None, args.transformer or output


def _token_limit(args: argparse.Namespace, job: JobConfig | None, base_model: str | Path) -> int:
    """Prompts are padded to the length training used: the config's, else the flavour's (training's
    default when ``tokenizer_max_length`` is unset), not the pipeline's own 256."""
    if job is None:
        return token_limit(args.model_flavour or flavour_of(str(base_model)))
    if args.model_flavour is not None:
        raise ConfigError(
            "infer: --model-flavour is for infer without --config; with one, the config's model_flavour and "
            "tokenizer_max_length set the prompt length"
        )
    return job.max_token_length


def _fetched_model(ctx: JobContext) -> str:
    """The config's base model where ``lokr-job fetch`` put it (an S3 or Hub source is not loadable as is)."""
    from job.model.source import local_model_path

    return local_model_path(ctx.config.job, ctx.workdir)


def _first(given: T | None, fallback: T) -> T:
    """The command line's value when given (0 and "" count as given), else the fallback."""
    return fallback if given is None else given
