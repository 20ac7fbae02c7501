"""Read a SimpleTuner-format config set from local files into a ``ResolvedConfig``.

Every problem in every file is collected and raised as one ``ConfigError`` (exit 2), each naming the
file and the key, so a user fixes them all in one go instead of one per run.
"""

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from job.config import paths, simpletuner
from job.config.backends import CREDENTIAL_FIELDS, DatasetConfig, TextEmbedsConfig
from job.config.deepspeed import deepspeed_problems
from job.config.problems import Problems, read_json5, validate
from job.config.schema import JobConfig, LycorisConfig
from job.errors import ConfigError
from job.redact import remember_secrets

# Keys of config.json that name another file which must exist.
FILE_KEYS = ("data_backend_config", "lycoris_config", "user_prompt_library", "deepspeed_config")


@dataclass(frozen=True)
class ResolvedConfig:
    """The whole validated config set, paths absolute (or URIs), dataset defaults filled in."""

    job: JobConfig
    datasets: list[DatasetConfig]
    text_embeds: TextEmbedsConfig
    lycoris: LycorisConfig | None
    prompt_library: dict[str, str]
    deepspeed: dict[str, Any] | None  # deepspeed_config's contents, checked
    config_path: Path
    files: dict[str, Path] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def recipe(self) -> dict[str, Any]:
        """Everything that decides what is trained, as plain JSON (recorded in the run URI): the config
        less the settings that only change how a run is watched, published, checkpointed or fitted in
        memory (``OUTCOME_NEUTRAL_KEYS``)."""
        recipe: dict[str, Any] = {
            "job": self.job.model_dump(mode="json", exclude=set(OUTCOME_NEUTRAL_KEYS)),
            # Keys reach the data; they do not change it (and must never be written to the run URI). Where
            # latents are kept and which discovery warm skips do not change it either.
            "datasets": [
                d.model_dump(
                    mode="json", exclude={"cache_dir_vae", "skip_file_discovery", *CREDENTIAL_FIELDS}
                )
                for d in self.datasets
            ],
            "lycoris": self.lycoris.model_dump(mode="json") if self.lycoris else None,
        }
        if self.deepspeed is not None:
            recipe["deepspeed"] = self.deepspeed
        return recipe

    @property
    def hash(self) -> str:
        """Identifies the training recipe; a run URI started under another recipe is refused."""
        return recipe_hash(self.recipe)


# config.json keys that never change the weights a run trains (same seed, same data): editing them on an
# existing run URI continues the run. The memory settings are here because a replacement machine with a
# smaller GPU turns them on for the same run; the file keys because their contents are in the recipe
# themselves (their paths differ from one work directory to the next).
OUTCOME_NEUTRAL_KEYS = frozenset(
    {
        "lycoris_config",
        "data_backend_config",
        "deepspeed_config",
        "user_prompt_library",
        "write_batch_size",
        "text_encoder_batch_size",
        "skip_file_discovery",
        "checkpoint_step_interval",
        "checkpoints_total_limit",
        "resume_from_checkpoint",
        "validation_prompt",
        "validation_negative_prompt",
        "validation_step_interval",
        "validation_seed",
        "validation_resolution",
        "validation_guidance",
        "validation_guidance_rescale",
        "validation_lycoris_strength",
        "validation_num_inference_steps",
        "eval_steps_interval",
        "num_eval_images",
        "report_to",
        "tracker_project_name",
        "tracker_run_name",
        "webhook_url",
        "push_to_hub",
        "hub_model_id",
        "hub_private",
        "cache_uri",
        "gradient_checkpointing",
        "gradient_checkpointing_interval",
        "enable_group_offload",
        "group_offload_type",
        "group_offload_blocks_per_group",
        "group_offload_use_stream",
        "group_offload_to_disk_path",
        "enable_model_cpu_offload",
    }
)


