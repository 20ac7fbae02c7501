"""The stages a run goes through. Each is a function of a ``JobContext``, idempotent, and runnable
alone; ``run`` chains them. Heavy modules are imported inside each stage so the CLI starts fast."""

import logging

from job.context import JobContext
from job.errors import ConfigError

log = logging.getLogger("lokr")


def check(ctx: JobContext) -> None:
    """Validate the config set; loading it already collected every error (exit 2) and warning."""
    cfg = ctx.config
    job = cfg.job
    print(f"config: {cfg.config_path} (recipe {cfg.hash})")
    print(f"model: {job.model_source} ({job.base_model_precision}, mixed precision {job.mixed_precision})")
    for dataset in cfg.datasets:
        role = "regularisation" if dataset.is_regularisation_data else "training"
        source = dataset.instance_data_dir or dataset.aws_bucket_name or dataset.dataset_name
        print(f"dataset {dataset.id}: {source} ({role}, repeats {dataset.repeats})")
    steps = f"{job.max_train_steps} steps" if job.max_train_steps else f"{job.num_train_epochs} epochs"
    print(f"training: {steps}, batch {job.train_batch_size} x {job.gradient_accumulation_steps}")
    print(f"warnings: {len(cfg.warnings)}; config OK")


def fetch(ctx: JobContext) -> None:
    remote = [d.id for d in ctx.config.datasets if d.type != "local" or "://" in (d.instance_data_dir or "")]
    if remote:
        raise ConfigError(f"datasets {', '.join(remote)} are remote; remote fetch is not built yet")
    log.info("fetch: config, datasets and model are local; nothing to fetch")


def warm(ctx: JobContext) -> None:
    from job.cache.warm import warm_caches

    warm_caches(ctx)


def train(ctx: JobContext) -> None:
    from job.train.run import train_adapter

    train_adapter(ctx)


def publish(ctx: JobContext) -> None:
    if ctx.config.job.push_to_hub or ctx.run_uri:
        raise ConfigError("publishing to the Hub or a run URI is not built yet; unset push_to_hub/--run-uri")
    log.info("publish: push_to_hub is off and no run URI is set; the adapter stays in %s", ctx.workdir.output)


def infer(ctx: JobContext) -> None:
    raise ConfigError("lokr-job infer is not built yet")


def run(ctx: JobContext) -> None:
    for stage in (fetch, warm, train, publish):
        stage(ctx)
