"""Planning a warm: each dataset's samples, buckets and latent keys, before anything is encoded.

Scanning is cheap once the probe file knows every image, so planning every dataset first surfaces every
config and data error (for all datasets at once) before minutes of encoding.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from job.cache import layout
from job.cache.keys import latent_key, mask_key
from job.cache.report import DatasetWarmReport, skip_summary
from job.config.backends import DatasetConfig
from job.config.loader import ResolvedConfig
from job.config.schema import JobConfig
from job.data.buckets import BucketPlan, StepShape, dropped_lines, plan_buckets, require_usable
from job.data.discovery import IMAGE_EXTENSIONS, trusts_last_scan
from job.data.geometry import ModelGeometry, resolution_problem
from job.data.location import local_data_dir
from job.data.masks import MaskFiles, match_masks
from job.data.scan import Sample, scan_dataset
from job.errors import ConfigError, DataError
from job.workdir import WorkDir


@dataclass
class DatasetPlan:
    dataset: DatasetConfig
    root: Path
    samples: list[Sample]  # every usable image, in usable and dropped buckets alike
    latent_keys: list[str]  # parallel to samples
    buckets: BucketPlan
    cache_dir: Path
    report: DatasetWarmReport
    masks: MaskFiles | None = None  # the loss masks, when the dataset names a mask backend
    mask_keys: dict[str, str] = field(default_factory=dict)  # relpath → its mask's cache key

    def usable(self) -> Iterator[tuple[Sample, str]]:
        """The samples of usable buckets (the ones to encode), with their latent keys."""
        for members in self.buckets.usable.values():
            for index in members:
                yield self.samples[index], self.latent_keys[index]


def check_config(datasets: list[DatasetConfig], geometry: ModelGeometry) -> None:
    """``ConfigError`` listing every dataset setting this model cannot train."""
    problems = [problem for dataset in datasets if (problem := resolution_problem(dataset, geometry))]
    problems += [
        f"dataset {d.id!r}: caption_strategy huggingface reads a Hub dataset's caption column (type "
        "huggingface); use filename, textfile or instanceprompt for a folder of images"
        for d in datasets
        if d.caption_strategy == "huggingface" and d.type != "huggingface"
    ]
    if problems:
        raise ConfigError(problems)


def plan_datasets(
    config: ResolvedConfig, workdir: WorkDir, geometry: ModelGeometry, step: StepShape, vae_id: str
) -> list[DatasetPlan]:
    """Plan every dataset; raise one ``DataError`` naming every unusable one (reports written first)."""
    plans, errors = [], []
    for dataset in config.datasets:
        try:
            plan = _plan_dataset(config.job, workdir, dataset, geometry, step, vae_id)
            if (mask := config.mask_for(dataset)) is not None:
                _pair_masks(plan, mask, workdir, geometry)
            plans.append(plan)
        except DataError as exc:
            errors.append(exc.message)
    if errors:
        raise DataError("\n".join(errors))
    return plans


def _plan_dataset(
    job: JobConfig,
    workdir: WorkDir,
    dataset: DatasetConfig,
    geometry: ModelGeometry,
    step: StepShape,
    vae_id: str,
) -> DatasetPlan:
    root = local_data_dir(dataset, workdir)
    if not root.is_dir():
        raise ConfigError(f"dataset {dataset.id!r}: its images are not in {root}; run lokr-job fetch")
    scan = scan_dataset(
        dataset,
        root,
        geometry,
        seed=job.seed,
        aspect_rounding=job.aspect_bucket_rounding,
        probe_path=layout.probe_path(workdir, dataset.id),
        trust_last_scan=trusts_last_scan(job, dataset),
    )
    report = DatasetWarmReport(dataset.id, str(root), scan.images_found, scan.probed, skipped=scan.skipped)
    report_path = layout.report_path(workdir, dataset.id)
    if not scan.samples:
        report.write(report_path)
        if not scan.images_found:
            extensions = ", ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
            raise DataError(f"dataset {dataset.id!r}: no images ({extensions}) found under {root}")
        raise DataError(
            f"dataset {dataset.id!r}: none of its {scan.images_found} images is usable "
            f"({skip_summary(scan.skipped)}); every file and reason is listed in {report_path}"
        )
    keys = [latent_key(s.sha256, s.transform, vae_id) for s in scan.samples]
    plan = DatasetPlan(
        dataset, root, scan.samples, keys, BucketPlan({}, {}), layout.latent_dir(workdir, dataset), report
    )
    try:
        _bucket(plan, step)
    except DataError:
        report.write(report_path)
        raise
    return plan


def _pair_masks(plan: DatasetPlan, mask: DatasetConfig, workdir: WorkDir, geometry: ModelGeometry) -> None:
    """Find every sample's mask (DataError naming the images without a usable one) and its cache key."""
    root = local_data_dir(mask, workdir)
    probe = layout.mask_probe_path(workdir, mask.id, plan.dataset.id)
    plan.masks = match_masks(plan.dataset.id, mask.id, plan.samples, root, probe)
    plan.mask_keys = {
        s.relpath: mask_key(plan.masks.sha256[s.relpath], s.transform, geometry.latent_scale)
        for s in plan.samples
    }


def _bucket(plan: DatasetPlan, step: StepShape) -> None:
    """Group the plan's samples into buckets and record them in its report; DataError if none is usable."""
    dataset, report = plan.dataset, plan.report
    buckets = plan_buckets([s.transform.bucket for s in plan.samples], repeats=dataset.repeats, step=step)
    plan.buckets = buckets
    report.dropped = dropped_lines(dataset.id, buckets, repeats=dataset.repeats, step=step)
    report.dropped_images = sum(len(members) for members in buckets.dropped.values())
    report.buckets = {f"{w}x{h}": len(members) for (w, h), members in buckets.usable.items()}
    report.usable_images = sum(report.buckets.values())
    require_usable(dataset.id, buckets, images=len(plan.samples), repeats=dataset.repeats, step=step)


def drop_failed(plan: DatasetPlan, step: StepShape) -> None:
    """Images that failed to encode leave their buckets; the dataset must still fill a step."""
    if not plan.report.failed:
        return
    failed = {s.relpath for s in plan.report.failed}
    kept = [i for i, sample in enumerate(plan.samples) if sample.relpath not in failed]
    plan.samples = [plan.samples[i] for i in kept]
    plan.latent_keys = [plan.latent_keys[i] for i in kept]
    _bucket(plan, step)
