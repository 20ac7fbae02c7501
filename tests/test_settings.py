"""The ``LOKR_*`` environment variables: one settings object, one table in the docs, bad values named
before anything runs."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from job.errors import ConfigError, ExitCode
from job.settings import JobSettings, env_name, job_settings
from job.storage.retry import RetrySettings

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "settings.md"
# Where a LOKR_ variable can be read: the job, the image, the orchestration files, the docs users follow.
SOURCES = ("job", "docker", "sky", "k8s", "Dockerfile", "README.md", "docs")


def _documented() -> set[str]:
    return set(
        re.findall(r"^\| `(LOKR_[A-Z0-9_]+)` \|", TABLE.read_text(encoding="utf-8"), flags=re.MULTILINE)
    )


def _mentioned() -> set[str]:
    names: set[str] = set()
    for source in SOURCES:
        path = ROOT / source
        files = (
            [path]
            if path.is_file()
            else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        )
        for file in files:
            names.update(
                re.findall(
                    r"\bLOKR_[A-Z0-9]+(?:_[A-Z0-9]+)*\b", file.read_text(encoding="utf-8", errors="ignore")
                )
            )
    return names


def test_every_setting_has_a_row_in_the_table() -> None:
    fields = {env_name(name) for name in JobSettings.model_fields}
    assert fields <= _documented(), fields - _documented()


def test_every_variable_the_project_names_is_in_the_table() -> None:
    # LOKR_RETRY_ and LOKR_S3_ are prefixes in prose ("LOKR_RETRY_*_SECONDS"), not variables.
    mentioned = {name for name in _mentioned() if not name.endswith("_")} - {"LOKR_RETRY", "LOKR_S3"}
    assert mentioned <= _documented(), sorted(mentioned - _documented())


def _lokr_job(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "job", *args],
        capture_output=True,
        text=True,
        env={"PATH": "", **env},
        timeout=120,
    )


def test_bad_values_stop_the_job_at_once_naming_every_variable(tmp_path: Path) -> None:
    result = _lokr_job(
        "run",
        "--config",
        str(tmp_path / "config.json"),
        env={
            "HOME": str(tmp_path),
            "LOKR_RETRY_ATTEMPTS": "six",
            "LOKR_LOG_FORMAT": "xml",
            "LOKR_GRACE_SECONDS": "-5",
        },
    )
    assert result.returncode == ExitCode.BAD_CONFIG
    for expected in (
        "LOKR_RETRY_ATTEMPTS='six' is not a whole number",
        "LOKR_LOG_FORMAT='xml' must be 'text' or 'json'",
        "LOKR_GRACE_SECONDS='-5' must be greater than or equal to 0",
        "docs/settings.md",
    ):
        assert expected in result.stderr
    assert not (tmp_path / "lokr-work").exists()  # nothing ran: not even the work directory was made


def test_names_are_case_insensitive_and_blank_values_mean_the_default(tmp_path: Path) -> None:
    result = _lokr_job(
        "check",
        env={
            "HOME": str(tmp_path),
            "LOKR_LOG_FORMAT": " JSON ",
            "lokr_log_level": "debug",
            "LOKR_RETRY_ATTEMPTS": "",
        },
    )
    assert result.returncode == ExitCode.BAD_CONFIG  # no config given
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert lines and lines[-1]["level"] == "ERROR" and "LOKR_CONFIG" in lines[-1]["msg"]
    assert any(line["level"] == "DEBUG" for line in lines)  # lokr_log_level=debug was read


def test_settings_follow_the_environment_of_the_moment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOKR_RETRY_ATTEMPTS", "2")
    monkeypatch.setenv("LOKR_RETRY_MAX_SECONDS", "0.5")
    assert RetrySettings.from_env() == RetrySettings(attempts=2, base_seconds=1.0, max_seconds=0.5)
    monkeypatch.setenv("LOKR_RETRY_ATTEMPTS", "9")
    assert RetrySettings.from_env().attempts == 9
    monkeypatch.setenv("LOKR_RETRY_ATTEMPTS", "0")
    with pytest.raises(ConfigError, match="LOKR_RETRY_ATTEMPTS='0' must be greater than or equal to 1"):
        job_settings()


def test_an_option_on_the_command_line_wins_over_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from job.cli import apply_environment_defaults, build_parser

    monkeypatch.setenv("LOKR_WORKDIR", "/from/env")
    monkeypatch.setenv("LOKR_RECIPE_CHANGE", "new-run")
    args = build_parser().parse_args(["run", "--workdir", "/from/cli"])
    apply_environment_defaults(args, job_settings())
    assert (args.workdir, args.recipe_change) == ("/from/cli", "new-run")
