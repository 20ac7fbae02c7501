"""A config set on S3 or the Hub: ``config.json`` and the files it names, copied into the work directory.

The files land in ``<workdir>/config/mirror/`` at their paths under the bucket or repo root, so the local
loader's two conventions (relative to the referring file, or to the folder holding ``config/``) find them
exactly where they sit remotely. Each referenced file is looked for remotely by those same rules.
``<workdir>/config/origin.json`` records the config URI and what was fetched: an unchanged file is not
downloaded again (one metadata request each), and a file no longer referenced is removed from the mirror.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import json5

from job.config.loader import FILE_KEYS, parse_overrides
from job.config.paths import RemoteOrigin, is_remote
from job.config.problems import Problems
from job.errors import ConfigError
from job.files import write_bytes_atomic
from job.storage import ObjectInfo, Storage, parse_uri, storage_for
from job.workdir import WorkDir

log = logging.getLogger("lokr")

ORIGIN_FILE = "origin.json"
MIRROR_DIR = "mirror"


def fetch_config(config_uri: str, workdir: WorkDir, overrides: list[str]) -> tuple[Path, RemoteOrigin]:
    """Fetch ``config_uri`` and the files it references (``overrides`` may name others); return the local
    ``config.json`` and the origin to hand to ``load_config``."""
    uri = parse_uri(config_uri)
    if not uri.is_remote or not uri.path:
        raise ConfigError(f"--config {config_uri}: expected s3://bucket/…/config.json or hf://…/config.json")
    root = str(replace(uri, path=""))
    mirror = workdir.config / MIRROR_DIR
    record = _read_record(workdir.config / ORIGIN_FILE)
    if record.get("root") != root:
        # Files fetched from another bucket or repo must never stand in for this one's.
        shutil.rmtree(mirror, ignore_errors=True)
        record = {}
    known: dict[str, dict[str, Any]] = record.get("files", {})
    origin = RemoteOrigin(root_uri=root, mirror=mirror)
    storage = storage_for(uri)

    config_path = mirror / uri.path
    info = storage.stat(uri)
    if info is None:
        raise ConfigError(f"--config {config_uri} does not exist; check the bucket/repo and the key")
    fetched = {uri.path: _fetch(storage, str(uri), info, config_path, known.get(uri.path))}

    missing = []
    for key, value in _references(config_path, overrides).items():
        looked = origin.remote_candidates(value, config_path)
        found = next(((u, i) for u in looked if (i := storage.stat(u)) is not None), None)
        if found is None:
            missing.append(f"{config_uri}: {key}: file {value!r} not found; looked in: {', '.join(looked)}")
            continue
        found_uri, found_info = found
        rel = parse_uri(found_uri).path
        fetched[rel] = _fetch(storage, found_uri, found_info, mirror / rel, known.get(rel))
    if missing:
        raise ConfigError(missing)

    _remove_unlisted(mirror, set(fetched))
    text = json.dumps({"config": config_uri, "root": root, "files": fetched}, indent=1, sort_keys=True)
    write_bytes_atomic(workdir.config / ORIGIN_FILE, text.encode())
    return config_path, origin


def _references(config_path: Path, overrides: list[str]) -> dict[str, str]:
    """The file-naming keys of config.json and ``--set``, leading ``--`` dropped. A file that does not
    parse names nothing: the loader reports it with file, line and column."""
    try:
        raw = json5.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = {}
    values = {str(k).removeprefix("--"): v for k, v in raw.items()} if isinstance(raw, dict) else {}
    values.update(parse_overrides(overrides, Problems()))  # a malformed one is the loader's to report
    # Only paths relative to the remote config are fetched: an absolute path is a mounted volume the loader
    # reads in place, and a URI is left for the loader to refuse.
    return {
        key: value
        for key in FILE_KEYS
        if isinstance(value := values.get(key), str) and value and not _absolute(value)
    }


def _absolute(value: str) -> bool:
    return is_remote(value) or value.startswith("file://") or Path(value).expanduser().is_absolute()


def _fetch(
    storage: Storage, uri: str, info: ObjectInfo, target: Path, known: dict[str, Any] | None
) -> dict[str, Any]:
    entry = {"size": info.size, "etag": info.etag}
    current = known == entry and info.etag is not None and target.is_file()
    if not current or target.stat().st_size != info.size:
        storage.download_file(uri, target)
        log.info("fetch: %s → %s", uri, target)
    return entry


def _remove_unlisted(mirror: Path, keep: set[str]) -> None:
    """A file the config no longer names could still be found by the loader's search: remove it."""
    for path in sorted(mirror.rglob("*"), reverse=True):
        rel = path.relative_to(mirror).as_posix()
        if path.is_file() and rel not in keep:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
