"""Progress for long loops (fetch and other transfers, warm, train): a tqdm bar on a terminal, periodic log lines otherwise.

A bar redrawn with carriage returns is noise in a container log, so when stderr is not a terminal the
same progress is reported as one log line every ``interval_s`` seconds, plus one at the end.
"""

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Literal, TypeVar

T = TypeVar("T")
Mode = Literal["bar", "log"]

log = logging.getLogger("lokr.progress")


class Progress:
    """Counts work done; use as a context manager, or call ``close()``."""

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        *,
        unit: str = "it",
        initial: int = 0,
        interval_s: float = 30.0,
        mode: Mode | None = None,
    ) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.count = initial
        self.interval_s = interval_s
        # tqdm draws on stderr, so that is the stream whose terminal-ness matters.
        self.mode: Mode = mode or ("bar" if sys.stderr.isatty() else "log")
        self._initial = initial
        self._postfix: dict[str, Any] = {}
        self._started = self._last_report = time.monotonic()
        self._closed = False
        self._bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last_report >= self.interval_s:
            self._last_report = now
            log.info("%s", self._line(now))

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the counts (``loss=0.12``), kept until replaced."""
        self._postfix.update(values)
        if self._bar is not None:
            self._bar.set_postfix(self._postfix, refresh=False)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.count > self._initial:
            elapsed = _duration(time.monotonic() - self._started)
            log.info("%s: finished, %s in %s", self.desc, self._counts(), elapsed)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _counts(self) -> str:
        if self.total:
            return f"{self.count}/{self.total} {self.unit} ({100 * self.count / self.total:.0f}%)"
        return f"{self.count} {self.unit}"

    def _line(self, now: float) -> str:
        parts = [self._counts()]
        elapsed = now - self._started
        rate = (self.count - self._initial) / elapsed if elapsed > 0 else 0.0
        if rate > 0:
            parts.append(f"{rate:.3g} {self.unit}/s")
            if self.total:
                parts.append(f"eta {_duration((self.total - self.count) / rate)}")
        parts += [f"{k}={_short(v)}" for k, v in self._postfix.items()]
        return f"{self.desc}: " + ", ".join(parts)


def progress_iter(iterable: Iterable[T], desc: str, total: int | None = None, **kwargs: Any) -> Iterator[T]:
    """Yield from ``iterable`` while reporting progress (``total`` defaults to its ``len()``)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(desc, total, **kwargs) as progress:
        for item in iterable:
            yield item
            progress.update()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
