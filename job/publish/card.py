"""The model card (README.md) of a LoKr adapter or a full-rank fine-tune: Hub front matter, what was
trained and how, and code that runs.

The card's ``python`` block begins with one constant per line (``BASE_MODEL = ...``, ``ADAPTER_FILE =
...`` or ``MODEL_REPO = ...``, ``PROMPT = ...``); everything after them only reads them. To run the block
without the Hub (as the tests do, or a user holding local copies), replace the ``BASE_MODEL =`` line with
a local model folder, and for a LoKr the ``ADAPTER_FILE =`` line (an ``hf_hub_download``) with a local
adapter path, for a full-rank fine-tune the ``MODEL_REPO =`` line with a local folder holding
``transformer/``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from job.redact import redact
from job.validate.prompts import instance_prompt

if TYPE_CHECKING:
    from job.config.loader import ResolvedConfig

ADAPTER_FILENAME = "pytorch_lora_weights.safetensors"
TAGS = ["lycoris", "lokr", "auraflow", "text-to-image", "diffusers"]
FULL_TAGS = ["auraflow", "text-to-image", "diffusers", "full-finetune"]
# Licences of the flavours' base models, from their Hub pages. Pony v7 has its own licence, which the
# Hub records as "other" with a link.
BASE_LICENSES = {
    "fal/AuraFlow": "apache-2.0",
    "fal/AuraFlow-v0.2": "apache-2.0",
    "fal/AuraFlow-v0.3": "apache-2.0",
    "terminusresearch/auraflow-v0.3": "apache-2.0",
}
_HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# The python block: a head (imports, then the model constants), the shared settings, a loader, the render.
_LOKR_HEAD = """\
import torch
from diffusers import AuraFlowPipeline
from huggingface_hub import hf_hub_download
from lycoris import create_lycoris_from_weights

BASE_MODEL = {base_model!r}
ADAPTER_REPO = {model_repo!r}
ADAPTER_FILE = hf_hub_download(ADAPTER_REPO, {adapter_filename!r})
LORA_SCALE = 1.0
"""

_FULL_HEAD = """\
import torch
from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel

BASE_MODEL = {base_model!r}
MODEL_REPO = {model_repo!r}
"""

_SETTINGS = """\
QUANTIZE_INT8 = False  # True: int8 transformer weights (optimum-quanto), about half the memory
PROMPT = {prompt!r}
NEGATIVE_PROMPT = {negative_prompt!r}
WIDTH, HEIGHT = {width}, {height}
STEPS = {steps}
GUIDANCE = {guidance}
MAX_SEQUENCE_LENGTH = {max_sequence_length}  # prompts were padded to this length in training
SEED = {seed}

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
"""

_LOKR_LOAD = """\
pipeline = AuraFlowPipeline.from_pretrained(BASE_MODEL, dtype=dtype)
if QUANTIZE_INT8:
    from optimum.quanto import freeze, qint8, quantize

    quantize(pipeline.transformer, weights=qint8)
    freeze(pipeline.transformer)

# The LoKr runs beside each layer it adapts, as in training (on int8 layers too). LyCORIS's merge_to()
# would scale it by alpha/rank twice, which is only right when alpha equals the rank.
lycoris, _ = create_lycoris_from_weights(LORA_SCALE, ADAPTER_FILE, pipeline.transformer)
lycoris.apply_to()
"""

_FULL_LOAD = """
# Only the transformer was fine-tuned; the text encoder, VAE and scheduler are the base model's.
transformer = AuraFlowTransformer2DModel.from_pretrained(MODEL_REPO, subfolder="transformer", dtype=dtype)
pipeline = AuraFlowPipeline.from_pretrained(BASE_MODEL, transformer=transformer, dtype=dtype)
if QUANTIZE_INT8:
    from optimum.quanto import freeze, qint8, quantize

    quantize(pipeline.transformer, weights=qint8)
    freeze(pipeline.transformer)
"""

_RENDER = """\
pipeline.to(device)

