"""Every option name SimpleTuner knows has a disposition, and SimpleTuner's own configs pass ``check``.

``fixtures/simpletuner_names.json`` is what ``scripts/simpletuner_options.py`` extracts from a SimpleTuner
checkout (CI cannot fetch one); ``job/config/simpletuner_options.json`` must cover it name for name.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SEED_CONFIG

from job.config.backends import DatasetConfig, TextEmbedsConfig
from job.config.loader import load_config
from job.config.schema import JobConfig
from job.config.simpletuner import options
from job.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import config_docs

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = json.loads((FIXTURES / "simpletuner_names.json").read_text())
EXAMPLES = sorted(
    p for p in (FIXTURES / "simpletuner_examples").glob("*.json") if p.name != "multidatabackend.json"
)
# Acted on without being a schema field: checked while loading, then dropped.
CHECKED_IN_LOADER = {"num_processes"}


@pytest.mark.parametrize("table", ["config", "dataset"])
def test_every_simpletuner_name_has_one_disposition(table: str) -> None:
    known = getattr(options(), table)
    listed = set(NAMES[table])
    assert sorted(listed - set(known)) == [], "SimpleTuner names with no disposition"
    extra = {name for name in set(known) - listed if not known[name].older}
    assert sorted(extra) == [], "names not in SimpleTuner: mark them older or remove them"
    assert len(known) == len(listed) + sum(o.older for o in known.values())
    assert options().commit == NAMES["commit"]


def test_each_disposition_is_complete() -> None:
    fields = {
        "config": set(JobConfig.model_fields) | CHECKED_IN_LOADER,
        "dataset": set(DatasetConfig.model_fields) | set(TextEmbedsConfig.model_fields),
    }
    for table, known in (("config", options().config), ("dataset", options().dataset)):
        for option in known.values():
            where = f"{table}.{option.name}"
            if option.disposition == "acted_on":
                assert option.name in fields[table], f"{where}: acted on but not implemented"
            elif option.disposition == "alias":
                assert option.of in fields[table] | set(known), f"{where}: alias of nothing"
                assert option.of not in known or known[option.of].disposition != "alias", where
            else:
                assert option.reason, f"{where}: needs a reason"
                assert option.disposition != "refused" or option.instead, f"{where}: needs what to do instead"
    # Every schema key SimpleTuner also has is acted on, never ignored.
    shared = set(JobConfig.model_fields) & set(NAMES["config"])
    assert {n for n in shared if options().config[n].disposition != "acted_on"} == set()


def test_the_generated_docs_match_the_data_file() -> None:
    stale = [str(path) for path, text in config_docs.generated().items() if path.read_text() != text]
    assert stale == [], "run: python scripts/config_docs.py"


def _example_on_tiny(example: Path, tiny_job: Path, dest: Path) -> Path:
    """A SimpleTuner example config pointed at the tiny model, data and LyCORIS config."""
    tiny_root = tiny_job.parent.parent
    config_dir = dest / "config"
    config_dir.mkdir(parents=True)
    shutil.copy(tiny_job.parent / "lycoris_config.json", config_dir / "lycoris_config.json")
    text = example.read_text().replace("@TINY_MODEL@", str(tiny_root / "model"))
    (config_dir / "config.json").write_text(text)
    backends = (FIXTURES / "simpletuner_examples" / "multidatabackend.json").read_text()
    data = tiny_root / "datasets" / "tiny-subject"
    (config_dir / "multidatabackend.json").write_text(backends.replace("@TINY_DATA@", str(data)))
    return config_dir / "config.json"


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_simpletuner_example_configs_pass_check_with_no_unknown_option(
    example: Path, tiny_job: Path, tmp_path: Path
) -> None:
    config = _example_on_tiny(example, tiny_job, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    command = [sys.executable, "-m", "job", "check", "--config", str(config)]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "unknown" not in output.lower()
    assert "ignored by lokr-job" in output


def _seed(tmp_path: Path, drop: tuple[str, ...] = ()) -> Path:
    """The seed's config set with its dataset pointed at an existing folder, less the keys in ``drop``."""
    shutil.copytree(SEED_CONFIG, tmp_path / "config")
    config_path = tmp_path / "config" / "config.json"
    config = json.loads(config_path.read_text())
    config["data_backend_config"] = "config/multidatabackend.json"
    for key in drop:
        config.pop(key)
    config_path.write_text(json.dumps(config))
    backends_path = tmp_path / "config" / "multidatabackend.json"
    backends = json.loads(backends_path.read_text())
    for backend in backends:
        if "instance_data_dir" in backend:
            (tmp_path / "data").mkdir(exist_ok=True)
            backend["instance_data_dir"] = str(tmp_path / "data")
    backends_path.write_text(json.dumps(backends))
    return config_path


