"""No silent reuse of a stale run: the run URI records its recipe; another recipe there is refused (exit 2,
naming the keys) unless ``--recipe-change`` says new-run or continue; a finished run with the same recipe is
published again without training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from job.config.loader import load_config
from job.errors import ConfigError, ExitCode
from job.recipe import RECIPE_FILE, claim_run, differences, read_record
from job.workdir import WorkDir

ADAPTER = "pytorch_lora_weights.safetensors"


def test_settings_that_do_not_change_the_weights_keep_the_recipe(tiny_job: Path) -> None:
    base = load_config(tiny_job)
    neutral = ["validation_seed=7", "checkpoint_step_interval=4", "report_to=tensorboard", "webhook_url=null"]
    assert load_config(tiny_job, neutral).hash == base.hash
    assert load_config(tiny_job, ["learning_rate=1e-4"]).hash != base.hash


def test_a_config_that_uses_no_new_feature_keeps_the_recipe_it_had(tiny_job: Path) -> None:
    """A run URI recorded by the last landed lokr-job (5075f65) must not be refused after an upgrade that
    only added options: the recipe's keys stay those pinned in fixtures/recipe_keys.json while the new
    features are off. Change that file only with a release note: every existing run would be refused."""
    pinned = json.loads((Path(__file__).parent / "fixtures" / "recipe_keys.json").read_text())
    recipe = load_config(tiny_job).recipe
    assert sorted(recipe["job"]) == pinned["job"]
    assert sorted(recipe["datasets"][0]) == pinned["dataset"]
    rolling = load_config(tiny_job, ["scheduled_sampling_max_step_offset=4"]).recipe["job"]
    assert (
        rolling["scheduled_sampling_reflexflow_beta1"] == 10.0 and "scheduled_sampling_sampler" not in rolling
    )


def test_differences_name_the_keys_as_users_write_them(tiny_job: Path) -> None:
    old = load_config(tiny_job).recipe
    new = load_config(tiny_job, ["learning_rate=1e-4", "seed=3"]).recipe
    assert differences(old, new) == ["learning_rate: 0.001 → 0.0001", "seed: 42 → 3"]
    new["datasets"][0]["repeats"] = 5
    new["lycoris"]["factor"] = 8
    changed = differences(old, new)
    assert "datasets[tiny-subject].repeats: 2 → 5" in changed
    assert any(line.startswith("lycoris.factor: ") for line in changed)


@pytest.mark.parametrize("store", ["local", "s3"])
def test_another_recipe_is_refused_then_moved_aside_or_continued(
    store: str, request: pytest.FixtureRequest, tiny_job: Path, tmp_path: Path
) -> None:
    if store == "s3":
        s3 = request.getfixturevalue("s3")
        run_uri = s3.uri("runs/one")
        s3.put("runs/one/checkpoints/checkpoint-00000008/COMPLETE", b"{}")
    else:
        run_uri = str(tmp_path / "run")
        (tmp_path / "run" / "checkpoints" / "checkpoint-00000008").mkdir(parents=True)
        (tmp_path / "run" / "checkpoints" / "checkpoint-00000008" / "COMPLETE").write_text("{}")
    workdir = WorkDir(tmp_path / "work")
    first = load_config(tiny_job)
    claim_run(first, run_uri, workdir, "refuse")
    assert read_record(run_uri)["config_hash"] == first.hash
    claim_run(first, run_uri, workdir, "refuse")  # the same recipe again: nothing to say

    edited = load_config(tiny_job, ["learning_rate=1e-4"])
    with pytest.raises(ConfigError) as refused:
        claim_run(edited, run_uri, workdir, "refuse")
    assert "learning_rate: 0.001 → 0.0001" in refused.value.message
    assert "--recipe-change new-run" in refused.value.message
    assert read_record(run_uri)["config_hash"] == first.hash

    claim_run(edited, run_uri, workdir, "continue")
    record = read_record(run_uri)
    assert record["config_hash"] == edited.hash and record["previous_hashes"] == [first.hash]

    again = load_config(tiny_job, ["learning_rate=2e-4"])
    claim_run(again, run_uri, workdir, "new-run")
    assert read_record(run_uri)["config_hash"] == again.hash
    if store == "s3":
        keys = s3.keys("runs/one")
        assert "runs/one/checkpoints/checkpoint-00000008/COMPLETE" not in keys
        moved = [k for k in keys if k.startswith(f"runs/one/previous/{edited.hash}-")]
        assert any(k.endswith("/checkpoints/checkpoint-00000008/COMPLETE") for k in moved)
        assert any(k.endswith(f"/{RECIPE_FILE}") for k in moved)
    else:
        assert not (tmp_path / "run" / "checkpoints").exists()
        (moved,) = (tmp_path / "run" / "previous").iterdir()
        assert moved.name.startswith(f"{edited.hash}-")
        assert (moved / "checkpoints" / "checkpoint-00000008" / "COMPLETE").is_file()


def test_a_run_trained_for_longer_continues(tiny_job: Path, tmp_path: Path) -> None:
    """SimpleTuner's habit: raise max_train_steps and run again to train on from the last checkpoint."""
    run_uri, workdir = str(tmp_path / "run"), WorkDir(tmp_path / "work")
    short = load_config(tiny_job, ["max_train_steps=16"])
    claim_run(short, run_uri, workdir, "refuse")
    longer = load_config(tiny_job, ["max_train_steps=48"])
    claim_run(longer, run_uri, workdir, "refuse")
    record = read_record(run_uri)
    assert record["config_hash"] == longer.hash and record["previous_hashes"] == [short.hash]
    assert read_record(str(workdir.root))["config_hash"] == longer.hash
    assert not (workdir.root / "previous").exists()
    with pytest.raises(ConfigError, match="learning_rate"):
        claim_run(
            load_config(tiny_job, ["max_train_steps=64", "learning_rate=1e-4"]), run_uri, workdir, "refuse"
        )


