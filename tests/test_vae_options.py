"""vae_enable_slicing and vae_enable_tiling on the tiny VAE: what each does to the latents and images."""

import pytest
import torch

from job.cache.encode import encode_latents
from job.model.components import use_vae_memory_options
from job.model.tiny import build_vae

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Slicing runs the same convolutions one image at a time: only float summation order can differ.
SLICING_TOLERANCE = 1e-5


def _pixels(height: int, width: int) -> torch.Tensor:
    return torch.rand(3, 3, height, width, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_slicing_gives_the_same_latents_and_images() -> None:
    vae, pixels, seeds = build_vae(), _pixels(96, 128), [1, 2, 3]
    plain = encode_latents(vae, pixels, seeds)
    with torch.inference_mode():
        image = vae.decode(plain / vae.config.scaling_factor).sample
    use_vae_memory_options(vae, tiling=False, slicing=True)
    assert vae.use_slicing
    assert torch.allclose(encode_latents(vae, pixels, seeds), plain, atol=SLICING_TOLERANCE, rtol=0)
    with torch.inference_mode():
        sliced_image = vae.decode(plain / vae.config.scaling_factor).sample
    assert torch.allclose(sliced_image, image, atol=SLICING_TOLERANCE, rtol=0)


def test_tiling_changes_nothing_within_one_tile_and_changes_larger_images() -> None:
    """Each tile normalises with its own GroupNorm statistics: beyond one tile the latents differ (on
    this random VAE by about a third of their mean magnitude; a trained VAE's seams are much fainter)."""
    vae, seeds = build_vae(), [1, 2, 3]
    tile = vae.tile_sample_min_size
    small, large = _pixels(tile, tile), _pixels(2 * tile, 2 * tile)
    plain_small, plain_large = encode_latents(vae, small, seeds), encode_latents(vae, large, seeds)
    use_vae_memory_options(vae, tiling=True, slicing=False)
    assert vae.use_tiling
    assert torch.equal(encode_latents(vae, small, seeds), plain_small)
    tiled_large = encode_latents(vae, large, seeds)
    assert tiled_large.shape == plain_large.shape
    assert not torch.allclose(tiled_large, plain_large, atol=1e-3)
