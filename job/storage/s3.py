"""S3 and S3-compatible stores (R2, MinIO, B2) through boto3: one GetObject per object below the multipart
threshold, its transfer manager for larger objects and for uploads.

Credentials come from boto3's standard chain (env, profile, instance role, IRSA), unless a store is built
with its own keys (a ``type: aws`` dataset's ``aws_access_key_id``/``aws_secret_access_key``): those go to
that store's session only, never to the environment the other stores read. ``AWS_ENDPOINT_URL``
is honoured by boto3 itself; ``endpoint_url``/``region`` override it (SimpleTuner's ``aws_endpoint_url``,
``aws_region_name``). botocore's own retries are switched off so that one policy (``job.storage.retry``)
decides, with the job's exit codes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import ClientError
from s3transfer.subscribers import BaseSubscriber

from job.errors import ConfigError, TransientError
from job.files import write_atomic
from job.settings import job_settings
from job.storage import retry
from job.storage.base import ObjectInfo, TransferReport, Versioned
from job.storage.s3_errors import REACH_BUCKET, classifier
from job.storage.sync import Manifest, TransferProgress, iter_upload_files, plan_download
from job.storage.uri import URI, Location, parse_uri

T = TypeVar("T")

_MISSING = object()


class _KnownObject(BaseSubscriber):
    """Hands the listing's size and ETag to s3transfer: no HeadObject per file, and ranged parts of a
    large object carry If-Match so a concurrent overwrite cannot be stitched into a corrupt file."""

    def __init__(self, size: int, etag: str | None):
        self._size, self._etag = size, etag

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        future.meta.provide_transfer_size(self._size)
        if self._etag:
            future.meta.provide_object_etag(f'"{self._etag}"')


class _Progress(BaseSubscriber):
    def __init__(self, progress: TransferProgress):
        self._progress = progress

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        self._progress.add_bytes(bytes_transferred)


class S3Storage:
    """One S3 endpoint and set of credentials. The client is built once, here: boto3 clients are
    thread-safe (its sessions are not), so every call and worker thread shares it."""

    def __init__(
        self,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_concurrency: int = 0,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
    ):
        # botocore reads AWS_DEFAULT_REGION only; the docs (and most platforms) set AWS_REGION.
        region = region or os.environ.get("AWS_REGION") or None
        # Explicit keys (or None: the chain). Kept off the environment so no other store picks them up.
        self._explicit_keys = bool(access_key_id)
        self._workers = max_concurrency or job_settings().s3_concurrency
        # Below s3transfer's multipart threshold an object is one GetObject either way (see _get_small).
        self._transfer = TransferConfig(max_concurrency=self._workers, preferred_transfer_client="classic")
        self._session = boto3.session.Session(
            region_name=region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            aws_session_token=session_token,
        )
        custom = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        options: dict[str, Any] = {
            "retries": {"mode": "standard", "total_max_attempts": 1},
            "max_pool_connections": self._workers * 2 + 4,
            "connect_timeout": 10,
            "read_timeout": 60,
        }
        if custom:
            # S3-compatible stores want path-style addressing, and several reject the CRC trailers
            # botocore sends by default since 1.36.
            options["s3"] = {"addressing_style": "path"}
            options["request_checksum_calculation"] = "when_required"
            options["response_checksum_validation"] = "when_required"
        self._client = self._session.client("s3", endpoint_url=endpoint_url or None, config=Config(**options))

    # -- plumbing -------------------------------------------------------------------------------------

    def _credential_source(self) -> str:
        if self._explicit_keys:
            return "the keys in the dataset's config (aws_access_key_id)"
        try:
            creds = self._session.get_credentials()
        except Exception:  # a broken profile must not hide the original error
            return "unknown (credential chain failed)"
        return creds.method if creds is not None else "none found"

    def _call(self, uri: URI, action: str, fn: Callable[[], T]) -> T:
        return retry.call(
            fn, what=f"{action} {uri}", classify=classifier(uri, action, self._credential_source)
        )

    @contextlib.contextmanager
    def _manager(self, sizes: Sequence[int] | None = None) -> Iterator[Any]:
        """s3transfer's manager, or None when every object in ``sizes`` is small enough for _get_small."""
        if sizes is not None and all(size < self._transfer.multipart_threshold for size in sizes):
            yield None
            return
        with create_transfer_manager(self._client, self._transfer) as manager:
            yield manager

    @staticmethod
    def _s3_uri(uri: Location) -> URI:
        parsed = parse_uri(uri)
        if parsed.scheme != "s3":
            raise ConfigError(f"{uri} is not an s3:// URI")
        return parsed

    @staticmethod
    def _object_key(uri: URI) -> str:
        if not uri.path:
            raise ConfigError(f"{uri} names a bucket, not an object")
        return uri.path

    # -- reading --------------------------------------------------------------------------------------

    def list(self, prefix: Location) -> list[ObjectInfo]:
        uri = self._s3_uri(prefix)
        key_prefix = f"{uri.path}/" if uri.path else ""

        def run() -> list[ObjectInfo]:
            found = []
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=uri.bucket, Prefix=key_prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    found.append(
                        ObjectInfo(
                            key=obj["Key"][len(key_prefix) :],
                            size=int(obj["Size"]),
                            etag=str(obj.get("ETag", "")).strip('"') or None,
                            mtime=obj["LastModified"].timestamp() if obj.get("LastModified") else None,
                        )
                    )
            return sorted(found, key=lambda o: o.key)

        return self._call(uri, "list", run)

    def stat(self, uri: Location) -> ObjectInfo | None:
        parsed = self._s3_uri(uri)
        key = self._object_key(parsed)

        def head() -> Any:
            try:
                return self._client.head_object(Bucket=parsed.bucket, Key=key)
            except ClientError as exc:
                if int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0) == 404:
                    return _MISSING
                raise

        found = self._call(parsed, "stat", head)
        if found is _MISSING:
            # A HEAD 404 has no body, so "no such key" and "no such bucket" look alike: ask the bucket.
            self._call(parsed, "open the bucket of", lambda: self._client.head_bucket(Bucket=parsed.bucket))
            return None
        return ObjectInfo(
            key=key,
            size=int(found["ContentLength"]),
            etag=str(found.get("ETag", "")).strip('"') or None,
            mtime=found["LastModified"].timestamp() if found.get("LastModified") else None,
        )

    def read_bytes(self, uri: Location) -> bytes:
        parsed = self._s3_uri(uri)
        key = self._object_key(parsed)
        # The body is read inside the attempt: a connection cut mid-body is retried like any other failure.
        return self._call(
            parsed, "read", lambda: self._client.get_object(Bucket=parsed.bucket, Key=key)["Body"].read()
        )

    def download_file(self, uri: Location, local_path: str | Path) -> ObjectInfo:
        parsed = self._s3_uri(uri)
        info = self.stat(parsed)
        if info is None:
            raise ConfigError(f"{parsed} does not exist")
        with self._manager([info.size]) as manager:
            self._fetch(manager, parsed, info, Path(local_path), None)
        return info

    def download_prefix(
        self,
        prefix_uri: Location,
        local_dir: str | Path,
        *,
        progress: bool = True,
        allow_patterns: Sequence[str] | None = None,
    ) -> TransferReport:
        uri = self._s3_uri(prefix_uri)
        dest = Path(local_dir)
        dest.mkdir(parents=True, exist_ok=True)
        manifest = Manifest(dest)
        todo, skipped = plan_download(
            self.list(uri), dest, manifest, source=str(uri), allow_patterns=allow_patterns
        )
        total = sum(o.size for o, _ in todo)
        shown = TransferProgress(f"fetch {uri}", files=len(todo), total_bytes=total, enabled=progress)

        def one(obj: ObjectInfo, target: Path) -> None:
            self._fetch(manager, uri.join(obj.key), obj, target, shown)
            manifest.record(obj.key, obj)

        try:
            with shown, self._manager([o.size for o, _ in todo]) as manager:
                self._run_all([lambda o=o, t=t: one(o, t) for o, t in todo])
        finally:
            manifest.save(str(uri))
        return TransferReport(transferred=len(todo), skipped=skipped, bytes=total)

    def _fetch(
        self, manager: Any, uri: URI, info: ObjectInfo, target: Path, shown: TransferProgress | None
    ) -> None:
        """``uri`` to ``target``, atomically: each attempt writes a temporary file beside it (``manager``
        renames its own temporary file over ours when complete), so the final name only ever holds a whole
        object and a failed attempt leaves nothing."""
        small = manager is None or info.size < self._transfer.multipart_threshold
        if small:

            def write(tmp: Path) -> None:
                self._get_small(uri, info, tmp)
        else:
            subscribers = [_KnownObject(info.size, info.etag)] + ([_Progress(shown)] if shown else [])

            def write(tmp: Path) -> None:
                manager.download(uri.bucket, uri.path, str(tmp), subscribers=subscribers).result()

        self._call(uri, "download", lambda: write_atomic(target, write, size=info.size))
        if shown is not None:
            shown.file_done(info.size if small else 0)  # a large one's bytes came through _Progress

    def _get_small(self, uri: URI, info: ObjectInfo, tmp: Path) -> None:
        """One GetObject streamed into ``tmp``: below the multipart threshold s3transfer sends the same
        request, but its futures and per-object bookkeeping cost more than the request itself (2,000 small
        objects: BENCHMARKS.md). If-Match on the listing's ETag, as s3transfer sends: an object replaced
        since the listing is a 412, never a mix of two versions under one manifest entry."""
        extra = {"IfMatch": f'"{info.etag}"'} if info.etag else {}
        body = self._client.get_object(Bucket=uri.bucket, Key=uri.path, **extra)["Body"]
        with open(tmp, "wb") as out:
            # botocore checks the bytes against Content-Length at the end: a cut body is retried.
            shutil.copyfileobj(body, out, 1 << 20)
            written = out.tell()
        if written != info.size:  # a store that ignores If-Match
            raise TransientError(f"{uri} changed while it was being downloaded; run again")

    def _run_all(self, tasks: Sequence[Callable[[], None]]) -> None:
        """Run tasks on a thread pool (many small objects are latency-bound); the first failure wins."""
        if not tasks:
            return
        pool = ThreadPoolExecutor(max_workers=min(self._workers, len(tasks)), thread_name_prefix="s3")
        try:
            futures = [pool.submit(task) for task in tasks]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in done:
                if future.exception() is not None:
                    raise future.exception()  # type: ignore[misc]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # -- writing --------------------------------------------------------------------------------------

    def write_bytes(self, uri: Location, data: bytes, *, commit_message: str | None = None) -> None:
        parsed = self._s3_uri(uri)
        key = self._object_key(parsed)
        self._call(parsed, "write", lambda: self._client.put_object(Bucket=parsed.bucket, Key=key, Body=data))

    def upload_file(
        self, local_path: str | Path, uri: Location, *, commit_message: str | None = None
    ) -> None:
        parsed = self._s3_uri(uri)
        self._object_key(parsed)
        with self._manager() as manager:
            self._put(manager, Path(local_path), parsed, None)

    def _put(self, manager: Any, path: Path, uri: URI, shown: TransferProgress | None) -> None:
        if not path.is_file():
            raise ConfigError(f"cannot upload {path}: not a file")
        subscribers = [_Progress(shown)] if shown is not None else []
        self._call(
            uri,
            "upload",
            lambda: manager.upload(str(path), uri.bucket, uri.path, subscribers=subscribers).result(),
        )
        if shown is not None:
            shown.file_done()

    def upload_folder(
        self,
        local_dir: str | Path,
        prefix_uri: Location,
        *,
        commit_message: str | None = None,
        progress: bool = True,
    ) -> TransferReport:
        uri = self._s3_uri(prefix_uri)
        src = Path(local_dir)
        if not src.is_dir():
            raise ConfigError(f"cannot upload {src}: not a folder")
        files = list(iter_upload_files(src))
        total = sum(p.stat().st_size for _, p in files)
        shown = TransferProgress(f"upload {uri}", files=len(files), total_bytes=total, enabled=progress)
        with shown, self._manager() as manager:
            self._run_all([lambda r=r, p=p: self._put(manager, p, uri.join(r), shown) for r, p in files])
        return TransferReport(transferred=len(files), bytes=total)

    # -- conditional writes (the run lease) ------------------------------------------------------------

    def read_versioned(self, uri: Location) -> Versioned | None:
        parsed = self._s3_uri(uri)
        key = self._object_key(parsed)

        def get() -> Versioned | None:
            try:
                answer = self._client.get_object(Bucket=parsed.bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "NoSuchKey":
                    return None
                raise
            # The ETag exactly as S3 sent it (quoted): If-Match compares it verbatim.
            return Versioned(answer["Body"].read(), str(answer["ETag"]))

        return self._call(parsed, "read", get)

    def create_exclusive(self, uri: Location, data: bytes) -> bool:
        return self._put_conditional(uri, data, IfNoneMatch="*")

    def replace_if(self, uri: Location, data: bytes, version: str) -> bool:
        return self._put_conditional(uri, data, IfMatch=version)

    def _put_conditional(self, uri: Location, data: bytes, **condition: str) -> bool:
        parsed = self._s3_uri(uri)
        key = self._object_key(parsed)

        def put() -> bool:
            try:
                self._client.put_object(Bucket=parsed.bucket, Key=key, Body=data, **condition)
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
                # 412: the condition failed (another writer won); for If-Match, a deleted object is a 404.
                # The classifier reads a 412 as "changed during a download", so it is answered here.
                if status == 412 or code == "PreconditionFailed":
                    return False
                if "IfMatch" in condition and code == "NoSuchKey":
                    return False
                if status == 409 and code == "ConditionalRequestConflict":
                    raise retry.Retryable(exc) from exc  # two conditional writes at once: S3 asks for a retry
                raise
            return True

        return self._call(parsed, "write", put)

    def check_writable(self, prefix: Location) -> None:
        """Prove write access under ``prefix`` without leaving an object behind (``lokr-job check``).

        HeadBucket proves the bucket exists and answers these credentials; a multipart upload, which
        needs s3:PutObject on the key, is then started and aborted at once: an aborted upload never
        becomes an object, holds no parts and costs nothing.
        """
        parsed = self._s3_uri(prefix)
        key = f"{parsed.path}/.lokr-check" if parsed.path else ".lokr-check"
        client = self._client
        self._call(parsed, REACH_BUCKET, lambda: client.head_bucket(Bucket=parsed.bucket))
        upload = self._call(
            parsed,
            "check write access to",
            lambda: client.create_multipart_upload(Bucket=parsed.bucket, Key=key),
        )
        self._call(
            parsed,
            "abort the write check's upload in",
            lambda: client.abort_multipart_upload(Bucket=parsed.bucket, Key=key, UploadId=upload["UploadId"]),
        )

    def delete(self, uri: Location) -> None:
        parsed = self._s3_uri(uri)
        key = self._object_key(parsed)
        keys = [f"{key}/{o.key}" for o in self.list(parsed)] + [key]
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]

            def remove(batch: list[str] = batch) -> None:
                answer = self._client.delete_objects(
                    Bucket=parsed.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
                errors = answer.get("Errors") or []
                if errors:
                    first = errors[0]
                    fake = {"Error": first, "ResponseMetadata": {"HTTPStatusCode": 0}}
                    raise ClientError(fake, "DeleteObjects")  # type: ignore[arg-type]

            self._call(parsed, "delete", remove)