def test_older_names_are_read_as_the_current_key(tmp_path: Path) -> None:
    path = _seed(
        tmp_path, drop=("validation_step_interval", "checkpoint_step_interval", "checkpoints_total_limit")
    )
    older = [
        "validation_steps=100",
        "checkpointing_steps=250",
        "save_total_limit=3",
        "model_card_private=false",
    ]
    job = load_config(path, older).job
    assert (job.validation_step_interval, job.checkpoint_step_interval) == (100, 250)
    assert job.checkpoints_total_limit == 3
    assert job.hub_private is False


def test_an_alias_and_its_key_set_apart_is_an_error(tmp_path: Path) -> None:
    path = _seed(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_config(path, ["validation_steps=100"])
    assert "validation_steps: SimpleTuner's older name for validation_step_interval" in str(caught.value)


def test_validation_steps_zero_means_never_as_in_simpletuner(tmp_path: Path) -> None:
    """SimpleTuner validates on steps only when the interval is above 0 (simpletuner/helpers/training/
    validation.py, ``should_perform_intermediary_validation``); its examples write 0 for "never"."""
    path = _seed(tmp_path, drop=("validation_step_interval",))
    assert load_config(path, ["validation_steps=0"]).job.validation_step_interval is None


def test_a_refused_option_exits_2_naming_the_key_the_reason_and_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_seed(tmp_path), ["controlnet=true", "train_text_encoder=false"])
    assert caught.value.exit_code == 2
    message = str(caught.value)
    assert "controlnet: SimpleTuner option refused by lokr-job: " in message
    assert "ControlNet/control training is not implemented; remove it" in message
    # Off is no request: a warning, not an error.
    assert "train_text_encoder" not in message


def test_a_refused_option_left_off_only_warns(tmp_path: Path) -> None:
    config = load_config(_seed(tmp_path), ["controlnet=false", "tread_config=", "flow_sigmoid_scale=1.0"])
    warned = {w.split(": ")[1] for w in config.warnings}
    assert {"controlnet", "tread_config", "flow_sigmoid_scale"} <= warned


def test_an_ignored_option_warns_with_its_reason(tmp_path: Path) -> None:
    config = load_config(_seed(tmp_path), ["validation_num_video_frames=81"])
    assert any(
        "validation_num_video_frames: known SimpleTuner option, ignored by lokr-job (applies to video models"
        in w
        for w in config.warnings
    )


def test_a_misspelt_option_is_unknown_with_the_nearest_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_seed(tmp_path), ["validation_stpes=5", "aws_secret_acess_key=hunter2"])
    message = str(caught.value)
    assert "validation_stpes: unknown option" in message
    assert "did you mean 'validation_steps'?" in message
    assert "hunter2" not in message


def test_num_processes_must_match_the_launched_world_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _seed(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    load_config(path, ["num_processes=8"])  # no launcher (check): nothing to compare against
    monkeypatch.setenv("WORLD_SIZE", "8")
    load_config(path, ["num_processes=8"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as caught:
        load_config(path, ["num_processes=8"])
    assert "num_processes: the config asks for 8 processes but the job was launched with WORLD_SIZE=2" in str(
        caught.value
    )


def test_dataset_aliases_and_refusals(tmp_path: Path) -> None:
    path = _seed(tmp_path)
    backends_path = tmp_path / "config" / "multidatabackend.json"
    backends = json.loads(backends_path.read_text())
    image = next(b for b in backends if "instance_data_dir" in b)
    image["is_regularization_data"] = image.pop("is_regularisation_data")
    backends_path.write_text(json.dumps(backends))
    assert load_config(path).datasets[0].is_regularisation_data is True

    image["max_num_samples"] = 10
    backends_path.write_text(json.dumps(backends))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "max_num_samples: SimpleTuner option refused by lokr-job" in str(caught.value)
