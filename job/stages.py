"""The stages a run goes through. Each is a function of a ``JobContext``, idempotent, and runnable
alone; ``run`` chains them. Heavy modules are imported inside each stage so the CLI starts fast."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from job import distributed
from job.context import JobContext
from job.errors import ConfigError

if TYPE_CHECKING:
    from job.recipe import RecipeChange

log = logging.getLogger("lokr")


# The commands that write a run's checkpoints or output, and so must belong to its recipe.
CLAIMING = ("run", "train", "publish")


# The commands that spend compute on a config's sizes: refused ones are found before anything is fetched.
SIZED = ("run", "fetch", "warm", "train")


def preflight(ctx: JobContext, command: str) -> None:
    """The size and access checks ``check`` makes, for what ``command`` needs, before anything is spent."""
    from job.check.preflight import preflight as check_access_for

    if command in SIZED:
        require_model_sizes(ctx)
    if command in ("run", "train"):
        from job.model.transformer import precision_problem

        # A precision this machine cannot run is found before anything is fetched or warmed.
        problem = precision_problem(ctx.config.job.base_model_precision)
        if problem is not None:
            raise ConfigError(problem)
    if command == "publish":
        from job.publish.bundle import require_trained

        # Nothing to publish is found on the local disk, before any request is made.
        require_trained(ctx.workdir.output, ctx.config.job.model_type)
    distributed.once(lambda: check_access_for(ctx.config, ctx.run_uri, command))


def require_model_sizes(ctx: JobContext) -> None:
    """Every size of the config against the model's positional grid: the fetched model's own, or its
    flavour's before it is fetched."""
    from job.check.sizes import require_sizes_fit
    from job.model.components import fetched_model_folder, job_geometry

    job = ctx.config.job
    require_sizes_fit(ctx.config, job_geometry(job, fetched_model_folder(job, ctx.workdir)))


def claim(ctx: JobContext, command: str, recipe_change: RecipeChange) -> None:
    """Record the recipe where the run lives; a different one there is refused unless ``recipe_change``
    says to start a new run or continue (``job.recipe``)."""
    if command not in CLAIMING:
        return
    from job.recipe import claim_run

    distributed.once(lambda: claim_run(ctx.config, ctx.run_uri, ctx.workdir, recipe_change))


def fetch(ctx: JobContext) -> None:
    from job.fetch.run import fetch_inputs

    # The work directory is per machine: its first process fills it, the others wait (job/distributed.py).
    distributed.once_per_machine(lambda: fetch_inputs(ctx))


def warm(ctx: JobContext) -> None:
    from job.cache.remote import download_caches, upload_caches
    from job.cache.warm import warm_caches

    def warm_here() -> None:
        # Remote shards first: a fresh machine then finds everything cached and loads no encoder.
        download_caches(ctx)
        upload_caches(ctx, warm_caches(ctx))
        warm_offload_files(ctx)

    distributed.once_per_machine(warm_here)


def warm_offload_files(ctx: JobContext) -> None:
    """The disk-backed group-offload files (``group_offload_to_disk_path``), paid for before training."""
    job = ctx.config.job
    if not (job.enable_group_offload and job.group_offload_to_disk_path):
        return
    from job.model.components import compute_device
    from job.model.offload.apply import write_offload_files
    from job.model.source import local_model_path

    started = time.perf_counter()
    report = write_offload_files(
        job, local_model_path(job, ctx.workdir), ctx.workdir.offload, compute_device()
    )
    if report is not None:
        log.info(
            "warm: group-offload files in %s: %d written, %d valid already (%.1f s)",
            report.directory,
            len(report.written),
            len(report.reused),
            time.perf_counter() - started,
        )


def train(ctx: JobContext) -> None:
    from job import lease
    from job.preemption import stop_requested
    from job.train.remote import durable_checkpoints
    from job.train.run import train_adapter

    def should_stop() -> bool:
        # A signal, or the run lease lost to another process (which then owns the run URI's checkpoints).
        return stop_requested() or lease.lost()

    # In a run, preflight sized the config by the flavour's grid; the fetched model's own decides now.
    require_model_sizes(ctx)

    # Resumes from the run URI's newest checkpoint when it is newer, uploads each new one in the background.
    with durable_checkpoints(ctx.config.job, ctx.workdir.checkpoints, ctx.run_uri) as hooks:
        train_adapter(ctx, should_stop=should_stop, checkpoint_hooks=hooks)


def publish(ctx: JobContext) -> None:
    from job.publish.run import publish_output

    distributed.once(lambda: publish_output(ctx))


def run(ctx: JobContext) -> None:
    from job.preemption import current as preemption
    from job.publish.reuse import finished_output
    from job.track.status import report_phase

    if distributed.on_each_machine_first(lambda: finished_output(ctx)):
        log.info("run: this recipe is already trained (%s); publishing it, no training", ctx.workdir.output)
        report_phase("publish")
        publish(ctx)
        return
    for stage in (fetch, warm, train, publish):
        preemption().raise_if_requested(f"the start of {stage.__name__}")
        report_phase(stage.__name__)
        stage(ctx)
