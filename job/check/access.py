"""Credentials and access for ``lokr-job check``, proven without changing anything anywhere.

- remote datasets and a remote base model: listed under their prefix (read access);
- the run URI: a local folder must be creatable; on S3 the bucket must answer HeadBucket and accept a
  multipart upload that is aborted at once (``S3Storage.check_writable``: no object is written); on the
  Hub, as for ``hub_model_id`` below;
- ``hub_model_id`` with ``push_to_hub``: ``whoami`` names the token's user, orgs and role; the repo must
  exist or its namespace must be the user or one of their orgs, and a read-only token is refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from job.config.loader import ResolvedConfig
from job.config.paths import is_remote
from job.data.location import is_fetched
from job.errors import ConfigError, ExitCode, JobError, PermissionDeniedError
from job.fetch.datasets import dataset_uri, s3_options
from job.model.source import is_hub_repo_id
from job.storage import parse_uri, storage_for

if TYPE_CHECKING:
    from huggingface_hub import HfApi

T = TypeVar("T")


@dataclass(frozen=True)
class Access:
    what: str  # "dataset 'x'", "base model", "run URI", "hub_model_id"
    uri: str
    ok: bool
    detail: str
    exit_code: int = int(ExitCode.OK)
    objects: list[str] | None = None  # what a listing found (census of data not fetched yet)
    sizes: dict[str, int] | None = None  # bytes of each listed object (the disk estimate)


# What a command's access checks cover: the inputs it reads (datasets, base model), the run URI it writes,
# the Hub repo it pushes to. ``check`` and ``run`` need all three; a stage run alone needs its own.
AccessNeed = Literal["inputs", "run_uri", "hub"]
EVERYTHING: frozenset[AccessNeed] = frozenset(("inputs", "run_uri", "hub"))


def check_access(
    cfg: ResolvedConfig, run_uri: str | None, needs: frozenset[AccessNeed] = EVERYTHING
) -> list[Access]:
    """The access checks for ``needs``, cheapest and most often failing first: the run URI and the Hub
    token answer in one request each, a dataset listing may take many."""
    results: list[Access] = []
    if run_uri and "run_uri" in needs:
        results.append(_writable_run_uri(run_uri))
    job = cfg.job
    if job.push_to_hub and job.hub_model_id and "hub" in needs:
        results.append(_hub_writable("hub_model_id", job.hub_model_id))
    if "inputs" in needs:
        results += _inputs_readable(cfg)
    return results


def _inputs_readable(cfg: ResolvedConfig) -> list[Access]:
    results: list[Access] = []
    for dataset in cfg.backends:
        if is_fetched(dataset) and dataset.type != "huggingface":
            uri = dataset_uri(dataset)
            options = s3_options(dataset) if uri.startswith("s3://") else {}
            results.append(_readable(f"dataset {dataset.id!r}", uri, options))
        elif dataset.type == "huggingface":
            uri = f"hf://datasets/{dataset.dataset_name}" + (
                f"@{dataset.revision}" if dataset.revision else ""
            )
            results.append(_readable(f"dataset {dataset.id!r}", uri, {}))
    results.append(_base_model(cfg))
    return results


def _readable(what: str, uri: str, options: dict[str, Any]) -> Access:
    try:
        objects = storage_for(uri, **options).list(uri)
    except JobError as exc:
        return Access(what, uri, False, exc.message, int(exc.exit_code))
    if not objects:
        return Access(what, uri, False, "readable, but nothing is there", int(ExitCode.BAD_CONFIG), [])
    keys = [o.key for o in objects]
    sizes = {o.key: o.size for o in objects}
    return Access(what, uri, True, f"readable: {len(objects)} objects", objects=keys, sizes=sizes)


def _base_model(cfg: ResolvedConfig) -> Access:
    job = cfg.job
    source = job.model_source
    if is_remote(source):
        return _readable("base model", source, {})
    folder = Path(source).expanduser()
    if folder.is_dir():
        if (folder / "model_index.json").is_file():
            return Access("base model", source, True, "local diffusers folder")
        return Access("base model", source, False, "no model_index.json in it", int(ExitCode.BAD_CONFIG))
    if not is_hub_repo_id(source):
        return Access(
            "base model", source, False, "not a folder, URI or Hub repo id", int(ExitCode.BAD_CONFIG)
        )
    uri = f"hf://{source}" + (f"@{job.revision}" if job.revision else "")
    try:
        info = _hub(
            uri, "read", lambda api: api.model_info(source, revision=job.revision, files_metadata=True)
        )
    except JobError as exc:
        return Access("base model", uri, False, exc.message, int(exc.exit_code))
    gated = f", gated ({info.gated}): the token has access" if getattr(info, "gated", False) else ""
    sizes = {f.rfilename: f.size or 0 for f in info.siblings or []}
    return Access("base model", uri, True, f"Hub repo visible at {str(info.sha)[:12]}{gated}", sizes=sizes)


def _writable_run_uri(run_uri: str) -> Access:
    try:
        uri = parse_uri(run_uri)
    except ConfigError as exc:
        return Access("run URI", run_uri, False, exc.message, int(exc.exit_code))
    if uri.scheme == "s3":
        try:
            from job.storage.s3 import S3Storage

            S3Storage().check_writable(run_uri)
        except JobError as exc:
            return Access("run URI", run_uri, False, exc.message, int(exc.exit_code))
        return Access(
            "run URI", run_uri, True, "bucket reachable; s3:PutObject allowed (upload started, aborted)"
        )
    if uri.scheme == "hf":
        return _hub_writable("run URI", uri.repo_id, repo_type=uri.repo_type, shown=run_uri)
    return _local_writable(Path(uri.path))


def _local_writable(folder: Path) -> Access:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return Access("run URI", str(folder), True, f"writable (under {existing})")
    return Access(
        "run URI", str(folder), False, f"{existing} is not a writable folder", int(ExitCode.NO_PERMISSION)
    )


def _hub_writable(what: str, repo_id: str, *, repo_type: str = "model", shown: str | None = None) -> Access:
    from huggingface_hub import get_token

    shown = shown or repo_id
    uri = f"hf://{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    no_token = "no usable Hub token (set HF_TOKEN)"
    if not get_token():
        return Access(what, shown, False, no_token, int(ExitCode.NO_PERMISSION))
    try:
        me = _hub(uri, "check the token for", lambda api: api.whoami())
    except PermissionDeniedError as exc:
        return Access(what, shown, False, f"{no_token}: {exc.message}", int(exc.exit_code))
    except JobError as exc:
        return Access(what, shown, False, exc.message, int(exc.exit_code))
    token = (me.get("auth") or {}).get("accessToken") or {}
    role = token.get("role", "unknown")
    user = me.get("name", "?")
    if role == "read":
        return Access(what, shown, False, f"the token of {user!r} is read-only; use a write token", 4)
    try:
        exists = _hub(uri, "look up", lambda api: api.repo_exists(repo_id, repo_type=repo_type))
    except JobError as exc:
        return Access(what, shown, False, exc.message, int(exc.exit_code))
    namespace = repo_id.split("/")[0]
    orgs = {org.get("name") for org in me.get("orgs") or []}
    if not exists and namespace != user and namespace not in orgs:
        return Access(
            what,
            shown,
            False,
            f"{repo_id} does not exist and {user!r} cannot create it: {namespace!r} is neither the user "
            f"nor one of their organisations ({', '.join(sorted(o for o in orgs if o)) or 'none'})",
            4,
        )
    state = "exists" if exists else "will be created"
    scope = " (fine-grained: its repo scopes are checked at the first push)" if role == "fineGrained" else ""
    return Access(what, shown, True, f"{state}; token of {user!r}, role {role}{scope}")


def _hub(uri: str, action: str, ask: Callable[[HfApi], T]) -> T:
    """One Hub API call with the Hub store's retries and exit codes: refused connections, DNS failures,
    timeouts and 5xx/429 are retried, then 75; 401/403 and a missing token are 4; a missing repo is 2."""
    from job.storage.hub import HubStorage

    return HubStorage().call(uri, action, ask)
