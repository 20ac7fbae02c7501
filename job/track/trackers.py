"""Metrics and images to TensorBoard or Weights & Biases (``report_to``), or nowhere.

TensorBoard event files go to ``<output>/logs``; wandb writes its run folder under ``<output>`` unless
``WANDB_DIR`` says otherwise, and runs offline when ``WANDB_MODE=offline`` (wandb reads that itself).
Both SDKs are imported only when chosen. Create one ``Trackers`` on the main process only.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from job.redact import redact

if TYPE_CHECKING:
    from job.config.loader import ResolvedConfig
    from job.workdir import WorkDir

log = logging.getLogger("lokr.track")

ReportTo = Literal["tensorboard", "wandb", "none"]
T = TypeVar("T")


class Trackers:
    def __init__(
        self,
        report_to: ReportTo,
        output_dir: Path,
        *,
        project: str,
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        start_step: int = 0,
    ) -> None:
        """``run_id`` continues the same wandb run after a restart; ``start_step`` (the step resumed
        from) makes TensorBoard drop events an interrupted attempt logged past it."""
        self.report_to = report_to
        self.output_dir = Path(output_dir)
        self._tensorboard = None
        self._wandb_run = None
        safe_config = _redacted(config or {})
        if report_to == "tensorboard":
            self._tensorboard = self._guarded(
                "tensorboard", lambda: self._start_tensorboard(safe_config, start_step), starting=True
            )
        elif report_to == "wandb":
            self._wandb_run = self._guarded(
                "wandb", lambda: self._start_wandb(safe_config, project, run_name, run_id), starting=True
            )
        started = self._tensorboard is not None or self._wandb_run is not None
        log.info("tracking: %s", report_to if started else "off")

    def _start_tensorboard(self, safe_config: dict[str, Any], start_step: int) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=start_step or None, flush_secs=30)
        writer.add_text("config", f"```\n{json.dumps(safe_config, indent=2)}\n```", start_step)
        return writer

    def _start_wandb(
        self, safe_config: dict[str, Any], project: str, run_name: str | None, run_id: str | None
    ) -> Any:
        import wandb

        self.output_dir.mkdir(parents=True, exist_ok=True)
        return wandb.init(
            project=project,
            name=run_name,
            dir=None if os.environ.get("WANDB_DIR") else str(self.output_dir),
            config=safe_config,
            id=run_id,
            resume="allow" if run_id else None,
            # Our own log lines already reach the container log; wandb wrapping stdout/stderr
            # would also fool the terminal detection that picks progress bars or log lines.
            settings=wandb.Settings(console="off"),
        )

    def _guarded(self, name: str, action: Callable[[], T], *, starting: bool = False) -> T | None:
        """A tracker is a convenience, like the webhook: one that cannot start, or fails while logging,
        is switched off with a warning (its traceback at debug level) and the run goes on without it."""
        try:
            return action()
        except Exception as exc:
            when = "could not start" if starting else "failed"
            reason = " ".join(str(exc).split())[:300] or "no details"
            log.warning(
                "tracking: %s %s (%s: %s); the run continues without it",
                name,
                when,
                type(exc).__name__,
                reason,
            )
            log.debug("tracking: %s traceback", name, exc_info=True)
            if name == "tensorboard":
                self._tensorboard = None
            else:
                self._wandb_run = None
            return None

    @classmethod
    def from_config(
        cls, cfg: ResolvedConfig, workdir: WorkDir, *, run_id: str | None = None, start_step: int = 0
    ) -> Trackers:
        job = cfg.job
        # The webhook URL often carries its own secret in the path (Discord, Slack): never log it.
        config = job.model_dump(mode="json", exclude={"webhook_url"})
        config["recipe_hash"] = cfg.hash
        return cls(
            job.report_to,
            workdir.output,
            project=job.tracker_project_name,
            run_name=job.tracker_run_name,
            config=config,
            run_id=run_id,
            start_step=start_step,
        )

    @property
    def log_dir(self) -> Path:
        return self.output_dir / "logs"

    @property
    def wandb_dir(self) -> Path | None:
        """The wandb run folder (``.../wandb/offline-run-...``), when wandb is on."""
        return Path(self._wandb_run.dir).parent if self._wandb_run is not None else None

    def log(self, step: int, metrics: Mapping[str, float | None]) -> None:
        """Scalars such as loss, lr, grad_norm, s_per_step, eval_loss; ``None`` values are skipped."""
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        if (writer := self._tensorboard) is not None:
            self._guarded("tensorboard", lambda: _tensorboard_scalars(writer, step, values))
        if (run := self._wandb_run) is not None:
            self._guarded("wandb", lambda: run.log(values, step=step))

    def log_images(
        self, step: int, images: Mapping[str, Path], captions: Mapping[str, str] | None = None
    ) -> None:
        """Validation images by nickname, under ``validation/<nickname>``; captions default to nicknames."""
        if not images:
            return
        captions = captions or {}
        if (writer := self._tensorboard) is not None:
            self._guarded("tensorboard", lambda: _tensorboard_images(writer, step, images))
        if (run := self._wandb_run) is not None:
            self._guarded("wandb", lambda: _wandb_images(run, step, images, captions))

    def flush(self) -> None:
        if (writer := self._tensorboard) is not None:
            self._guarded("tensorboard", writer.flush)

    def close(self) -> None:
        writer, run = self._tensorboard, self._wandb_run
        self._tensorboard = self._wandb_run = None
        if writer is not None:
            self._guarded("tensorboard", writer.close)
        if run is not None:
            self._guarded("wandb", run.finish)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tensorboard_scalars(writer: Any, step: int, values: Mapping[str, float]) -> None:
    for key, value in values.items():
        writer.add_scalar(key, value, step)


def _tensorboard_images(writer: Any, step: int, images: Mapping[str, Path]) -> None:
    import numpy as np
    from PIL import Image

    for nickname, path in images.items():
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        writer.add_image(f"validation/{nickname}", pixels, step, dataformats="HWC")


def _wandb_images(run: Any, step: int, images: Mapping[str, Path], captions: Mapping[str, str]) -> None:
    import wandb

    run.log(
        {
            f"validation/{nickname}": wandb.Image(str(path), caption=captions.get(nickname, nickname))
            for nickname, path in images.items()
        },
        step=step,
    )


def _redacted(config: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(redact(json.dumps(config, default=str)))
