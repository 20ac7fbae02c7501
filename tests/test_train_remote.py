"""Checkpoints at the run URI (a local folder stands in for the bucket: same ``Storage`` interface):
background upload with the marker last, remote rotation, and resuming from the newest *complete* remote one."""

import json
import time
from pathlib import Path

from job.train.checkpoint import MARKER, checkpoint_name, set_aside, write_checkpoint, write_marker
from job.train.remote import (
    CheckpointUploader,
    download_newer_checkpoint,
    remote_checkpoints,
    rotate_remote,
    set_aside_remote,
)


def make_checkpoint(root: Path, step: int) -> Path:
    def contents(folder: Path) -> None:
        (folder / "lokr.safetensors").write_bytes(f"weights {step}".encode() * 100)
        (folder / "trainer_state.json").write_text(json.dumps({"step": step}))

    return write_checkpoint(root, step, contents)


def test_uploads_in_the_background_and_rotates_remotely(tmp_path):
    local, run_uri = tmp_path / "local", str(tmp_path / "run")
    uploader = CheckpointUploader(run_uri, total_limit=2)
    for step in (8, 16, 24):
        uploader.submit(make_checkpoint(local, step), step)
        assert uploader.close(timeout=30)
        uploader = CheckpointUploader(run_uri, total_limit=2)
    assert remote_checkpoints(run_uri) == {16: True, 24: True}
    remote = Path(run_uri) / "checkpoints" / checkpoint_name(24)
    assert (remote / MARKER).read_bytes() == (local / checkpoint_name(24) / MARKER).read_bytes()
    assert not list(local.glob(".upload-*")), "staging folders are removed after upload"


def test_hub_commits_are_paced_and_a_newer_checkpoint_replaces_a_waiting_one(tmp_path):
    local, run_uri = tmp_path / "local", str(tmp_path / "run")
    uploader = CheckpointUploader(run_uri, total_limit=None)
    # As on the Hub, having just committed: the next commit waits (HUB_MIN_COMMIT_INTERVAL_S)...
    uploader.is_hub, uploader._last_commit = True, time.monotonic()
    uploader.submit(make_checkpoint(local, 8), 8)
    uploader.submit(make_checkpoint(local, 16), 16)  # ...so 8 is replaced before it is ever sent,
    time.sleep(0.2)
    assert remote_checkpoints(run_uri) == {}
    assert uploader.close(timeout=30)  # ...and closing (the run ends or is preempted) sends 16 at once.
    assert remote_checkpoints(run_uri) == {16: True}
    assert not list(local.glob(".upload-*"))


def test_resume_takes_the_newest_complete_remote_checkpoint(tmp_path):
    run_uri = str(tmp_path / "run")
    remote_root = tmp_path / "run" / "checkpoints"
    make_checkpoint(remote_root, 8)
    make_checkpoint(remote_root, 16)
    # 24 was cut short mid-upload: no marker. It must never be used.
    partial = make_checkpoint(remote_root, 24)
    (partial / MARKER).unlink()
    fresh = tmp_path / "fresh"
    got = download_newer_checkpoint(run_uri, fresh)
    assert got == fresh / checkpoint_name(16)
    assert (got / MARKER).exists()
    assert not (fresh / checkpoint_name(24)).exists()
    # Local is now as new as the remote: nothing more to download.
    assert download_newer_checkpoint(run_uri, fresh) is None


def test_a_remote_checkpoint_that_fails_its_marker_is_skipped(tmp_path):
    run_uri = str(tmp_path / "run")
    remote_root = tmp_path / "run" / "checkpoints"
    make_checkpoint(remote_root, 8)
    damaged = make_checkpoint(remote_root, 16) / "lokr.safetensors"
    damaged.write_bytes(b"x" * damaged.stat().st_size)  # same size, wrong sha256
    got = download_newer_checkpoint(run_uri, tmp_path / "fresh")
    assert got is not None and got.name == checkpoint_name(8)


def test_remote_rotation_keeps_the_newest_and_anything_still_uploading(tmp_path):
    run_uri = str(tmp_path / "run")
    remote_root = tmp_path / "run" / "checkpoints"
    for step in (8, 16, 24, 32):
        make_checkpoint(remote_root, step)
    (remote_root / checkpoint_name(8) / MARKER).unlink()  # an old leftover without marker
    uploading = make_checkpoint(remote_root, 40)
    (uploading / MARKER).unlink()
    rotate_remote(run_uri, 2)
    assert remote_checkpoints(run_uri) == {24: True, 32: True, 40: False}


def test_room_is_made_before_the_marker_lands(tmp_path):
    run_uri = str(tmp_path / "run")
    remote_root = tmp_path / "run" / "checkpoints"
    for step in (8, 16):
        make_checkpoint(remote_root, step)
    incoming = make_checkpoint(remote_root, 24)
    (incoming / MARKER).unlink()
    rotate_remote(run_uri, 2, incoming=True)
    assert remote_checkpoints(run_uri) == {16: True, 24: False}
    rotate_remote(run_uri, 1, incoming=True)  # the newest complete one stays until 24 is whole
    assert remote_checkpoints(run_uri) == {16: True, 24: False}


def test_on_the_hub_a_checkpoint_is_one_commit_and_resumes(hub, tmp_path):
    hub.create_repo("me/run")
    run_uri = "hf://me/run"
    local = tmp_path / "local"
    before = hub.commits
    uploader = CheckpointUploader(run_uri, total_limit=2)
    uploader.submit(make_checkpoint(local, 8), 8)
    assert uploader.close(timeout=60)
    assert hub.commits == before + 1
    files = hub.files("me/run")
    assert f"checkpoints/{checkpoint_name(8)}/{MARKER}" in files
    got = download_newer_checkpoint(run_uri, tmp_path / "fresh")
    assert got is not None and got.name == checkpoint_name(8)


def test_a_checkpoint_that_failed_to_load_is_set_aside_at_the_run_uri_too(tmp_path):
    run_uri = str(tmp_path / "run")
    remote_root = tmp_path / "run" / "checkpoints"
    make_checkpoint(remote_root, 8)
    make_checkpoint(remote_root, 16)
    fresh = tmp_path / "fresh"
    got = download_newer_checkpoint(run_uri, fresh)
    assert got is not None and got.name == checkpoint_name(16)
    aside = set_aside(got, "it failed to load")
    assert aside is not None
    set_aside_remote(run_uri, aside, 16)
    assert remote_checkpoints(run_uri) == {8: True}
    assert (remote_root / aside.name / MARKER).read_bytes() == (aside / MARKER).read_bytes()
    # The next download brings the one before, and a new machine never sees 16 again.
    assert download_newer_checkpoint(run_uri, fresh) == fresh / checkpoint_name(8)
    assert download_newer_checkpoint(run_uri, tmp_path / "next") == tmp_path / "next" / checkpoint_name(8)


def test_a_different_remote_copy_is_left_for_its_own_try(tmp_path):
    run_uri = str(tmp_path / "run")
    make_checkpoint(tmp_path / "run" / "checkpoints", 16)
    local = make_checkpoint(tmp_path / "local", 16)
    (local / "trainer_state.json").write_text('{"step": "sixteen"}')
    write_marker(local, 16)  # a local copy whose bytes differ from the run URI's
    aside = set_aside(local, "bad position")
    assert aside is not None
    set_aside_remote(run_uri, aside, 16)
    assert remote_checkpoints(run_uri) == {16: True}
