"""Read ``multidatabackend.json``: the image datasets, their loss-mask backends and the text-embedding cache.

SimpleTuner's rules: a dataset setting left out takes config.json's value of the same name; a mask backend
(``dataset_type: conditioning``, ``conditioning_type: mask``) is linked from the image backend it masks by
that backend's ``conditioning_data``.
"""

from pathlib import Path

from pydantic import BaseModel

from job.config import paths, simpletuner
from job.config.backends import CREDENTIAL_FIELDS, DatasetConfig, TextEmbedsConfig
from job.config.problems import Problems, read_json5, validate
from job.config.schema import JobConfig
from job.config.screening import screen_keys


def load_backends(
    path: Path | None, job: JobConfig | None, problems: Problems, origin: paths.RemoteOrigin | None
) -> tuple[list[DatasetConfig], TextEmbedsConfig | None, list[DatasetConfig]]:
    if path is None:
        return [], None, []
    entries = read_json5(path, problems, expect=list)
    if entries is None:
        return [], None, []
    datasets: list[DatasetConfig] = []
    disabled: list[DatasetConfig] = []  # image backends switched off, and so their masks
    masks: list[DatasetConfig] = []
    text_embeds: TextEmbedsConfig | None = None
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"{path}[{index}]"
        if not isinstance(entry, dict):
            problems.error(where, "each backend must be a JSON object")
            continue
        name = entry.get("id", f"#{index}")
        where = f"{path} (backend {name!r})"
        if name in seen:
            problems.error(where, f"id {name!r} is used twice; ids must be unique")
        seen.add(name)
        kind = entry.get("dataset_type", "image")
        if kind == "text_embeds":
            model: type[BaseModel] = TextEmbedsConfig
        elif kind in ("image", "conditioning"):
            model = DatasetConfig
        else:
            problems.error(
                where, f"dataset_type {kind!r} is not supported (use image, conditioning or text_embeds)"
            )
            continue
        entry = dict(entry)
        screen_keys(entry, set(model.model_fields), simpletuner.options().dataset, Path(where), problems)
        # Cache folders are resolved against the work directory later, not against the config.
        if isinstance(entry.get("instance_data_dir"), str) and entry["instance_data_dir"]:
            entry["instance_data_dir"] = _resolve_data_dir(
                entry["instance_data_dir"], path, where, problems, origin
            )
        parsed = validate(model, entry, where, problems)
        if isinstance(parsed, DatasetConfig) and (warning := _credentials_warning(parsed)):
            problems.warn(where, warning)
        if isinstance(parsed, TextEmbedsConfig):
            text_embeds = parsed
        elif isinstance(parsed, DatasetConfig) and parsed.dataset_type == "conditioning":
            masks.append(parsed)
        elif isinstance(parsed, DatasetConfig) and parsed.disabled:
            disabled.append(parsed)
        elif isinstance(parsed, DatasetConfig):
            datasets.append(_inherit(parsed, job) if job else parsed)
    if not datasets and not any(e.startswith(str(path)) for e in problems.errors):
        problems.error(
            path, "no enabled image dataset (every backend is disabled, conditioning or text_embeds)"
        )
    return datasets, text_embeds, _linked_masks(path, datasets, masks, disabled, problems)


