"""Checkpoint folders: atomic write, the COMPLETE marker, fallback past broken ones, rotation, resume names."""

import json
import logging
from pathlib import Path

import pytest

from job.errors import ConfigError
from job.train.checkpoint import (
    MARKER,
    checkpoint_name,
    latest_complete,
    list_checkpoints,
    resolve_resume,
    rotate,
    set_aside,
    verify,
    write_checkpoint,
)


def _contents(step: int):
    def write(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(bytes([step % 256]) * 1000)
        (folder / "sub").mkdir()
        (folder / "sub" / "state.json").write_text(json.dumps({"step": step}))

    return write


def _save(root: Path, *steps: int) -> None:
    for step in steps:
        write_checkpoint(root, step, _contents(step))


def test_write_checkpoint_names_the_folder_and_writes_the_marker_last(tmp_path):
    path = write_checkpoint(tmp_path, 16, _contents(16))
    assert path == tmp_path / "checkpoint-00000016"
    marker = json.loads((path / MARKER).read_text())
    assert marker["step"] == 16
    assert set(marker["files"]) == {"weights.bin", "sub/state.json"}
    assert marker["files"]["weights.bin"]["size"] == 1000
    assert len(marker["files"]["weights.bin"]["sha256"]) == 64
    assert verify(path) is None
    # No temporary folder is left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-00000016"]


def test_a_failed_write_leaves_nothing(tmp_path):
    def explode(folder: Path) -> None:
        (folder / "half").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_checkpoint(tmp_path, 8, explode)
    assert list(tmp_path.iterdir()) == []


def test_verify_catches_truncation_missing_files_and_missing_marker(tmp_path):
    _save(tmp_path, 8, 16, 24)
    truncated = tmp_path / checkpoint_name(8)
    with open(truncated / "weights.bin", "r+b") as handle:
        handle.truncate(10)
    assert "bytes" in verify(truncated)
    (tmp_path / checkpoint_name(16) / "sub" / "state.json").unlink()
    assert "missing" in verify(tmp_path / checkpoint_name(16))
    (tmp_path / checkpoint_name(24) / MARKER).unlink()
    assert "marker" in verify(tmp_path / checkpoint_name(24))


def test_verify_catches_same_size_corruption(tmp_path):
    _save(tmp_path, 8)
    path = tmp_path / checkpoint_name(8)
    (path / "weights.bin").write_bytes(b"\xff" * 1000)
    assert "sha256" in verify(path)
    assert verify(path, hashes=False) is None


def test_latest_falls_back_past_broken_checkpoints(tmp_path, caplog):
    _save(tmp_path, 8, 16, 24)
    (tmp_path / checkpoint_name(24) / MARKER).unlink()
    with open(tmp_path / checkpoint_name(16) / "weights.bin", "r+b") as handle:
        handle.truncate(999)
    with caplog.at_level(logging.WARNING, logger="lokr"):
        assert latest_complete(tmp_path) == tmp_path / checkpoint_name(8)
    assert "checkpoint-00000024" in caplog.text and "checkpoint-00000016" in caplog.text
    assert latest_complete(tmp_path / "nothing-here") is None


def test_rotation_keeps_the_newest_complete_ones(tmp_path):
    _save(tmp_path, 8, 16, 24, 32)
    rotate(tmp_path, 2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [24, 32]
    rotate(tmp_path, None)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [24, 32]


def test_rotation_never_deletes_the_newest_complete_or_anything_newer(tmp_path):
    _save(tmp_path, 8, 16, 24)
    # 24 is being written (no marker yet): the newest complete one is 16.
    (tmp_path / checkpoint_name(24) / MARKER).unlink()
    rotate(tmp_path, 1)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [16, 24]


def test_rotation_drops_broken_older_checkpoints_and_temp_folders(tmp_path):
    _save(tmp_path, 8, 16, 24)
    (tmp_path / checkpoint_name(8) / MARKER).unlink()
    (tmp_path / ".checkpoint-00000032.abc").mkdir()
    rotate(tmp_path, 5)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [16, 24]
    assert not (tmp_path / ".checkpoint-00000032.abc").exists()


def test_resume_settings(tmp_path):
    _save(tmp_path, 8, 16)
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path, "latest") == tmp_path / checkpoint_name(16)
    assert resolve_resume(tmp_path, "8") == tmp_path / checkpoint_name(8)
    assert resolve_resume(tmp_path, "checkpoint-8") == tmp_path / checkpoint_name(8)
    assert resolve_resume(tmp_path, str(tmp_path / checkpoint_name(16))) == tmp_path / checkpoint_name(16)
    assert resolve_resume(tmp_path / "empty", "latest") is None
    with pytest.raises(ConfigError, match=r"resume_from_checkpoint.*does not exist"):
        resolve_resume(tmp_path, "24")
    (tmp_path / checkpoint_name(16) / MARKER).unlink()
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, "16")


def test_a_new_write_replaces_a_broken_folder_of_the_same_step(tmp_path):
    _save(tmp_path, 8)
    (tmp_path / checkpoint_name(8) / MARKER).unlink()
    (tmp_path / checkpoint_name(8) / "stale").write_text("old")
    _save(tmp_path, 8)
    assert verify(tmp_path / checkpoint_name(8)) is None
    assert not (tmp_path / checkpoint_name(8) / "stale").exists()


def test_an_unloadable_checkpoint_is_set_aside_and_never_picked_again(tmp_path, caplog):
    _save(tmp_path, 8, 16)
    with caplog.at_level(logging.WARNING, logger="lokr"):
        aside = set_aside(tmp_path / checkpoint_name(16), "HeaderTooSmall")
    assert aside is not None and aside.name.startswith("checkpoint-00000016.unloadable-")
    assert verify(aside) is None, "kept whole, for inspection"
    assert "HeaderTooSmall" in caplog.text
    assert latest_complete(tmp_path) == tmp_path / checkpoint_name(8)
    rotate(tmp_path, 1)
    assert aside.is_dir(), "rotation leaves it alone"
    assert set_aside(tmp_path / checkpoint_name(16), "again") is None  # already moved (by another process)
