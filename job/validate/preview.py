"""Validation previews (``validation_preview``): while validation samples, every
``validation_preview_steps``-th sampling step's latents are decoded with a Tiny AutoEncoder for the SDXL
latent space (diffusers' ``AutoencoderTiny``; ``madebyollin/taesdxl``, the one SimpleTuner uses for
AuraFlow) and posted to the webhook as they come, as a ``validation_preview`` event carrying the PNG
(base64). The Tiny AutoEncoder decodes in milliseconds where the real VAE takes seconds; a preview shows
where sampling is heading, not the final image (that is the ``validation`` event's).

The decoder is loaded at the first validation and kept on the device (about 10 MB). A preview that fails
to decode or post is a warning; validation and training go on.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderTiny

    from job.track.webhook import Webhook

log = logging.getLogger("lokr")

# callback_on_step_end's signature: (pipeline, sampling step index, timestep, tensors) -> tensors.
StepCallback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]


class Previewer:
    def __init__(self, folder: str | Path, device: torch.device | str, webhook: Webhook, *, every: int):
        self.folder = Path(folder)
        self.device = device
        self.webhook = webhook
        self.every = every
        self._decoder: AutoencoderTiny | None = None

    def callback(self, step: int, image: str, total: int) -> StepCallback:
        """The pipeline callback that previews image ``image`` (its file's stem) of training step ``step``,
        sampled in ``total`` steps."""

        def on_step_end(pipeline: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            done = index + 1
            if done % self.every == 0 and done < total:  # the last step is the validation image itself
                try:
                    self._post(step, image, done, total, tensors["latents"])
                except Exception:
                    log.warning(
                        "validation preview of %s at sampling step %d failed", image, done, exc_info=True
                    )
            return tensors

        return on_step_end

    def _post(self, step: int, image: str, done: int, total: int, latents: torch.Tensor) -> None:
        payload = {
            "step": step,
            "image": image,
            "sampling_step": done,
            "sampling_steps": total,
            "png_base64": base64.b64encode(self.decode(latents)).decode("ascii"),
        }
        self.webhook.post("validation_preview", payload)

    def decode(self, latents: torch.Tensor) -> bytes:
        """A PNG of the first image in ``latents`` (the transformer's latent space)."""
        import torch
        from PIL import Image

        decoder = self._load()
        with torch.no_grad():
            pixels = decoder.decode(
                latents[:1].to(self.device, decoder.dtype) / decoder.config.scaling_factor
            )
        array = (pixels.sample[0].float().clamp(-1, 1) * 127.5 + 127.5).round().byte().permute(1, 2, 0)
        buffer = io.BytesIO()
        Image.fromarray(array.cpu().numpy()).save(buffer, format="PNG")
        return buffer.getvalue()

    def _load(self) -> AutoencoderTiny:
        if self._decoder is None:
            from diffusers import AutoencoderTiny

            self._decoder = AutoencoderTiny.from_pretrained(self.folder).to(self.device).eval()
            log.info("validation previews: Tiny AutoEncoder loaded from %s", self.folder)
        return self._decoder
