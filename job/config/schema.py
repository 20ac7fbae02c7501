"""Typed models of the three SimpleTuner-format files lokr-job reads.

Field names are SimpleTuner's, so a user's existing ``config.json`` keeps working. Values arrive as
strings as often as not (``"4e-5"``, ``"true"``): pydantic's lax mode coerces them.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from job.config.backends import ResolutionType, Strict, check_discovery_skips
from job.config.flavours import FLAVOUR_REPOS, token_limit
from job.config.optimizer_config import parse_optimizer_config

Optimizer = Literal["adamw", "adamw_bf16", "optimi-lion", "optimi-adamw", "bnb-lion8bit-paged", "prodigy"]
LrScheduler = Literal["constant", "constant_with_warmup", "cosine", "polynomial", "linear"]
Precision = Literal[
    "no_change", "bf16", "int8-quanto", "int4-quanto", "int8-torchao", "fp8-torchao", "nf4-bnb"
]
QUANTIZED_PRECISIONS = ("int8-quanto", "int4-quanto", "int8-torchao", "fp8-torchao", "nf4-bnb")


class JobConfig(Strict):
    """``config.json``: one flat object of SimpleTuner keys (leading ``--`` already stripped)."""

    # The model.
    model_family: Literal["auraflow"] = "auraflow"
    model_type: Literal["lora", "full"] = "lora"
    lora_type: Literal["lycoris"] = "lycoris"
    model_flavour: Literal["v0.1", "v0.2", "v0.3", "pony"] = "v0.3"
    pretrained_model_name_or_path: str | None = None
    revision: str | None = None
    base_model_precision: Precision = "no_change"
    quantize_via: Literal["cpu", "accelerator"] = "accelerator"
    gradient_checkpointing: bool = False
    # Checkpoint every Nth block of each stack (joint, single); unset or 1: every block.
    gradient_checkpointing_interval: int | None = Field(default=None, ge=1)
    lycoris_config: str | None = None
    tokenizer_max_length: int | None = Field(default=None, gt=0)

    # Data.
    data_backend_config: str
    resolution: float = Field(default=1024, gt=0)
    resolution_type: ResolutionType = "pixel_area"
    minimum_image_size: float | None = Field(default=None, ge=0)
    maximum_image_size: float | None = Field(default=None, gt=0)
    target_downsample_size: float | None = Field(default=None, gt=0)
    aspect_bucket_rounding: int | None = Field(default=None, ge=0, le=6)
    # SimpleTuner's AuraFlow model forces 64 px (Auraflow.check_user_config); lokr-job honours another
    # multiple of the model's 16 px patch (checked against the model in job/check/sizes.py).
    aspect_bucket_alignment: int = Field(default=64, gt=0)
    caption_dropout_probability: float = Field(default=0.0, ge=0, le=1)
    vae_batch_size: int = Field(default=4, gt=0)
    # diffusers' AutoencoderKL tiling (encode and decode in overlapping tiles) and slicing (one image of a
    # batch at a time): VRAM, not weights; tiling changes the latents a little, so it keys the cache.
    vae_enable_tiling: bool = False
    vae_enable_slicing: bool = False
    write_batch_size: int = Field(default=64, gt=0)
    # Encode each latent the first time training needs it (and cache it) instead of in warm, for every
    # dataset; a dataset's own vae_cache_ondemand does so for that dataset alone (job/cache/ondemand.py).
    vae_cache_ondemand: bool = False
    text_encoder_batch_size: int = Field(default=1, gt=0)
    # SimpleTuner's stages, comma-separated: vae, aspect, text, metadata (job/data/skips.py).
    skip_file_discovery: str = ""
    disable_bucket_pruning: bool = False
    allow_dataset_oversubscription: bool = False

    # The training loop.
    seed: int = 0
    train_batch_size: int = Field(default=1, gt=0)
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    max_train_steps: int = Field(default=0, ge=0)
    num_train_epochs: int = Field(default=0, ge=0)
    strict_epoch_limit: bool = False
    learning_rate: float = Field(default=1e-4, gt=0)
    lr_scheduler: LrScheduler = "constant"
    lr_warmup_steps: int = Field(default=0, ge=0)
    lr_end: float = Field(default=4e-7, ge=0)
    lr_power: float = Field(default=0.8, ge=0.1)
    optimizer: Optimizer = "adamw_bf16"
    max_grad_norm: float | None = Field(default=2.0, ge=0)
    grad_clip_method: Literal["value", "norm"] = "value"
    # Comma-separated key=value settings over the optimizer's defaults (job/config/optimizer_config.py).
    optimizer_config: str | None = None
    optimizer_beta1: float | None = Field(default=None, ge=0, le=1)
    optimizer_beta2: float | None = Field(default=None, ge=0, le=1)
    loss_type: Literal["l2", "huber", "smooth_l1"] = "l2"
    huber_schedule: Literal["snr", "exponential", "constant"] = "snr"
    huber_c: float = Field(default=0.1, ge=0)
    mixed_precision: Literal["bf16", "no"] = "bf16"
    use_ema: bool = False
    ema_decay: float = Field(default=0.995, gt=0, lt=1)
    ema_update_interval: int = Field(default=1, ge=1)
    ema_warmup_steps: int = Field(default=0, ge=0)
    # SimpleTuner's default for every flow-matching family that sets none of its own, AuraFlow included.
    flow_schedule_shift: float | None = 3.0
    flow_schedule_auto_shift: bool = False

    # SimpleTuner's scheduled sampling (job/train/rollout.py): some inputs are the model's own rollout.
    scheduled_sampling_max_step_offset: int = Field(default=0, ge=0)
    scheduled_sampling_strategy: Literal["uniform", "biased_early", "biased_late"] = "uniform"
    scheduled_sampling_probability: float = Field(default=0.0, ge=0, le=1)
    scheduled_sampling_prob_start: float = Field(default=0.0, ge=0, le=1)
    scheduled_sampling_prob_end: float = Field(default=0.5, ge=0, le=1)
    scheduled_sampling_ramp_steps: int = Field(default=0, ge=0)
    scheduled_sampling_start_step: int = Field(default=0, ge=0)
    scheduled_sampling_ramp_shape: Literal["linear", "cosine"] = "linear"
    # They pick SimpleTuner's solver for epsilon/v-prediction models; its flow-matching rollout is Euler.
    scheduled_sampling_sampler: Literal["unipc", "euler", "dpm"] = "unipc"
    scheduled_sampling_order: int = Field(default=2, ge=1, le=9)
    # ReflexFlow's loss terms (job/train/loss.py). Unset: on whenever scheduled sampling is, as SimpleTuner
    # does for flow-matching models; true turns them on even without it.
    scheduled_sampling_reflexflow: bool | None = None
    scheduled_sampling_reflexflow_alpha: float = 1.0
    scheduled_sampling_reflexflow_beta1: float = 10.0
    scheduled_sampling_reflexflow_beta2: float = 1.0

    # Checkpoints.
    checkpoint_step_interval: int = Field(default=500, gt=0)
    checkpoints_total_limit: int | None = Field(default=None, gt=0)
    resume_from_checkpoint: str | None = "latest"

    # Validation and evaluation.
    validation_prompt: str | None = None
    validation_negative_prompt: str = "blurry, cropped, ugly"
    validation_step_interval: int | None = Field(default=None, gt=0)
    validation_seed: int = 42
    validation_resolution: str = "1024x1024"
    validation_guidance: float = 3.5
    validation_guidance_rescale: float = 0.0
    validation_lycoris_strength: float = Field(default=1.0, ge=0)
    validation_num_inference_steps: int = Field(default=20, gt=0)
    user_prompt_library: str | None = None
    eval_steps_interval: int | None = Field(default=None, gt=0)
    num_eval_images: int = Field(default=4, gt=0)
    # SimpleTuner's CLIP score of each validation image against its prompt (job.validate.clip_score).
    evaluation_type: Literal["none", "clip"] = "none"
    pretrained_evaluation_model_name_or_path: str = "openai/clip-vit-large-patch14-336"
    # SimpleTuner's previews: intermediate latents decoded with a Tiny AutoEncoder and posted to the webhook.
    validation_preview: bool = False
    validation_preview_steps: int = Field(default=1, gt=0)
    # lokr-job's own: which Tiny AutoEncoder (SimpleTuner's fixed choice for AuraFlow's SDXL latent space).
    validation_preview_model: str = "madebyollin/taesdxl"

    # Tracking.
    report_to: Literal["tensorboard", "wandb", "none"] = "none"
    tracker_project_name: str = "lokr-job"
    tracker_run_name: str | None = None
    webhook_url: str | None = None

    # Publishing and remote state.
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = True
    # lokr-job's own: the export formats (job.publish.export) pushed beside the adapter, each in a folder.
    publish_formats: list[Literal["comfyui", "merged"]] = Field(default_factory=list)
    cache_uri: str | None = None

    # Memory.
    enable_group_offload: bool = False
    group_offload_type: Literal["block_level", "leaf_level"] = "block_level"
    group_offload_blocks_per_group: int = Field(default=1, gt=0)
    group_offload_use_stream: bool = False
    group_offload_to_disk_path: str | None = None
    enable_model_cpu_offload: bool = False
    # While caches are built, what is not in use waits off the GPU: warm always holds one model at a time;
    # this also parks vae_cache_ondemand's VAE in CPU memory between encodes (job/cache/ondemand.py).
    offload_during_startup: bool = False
    deepspeed_config: str | None = None

    @field_validator("resume_from_checkpoint", mode="before")
    @classmethod
    def _none_words(cls, value: object) -> object:
        # SimpleTuner users write "none"/"" for "start fresh".
        if isinstance(value, str) and value.strip().lower() in {"", "none", "null", "false"}:
            return None
        # A step number may arrive as a JSON number (--set resume_from_checkpoint=16).
        return str(value) if isinstance(value, int) else value

    @field_validator("base_model_precision", mode="before")
    @classmethod
    def _no_fp8_quanto(cls, value: object) -> object:
        if value == "fp8-quanto":
            # SimpleTuner's AuraFlow model refuses it too (simpletuner/helpers/models/auraflow/model.py).
            raise ValueError(
                "AuraFlow does not support fp8-quanto; use fp8-torchao or an int8 precision (int8-quanto, "
                "int8-torchao) instead"
            )
        return value

    @field_validator("validation_step_interval", mode="before")
    @classmethod
    def _zero_is_never(cls, value: object) -> object:
        # SimpleTuner validates on steps only when the interval is above 0 (simpletuner/helpers/training/
        # validation.py, should_perform_intermediary_validation); its examples write 0 for "never".
        return None if value in (0, "0") else value

    _skips = field_validator("skip_file_discovery", mode="before")(check_discovery_skips)

    @field_validator("validation_resolution")
    @classmethod
    def _resolutions(cls, value: str) -> str:
        for part in value.split(","):
            w, sep, h = part.strip().lower().partition("x")
            if not part.strip().isdigit() and not (sep and w.isdigit() and h.isdigit()):
                raise ValueError(f"{part.strip()!r} is not WIDTHxHEIGHT (e.g. 1024x1024,1280x768)")
        return value

    @field_validator("flow_schedule_shift")
    @classmethod
    def _shift_not_negative(cls, value: float | None) -> float | None:
        # SimpleTuner's field registry allows 0 and up; 0 (or null) means no fixed shift.
        if value is not None and value < 0:
            raise ValueError(
                "must be 0 or more: a shift s > 0 trains on σ' = sσ/(1+(s-1)σ), 0 trains on unshifted σ, "
                "and flow_schedule_auto_shift: true picks s from each image's size"
            )
        return value

    @field_validator("optimizer_config")
    @classmethod
    def _optimizer_settings(cls, value: str | None) -> str | None:
        if value is not None and value.strip():
            parse_optimizer_config(value)
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> "JobConfig":
        problems = self._training_path_problems()
        if self.max_train_steps == 0 and self.num_train_epochs == 0:
            problems.append("set max_train_steps or num_train_epochs to a number above 0")
        if self.model_type == "lora" and not self.lycoris_config:
            problems.append("lycoris_config is required when model_type is lora (lora_type lycoris)")
        if self.model_type == "full":
            problems += self._full_rank_problems()
        if self.enable_group_offload and self.base_model_precision == "nf4-bnb":
            problems.append(
                "enable_group_offload cannot move nf4-bnb weights (bitsandbytes keeps them on the GPU it "
                "quantized them on): use int8-quanto or int8-torchao with group offload"
            )
        if self.enable_group_offload and self.enable_model_cpu_offload:
            problems.append(
                "enable_group_offload and enable_model_cpu_offload cannot be combined: keep one "
                "(group offload is the one that trains in less VRAM)"
            )
        if self.push_to_hub and not self.hub_model_id:
            problems.append("push_to_hub is true but hub_model_id is not set (e.g. 'you/auraflow-lokr')")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _training_path_problems(self) -> list[str]:
        problems = []
        if (self.optimizer_beta1 is None) != (self.optimizer_beta2 is None):
            # SimpleTuner refuses one without the other (helpers/configuration/cmd_args.py).
            problems.append("optimizer_beta1 and optimizer_beta2 go together: set both, or neither")
        if self.lr_scheduler == "polynomial" and self.lr_end >= self.learning_rate:
            problems.append(
                f"lr_end ({self.lr_end:g}) must be below learning_rate ({self.learning_rate:g}) for the "
                "polynomial schedule, which decays from one to the other"
            )
        if self.loss_type == "huber" and self.huber_c == 0 and self.huber_schedule != "snr":
            # 2c·(…) with c = 0 (or c^σ = 0) is zero everywhere: nothing would train.
            problems.append(
                f"huber_c 0 with loss_type huber and huber_schedule {self.huber_schedule} makes the loss zero; "
                "set huber_c above 0 (SimpleTuner's default is 0.1)"
            )
        return problems

    def _full_rank_problems(self) -> list[str]:
        problems = []
        if not self.deepspeed_config:
            problems.append(
                "model_type full trains all 6.8B weights: set deepspeed_config to a DeepSpeed ZeRO stage 2 or 3 "
                "JSON (docs/config.md), or train a LoKr with model_type lora"
            )
        if self.base_model_precision in QUANTIZED_PRECISIONS:
            problems.append(
                f"base_model_precision {self.base_model_precision} cannot be trained full-rank (quantized weights "
                "have no gradients): use bf16, or model_type lora"
            )
        if self.use_ema:
            problems.append(
                "use_ema works with model_type lora only; set use_ema false for full-rank training"
            )
        return problems

    @property
    def model_source(self) -> str:
        """What to load the base model from: an explicit path/URI/repo id, else the flavour's repo."""
        return self.pretrained_model_name_or_path or FLAVOUR_REPOS[self.model_flavour]

    @property
    def rolls_out(self) -> bool:
        """Whether scheduled sampling can roll a sample out at some step: an offset above 0 and a chance above
        0 somewhere on the schedule (``job.train.rollout.rollout_probability``)."""
        if self.scheduled_sampling_max_step_offset == 0:
            return False
        if self.scheduled_sampling_ramp_steps == 0:
            return self.scheduled_sampling_probability > 0
        return max(self.scheduled_sampling_ramp_ends) > 0

    @property
    def scheduled_sampling_ramp_ends(self) -> tuple[float, float]:
        """The chances the ramp goes from and to: SimpleTuner reads ``prob_start`` and ``prob_end`` as
        ``value or probability``, so 0 stands for ``scheduled_sampling_probability``."""
        fixed = self.scheduled_sampling_probability
        return self.scheduled_sampling_prob_start or fixed, self.scheduled_sampling_prob_end or fixed

    @property
    def reflexflow(self) -> bool:
        """Whether the loss has ReflexFlow's terms: ``scheduled_sampling_reflexflow``, or when unset, whether
        scheduled sampling is on (SimpleTuner's _maybe_enable_reflexflow_default)."""
        if self.scheduled_sampling_reflexflow is not None:
            return self.scheduled_sampling_reflexflow
        return self.scheduled_sampling_max_step_offset > 0

    @property
    def max_token_length(self) -> int:
        """``tokenizer_max_length``, else the flavour's limit (SimpleTuner's 120, or 768 for pony)."""
        return self.tokenizer_max_length or token_limit(self.model_flavour)

    @property
    def shift_overridden(self) -> bool:
        """A fixed ``flow_schedule_shift`` was asked for alongside auto-shift, which wins as in SimpleTuner."""
        return (
            self.flow_schedule_auto_shift
            and "flow_schedule_shift" in self.model_fields_set
            and bool(self.flow_schedule_shift)
        )

    @property
    def validation_sizes(self) -> list[tuple[int, int]]:
        sizes = []
        for part in self.validation_resolution.split(","):
            w, _, h = part.strip().lower().partition("x")
            sizes.append((int(w), int(h or w)))
        return sizes


class PresetConfig(Strict):
    target_module: list[str] = Field(default_factory=list)
    target_name: list[str] = Field(default_factory=list)
    module_algo_map: dict[str, dict[str, object]] = Field(default_factory=dict)
    name_algo_map: dict[str, dict[str, object]] = Field(default_factory=dict)
    use_fnmatch: bool = False
    unet_target_module: list[str] = Field(default_factory=list)
    unet_target_name: list[str] = Field(default_factory=list)
    exclude_name: list[str] = Field(default_factory=list)
    lora_prefix: str | None = None


class LycorisConfig(BaseModel):
    """``lycoris_config.json``. Unlisted keys pass through to ``create_lycoris`` as LyCORIS kwargs."""

    model_config = ConfigDict(extra="allow")

    algo: Literal["lokr"] = "lokr"
    # SimpleTuner truncates the multiplier with int(); a float is what the user wrote.
    multiplier: float = 1.0
    linear_dim: int = Field(default=10000, gt=0)
    linear_alpha: float = 1.0
    factor: int = -1
    apply_preset: PresetConfig | None = None
