"""``TrainingObserver`` on its own: when it validates and evaluates, what it tells the webhook, and that
nothing it does can stop training."""

from pathlib import Path
from typing import Any

import pytest

from job.context import open_context
from job.train.loop import StepResult
from job.train.observers import TrainingObserver, run_id


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.closed = False

    def log(self, step: int, metrics: dict[str, float | None]) -> None:
        self.calls.append(("log", step))

    def log_images(self, step: int, images: dict[str, Path]) -> None:
        self.calls.append(("images", step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def post(self, event: str, payload: dict[str, Any] | None = None) -> bool:
        self.calls.append((event, (payload or {}).get("step")))
        return True


def _observer(tiny_job: Path, tmp_path: Path, *overrides: str) -> tuple[TrainingObserver, _Recorder]:
    ctx = open_context(str(tiny_job), tmp_path, None, list(overrides))
    recorder = _Recorder()
    observer = TrainingObserver(
        ctx.config,
        ctx.workdir,
        transformer=None,  # type: ignore[arg-type]
        data=None,  # type: ignore[arg-type]
        device="cpu",  # type: ignore[arg-type]
        dtype=None,  # type: ignore[arg-type]
        trackers=recorder,  # type: ignore[arg-type]
        webhook=recorder,  # type: ignore[arg-type]
    )
    return observer, recorder


def test_intervals_decide_when_to_validate_and_evaluate(
    tiny_job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    observer, recorder = _observer(tiny_job, tmp_path, "validation_step_interval=3", "eval_steps_interval=2")
    done: list[tuple[str, int]] = []
    monkeypatch.setattr(observer, "validate", lambda step: done.append(("validate", step)))
    monkeypatch.setattr(observer, "evaluate", lambda step: done.append(("evaluate", step)))
    for step in range(1, 7):
        observer.on_step(step, StepResult(loss=0.5, lr=1e-3, grad_norm=1.0), 0.1)
    assert done == [("evaluate", 2), ("validate", 3), ("evaluate", 4), ("evaluate", 6), ("validate", 6)]
    assert [call for call in recorder.calls if call[0] == "log"] == [("log", s) for s in range(1, 7)]


def test_a_failing_validation_is_a_warning_and_training_goes_on(
    tiny_job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    observer, recorder = _observer(tiny_job, tmp_path, "validation_step_interval=1")

    def broken(step: int) -> None:
        raise RuntimeError("out of memory in the VAE")

    monkeypatch.setattr(observer, "validate", broken)
    observer.on_step(1, StepResult(loss=0.5, lr=1e-3), 0.1)
    observer.on_end(1, finished=True)
    assert "validation failed; training goes on" in caplog.text
    assert recorder.calls[-1] == ("finish", 1) and recorder.closed


def test_stops_and_crashes_are_told_to_the_webhook(tiny_job: Path, tmp_path: Path) -> None:
    observer, recorder = _observer(tiny_job, tmp_path)
    observer.on_end(3, finished=False)
    assert recorder.calls == [("failure", 3)] and recorder.closed
    observer, recorder = _observer(tiny_job, tmp_path)
    observer.on_failure(5, ValueError("boom"))
    assert recorder.calls == [("failure", 5)] and recorder.closed


def test_the_wandb_run_id_is_stable_per_recipe_and_place(tiny_job: Path, tmp_path: Path) -> None:
    recipe = open_context(str(tiny_job), tmp_path / "a", None, []).config
    again = open_context(str(tiny_job), tmp_path / "a", None, []).config
    other = open_context(str(tiny_job), tmp_path / "a", None, ["seed=7"]).config
    assert run_id(recipe, "s3://b/run") == run_id(again, "s3://b/run")
    assert run_id(recipe, "s3://b/run") != run_id(recipe, "s3://b/other")
    assert run_id(recipe, "s3://b/run") != run_id(other, "s3://b/run")
