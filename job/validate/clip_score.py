"""CLIP score of each validation image against its prompt (``evaluation_type: clip``), as SimpleTuner
reports it (torchmetrics' ``clip_score``): ``max(100 · cos(image embedding, text embedding), 0)``, with the
CLIP model ``pretrained_evaluation_model_name_or_path`` names (SimpleTuner's default:
``openai/clip-vit-large-patch14-336``), fetched like the base model. The embeddings are transformers'
``CLIPModel`` output (``image_embeds``, ``text_embeds``: projected and normalised); torchmetrics itself is
not used, as its 1.9 release reads the image features the way transformers 4 returned them.

The model is loaded at the first validation and kept on the CPU between validations (CLIP-L is 1.7 GB that
training may need); it visits the training device to score. Prompts are cut at CLIP's 77 tokens.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import CLIPModel, CLIPProcessor

log = logging.getLogger("lokr")


class ClipScorer:
    def __init__(self, folder: str | Path, device: torch.device | str):
        self.folder = Path(folder)
        self.device = device
        self._model: tuple[CLIPModel, CLIPProcessor] | None = None

    def scores(self, images: Mapping[Path, str]) -> dict[Path, float]:
        """Each image file's CLIP score against its prompt."""
        import torch
        from PIL import Image

        model, processor = self._load()
        model.to(self.device)
        try:
            scored = {}
            for path, prompt in images.items():
                inputs = processor(
                    text=[prompt],
                    images=[Image.open(path).convert("RGB")],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=model.config.text_config.max_position_embeddings,
                ).to(self.device)
                with torch.no_grad():
                    output = model(**inputs)
                cosine = float((output.image_embeds * output.text_embeds).sum())
                scored[path] = round(max(100 * cosine, 0.0), 4)
            return scored
        finally:
            model.to("cpu")

    def _load(self) -> tuple[CLIPModel, CLIPProcessor]:
        if self._model is None:
            from transformers import CLIPModel, CLIPProcessor

            model = CLIPModel.from_pretrained(self.folder).eval().requires_grad_(False)
            self._model = (model, CLIPProcessor.from_pretrained(self.folder))
            log.info("evaluation: CLIP model loaded from %s", self.folder)
        return self._model


def summary(scores: Mapping[Path, float]) -> dict[str, float]:
    """SimpleTuner's tracker keys: ``clip/mean``, ``clip/min``, ``clip/max``, ``clip/std``."""
    values = list(scores.values())
    return {
        "clip/mean": round(statistics.fmean(values), 4),
        "clip/min": min(values),
        "clip/max": max(values),
        "clip/std": round(statistics.pstdev(values), 4),
    }