def recipe_hash(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def load_config(
    config_path: Path | str,
    overrides: list[str] | None = None,
    *,
    remote_origin: paths.RemoteOrigin | None = None,
) -> ResolvedConfig:
    """Load ``config.json`` and the files it references; raise ``ConfigError`` listing every problem.

    ``remote_origin``: the config set was fetched from S3 or the Hub into ``remote_origin.mirror``; a
    relative dataset folder or model path then names a place next to the remote files.
    """
    config_path = Path(config_path).resolve()
    problems = Problems()
    raw = read_json5(config_path, problems, expect=dict)
    if raw is None:
        raise ConfigError(problems.errors)
    raw = {key.removeprefix("--"): value for key, value in raw.items()}
    raw.update(parse_overrides(overrides or [], problems))

    known = set(JobConfig.model_fields)
    _screen_keys(raw, known, simpletuner.options().config, config_path, problems)
    files = _resolve_files(raw, config_path, problems, remote_origin)
    local_or_remote = ("pretrained_model_name_or_path", "group_offload_to_disk_path", "cache_uri")
    for key in (*local_or_remote, "pretrained_evaluation_model_name_or_path", "validation_preview_model"):
        if isinstance(raw.get(key), str) and raw[key]:
            origin = remote_origin if key == "pretrained_model_name_or_path" else None
            raw[key] = _resolve_model_or_path(raw[key], config_path, origin)
    job = validate(JobConfig, {k: v for k, v in raw.items() if k in known}, config_path, problems)
    if job is not None and job.shift_overridden:
        problems.warn(
            config_path,
            f"flow_schedule_shift: {job.flow_schedule_shift:g} is not used because flow_schedule_auto_shift is "
            "true and picks the shift from each image's size, as SimpleTuner does; remove one of the two",
        )
    if job is not None and job.validation_preview and not job.webhook_url:
        problems.warn(
            config_path,
            "validation_preview: previews are posted to the webhook, and webhook_url is not set: no previews "
            "(as SimpleTuner, which turns them off then)",
        )

    datasets, text_embeds = _load_backends(files.get("data_backend_config"), job, problems, remote_origin)
    lycoris = _load_lycoris(files.get("lycoris_config"), problems)
    library = _load_prompt_library(files.get("user_prompt_library"), problems)
    deepspeed = _load_deepspeed(files.get("deepspeed_config"), job, problems)
    if job is not None and job.model_type == "full":
        for dataset in datasets:
            if dataset.is_regularisation_data:
                problems.error(
                    files["data_backend_config"],
                    f"{dataset.id}: is_regularisation_data needs model_type lora (its targets are the base "
                    "model's predictions with the adapter off; full-rank training has no base model left)",
                )

    if problems.errors or job is None:
        raise ConfigError(problems.errors)
    return ResolvedConfig(
        job=job,
        datasets=datasets,
        text_embeds=text_embeds or TextEmbedsConfig(),
        lycoris=lycoris,
        prompt_library=library,
        deepspeed=deepspeed,
        config_path=config_path,
        files=files,
        warnings=problems.warnings,
    )


def parse_overrides(overrides: list[str], problems: Problems) -> dict[str, Any]:
    """``--set key=value`` items as config values: JSON when the value parses, else the text itself."""
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.error("--set", f"{item!r} is not key=value (e.g. --set max_train_steps=100)")
            continue
        try:
            parsed[key.strip().removeprefix("--")] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key.strip().removeprefix("--")] = value
    remember_secrets(parsed)
    return parsed


