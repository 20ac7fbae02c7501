"""Bounded retries for storage calls (tenacity), and the mapping of failures onto the job's exit codes.

Each backend supplies a *classifier* that looks at an exception and answers one of three ways: a
``JobError`` to raise at once (401/403, 404: retrying cannot help), a ``Retryable`` (5xx, 429, timeouts,
dropped connections), or None (not a storage failure: let it through untouched, it is a bug). A call that
is still failing after the last attempt becomes ``TransientError`` (exit 75), so the orchestrator retries
the whole job later.

Settings come from ``job.settings`` at call time, so tests can shrink the waits:
``LOKR_RETRY_ATTEMPTS`` (default 6), ``LOKR_RETRY_BASE_SECONDS`` (default 1) and
``LOKR_RETRY_MAX_SECONDS`` (default 60, also the cap on a server's Retry-After).
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_base, wait_exponential, wait_random

from job.errors import JobError, TransientError
from job.settings import job_settings

log = logging.getLogger("job.storage")
T = TypeVar("T")


class Retryable(Exception):
    """A failure worth another attempt; ``retry_after`` is the server's hint in seconds, if it gave one."""

    def __init__(self, cause: BaseException, retry_after: float | None = None):
        super().__init__(describe(cause))
        self.cause = cause
        self.retry_after = retry_after


Classifier = Callable[[BaseException], "JobError | Retryable | None"]


@dataclass(frozen=True)
class RetrySettings:
    attempts: int = 6
    base_seconds: float = 1.0
    max_seconds: float = 60.0

    @classmethod
    def from_env(cls) -> RetrySettings:
        settings = job_settings()
        return cls(settings.retry_attempts, settings.retry_base_seconds, settings.retry_max_seconds)


class _Backoff(wait_base):
    """Exponential backoff with jitter, but never shorter than the server's Retry-After (capped)."""

    def __init__(self, settings: RetrySettings):
        self._cap = settings.max_seconds
        self._expo = wait_exponential(
            multiplier=settings.base_seconds, max=settings.max_seconds
        ) + wait_random(0, settings.base_seconds)

    def __call__(self, retry_state: RetryCallState) -> float:
        wait = self._expo(retry_state)
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, Retryable) and exc.retry_after is not None:
            wait = max(wait, min(exc.retry_after, self._cap))
        return wait


def call(fn: Callable[[], T], *, what: str, classify: Classifier, settings: RetrySettings | None = None) -> T:
    """Run ``fn`` with retries; ``what`` names the operation and its URI in messages."""
    settings = settings or RetrySettings.from_env()

    def attempt() -> T:
        try:
            return fn()
        except (JobError, Retryable):
            raise
        except Exception as exc:
            verdict = classify(exc)
            if verdict is None:
                raise
            raise verdict from exc

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "%s: attempt %d/%d failed (%s); retrying in %.2fs",
            what,
            state.attempt_number,
            settings.attempts,
            exc,
            wait,
        )

    retrying = Retrying(
        stop=stop_after_attempt(settings.attempts),
        wait=_Backoff(settings),
        retry=retry_if_exception_type(Retryable),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        return retrying(attempt)
    except Retryable as exc:
        raise TransientError(
            f"{what} still failing after {settings.attempts} attempts: {describe(exc.cause)}"
        ) from exc.cause


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if value is None or not str(value).strip():
        return None
    value = str(value).strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def describe(exc: BaseException) -> str:
    """A one-line summary of an exception for messages and logs (bounded, never a traceback)."""
    text = " ".join(str(exc).split()) or "no details"
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}"
