"""``lokr-job check``: everything a run needs, found out before a GPU is rented.

Config validation happened when the context was opened (every error at once, exit 2). Here: access
(``job.check.access``), the dataset census (``job.check.census``), steps and epochs, cache size and peak
VRAM (``job.check.estimate``). Every finding is gathered before the exit code is chosen, so one check
lists every problem; the code is the one ``run`` would meet first: config (2), then permissions (4,
fetch comes before warm), then data (3).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from job.check.access import check_access
from job.check.census import census
from job.check.disk import disk_estimate, disk_problems
from job.check.estimate import (
    cache_estimate,
    steps_and_epochs,
    text_width,
    transformer_config,
    vram_estimate,
)
from job.check.preflight import tracker_warnings
from job.check.render import render_text
from job.check.report import CheckReport
from job.context import JobContext, open_context
from job.data.buckets import StepShape
from job.data.geometry import ModelGeometry, bucket_size
from job.data.sampler import EpochSampler
from job.errors import ConfigError, DataError, ExitCode, JobError, PermissionDeniedError, TransientError
from job.recipe import RecipeChange, recipe_check


def check_command(
    config_uri: str | None,
    workdir: str | Path,
    run_uri: str | None,
    overrides: list[str],
    *,
    as_json: bool,
    recipe_change: RecipeChange = "refuse",
) -> None:
    """Open the context and check it; with ``as_json`` even a config that does not load gives one object."""
    try:
        if not config_uri:
            raise ConfigError(
                "no config given: pass --config URI or set LOKR_CONFIG (config.json as a path, s3://bucket/key "
                "or hf://owner/repo/path)"
            )
        ctx = open_context(config_uri, workdir, run_uri, overrides)
    except JobError as exc:
        if as_json:
            problems = getattr(exc, "problems", [exc.message])
            print(json.dumps({"ok": False, "exit_code": int(exc.exit_code), "problems": problems}))
        raise
    run_check(ctx, as_json=as_json, recipe_change=recipe_change)


def run_check(
    ctx: JobContext, *, as_json: bool = False, recipe_change: RecipeChange = "refuse"
) -> CheckReport:
    """Print the report (text, or one JSON object); raise the ``JobError`` of its exit code, if any."""
    report = build_report(ctx, recipe_change)
    print(json.dumps(report.as_dict()) if as_json else render_text(report))
    code = report.exit_code
    if code:
        messages = [message for problem_code, message in report.problems if problem_code == code]
        if code == ExitCode.BAD_CONFIG:
            raise ConfigError(messages)
        error = {
            int(ExitCode.NO_PERMISSION): PermissionDeniedError,
            int(ExitCode.BAD_DATA): DataError,
        }.get(code, TransientError)  # network trouble while probing: worth running check again
        raise error("\n".join(messages))
    return report


def build_report(ctx: JobContext, recipe_change: RecipeChange = "refuse") -> CheckReport:
    from job.cache.plan import check_config
    from job.check.sizes import size_problems
    from job.model.components import fetched_model_folder, job_geometry

    cfg, job = ctx.config, ctx.config.job
    report = CheckReport(
        str(cfg.config_path), cfg.hash, job.model_source, job.base_model_precision, list(cfg.warnings)
    )
    # A Hub or remote model not fetched yet: its flavour's known grid stands in.
    model_folder = fetched_model_folder(job, ctx.workdir)
    geometry = job_geometry(job, model_folder)
    report.problems += [(int(ExitCode.BAD_CONFIG), p) for p in size_problems(cfg, geometry)]
    try:
        check_config(cfg.datasets, geometry)
    except ConfigError as exc:
        report.problems += [(int(ExitCode.BAD_CONFIG), p) for p in exc.problems]
    if job.model_type == "full":
        from job.model.deepspeed import require_deepspeed

        try:
            require_deepspeed()
        except ConfigError as exc:
            report.problems.append((int(ExitCode.BAD_CONFIG), exc.message))

    report.access = check_access(cfg, ctx.run_uri)
    report.problems += [(a.exit_code, f"{a.what} ({a.uri}): {a.detail}") for a in report.access if not a.ok]
    listings = {a.what: a.objects for a in report.access if a.objects is not None}
    try:
        stale = recipe_check(cfg, ctx.run_uri, ctx.workdir, recipe_change)
    except JobError as exc:
        report.problems.append((int(exc.exit_code), f"recipe record: {exc.message}"))
    else:
        if stale:
            report.problems.append((int(ExitCode.BAD_CONFIG), stale))
    report.warnings += tracker_warnings(cfg)

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    step = StepShape.of(job, world_size)
    report.datasets = [
        census(ctx, dataset, geometry, step, listing=listings.get(f"dataset {dataset.id!r}"))
        for dataset in cfg.datasets
    ]
    report.problems += [(int(ExitCode.BAD_DATA), d.problem) for d in report.datasets if d.problem]
    _estimate(ctx, report, model_folder, geometry, world_size)
    report.disk = disk_estimate(cfg, ctx.workdir, report.access, report.cache, report.vram, report.steps)
    report.problems += disk_problems(report.disk)
    return report


def _estimate(
    ctx: JobContext, report: CheckReport, model_folder: Path | None, geometry: ModelGeometry, world_size: int
) -> None:
    cfg, job = ctx.config, ctx.config.job
    global_batch = job.train_batch_size * world_size
    usable = [d for d in report.datasets if d.scanned and not d.problem]
    unscanned = [d for d in report.datasets if not d.scanned and not d.problem]
    batches = EpochSampler([d.sampler_dataset() for d in usable], seed=job.seed, global_batch=global_batch)
    # Not fetched yet: sizes unknown, so each image is taken as one bucket's member at the target size.
    square = bucket_size(1.0, job.resolution, job.resolution_type, geometry)
    report.batches_per_epoch = batches.batches_per_epoch + sum(
        d.images * (d.repeats + 1) // global_batch for d in unscanned
    )
    if unscanned:
        report.estimates_note = (
            f"datasets {', '.join(d.id for d in unscanned)} are not fetched yet: their images are counted "
            f"from the listing and taken as {square[0]}x{square[1]}; run lokr-job fetch for exact numbers"
        )
    if report.batches_per_epoch:
        report.steps, report.epochs = steps_and_epochs(cfg, report.batches_per_epoch)
    elif not report.problems:
        report.problems.append(
            (int(ExitCode.BAD_DATA), "no dataset has a usable bucket: nothing to train on")
        )

    buckets: dict[tuple[int, int], int] = {}
    for dataset in usable:
        for size, count in dataset.buckets.items():
            buckets[size] = buckets.get(size, 0) + count
    if unscanned:
        buckets[square] = buckets.get(square, 0) + sum(d.images for d in unscanned)
    captions = {c for d in usable for c in d.caption_texts}
    # What warm also embeds: the empty caption and the validation prompts (placeholders left unfilled:
    # only their number matters here).
    captions |= {
        "",
        job.validation_negative_prompt,
        job.validation_prompt or "",
        *cfg.prompt_library.values(),
    }
    # A remote dataset's captions are unknown until fetched: at most one per image.
    text_count = len(captions) + sum(d.images for d in unscanned)
    width = text_width(model_folder)
    report.cache = cache_estimate(buckets, text_count, max_tokens=job.max_token_length, text_width=width)
    largest = max(buckets, key=lambda s: s[0] * s[1], default=square)
    config, source = transformer_config(model_folder)
    report.vram = vram_estimate(cfg, config, source, largest, world_size)
