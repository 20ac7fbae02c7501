"""``lokr-job fetch`` of datasets (S3 URIs, ``type: aws``, ``type: huggingface``) and the model from S3."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from remote_trees import put_tree_s3, tree_files

from job.cli import main
from job.context import JobContext, open_context
from job.data.location import local_data_dir
from job.errors import ConfigError, ExitCode, PermissionDeniedError
from job.fetch.run import fetch_inputs
from job.model.source import local_model_path

TINY = "jobs/tiny"


def _png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _local_job(tmp_path: Path, tiny_job: Path, backends: list[dict[str, Any]]) -> Path:
    """A config set on this disk (the tiny model and LoKr config) whose datasets are ``backends``."""
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "multidatabackend.json").write_text(json.dumps(backends))
    config = {
        "data_backend_config": str(folder / "multidatabackend.json"),
        "lycoris_config": str(tiny_job.parent / "lycoris_config.json"),
        "pretrained_model_name_or_path": str(tiny_job.parent.parent / "model"),
        "max_train_steps": 4,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


def _fetch(config: str | Path, workdir: Path) -> JobContext:
    ctx = open_context(str(config), workdir, None, [])
    fetch_inputs(ctx, progress=False)
    return ctx


def test_data_and_model_on_s3_then_a_second_fetch_moves_no_bytes(s3, tiny_job: Path, tmp_path: Path) -> None:
    root = tiny_job.parent.parent
    put_tree_s3(s3, root, TINY)
    uri = s3.uri(f"{TINY}/config/config.json")
    ctx = _fetch(uri, tmp_path / "work")

    dataset = ctx.config.datasets[0]
    assert local_data_dir(dataset, ctx.workdir) == ctx.workdir.dataset("tiny-subject")
    assert tree_files(ctx.workdir.dataset("tiny-subject")) == tree_files(root / "datasets" / "tiny-subject")
    model = Path(local_model_path(ctx.config.job, ctx.workdir))
    assert model.parent == ctx.workdir.models
    assert tree_files(model) == tree_files(root / "model")

    s3.log.clear()
    _fetch(uri, tmp_path / "work")
    assert s3.proxy.object_requests("GET") == [] and s3.proxy.object_bytes() == 0

    changed = f"{TINY}/datasets/tiny-subject/a_red_circle_on_blue.png"
    s3.put(changed, _png("red"))
    s3.log.clear()
    ctx = _fetch(uri, tmp_path / "work")
    assert [e.path for e in s3.proxy.object_requests("GET")] == [f"/{s3.bucket}/{changed}"]
    assert (ctx.workdir.dataset("tiny-subject") / "a_red_circle_on_blue.png").read_bytes() == _png("red")


def test_aws_backend_with_its_own_endpoint_and_region(
    s3, tiny_job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.put("pics/a_cat.png", _png("white"))
    s3.put("pics/a_cat.txt", b"a cat\n")
    s3.put("elsewhere/not_this.png", _png("black"))
    backend = {
        "id": "bucket-pics",
        "type": "aws",
        "aws_bucket_name": s3.bucket,
        "aws_data_prefix": "pics/",
        "aws_endpoint_url": s3.url,
        "aws_region_name": "eu-west-1",
        "caption_strategy": "textfile",
    }
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: the backend's own wins
    ctx = _fetch(_local_job(tmp_path, tiny_job, [backend]), tmp_path / "work")
    assert tree_files(ctx.workdir.dataset("bucket-pics")) == {
        "a_cat.png": _png("white"),
        "a_cat.txt": b"a cat\n",
    }


def test_aws_backend_keys_in_the_file_reach_that_backend_only(
    s3, tiny_job: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SimpleTuner's per-backend keys (simpletuner/helpers/data_backend/config/image.py reads
    aws_access_key_id/aws_secret_access_key for ``type: aws``; builders/aws.py AwsBackendBuilder hands them
    to that backend's boto3 client): moto's IAM mode knows only the file's keys, the environment holds
    wrong ones. check and fetch read the bucket; a store on the environment's chain is still refused (the
    keys never reached the environment); no output shows the keys."""
    from servers.s3 import iam_auth, iam_user_keys

    from job.storage import storage_for

    key_id, secret = iam_user_keys(s3.moto_url, f"reader-{s3.bucket}")
    s3.put("pics/a_cat.png", _png("white"))
    backend = {
        "id": "bucket-pics",
        "type": "aws",
        "aws_bucket_name": s3.bucket,
        "aws_data_prefix": "pics",
        "aws_endpoint_url": s3.url,
        "aws_access_key_id": key_id,
        "aws_secret_access_key": secret,
    }
    config = str(_local_job(tmp_path, tiny_job, [backend]))
    work = str(tmp_path / "work")
    with iam_auth(s3.moto_url):
        checked = main(["check", "--config", config, "--workdir", work])
        check_err = capsys.readouterr().err
        fetched = main(["fetch", "--config", config, "--workdir", work])
        fetch_err = capsys.readouterr().err
        with pytest.raises(PermissionDeniedError, match="InvalidAccessKeyId"):
            storage_for(s3.uri()).list(s3.uri("pics"))
    assert checked == ExitCode.OK, check_err
    assert fetched == ExitCode.OK, fetch_err
    assert tree_files(tmp_path / "work" / "data" / "bucket-pics") == {"a_cat.png": _png("white")}
    warning = "(backend 'bucket-pics'): aws_access_key_id, aws_secret_access_key: keys in the config file"
    assert warning in check_err and warning in fetch_err
    assert "instance/IRSA role" in check_err
    for output in (check_err, fetch_err):
        assert key_id not in output and secret not in output


