"""No secret is ever printed or written: config-file keys, credential-shaped values, and a whole run whose
dataset keys sit in multidatabackend.json (SimpleTuner's ``type: aws`` backend)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from job.cli import main
from job.config.loader import load_config
from job.errors import ConfigError, ExitCode
from job.model.source import local_model_path
from job.publish.bundle import assemble_hub_folder
from job.redact import is_secret_name, redact, remember_secrets
from job.workdir import WorkDir

# Shaped like the real thing (AKIA + 16, 40 base64 characters), so every net is exercised.
KEY_ID = "AKIAFILEKEY000000001"
SECRET = "fileSecret/Planted+0123456789abcdefghijklm"
HUB = "hf_plantedInAConfigFile0123456789"


def _png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _config_set(folder: Path, tiny_job: Path, backends: list[dict[str, Any]], **config: Any) -> Path:
    """A config set beside the tiny job's model and LoKr config, with these backends and config.json keys."""
    folder.mkdir(parents=True)
    (folder / "multidatabackend.json").write_text(json.dumps(backends))
    settings = {
        "data_backend_config": str(folder / "multidatabackend.json"),
        "lycoris_config": str(tiny_job.parent / "lycoris_config.json"),
        "pretrained_model_name_or_path": str(tiny_job.parent.parent / "model"),
        "max_train_steps": 4,
    } | config
    (folder / "config.json").write_text(json.dumps(settings))
    return folder / "config.json"


def _aws_backend(bucket: str = "pics-bucket", **extra: Any) -> dict[str, Any]:
    return {
        "id": "pics",
        "type": "aws",
        "aws_bucket_name": bucket,
        "caption_strategy": "textfile",
        "aws_access_key_id": KEY_ID,
        "aws_secret_access_key": SECRET,
        "hf_token": HUB,  # a SimpleTuner key lokr-job ignores: its value is still a secret
    } | extra


def test_secret_names_are_credentials_and_ordinary_keys_are_not() -> None:
    for name in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "hf_token", "HF_TOKEN"):
        assert is_secret_name(name), name
    for name in ("WANDB_API_KEY", "db_password", "private_key", "X-Amz-Signature"):
        assert is_secret_name(name), name
    for name in (
        "caption_column",
        "tokenizer_max_length",
        "max_token_length",
        "aws_bucket_name",
        "cache_key",
    ):
        assert not is_secret_name(name), name


def test_credential_shapes_are_masked_and_ordinary_text_is_not() -> None:
    commit = "bc8e6ab7738ce457a2ed8eb2d26cadd91c6442cb"
    text = (
        f"id ASIAEXAMPLE000000042 secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY at commit {commit}; "
        'AWS_SECRET_ACCESS_KEY=short1234 {"hub_token": "abcdefgh"} tokenizer_max_length=120; '
        "aws_secret_access_key: known SimpleTuner option"
    )
    assert redact(text) == (
        f"id *** secret *** at commit {commit}; "
        'AWS_SECRET_ACCESS_KEY=*** {"hub_token": "***"} tokenizer_max_length=120; '
        "aws_secret_access_key: known SimpleTuner option"
    )
    # A 40-character string with no key id or secret name near it is just text (a digest, an id).
    lonely = "x" * 200 + " wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    assert redact(lonely) == lonely


def test_values_of_secret_named_keys_in_config_files_are_masked_everywhere() -> None:
    remember_secrets(
        {"backends": [{"id": "x", "db_password": "correct-horse-battery", "repeats": "12345678"}]}
    )
    assert redact("boto said: correct-horse-battery was refused") == "boto said: *** was refused"
    assert redact("repeats 12345678") == "repeats 12345678"  # not under a secret name


