"""Reading the seed's config files as users paste them, and the errors they get when they are wrong."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from job.config.loader import load_config
from job.errors import ConfigError

SEED = Path(__file__).parent / "fixtures" / "seed" / "config"


@pytest.fixture
def seed_tree(tmp_path: Path) -> Path:
    """The seed's files in a SimpleTuner-style project folder, with the datasets they name."""
    shutil.copytree(SEED, tmp_path / "config")
    for name in ("pseudo-camera-10k", "dreambooth-subject"):
        (tmp_path / "datasets" / name).mkdir(parents=True)
    return tmp_path


def _point_backend_at_existing_file(root: Path) -> Path:
    config = root / "config" / "config.json"
    data = json.loads(config.read_text())
    data["data_backend_config"] = "config/multidatabackend.json"
    config.write_text(json.dumps(data, indent=4))
    return config


def test_seed_config_as_pasted_names_the_missing_backend_file_and_the_similar_one(seed_tree: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(seed_tree / "config" / "config.json")
    message = str(caught.value)
    assert "data_backend_config" in message
    assert "config/auraflow/multidatabackend.json" in message
    assert str(seed_tree / "config" / "auraflow" / "multidatabackend.json") in message
    assert f"similarly named file exists: {seed_tree / 'config' / 'multidatabackend.json'}" in message


def test_seed_config_with_its_paths_fixed_loads_with_only_ignored_key_warnings(seed_tree: Path) -> None:
    config = load_config(_point_backend_at_existing_file(seed_tree))

    job = config.job
    assert job.learning_rate == pytest.approx(4e-5)
    assert job.gradient_checkpointing is True
    assert job.validation_num_inference_steps == 20
    assert job.validation_guidance_rescale == 0.0
    assert job.base_model_precision == "int8-quanto"
    assert job.optimizer == "optimi-lion"
    assert job.model_source == "terminusresearch/auraflow-v0.3"
    assert job.max_token_length == 120
    assert job.vae_cache_ondemand is True  # the seed's latents are encoded as training first reads them
    assert all("known SimpleTuner option, ignored by lokr-job" in w for w in config.warnings)
    ignored = {w.split(": ")[1] for w in config.warnings}
    assert ignored == {
        "validation_torch_compile",
        "output_dir",
        "disable_benchmark",
        "metadata_backend",
    }


def test_lycoris_config_with_trailing_commas_keeps_a_float_multiplier(seed_tree: Path) -> None:
    lycoris_path = seed_tree / "config" / "lycoris_config.json"
    lycoris_path.write_text(lycoris_path.read_text().replace('"multiplier": 1.0', '"multiplier": 0.75'))
    config = load_config(_point_backend_at_existing_file(seed_tree))
    assert config.lycoris is not None
    assert config.lycoris.multiplier == 0.75
    assert config.lycoris.linear_dim == 10000
    assert config.lycoris.factor == 16
    assert config.lycoris.apply_preset is not None
    assert config.lycoris.apply_preset.target_module == ["Attention"]
    assert config.lycoris.apply_preset.module_algo_map == {"Attention": {"factor": 8}}


def test_datasets_resolve_relative_to_the_folder_that_holds_config(seed_tree: Path) -> None:
    config = load_config(_point_backend_at_existing_file(seed_tree))
    by_id = {d.id: d for d in config.datasets}
    assert by_id["pseudo-camera-10k-auraflow"].instance_data_dir == str(
        seed_tree / "datasets/pseudo-camera-10k"
    )
    assert by_id["pseudo-camera-10k-auraflow"].is_regularisation_data is True
    assert by_id["dreambooth-subject"].repeats == 1000
    assert by_id["dreambooth-subject"].instance_prompt == "the name of your subject goes here"
    assert config.text_embeds.cache_dir == "cache/text/auraflow"
    assert config.text_embeds.write_batch_size == 128


def test_paths_relative_to_the_config_file_itself_also_work(tmp_path: Path) -> None:
    folder = tmp_path / "myjob"
    shutil.copytree(SEED, folder)
    (folder / "datasets" / "pseudo-camera-10k").mkdir(parents=True)
    (folder / "datasets" / "dreambooth-subject").mkdir(parents=True)
    data = json.loads((folder / "config.json").read_text())
    data.update(data_backend_config="multidatabackend.json", lycoris_config="lycoris_config.json")
    (folder / "config.json").write_text(json.dumps(data))
    config = load_config(folder / "config.json")
    assert config.files["lycoris_config"] == folder / "lycoris_config.json"
    assert config.datasets[0].instance_data_dir == str(folder / "datasets" / "pseudo-camera-10k")


def test_leading_dashes_and_the_prompt_library_are_read(seed_tree: Path) -> None:
    config_path = _point_backend_at_existing_file(seed_tree)
    data = json.loads(config_path.read_text())
    data["--user_prompt_library"] = "config/user_prompt_library.json"
    config_path.write_text(json.dumps(data))
    config = load_config(config_path)
    assert config.files["user_prompt_library"] == seed_tree / "config" / "user_prompt_library.json"
    assert len(config.prompt_library) == 15
    assert "<token>" in config.prompt_library["anime_<token>"]


def test_a_typo_names_the_nearest_known_key_and_exits_2(seed_tree: Path) -> None:
    config_path = _point_backend_at_existing_file(seed_tree)
    data = json.loads(config_path.read_text())
    data["learning_rat"] = data.pop("learning_rate")
    config_path.write_text(json.dumps(data))

    result = subprocess.run(
        [sys.executable, "-m", "job", "check", "--config", str(config_path)], capture_output=True, text=True
    )
    assert result.returncode == 2
    err = result.stderr
    assert "learning_rat: unknown option" in err
    assert "did you mean 'learning_rate'?" in err
    assert str(config_path) in err


def test_every_mistake_in_every_file_is_reported_at_once(seed_tree: Path) -> None:
    config_path = _point_backend_at_existing_file(seed_tree)
    data = json.loads(config_path.read_text())
    data.update(optimizer="adam-typo", train_batch_size="two", lycoris_config="config/lycoris.json")
    config_path.write_text(json.dumps(data))
    backends = json.loads((seed_tree / "config" / "multidatabackend.json").read_text())
    backends[1]["crop_style"] = "sideways"
    (seed_tree / "config" / "multidatabackend.json").write_text(json.dumps(backends))

    with pytest.raises(ConfigError) as caught:
        load_config(config_path)
    problems = caught.value.problems
    assert any("optimizer" in p and "adam-typo" in p for p in problems)
    assert any("train_batch_size" in p and "'two'" in p for p in problems)
    assert any("lycoris_config" in p and "lycoris_config.json" in p for p in problems)
    assert any("dreambooth-subject" in p and "crop_style" in p for p in problems)
    assert len(problems) == 4


def test_broken_json_is_reported_with_file_line_and_column(seed_tree: Path) -> None:
    config_path = _point_backend_at_existing_file(seed_tree)
    lycoris = seed_tree / "config" / "lycoris_config.json"
    lycoris.write_text('{\n    "algo": "lokr",\n    "factor": 16 16\n}\n')
    with pytest.raises(ConfigError) as caught:
        load_config(config_path)
    assert f"{lycoris}:3:" in str(caught.value)


def test_set_overrides_config_values_with_json_typed_values(seed_tree: Path) -> None:
    config_path = _point_backend_at_existing_file(seed_tree)
    config = load_config(config_path, ["max_train_steps=7", "--use_ema=true", "tracker_run_name=abc"])
    assert config.job.max_train_steps == 7
    assert config.job.use_ema is True
    assert config.job.tracker_run_name == "abc"
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(config_path, ["max_train_steps"])


def test_missing_local_dataset_folder_lists_where_it_looked(seed_tree: Path) -> None:
    config_path = _point_backend_at_existing_file(seed_tree)
    shutil.rmtree(seed_tree / "datasets" / "dreambooth-subject")
    with pytest.raises(ConfigError) as caught:
        load_config(config_path)
    message = str(caught.value)
    assert "instance_data_dir: folder 'datasets/dreambooth-subject' not found" in message
    assert str(seed_tree / "datasets" / "dreambooth-subject") in message


def test_group_offload_with_model_cpu_offload_is_refused(seed_tree: Path) -> None:
    config_path = _point_backend_at_existing_file(seed_tree)
    overrides = ["enable_group_offload=true", "enable_model_cpu_offload=true"]
    with pytest.raises(ConfigError, match="cannot be combined"):
        load_config(config_path, overrides)


def test_recipe_hash_changes_with_the_recipe_only(seed_tree: Path) -> None:
    config_path = _point_backend_at_existing_file(seed_tree)
    assert load_config(config_path).hash == load_config(config_path).hash
    assert load_config(config_path).hash != load_config(config_path, ["learning_rate=1e-4"]).hash