def _linked_masks(
    path: Path,
    datasets: list[DatasetConfig],
    masks: list[DatasetConfig],
    disabled: list[DatasetConfig],
    problems: Problems,
) -> list[DatasetConfig]:
    """The mask backends linked to image datasets (SimpleTuner's masked-loss layout), each image dataset's
    ``conditioning_data`` set to its mask's id. A dangling link, a disabled mask or a mask linked to no
    dataset is an error: training would silently count the whole image. The mask of a disabled image
    backend goes unused with it."""
    by_id = {mask.id: mask for mask in masks}
    position = {dataset.id: index for index, dataset in enumerate(datasets)}
    off_ids = {dataset.id for dataset in disabled}
    unused = {dataset.conditioning_data for dataset in disabled} | {
        mask.id for mask in masks if mask.source_dataset_id in off_ids
    }
    for mask in masks:
        source = mask.source_dataset_id
        if mask.disabled or not source or mask.id in unused:
            continue
        where = f"{path} (backend {mask.id!r})"
        if source not in position:
            problems.error(where, f"source_dataset_id: no enabled image backend has id {source!r}")
            continue
        dataset = datasets[position[source]]
        if dataset.conditioning_data not in (None, mask.id):
            problems.error(
                where,
                f"source_dataset_id: image backend {source!r} already names mask backend "
                f"{dataset.conditioning_data!r} in conditioning_data; link it one way",
            )
        datasets[position[source]] = dataset.model_copy(update={"conditioning_data": mask.id})
    linked: dict[str, DatasetConfig] = {}
    for dataset in datasets:
        name = dataset.conditioning_data
        if not name:
            continue
        where = f"{path} (backend {dataset.id!r})"
        mask = by_id.get(name)
        if mask is None:
            known = ", ".join(repr(m) for m in by_id) or "none"
            problems.error(
                where,
                f"conditioning_data: no backend with dataset_type conditioning has id {name!r} "
                f"(mask backends: {known})",
            )
        elif mask.disabled:
            problems.error(
                where, f"conditioning_data: mask backend {name!r} is disabled; enable it or unlink it"
            )
        else:
            linked[name] = mask
    for mask in masks:
        if mask.id not in linked and not mask.disabled and mask.id not in unused:
            problems.error(
                f"{path} (backend {mask.id!r})",
                f"no image backend names this mask backend; add conditioning_data: {mask.id!r} to the image "
                "backend whose loss it masks (or source_dataset_id to this one)",
            )
    return list(linked.values())


def _credentials_warning(dataset: DatasetConfig) -> str | None:
    """Keys written in the file work (SimpleTuner reads them), but a file is copied, shared and committed
    far more often than an environment: say so, naming the keys and never their values."""
    keys = [name for name in CREDENTIAL_FIELDS if getattr(dataset, name) is not None]
    if not keys:
        return None
    if dataset.type != "aws" and not (dataset.instance_data_dir or "").startswith("s3://"):
        return f"{', '.join(keys)}: not used, this backend does not read from S3; remove them from the file"
    return (
        f"{', '.join(keys)}: keys in the config file, used for this dataset only; prefer the environment "
        "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), an AWS profile or an instance/IRSA role, and keep keys "
        "out of files that get copied and shared"
    )


def _resolve_data_dir(
    value: str, path: Path, where: str, problems: Problems, origin: paths.RemoteOrigin | None
) -> str:
    """A remote dataset is fetched later; a local one must exist now. In a fetched config set, a relative
    folder lives next to the remote files."""
    if origin is not None and origin.remote_candidates(value, path):
        found, looked = origin.find_folder(value, path)
        if found is None:
            problems.error(
                where, f"instance_data_dir: no objects under {value!r}; looked in: {', '.join(looked)}"
            )
        return found or value
    resolved = paths.resolve(value, path)
    if not paths.is_remote(resolved) and not Path(resolved).is_dir():
        looked = ", ".join(str(p) for p in paths.candidates(value, path))
        problems.error(where, f"instance_data_dir: folder {value!r} not found; looked in: {looked}")
    return resolved


def _inherit(dataset: DatasetConfig, job: JobConfig) -> DatasetConfig:
    """SimpleTuner's rule: a dataset setting left out takes the config.json value of the same name."""
    fields = (
        "resolution",
        "resolution_type",
        "minimum_image_size",
        "maximum_image_size",
        "target_downsample_size",
        "caption_dropout_probability",
    )
    update = {name: getattr(job, name) for name in fields if getattr(dataset, name) is None}
    return dataset.model_copy(update=update)