image = pipeline(
    prompt=PROMPT,
    negative_prompt=NEGATIVE_PROMPT,
    width=WIDTH,
    height=HEIGHT,
    num_inference_steps=STEPS,
    guidance_scale=GUIDANCE,
    max_sequence_length=MAX_SEQUENCE_LENGTH,
    generator=torch.Generator("cpu").manual_seed(SEED),
).images[0]
image.save("output.png")
"""


def model_card(
    cfg: ResolvedConfig,
    *,
    base_model: str,
    validation_images: Sequence[tuple[str, str, str]],
    step: int,
) -> str:
    """README.md for the model trained for ``step`` steps: a LoKr adapter, or with ``model_type: full`` the
    fine-tuned transformer.

    ``base_model`` should be a Hub repo id (it becomes the card's ``base_model`` and the code's
    ``BASE_MODEL``); ``validation_images`` are (nickname, prompt, path relative to the repo root), the
    last validation's, shown in the Hub widget and the card. Credentials are masked in the result.
    """
    subject = instance_prompt(cfg)
    full = cfg.job.model_type == "full"
    sections = [
        _front_matter(cfg, base_model, subject, validation_images),
        f"# {_title(cfg)}\n\n{_summary(base_model, step, full=full)}",
        _trigger_section(subject),
        _gallery_section(validation_images),
        _settings_section(cfg, step),
        "" if full else _lycoris_section(cfg),
        "## Inference\n\n"
        f"Runs with `pip install {_requirements(full)}`. For a private repo, log in first "
        "(`hf auth login`) or set `HF_TOKEN`.\n\n"
        "```python\n" + _inference_code(cfg, base_model, subject) + "```",
    ]
    text = "\n\n".join(s for s in sections if s) + "\n"
    return redact(text)


def _front_matter(
    cfg: ResolvedConfig, base_model: str, subject: str | None, images: Sequence[tuple[str, str, str]]
) -> str:
    from huggingface_hub import ModelCardData

    tags = FULL_TAGS if cfg.job.model_type == "full" else TAGS
    fields: dict[str, Any] = {"library_name": "diffusers", "pipeline_tag": "text-to-image", "tags": tags}
    if _is_hub_repo(base_model):
        fields["base_model"] = base_model
    fields.update(_license(base_model))
    if subject:
        fields["instance_prompt"] = subject
    negative = cfg.job.validation_negative_prompt
    fields["widget"] = [
        {"text": prompt, "parameters": {"negative_prompt": negative}, "output": {"url": path}}
        for _, prompt, path in images
    ]
    return f"---\n{ModelCardData(**fields).to_yaml()}\n---"


def _license(base_model: str) -> dict[str, str]:
    if base_model in BASE_LICENSES:
        return {"license": BASE_LICENSES[base_model]}
    if _is_hub_repo(base_model):
        # Unknown to us (Pony v7 included): point at the base model's own licence.
        return {"license": "other", "license_link": f"https://huggingface.co/{base_model}"}
    return {"license": "other"}


def _is_hub_repo(value: str) -> bool:
    return bool(_HUB_REPO_ID.match(value)) and not Path(value).exists()


def _model_link(base_model: str) -> str:
    return f"https://huggingface.co/{base_model}" if _is_hub_repo(base_model) else base_model


def _title(cfg: ResolvedConfig) -> str:
    if cfg.job.hub_model_id:
        return cfg.job.hub_model_id.rpartition("/")[2]
    return "AuraFlow full fine-tune" if cfg.job.model_type == "full" else "AuraFlow LoKr adapter"


def _summary(base_model: str, step: int, *, full: bool) -> str:
    base = f"[{base_model}]({_model_link(base_model)})"
    if full:
        return (
            f"A full fine-tune of the AuraFlow transformer of {base} (every weight trained, not an adapter), "
            f"trained for {step} steps with lokr-job. This repo holds the transformer (`transformer/`); the "
            "text encoder, VAE and scheduler are the base model's."
        )
    return f"A LyCORIS LoKr adapter for {base}, trained for {step} steps with lokr-job."


def _requirements(full: bool) -> str:
    return "diffusers transformers " + ("" if full else "lycoris-lora ") + "optimum-quanto accelerate"


def _trigger_section(subject: str | None) -> str:
    if subject:
        return f"## Trigger\n\nThe instance prompt it was trained on: `{subject}`. Put it in your prompt."
    return (
        "## Trigger\n\nNo instance prompt: it was trained on per-image captions; prompt as they were written."
    )


def _gallery_section(images: Sequence[tuple[str, str, str]]) -> str:
    if not images:
        return ""
    rows = [f"**{nickname}**: {prompt}\n\n![{nickname}]({path})" for nickname, prompt, path in images]
    return "## Validation images\n\n" + "\n\n".join(rows)


def _settings_section(cfg: ResolvedConfig, step: int) -> str:
    job = cfg.job
    planned = f"{job.max_train_steps} planned" if job.max_train_steps else f"{job.num_train_epochs} epochs"
    warmup = f", {job.lr_warmup_steps} warm-up steps" if job.lr_warmup_steps else ""
    rows = [
        ("Steps", f"{step} ({planned})"),
        ("Learning rate", f"{job.learning_rate:g}"),
        ("LR scheduler", f"{job.lr_scheduler}{warmup}"),
        ("Optimizer", job.optimizer),
        ("Batch size", f"{job.train_batch_size} x {job.gradient_accumulation_steps} accumulation, per GPU"),
        ("Mixed precision", job.mixed_precision),
        ("Base model precision", job.base_model_precision),
        ("Resolution", f"{job.resolution:g} ({job.resolution_type})"),
        ("Gradient clipping", f"{job.max_grad_norm} ({job.grad_clip_method})"),
        ("EMA", f"decay {job.ema_decay}" if job.use_ema else "off"),
        ("Seed", str(job.seed)),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    datasets = "\n".join(
        f"- `{d.id}`: captions from {d.caption_strategy}, repeats {d.repeats}"
        + (" (regularisation)" if d.is_regularisation_data else "")
        for d in cfg.datasets
    )
    return f"## Training\n\n| setting | value |\n|---|---|\n{table}\n\nDatasets:\n\n{datasets}"


def _lycoris_section(cfg: ResolvedConfig) -> str:
    from job.model.lokr import lycoris_settings

    settings = lycoris_settings(cfg.lycoris) if cfg.lycoris is not None else {}
    return "## LyCORIS config\n\n```json\n" + json.dumps(settings, indent=2) + "\n```"


def _inference_code(cfg: ResolvedConfig, base_model: str, subject: str | None) -> str:
    job = cfg.job
    width, height = job.validation_sizes[0]
    if job.model_type == "full":
        template = _FULL_HEAD + _SETTINGS + _FULL_LOAD + _RENDER
        placeholder = "your-name/your-auraflow-finetune"
    else:
        template = _LOKR_HEAD + _SETTINGS + _LOKR_LOAD + _RENDER
        placeholder = "your-name/your-adapter"
    return template.format(
        base_model=base_model,
        model_repo=job.hub_model_id or placeholder,
        adapter_filename=ADAPTER_FILENAME,
        prompt=job.validation_prompt or subject or "a photo",
        negative_prompt=job.validation_negative_prompt,
        width=width,
        height=height,
        steps=job.validation_num_inference_steps,
        guidance=job.validation_guidance,
        max_sequence_length=job.max_token_length,
        seed=job.validation_seed,
    )
