"""Benchmark fetching many small objects: ``download_prefix`` (what ``lokr-job fetch`` uses) against a
sequential boto3 ``get_object`` loop over the same objects.

    python scripts/bench_fetch.py [--objects 2000] [--size 4096] [--latency-ms 0 20] [--repeats 3]
        [--no-append]

moto's S3 server runs in its own process (as a real store would), seeded with ``--objects`` random objects
of ``--size`` bytes. For each ``--latency-ms`` value the clients talk to it through the test suite's proxy
(``tests/servers/s3.py``, in a third process), which adds that much latency to every request: 0 measures
the local CPU cost alone, 20 ms is roughly an S3 round trip from a cloud GPU box. All three processes
share this machine's cores, so a small machine measures its CPU more than the fetch's concurrency. Per setting: the sequential loop (listing
not timed, each body written to a file), ``S3Storage.download_prefix`` into an empty folder (its listing
timed), and a second ``download_prefix`` (nothing to move). Each runs ``--repeats`` times and the fastest
counts. Prints a table and appends it to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
from benchmarks import append_section
from botocore.config import Config

from job.storage.s3 import S3Storage

REPO = Path(__file__).resolve().parents[1]
# The tests' proxy, run in a process of its own so its work does not compete with the clients' threads.
_PROXY = """
import sys, time
sys.path.insert(0, {tests!r})
from servers.s3 import FaultProxy
proxy = FaultProxy({upstream!r}).start()
proxy.faults.configure(delay={delay!r})
print(proxy.url, flush=True)
time.sleep(1e9)
"""

BUCKET = "bench-fetch"
PREFIX = "data"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--size", type=int, default=4096, help="bytes per object")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 20.0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the fastest counts")
    parser.add_argument("--no-append", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()

    _isolate_credentials()
    moto, moto_url = _start_moto()
    try:
        _seed(moto_url, args.objects, args.size)
        rows = [_measure(moto_url, latency, args.objects, args.repeats) for latency in args.latency_ms]
    finally:
        moto.terminate()
        moto.wait(timeout=10)
    table = _table(rows, args.objects, args.size)
    print(table)
    if not args.no_append:
        _append(table, sys.argv[1:])


def _isolate_credentials() -> None:
    """Fake keys, and never the developer's ~/.aws or an instance metadata service."""
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
    )
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(key, None)


def _start_moto() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
            return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("moto's server did not start within 60 s")


def _client(endpoint: str) -> Any:
    config = Config(s3={"addressing_style": "path"}, max_pool_connections=64)
    return boto3.client("s3", endpoint_url=endpoint, config=config)


def _seed(moto_url: str, count: int, size: int) -> None:
    client = _client(moto_url)
    client.create_bucket(Bucket=BUCKET)
    with ThreadPoolExecutor(32) as pool:
        list(
            pool.map(
                lambda i: client.put_object(Bucket=BUCKET, Key=_key(i), Body=os.urandom(size)), range(count)
            )
        )


def _key(index: int) -> str:
    return f"{PREFIX}/{index // 100:03d}/img-{index:05d}.jpg"


def _start_proxy(moto_url: str, latency_ms: float) -> tuple[subprocess.Popen[str], str]:
    code = _PROXY.format(tests=str(REPO / "tests"), upstream=moto_url, delay=latency_ms / 1000)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


def _measure(moto_url: str, latency_ms: float, count: int, repeats: int) -> dict[str, float]:
    proxy, proxy_url = _start_proxy(moto_url, latency_ms)
    os.environ["AWS_ENDPOINT_URL"] = proxy_url
    try:
        client = _client(proxy_url)
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{PREFIX}/")
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        assert len(keys) == count, f"expected {count} objects, listed {len(keys)}"

        def sequential(dest: Path) -> None:
            for key in keys:
                body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
                target = dest / key
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(body)

        def ours(dest: Path) -> None:
            report = S3Storage().download_prefix(f"s3://{BUCKET}/{PREFIX}", dest, progress=False)
            assert report.transferred == count

        def again(dest: Path) -> None:
            report = S3Storage().download_prefix(f"s3://{BUCKET}/{PREFIX}", dest, progress=False)
            assert report.transferred == 0 and report.skipped == count

        loop, _ = _fastest(sequential, repeats)
        fetch, second = _fastest(ours, repeats, keep=again)
        return {"latency_ms": latency_ms, "sequential": loop, "fetch": fetch, "again": second}
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)


def _fastest(
    run: Callable[[Path], None], repeats: int, keep: Callable[[Path], None] | None = None
) -> tuple[float, float]:
    """The fastest of ``repeats`` runs into a fresh folder, and of ``keep`` run again on that folder."""
    best, best_again = float("inf"), float("inf")
    for _ in range(repeats):
        dest = Path(tempfile.mkdtemp(prefix="bench-fetch-"))
        try:
            started = time.perf_counter()
            run(dest)
            best = min(best, time.perf_counter() - started)
            if keep is not None:
                started = time.perf_counter()
                keep(dest)
                best_again = min(best_again, time.perf_counter() - started)
        finally:
            shutil.rmtree(dest, ignore_errors=True)
    return best, best_again


def _table(rows: list[dict[str, float]], count: int, size: int) -> str:
    lines = [
        f"{count} objects × {size} B; moto and a proxy adding latency to each request, each in its own process.",
        "",
        "| added latency | sequential get_object loop | download_prefix | ratio | second fetch (0 bytes) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['latency_ms']:g} ms | {row['sequential']:.2f} s ({count / row['sequential']:,.0f}/s) "
            f"| {row['fetch']:.2f} s ({count / row['fetch']:,.0f}/s) "
            f"| {row['sequential'] / row['fetch']:.1f}× | {row['again']:.2f} s |"
        )
    return "\n".join(lines)


def _append(table: str, argv: list[str]) -> None:
    append_section(
        "Fetching many small objects from S3 (moto)",
        "bench_fetch.py",
        argv,
        f"boto3 {boto3.__version__}",
        table,
    )


if __name__ == "__main__":
    main()
