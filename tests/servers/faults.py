"""Fault injection and a request log, shared by the S3 proxy and the Hub server.

A ``FaultPlan`` answers a configurable share of requests with a failure instead of the real response:
``500``/``503`` (a server error), ``429`` (with ``Retry-After``), ``drop`` (close the connection without a
response) or ``cut`` (send the headers and half the body, then close). A seeded RNG keeps runs repeatable.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

KINDS = ("500", "503", "429", "drop", "cut")


class FaultPlan:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.configure()

    def configure(
        self,
        rate: float = 0.0,
        kinds: Iterable[str] = KINDS,
        *,
        methods: Iterable[str] | None = None,
        path: str | None = None,
        limit: int | None = None,
        retry_after: str = "0",
        delay: float = 0.0,
        seed: int = 1234,
        script: Iterable[str | None] = (),
    ) -> FaultPlan:
        """Fail ``rate`` of the matching requests (``methods``, ``path`` a regex searched in the path), at
        most ``limit`` times. ``script`` is consumed first, one entry per matching request (None: serve it),
        for tests that need an exact sequence. ``delay`` adds latency to every request."""
        kinds = tuple(kinds)
        script = list(script)
        unknown = (set(kinds) | {k for k in script if k is not None}) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}")
        with self._lock:
            self.rate = rate
            self.kinds = kinds
            self.methods = {m.upper() for m in methods} if methods else None
            self.path = re.compile(path) if path else None
            self.limit = limit
            self.retry_after = retry_after
            self.delay = delay
            self.injected = 0
            self._script = script
            self._rng = random.Random(seed)
        return self

    def off(self) -> None:
        self.configure()

    def draw(self, method: str, path: str) -> str | None:
        """The fault to inject for this request, or None to serve it normally."""
        with self._lock:
            if self.methods is not None and method.upper() not in self.methods:
                return None
            if self.path is not None and not self.path.search(path):
                return None
            if self._script:
                kind = self._script.pop(0)
                self.injected += kind is not None
                return kind
            if self.rate <= 0 or (self.limit is not None and self.injected >= self.limit):
                return None
            if self._rng.random() >= self.rate:
                return None
            self.injected += 1
            return self._rng.choice(self.kinds)


@dataclass
class LoggedRequest:
    method: str
    path: str  # without the query string
    query: str
    status: int  # 0 when the connection was dropped
    sent: int  # response body bytes actually written
    received: int  # request body bytes
    fault: str | None = None


@dataclass
class RequestLog:
    entries: list[LoggedRequest] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    in_flight: int = 0
    peak_in_flight: int = 0

    def add(self, entry: LoggedRequest) -> None:
        with self._lock:
            self.entries.append(entry)

    def enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()
            self.peak_in_flight = self.in_flight

    def select(self, predicate: Callable[[LoggedRequest], bool] | None = None) -> list[LoggedRequest]:
        with self._lock:
            return [e for e in self.entries if predicate is None or predicate(e)]

    def faults(self) -> list[LoggedRequest]:
        return self.select(lambda e: e.fault is not None)
