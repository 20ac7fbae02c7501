"""The training side of the caches: batches of cached latents and text embeddings, in sampler order.

``TrainingData.open`` reads only the plans and indexes that warm wrote (a few files) and checks that
every entry training will use is cached; it never loads the VAE or the text encoder. ``batch(epoch,
index)`` is a pure function of (seed, epoch, index), so a resumed run continues on exactly the batches
an uninterrupted one would have seen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from job.cache import layout
from job.cache.entries import load_entry
from job.cache.keys import text_key
from job.cache.manifest import Manifest, plan_fingerprint, read_manifest
from job.cache.ondemand import OnDemandLatents, UnwarmedLatent
from job.cache.store import CacheIndex, entry_path
from job.config.backends import DatasetConfig
from job.config.loader import ResolvedConfig
from job.data.buckets import StepShape, dropped_lines, padded_lines, plan_buckets, require_usable
from job.data.discovery import encodes_on_demand, skipped_stages
from job.data.location import local_data_dir
from job.data.sampler import EpochSampler, SamplerDataset
from job.data.seeds import derive_seed
from job.errors import DataError
from job.model.source import local_model_path
from job.workdir import WorkDir

log = logging.getLogger("lokr")

_TEXT_ENTRIES_KEPT = 64  # an instance prompt is used every step: keep recent text entries in memory


@dataclass
class Batch:
    latents: torch.Tensor  # [B, C, h, w] float32
    prompt_embeds: torch.Tensor  # [B, L, D] float32
    prompt_mask: torch.Tensor  # [B, L] int64
    is_regularisation: torch.Tensor  # [B] bool
    caption_dropout: torch.Tensor  # [B] float32: each sample's dataset caption_dropout_probability
    keys: list[str]  # "<dataset id>/<image path>", for logs and tests
    # [B, 1, h, w] float32 loss weights at latent resolution (job.cache.masks); None: no sample is masked
    loss_mask: torch.Tensor | None = None


@dataclass(frozen=True)
class _Entry:
    key: str
    latent_dir: Path
    latent_key: str
    text_keys: tuple[str, ...]
    is_regularisation: bool
    caption_dropout: float
    mask_key: str | None  # the loss mask beside the latent, or None: every position counts
    unwarmed: UnwarmedLatent | None = None  # vae_cache_ondemand: what to encode if it is not cached


class TrainingData:
    def __init__(
        self,
        entries: list[_Entry],
        sampler: EpochSampler,
        *,
        text_dir: Path,
        text_index: CacheIndex,
        text_identity: str,
        null_text_key: str,
        seed: int,
        batch_size: int,
        world_size: int,
        rank: int,
        on_demand: OnDemandLatents | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self._entries = entries
        self._sampler = sampler
        self._text_dir = text_dir
        self._text_index = text_index
        self._text_identity = text_identity
        self._null_text_key = null_text_key
        self._seed = seed
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.on_demand = on_demand
        self._load_text = lru_cache(maxsize=_TEXT_ENTRIES_KEPT)(self._read_text)

    @classmethod
    def open(
        cls, config: ResolvedConfig, workdir: WorkDir, *, world_size: int = 1, rank: int = 0
    ) -> TrainingData:
        """The warmed caches of every dataset; ``DataError`` (run lokr-job warm) when any entry is missing."""
        job = config.job
        step = StepShape.of(job, world_size)
        text_dir = layout.text_dir(workdir, config.text_embeds)
        text_index = CacheIndex.load(text_dir)
        latent_indexes: dict[Path, CacheIndex] = {}
        entries: list[_Entry] = []
        sampler_datasets: list[SamplerDataset] = []
        manifests: list[Manifest] = []
        problems: list[str] = []
        for dataset in config.datasets:
            manifest = _current_manifest(config, workdir, dataset, problems)
            if manifest is None:
                continue
            manifests.append(manifest)
            buckets = plan_buckets([s.bucket for s in manifest.samples], repeats=dataset.repeats, step=step)
            for line in dropped_lines(dataset.id, buckets, repeats=dataset.repeats, step=step):
                log.warning("%s", line)
            for line in padded_lines(dataset.id, buckets, repeats=dataset.repeats, step=step):
                log.warning("%s", line)
            try:
                require_usable(
                    dataset.id, buckets, images=len(manifest.samples), repeats=dataset.repeats, step=step
                )
            except DataError as exc:
                problems.append(exc.message)
                continue
            latent_dir = layout.latent_dir(workdir, dataset)
            latent_index = latent_indexes.setdefault(latent_dir, CacheIndex.load(latent_dir))
            first = len(entries)
            # vae_cache_ondemand: where this dataset's images are, to encode what warm left.
            images = local_data_dir(dataset, workdir) if encodes_on_demand(job, dataset) else None
            bucket_ids: dict[tuple[int, int], np.ndarray] = {}
            for size, members in buckets.usable.items():
                bucket_ids[size] = np.arange(len(entries), len(entries) + len(members))
                for member in members:
                    sample = manifest.samples[member]
                    unwarmed = None
                    if sample.source is not None and images is not None:
                        unwarmed = UnwarmedLatent(dataset.id, images, sample.relpath, sample.source)
                    entries.append(
                        _Entry(
                            key=f"{dataset.id}/{sample.relpath}",
                            latent_dir=latent_dir,
                            latent_key=sample.latent_key,
                            text_keys=sample.text_keys,
                            is_regularisation=dataset.is_regularisation_data,
                            caption_dropout=dataset.caption_dropout_probability or 0.0,
                            mask_key=sample.mask_key,
                            unwarmed=unwarmed,
                        )
                    )
            added = entries[first:]
            # Latents left to training (vae_cache_ondemand) are encoded when first read.
            missing_latents = sum(e.latent_key not in latent_index and e.unwarmed is None for e in added)
            missing_masks = sum(e.mask_key is not None and e.mask_key not in latent_index for e in added)
            missing_texts = sum(k not in text_index for e in added for k in e.text_keys)
            if missing_latents or missing_masks or missing_texts:
                skipped = sorted(skipped_stages(job, dataset) & {"vae", "text"})
                # SimpleTuner's own hint when a skipped stage left the cache short (caching/vae.py).
                hint = f" without skip_file_discovery {', '.join(skipped)}" if skipped else ""
                masks = f", {missing_masks} loss masks" if missing_masks else ""
                problems.append(
                    f"dataset {dataset.id!r}: {missing_latents} latents{masks} and {missing_texts} text "
                    f"embeddings are not cached; run lokr-job warm{hint}"
                )
            sampler_datasets.append(SamplerDataset(dataset.id, bucket_ids, dataset.repeats, buckets.padded))
        identities = {m.text_identity for m in manifests}
        if len(identities) > 1:
            problems.append("the datasets' caches were built with different text encoders; run lokr-job warm")
        null_keys = {m.null_text_key for m in manifests}
        if any(key not in text_index for key in null_keys):
            problems.append("the empty caption's text embedding is not cached; run lokr-job warm")
        if problems:
            raise DataError("\n".join(problems))
        on_demand = None
        unwarmed = [e for e in entries if e.unwarmed is not None]
        if unwarmed:
            # Indexed latents are cached; the others are pending unless training wrote them earlier.
            pending = {
                path
                for e in unwarmed
                if e.latent_key not in latent_indexes[e.latent_dir]
                and not (path := entry_path(e.latent_dir, e.latent_key)).exists()
            }
            on_demand = OnDemandLatents(
                Path(local_model_path(job, workdir)),
                pending,
                tiling=job.vae_enable_tiling,
                slicing=job.vae_enable_slicing,
                offload=job.offload_during_startup,
            )
        sampler = EpochSampler(
            sampler_datasets, seed=job.seed, global_batch=job.train_batch_size * world_size
        )
        return cls(
            entries,
            sampler,
            text_dir=text_dir,
            text_index=text_index,
            text_identity=identities.pop(),
            null_text_key=null_keys.pop(),
            seed=job.seed,
            batch_size=job.train_batch_size,
            world_size=world_size,
            rank=rank,
            on_demand=on_demand,
        )

    @property
    def batches_per_epoch(self) -> int:
        """Global batches per epoch (each is ``train_batch_size`` samples on every rank)."""
        return self._sampler.batches_per_epoch

    def batch(self, epoch: int, index: int) -> Batch:
        """This rank's share of global batch ``index`` of ``epoch``."""
        ids = self._sampler.global_batch_ids(epoch, index)
        first = self.rank * self.batch_size
        chosen = [self._entries[i] for i in ids[first : first + self.batch_size]]
        latents = torch.stack([self._latent(e) for e in chosen])
        loss_mask = None
        if any(e.mask_key is not None for e in chosen):
            # A sample of an unmasked dataset beside masked ones counts everywhere: weight 1.
            ones = torch.ones(1, *latents.shape[-2:])
            loss_mask = torch.stack(
                [ones if e.mask_key is None else load_entry(e.latent_dir, e.mask_key)["mask"] for e in chosen]
            )
        texts = [
            self._load_text(self._pick_text(entry, epoch, index, first + position))
            for position, entry in enumerate(chosen)
        ]
        return Batch(
            latents=latents.float(),
            prompt_embeds=torch.stack([embeds for embeds, _ in texts]).float(),
            prompt_mask=torch.stack([mask for _, mask in texts]).long(),
            is_regularisation=torch.tensor([e.is_regularisation for e in chosen], dtype=torch.bool),
            caption_dropout=torch.tensor([e.caption_dropout for e in chosen], dtype=torch.float32),
            keys=[e.key for e in chosen],
            loss_mask=loss_mask,
        )

    def null_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty caption's embeddings [L, D] float32 and mask [L] (what caption dropout trains on)."""
        embeds, mask = self._load_text(self._null_text_key)
        return embeds.float(), mask.long()

    def sample_embedding(self, caption: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A cached caption's embeddings [L, D] and mask [L] (warm caches the validation prompts), or None."""
        key = text_key(caption, self._text_identity)
        if key not in self._text_index:
            return None
        embeds, mask = self._load_text(key)
        return embeds.float(), mask.long()

    def _latent(self, entry: _Entry) -> torch.Tensor:
        if entry.unwarmed is not None and self.on_demand is not None:
            return self.on_demand.latent(entry.unwarmed, entry.latent_dir, entry.latent_key)
        return load_entry(entry.latent_dir, entry.latent_key)["latents"]

    def _pick_text(self, entry: _Entry, epoch: int, index: int, position: int) -> str:
        """One of the sample's captions (a caption file may hold several), seeded by its place in the epoch."""
        if len(entry.text_keys) == 1:
            return entry.text_keys[0]
        choice = derive_seed(self._seed, "caption", epoch, index, position) % len(entry.text_keys)
        return entry.text_keys[choice]

    def _read_text(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = load_entry(self._text_dir, key)
        return tensors["prompt_embeds"], tensors["prompt_mask"]


def _current_manifest(
    config: ResolvedConfig, workdir: WorkDir, dataset: DatasetConfig, problems: list[str]
) -> Manifest | None:
    """The dataset's plan if warm wrote one for the current settings; else a problem is recorded."""
    manifest = read_manifest(layout.manifest_path(workdir, dataset.id))
    if manifest is None:
        problems.append(f"dataset {dataset.id!r} has no cache plan in {workdir.buckets}; run lokr-job warm")
        return None
    if manifest.fingerprint != plan_fingerprint(config, dataset):
        problems.append(
            f"dataset {dataset.id!r}: its caches were built for other settings (resolution, crop, captions, "
            "model, max_token_length or seed changed since); run lokr-job warm"
        )
        return None
    return manifest