def test_aws_backend_keys_refused_by_the_store_exit_4_without_showing_them(
    s3, tiny_job: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from servers.s3 import iam_auth

    key_id, secret = "AKIAWRONGWRONGWRONG0", "wrongSecret/0123456789abcdefghijklmnopqr"
    backend = {
        "id": "pics",
        "type": "aws",
        "aws_bucket_name": s3.bucket,
        "aws_endpoint_url": s3.url,
        "aws_access_key_id": key_id,
        "aws_secret_access_key": secret,
    }
    config = str(_local_job(tmp_path, tiny_job, [backend]))
    with iam_auth(s3.moto_url):
        code = main(["fetch", "--config", config, "--workdir", str(tmp_path / "work")])
    err = capsys.readouterr().err
    assert code == ExitCode.NO_PERMISSION
    assert f"bucket '{s3.bucket}'" in err and "the keys in the dataset's config (aws_access_key_id)" in err
    assert key_id not in err and secret not in err


def test_keys_escaping_the_dataset_folder_are_refused(s3, tiny_job: Path, tmp_path: Path) -> None:
    s3.put("pics/ok.png", _png("white"))
    s3.put("pics/../../evil.png", b"evil")
    backend = {"id": "pics", "instance_data_dir": s3.uri("pics"), "caption_strategy": "filename"}
    with pytest.raises(ConfigError, match=r"\.\./\.\./evil\.png") as caught:
        _fetch(_local_job(tmp_path, tiny_job, [backend]), tmp_path / "work")
    assert caught.value.exit_code == ExitCode.BAD_CONFIG
    assert tree_files(tmp_path / "work" / "data") == {}  # refused before anything was written
    assert not (tmp_path / "evil.png").exists()


def test_empty_prefix_is_a_config_error_naming_it(s3, tiny_job: Path, tmp_path: Path) -> None:
    backend = {"id": "pics", "instance_data_dir": s3.uri("no/such/prefix"), "caption_strategy": "filename"}
    with pytest.raises(ConfigError, match=rf"no objects under {s3.uri('no/such/prefix')}"):
        _fetch(_local_job(tmp_path, tiny_job, [backend]), tmp_path / "work")


def test_wrong_credentials_exit_4_naming_the_bucket(
    s3, tiny_job: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from servers.s3 import iam_auth

    s3.put("pics/a.png", _png("white"))
    backend = {"id": "pics", "instance_data_dir": s3.uri("pics"), "caption_strategy": "filename"}
    config = _local_job(tmp_path, tiny_job, [backend])
    with iam_auth(s3.moto_url):
        code = main(["fetch", "--config", str(config), "--workdir", str(tmp_path / "work")])
    assert code == ExitCode.NO_PERMISSION
    assert f"bucket '{s3.bucket}'" in capsys.readouterr().err


def _hub_backend(**extra: Any) -> dict[str, Any]:
    return {
        "id": "hub-pics",
        "type": "huggingface",
        "dataset_name": "someone/pics",
        "caption_strategy": "textfile",
    } | extra


def test_hub_image_folder_with_caption_files_and_splits(hub, tiny_job: Path, tmp_path: Path) -> None:
    hub.seed(
        "someone/pics",
        {
            "README.md": b"# pics",
            "train/a_cat.png": _png("white"),
            "train/a_cat.txt": b"a cat\n",
            "train/more/a_dog.JPG": _png("black"),
            "train/more/a_dog.txt": b"a dog\n",
            "test/held_out.png": _png("red"),
        },
        repo_type="dataset",
    )
    ctx = _fetch(_local_job(tmp_path, tiny_job, [_hub_backend()]), tmp_path / "work")
    assert tree_files(ctx.workdir.dataset("hub-pics")) == {
        "a_cat.png": _png("white"),
        "a_cat.txt": b"a cat\n",
        "more/a_dog.JPG": _png("black"),
        "more/a_dog.txt": b"a dog\n",
    }
    hub.log.clear()
    _fetch(tmp_path / "config" / "config.json", tmp_path / "work")
    assert [e for e in hub.log.select() if "/resolve/" in e.path] == []  # no file downloaded twice


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_hub_image_folder_with_metadata_captions(hub, tiny_job: Path, tmp_path: Path, kind: str) -> None:
    rows = [{"file_name": "images/a.png", "text": "a white square"}, {"file_name": "b.png", "text": "black"}]
    if kind == "jsonl":
        metadata = "".join(json.dumps(row) + "\n" for row in rows).encode()
    else:
        metadata = ("file_name,text\n" + "".join(f"{r['file_name']},{r['text']}\n" for r in rows)).encode()
    hub.seed(
        "someone/pics",
        {f"metadata.{kind}": metadata, "images/a.png": _png("white"), "b.png": _png("black")},
        repo_type="dataset",
    )
    ctx = _fetch(_local_job(tmp_path, tiny_job, [_hub_backend(caption_column="text")]), tmp_path / "work")
    folder = ctx.workdir.dataset("hub-pics")
    assert (folder / "images" / "a.txt").read_text() == "a white square\n"
    assert (folder / "b.txt").read_text() == "black\n"


def test_hub_dataset_of_parquet_tables_is_refused_with_the_supported_layout(
    hub, tiny_job: Path, tmp_path: Path
) -> None:
    hub.seed("someone/pics", {"data/train-00000-of-00001.parquet": b"PAR1"}, repo_type="dataset")
    with pytest.raises(ConfigError) as caught:
        _fetch(_local_job(tmp_path, tiny_job, [_hub_backend()]), tmp_path / "work")
    message = str(caught.value)
    assert "someone/pics" in message and "train-00000-of-00001.parquet" in message
    assert "image-folder" in message and "metadata.jsonl" in message


def test_hub_dataset_missing_or_refused(
    hub, tiny_job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(_local_job(tmp_path, tiny_job, [_hub_backend()]))
    work = str(tmp_path / "work")
    assert main(["fetch", "--config", config, "--workdir", work]) == ExitCode.BAD_CONFIG
    assert "someone/pics" in capsys.readouterr().err

    hub.seed("someone/pics", {"a.png": _png("white")}, repo_type="dataset", private=True)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_000000000")
    assert main(["fetch", "--config", config, "--workdir", work]) == ExitCode.NO_PERMISSION
    assert "dataset repo 'someone/pics'" in capsys.readouterr().err


def test_local_datasets_and_model_are_left_where_they_are(tiny_job: Path, tmp_path: Path) -> None:
    ctx = _fetch(tiny_job, tmp_path / "work")
    assert (
        local_data_dir(ctx.config.datasets[0], ctx.workdir)
        == tiny_job.parent.parent / "datasets" / "tiny-subject"
    )
    assert local_model_path(ctx.config.job, ctx.workdir) == str(tiny_job.parent.parent / "model")
    assert not (tmp_path / "work" / "data").exists() and not (tmp_path / "work" / "models").exists()
