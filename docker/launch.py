"""torchrun that keeps lokr-job's exit codes.

    python launch.py [torchrun options] --no-python lokr-job run ...

torchrun itself exits 1 whenever a worker fails, which would turn a bad config (2) into a retried "bug"
and a saved preemption (75) into a failure. This runs torchrun's own launcher and, when workers fail,
exits with the code that says what happened (see `combined_exit_code`), so the Kubernetes
podFailurePolicy and any other orchestrator see the same codes as for a single process.
"""

from __future__ import annotations

import os
import sys

# Exit codes of job/errors.py. Kept literal so this file runs without the package (it is copied into the
# image beside the entrypoint); tests/test_container.py checks that they match ExitCode.
FINAL = (2, 3, 4)  # BAD_CONFIG, BAD_DATA, NO_PERMISSION: the same on every rank, never worth a retry
BUG = 1


def combined_exit_code(failures: list[tuple[float, int]]) -> int:
    """One exit code for a set of failed workers, given as (time of failure, exit code) pairs.

    A final code on any rank wins (retrying cannot help). Otherwise the first failure is the root cause;
    the others are usually its echo (peers that lost their collective). A worker killed by a signal
    (negative code) becomes 128+signal, as a shell reports it, which orchestrators retry like 75.
    """
    if not failures:
        return 0
    codes = [code for _, code in sorted(failures)]
    for code in codes:
        if code in FINAL:
            return code
    root = codes[0]
    if root < 0:
        return 128 - root
    return root if 0 < root < 256 else BUG


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # On SIGTERM torchrun forwards the signal to the workers and waits this long before SIGKILL: give
    # them the job's whole grace budget (save + upload) and a little more.
    grace = int(float(os.environ.get("LOKR_GRACE_SECONDS", "20")))
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(grace + 10))
    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        return combined_exit_code([(f.timestamp, f.exitcode) for f in err.failures.values()])
    except SignalException as err:
        # The workers got the signal too and had their grace period; report it the way a shell would.
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
