"""Run events (start, checkpoint, validation and its previews, finish, failure) as JSON POSTs to
``webhook_url``.

A webhook is a convenience, never a reason to stop training: every failure ends as one warning. Server
errors, 429 and network trouble are retried a few times with a short backoff; other 4xx answers are not
(the request will not get better). The body carries ``content`` and ``text`` with a one-line summary so
that Discord and Slack incoming webhooks display it as is. The URL is never logged: Discord and Slack
put the webhook's secret in its path.
"""

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from job.redact import redact

log = logging.getLogger("lokr.webhook")

Event = Literal["start", "checkpoint", "validation", "validation_preview", "finish", "failure"]


class Webhook:
    def __init__(
        self,
        url: str | None,
        *,
        run_name: str | None = None,
        attempts: int = 3,
        timeout_s: float = 5.0,
        backoff_s: float = 0.5,
    ) -> None:
        """``url`` None makes every ``post`` a no-op, so callers need no ``if``."""
        self.url = url
        self.run_name = run_name
        self.attempts = attempts
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s

    @property
    def host(self) -> str:
        return urlsplit(self.url or "").netloc.rpartition("@")[2]

    def post(self, event: Event, payload: Mapping[str, Any] | None = None) -> bool:
        """Send one event; True when the receiver accepted it. Never raises."""
        if not self.url:
            return False
        summary = _summary(self.run_name, event, payload or {})
        body = {
            "event": event,
            "run": self.run_name,
            "ts": datetime.now(UTC).isoformat(timespec="seconds"),
            "content": summary,
            "text": summary,
            **(payload or {}),
        }
        data = redact(json.dumps(body, default=str, ensure_ascii=False)).encode("utf-8")
        started = time.monotonic()
        try:
            for attempt in Retrying(
                stop=stop_after_attempt(self.attempts),
                wait=wait_exponential(multiplier=self.backoff_s, max=5),
                retry=retry_if_exception(_worth_retrying),
                reraise=True,
            ):
                with attempt:
                    self._send(self.url, data)
        except Exception as exc:
            log.warning(
                "webhook %s: %s event not delivered after %.1fs: %s",
                self.host,
                event,
                time.monotonic() - started,
                _describe(exc),
            )
            return False
        return True

    def _send(self, url: str, data: bytes) -> None:
        request = urllib.request.Request(
            url,
            data=data,
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "lokr-job"},
        )
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            response.read()


def _worth_retrying(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code == 429
    return isinstance(exc, OSError)  # URLError, timeouts, refused and dropped connections


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return f"{type(exc).__name__}: {exc}"


def _summary(run_name: str | None, event: str, payload: Mapping[str, Any]) -> str:
    facts = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in payload.items()
        if isinstance(v, str | int | float) and not k.endswith("_base64")  # an image is no summary
    )
    head = f"lokr-job {run_name}: {event}" if run_name else f"lokr-job: {event}"
    return f"{head} ({facts})" if facts else head
