"""The trained adapter as SimpleTuner lays it out, and the record that makes ``train`` idempotent.

``output/``: ``pytorch_lora_weights.safetensors`` (LyCORIS keys, the LyCORIS config in metadata key
``lycoris_config``), ``lycoris_config.json``, ``ema/ema_model.safetensors`` with ``use_ema``, and
``training_result.json`` (config hash, step, each file's sha256) written last. Every byte is a function of
the weights and the config, so equal runs write equal files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from job.config.schema import LycorisConfig
from job.files import sha256_file, write_atomic
from job.model.lokr import lycoris_settings, save_adapter

if TYPE_CHECKING:
    from lycoris import LycorisNetwork

    from job.train.ema import AdapterEMA

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
EMA_FILE = "ema/ema_model.safetensors"
CONFIG_FILE = "lycoris_config.json"
RESULT_FILE = "training_result.json"


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
    record = {
        "config_hash": config_hash,
        "step": step,
        "files": {name: sha256_file(output_dir / name) for name in written},
    }
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    write_atomic(output_dir / RESULT_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable=True)
    return output_dir / ADAPTER_FILE


def is_finished(output_dir: Path, *, config_hash: str, step: int) -> bool:
    """True when ``output_dir`` holds this config's adapter trained to ``step``, files intact."""
    try:
        record = json.loads((output_dir / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if record.get("config_hash") != config_hash or record.get("step") != step:
        return False
    files = record.get("files", {})
    return ADAPTER_FILE in files and all(
        (output_dir / name).is_file() and sha256_file(output_dir / name) == digest
        for name, digest in files.items()
    )
