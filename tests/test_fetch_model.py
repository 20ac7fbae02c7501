"""The base model: a Hub repo id into the work directory's HF cache, or a mirrored diffusers folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from remote_trees import put_tree_hub, tree_files

from job.config.schema import JobConfig
from job.context import open_context
from job.errors import ConfigError
from job.fetch.model import diffusers_files
from job.fetch.run import fetch_inputs
from job.model.source import hub_base_model, local_model_path

REPO = "someone/auraflow-tiny"
# What a real pipeline repo holds beside the files diffusers loads: none of it is fetched.
EXTRAS = {
    "README.md": b"# tiny",
    "auraflow_single_file.safetensors": b"a ComfyUI checkpoint",
    "vae/diffusion_pytorch_model.bin": b"pickle",
    "vae/diffusion_pytorch_model.fp16.safetensors": b"half",
    "text_encoder/pytorch_model.bin": b"pickle",
}


def _config_with_model(tmp_path: Path, tiny_job: Path, model: str, **extra: object) -> Path:
    data = json.loads(tiny_job.read_text())
    data.update(pretrained_model_name_or_path=model, **extra)
    data["data_backend_config"] = str(tiny_job.parent / "multidatabackend.json")
    data["lycoris_config"] = str(tiny_job.parent / "lycoris_config.json")
    data["--user_prompt_library"] = str(tiny_job.parent / "user_prompt_library.json")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def model_repo(hub, tiny_job: Path) -> str:
    """The tiny pipeline on the Hub, with what real repos hold beside it; the commit sha."""
    put_tree_hub(hub, REPO, tiny_job.parent.parent / "model", "")
    return hub.commit(REPO, "model", EXTRAS)


def test_hub_repo_id_is_fetched_into_the_cache_without_duplicates(
    hub, model_repo: str, tiny_job: Path, tmp_path: Path
) -> None:
    ctx = open_context(str(_config_with_model(tmp_path, tiny_job, REPO)), tmp_path / "work", None, [])
    with pytest.raises(ConfigError, match="run lokr-job fetch"):
        local_model_path(ctx.config.job, ctx.workdir)

    fetch_inputs(ctx, progress=False)
    folder = Path(local_model_path(ctx.config.job, ctx.workdir))
    assert folder.is_relative_to(ctx.workdir.models / "models--someone--auraflow-tiny" / "snapshots")
    assert tree_files(folder) == tree_files(tiny_job.parent.parent / "model")  # no .bin, fp16 or root file

    from diffusers import AuraFlowPipeline

    pipeline = AuraFlowPipeline.from_pretrained(folder)
    assert pipeline.transformer.config.num_attention_heads == 2

    hub.log.clear()
    fetch_inputs(ctx, progress=False)
    assert [e.path for e in hub.log.select() if "/resolve/" in e.path] == []


def test_hub_repo_at_a_pinned_commit_is_found_offline(
    hub, model_repo: str, tiny_job: Path, tmp_path: Path
) -> None:
    config = _config_with_model(tmp_path, tiny_job, REPO, revision=model_repo)
    ctx = open_context(str(config), tmp_path / "work", None, [])
    fetch_inputs(ctx, progress=False)
    hub.stop()  # offline from here on
    assert Path(local_model_path(ctx.config.job, ctx.workdir)).name == model_repo


def test_hub_folder_uri_is_mirrored(hub, tiny_job: Path, tmp_path: Path) -> None:
    put_tree_hub(hub, "someone/bundle", tiny_job.parent.parent / "model", "base", repo_type="dataset")
    uri = "hf://datasets/someone/bundle/base"
    ctx = open_context(str(_config_with_model(tmp_path, tiny_job, uri)), tmp_path / "work", None, [])
    fetch_inputs(ctx, progress=False)
    folder = Path(local_model_path(ctx.config.job, ctx.workdir))
    assert folder.parent == ctx.workdir.models and folder.name.startswith(
        "hf--datasets-someone-bundle-base--"
    )
    assert tree_files(folder) == tree_files(tiny_job.parent.parent / "model")


def test_hub_repo_without_model_index_is_refused(hub, tiny_job: Path, tmp_path: Path) -> None:
    hub.seed("someone/not-a-pipeline", {"weights.safetensors": b"x"})
    config = _config_with_model(tmp_path, tiny_job, "someone/not-a-pipeline")
    ctx = open_context(str(config), tmp_path / "work", None, [])
    with pytest.raises(ConfigError, match=r"someone/not-a-pipeline.*no model_index\.json"):
        fetch_inputs(ctx, progress=False)


def test_diffusers_files_keep_what_from_pretrained_loads() -> None:
    keys = [
        "model_index.json",
        "README.md",
        "aura_flow_0.3.safetensors",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder/pytorch_model.bin",
        "tokenizer/spiece.model",
        "tokenizer/tokenizer.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "transformer/diffusion_pytorch_model.fp16-00001-of-00001.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.fp16.json",
        "transformer/diffusion_pytorch_model.bin.index.json",
        "vae/config.json",
        "vae/diffusion_pytorch_model.fp16.safetensors",  # the only weights: kept
        "vae/nested/extra.json",
    ]
    assert diffusers_files(keys) == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/spiece.model",
        "tokenizer/tokenizer.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "vae/config.json",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    # A transformer on its own: the folder is the component.
    assert diffusers_files(["config.json", "diffusion_pytorch_model.safetensors", "x/y.json"]) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("someone/auraflow-ft", "someone/auraflow-ft"),
        ("hf://someone/auraflow-ft", "someone/auraflow-ft"),
        ("hf://datasets/someone/bundle/base", "terminusresearch/auraflow-v0.3"),
        ("s3://bucket/models/auraflow", "terminusresearch/auraflow-v0.3"),
        ("/no/such/local/folder/x", "terminusresearch/auraflow-v0.3"),
    ],
)
def test_the_cards_base_model_is_a_hub_repo_id(source: str, expected: str) -> None:
    job = JobConfig(
        pretrained_model_name_or_path=source, data_backend_config="x", max_train_steps=1, lycoris_config="y"
    )
    assert hub_base_model(job) == expected
