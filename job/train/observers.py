"""What a person watching a run sees while it trains: validation images, eval loss, trackers, webhook.

One ``TrainingObserver`` lives on the main process only (the loop calls it; other ranks have none).
Validation renders with the transformer being trained, its LoKr still applied in memory, every
``validation_step_interval`` steps and once at the end, when there is any prompt to render.

Eval loss is measured on fixed batches: the first ``num_eval_images`` samples of epoch 0's order (the
sampler's order is a pure function of the seed), at fixed σ with fixed noise (``job.validate.eval_loss``).
They are training samples, not a held-out split: a DreamBooth-sized dataset cannot spare images, and
the point is a loss that moves only when the model does, which fixed inputs give (SimpleTuner's
``eval_steps_interval`` without an eval dataset does the same).

Nothing here may stop training: a failed validation, tracker write or webhook is logged and skipped.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from job.track.trackers import Trackers
from job.track.webhook import Webhook
from job.validate.prompts import validation_prompts

if TYPE_CHECKING:
    import torch

    from job.cache.dataset import Batch, TrainingData
    from job.config.loader import ResolvedConfig
    from job.train.loop import StepResult, TrainingRun
    from job.validate.clip_score import ClipScorer
    from job.validate.preview import Previewer, StepCallback
    from job.validate.render import Adapter
    from job.workdir import WorkDir

log = logging.getLogger("lokr")


class TrainingObserver:
    def __init__(
        self,
        config: ResolvedConfig,
        workdir: WorkDir,
        *,
        transformer: torch.nn.Module,
        data: TrainingData,
        device: torch.device,
        dtype: torch.dtype,
        trackers: Trackers,
        webhook: Webhook,
        renders: bool = True,
        adapter: Adapter | None = None,
    ) -> None:
        self.config = config
        self.workdir = workdir
        self.job = config.job
        self.transformer = transformer
        self.data = data
        self.device = device
        self.dtype = dtype
        self.trackers = trackers
        self.webhook = webhook
        self.renders = renders  # False: the main process cannot run the model alone (ZeRO-3 shards)
        self.adapter = adapter  # the LoKr, rendered at validation_lycoris_strength (None: full-rank)
        self.prompts = validation_prompts(config)
        self.validation_dir = workdir.output / "validation"
        self.last_validated: int | None = None
        self.last_evaluated: int | None = None
        self._eval_batches: list[Batch] | None = None
        self._clip: ClipScorer | None = None  # loaded at the first validation that scores
        self._previewer: Previewer | None = None  # loaded at the first validation that previews

    @classmethod
    def for_run(
        cls,
        config: ResolvedConfig,
        workdir: WorkDir,
        run_uri: str | None,
        run: TrainingRun,
        data: TrainingData,
    ) -> TrainingObserver:
        """Open the trackers (continuing a resumed run's) and hook into the run's checkpoints."""
        trainer = run.trainer
        observer = cls(
            config,
            workdir,
            transformer=trainer.transformer,
            data=data,
            device=trainer.accelerator.device,
            dtype=trainer.input_dtype,
            trackers=Trackers.from_config(
                config,
                workdir,
                run_id=run_id(config, run_uri or str(workdir.root)),
                start_step=run.state.step,
            ),
            webhook=Webhook(config.job.webhook_url, run_name=run_name(config)),
            renders=run.renders,
            adapter=getattr(trainer, "network", None),
        )
        if trainer.checkpointer is not None:
            trainer.checkpointer.on_complete.append(observer.on_checkpoint)
        return observer

    def on_start(self, step: int, total: int) -> None:
        self.webhook.post("start", {"step": step, "total_steps": total, "recipe": self.config.hash})

    def on_step(self, step: int, result: StepResult, seconds: float) -> None:
        self._guarded(
            "tracker",
            lambda: self.trackers.log(
                step,
                {"loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm, "s_per_step": seconds},
            ),
        )
        if not self.renders:
            return
        if self.job.eval_steps_interval and step % self.job.eval_steps_interval == 0:
            self._guarded("eval loss", lambda: self.evaluate(step))
        if self.job.validation_step_interval and step % self.job.validation_step_interval == 0:
            self._guarded("validation", lambda: self.validate(step))

    def on_checkpoint(self, path: Path, step: int) -> None:
        self.webhook.post("checkpoint", {"step": step, "checkpoint": path.name})

    def on_end(self, step: int, *, finished: bool) -> None:
        try:
            if not finished:
                self.webhook.post(
                    "failure", {"step": step, "reason": "stopped early; state saved, the run will resume"}
                )
                return
            if self.renders and self.job.eval_steps_interval and self.last_evaluated != step:
                self._guarded("eval loss", lambda: self.evaluate(step))
            if self.renders and self.last_validated != step:
                self._guarded("validation", lambda: self.validate(step))
            self.webhook.post("finish", {"step": step, "output": str(self.workdir.output)})
        finally:
            self.close()

    def on_failure(self, step: int, exc: BaseException) -> None:
        try:
            reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__
            self.webhook.post("failure", {"step": step, "reason": reason})
        finally:
            self.close()

    def close(self) -> None:
        self._guarded("tracker", self.trackers.close)

    def evaluate(self, step: int) -> float:
        from job.validate.eval_loss import eval_loss

        started = time.perf_counter()
        loss = eval_loss(
            self.transformer, self.eval_batches(), seed=self.job.seed, device=self.device, dtype=self.dtype
        )
        self.last_evaluated = step
        self.trackers.log(step, {"eval_loss": loss})
        log.info("eval loss %.4f at step %d (%.1f s)", loss, step, time.perf_counter() - started)
        return loss

    def eval_batches(self) -> list[Batch]:
        """The fixed eval batches, read once: the first ``num_eval_images`` samples of epoch 0."""
        if self._eval_batches is None:
            count = math.ceil(self.job.num_eval_images / self.data.batch_size)
            self._eval_batches = [
                self.data.batch(0, i) for i in range(min(count, self.data.batches_per_epoch))
            ]
        return self._eval_batches

    def validate(self, step: int) -> list[Path]:
        """Render every validation prompt under ``output/validation/step-<step>/``; log and announce it."""
        if not self.prompts:
            return []
        import torch

        from job.model.source import local_model_path
        from job.validate.render import build_validation_pipeline, render_validation

        started = time.perf_counter()
        self.last_validated = step
        negative = self.job.validation_negative_prompt
        # warm caches every validation prompt: then the text encoder (gigabytes) is never loaded.
        cached = all(self.data.sample_embedding(p) is not None for p in [*self.prompts.values(), negative])
        pipeline = build_validation_pipeline(
            local_model_path(self.job, self.workdir),
            self.transformer,
            self.dtype,
            self.device,
            with_text_encoder=not cached,
            vae_tiling=self.job.vae_enable_tiling,
            vae_slicing=self.job.vae_enable_slicing,
        )
        try:
            paths = render_validation(
                pipeline,
                self.prompts,
                self.job,
                step,
                self.validation_dir,
                embeddings=self.data.sample_embedding if cached else None,
                adapter=self.adapter,
                preview=self._previews(step),
            )
        finally:
            del pipeline
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self.trackers.log_images(step, {p.stem: p for p in paths})
        clip = self._clip_summary(step, paths) if self.job.evaluation_type == "clip" else None
        self.trackers.flush()
        seconds = time.perf_counter() - started
        payload = {
            "step": step,
            "images": len(paths),
            "folder": f"validation/step-{step}",
            "seconds": seconds,
        }
        self.webhook.post("validation", payload | ({"clip": clip} if clip else {}))
        return paths

    def _previews(self, step: int) -> Callable[[str], StepCallback] | None:
        """Validation previews of this step's images (``validation_preview``, posted to the webhook)."""
        if not (self.job.validation_preview and self.webhook.url):
            return None
        from job.model.source import preview_model_path
        from job.validate.preview import Previewer

        if self._previewer is None:
            folder = preview_model_path(self.job, self.workdir)
            self._previewer = Previewer(
                folder, self.device, self.webhook, every=self.job.validation_preview_steps
            )
        previewer, total = self._previewer, self.job.validation_num_inference_steps
        return lambda image: previewer.callback(step, image, total)

    def _clip_summary(self, step: int, paths: list[Path]) -> dict[str, float]:
        """CLIP-score the images just rendered (``evaluation_type: clip``); log and track the summary."""
        from job.model.source import evaluation_model_path
        from job.validate.clip_score import ClipScorer, summary

        if self._clip is None:
            self._clip = ClipScorer(evaluation_model_path(self.job, self.workdir), self.device)
        # render_validation returns the prompts in order, each at every validation size.
        prompts = [prompt for prompt in self.prompts.values() for _ in self.job.validation_sizes]
        result = summary(self._clip.scores(dict(zip(paths, prompts, strict=True))))
        self.trackers.log(step, result)
        log.info(
            "evaluation: CLIP score at step %d: mean %.4f, min %.4f, max %.4f over %d images",
            step,
            result["clip/mean"],
            result["clip/min"],
            result["clip/max"],
            len(paths),
        )
        return result

    def _guarded(self, what: str, action: Callable[[], object]) -> None:
        try:
            action()
        except Exception:
            log.warning("%s failed; training goes on", what, exc_info=True)


def run_name(config: ResolvedConfig) -> str:
    return config.job.tracker_run_name or f"lokr-{config.hash[:8]}"


def run_id(config: ResolvedConfig, where: str) -> str:
    """One wandb run per (recipe, ``where``: the run URI or else the work directory): a resumed attempt
    continues it."""
    return hashlib.sha256(f"{config.hash}\n{where}".encode()).hexdigest()[:16]
