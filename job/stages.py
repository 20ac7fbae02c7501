"""The stages a run goes through. Each is a function of a ``JobContext``, idempotent, and runnable
alone; ``run`` chains them. Heavy modules are imported inside each stage so the CLI starts fast."""

import logging

from job import distributed
from job.context import JobContext

log = logging.getLogger("lokr")


def check(ctx: JobContext, *, as_json: bool = False) -> None:
    """Config (already validated when loaded), access, dataset census, steps, cache size and VRAM."""
    from job.check import run_check

    run_check(ctx, as_json=as_json)


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

    distributed.once_per_machine(warm_here)


def train(ctx: JobContext) -> None:
    from job.train.preemption import stop_requested
    from job.train.remote import durable_checkpoints
    from job.train.run import train_adapter

    # Resumes from the run URI's newest checkpoint when it is newer, uploads each new one in the background.
    with durable_checkpoints(ctx) as hooks:
        train_adapter(ctx, should_stop=stop_requested, checkpoint_hooks=hooks)


def publish(ctx: JobContext) -> None:
    from job.publish.run import publish_output

    distributed.once(lambda: publish_output(ctx))


def run(ctx: JobContext) -> None:
    from job.track.status import report_phase
    from job.train.preemption import current as preemption

    for stage in (fetch, warm, train, publish):
        preemption().raise_if_requested(f"the start of {stage.__name__}")
        report_phase(stage.__name__)
        stage(ctx)
