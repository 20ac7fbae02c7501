"""Read a SimpleTuner-format config set from local files into a ``ResolvedConfig``.

Every problem in every file is collected and raised as one ``ConfigError`` (exit 2), each naming the
file and the key, so a user fixes them all in one go instead of one per run.
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job.config import paths, simpletuner
from job.config.backends import CREDENTIAL_FIELDS, MASK_LINK_FIELDS, DatasetConfig, TextEmbedsConfig
from job.config.databackends import load_backends
from job.config.deepspeed import deepspeed_problems
from job.config.problems import Problems, read_json5, validate
from job.config.schema import JobConfig, LycorisConfig
from job.config.screening import screen_keys
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
    # The loss-mask backends the image datasets name in conditioning_data.
    masks: list[DatasetConfig] = field(default_factory=list)

    def mask_for(self, dataset: DatasetConfig) -> DatasetConfig | None:
        """The mask backend of ``dataset``, or None when its loss is not masked."""
        return next((m for m in self.masks if m.id == dataset.conditioning_data), None)

    @property
    def backends(self) -> list[DatasetConfig]:
        """Every backend whose files are read: the image datasets and their masks."""
        return [*self.datasets, *self.masks]

    @property
    def recipe(self) -> dict[str, Any]:
        """Everything that decides what is trained, as plain JSON (recorded in the run URI): the config
        less the settings that only change how a run is watched, published, checkpointed or fitted in
        memory (``OUTCOME_NEUTRAL_KEYS``)."""
        recipe: dict[str, Any] = {
            "job": self.job.model_dump(mode="json", exclude={*OUTCOME_NEUTRAL_KEYS, *self._unused_keys()}),
            # Keys reach the data; they do not change it (and must never be written to the run URI). Where
            # latents are kept and which discovery warm skips do not change it either.
            "datasets": [
                d.model_dump(
                    mode="json",
                    # An unset link to a mask is left out: recipes from before masks keep their hash.
                    exclude={
                        "cache_dir_vae",
                        "skip_file_discovery",
                        "vae_cache_ondemand",
                        *CREDENTIAL_FIELDS,
                        *(name for name in MASK_LINK_FIELDS if getattr(d, name) is None),
                    },
                )
                for d in self.backends
            ],
            "lycoris": self.lycoris.model_dump(mode="json") if self.lycoris else None,
        }
        if self.deepspeed is not None:
            recipe["deepspeed"] = self.deepspeed
        return recipe

    def _unused_keys(self) -> set[str]:
        """config.json keys that decide nothing while their feature is off: with scheduled sampling and
        ReflexFlow off, the scheduled_sampling_* keys (so recipes from before them keep their hash)."""
        job = self.job
        if job.scheduled_sampling_max_step_offset == 0 and not job.reflexflow:
            return {name for name in JobConfig.model_fields if name.startswith("scheduled_sampling_")}
        return set()

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
        # The same latents, encoded in training instead of warm (same VAE, dtype and noise seed).
        "vae_cache_ondemand",
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
        "offload_during_startup",
        # SimpleTuner's solver for epsilon/v-prediction rollouts; a flow-matching rollout is Euler whatever
        # they say (job/train/rollout.py).
        "scheduled_sampling_sampler",
        "scheduled_sampling_order",
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
    screen_keys(raw, known, simpletuner.options().config, config_path, problems)
    files = _resolve_files(raw, config_path, problems, remote_origin)
    local_or_remote = (
        "pretrained_model_name_or_path",
        "group_offload_to_disk_path",
        "cache_uri",
        "pretrained_evaluation_model_name_or_path",
        "validation_preview_model",
    )
    for key in local_or_remote:
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
    if job is not None and job.scheduled_sampling_max_step_offset > 0 and not job.rolls_out:
        problems.warn(
            config_path,
            f"scheduled_sampling_max_step_offset: {job.scheduled_sampling_max_step_offset}, but the chance of a "
            "rollout is 0 at every step (scheduled_sampling_probability, or the ramp's prob_start and "
            "prob_end): nothing rolls out"
            + (
                "; ReflexFlow's anti-drift term still applies (scheduled_sampling_reflexflow: false drops it)"
                if job.reflexflow
                else ""
            ),
        )
    if job is not None and job.validation_preview and not job.webhook_url:
        problems.warn(
            config_path,
            "validation_preview: previews are posted to the webhook, and webhook_url is not set: no previews "
            "(as SimpleTuner, which turns them off then)",
        )

    datasets, text_embeds, masks = load_backends(
        files.get("data_backend_config"), job, problems, remote_origin
    )
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
        masks=masks,
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
