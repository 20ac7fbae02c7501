"""Benchmark fetching many small objects from S3: lokr-job's fetch path against a sequential boto3
``get_object`` loop over the same objects, paired and interleaved.

    python scripts/bench_fetch.py [--objects 2000] [--size 4096] [--rounds 5] [--latency-ms 0]
        [--no-append]

moto's S3 server runs in its own process (as a real store would), seeded with ``--objects`` random objects
of ``--size`` bytes. With ``--latency-ms`` above 0 the clients reach it through the test suite's proxy
(``tests/servers/s3.py``, a third process) that adds that much to every request; at 0 they talk to moto
directly. Each round runs, in this order, into fresh folders:

- A, in-process: list the prefix, then ``get_object`` each key and write its body to a file, one by one.
- B, in-process: ``storage_for(uri, endpoint_url=…).download_prefix`` (what ``lokr-job fetch`` calls).
- A, whole process: the same loop in a fresh ``python`` process (boto3's import and client included).
- B, whole process: ``lokr-job fetch`` of a config whose one dataset is the prefix (``type: aws``), the
  tiny model local, so the process fetches the dataset only; start-up, config and logging included.

Each pair's ratio is A/B; the table gives the median and range over ``--rounds`` rounds. All processes
share this machine's cores, so a small machine measures its CPU more than the fetch's concurrency.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
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
import psutil
from benchmarks import append_section
from botocore.config import Config

from job.storage import storage_for
from job.tiny import write_tiny_job

REPO = Path(__file__).resolve().parents[1]
GOAL = 4.0
BUCKET = "bench-fetch"
PREFIX = "data"
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
# A: what someone without lokr-job would write. argv: endpoint, destination folder.
_SEQUENTIAL = """
import sys
from pathlib import Path
import boto3
from botocore.config import Config
client = boto3.client("s3", endpoint_url=sys.argv[1], config=Config(s3={{"addressing_style": "path"}}))
dest = Path(sys.argv[2])
pages = client.get_paginator("list_objects_v2").paginate(Bucket={bucket!r}, Prefix={prefix!r})
for key in [o["Key"] for page in pages for o in page.get("Contents", [])]:
    target = dest / key
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(client.get_object(Bucket={bucket!r}, Key=key)["Body"].read())
""".format(bucket=BUCKET, prefix=f"{PREFIX}/")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--size", type=int, default=4096, help="bytes per object")
    parser.add_argument("--rounds", type=int, default=5, help="A B A B rounds (at least 5 for a figure)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every request by a proxy")
    parser.add_argument("--no-append", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()

    _isolate_credentials()
    scratch = Path(tempfile.mkdtemp(prefix="bench-fetch-"))
    moto, moto_url = _start_moto()
    proxy = None
    try:
        _seed(moto_url, args.objects, args.size)
        endpoint = moto_url
        if args.latency_ms > 0:
            proxy, endpoint = _start_proxy(moto_url, args.latency_ms)
        config = _fetch_config(scratch / "job", endpoint)
        times = _rounds(endpoint, config, scratch, args.objects, args.rounds, psutil.Process(moto.pid))
    finally:
        for process in (proxy, moto):
            if process is not None:
                process.terminate()
                process.wait(timeout=10)
        shutil.rmtree(scratch, ignore_errors=True)
    table = _table(times, args)
    print(table)
    if not args.no_append:
        append_section(
            "Fetching many small objects from S3 (moto), paired A B A B",
            "bench_fetch.py",
            sys.argv[1:],
            f"boto3 {boto3.__version__}",
            table,
        )


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
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
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
    return boto3.client("s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}))


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


def _fetch_config(folder: Path, endpoint: str) -> Path:
    """The tiny job with its dataset replaced by the seeded prefix: ``lokr-job fetch`` then moves only it."""
    config = write_tiny_job(folder)
    backends = json.loads((config.parent / "multidatabackend.json").read_text())
    backends[0] = {
        **{k: v for k, v in backends[0].items() if k not in ("type", "instance_data_dir")},
        "type": "aws",
        "aws_bucket_name": BUCKET,
        "aws_data_prefix": f"{PREFIX}/",
        "aws_endpoint_url": endpoint,
    }
    (config.parent / "multidatabackend.json").write_text(json.dumps(backends, indent=2))
    return config


def _rounds(
    endpoint: str, config: Path, scratch: Path, count: int, rounds: int, server: psutil.Process
) -> dict[str, list[float]]:
    client = _client(endpoint)
    uri = f"s3://{BUCKET}/{PREFIX}"
    lokr_job = Path(sys.executable).with_name("lokr-job")

    def sequential(dest: Path) -> None:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{PREFIX}/")
        for key in [o["Key"] for page in pages for o in page.get("Contents", [])]:
            target = dest / key
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())

    def ours(dest: Path) -> None:
        report = storage_for(uri, endpoint_url=endpoint).download_prefix(uri, dest, progress=False)
        assert report.transferred == count, report

    def sequential_process(dest: Path) -> None:
        subprocess.run([sys.executable, "-c", _SEQUENTIAL, endpoint, str(dest)], check=True)

    def fetch_process(dest: Path) -> None:
        command = [str(lokr_job), "fetch", "--config", str(config), "--workdir", str(dest)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    runs: list[tuple[str, Callable[[Path], None]]] = [
        ("a_in", sequential),
        ("b_in", ours),
        ("a_proc", sequential_process),
        ("b_proc", fetch_process),
    ]
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    times |= {"a_cpu": [], "b_cpu": [], "a_server": [], "b_server": []}
    for number in range(rounds):
        for name, run in runs:
            dest = scratch / f"{name}-{number}"
            started, cpu, served = time.perf_counter(), time.process_time(), _cpu(server)
            run(dest)
            times[name].append(time.perf_counter() - started)
            if name.endswith("_in"):  # CPU per object: this process's (the client) and moto's
                times[f"{name[0]}_cpu"].append((time.process_time() - cpu) / count * 1000)
                times[f"{name[0]}_server"].append((_cpu(server) - served) / count * 1000)
            fetched = sum(1 for p in dest.rglob("*.jpg"))
            assert fetched == count, f"{name}: {fetched} of {count} objects"
            shutil.rmtree(dest)
        print(
            f"round {number + 1}: " + ", ".join(f"{name} {values[-1]:.2f}" for name, values in times.items()),
            flush=True,
        )
    return times


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _spread(values: list[float], unit: str = " s") -> str:
    return f"{statistics.median(values):.2f}{unit} ({min(values):.2f}–{max(values):.2f})"


def _table(times: dict[str, list[float]], args: argparse.Namespace) -> str:
    lines = [
        f"{args.objects} objects × {args.size} B, moto in its own process, "
        + (f"{args.latency_ms:g} ms added per request by a proxy" if args.latency_ms else "no added latency")
        + f"; {args.rounds} rounds A B A B, median (range).",
        "",
        "| measured | A: sequential get_object loop | B: lokr-job | A/B per pair |",
        "|---|---|---|---|",
    ]
    verdicts = []
    for label, a, b in (
        ("in-process transfer (listing included; B: `download_prefix`)", "a_in", "b_in"),
        ("whole process (B: `lokr-job fetch`)", "a_proc", "b_proc"),
    ):
        ratios = [x / y for x, y in zip(times[a], times[b], strict=True)]
        lines.append(f"| {label} | {_spread(times[a])} | {_spread(times[b])} | {_spread(ratios, '×')} |")
        verdicts.append(f"{label.split(' (')[0]} {statistics.median(ratios):.2f}×")
    for label, key in (("client CPU per object, in-process", "cpu"), ("moto's CPU per object", "server")):
        a, b = times[f"a_{key}"], times[f"b_{key}"]
        ratios = [x / y for x, y in zip(a, b, strict=True)]
        lines.append(f"| {label} | {_spread(a, ' ms')} | {_spread(b, ' ms')} | {_spread(ratios, '×')} |")
    # B's floor per object: moto answers on one interpreter and B's client runs on one (a GIL each), and
    # both share this machine's cores. The loop's median over that floor is the best any client could do.
    client, served = statistics.median(times["b_cpu"]), statistics.median(times["b_server"])
    floor = max(client, served, (client + served) / (os.cpu_count() or 1)) * args.objects / 1000
    ceiling = statistics.median(times["a_in"]) / floor
    in_process = statistics.median([x / y for x, y in zip(times["a_in"], times["b_in"], strict=True)])
    verdict = "met" if in_process >= GOAL else "missed"
    lines += [
        "",
        f"Goal ≥ {GOAL:g}× (in-process): **{verdict}** ({'; '.join(verdicts)}). With B's CPU per object "
        f"(client and moto, one GIL each, {os.cpu_count()} cores shared) no client could beat "
        f"{ceiling:.2f}× here.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
