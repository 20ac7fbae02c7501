"""Typed models of ``multidatabackend.json``'s entries, and what ``config.json`` shares with them.

One image backend (``dataset_type: image``), its loss mask (``dataset_type: conditioning``,
``conditioning_type: mask``, linked from the image backend by ``conditioning_data``), and the text-embedding
cache (``dataset_type: text_embeds``). Field names are SimpleTuner's.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

ResolutionType = Literal["pixel", "pixel_area", "area"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# The stages SimpleTuner's skip_file_discovery names (its field registry, sections/advanced.py).
DISCOVERY_STAGES = frozenset({"vae", "aspect", "text", "metadata"})


def discovery_skips(value: str) -> frozenset[str]:
    """The stages a ``skip_file_discovery`` value names: SimpleTuner writes them comma-separated, and
    its own examples sometimes space-separated."""
    return frozenset(word for word in value.replace(",", " ").lower().split())


def check_discovery_skips(value: object) -> object:
    # SimpleTuner's examples write false for "skip nothing" (its CLI passes it on as the word "false").
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() == "false"):
        return ""
    if not isinstance(value, str):
        return value  # the field's type names what is wrong
    unknown = sorted(discovery_skips(value) - DISCOVERY_STAGES)
    if unknown:
        raise ValueError(
            f"{', '.join(unknown)} is not a stage SimpleTuner can skip; use a comma-separated list of "
            f"{', '.join(sorted(DISCOVERY_STAGES))} (or leave it empty to discover everything)"
        )
    return value


# The DatasetConfig fields that link an image backend and its mask backend (unset on most backends).
MASK_LINK_FIELDS = ("conditioning_data", "source_dataset_id", "conditioning_type")

# The DatasetConfig fields that hold credentials: used to reach the data, never part of what is trained.
CREDENTIAL_FIELDS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")


# SimpleTuner's conditioning types that are not a loss mask: inputs of other model families (ControlNet,
# edit and video models); AuraFlow's transformer takes no conditioning image.
_CONDITIONING_INPUTS = ("reference_strict", "reference_loose", "controlnet", "depth", "canny", "pose")


class DatasetConfig(Strict):
    """One image backend of ``multidatabackend.json``, or the loss-mask backend of one (``dataset_type:
    conditioning``, ``conditioning_type: mask``): the same keys say where its files are."""

    id: str = Field(min_length=1)
    type: Literal["local", "aws", "huggingface"] = "local"
    dataset_type: Literal["image", "conditioning"] = "image"
    # The link between an image backend and its mask backend, written on either side as in SimpleTuner: the
    # image backend's conditioning_data names the mask's id, or the mask's source_dataset_id the image's.
    conditioning_data: str | None = None
    source_dataset_id: str | None = None
    conditioning_type: Literal["mask"] | None = None  # on a mask backend: the only kind lokr-job reads
    disabled: bool = False
    instance_data_dir: str | None = None
    caption_strategy: Literal["filename", "textfile", "instanceprompt", "huggingface"] = "filename"
    instance_prompt: str | None = None
    crop: bool = False
    crop_aspect: Literal["square", "preserve", "closest", "random"] = "square"
    crop_style: Literal["center", "centre", "random", "corner"] = "random"
    resolution: float | None = Field(default=None, gt=0)
    resolution_type: ResolutionType | None = None
    minimum_image_size: float | None = Field(default=None, ge=0)
    maximum_image_size: float | None = Field(default=None, gt=0)
    target_downsample_size: float | None = Field(default=None, gt=0)
    repeats: int = Field(default=0, ge=0)
    is_regularisation_data: bool = False
    caption_dropout_probability: float | None = Field(default=None, ge=0, le=1)
    cache_dir_vae: str | None = None
    # This dataset's latents are encoded in training (config.json's vae_cache_ondemand does so for all).
    vae_cache_ondemand: bool = False
    # SimpleTuner's S3 backend.
    aws_bucket_name: str | None = None
    aws_data_prefix: str = ""
    aws_endpoint_url: str | None = None
    aws_region_name: str | None = None
    # Keys for this backend only (SimpleTuner's per-backend credentials); boto3's chain when unset.
    # SecretStr: a repr or a dump of the config shows ********** instead of the value.
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_session_token: SecretStr | None = None
    # SimpleTuner's Hub dataset backend.
    dataset_name: str | None = None
    split: str = "train"
    revision: str | None = None
    image_column: str = "image"
    caption_column: str = "caption"
    # Added to config.json's skip_file_discovery for this dataset, as SimpleTuner reads either.
    skip_file_discovery: str = ""

    _skips = field_validator("skip_file_discovery", mode="before")(check_discovery_skips)

    @field_validator(*CREDENTIAL_FIELDS, mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # SimpleTuner's examples ship these keys empty; empty means "use the environment", as there.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("conditioning_type", mode="before")
    @classmethod
    def _mask_only(cls, value: object) -> object:
        if value == "segmentation":
            raise ValueError(
                "segmentation masks (random per-class masking, masked_loss_probability) are not implemented; "
                "use conditioning_type mask with white where the loss counts and black where it does not"
            )
        if value in _CONDITIONING_INPUTS:
            raise ValueError(
                f"{value} conditioning feeds an image to the model, which AuraFlow cannot take; only "
                "conditioning_type mask (a loss mask) applies to AuraFlow"
            )
        return value

    @model_validator(mode="after")
    def _source_present(self) -> "DatasetConfig":
        if self.dataset_type == "conditioning":
            if self.conditioning_type is None:
                raise ValueError("a conditioning backend needs conditioning_type mask (a loss mask)")
            if self.type == "huggingface":
                raise ValueError(
                    "a mask backend reads a folder of mask images (type local, or aws for an S3 prefix), "
                    "named as the images they mask"
                )
            if self.conditioning_data:
                raise ValueError(
                    "conditioning_data belongs on the image backend, naming this mask backend's id"
                )
        elif self.conditioning_type is not None or self.source_dataset_id:
            raise ValueError(
                "conditioning_type and source_dataset_id belong on a backend with dataset_type conditioning"
            )
        if self.type == "local" and not self.instance_data_dir:
            raise ValueError("a local dataset needs instance_data_dir")
        if self.type == "aws" and not self.aws_bucket_name:
            raise ValueError("an aws dataset needs aws_bucket_name")
        if (self.aws_access_key_id is None) != (self.aws_secret_access_key is None):
            raise ValueError(
                "aws_access_key_id and aws_secret_access_key go together: set both, or neither to use the "
                "environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or an instance role)"
            )
        if self.aws_session_token is not None and self.aws_access_key_id is None:
            raise ValueError("aws_session_token needs aws_access_key_id and aws_secret_access_key beside it")
        if self.type == "huggingface" and not self.dataset_name:
            raise ValueError("a huggingface dataset needs dataset_name (owner/name)")
        if (
            self.dataset_type == "image"
            and self.caption_strategy == "instanceprompt"
            and not self.instance_prompt
        ):
            raise ValueError("caption_strategy instanceprompt needs instance_prompt")
        return self


class TextEmbedsConfig(Strict):
    """The ``dataset_type: text_embeds`` backend: where the text-embedding cache lives."""

    id: str = "text-embeds"
    type: Literal["local"] = "local"
    dataset_type: Literal["text_embeds"] = "text_embeds"
    default: bool = True
    disabled: bool = False
    cache_dir: str | None = None
    write_batch_size: int | None = Field(default=None, gt=0)
    text_encoder_batch_size: int | None = Field(default=None, gt=0)  # config.json's when unset
