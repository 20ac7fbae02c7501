"""The chaos test: run the tiny job against a run URI and kill it at random moments until it finishes.

Each attempt is the real CLI (``python -m job run``) on a *fresh* work directory with the same run URI, so
everything it continues from came back from the run URI: checkpoints and the cache shards
(``cache_uri=run``). Kills are SIGTERM and SIGKILL, each aimed at a moment picked by a seeded RNG: during
fetch, warm, a step, a checkpoint write or an upload (aimed by watching the job's log lines). Afterwards:

- the adapter is byte-identical to an uninterrupted run's;
- after a SIGTERM the job exited 75 (its watchdog bounds when) and the next attempt trains no step twice;
- after a SIGKILL at most ``checkpoint_step_interval`` steps are trained twice, plus those trained while
  the last checkpoint's upload was still in flight (durable means uploaded);
- every attempt resumes from a remote checkpoint that had its marker, never from one without;
- the run URI never holds more than ``checkpoints_total_limit`` complete checkpoints.

``tests/test_chaos.py`` runs it with 5 kills of each kind against moto; run it longer here:

    python scripts/chaos.py --kills 20            # a moto server of its own
    python scripts/chaos.py --first-step          # time to first step: cold vs remote cache shards
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT_INTERVAL = 8
CHECKPOINT_LIMIT = 2
MAX_STEPS = 48
GRACE_SECONDS = 10.0
SIGNAL_EXIT_BOUND_S = 3 * GRACE_SECONDS
OVERRIDES = (
    f"max_train_steps={MAX_STEPS}",
    f"checkpoint_step_interval={CHECKPOINT_INTERVAL}",
    f"checkpoints_total_limit={CHECKPOINT_LIMIT}",
    "cache_uri=run",
)
_STEP = re.compile(r"step (\d+) trained")
_SAVED = re.compile(r"checkpoint checkpoint-(\d+) saved")
_UPLOADED = re.compile(r"checkpoint checkpoint-(\d+) uploaded")
_RESUMED = re.compile(r"resumed from \S*checkpoint-(\d+)")
MOMENTS = ("fetch", "warm", "step", "checkpoint write", "upload")


@dataclass(frozen=True)
class Kill:
    signal: signal.Signals
    moment: str
    pattern: re.Pattern[str]  # the log line that marks the moment
    occurrence: int  # kill at this occurrence of the pattern...
    delay: float  # ...this many seconds after it

    def marks_moment(self, line: str) -> bool:
        match = self.pattern.search(line)
        if match is None:
            return False
        # A checkpoint is written right after a step that is a multiple of the interval.
        return self.moment != "checkpoint write" or int(match.group(1)) % CHECKPOINT_INTERVAL == 0


@dataclass
class Attempt:
    kill: Kill | None
    returncode: int
    killed: bool  # the signal reached a live process
    seconds_after_signal: float | None
    steps: list[int] = field(default_factory=list)
    saved: list[int] = field(default_factory=list)
    uploaded: list[int] = field(default_factory=list)
    resumed_from: int | None = None
    timeline: list[tuple[float, str]] = field(default_factory=list)  # (seconds since start, log line)
    log: str = ""
    adapter: bytes | None = None  # what a finished attempt wrote
    seconds: float = 0.0

    @property
    def last_step(self) -> int | None:
        return max(self.steps) if self.steps else None

    def seconds_until(self, pattern: str) -> float | None:
        """When the first log line matching ``pattern`` came, in seconds after the process started."""
        return next((t for t, line in self.timeline if re.search(pattern, line)), None)


def plan_kill(rng: random.Random, sig: signal.Signals) -> Kill:
    moment = rng.choice(MOMENTS)
    if moment == "fetch":
        return Kill(sig, moment, re.compile(r"fetch:"), 1, rng.uniform(0.0, 0.2))
    if moment == "warm":
        return Kill(sig, moment, re.compile(r"fetch: base model|cache: "), 1, rng.uniform(0.0, 0.5))
    if moment == "step":
        return Kill(sig, moment, _STEP, rng.randint(1, 12), rng.uniform(0.0, 0.03))
    if moment == "checkpoint write":
        return Kill(sig, moment, _STEP, rng.randint(1, 2), rng.uniform(0.0, 0.02))
    return Kill(sig, moment, _SAVED, rng.randint(1, 2), rng.uniform(0.0, 0.03))


def run_attempt(
    command: list[str], env: dict[str, str], kill: Kill | None, *, timeout: float = 240
) -> Attempt:
    started = time.monotonic()
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    timeline: list[tuple[float, str]] = []
    trigger = threading.Event()

    def read() -> None:
        seen = 0
        assert process.stderr is not None
        for line in process.stderr:
            timeline.append((time.monotonic() - started, line))
            if kill is not None and kill.marks_moment(line):
                seen += 1
                if seen == kill.occurrence:
                    trigger.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed, signalled_at = False, None
    if kill is not None:
        while not trigger.wait(0.01) and process.poll() is None:
            pass
        if trigger.is_set():
            time.sleep(kill.delay)
            if process.poll() is None:
                process.send_signal(kill.signal)
                killed, signalled_at = True, time.monotonic()
    returncode = process.wait(timeout=timeout)
    ended = time.monotonic()
    reader.join(timeout=10)
    text = "".join(line for _, line in timeline)
    attempt = Attempt(
        kill=kill,
        returncode=returncode,
        killed=killed,
        seconds_after_signal=None if signalled_at is None else ended - signalled_at,
        timeline=timeline,
        log=text,
        seconds=ended - started,
    )
    attempt.steps = [int(m) for m in _STEP.findall(text)]
    attempt.saved = [int(m) for m in _SAVED.findall(text)]
    attempt.uploaded = [int(m) for m in _UPLOADED.findall(text)]
    resumed = _RESUMED.search(text)
    attempt.resumed_from = int(resumed.group(1)) if resumed else None
    written = re.search(r"adapter written to (\S+)", text)
    if returncode == 0 and written:
        attempt.adapter = Path(written.group(1)).read_bytes()
    return attempt


def job_command(
    config: Path, workdir: Path, run_uri: str, overrides: tuple[str, ...] = OVERRIDES
) -> list[str]:
    sets = [arg for item in overrides for arg in ("--set", item)]
    return [
        sys.executable,
        "-m",
        "job",
        "run",
        "--config",
        str(config),
        "--workdir",
        str(workdir),
        "--run-uri",
        run_uri,
        *sets,
    ]


def job_env() -> dict[str, str]:
    return {
        **os.environ,
        "LOKR_LOG_LEVEL": "INFO",
        "LOKR_LOG_STEPS": "1",  # a "step N trained" line per step
        "LOKR_GRACE_SECONDS": str(GRACE_SECONDS),
        # A SIGKILLed attempt leaves its run lease behind: the next attempt takes it over after this TTL.
        "LOKR_LEASE_TTL_SECONDS": "5",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


@dataclass
class ChaosResult:
    attempts: list[Attempt]
    adapter: bytes
    reference: bytes
    seconds: float

    def kills(self, sig: signal.Signals) -> int:
        return sum(1 for a in self.attempts if a.killed and a.kill is not None and a.kill.signal == sig)


def run_chaos(
    config: Path,
    scratch: Path,
    run_uri: str,
    reference_uri: str,
    *,
    kills: int,
    seed: int,
    remote_steps: Callable[[str], dict[int, bool]],
) -> ChaosResult:
    """``kills`` SIGTERMs and ``kills`` SIGKILLs in a seeded order, then attempts without kills until the run
    finishes. ``remote_steps(run_uri)`` lists the remote checkpoints (step → has marker)."""
    started = time.monotonic()
    env = job_env()
    reference = run_attempt(job_command(config, scratch / "reference", reference_uri), env, None)
    assert reference.returncode == 0, reference.log[-3000:]
    rng = random.Random(seed)
    planned = [signal.SIGTERM] * kills + [signal.SIGKILL] * kills
    rng.shuffle(planned)
    attempts: list[Attempt] = []
    previous: Attempt | None = None
    durable_before: dict[int, bool] = {}
    uri = run_uri
    for number in range(3 * len(planned) + 5):
        # A kill that missed its moment (the attempt ended first) is aimed again at the next attempt.
        done = sum(1 for a in attempts if a.killed)
        kill = plan_kill(rng, planned[done]) if done < len(planned) else None
        workdir = scratch / f"attempt-{number:02d}"
        attempt = run_attempt(job_command(config, workdir, uri), env, kill)
        check_attempt(attempt, previous, durable_before)
        attempts.append(attempt)
        previous = attempt
        durable_before = remote_steps(uri)
        complete = [step for step, has_marker in durable_before.items() if has_marker]
        assert len(complete) <= CHECKPOINT_LIMIT, f"{uri} holds {sorted(complete)} after attempt {number}"
        shutil.rmtree(workdir, ignore_errors=True)  # the next machine is a fresh one
        if attempt.returncode == 0:
            assert attempt.adapter == reference.adapter, f"attempt {number}: the adapter differs"
            if sum(1 for a in attempts if a.killed) >= len(planned):
                break
            # Finished before the remaining kills: a new run on a new run URI gives them moments.
            uri, previous, durable_before = f"{run_uri.rstrip('/')}-{number}", None, {}
    else:
        raise AssertionError("the run did not finish")
    assert attempts[-1].adapter is not None and reference.adapter is not None
    return ChaosResult(
        attempts=attempts,
        adapter=attempts[-1].adapter,
        reference=reference.adapter,
        seconds=time.monotonic() - started,
    )


def check_attempt(attempt: Attempt, previous: Attempt | None, durable_before: dict[int, bool]) -> None:
    """The invariants one attempt must keep, given the one before and the remote checkpoints it left."""
    assert "Traceback" not in attempt.log, attempt.log[-3000:]
    if attempt.killed and attempt.kill is not None and attempt.kill.signal == signal.SIGTERM:
        assert attempt.returncode in (0, 75), f"SIGTERM → exit {attempt.returncode}\n{attempt.log[-3000:]}"
        assert attempt.seconds_after_signal is not None
        # The watchdog ends it within the budget; a loaded machine stretches the rest, so the bound here only
        # catches a process that outlived its watchdog (the figure is scripts/bench_grace.py's).
        assert attempt.seconds_after_signal <= SIGNAL_EXIT_BOUND_S, attempt.seconds_after_signal
    elif attempt.killed:
        assert attempt.returncode == -signal.SIGKILL
    else:
        assert attempt.returncode == 0, attempt.log[-3000:]
    if attempt.resumed_from is not None:
        # Never a checkpoint without its marker: it must have been complete at the run URI beforehand.
        assert durable_before.get(attempt.resumed_from) is True, (attempt.resumed_from, durable_before)
    if previous is None or previous.last_step is None or not attempt.steps or previous.kill is None:
        return
    start = min(attempt.steps) - 1
    repeated = previous.last_step - start
    if previous.kill.signal == signal.SIGTERM:
        assert repeated <= 0, (
            f"after SIGTERM at step {previous.last_step} the next attempt started at {start}"
        )
        return
    # SIGKILL: nothing durable (uploaded) is lost; what is retrained is at most one interval, plus the steps
    # trained while checkpoint uploads were still in flight.
    durable = max([min(previous.steps) - 1, *previous.uploaded])
    assert start >= durable, f"uploaded checkpoint {durable} was lost (restarted at {start})"
    # The checkpoint before the oldest unfinished upload was durable, so at most one interval precedes it.
    not_uploaded = [step for step in previous.saved if step not in previous.uploaded and step > durable]
    in_flight = previous.last_step - min(not_uploaded) if not_uploaded else 0
    assert repeated <= CHECKPOINT_INTERVAL + in_flight, (previous.last_step, start, previous.uploaded)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=20, help="kills of each kind (SIGTERM and SIGKILL)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first-step", action="store_true", help="time to first step, cold vs remote caches")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    import boto3
    from botocore.config import Config
    from servers.s3 import FAKE_CREDENTIALS, start_moto

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    server, url = start_moto()
    os.environ.update(FAKE_CREDENTIALS, AWS_ENDPOINT_URL=url, AWS_EC2_METADATA_DISABLED="true")
    client = boto3.client("s3", endpoint_url=url, config=Config(s3={"addressing_style": "path"}))
    client.create_bucket(Bucket="chaos")
    from job.tiny import write_tiny_job
    from job.train.remote import remote_checkpoints

    try:
        with tempfile.TemporaryDirectory(prefix="lokr-chaos-") as temp:
            scratch = Path(temp)
            config = write_tiny_job(scratch / "job")
            if args.first_step:
                print_first_step(config, scratch)
                return 0
            result = run_chaos(
                config,
                scratch,
                "s3://chaos/run",
                "s3://chaos/reference",
                kills=args.kills,
                seed=args.seed,
                remote_steps=remote_checkpoints,
            )
            assert result.adapter == result.reference, "the adapter differs from the uninterrupted run's"
            report(result)
    finally:
        server.stop()
    return 0


def report(result: ChaosResult) -> None:
    for number, attempt in enumerate(result.attempts):
        kill = attempt.kill
        what = f"{kill.signal.name} at {kill.moment}" if kill and attempt.killed else "no kill"
        span = f"steps {min(attempt.steps)}-{max(attempt.steps)}" if attempt.steps else "no steps"
        print(
            f"attempt {number:2d}: {what:28s} exit {attempt.returncode:4d}  {span:14s} {attempt.seconds:5.1f} s"
        )
    print(
        f"{result.kills(signal.SIGTERM)} SIGTERM + {result.kills(signal.SIGKILL)} SIGKILL over "
        f"{len(result.attempts)} attempts in {result.seconds:.0f} s; adapter byte-identical to the reference"
    )


def print_first_step(config: Path, scratch: Path) -> None:
    """On a fresh work directory, the time from process start to the first trained step and the time warm
    took: caches built here (cold), then unpacked from the shards a previous machine left at the cache URI."""
    env = job_env()
    steps = f"max_train_steps={CHECKPOINT_INTERVAL}"
    runs = (
        ("cold", "first", "cache_uri=run"),
        ("remote caches", "second", "cache_uri=s3://chaos/first/cache"),
    )
    figures = {}
    for name, folder, cache in runs:
        # The second machine has a run URI of its own (no checkpoint to resume) but the first's shards.
        command = job_command(config, scratch / folder, f"s3://chaos/{folder}", (cache, steps))
        attempt = run_attempt(command, env, None)
        assert attempt.returncode == 0, attempt.log[-3000:]
        first_step = attempt.seconds_until(r"step 1 trained")
        warm_start, warm_end = (
            attempt.seconds_until(r"fetch: base model"),
            attempt.seconds_until(r"warm: text"),
        )
        assert first_step is not None and warm_start is not None and warm_end is not None
        if name == "remote caches":
            assert "0 new" in attempt.log and "0 cached" not in attempt.log, "warm encoded something"
        figures[name] = first_step
        print(
            f"{name:14s} first step {first_step:5.2f} s after start; warm stage {warm_end - warm_start:5.2f} s"
        )
    print(f"ratio (time to first step): {figures['remote caches'] / figures['cold']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
