"""A config set on S3 or the Hub: fetched into the work directory and resolved by the local loader's rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from remote_trees import put_tree_hub, put_tree_s3, tree_files

from job.cli import main
from job.config.loader import load_config
from job.context import open_context
from job.errors import ConfigError, ExitCode

TINY = "jobs/tiny"


@pytest.fixture
def s3_job(s3, tiny_job: Path) -> str:
    """The tiny job (config/, datasets/, model/) under s3://<bucket>/jobs/tiny/; its config URI."""
    put_tree_s3(s3, tiny_job.parent.parent, TINY)
    return s3.uri(f"{TINY}/config/config.json")


def test_config_on_s3_resolves_as_the_local_one_does(s3, s3_job: str, tiny_job: Path, tmp_path: Path) -> None:
    ctx = open_context(s3_job, tmp_path / "work", None, [])
    local = load_config(tiny_job)
    cfg = ctx.config

    mirror = ctx.workdir.config / "mirror" / TINY / "config"
    assert cfg.config_path == mirror / "config.json"
    assert tree_files(mirror) == tree_files(tiny_job.parent)  # all four files, at their remote paths
    assert cfg.files["lycoris_config"] == mirror / "lycoris_config.json"
    assert cfg.lycoris == local.lycoris and cfg.prompt_library == local.prompt_library
    # Relative folders become the remote places they name (SimpleTuner's convention: beside config/).
    assert cfg.datasets[0].instance_data_dir == s3.uri(f"{TINY}/datasets/tiny-subject")
    assert cfg.job.model_source == s3.uri(f"{TINY}/model")
    origin = json.loads((ctx.workdir.config / "origin.json").read_text())
    assert origin["config"] == s3_job


def test_second_open_downloads_nothing_and_a_changed_file_again(s3, s3_job: str, tmp_path: Path) -> None:
    open_context(s3_job, tmp_path / "work", None, [])
    s3.log.clear()
    open_context(s3_job, tmp_path / "work", None, [])
    assert s3.proxy.object_requests("GET") == []

    library = {"portrait": "a portrait of <token>"}
    s3.put(f"{TINY}/config/user_prompt_library.json", json.dumps(library).encode())
    s3.log.clear()
    ctx = open_context(s3_job, tmp_path / "work", None, [])
    assert ctx.config.prompt_library == library
    fetched = [e.path for e in s3.proxy.object_requests("GET")]
    assert fetched == [f"/{s3.bucket}/{TINY}/config/user_prompt_library.json"]


def test_paths_relative_to_the_config_file_itself(s3, tmp_path: Path) -> None:
    backends = [
        {"id": "pics", "instance_data_dir": "images", "caption_strategy": "filename"},
        {"id": "elsewhere", "instance_data_dir": "s3://other-bucket/pics", "caption_strategy": "filename"},
    ]
    config = {
        "data_backend_config": "multidatabackend.json",
        "lycoris_config": "lycoris.json",
        "max_train_steps": 10,
        "pretrained_model_name_or_path": "owner/base-model",
    }
    s3.put("flat/config.json", json.dumps(config).encode())
    s3.put("flat/multidatabackend.json", json.dumps(backends).encode())
    s3.put("flat/lycoris.json", b'{"algo": "lokr", "factor": 4,}')
    s3.put("flat/images/a_cat.png", b"png")
    cfg = open_context(s3.uri("flat/config.json"), tmp_path / "work", None, []).config
    assert cfg.datasets[0].instance_data_dir == s3.uri("flat/images")
    assert cfg.datasets[1].instance_data_dir == "s3://other-bucket/pics"  # a URI means what it says
    assert cfg.lycoris is not None and cfg.lycoris.factor == 4
    assert cfg.job.model_source == "owner/base-model"  # nothing of that name beside the config: a repo id


