"""strict_epoch_limit (and its older, inverted name ignore_final_epochs): where a run with both
max_train_steps and num_train_epochs stops, as ``lokr-job check`` and training count it."""

from pathlib import Path

import pytest
import torch
from test_cache_support import built_tiny_model, dataset, open_job, tiny_model, write_image, write_job

from job.check import build_report
from job.config.schema import JobConfig
from job.errors import ConfigError
from job.train.schedule import build_lr_scheduler, total_steps

# Fixtures from test_cache_support, used by parameter name.
__all__ = ["built_tiny_model", "tiny_model"]


def _job(**settings: object) -> JobConfig:
    return JobConfig.model_validate({"data_backend_config": "m.json", "lycoris_config": "l.json", **settings})


def test_the_epoch_limit_stops_before_max_train_steps_only_when_strict() -> None:
    """SimpleTuner's trainer.py (``train``): with strict_epoch_limit the loop ends after num_train_epochs
    epochs even when max_train_steps is further off; without it (its default, field registry
    sections/advanced.py) max_train_steps decides; whichever limit comes first wins."""
    assert _job(max_train_steps=1).strict_epoch_limit is False
    strict = _job(max_train_steps=100, num_train_epochs=2, strict_epoch_limit=True)
    assert total_steps(strict, batches_per_epoch=10) == 20
    assert total_steps(strict.model_copy(update={"max_train_steps": 15}), batches_per_epoch=10) == 15
    loose = strict.model_copy(update={"strict_epoch_limit": False})
    assert total_steps(loose, batches_per_epoch=10) == 100
    # Epochs alone are always a limit.
    assert total_steps(_job(num_train_epochs=3), batches_per_epoch=10) == 30


def test_the_learning_rate_schedule_still_spans_max_train_steps() -> None:
    """SimpleTuner builds its schedule from max_train_steps (trainer.py, ``init_lr_scheduler``), apart from
    the epoch limit: a cosine schedule is still high where a strict epoch limit stops the run."""
    job = _job(max_train_steps=100, num_train_epochs=1, strict_epoch_limit=True, lr_scheduler="cosine")
    steps = total_steps(job, batches_per_epoch=20)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_lr_scheduler(job, optimizer, steps)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    assert steps == 20
    assert scheduler.get_last_lr()[0] == pytest.approx(
        0.5 * (1 + torch.cos(torch.tensor(0.2 * torch.pi)).item())
    )


@pytest.fixture
def four_images(tmp_path: Path, tiny_model: Path) -> Path:
    images = tmp_path / "images"
    for index in range(4):
        write_image(images / f"photo{index}.png", seed=index)
    return write_job(tmp_path, tiny_model, [dataset("photos", images)], max_train_steps=100)


@pytest.mark.parametrize(
    ("overrides", "steps"),
    [
        (["num_train_epochs=2"], 100),
        (["num_train_epochs=2", "strict_epoch_limit=true"], 8),
        # SimpleTuner's configuration/cmd_args.py reads --ignore_final_epochs=X as --strict_epoch_limit=not X.
        (["num_train_epochs=2", "ignore_final_epochs=false"], 8),
        (["num_train_epochs=2", "ignore_final_epochs=true"], 100),
    ],
)
def test_check_reports_the_steps_the_run_will_take(
    four_images: Path, tmp_path: Path, overrides: list[str], steps: int
) -> None:
    report = build_report(open_job(four_images, tmp_path / "work", overrides))
    assert report.batches_per_epoch == 4 and report.steps == steps


def test_ignore_final_epochs_and_strict_epoch_limit_must_agree(four_images: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        open_job(four_images, tmp_path / "work", ["ignore_final_epochs=true", "strict_epoch_limit=true"])
    assert "ignore_final_epochs: SimpleTuner's older name for strict_epoch_limit" in raised.value.message
    with pytest.raises(ConfigError, match="ignore_final_epochs: must be true or false"):
        open_job(four_images, tmp_path / "work", ["ignore_final_epochs=sometimes"])
    agreed = open_job(four_images, tmp_path / "work", ["ignore_final_epochs=no", "strict_epoch_limit=true"])
    assert agreed.config.job.strict_epoch_limit is True
