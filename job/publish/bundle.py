"""The trained model's Hub repo contents, laid out in a folder so that one commit uploads them all.

From ``output/`` (``job.train.output`` names its files): for a LoKr (``model_type: lora``) the adapter,
``lycoris_config.json`` and the EMA adapter when there is one; for a full-rank fine-tune (``model_type:
full``) every file of ``transformer/``, at ``transformer/`` so diffusers loads it with
``subfolder="transformer"``. Then, for both, the validation images of the latest step only, at the paths
the model card (``README.md``, written here) shows them from: ``validation/step-<N>/<nickname>.png``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from job.config.loader import ResolvedConfig
from job.errors import ConfigError
from job.files import write_bytes_atomic
from job.model.source import hub_base_model
from job.publish.card import model_card
from job.train.output import ADAPTER_FILE, CONFIG_FILE, EMA_FILE, RESULT_FILE, TRANSFORMER_DIR, trained_files
from job.validate.prompts import validation_prompts

VALIDATION_DIR = "validation"
_STEP_FOLDER = re.compile(r"step-(\d+)")


def require_trained(output: Path, model_type: str) -> None:
    """ConfigError naming what is missing unless ``output`` holds trained weights (``trained_files``)."""
    if trained_files(output, model_type):
        return
    missing = (
        f"{output / TRANSFORMER_DIR} holds no trained transformer (config.json and its .safetensors)"
        if model_type == "full"
        else f"{output / ADAPTER_FILE} does not exist"
    )
    raise ConfigError(f"nothing to publish: {missing}; run lokr-job train first")


def assemble_hub_folder(
    cfg: ResolvedConfig, output: Path, dest: Path, *, base_model: Callable[[], str]
) -> list[str]:
    """Lay out the repo's files under ``dest`` (hard links where possible); return their repo paths.
    ``base_model``: finds the local base model ``publish_formats`` exports are made from, called only when
    there are exports (a push without them never needs the base model on this machine)."""
    require_trained(output, cfg.job.model_type)
    if cfg.job.model_type == "full":
        _place_transformer(output, dest)
    else:
        _place_adapter(cfg, output, dest)
        if cfg.job.publish_formats:
            _place_exports(cfg.job.publish_formats, base_model(), output / ADAPTER_FILE, dest)
    images = latest_validation_images(cfg, output)
    for _, _, path in images:
        _place(output / path, dest / path)
    card = model_card(
        cfg, base_model=hub_base_model(cfg.job), validation_images=images, step=trained_step(cfg, output)
    )
    write_bytes_atomic(dest / "README.md", card.encode("utf-8"))
    return sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())


def _place_adapter(cfg: ResolvedConfig, output: Path, dest: Path) -> None:
    _place(output / ADAPTER_FILE, dest / ADAPTER_FILE)
    if (output / CONFIG_FILE).is_file():
        _place(output / CONFIG_FILE, dest / CONFIG_FILE)
    elif cfg.lycoris is not None:
        from job.model.lokr import lycoris_settings

        settings = json.dumps(lycoris_settings(cfg.lycoris), indent=4) + "\n"
        write_bytes_atomic(dest / CONFIG_FILE, settings.encode("utf-8"))
    if (output / EMA_FILE).is_file():
        _place(output / EMA_FILE, dest / EMA_FILE)


def _place_exports(formats: list[str], base_model: str, adapter: Path, dest: Path) -> None:
    """Each of ``publish_formats`` in a folder of its own: ``comfyui/``, ``merged/``."""
    from job.publish.export import export_comfyui, export_merged

    for name in formats:
        if name == "comfyui":
            export_comfyui(base_model, adapter, dest / name)
        else:
            export_merged(base_model, adapter, dest / name, scale=1.0, dtype="bf16")


def _place_transformer(output: Path, dest: Path) -> None:
    # Every file, not only the weights: config.json, and the shard index when the weights are sharded.
    folder = output / TRANSFORMER_DIR
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            _place(path, dest / TRANSFORMER_DIR / path.relative_to(folder))


def trained_step(cfg: ResolvedConfig, output: Path) -> int:
    """The step the weights were written at (training's result record), else the configured step count."""
    try:
        return int(json.loads((output / RESULT_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return cfg.job.max_train_steps


def latest_validation_images(cfg: ResolvedConfig, output: Path) -> list[tuple[str, str, str]]:
    """(nickname, prompt, path relative to ``output``) of the newest ``validation/step-<N>/``, in the
    order validation renders prompts (``<nickname>.png``, or ``<nickname>-<W>x<H>.png``)."""
    steps = [
        (int(match.group(1)), folder)
        for folder in (output / VALIDATION_DIR).glob("step-*")
        if folder.is_dir() and (match := _STEP_FOLDER.fullmatch(folder.name))
    ]
    if not steps:
        return []
    folder = max(steps)[1]
    remaining = {p.stem: p for p in folder.glob("*.png")}
    found: list[tuple[str, str, str]] = []
    for nickname, prompt in validation_prompts(cfg).items():
        sized = re.compile(re.escape(nickname) + r"(-\d+x\d+)?")
        for stem in sorted(s for s in remaining if sized.fullmatch(s)):
            found.append((stem, prompt, remaining.pop(stem).relative_to(output).as_posix()))
    # Images of prompts no longer in the config still show what was trained; their file name is the caption.
    found += [(stem, stem, p.relative_to(output).as_posix()) for stem, p in sorted(remaining.items())]
    return found


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed
        shutil.copyfile(source, target)
