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
from dataclasses import dataclass
from pathlib import Path

from job.config.loader import ResolvedConfig
from job.config.paths import is_remote
from job.data.location import is_fetched
from job.errors import ExitCode, JobError, PermissionDeniedError
from job.fetch.datasets import dataset_uri
from job.model.source import is_hub_repo_id
from job.storage import parse_uri, storage_for


@dataclass(frozen=True)
class Access:
    what: str  # "dataset 'x'", "base model", "run URI", "hub_model_id"
    uri: str
    ok: bool
    detail: str
    exit_code: int = int(ExitCode.OK)
    objects: list[str] | None = None  # what a listing found (census of data not fetched yet)


def check_access(cfg: ResolvedConfig, run_uri: str | None) -> list[Access]:
    results: list[Access] = []
    for dataset in cfg.datasets:
        if is_fetched(dataset) and dataset.type != "huggingface":
            uri = dataset_uri(dataset)
            options = (
                {"endpoint_url": dataset.aws_endpoint_url, "region": dataset.aws_region_name}
                if uri.startswith("s3://")
                else {}
            )
            results.append(_readable(f"dataset {dataset.id!r}", uri, options))
        elif dataset.type == "huggingface":
            uri = f"hf://datasets/{dataset.dataset_name}" + (
                f"@{dataset.revision}" if dataset.revision else ""
            )
            results.append(_readable(f"dataset {dataset.id!r}", uri, {}))
    results.append(_base_model(cfg))
    if run_uri:
        results.append(_writable_run_uri(run_uri))
    job = cfg.job
    if job.push_to_hub and job.hub_model_id:
        results.append(_hub_writable("hub_model_id", job.hub_model_id))
    return results


def _readable(what: str, uri: str, options: dict[str, str | None]) -> Access:
    try:
        objects = storage_for(uri, **options).list(uri)
    except JobError as exc:
        return Access(what, uri, False, exc.message, int(exc.exit_code))
    if not objects:
        return Access(what, uri, False, "readable, but nothing is there", int(ExitCode.BAD_CONFIG), [])
    return Access(what, uri, True, f"readable: {len(objects)} objects", objects=[o.key for o in objects])


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
        from huggingface_hub import HfApi

        info = HfApi(endpoint=os.environ.get("HF_ENDPOINT")).model_info(source, revision=job.revision)
    except Exception as exc:
        return Access("base model", uri, False, _hub_problem(exc), _hub_exit_code(exc))
    gated = f", gated ({info.gated}): the token has access" if getattr(info, "gated", False) else ""
    return Access("base model", uri, True, f"Hub repo visible at {str(info.sha)[:12]}{gated}")


def _writable_run_uri(run_uri: str) -> Access:
    uri = parse_uri(run_uri)
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
    from huggingface_hub import HfApi

    shown = shown or repo_id
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"))
    try:
        me = api.whoami()
    except Exception as exc:
        code = _hub_exit_code(exc)
        reason = (
            "no usable Hub token (set HF_TOKEN)"
            if code == ExitCode.NO_PERMISSION
            else "the Hub did not answer"
        )
        return Access(what, shown, False, f"{reason}: {_hub_problem(exc)}", code)
    token = (me.get("auth") or {}).get("accessToken") or {}
    role = token.get("role", "unknown")
    user = me.get("name", "?")
    if role == "read":
        return Access(what, shown, False, f"the token of {user!r} is read-only; use a write token", 4)
    try:
        exists = api.repo_exists(repo_id, repo_type=repo_type)
    except Exception as exc:
        return Access(what, shown, False, _hub_problem(exc), _hub_exit_code(exc))
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


def _hub_problem(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


def _hub_exit_code(exc: Exception) -> int:
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if isinstance(exc, GatedRepoError | PermissionDeniedError):
        return int(ExitCode.NO_PERMISSION)
    if isinstance(exc, RepositoryNotFoundError):
        return int(ExitCode.BAD_CONFIG)
    if (
        isinstance(exc, HfHubHTTPError)
        and exc.response is not None
        and exc.response.status_code in (401, 403)
    ):
        return int(ExitCode.NO_PERMISSION)
    return int(ExitCode.TRANSIENT)
