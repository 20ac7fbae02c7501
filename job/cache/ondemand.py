"""``vae_cache_ondemand``: a latent warm left out is encoded the first time training reads it, then cached.

SimpleTuner's on-demand VAE cache (its DATALOADER.md): training starts without waiting for an encoding
pass over the whole dataset; each missing latent is encoded when a batch first needs it and written to
the cache, so later epochs and a resumed run read it back. The latent is the one warm would have written:
the same VAE, dtype (float32), tiling, transform and noise seed (from the key); only float rounding
differs, warm encoding ``vae_batch_size`` images per VAE call and this one. The entry file is written
atomically; the cache index adopts it at the next warm (training never rewrites an index that other
ranks read). The VAE is loaded by the first missing latent and stays on the device while latents are missing,
so on-demand encoding costs VRAM beside the transformer: it saves start-up time, not memory. With
``offload_during_startup`` it waits in CPU memory instead and visits the GPU for each encode (slower).
Once every latent left to training is cached, the VAE is released.
"""

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from job.cache.encode import encode_latents, image_to_pixels
from job.cache.entries import load_entry, save_entry
from job.cache.keys import noise_seed
from job.cache.lazy import LazyModel
from job.cache.manifest import LatentSource
from job.cache.store import entry_path
from job.data.images import UnreadableImage, read_image_file
from job.data.transform import apply_transform
from job.errors import DataError
from job.model.components import compute_device, load_vae

log = logging.getLogger("lokr")


@dataclass(frozen=True)
class UnwarmedLatent:
    """A latent warm left to training: the image it is encoded from, as warm planned it."""

    dataset_id: str
    root: Path  # the dataset's folder on this machine
    relpath: str
    source: LatentSource


class OnDemandLatents:
    """Encodes and caches the latents training asks for that warm left to it; releases the VAE once every
    one of them is cached."""

    def __init__(
        self, model_folder: Path, pending: set[Path], *, tiling: bool, slicing: bool, offload: bool = False
    ) -> None:
        self._device = compute_device()
        # offload_during_startup: the VAE waits in CPU memory and visits the accelerator for each encode.
        self._offload = offload
        home = torch.device("cpu") if offload else self._device
        self._vae = LazyModel(lambda: load_vae(model_folder, home, tiling=tiling, slicing=slicing))
        self._pending = pending  # the entry files of unwarmed latents not written yet
        self.encoded = 0

    @property
    def holds_vae(self) -> bool:
        """Whether the VAE is loaded now."""
        return self._vae.held

    def latent(self, item: UnwarmedLatent, cache_dir: Path, key: str) -> torch.Tensor:
        """``item``'s latent, [C, h, w] float32: read from ``cache_dir`` when cached, else encoded there."""
        path = entry_path(cache_dir, key)
        # Only a pending latent can be missing; another rank may have written it since.
        if path in self._pending and not path.exists():
            latent = self._encode(item, cache_dir, key)
        else:
            latent = load_entry(cache_dir, key)["latents"]
        self._pending.discard(path)
        if not self._pending and self._vae.held:
            self._vae.release()
            log.info("vae_cache_ondemand: every latent is cached; the VAE is released")
        return latent

    def _encode(self, item: UnwarmedLatent, cache_dir: Path, key: str) -> torch.Tensor:
        where = f"dataset {item.dataset_id!r}: {item.relpath}"
        try:
            data, image = read_image_file(item.root / item.relpath)
        except UnreadableImage as problem:
            raise DataError(f"{where}: {problem}; run lokr-job warm") from None
        if hashlib.sha256(data).hexdigest() != item.source.sha256:
            raise DataError(f"{where} changed since warm planned it; run lokr-job warm")
        if not self._vae.loaded:
            log.info("vae_cache_ondemand: loading the VAE to encode latents as training first reads them")
        pixels = image_to_pixels(apply_transform(image, item.source.transform))[None]
        vae = self._vae.get()
        if self._offload:
            vae.to(self._device)
        try:
            latent = encode_latents(vae, pixels, [noise_seed(key)])[0]
        finally:
            if self._offload:
                vae.to("cpu")
        save_entry(cache_dir, key, {"latents": latent}, {"dataset": item.dataset_id, "source": item.relpath})
        self.encoded += 1
        return latent
