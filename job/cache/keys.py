"""Content keys: a cache entry's name is a hash of everything that changes its value.

- a latent: the image bytes (their sha256), the transform (resize, crop box, hence bucket, crop style
  and seed), the VAE (its files), the dtype it ran in and whether it ran tiled (``vae_enable_tiling``:
  tile seams change the values; slicing does not);
- a text embedding: the caption, the text encoder and tokenizer (their files), the max token length
  and the dtype;
- a loss mask: the mask file's bytes, its image's transform and the VAE's downsampling (the latent grid it
  is averaged onto).
The ``*_FORMAT`` strings are bumped whenever the code that produces an entry changes what it produces.
"""

import hashlib
import json

from job.data.transform import Transform

LATENT_FORMAT = "lokr-latent-1"
TEXT_FORMAT = "lokr-text-1"
MASK_FORMAT = "lokr-mask-1"


def _hash(value: object) -> str:
    return hashlib.sha256(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def vae_identity(vae_files: str, dtype: str, *, tiled: bool = False) -> str:
    # Untiled keys are as they were before tiling existed: caches warmed then stay valid.
    return _hash([LATENT_FORMAT, vae_files, dtype, *(["tiled"] if tiled else [])])


def text_identity(encoder_files: str, tokenizer_files: str, max_length: int, dtype: str) -> str:
    return _hash([TEXT_FORMAT, encoder_files, tokenizer_files, max_length, dtype])


def latent_key(image_sha256: str, transform: Transform, vae: str) -> str:
    return _hash([vae, image_sha256, transform.resized, transform.crop_box])


def mask_key(mask_sha256: str, transform: Transform, latent_scale: int) -> str:
    return _hash([MASK_FORMAT, mask_sha256, transform.resized, transform.crop_box, latent_scale])


def text_key(caption: str, text: str) -> str:
    return _hash([text, caption])


def noise_seed(key: str) -> int:
    """The seed of a latent's VAE sample: from its key, so re-encoding gives the same latent."""
    return int(key[:15], 16)