def test_absolute_local_paths_in_a_remote_config_are_read_in_place(
    s3, s3_job: str, tiny_job: Path, tmp_path: Path
) -> None:
    mounted = tmp_path / "volume" / "lycoris.json"
    mounted.parent.mkdir()
    mounted.write_text('{"algo": "lokr", "factor": 3}')
    ctx = open_context(s3_job, tmp_path / "work", None, [f"lycoris_config={mounted}"])
    assert ctx.config.files["lycoris_config"] == mounted
    assert ctx.config.lycoris is not None and ctx.config.lycoris.factor == 3


def test_overrides_can_point_at_another_remote_file(s3, s3_job: str, tmp_path: Path) -> None:
    s3.put(f"{TINY}/config/other_lycoris.json", b'{"algo": "lokr", "factor": 2}')
    ctx = open_context(s3_job, tmp_path / "work", None, ["lycoris_config=config/other_lycoris.json"])
    assert ctx.config.lycoris is not None and ctx.config.lycoris.factor == 2
    # The file the config itself names is no longer needed, so it is not left where the loader looks.
    assert not (ctx.workdir.config / "mirror" / TINY / "config" / "lycoris_config.json").exists()


def test_config_on_the_hub(hub, tiny_job: Path, tmp_path: Path) -> None:
    put_tree_hub(hub, "someone/jobs", tiny_job.parent.parent, "tiny", repo_type="dataset")
    uri = "hf://datasets/someone/jobs/tiny/config/config.json"
    cfg = open_context(uri, tmp_path / "work", None, []).config
    assert cfg.datasets[0].instance_data_dir == "hf://datasets/someone/jobs/tiny/datasets/tiny-subject"
    assert cfg.job.model_source == "hf://datasets/someone/jobs/tiny/model"
    assert cfg.lycoris is not None and cfg.lycoris.factor == 16


def test_missing_referenced_file_names_the_remote_places_looked(s3, s3_job: str, tmp_path: Path) -> None:
    s3.client.delete_object(Bucket=s3.bucket, Key=f"{TINY}/config/lycoris_config.json")
    with pytest.raises(ConfigError) as caught:
        open_context(s3_job, tmp_path / "work", None, [])
    assert caught.value.exit_code == ExitCode.BAD_CONFIG
    message = str(caught.value)
    assert "lycoris_config" in message and s3.uri(f"{TINY}/config/lycoris_config.json") in message


def test_missing_dataset_folder_names_the_remote_places_looked(s3, s3_job: str, tmp_path: Path) -> None:
    for key in s3.keys(f"{TINY}/datasets/"):
        s3.client.delete_object(Bucket=s3.bucket, Key=key)
    with pytest.raises(
        ConfigError, match=rf"no objects under 'datasets/tiny-subject'.*{s3.uri(TINY)}/datasets"
    ):
        open_context(s3_job, tmp_path / "work", None, [])


def test_missing_config_exits_2_naming_it(s3, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = s3.uri("nowhere/config.json")
    assert main(["check", "--config", uri, "--workdir", str(tmp_path)]) == ExitCode.BAD_CONFIG
    assert f"{uri} does not exist" in capsys.readouterr().err


def test_wrong_credentials_exit_4_naming_the_bucket(
    s3, s3_job: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from servers.s3 import iam_auth

    with iam_auth(s3.moto_url):
        code = main(["check", "--config", s3_job, "--workdir", str(tmp_path)])
    assert code == ExitCode.NO_PERMISSION
    assert f"bucket '{s3.bucket}'" in capsys.readouterr().err


def test_wrong_hub_token_exits_4_naming_the_repo(
    hub, tiny_job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    put_tree_hub(hub, "someone/jobs", tiny_job.parent.parent, "tiny", repo_type="dataset")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_000000000")
    uri = "hf://datasets/someone/jobs/tiny/config/config.json"
    assert main(["check", "--config", uri, "--workdir", str(tmp_path)]) == ExitCode.NO_PERMISSION
    assert "dataset repo 'someone/jobs'" in capsys.readouterr().err
