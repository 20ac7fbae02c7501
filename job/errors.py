"""The job's exit codes and the exceptions that carry them to the CLI.

The Kubernetes manifests depend on these numbers: only ``TRANSIENT`` (and signal deaths) is retried.
"""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    BUG = 1
    BAD_CONFIG = 2
    BAD_DATA = 3
    NO_PERMISSION = 4
    TRANSIENT = 75


class JobError(Exception):
    """An expected failure with a message for the user and the exit code that says what kind it is."""

    exit_code: ExitCode = ExitCode.BUG

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ConfigError(JobError):
    """Bad config or usage. Carries every problem found, so the user fixes them all in one go."""

    exit_code = ExitCode.BAD_CONFIG

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(text)


class DataError(JobError):
    """The dataset cannot be used (nothing readable, buckets too small for the batch)."""

    exit_code = ExitCode.BAD_DATA


class PermissionDeniedError(JobError):
    """Missing credentials or access to a bucket, repo or path."""

    exit_code = ExitCode.NO_PERMISSION


class TransientError(JobError):
    """Worth retrying: network trouble, a preemption with state saved."""

    exit_code = ExitCode.TRANSIENT
