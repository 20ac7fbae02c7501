"""Progress: log lines when not on a terminal, a tqdm bar when on one."""

import logging

import pytest

from job.progress import Progress, progress_iter


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lokr.progress"]


def test_log_mode_reports_counts_rate_eta_and_postfix(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lokr.progress")
    with Progress("train", total=4, unit="step", interval_s=0, mode="log") as progress:
        for loss in (0.5, 0.4, 0.3, 0.2):
            progress.set_postfix(loss=loss)
            progress.update()
    lines = _lines(caplog)
    assert len(lines) == 5
    assert lines[0].startswith("train: 1/4 step (25%), ") and "step/s" in lines[0] and "eta " in lines[0]
    assert lines[3].endswith("loss=0.2")
    assert lines[4].startswith("train: finished, 4/4 step (100%) in ")


def test_log_mode_is_quiet_between_intervals(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lokr.progress")
    with Progress("warm", total=100, interval_s=3600, mode="log") as progress:
        for _ in range(100):
            progress.update()
    assert _lines(caplog) == ["warm: finished, 100/100 it (100%) in 0s"]


def test_resumed_progress_starts_at_initial(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lokr.progress")
    with Progress("train", total=10, initial=8, interval_s=0, mode="log") as progress:
        progress.update(2)
    assert _lines(caplog)[0].startswith("train: 10/10 it (100%)")


def test_progress_iter_yields_everything_and_uses_len(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lokr.progress")
    items = list(progress_iter(["a", "b", "c"], "fetch", unit="file", mode="log", interval_s=0))
    assert items == ["a", "b", "c"]
    assert _lines(caplog)[-1].startswith("fetch: finished, 3/3 file")


def test_bar_mode_draws_tqdm_and_logs_nothing(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO, logger="lokr.progress")
    with Progress("warm", total=3, unit="img", mode="bar") as progress:
        progress.update(3)
    assert _lines(caplog) == []
    assert "3/3" in capsys.readouterr().err


def test_auto_mode_follows_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert Progress("x", interval_s=0).mode == "log"
