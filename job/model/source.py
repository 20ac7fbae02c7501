"""Where the base model is on this machine, and what the Hub calls it: the one mapping from
``pretrained_model_name_or_path`` (or the flavour's repo) to a folder diffusers' ``from_pretrained`` reads;
the helper models (the CLIP model, the Tiny AutoEncoder) are found the same way (``ModelKind``).

Three kinds of source: a local diffusers folder (used where it is), a Hub repo id (``lokr-job fetch`` puts
it in huggingface_hub's cache under ``<workdir>/models/``), and an ``s3://``/``hf://`` URI of a diffusers
folder (mirrored to ``<workdir>/models/<scheme>--<name>--<hash>/``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from job.config.paths import is_remote
from job.config.schema import FLAVOUR_REPOS, JobConfig
from job.errors import ConfigError
from job.storage import parse_uri
from job.workdir import WorkDir

_HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_repo_id(source: str) -> bool:
    """``owner/name`` that is not a folder on this machine."""
    return bool(_HUB_REPO_ID.match(source)) and not Path(source).expanduser().exists()


def mirror_dir(source_uri: str, workdir: WorkDir) -> Path:
    """The folder an ``s3://``/``hf://`` model is mirrored into: readable, and unique per URI."""
    uri = parse_uri(source_uri)
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", str(uri).partition("://")[2]).strip("-.")[:80]
    digest = hashlib.sha256(str(uri).encode()).hexdigest()[:8]
    return workdir.models / f"{uri.scheme}--{readable}--{digest}"


@dataclass(frozen=True)
class ModelKind:
    """A model the config names by ``key``, fetched into the work directory as the base model is."""

    key: str  # the config key that names it
    what: str  # how messages name it
    index_file: str  # the one file every such model has
    expected: str  # what a folder of it holds, for the message when it holds nothing of the kind


BASE_MODEL = ModelKind(
    "pretrained_model_name_or_path",
    "base model",
    "model_index.json",
    "no diffusers model there (model_index.json with vae/, text_encoder/, tokenizer/, transformer/, "
    "scheduler/ holding configs and .safetensors weights)",
)
EVALUATION_MODEL = ModelKind(
    "pretrained_evaluation_model_name_or_path",
    "evaluation model",
    "config.json",
    "no transformers CLIP model there (config.json, the tokenizer and preprocessor files and model.safetensors)",
)
PREVIEW_MODEL = ModelKind(
    "validation_preview_model",
    "preview decoder",
    "config.json",
    "no diffusers AutoencoderTiny there (config.json and diffusion_pytorch_model.safetensors)",
)


def local_model_path(job: JobConfig, workdir: WorkDir) -> str:
    """The local folder to load the base model from (after ``lokr-job fetch`` for remote sources).

    A Hub repo is found in the cache offline; ``ConfigError`` when it, or a URI's mirror, is not there.
    """
    return _local_folder(job.model_source, job.revision, workdir, BASE_MODEL)


def evaluation_model_path(job: JobConfig, workdir: WorkDir) -> str:
    """The local folder of ``pretrained_evaluation_model_name_or_path`` (the CLIP model)."""
    return _local_folder(job.pretrained_evaluation_model_name_or_path, None, workdir, EVALUATION_MODEL)


def preview_model_path(job: JobConfig, workdir: WorkDir) -> str:
    """The local folder of ``validation_preview_model`` (the Tiny AutoEncoder)."""
    return _local_folder(job.validation_preview_model, None, workdir, PREVIEW_MODEL)


def _local_folder(source: str, revision: str | None, workdir: WorkDir, kind: ModelKind) -> str:
    if is_remote(source):
        folder = mirror_dir(source, workdir)
        if not (folder / "model_index.json").is_file() and not (folder / "config.json").is_file():
            raise ConfigError(
                f"the {kind.what} {source} has not been fetched to {folder}: run lokr-job fetch"
            )
        return str(folder)
    local = Path(source).expanduser()
    if local.is_dir():
        return str(local)
    if is_hub_repo_id(source):
        return _cached_snapshot(source, revision, workdir, kind)
    raise ConfigError(
        f"{kind.key} {source!r} is not a local folder, an s3:// or hf:// URI, nor a Hub repo id (owner/name)"
    )


def _cached_snapshot(repo_id: str, revision: str | None, workdir: WorkDir, kind: ModelKind) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    missing = ConfigError(
        f"the {kind.what} {repo_id}{f'@{revision}' if revision else ''} is not in {workdir.models}: "
        "run lokr-job fetch"
    )
    try:
        # Offline, huggingface_hub checks the snapshot holds every file the patterns match; fetch took only
        # what the model loads, so ask for the one file every such model has.
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=workdir.models,
            local_files_only=True,
            allow_patterns=[kind.index_file],
        )
    except LocalEntryNotFoundError:  # IncompleteSnapshotError included
        raise missing from None
    return str(folder)


def hub_base_model(job: JobConfig) -> str:
    """The base model's Hub repo id, for the model card: the source when it is one (or an ``hf://`` URI of
    a whole model repo), else the flavour's repo, which a local or S3 copy is assumed to be."""
    source = job.model_source
    if is_remote(source):
        uri = parse_uri(source)
        if uri.scheme == "hf" and uri.repo_type == "model" and not uri.path:
            return uri.repo_id
    elif is_hub_repo_id(source):
        return source
    return FLAVOUR_REPOS[job.model_flavour]
