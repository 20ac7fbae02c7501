"""Validation images from the transformer being trained, with its LoKr still applied in memory.

The pipeline borrows the live transformer (nothing is saved or reloaded) and loads only the VAE, text
encoder, tokenizer and scheduler from the model source. Every image gets a fresh generator seeded with
``validation_seed``, so an image depends only on its prompt and size, not on what was rendered before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from job.model.components import use_vae_memory_options
from job.track.logs import adopt_library_loggers

if TYPE_CHECKING:
    import torch
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel

    from job.config.schema import JobConfig
    from job.validate.preview import StepCallback

log = logging.getLogger("lokr.validate")

# A prompt's cached text embedding [L, D] and mask [L], or None when it was not cached.
EmbeddingLookup = Callable[[str], "tuple[torch.Tensor, torch.Tensor] | None"]


class Adapter(Protocol):
    """What validation needs of the LyCORIS network: its multiplier, to render at another strength."""

    multiplier: float

    def set_multiplier(self, multiplier: float) -> None: ...


def build_validation_pipeline(
    model_source: str | Path,
    transformer: AuraFlowTransformer2DModel,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    revision: str | None = None,
    cache_dir: Path | None = None,
    with_text_encoder: bool = True,
    vae_tiling: bool = False,
    vae_slicing: bool = False,
) -> AuraFlowPipeline:
    """An AuraFlowPipeline around ``transformer`` (left where and as it is: it may be quantized or
    group-offloaded); the other components are loaded in ``dtype`` and moved to ``device``.

    ``with_text_encoder=False`` leaves the text encoder and tokenizer out (gigabytes not loaded): then
    every prompt must come as cached embeddings (``render_validation``'s ``embeddings``). ``vae_tiling`` and
    ``vae_slicing``: ``vae_enable_tiling``/``vae_enable_slicing`` for the decode."""
    from diffusers import AuraFlowPipeline

    without = {} if with_text_encoder else {"text_encoder": None, "tokenizer": None}
    pipeline = AuraFlowPipeline.from_pretrained(
        model_source, transformer=transformer, dtype=dtype, revision=revision, cache_dir=cache_dir, **without
    )
    adopt_library_loggers()
    if with_text_encoder:
        pipeline.text_encoder.to(device)
    use_vae_memory_options(pipeline.vae, tiling=vae_tiling, slicing=vae_slicing)
    pipeline.vae.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def render_validation(
    pipeline: AuraFlowPipeline,
    prompts: Mapping[str, str],
    job: JobConfig,
    step: int,
    out_dir: Path,
    *,
    embeddings: EmbeddingLookup | None = None,
    adapter: Adapter | None = None,
    preview: Callable[[str], StepCallback] | None = None,
) -> list[Path]:
    """Render every prompt at every ``validation_resolution`` into ``out_dir/step-<step>/``.

    Files are ``<nickname>.png``, or ``<nickname>-<W>x<H>.png`` when several resolutions are set; the
    paths come back in prompt order, resolutions inner, so ``{p.stem: p for p in paths}`` keys them for
    ``Trackers.log_images``. With ``embeddings``, prompts (and the negative prompt) it knows skip the
    text encoder: warm cached them padded to ``max_token_length``, as the pipeline would pad them.
    ``adapter`` (the LoKr being trained) renders at ``validation_lycoris_strength`` and gets its own
    multiplier back afterwards, as SimpleTuner's validation sets it (simpletuner/helpers/training/
    validation.py, ``setup_pipeline``): the weights, and so the saved adapter, are untouched.
    ``preview`` gives, for an image's file stem, the sampling callback that previews it
    (``job.validate.preview``).
    """
    import torch

    folder = Path(out_dir) / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    sizes = job.validation_sizes
    transformer = pipeline.transformer
    was_training = transformer.training
    paths: list[Path] = []
    transformer.eval()
    try:
        with (
            torch.no_grad(),
            guidance_rescale(transformer, job.validation_guidance, job.validation_guidance_rescale),
            adapter_strength(adapter, job.validation_lycoris_strength),
        ):
            for nickname, prompt in prompts.items():
                for width, height in sizes:
                    name = f"{nickname}-{width}x{height}.png" if len(sizes) > 1 else f"{nickname}.png"
                    # A CPU generator gives the same starting noise on every device.
                    generator = torch.Generator("cpu").manual_seed(job.validation_seed)
                    previews = (
                        {
                            "callback_on_step_end": preview(Path(name).stem),
                            "callback_on_step_end_tensor_inputs": ["latents"],
                        }
                        if preview is not None
                        else {}
                    )
                    image = pipeline(
                        **_prompt_arguments(prompt, job.validation_negative_prompt, embeddings),
                        num_inference_steps=job.validation_num_inference_steps,
                        guidance_scale=job.validation_guidance,
                        width=width,
                        height=height,
                        generator=generator,
                        # Training embedded prompts padded to this length, and AuraFlow's transformer
                        # has no text mask: the padding length changes the image.
                        max_sequence_length=job.max_token_length,
                        **previews,
                    ).images[0]
                    image.save(folder / name)
                    paths.append(folder / name)
    finally:
        transformer.train(was_training)
    log.info("validation: %d images at step %d in %s", len(paths), step, folder)
    return paths


def _prompt_arguments(prompt: str, negative: str, embeddings: EmbeddingLookup | None) -> dict[str, Any]:
    """The pipeline's prompt arguments: cached embeddings when both prompts have one, else the text."""
    cached = (embeddings(prompt), embeddings(negative)) if embeddings is not None else (None, None)
    if cached[0] is None or cached[1] is None:
        return {"prompt": prompt, "negative_prompt": negative}
    (embeds, mask), (negative_embeds, negative_mask) = cached
    return {
        "prompt_embeds": (embeds * mask.unsqueeze(-1).to(embeds.dtype)).unsqueeze(0),
        "prompt_attention_mask": mask.unsqueeze(0),
        "negative_prompt_embeds": (negative_embeds * negative_mask.unsqueeze(-1).to(embeds.dtype)).unsqueeze(
            0
        ),
        "negative_prompt_attention_mask": negative_mask.unsqueeze(0),
    }


