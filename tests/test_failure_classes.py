"""Every failure in its class, through the real CLI in a subprocess: a refused S3 endpoint and a Hub without
a token, a full disk, a read-only work directory, an unreadable input and a tracker that cannot work.

Each asserts the exit code, the line the user is told (the ERROR line on stderr), that no traceback is
shown, and what is left in the work directory. Full disks and read-only file systems are real: small
tmpfs mounts (the tests run as root on Linux). Root reads any file, so the unreadable input is read by a
process without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (``setpriv``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from job.errors import ExitCode

pytestmark = pytest.mark.slow
_NO_CAPS = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]


def _job(*args: str, env: dict[str, str] | None = None, prefix: list[str] | None = None):
    command = [*(prefix or []), sys.executable, "-m", "job", *args]
    environ = {**os.environ, "LOKR_RETRY_ATTEMPTS": "2", "LOKR_RETRY_BASE_SECONDS": "0", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=environ, timeout=600)


def _told(stderr: str) -> str:
    """The first ERROR line: what the user is told."""
    return next(line for line in stderr.splitlines() if " ERROR " in line)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _mount(target: Path, options: str) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}): needs root on Linux")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB file system: the tiny job's caches do not fit."""
    with _mount(tmp_path / "small", "size=64k") as mount:
        yield mount


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A read-only file system (remounted ro after a folder was made in it)."""
    with _mount(tmp_path / "ro", "size=1m") as mount:
        (mount / "work").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        yield mount


def _tiny_copy(tiny_job: Path, dest: Path, **config: object) -> Path:
    shutil.copytree(tiny_job.parent.parent, dest)
    path = dest / "config" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}, indent=2))
    return path


def test_an_s3_endpoint_refusing_connections_is_retried_then_75(tiny_job: Path, tmp_path: Path) -> None:
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    work = tmp_path / "work"
    result = _job("run", "--config", "s3://lokr-bucket/jobs/config.json", "--workdir", str(work), env=env)
    assert result.returncode == ExitCode.TRANSIENT, result.stderr[-3000:]
    assert "attempt 1/2 failed (EndpointConnectionError" in result.stderr
    assert "still failing after 2 attempts: EndpointConnectionError" in _told(result.stderr)
    assert "Traceback" not in result.stderr
    assert not (work / "data").exists() and not (work / "cache").exists()

    check = _job("check", "--config", str(tiny_job), "--run-uri", "s3://lokr-bucket/run", env=env)
    assert check.returncode == ExitCode.TRANSIENT, check.stderr[-3000:]
    assert "[exit 75] run URI (s3://lokr-bucket/run)" in check.stdout
    assert "Traceback" not in check.stderr


def test_check_without_a_hub_token_is_4_not_75(tiny_job: Path, tmp_path: Path, hub) -> None:
    env = {key: value for key, value in os.environ.items() if key != "HF_TOKEN"}
    overrides = ["--set", "push_to_hub=true", "--set", "hub_model_id=tester/lokr"]
    command = [sys.executable, "-m", "job", "check", "--config", str(tiny_job), "--json", *overrides]
    command += ["--workdir", str(tmp_path / "work")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == ExitCode.NO_PERMISSION, result.stderr[-3000:]
    report = json.loads(result.stdout)
    (access,) = [a for a in report["access"] if a["what"] == "hub_model_id"]
    assert access["exit_code"] == 4 and access["detail"].startswith("no usable Hub token (set HF_TOKEN)")
    assert "no usable Hub token (set HF_TOKEN)" in _told(result.stderr)
    assert "Traceback" not in result.stderr
    assert not hub.repos  # nothing was created


def test_a_hub_that_refuses_connections_is_75_after_retries(tiny_job: Path, tmp_path: Path, hub) -> None:
    overrides = ["--set", "push_to_hub=true", "--set", "hub_model_id=tester/lokr"]
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    result = _job("check", "--config", str(tiny_job), "--workdir", str(tmp_path / "w"), *overrides, env=env)
    assert result.returncode == ExitCode.TRANSIENT, result.stderr[-3000:]
    assert "still failing after 2 attempts: ConnectError" in _told(result.stderr)
    assert "Traceback" not in result.stderr


def test_a_full_disk_while_warming_is_75_naming_the_file_and_what_fills_it(
    tiny_job: Path, small_disk: Path
) -> None:
    work = small_disk / "work"
    result = _job("run", "--config", str(tiny_job), "--workdir", str(work))
    assert result.returncode == ExitCode.TRANSIENT, result.stderr[-3000:]
    told = _told(result.stderr)
    assert "disk full (ENOSPC) writing " + str(work / "cache") in told
    assert f"in the work directory {work}: cache/" in told and "free of 64.0 KiB" in told
    assert "Traceback" not in result.stderr
    assert not (work / "checkpoints").exists() and not (work / "output").exists()

    check = _job("check", "--config", str(tiny_job), "--workdir", str(work))
    assert check.returncode == ExitCode.TRANSIENT, check.stdout
    assert "disk (estimate)" in check.stdout and "is free on the file system of" in check.stdout


def test_a_read_only_work_directory_is_4_naming_it(tiny_job: Path, read_only: Path) -> None:
    work = read_only / "work"
    result = _job("run", "--config", str(tiny_job), "--workdir", str(work))
    assert result.returncode == ExitCode.NO_PERMISSION, result.stderr[-3000:]
    assert str(work) in _told(result.stderr) and "Read-only file system" in _told(result.stderr)
    assert "Traceback" not in result.stderr
    assert list(work.iterdir()) == []

    check = _job("check", "--config", str(tiny_job), "--workdir", str(work / "new"))
    assert check.returncode == ExitCode.NO_PERMISSION, check.stdout
    assert f"[exit 4] work directory {work / 'new'}: {work} is not writable" in check.stdout


@pytest.mark.skipif(
    shutil.which("setpriv") is None, reason="setpriv (util-linux) is needed to drop root's DAC override"
)
@pytest.mark.parametrize(
    "unreadable", ["config/config.json", "model/transformer/diffusion_pytorch_model.safetensors"]
)
def test_an_unreadable_input_is_4_naming_it(tiny_job: Path, tmp_path: Path, unreadable: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("drops root's capabilities to make a file unreadable; run as root")
    config = _tiny_copy(tiny_job, tmp_path / "job", max_train_steps=2)
    (tmp_path / "job" / unreadable).chmod(0)
    work = tmp_path / "work"
    result = _job("run", "--config", str(config), "--workdir", str(work), prefix=_NO_CAPS)
    assert result.returncode == ExitCode.NO_PERMISSION, result.stderr[-3000:]
    assert f"cannot access {tmp_path / 'job' / unreadable} (EACCES: Permission denied)" in _told(
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not (work / "checkpoints").exists() and not (work / "output").exists()


def test_a_tensorboard_that_cannot_start_is_a_warning_and_the_run_finishes(
    tiny_job: Path, tmp_path: Path
) -> None:
    config = _tiny_copy(tiny_job, tmp_path / "job", max_train_steps=2, report_to="tensorboard")
    work = tmp_path / "work"
    with _mount(work / "output" / "logs", "size=64k,ro") as logs:
        result = _job("run", "--config", str(config), "--workdir", str(work))
        assert result.returncode == ExitCode.OK, result.stderr[-3000:]
        assert (
            "tracking: tensorboard could not start (OSError: [Errno 30] Read-only file system"
            in result.stderr
        )
        assert "the run continues without it" in result.stderr
        assert "Traceback" not in result.stderr
        assert list(logs.iterdir()) == []
    assert (work / "output" / "pytorch_lora_weights.safetensors").is_file()


def test_a_wandb_outage_is_a_warning_and_the_run_finishes(tiny_job: Path, tmp_path: Path) -> None:
    """wandb offline falls back to /tmp when WANDB_DIR is not writable (it does not fail), so the real
    failure is an outage: online against an endpoint that refuses connections, with a short init timeout."""
    config = _tiny_copy(tiny_job, tmp_path / "job", max_train_steps=2, report_to="wandb")
    env = {
        "WANDB_MODE": "online",
        "WANDB_BASE_URL": f"http://127.0.0.1:{_closed_port()}",
        "WANDB_API_KEY": "x" * 40,
        "WANDB_INIT_TIMEOUT": "5",
        "WANDB_DIR": str(tmp_path / "wandb"),
    }
    (tmp_path / "wandb").mkdir()
    work = tmp_path / "work"
    result = _job("run", "--config", str(config), "--workdir", str(work), env=env)
    assert result.returncode == ExitCode.OK, result.stderr[-3000:]
    assert "tracking: wandb could not start (CommError" in result.stderr
    assert "x" * 40 not in result.stderr
    assert "Traceback" not in result.stderr
    assert (work / "output" / "pytorch_lora_weights.safetensors").is_file()
