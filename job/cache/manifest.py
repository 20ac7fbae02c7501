"""A dataset's training plan, written by warm and read by training: its samples with their bucket and
cache keys, and the text-cache identity (for the empty caption and validation prompts).

It lives in ``<workdir>/cache/buckets/<dataset>.json``. Its fingerprint covers the settings that decide
samples and keys (the dataset's block, seed, aspect rounding, model, max token length); training refuses a
plan whose fingerprint differs from the current config's. repeats, is_regularisation_data,
caption_dropout_probability and the batch shape are read from the config at training time instead.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from job.config.backends import MASK_LINK_FIELDS, DatasetConfig
from job.config.loader import ResolvedConfig
from job.data.buckets import Size
from job.data.transform import Transform
from job.files import read_json, write_bytes_atomic

_MANIFEST_VERSION = 1
# Dataset keys that training reads from the config directly: changing them needs no warm.
_TRAINING_TIME_KEYS = frozenset(
    {"repeats", "is_regularisation_data", "caption_dropout_probability", "vae_cache_ondemand"}
)
# Which discovery a warm skips changes how the plan is found, not what it holds.
_DISCOVERY_KEYS = frozenset({"skip_file_discovery"})
# The link to a mask backend: the mask backend itself is fingerprinted instead, when there is one.
_MASK_LINK_KEYS = frozenset(MASK_LINK_FIELDS)


@dataclass(frozen=True)
class LatentSource:
    """An image as warm planned it: its content hash and transform, enough to encode its latent later."""

    sha256: str
    transform: Transform

    def to_json(self) -> dict:
        return {
            "sha256": self.sha256,
            "resized": list(self.transform.resized),
            "crop": list(self.transform.crop_box),
        }

    @classmethod
    def from_json(cls, value: dict) -> "LatentSource":
        resized, crop = value["resized"], value["crop"]
        return cls(value["sha256"], Transform((resized[0], resized[1]), (crop[0], crop[1], crop[2], crop[3])))


@dataclass(frozen=True)
class PlannedSample:
    relpath: str
    bucket: Size
    latent_key: str
    text_keys: tuple[str, ...]  # one per caption; the sampler picks one per use
    mask_key: str | None = None  # the loss mask's entry, beside the latent (job.cache.masks)
    # With vae_cache_ondemand: what training encodes the latent from (job.cache.ondemand).
    source: LatentSource | None = None


@dataclass(frozen=True)
class Manifest:
    dataset_id: str
    fingerprint: str
    text_identity: str
    null_text_key: str
    samples: list[PlannedSample]

    def to_json(self) -> dict:
        return {
            "version": _MANIFEST_VERSION,
            "dataset": self.dataset_id,
            "fingerprint": self.fingerprint,
            "text_identity": self.text_identity,
            "null_text_key": self.null_text_key,
            "samples": [_sample_row(s) for s in self.samples],
        }

    @classmethod
    def from_json(cls, value: dict) -> "Manifest":
        return cls(
            dataset_id=value["dataset"],
            fingerprint=value["fingerprint"],
            text_identity=value["text_identity"],
            null_text_key=value["null_text_key"],
            samples=[_planned_sample(row) for row in value["samples"]],
        )


def _sample_row(sample: PlannedSample) -> list:
    # The mask key and the source are appended only when there are some: a plain plan reads as it always did.
    row: list = [sample.relpath, *sample.bucket, sample.latent_key, list(sample.text_keys)]
    if sample.mask_key or sample.source:
        row.append(sample.mask_key)
    if sample.source:
        row.append(sample.source.to_json())
    return row


def _planned_sample(row: list) -> PlannedSample:
    relpath, width, height, latent, texts, *rest = row
    mask = rest[0] if rest else None
    source = LatentSource.from_json(rest[1]) if len(rest) > 1 else None
    return PlannedSample(relpath, (width, height), latent, tuple(texts), mask, source)


def plan_fingerprint(config: ResolvedConfig, dataset: DatasetConfig) -> str:
    job = config.job
    mask = config.mask_for(dataset)
    recipe = {
        "version": _MANIFEST_VERSION,
        "dataset": dataset.model_dump(
            mode="json", exclude=_TRAINING_TIME_KEYS | _DISCOVERY_KEYS | _MASK_LINK_KEYS
        ),
        "seed": job.seed,
        "aspect_bucket_rounding": job.aspect_bucket_rounding,
        "model": job.model_source,
        "max_token_length": job.max_token_length,
        # Only when there is one, so the plans of unmasked datasets keep their fingerprints.
        **({"mask": mask.model_dump(mode="json", exclude=_DISCOVERY_KEYS | _MASK_LINK_KEYS)} if mask else {}),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def write_manifest(path: Path, manifest: Manifest) -> None:
    """Write the plan, unless the file already holds exactly this plan."""
    data = json.dumps(manifest.to_json(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    write_bytes_atomic(path, data)


def read_manifest(path: Path) -> Manifest | None:
    stored = read_json(path)
    if not isinstance(stored, dict) or stored.get("version") != _MANIFEST_VERSION:
        return None
    return Manifest.from_json(stored)
