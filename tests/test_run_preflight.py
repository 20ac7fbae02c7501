"""``run`` (and each stage alone) makes ``check``'s access checks before it spends anything: a mistake that
``check`` can see exits 2/4 before fetch, with nothing fetched, warmed or trained, and no traceback.

The CLI runs in a subprocess against the real test servers (moto behind its proxy, the Hub test server).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from job.errors import ExitCode

pytestmark = pytest.mark.slow

SPENT = ("data", "cache", "models", "checkpoints", "output", "offload")


def lokr(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "job", *args],
        capture_output=True,
        text=True,
        env=env if env is not None else dict(os.environ),
        timeout=300,
    )


def first_error(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if " ERROR " in line)


def assert_nothing_spent(workdir: Path) -> None:
    assert not [name for name in SPENT if (workdir / name).exists()]


def test_a_malformed_run_uri_is_refused_before_fetch(tiny_job: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    result = lokr("run", "--config", str(tiny_job), "--workdir", str(work), "--run-uri", "http://example/run")
    assert result.returncode == ExitCode.BAD_CONFIG, result.stderr[-3000:]
    line = first_error(result.stderr)
    assert "run URI (http://example/run)" in line and "unsupported URI scheme" in line
    assert "Traceback" not in result.stderr
    assert "nothing was fetched, warmed or trained" in result.stderr
    assert_nothing_spent(work)


def test_a_missing_bucket_is_refused_before_fetch(s3, tiny_job: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    result = lokr(
        "run", "--config", str(tiny_job), "--workdir", str(work), "--run-uri", "s3://no-such-bucket/run"
    )
    assert result.returncode == ExitCode.BAD_CONFIG, result.stderr[-3000:]
    assert "'no-such-bucket' does not exist" in first_error(result.stderr)
    assert "Traceback" not in result.stderr
    assert_nothing_spent(work)


def test_a_run_uri_these_credentials_cannot_write_is_refused_before_fetch(
    s3, tiny_job: Path, tmp_path: Path
) -> None:
    from servers.s3 import iam_auth

    work = tmp_path / "work"
    with iam_auth(s3.moto_url):
        result = lokr("train", "--config", str(tiny_job), "--workdir", str(work), "--run-uri", s3.uri("run"))
    assert result.returncode == ExitCode.NO_PERMISSION, result.stderr[-3000:]
    assert f"access denied to S3 bucket '{s3.bucket}'" in first_error(result.stderr)
    assert "Traceback" not in result.stderr
    assert_nothing_spent(work)
    assert s3.keys("run") == []


def test_push_to_hub_without_a_token_is_refused_before_fetch(hub, tiny_job: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    result = lokr(
        "run",
        "--config",
        str(tiny_job),
        "--workdir",
        str(work),
        "--set",
        "push_to_hub=true",
        "--set",
        "hub_model_id=someone/tiny-lokr",
        env=env,
    )
    assert result.returncode == ExitCode.NO_PERMISSION, result.stderr[-3000:]
    line = first_error(result.stderr)
    assert "hub_model_id (someone/tiny-lokr)" in line and "HF_TOKEN" in line
    assert "Traceback" not in result.stderr
    assert_nothing_spent(work)
    status = (work / "status.json").read_text()
    assert '"exit_code": 4' in status


def test_fetch_alone_does_not_check_the_hub_push(hub, tiny_job: Path, tmp_path: Path) -> None:
    """Pushing is publish's business: fetch without a Hub token still fetches."""
    work = tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    push = ("--set", "push_to_hub=true", "--set", "hub_model_id=someone/tiny-lokr")
    result = lokr("fetch", "--config", str(tiny_job), "--workdir", str(work), *push, env=env)
    assert result.returncode == ExitCode.OK, result.stderr[-3000:]
    assert "access checks passed" in result.stderr
