"""Remote caches: the warmed latent and text caches as a few shard files, shared between machines.

Where: ``cache_uri`` in config.json, any URI (``s3://…``, ``hf://…``, a path), or the word ``run`` for
``<run_uri>/cache``. Unset: no remote caches.

What: one uncompressed tar per cache folder (each dataset's latents, the text embeddings; safetensors do not
compress), plus ``shards.json`` naming each shard with its size and sha256, written last: a reader that
finds the index finds whole shards. Thousands of small cache entries become a handful of large objects,
which object stores move at full bandwidth.

When: ``download_caches`` before warm unpacks each shard whose cache folder has no index yet (a fresh
machine), so warm finds everything cached and never loads the VAE or the text encoder. ``upload_caches``
after warm sends the shards when warm encoded something or the remote has none. The caches are
content-addressed, so a shard is valid for any config whose keys it holds; warm encodes only what is
missing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from job.cache import layout
from job.cache.report import WarmReport
from job.cache.store import INDEX_NAME
from job.config.loader import ResolvedConfig
from job.context import JobContext
from job.files import sha256_file
from job.lease import fence
from job.redact import redact
from job.storage import join, storage_for
from job.workdir import WorkDir

log = logging.getLogger("lokr")

SHARD_INDEX = "shards.json"
RUN_KEYWORD = "run"


@dataclass(frozen=True)
class CacheFolder:
    shard: str  # the shard's file name at the cache URI
    path: Path  # the local cache folder it packs


def cache_uri(setting: str | None, run_uri: str | None) -> str | None:
    """The remote cache location for ``cache_uri`` ``setting``, or None when remote caches are off (see
    the module docstring)."""
    if not setting:
        return None
    if setting == RUN_KEYWORD:
        return join(run_uri, "cache") if run_uri else None
    return setting


def cache_folders(config: ResolvedConfig, workdir: WorkDir) -> list[CacheFolder]:
    """Each local cache folder once (datasets may share one), with its shard's name."""
    folders: dict[Path, str] = {}
    for dataset in config.datasets:
        folders.setdefault(layout.latent_dir(workdir, dataset), f"latents-{layout.safe_name(dataset.id)}.tar")
    folders.setdefault(layout.text_dir(workdir, config.text_embeds), "text.tar")
    return [CacheFolder(shard=name, path=path) for path, name in folders.items()]


def download_caches(ctx: JobContext) -> int:
    """Unpack the remote shards whose local folder has no cache index; return how many were unpacked."""
    uri = cache_uri(ctx.config.job.cache_uri, ctx.run_uri)
    if uri is None:
        return 0
    storage = storage_for(uri)
    index_uri = join(uri, SHARD_INDEX)
    if storage.stat(index_uri) is None:
        log.info("cache: no shards at %s yet; warm fills the caches here", redact(uri))
        return 0
    shards = json.loads(storage.read_bytes(index_uri))["shards"]
    started, unpacked = time.perf_counter(), 0
    for folder in cache_folders(ctx.config, ctx.workdir):
        entry = shards.get(folder.shard)
        if entry is None or (folder.path / INDEX_NAME).exists():
            continue
        folder.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder.path.parent, prefix=".shard-") as temp:
            archive = Path(temp) / folder.shard
            storage.download_file(join(uri, folder.shard), archive)
            if archive.stat().st_size != entry["size"] or sha256_file(archive) != entry["sha256"]:
                log.warning("cache: shard %s does not match %s; warm rebuilds it", folder.shard, SHARD_INDEX)
                continue
            unpacked_dir = Path(temp) / "unpacked"
            with tarfile.open(archive) as tar:
                tar.extractall(unpacked_dir, filter="data")
            _merge_into(unpacked_dir, folder.path)
        unpacked += 1
    log.info(
        "cache: %d shards unpacked from %s in %.1f s", unpacked, redact(uri), time.perf_counter() - started
    )
    return unpacked


def upload_caches(ctx: JobContext, report: WarmReport) -> int:
    """Pack and upload the cache folders when warm wrote or adopted something (latents training encoded
    on demand) or the remote has no shards yet; return how many shards were uploaded."""
    uri = cache_uri(ctx.config.job.cache_uri, ctx.run_uri)
    if uri is None:
        return 0
    storage = storage_for(uri)
    index_uri = join(uri, SHARD_INDEX)
    if not report.changed and storage.stat(index_uri) is not None:
        return 0
    fence(f"cache shards in {redact(uri)}")  # a process that lost the run lease writes nothing more
    started = time.perf_counter()
    shards: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(dir=ctx.workdir.cache, prefix=".shards-") as temp:
        for folder in cache_folders(ctx.config, ctx.workdir):
            if not (folder.path / INDEX_NAME).exists():
                continue
            archive = Path(temp) / folder.shard
            with tarfile.open(archive, "w") as tar:
                # Sorted, owner-free entries: the same cache packs to the same bytes.
                for path in sorted(p for p in folder.path.rglob("*") if p.is_file()):
                    tar.add(path, arcname=path.relative_to(folder.path).as_posix(), filter=_anonymous)
            storage.upload_file(archive, join(uri, folder.shard), commit_message=f"lokr-job: {folder.shard}")
            shards[folder.shard] = {"size": archive.stat().st_size, "sha256": sha256_file(archive)}
    storage.write_bytes(
        index_uri,
        (json.dumps({"format": 1, "shards": shards}, indent=1) + "\n").encode(),
        commit_message="lokr-job: cache shards",
    )
    log.info(
        "cache: %d shards uploaded to %s in %.1f s", len(shards), redact(uri), time.perf_counter() - started
    )
    return len(shards)


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    return info


def _merge_into(source: Path, target: Path) -> None:
    """Move every file of ``source`` into ``target`` (atomic renames: same filesystem), the index last, so
    an interrupted merge leaves entries that the next warm adopts and no index that claims too much."""
    target.mkdir(parents=True, exist_ok=True)
    index = source / INDEX_NAME
    for path in sorted(p for p in source.rglob("*") if p.is_file() and p != index):
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)
    if index.exists():
        os.replace(index, target / INDEX_NAME)
    shutil.rmtree(source, ignore_errors=True)