def _screen_keys(
    raw: dict[str, Any],
    known: set[str],
    table: dict[str, simpletuner.Option],
    where: Path,
    problems: Problems,
) -> None:
    """Map SimpleTuner's older spellings onto their keys, warn on the options lokr-job ignores, refuse the
    ones it cannot honour, and report unknown keys with the nearest known one."""
    for key in [k for k in raw if k not in known and k in table and table[k].disposition == "alias"]:
        canonical, value = table[key].of, raw.pop(key)
        if table[key].negate:
            # ignore_final_epochs: true is strict_epoch_limit: false (SimpleTuner's cmd_args.py rewrites it).
            if simpletuner.asks_for_nothing(table[key], value):
                continue
            value = simpletuner.negated(value)
            if value is None:
                problems.error(
                    where, f"{key}: must be true or false (SimpleTuner's older {canonical}, inverted)"
                )
                continue
            clash = canonical in raw and simpletuner.negated(raw[canonical]) == value
        else:
            clash = canonical in raw and raw[canonical] != value
        if clash:
            problems.error(
                where,
                f"{key}: SimpleTuner's older name for {canonical}, and both are set to different "
                f"values; keep {canonical} only",
            )
        raw.setdefault(canonical, value)
    for key in list(raw):
        if key in known:
            continue
        value = raw.pop(key)
        option = table.get(key)
        if option is None:
            near = difflib.get_close_matches(key, sorted(known | set(table)), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            problems.error(
                where, f"{key}: unknown option (value {simpletuner.shown_value(key, value)}){hint}"
            )
        elif option.disposition == "refused" and not simpletuner.asks_for_nothing(option, value):
            problems.error(
                where,
                f"{key}: SimpleTuner option refused by lokr-job: {option.reason}; {option.instead} "
                f"(value {simpletuner.shown_value(key, value)})",
            )
        elif option.name == "num_processes":
            if problem := simpletuner.world_size_problem(value):
                problems.error(where, problem)
        else:
            # Acted on elsewhere (a text_embeds key on an image backend, say) means unused here.
            reason = option.reason or "not used by this kind of entry"
            problems.warn(where, f"{key}: known SimpleTuner option, ignored by lokr-job ({reason})")


def _resolve_files(
    raw: dict[str, Any], config_path: Path, problems: Problems, origin: paths.RemoteOrigin | None
) -> dict[str, Path]:
    files: dict[str, Path] = {}
    root = origin.mirror if origin else None
    for key in FILE_KEYS:
        value = raw.get(key)
        if not isinstance(value, str) or not value:
            continue
        found = paths.resolve_local(value, config_path, root)
        if found is None or not found.is_file():
            looked = ", ".join(str(p) for p in paths.candidates(value, config_path, root))
            similar = paths.similar_files(value, config_path)
            hint = f"; a similarly named file exists: {similar[0]} (point {key} at it)" if similar else ""
            problems.error(config_path, f"{key}: file {value!r} not found; looked in: {looked}{hint}")
            continue
        files[key] = found
        raw[key] = str(found)
    return files


def _resolve_model_or_path(value: str, config_path: Path, origin: paths.RemoteOrigin | None) -> str:
    """A local folder becomes absolute; a Hub repo id (owner/name) or a URI stays as written. In a fetched
    config set, a relative path is a folder next to the remote files (SimpleTuner's ``model/`` beside
    ``config/``) when one is there, else a Hub repo id."""
    if paths.is_remote(value):
        return value
    if origin is not None and origin.remote_candidates(value, config_path):
        return origin.find_folder(value, config_path)[0] or value
    found = paths.resolve_local(value, config_path)
    return str(found) if found else value


def _load_backends(
    path: Path | None, job: JobConfig | None, problems: Problems, origin: paths.RemoteOrigin | None
) -> tuple[list[DatasetConfig], TextEmbedsConfig | None]:
    if path is None:
        return [], None
    entries = read_json5(path, problems, expect=list)
    if entries is None:
        return [], None
    datasets: list[DatasetConfig] = []
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
        elif kind == "image":
            model = DatasetConfig
        else:
            problems.error(where, f"dataset_type {kind!r} is not supported (use image or text_embeds)")
            continue
        entry = dict(entry)
        _screen_keys(entry, set(model.model_fields), simpletuner.options().dataset, Path(where), problems)
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
        elif isinstance(parsed, DatasetConfig) and not parsed.disabled:
            datasets.append(_inherit(parsed, job) if job else parsed)
    if not datasets and not any(e.startswith(str(path)) for e in problems.errors):
        problems.error(path, "no enabled image dataset (every backend is disabled or text_embeds)")
    return datasets, text_embeds


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


def _load_lycoris(path: Path | None, problems: Problems) -> LycorisConfig | None:
    if path is None:
        return None
    raw = read_json5(path, problems, expect=dict)
    if raw is None:
        return None
    parsed = validate(LycorisConfig, raw, path, problems)
    return parsed if isinstance(parsed, LycorisConfig) else None


def _load_deepspeed(path: Path | None, job: JobConfig | None, problems: Problems) -> dict[str, Any] | None:
    if path is None:
        return None
    raw = read_json5(path, problems, expect=dict)
    if raw is None or job is None:
        return None
    for problem in deepspeed_problems(raw, job):
        problems.error(path, problem)
    return raw


def _load_prompt_library(path: Path | None, problems: Problems) -> dict[str, str]:
    if path is None:
        return {}
    raw = read_json5(path, problems, expect=dict)
    if raw is None:
        return {}
    bad = [k for k, v in raw.items() if not isinstance(v, str) or not v.strip()]
    for key in bad:
        problems.error(path, f"{key}: each entry must be nickname → non-empty prompt string")
    return {k: v for k, v in raw.items() if k not in bad}
