"""Metrics and images to TensorBoard or Weights & Biases (``report_to``), or nowhere.

TensorBoard event files go to ``<output>/logs``; wandb writes its run folder under ``<output>`` unless
``WANDB_DIR`` says otherwise, and runs offline when ``WANDB_MODE=offline`` (wandb reads that itself).
Both SDKs are imported only when chosen. Create one ``Trackers`` on the main process only.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from job.track.redact import redact

if TYPE_CHECKING:
    from job.config.loader import ResolvedConfig
    from job.workdir import WorkDir

log = logging.getLogger("lokr.track")

ReportTo = Literal["tensorboard", "wandb", "none"]


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
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(
                log_dir=str(self.log_dir), purge_step=start_step or None, flush_secs=30
            )
            self._tensorboard.add_text("config", f"```\n{json.dumps(safe_config, indent=2)}\n```", start_step)
        elif report_to == "wandb":
            import wandb

            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._wandb_run = wandb.init(
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
        log.info("tracking: %s", report_to if report_to != "none" else "off")

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
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)

    def log_images(
        self, step: int, images: Mapping[str, Path], captions: Mapping[str, str] | None = None
    ) -> None:
        """Validation images by nickname, under ``validation/<nickname>``; captions default to nicknames."""
        if not images or (self._tensorboard is None and self._wandb_run is None):
            return
        captions = captions or {}
        if self._tensorboard is not None:
            import numpy as np
            from PIL import Image

            for nickname, path in images.items():
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                self._tensorboard.add_image(f"validation/{nickname}", pixels, step, dataformats="HWC")
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.log(
                {
                    f"validation/{nickname}": wandb.Image(str(path), caption=captions.get(nickname, nickname))
                    for nickname, path in images.items()
                },
                step=step,
            )

    def flush(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _redacted(config: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(redact(json.dumps(config, default=str)))
