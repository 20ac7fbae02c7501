"""What training leaves in ``output/``, as SimpleTuner lays it out, and the record that makes ``train``
idempotent.

LoKr (``model_type: lora``): ``pytorch_lora_weights.safetensors`` (LyCORIS keys, the LyCORIS config in
metadata key ``lycoris_config``), ``lycoris_config.json``, and ``ema/ema_model.safetensors`` with ``use_ema``.
Full-rank (``model_type: full``): ``transformer/``, the trained AuraFlow transformer as diffusers saves it
(``config.json`` and ``diffusion_pytorch_model*.safetensors``, sharded with an index past 10 GB).
Both: ``training_result.json`` (model type, config hash, step, each file's sha256) written last. Every byte
is a function of the weights and the config, so equal runs write equal files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from job.config.schema import LycorisConfig
from job.files import replace_folder, sha256_file, write_atomic
from job.model.lokr import lycoris_settings, save_adapter

if TYPE_CHECKING:
    from lycoris import LycorisNetwork

    from job.train.ema import AdapterEMA

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
EMA_FILE = "ema/ema_model.safetensors"
CONFIG_FILE = "lycoris_config.json"
RESULT_FILE = "training_result.json"
TRANSFORMER_DIR = "transformer"
# A whole transformer's weights are sharded (with an index) past this size, as diffusers' save_pretrained does.
MAX_SHARD_SIZE = "10GB"


def write_output(
    output_dir: Path,
    network: LycorisNetwork,
    ema: AdapterEMA | None,
    lycoris: LycorisConfig,
    *,
    config_hash: str,
    step: int,
) -> Path:
    """Write the adapter files, each atomically, then the result record; return the adapter's path."""
    output_dir.mkdir(parents=True, exist_ok=True)
    # A record left from an earlier run must not vouch for files being replaced.
    (output_dir / RESULT_FILE).unlink(missing_ok=True)
    write_atomic(output_dir / ADAPTER_FILE, lambda tmp: save_adapter(network, tmp, lycoris), durable=True)
    settings = json.dumps(lycoris_settings(lycoris), indent=4) + "\n"
    write_atomic(
        output_dir / CONFIG_FILE, lambda tmp: tmp.write_text(settings, encoding="utf-8"), durable=True
    )
    written = [ADAPTER_FILE, CONFIG_FILE]
    if ema is not None:
        (output_dir / EMA_FILE).parent.mkdir(exist_ok=True)
        with ema.swapped_in():
            write_atomic(output_dir / EMA_FILE, lambda tmp: save_adapter(network, tmp, lycoris), durable=True)
        written.append(EMA_FILE)
    else:
        (output_dir / EMA_FILE).unlink(missing_ok=True)
    _write_result(output_dir, "lora", written, config_hash=config_hash, step=step)
    return output_dir / ADAPTER_FILE


def write_full_output(
    output_dir: Path, save_transformer: Callable[[Path], None], *, config_hash: str, step: int
) -> Path:
    """Write the full-rank transformer with ``save_transformer(folder)`` into a fresh folder, swap it in
    for ``output/transformer/``, then write the result record; return the transformer folder."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RESULT_FILE).unlink(missing_ok=True)
    final = output_dir / TRANSFORMER_DIR
    replace_folder(final, save_transformer, durable=True)
    written = sorted(p.relative_to(output_dir).as_posix() for p in final.rglob("*") if p.is_file())
    _write_result(output_dir, "full", written, config_hash=config_hash, step=step)
    return final


def trained_files(output_dir: Path, model_type: str) -> list[Path]:
    """The files that hold the trained weights (what ``publish`` needs), or [] when there are none."""
    if model_type == "full":
        folder = output_dir / TRANSFORMER_DIR
        return sorted(folder.glob("*.safetensors")) if (folder / "config.json").is_file() else []
    adapter = output_dir / ADAPTER_FILE
    return [adapter] if adapter.is_file() else []


def _write_result(
    output_dir: Path, model_type: str, written: list[str], *, config_hash: str, step: int
) -> None:
    record = {
        "model_type": model_type,
        "config_hash": config_hash,
        "step": step,
        "files": {name: sha256_file(output_dir / name) for name in written},
    }
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    write_atomic(output_dir / RESULT_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable=True)


def is_finished(output_dir: Path, *, config_hash: str, step: int | None) -> bool:
    """True when ``output_dir`` holds this config's weights trained to ``step`` (None: to the end the
    recipe sets, which its hash covers), files intact."""
    try:
        record = json.loads((output_dir / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if record.get("config_hash") != config_hash or (step is not None and record.get("step") != step):
        return False
    files = record.get("files", {})
    return bool(files) and all(
        (output_dir / name).is_file() and sha256_file(output_dir / name) == digest
        for name, digest in files.items()
    )