@contextmanager
def adapter_strength(adapter: Adapter | None, strength: float) -> Iterator[None]:
    """Within the block the adapter applies at ``strength``; its multiplier is restored on exit."""
    if adapter is None:
        yield
        return
    trained_at = adapter.multiplier
    adapter.set_multiplier(strength)
    try:
        yield
    finally:
        adapter.set_multiplier(trained_at)


@contextmanager
def guidance_rescale(transformer: torch.nn.Module, guidance_scale: float, rescale: float) -> Iterator[None]:
    """Apply ``validation_guidance_rescale`` although AuraFlowPipeline has no ``guidance_rescale``.

    The pipeline combines the [unconditional, conditional] halves of the transformer's output as
    ``u + g·(c - u)``. A forward hook replaces ``c`` by ``u + (target - u)/g``, so that combination comes
    out as the rescaled ``target`` (Lin et al. 2023, section 3.4, as in diffusers' ``rescale_noise_cfg``).
    Without classifier-free guidance (``g <= 1``) or with ``rescale`` 0 there is nothing to do.
    """
    import torch

    if rescale <= 0 or guidance_scale <= 1:
        yield
        return

    def rescale_output(module: torch.nn.Module, args: Any, output: Any) -> Any:
        prediction = output[0] if isinstance(output, tuple) else output.sample
        uncond, cond = prediction.float().chunk(2)
        guided = uncond + guidance_scale * (cond - uncond)
        target = rescale_guided(guided, cond, rescale)
        adjusted = torch.cat([uncond, uncond + (target - uncond) / guidance_scale]).to(prediction.dtype)
        if isinstance(output, tuple):
            return (adjusted, *output[1:])
        output.sample = adjusted
        return output

    handle = transformer.register_forward_hook(rescale_output)
    try:
        yield
    finally:
        handle.remove()


def rescale_guided(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Match the guided prediction's per-sample std to the conditional one's, blended by ``rescale``."""
    dims = list(range(1, cond.ndim))
    matched = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * matched + (1 - rescale) * guided
