"""Training progress for people: step, loss, lr, s/step and ETA on a tqdm bar (``job.progress``)
when stderr is a terminal, and as one log line every ``log_every`` steps either way."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from job.progress import Progress
from job.settings import job_settings

log = logging.getLogger("lokr")


# A smoothed s/step: recent steps count most, and one slow step does not swing the ETA.
_SMOOTHING = 0.1


@dataclass(frozen=True)
class StepReport:
    step: int
    loss: float
    lr: float


class TrainProgress:
    def __init__(self, total: int, initial: int, *, log_every: int = 10):
        self.total = total
        self.log_every = max(1, log_every)
        self.seconds_per_step: float | None = None
        self.durations: list[float] = []
        self._last = time.perf_counter()
        # LOKR_LOG_STEPS=1: one line per trained step (what the chaos test counts steps by; a post-mortem aid).
        self._log_each_step = job_settings().log_steps
        # The bar's own periodic lines would repeat ours: ours are the log output.
        self._bar = Progress("train", total, unit="step", initial=initial, interval_s=math.inf)

    def update(self, report: StepReport) -> None:
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        self.durations.append(elapsed)
        if self.seconds_per_step is None:
            self.seconds_per_step = elapsed
        else:
            self.seconds_per_step += _SMOOTHING * (elapsed - self.seconds_per_step)
        self._bar.set_postfix(
            loss=round(report.loss, 4), lr=f"{report.lr:.3g}", s_step=f"{self.seconds_per_step:.3f}"
        )
        self._bar.update()
        if self._log_each_step:
            log.info("step %d trained", report.step)
        if report.step % self.log_every == 0 or report.step == self.total:
            eta = self.seconds_per_step * (self.total - report.step)
            log.info(
                "step %d/%d loss %.4f lr %.3g %.3f s/step ETA %s",
                report.step,
                self.total,
                report.loss,
                report.lr,
                self.seconds_per_step,
                _duration(eta),
            )

    def reset_clock(self) -> None:
        """Leave time spent between steps (a checkpoint) out of the next step's duration."""
        self._last = time.perf_counter()

    def close(self) -> None:
        self._bar.close()
        # Steady state: the first tenth of the steps (allocator and cache warm-up) left out.
        steady = self.durations[len(self.durations) // 10 + 1 :]
        if steady:
            log.info(
                "train: %d steps, steady state %.4f s/step (checkpoint writes excluded)",
                len(self.durations),
                sum(steady) / len(steady),
            )


def _duration(seconds: float) -> str:
    hours, rest = divmod(max(0, int(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
