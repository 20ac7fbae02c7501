"""Trackers for real: TensorBoard event files read back, a wandb offline run folder inspected."""

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from job.config.loader import load_config
from job.track.trackers import Trackers
from job.workdir import WorkDir

HF = "hf_plantedTRACKERStoken0123456789"


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "validation.png"
    pixels = np.zeros((16, 24, 3), dtype=np.uint8)
    pixels[:, :12] = (255, 0, 0)
    Image.fromarray(pixels).save(path)
    return path


def test_tensorboard_writes_scalars_images_and_config(
    tiny_job: Path, tmp_path: Path, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("HF_TOKEN", HF)
    cfg = load_config(
        tiny_job,
        [
            "report_to=tensorboard",
            f"tracker_run_name=run-{HF}",
            "webhook_url=https://hooks.example/abc/SECRET",
        ],
    )
    workdir = WorkDir(tmp_path / "work")
    with Trackers.from_config(cfg, workdir) as trackers:
        trackers.log(1, {"loss": 0.5, "lr": 1e-3, "grad_norm": None})
        trackers.log(2, {"loss": 0.25, "eval_loss": 0.75})
        trackers.log_images(2, {"validation": image})
    events = EventAccumulator(str(workdir.output / "logs"), size_guidance={"images": 0}).Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
    assert [e.step for e in events.Scalars("eval_loss")] == [2]
    assert "grad_norm" not in events.Tags()["scalars"]
    (picture,) = events.Images("validation/validation")
    assert (picture.step, picture.width, picture.height) == (2, 24, 16)
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"max_train_steps": 24' in config_text
    assert HF not in config_text and "SECRET" not in config_text


def test_wandb_offline_run_holds_the_logged_keys(
    tiny_job: Path, tmp_path: Path, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HF_TOKEN", HF)
    (tmp_path / "wandb-dir").mkdir()
    cfg = load_config(
        tiny_job, ["report_to=wandb", "tracker_project_name=lokr-test", "tracker_run_name=tiny"]
    )
    with Trackers.from_config(cfg, WorkDir(tmp_path / "work")) as trackers:
        trackers.log(1, {"loss": 0.5, "lr": 1e-3})
        trackers.log(2, {"loss": 0.25, "eval_loss": 0.75})
        trackers.log_images(2, {"validation": image}, {"validation": "a red circle"})
        run_dir = trackers.wandb_dir
    assert run_dir is not None and run_dir.parent.parent == tmp_path / "wandb-dir"
    assert run_dir.name.startswith("offline-run-")
    (data,) = run_dir.glob("*.wandb")
    run, history = _read_wandb_log(data)
    assert (run.project, run.display_name) == ("lokr-test", "tiny")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["max_train_steps"] == 24 and "webhook_url" not in config
    assert [(row["_step"], row["loss"]) for row in history] == [(1, 0.5), (2, 0.25)]
    assert history[0]["lr"] == 1e-3 and history[1]["eval_loss"] == 0.75
    assert history[1]["validation/validation/caption"] == "a red circle"
    assert (run_dir / "files" / history[1]["validation/validation/path"]).is_file()
    assert HF.encode() not in data.read_bytes()


def _read_wandb_log(path: Path) -> tuple[Any, list[dict[str, Any]]]:
    """The run record and history rows of a ``.wandb`` file: a 7-byte header, then LevelDB-log records
    (crc32 4, length 2, type 1; FULL=1, FIRST=2, MIDDLE=3, LAST=4) in 32 KiB blocks, each a protobuf."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(raw):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[position : position + 7])
        if kind == 0:
            break
        pending += raw[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    history = [
        {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    return run, history


def test_none_writes_nothing(tiny_job: Path, tmp_path: Path, image: Path) -> None:
    cfg = load_config(tiny_job)
    workdir = WorkDir(tmp_path / "work")
    with Trackers.from_config(cfg, workdir) as trackers:
        trackers.log(1, {"loss": 0.5})
        trackers.log_images(1, {"validation": image})
    assert not workdir.output.exists()


def test_a_tensorboard_that_dies_while_logging_is_switched_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its event file on a 4 KiB file system: a flush meets ENOSPC, a warning says so, logging goes on."""
    import subprocess

    logs = tmp_path / "out" / "logs"
    logs.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(logs)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}): needs root on Linux")
    try:
        trackers = Trackers("tensorboard", tmp_path / "out", project="p")
        for step in range(2000):
            trackers.log(step, {"loss": 1.0, "lr": 0.1})
            trackers.flush()
        trackers.close()
    finally:
        subprocess.run(["umount", "-l", str(logs)], check=False)
    assert "tracking: tensorboard failed (OSError: [Errno 28] No space left on device)" in caplog.text
