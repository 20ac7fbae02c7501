"""The base model into the work directory.

A Hub repo id goes into huggingface_hub's cache under ``<workdir>/models/`` (what ``from_pretrained`` and
offline lookups read); an ``s3://``/``hf://`` diffusers folder is mirrored to its own folder there; a local
folder is used where it is. Either way only what diffusers loads is fetched: ``model_index.json`` and each
component's configs, tokenizer files and safetensors weights, never the ``.bin``/``.ckpt`` duplicates nor a
single-file checkpoint beside them.
"""

from __future__ import annotations

import glob
import logging
import posixpath
import re
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from job.config.paths import is_remote
from job.config.schema import JobConfig
from job.errors import ConfigError
from job.model.source import (
    BASE_MODEL,
    EVALUATION_MODEL,
    PREVIEW_MODEL,
    ModelKind,
    is_hub_repo_id,
    mirror_dir,
)
from job.storage import parse_uri, storage_for
from job.workdir import WorkDir

log = logging.getLogger("lokr")

# Configs, tokenizer vocabularies (tokenizer.json, spiece.model, merges.txt) and weights.
_KEPT_SUFFIXES = (".json", ".txt", ".model", ".safetensors")
_SHARD = r"(-\d{5}-of-\d{5})?"
_PLAIN_WEIGHTS = re.compile(rf"^[^.]+{_SHARD}\.safetensors$")
# diffusers' variants: diffusion_pytorch_model.fp16.safetensors, ….fp16-00001-of-00002.safetensors and
# diffusion_pytorch_model.safetensors.index.fp16.json.
_VARIANT_FILES = re.compile(rf"^[^.]+\.\w+{_SHARD}\.safetensors$|^[^.]+\.safetensors\.index\.\w+\.json$")


def diffusers_files(keys: Iterable[str]) -> list[str]:
    """The files of a diffusers folder that ``from_pretrained`` loads, from a listing (paths relative to
    the folder). A folder without ``model_index.json`` is taken as one component (a transformer alone).
    A variant (fp16) copy of the weights is kept only where a component has no plain weights."""
    keys = list(keys)
    has_index = "model_index.json" in keys
    by_component: dict[str, list[str]] = {}
    for key in keys:
        folder, name = posixpath.split(key)
        # Components are the direct subfolders of a pipeline, or the root of a lone component.
        is_component = (bool(folder) and "/" not in folder) if has_index else not folder
        if is_component and name.endswith(_KEPT_SUFFIXES) and ".bin." not in name:
            by_component.setdefault(folder, []).append(key)
    chosen = ["model_index.json"] if has_index else []
    for files in by_component.values():
        names = [posixpath.basename(f) for f in files]
        plain = any(_PLAIN_WEIGHTS.match(n) for n in names)
        chosen += [f for f, n in zip(files, names, strict=True) if not (plain and _VARIANT_FILES.match(n))]
    return sorted(chosen)


def fetch_model(job: JobConfig, workdir: WorkDir, *, progress: bool = True) -> None:
    source = job.model_source
    if not _fetch_if_remote(BASE_MODEL, source, job.revision, workdir, progress):
        log.info("fetch: base model %s is local; nothing to fetch", source)


def fetch_helper_models(job: JobConfig, workdir: WorkDir, *, progress: bool = True) -> None:
    """The models besides the base model that the config asks for, as the base model is fetched: the CLIP
    model (``evaluation_type: clip``) and the Tiny AutoEncoder (``validation_preview``)."""
    wanted = (
        (EVALUATION_MODEL, job.evaluation_type == "clip", job.pretrained_evaluation_model_name_or_path),
        (PREVIEW_MODEL, job.validation_preview, job.validation_preview_model),
    )
    for kind, needed, source in wanted:
        if not needed:
            continue
        if _fetch_if_remote(kind, source, None, workdir, progress):
            continue
        if not (Path(source).expanduser() / kind.index_file).is_file():
            raise ConfigError(f"{kind.key} {source!r}: {kind.expected}")
        log.info("fetch: %s %s is local; nothing to fetch", kind.what, source)


def _fetch_if_remote(
    kind: ModelKind, source: str, revision: str | None, workdir: WorkDir, progress: bool
) -> bool:
    """Fetch ``source`` into the work directory when it is a URI or a Hub repo id; False: a local path."""
    if is_remote(source):
        _mirror_folder(source, workdir, progress, kind=kind)
    elif is_hub_repo_id(source):
        _fetch_hub_repo(source, revision, workdir, progress, kind=kind)
    else:
        return False
    return True


def _mirror_folder(source: str, workdir: WorkDir, progress: bool, *, kind: ModelKind) -> None:
    storage = storage_for(source)
    files = diffusers_files(o.key for o in storage.list(source))
    if not files:
        raise ConfigError(f"{kind.key} {source}: {kind.expected}")
    dest = mirror_dir(source, workdir)
    # The exact names as patterns: a model folder holds tens of files, so matching stays cheap.
    report = storage.download_prefix(
        source, dest, progress=progress, allow_patterns=[glob.escape(f) for f in files]
    )
    log.info(
        "fetch: %s %s → %s (%d files, %d bytes fetched; %d up to date)",
        kind.what,
        source,
        dest,
        report.transferred,
        report.bytes,
        report.skipped,
    )


def _fetch_hub_repo(
    repo_id: str, revision: str | None, workdir: WorkDir, progress: bool, *, kind: ModelKind
) -> None:
    from job.storage.hub import HubStorage

    repo = replace(parse_uri(f"hf://{repo_id}"), revision=revision)
    storage = HubStorage()
    files = diffusers_files(o.key for o in storage.list(repo))
    if kind.index_file not in files:
        raise ConfigError(
            f"{kind.key} {repo_id}: the Hub repo{f' at {revision}' if revision else ''} has no "
            f"{kind.index_file}: {kind.expected}"
        )
    folder = storage.download_to_cache(repo, files, workdir.models, progress=progress)
    log.info("fetch: %s %s → %s (%d files)", kind.what, repo, folder, len(files))