@pytest.mark.parametrize(
    ("backend", "named"),
    [
        # SimpleTuner's nested block, refused: the error quotes the block with its keys masked.
        (
            {
                "id": "pics",
                "type": "aws",
                "aws_bucket_name": "b",
                "aws": {"aws_access_key_id": KEY_ID, "aws_secret_access_key": SECRET},
            },
            "aws: SimpleTuner option refused",
        ),
        # A value of the wrong type for a credential field.
        (_aws_backend(aws_secret_access_key=["not", SECRET]), "aws_secret_access_key: Input should be"),
        # Half a key pair.
        (_aws_backend(aws_access_key_id=None), "aws_access_key_id and aws_secret_access_key go together"),
        # A misspelt key: unknown, value hidden.
        (_aws_backend(aws_secret_acess_key=SECRET), "aws_secret_acess_key: unknown option (value <hidden>)"),
    ],
)
def test_a_rejected_secret_is_never_echoed(
    backend: dict[str, Any],
    named: str,
    tiny_job: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = _config_set(tmp_path / "config", tiny_job, [backend])
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    message = str(caught.value)
    assert named in message and "multidatabackend.json (backend 'pics')" in message
    assert SECRET not in message and KEY_ID not in message

    assert (
        main(["check", "--config", str(config), "--workdir", str(tmp_path / "work")]) == ExitCode.BAD_CONFIG
    )
    err = capsys.readouterr().err
    assert named in err
    for secret in (SECRET, KEY_ID, HUB):
        assert secret not in err


def test_keys_on_a_backend_that_is_not_on_s3_are_reported_unused(tiny_job: Path, tmp_path: Path) -> None:
    folder = tiny_job.parent.parent / "datasets" / "tiny-subject"
    backend = {"id": "local-pics", "instance_data_dir": str(folder)} | {
        "aws_access_key_id": KEY_ID,
        "aws_secret_access_key": SECRET,
    }
    cfg = load_config(_config_set(tmp_path / "config", tiny_job, [backend]))
    assert any(
        "(backend 'local-pics'): aws_access_key_id, aws_secret_access_key: not used" in w
        for w in cfg.warnings
    )


def test_dataset_keys_are_not_part_of_the_recipe(tiny_job: Path, tmp_path: Path) -> None:
    """The keys reach the data; they do not change what is trained: same recipe and hash without them, and
    neither the values nor the field names in the record."""
    with_keys = load_config(_config_set(tmp_path / "a", tiny_job, [_aws_backend(aws_session_token=HUB)]))
    without = load_config(
        _config_set(tmp_path / "b", tiny_job, [_aws_backend(aws_access_key_id="", aws_secret_access_key="")])
    )
    assert with_keys.datasets[0].aws_secret_access_key is not None
    assert (
        without.datasets[0].aws_secret_access_key is None
    )  # empty means "the environment", as in SimpleTuner
    assert with_keys.recipe == without.recipe and with_keys.hash == without.hash
    recorded = json.dumps(with_keys.recipe)
    assert "aws_access_key_id" not in recorded and SECRET not in recorded and KEY_ID not in recorded
    assert SECRET not in repr(with_keys.datasets[0])  # pydantic SecretStr: a repr shows **********


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_lycoris_preset", "one_torch_thread", "fresh_accelerate_state")
def test_a_whole_run_with_keys_in_the_file_writes_them_nowhere(
    s3, tiny_job: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """fetch, warm, train (with checkpoints), publish into a run URI, moto in IAM mode knowing only the
    file's keys: the job succeeds, and no secret appears in stderr or in any file of the work directory,
    the run URI (status.json, recipe.json, checkpoints) or the Hub repo's layout (the model card)."""
    from remote_trees import put_tree_s3
    from servers.s3 import iam_auth, iam_user_keys

    key_id, secret = iam_user_keys(s3.moto_url, f"trainer-{s3.bucket}")
    put_tree_s3(s3, tiny_job.parent.parent / "datasets" / "tiny-subject", "data/tiny-subject")
    backend = _aws_backend(
        s3.bucket,
        id="tiny-subject",
        aws_data_prefix="data/tiny-subject",
        aws_endpoint_url=s3.url,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        resolution=64,
        minimum_image_size=32,
    )
    config = _config_set(tmp_path / "config", tiny_job, [backend], checkpoint_step_interval=2)
    work, run = tmp_path / "work", tmp_path / "run"
    with iam_auth(s3.moto_url):
        code = main(["run", "--config", str(config), "--workdir", str(work), "--run-uri", str(run)])
    err = capsys.readouterr().err
    assert code == ExitCode.OK, err[-3000:]
    assert (
        "(backend 'tiny-subject'): aws_access_key_id, aws_secret_access_key: keys in the config file" in err
    )

    # The Hub repo's files exactly as a push lays them out, model card included.
    loaded = load_config(config)
    hub_repo = tmp_path / "hub-repo"
    assemble_hub_folder(
        loaded, work / "output", hub_repo, base_model=lambda: local_model_path(loaded.job, WorkDir(work))
    )

    written = [p for root in (work, run, hub_repo) for p in root.rglob("*") if p.is_file()]
    names = {p.name for p in written}
    assert {"status.json", "recipe.json", "README.md", "trainer_state.json"} <= names, sorted(names)
    for secret_value in (key_id, secret, HUB):
        assert secret_value not in err
        leaks = [p for p in written if secret_value.encode() in p.read_bytes()]
        assert leaks == [], leaks
