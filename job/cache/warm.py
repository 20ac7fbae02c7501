"""``lokr-job warm``: fill the latent and text-embedding caches, encoding only what is missing.

1. Plan every dataset (cheap once warm): scan the folder, skip bad files, pick each image's transform and
   bucket, drop buckets too small for a step, compute content keys. Config and data errors surface here,
   for every dataset at once, before anything is encoded.
2. Encode the missing latents, bucket by bucket in batches of ``vae_batch_size``, while a thread pool
   decodes the next images; with ``vae_cache_ondemand`` leave them to training (job.cache.ondemand).
   Cache the loss masks (job.cache.masks).
3. Encode the missing text embeddings (captions, the empty caption, validation prompts) in batches of
   ``text_encoder_batch_size`` (SimpleTuner's default of 1: one caption per encoder call).
   ``write_batch_size`` bounds the entries waiting to be written. A dataset whose ``skip_file_discovery``
   names ``vae`` or ``text`` has its latents or captions left as they are (trusted to be cached).
4. Write each dataset's training plan (``cache/buckets/<dataset>.json``) and bad-data report.

The VAE and text encoder are loaded only when something is missing: a second warm on unchanged data
stats the images, reads a few index files, loads no model and imports no diffusers (the encoding side,
``job.cache.fill``, is imported only when something is missing), nor torch with a CPU-only build of it; a
CUDA build is imported to choose the device, which the text cache's keys depend on.
"""

import logging
import os
from pathlib import Path

from job import preemption
from job.cache import layout
from job.cache.identity import FileHashes, folder_identity
from job.cache.keys import text_identity, text_key, vae_identity
from job.cache.lazy import LazyModel
from job.cache.manifest import LatentSource, Manifest, PlannedSample, plan_fingerprint, write_manifest
from job.cache.plan import DatasetPlan, check_config, drop_failed, plan_datasets
from job.cache.report import WarmReport
from job.cache.store import CacheIndex
from job.config.loader import ResolvedConfig
from job.config.schema import JobConfig
from job.context import JobContext
from job.data.buckets import StepShape
from job.data.discovery import encodes_on_demand, skipped_stages
from job.errors import ConfigError
from job.model.components import (
    compute_device,
    compute_device_type,
    job_geometry,
    load_text_encoder,
    load_vae,
    text_encoder_dtype_name,
)
from job.model.source import local_model_path
from job.workdir import WorkDir

log = logging.getLogger("lokr")

VAE_DTYPE = "float32"


def warm_caches(ctx: JobContext) -> WarmReport:
    job = ctx.config.job
    folder = Path(local_model_path(job, ctx.workdir))
    geometry = job_geometry(job, folder)
    check_config(ctx.config.datasets, geometry)
    step = StepShape.of(job, _world_size_from_env())
    vae_id, text_id = _identities(
        job, ctx.workdir, folder, text_dtype=text_encoder_dtype_name(compute_device_type())
    )

    plans = plan_datasets(ctx.config, ctx.workdir, geometry, step, vae_id)
    report = WarmReport([plan.report for plan in plans])

    vae = LazyModel(
        lambda: load_vae(
            folder, compute_device(), tiling=job.vae_enable_tiling, slicing=job.vae_enable_slicing
        )
    )
    indexes: dict[Path, CacheIndex] = {}
    for plan in plans:
        # Between datasets (every entry written so far is whole and indexed): a SIGTERM stops here, exit 75.
        preemption.current().raise_if_requested(f"warm (before dataset {plan.dataset.id})")
        if "vae" in skipped_stages(job, plan.dataset):
            log.info("warm: dataset %r: latents not looked for (skip_file_discovery: vae)", plan.dataset.id)
            continue
        index = indexes.setdefault(plan.cache_dir, CacheIndex.load(plan.cache_dir))
        wanted = {key: sample for sample, key in plan.usable()}
        missing = index.lacking({key: sample.relpath for key, sample in wanted.items()})
        index.save()  # entries adopted from disk: the next warm finds them in the index, no stat each
        plan.report.latents_cached = len(wanted) - len(missing)
        if missing and encodes_on_demand(job, plan.dataset):
            log.info(
                "warm: dataset %r: %d latents left to training, which encodes each on first use "
                "(vae_cache_ondemand)",
                plan.dataset.id,
                len(missing),
            )
        elif missing:
            # Imported only now: encoding needs torch, "is everything cached?" does not.
            from job.cache.fill import fill_latents

            batch = [(key, wanted[key]) for key in missing]
            fill_latents(plan, batch, vae, index, job.vae_batch_size, write_batch_size=job.write_batch_size)
            drop_failed(plan, step)
        _warm_masks(plan, index, geometry.latent_scale)
    report.vae_loaded = vae.loaded
    report.adopted = sum(index.adopted for index in indexes.values())
    vae.release()

    preemption.current().raise_if_requested("warm (before the text embeddings)")
    # The empty caption (caption dropout) and validation prompts, so training never needs the encoder.
    extra = ["", *_validation_prompts(ctx.config)]
    # Each distinct caption's key, hashed once: thousands of images often share a few captions.
    text_keys = {
        caption: text_key(caption, text_id)
        for caption in dict.fromkeys(
            [*(caption for plan in plans for sample in plan.samples for caption in sample.captions), *extra]
        )
    }
    wanted_text = {
        text_keys[caption]: caption
        for plan in plans
        if "text" not in skipped_stages(job, plan.dataset)
        for sample, _ in plan.usable()
        for caption in sample.captions
    }
    wanted_text.update((text_keys[caption], caption) for caption in extra)
    text_index = CacheIndex.load(layout.text_dir(ctx.workdir, ctx.config.text_embeds))
    missing_text = text_index.lacking(wanted_text)
    text_index.save()
    report.text_cached = len(wanted_text) - len(missing_text)
    if missing_text:
        from job.cache.fill import fill_text  # encoding needs torch (see above)

        text_encoder = LazyModel(lambda: load_text_encoder(folder, compute_device()))
        text = fill_text(
            {key: wanted_text[key] for key in missing_text},
            text_index,
            text_encoder,
            batch_size=ctx.config.text_embeds.text_encoder_batch_size or job.text_encoder_batch_size,
            write_batch_size=ctx.config.text_embeds.write_batch_size or job.write_batch_size,
            max_length=job.max_token_length,
        )
        report.text_new, report.text_truncated = text.new, text.truncated
        report.text_encoder_loaded = text_encoder.loaded
        text_encoder.release()

    report.indexed = text_index.added + sum(index.added for index in indexes.values())
    for plan in plans:
        _write_manifest(ctx.config, ctx.workdir, plan, text_id, text_keys)
        path = layout.report_path(ctx.workdir, plan.dataset.id)
        plan.report.write(path)
        plan.report.log_summary(path)
    log.info("warm: text embeddings: %d cached, %d new", report.text_cached, report.text_new)
    if report.text_truncated:
        log.warning(
            "warm: %d captions are longer than %d tokens and were truncated (max_token_length)",
            report.text_truncated,
            job.max_token_length,
        )
    return report


