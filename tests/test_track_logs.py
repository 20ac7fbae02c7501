"""Log setup: human lines, JSON lines, and planted credentials that never reach the output."""

import io
import json
import logging
import subprocess
import sys
import warnings
from collections.abc import Iterator

import pytest

from job.redact import redact
from job.track.logs import setup_logging

HF = "hf_plantedPLANTEDplanted0123456789"
AWS_KEY = "AKIAPLANTED000000001"
AWS_SECRET = "planted/aws+secret/0123456789abcdefghijkl"
AWS_SESSION = "plantedSessionToken0123456789"
WANDB = "planted0wandb0key0123456789abcdef01234567"
PLANTED = (HF, AWS_KEY, AWS_SECRET, AWS_SESSION, WANDB)


@pytest.fixture
def planted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", HF)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", AWS_SESSION)
    monkeypatch.setenv("WANDB_API_KEY", WANDB)


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """setup_logging into a buffer; the root logger and library loggers are put back afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    yield stream
    for handler in list(root.handlers):
        if handler not in saved[0]:
            root.removeHandler(handler)
    root.setLevel(saved[1])
    logging.captureWarnings(False)


def _log_everything() -> None:
    log = logging.getLogger("lokr.test")
    log.info("token in message %s", HF)
    log.info("aws %s / %s / %s", AWS_KEY, AWS_SECRET, AWS_SESSION, extra={"wandb_key": WANDB, "step": 3})
    log.warning("pasted into a config: hf_abcdefghijklmnopqrstuvwxyz0123 (not in the environment)")
    log.info("remote https://user:%s@example.com/path", AWS_SECRET)
    try:
        raise RuntimeError(f"upload refused for token {HF}")
    except RuntimeError:
        log.exception("failed")


def test_human_format_is_the_default_and_redacts(
    planted: None, captured: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LOKR_LOG_FORMAT", raising=False)
    setup_logging(captured)
    _log_everything()
    text = captured.getvalue()
    assert "INFO lokr.test: token in message ***" in text
    assert "step=3" in text
    assert "RuntimeError: upload refused for token ***" in text
    assert "https://***@example.com/path" in text
    assert "hf_abcdefghijklmnop" not in text
    for secret in PLANTED:
        assert secret not in text


def test_json_lines_carry_fields_and_are_redacted(
    planted: None, captured: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOKR_LOG_FORMAT", "json")
    setup_logging(captured)
    _log_everything()
    text = captured.getvalue()
    records = [json.loads(line) for line in text.splitlines()]
    assert len(records) == 5
    assert {"ts", "level", "logger", "msg"} <= set(records[0])
    assert records[0]["logger"] == "lokr.test" and records[0]["level"] == "INFO"
    assert records[1]["step"] == 3 and records[1]["wandb_key"] == "***"
    assert "RuntimeError" in records[4]["exc"]
    for secret in PLANTED:
        assert secret not in text


def test_setup_twice_does_not_double_lines(captured: io.StringIO) -> None:
    setup_logging(captured)
    setup_logging(captured)
    logging.getLogger("lokr.test").info("once")
    assert captured.getvalue().count("once") == 1


def test_library_loggers_and_warnings_are_routed_through_redaction(
    planted: None, captured: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOKR_LOG_FORMAT", "json")
    # What diffusers/transformers do on import: their own stderr handler, no propagation.
    library = logging.getLogger("diffusers")
    monkeypatch.setattr(library, "handlers", [logging.StreamHandler(io.StringIO())])
    monkeypatch.setattr(library, "propagate", False)
    setup_logging(captured)
    logging.getLogger("diffusers.pipelines").warning("loading with %s", HF)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(f"deprecated, token {HF}", DeprecationWarning, stacklevel=1)
    records = [json.loads(line) for line in captured.getvalue().splitlines()]
    assert [r["logger"] for r in records] == ["diffusers.pipelines", "py.warnings"]
    assert HF not in captured.getvalue()


def test_redact_helper_masks_env_values_and_token_patterns(planted: None) -> None:
    text = f"a {HF} b {AWS_SECRET} c hf_{'x' * 30} d hf_short e"
    assert redact(text) == "a *** b *** c *** d hf_short e"


def test_short_env_values_are_not_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    # A 3-character "secret" would turn every "abc" in the logs into ***.
    monkeypatch.setenv("HF_TOKEN", "abc")
    assert redact("abcdef") == "abcdef"


def test_logging_setup_does_not_import_torch() -> None:
    code = (
        "import sys, job.track.logs, job.redact; job.track.logs.setup_logging(); "
        "heavy = {'torch', 'diffusers', 'wandb', 'transformers'} & set(sys.modules); "
        "sys.exit(f'imported {heavy}' if heavy else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
