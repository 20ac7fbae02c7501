"""The grace budget, measured where it matters: from SIGTERM to the process's exit, under CPU load.

Each round runs the real CLI (``python -m job run``) on the tiny job with a fresh work directory and an
``s3://`` run URI (a moto server of its own), waits for a randomly chosen training step, sends SIGTERM a
random few milliseconds later and times the exit (``Popen.wait``, not the last log line). A busy-loop
process per core keeps the machine loaded throughout, as on a node shared with a data loader.

    python scripts/bench_grace.py                    # 5 rounds each for LOKR_GRACE_SECONDS=5 and 20
    python scripts/bench_grace.py --rounds 10 --grace 5
    python scripts/bench_grace.py --grace 5 --store-delay 3   # uploads cannot fit: the watchdog ends it

Prints, per budget, the median and range of signal → exit seconds and whether every round met the budget.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import chaos  # noqa: E402  (the same command, environment and log patterns as the chaos test)

# Long enough that every round is still training when its signal comes.
MAX_STEPS = 400


def one_round(
    config: Path,
    workdir: Path,
    run_uri: str,
    grace: float,
    rng: random.Random,
    slow_store: Callable[[], None],
) -> tuple[float, int]:
    """Start the job, SIGTERM it at a random training step; signal → exit seconds, and the exit code (75, or
    -SIGALRM where the kernel-timer backstop ended a process whose watcher was starved of the GIL)."""
    overrides = (*chaos.OVERRIDES[:3], f"max_train_steps={MAX_STEPS}")
    env = {**chaos.job_env(), "LOKR_GRACE_SECONDS": f"{grace:g}"}
    process = subprocess.Popen(
        chaos.job_command(config, workdir, run_uri, overrides),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    target = rng.randint(3, 30)
    reached = threading.Event()
    tail: list[str] = []

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            tail[:] = [*tail[-20:], line]
            match = chaos._STEP.search(line)
            if match and int(match.group(1)) >= target:
                reached.set()

    threading.Thread(target=read, daemon=True).start()
    if not reached.wait(300):
        process.kill()
        raise RuntimeError("the job never reached its step:\n" + "".join(tail))
    time.sleep(rng.uniform(0.0, 0.05))
    slow_store()
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=grace * 10 + 60)
    seconds = time.monotonic() - signalled
    if code not in (0, 75, -signal.SIGALRM):
        raise RuntimeError(f"exit {code} after SIGTERM:\n" + "".join(tail))
    return seconds, code


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--grace", type=float, action="append", help="budgets to measure (default 5 and 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--store-delay",
        type=float,
        default=0.0,
        help="seconds every store request takes from the signal on: uploads that cannot fit, so the watchdog ends it",
    )
    args = parser.parse_args()
    budgets = args.grace or [5.0, 20.0]
    sys.path.insert(0, str(ROOT / "tests"))
    import boto3
    from botocore.config import Config
    from servers.s3 import FAKE_CREDENTIALS, FaultProxy, start_moto

    from job.tiny import write_tiny_job

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server, moto_url = start_moto()
    proxy = FaultProxy(moto_url).start()  # adds the delay, when asked for
    url = proxy.url
    os.environ.update(FAKE_CREDENTIALS, AWS_ENDPOINT_URL=url, AWS_EC2_METADATA_DISABLED="true")
    boto3.client("s3", endpoint_url=url, config=Config(s3={"addressing_style": "path"})).create_bucket(
        Bucket="grace"
    )
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    rng = random.Random(args.seed)
    met_everywhere = True
    try:
        with tempfile.TemporaryDirectory(prefix="lokr-grace-") as temp:
            scratch = Path(temp)
            config = write_tiny_job(scratch / "job")
            for grace in budgets:
                times, alarms = [], 0
                for number in range(args.rounds):
                    name = f"g{grace:g}-{number}"
                    seconds, code = one_round(
                        config,
                        scratch / name,
                        f"s3://grace/{name}",
                        grace,
                        rng,
                        lambda: proxy.faults.configure(delay=args.store_delay),
                    )
                    proxy.faults.off()
                    times.append(seconds)
                    alarms += code == -signal.SIGALRM
                    print(
                        f"LOKR_GRACE_SECONDS={grace:g} round {number}: exit {code} {seconds:.2f} s after SIGTERM"
                    )
                met = max(times) <= grace
                met_everywhere &= met
                print(
                    f"LOKR_GRACE_SECONDS={grace:g}: signal -> exit median {statistics.median(times):.2f} s, "
                    f"range {min(times):.2f}-{max(times):.2f} s over {len(times)} rounds ({alarms} ended by "
                    f"the SIGALRM backstop, the others exit 75 or 0); budget {'met' if met else 'NOT met'}"
                )
    finally:
        for process in load:
            process.kill()
        proxy.stop()
        server.stop()
    print(f"{len(load)} busy-loop processes; load average {os.getloadavg()[0]:.1f} at the end")
    return 0 if met_everywhere else 1


if __name__ == "__main__":
    sys.exit(main())