def _warm_masks(plan: DatasetPlan, index: CacheIndex, latent_scale: int) -> None:
    """Cache the loss masks of the plan's usable samples beside their latents (masks need no model)."""
    if plan.masks is None:
        return
    wanted = {plan.mask_keys[sample.relpath]: sample for sample, _ in plan.usable()}
    missing = index.lacking({key: sample.relpath for key, sample in wanted.items()})
    plan.report.masks_cached = len(wanted) - len(missing)
    if missing:
        from job.cache.masks import fill_masks  # needs torch (see above)

        fill_masks(plan.masks, [(key, wanted[key]) for key in missing], index, latent_scale)
        plan.report.masks_new = len(missing)


def _world_size_from_env() -> int:
    """The number of training processes (torchrun and accelerate set WORLD_SIZE)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def _identities(job: JobConfig, workdir: WorkDir, folder: Path, *, text_dtype: str) -> tuple[str, str]:
    """The VAE's and the text side's identities: hashes of their files (remembered by size and mtime)."""
    hashes = FileHashes(layout.file_hashes_path(workdir))
    try:
        vae_id = vae_identity(folder_identity(folder / "vae", hashes), VAE_DTYPE, tiled=job.vae_enable_tiling)
        text_id = text_identity(
            folder_identity(folder / "text_encoder", hashes),
            folder_identity(folder / "tokenizer", hashes),
            job.max_token_length,
            text_dtype,
        )
    except FileNotFoundError as exc:
        raise ConfigError(f"model folder {folder} is incomplete: {exc}") from None
    hashes.save()
    return vae_id, text_id


def _validation_prompts(config: ResolvedConfig) -> list[str]:
    """The prompts validation renders, as it renders them (``<token>`` filled in), and its negative."""
    from job.validate.prompts import validation_prompts

    prompts = [*validation_prompts(config).values(), config.job.validation_negative_prompt]
    return [prompt for prompt in prompts if prompt]


def _write_manifest(
    config: ResolvedConfig, workdir: WorkDir, plan: DatasetPlan, text_id: str, text_keys: dict[str, str]
) -> None:
    on_demand = encodes_on_demand(config.job, plan.dataset)
    samples = [
        PlannedSample(
            relpath=sample.relpath,
            bucket=sample.transform.bucket,
            latent_key=key,
            text_keys=tuple(text_keys[caption] for caption in sample.captions),
            mask_key=plan.mask_keys.get(sample.relpath),
            source=LatentSource(sample.sha256, sample.transform) if on_demand else None,
        )
        for sample, key in zip(plan.samples, plan.latent_keys, strict=True)
    ]
    manifest = Manifest(
        dataset_id=plan.dataset.id,
        fingerprint=plan_fingerprint(config, plan.dataset),
        text_identity=text_id,
        null_text_key=text_keys[""],
        samples=samples,
    )
    write_manifest(layout.manifest_path(workdir, plan.dataset.id), manifest)