def test_without_a_run_uri_the_work_directory_holds_the_recipe(tiny_job: Path, tmp_path: Path) -> None:
    workdir = WorkDir(tmp_path / "work")
    claim_run(load_config(tiny_job), None, workdir, "refuse")
    with pytest.raises(ConfigError, match=r"work directory .* holds a run of another recipe"):
        claim_run(load_config(tiny_job, ["seed=1"]), None, workdir, "refuse")


def test_a_recipe_record_that_is_not_one_is_a_config_error(tiny_job: Path, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / RECIPE_FILE).write_text("not json")
    with pytest.raises(ConfigError, match="is not a lokr-job recipe record"):
        claim_run(load_config(tiny_job), str(tmp_path / "run"), WorkDir(tmp_path / "work"), "refuse")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "job", "run", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ), timeout=600)


@pytest.mark.slow
def test_a_finished_run_uri_reused(s3, tiny_job: Path, tmp_path: Path) -> None:
    """Same recipe on a fresh machine: published again, no training. Edited: exit 2, the run URI untouched.
    ``--recipe-change new-run``: trains the new recipe, the old run kept under previous/."""
    run_uri = s3.uri("runs/tiny")
    config = ["--config", str(tiny_job), "--run-uri", run_uri]
    first = _run(*config, "--workdir", str(tmp_path / "first"))
    assert first.returncode == ExitCode.OK, first.stderr[-3000:]
    adapter = s3.get(f"runs/tiny/output/{ADAPTER}")
    keys = s3.keys("runs/tiny")

    again = _run(*config, "--workdir", str(tmp_path / "again"))
    assert again.returncode == ExitCode.OK, again.stderr[-3000:]
    assert "publishing it, no training" in again.stderr
    assert "train:" not in again.stderr
    assert (tmp_path / "again" / "output" / ADAPTER).read_bytes() == adapter
    assert not (tmp_path / "again" / "checkpoints").exists()

    edited = _run(*config, "--workdir", str(tmp_path / "edited"), "--set", "learning_rate=1e-4")
    assert edited.returncode == ExitCode.BAD_CONFIG, edited.stderr[-3000:]
    line = next(line for line in edited.stderr.splitlines() if " ERROR " in line)
    assert "holds a run of another recipe" in line and "learning_rate: 0.001 → 0.0001" in line
    assert "Traceback" not in edited.stderr
    assert not (tmp_path / "edited" / "data").exists()
    assert s3.get(f"runs/tiny/output/{ADAPTER}") == adapter
    assert {k for k in s3.keys("runs/tiny") if "/checkpoints/" in k} == {
        k for k in keys if "/checkpoints/" in k
    }

    new_run = _run(
        *config,
        "--workdir",
        str(tmp_path / "edited"),
        "--set",
        "learning_rate=1e-4",
        "--recipe-change",
        "new-run",
    )
    assert new_run.returncode == ExitCode.OK, new_run.stderr[-3000:]
    assert s3.get(f"runs/tiny/output/{ADAPTER}") != adapter
    kept = [k for k in s3.keys("runs/tiny/previous") if k.endswith(f"/output/{ADAPTER}")]
    assert len(kept) == 1 and s3.get(kept[0]) == adapter
    record = json.loads(s3.get(f"runs/tiny/{RECIPE_FILE}"))
    assert record["recipe"]["job"]["learning_rate"] == 1e-4
