"""A tiny, random, byte-deterministic AuraFlow pipeline in diffusers format.

It has the real pipeline's component classes and wiring (UMT5 text encoder, T5 tokenizer, 4-channel
SDXL-like VAE, AuraFlow MMDiT, flow-matching Euler scheduler) at a few MB, so every stage of the job can
run for real on a CPU in seconds, and the embedded default job needs no download. Builds are byte-identical
across processes so that caches keyed on file content stay warm and tests can compare trees.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from job.files import replace_folder

if TYPE_CHECKING:
    from diffusers import AuraFlowTransformer2DModel, AutoencoderKL
    from transformers import T5Tokenizer, UMT5EncoderModel

SEED = 20240611

# Text encoder width; the transformer's joint_attention_dim must equal it.
TEXT_DIM = 32
HEADS = 2
HEAD_DIM = 32
# AuraFlow needs caption_projection_dim == heads * head_dim (the attention width).
INNER_DIM = HEADS * HEAD_DIM
# The real model's 96x96 patch grid (1536 px a side), so configs sized for AuraFlow pass its checks.
POS_EMBED_MAX_SIZE = 9216

TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,
    "num_mmdit_layers": 1,
    "num_single_dit_layers": 2,
    "attention_head_dim": HEAD_DIM,
    "num_attention_heads": HEADS,
    "joint_attention_dim": TEXT_DIM,
    "caption_projection_dim": INNER_DIM,
    "pos_embed_max_size": POS_EMBED_MAX_SIZE,
}

# Four blocks make the x8 downsample (diffusers derives vae_scale_factor from len(block_out_channels)).
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.13025,
    "force_upcast": False,
}

# AuraFlow's own scheduler config (fal/AuraFlow): flow matching with a fixed shift.
SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 1.73}

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")

# Whole words for the synthetic captions, the prompt library and ordinary prompts. Kept in code, not trained,
# because the tokenizers UnigramTrainer is not deterministic.
WORDS = """
a an the of on in at to and or with without by for from as is are be it its this that these those
photo photograph picture image drawing painting render illustration portrait close up shot view scene
red green blue yellow orange purple pink white black gray grey brown cyan magenta teal gold silver
dark light bright pale deep vivid colorful colourful
circle square triangle rectangle ellipse oval star cross line lines dot dots ring stripe stripes
shape shapes block box disk disc small big large tiny huge little round flat simple plain
background foreground center centre middle left right top bottom corner edge side over under above below
cat dog bird fish horse person man woman boy girl child family people face hand eye
house tree flower sky sea water sun moon cloud mountain road city street room table chair car
sks token subject style object thing one two three four five
high quality detailed realistic cinematic dramatic elegant timeless vintage futuristic artistic abstract
mysterious adventurous dynamic anime chef breathtaking lifelike intimate stunning beautiful powerful
striking playful charming vibrant heartwarming natural unique personality charm presence grace
capturing showcasing emphasizing highlighting exuding evoking blending shrouded immersed set against
her his their him she he they essence colors colours expressive features art culinary creation
sous action filled moment shadows intrigue enigmatic sophistication nostalgia bygone era creativity
visual storytelling cutting edge portrayal backdrop advanced technology crafted strength character
spirited youthful energy innocence joy cohesive bonds connections between loved ones representation
exciting captured visually
"""

# Subword pieces so that unseen words still tokenize into something better than single letters.
SUFFIXES = ("s", "es", "ed", "ing", "ly", "er", "est", "ion", "al", "ful", "ness", "y")
PUNCTUATION = tuple(".,!?;:'\"-_()<>/&+=%#@*[]{}|~$")


def _vocab() -> list[tuple[str, float]]:
    """A fixed Unigram vocab: specials, then whole words, subwords and single characters.

    Scores are log-probabilities; a word scores far above the sum of its letters, so known words stay whole.
    """
    words = list(dict.fromkeys(WORDS.split()))
    chars = [*"abcdefghijklmnopqrstuvwxyz", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ", *"0123456789", *PUNCTUATION]
    pieces: list[tuple[str, float]] = [(token, 0.0) for token in SPECIAL_TOKENS]
    pieces.append(("▁", -3.0))
    pieces += [(f"▁{w}", -5.0 - 0.001 * i) for i, w in enumerate(words)]
    # Unprefixed copies keep a word whole after punctuation ("<token>," is one whitespace-split chunk).
    pieces += [(w, -6.0 - 0.001 * i) for i, w in enumerate(words)]
    pieces += [(s, -7.0) for s in SUFFIXES]
    pieces += [(f"▁{c}", -9.0) for c in chars]
    pieces += [(c, -10.0) for c in chars]
    # A piece listed twice ("▁a" is a word and a letter) would make ids and vocab_size disagree:
    # keep the first.
    first: dict[str, float] = {}
    for piece, score in pieces:
        first.setdefault(piece, score)
    return list(first.items())


def build_tokenizer() -> T5Tokenizer:
    from transformers import T5Tokenizer

    # extra_ids=0: no T5 sentinels, they would only bloat the vocab and the embedding table.
    return T5Tokenizer(vocab=_vocab(), extra_ids=0, model_max_length=256)


def build_text_encoder(vocab_size: int) -> UMT5EncoderModel:
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    return UMT5EncoderModel(config).eval()


def build_transformer() -> AuraFlowTransformer2DModel:
    from diffusers import AuraFlowTransformer2DModel

    return AuraFlowTransformer2DModel(**TRANSFORMER_CONFIG).eval()


def build_vae() -> AutoencoderKL:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG).eval()


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """``torch.set_default_dtype(dtype)`` for the block only. Random init draws differ by dtype: here, a
    caller's set_default_dtype(bfloat16) must not change the tiny model's bytes."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _seeded(offset: int) -> None:
    # One seed per component, so adding or resizing one leaves the others' weights unchanged.
    torch.manual_seed(SEED + offset)


def build_tiny_pipeline(dest: Path) -> None:
    """Write the tiny pipeline to ``dest`` (replacing what is there); byte-identical on every call."""
    from diffusers import AuraFlowPipeline, FlowMatchEulerDiscreteScheduler

    dest = Path(dest)
    # Leave the caller's global RNG as it was: building the default job must not change a training run.
    with torch.random.fork_rng(devices=[]), default_dtype(torch.float32):
        tokenizer = build_tokenizer()
        _seeded(1)
        text_encoder = build_text_encoder(len(tokenizer))
        _seeded(2)
        vae = build_vae()
        _seeded(3)
        transformer = build_transformer()
    pipe = AuraFlowPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
    )

    def fill(folder: Path) -> None:
        pipe.save_pretrained(folder, safe_serialization=True)
        _normalise_json(folder)

    # Written beside dest and swapped in, so a reader never sees half a model; with the usual modes
    # (safetensors writes 0600: written by root, the job's non-root user could not load the model).
    replace_folder(dest, fill)


def _normalise_json(root: Path) -> None:
    """Rewrite JSON files with sorted keys, so output never depends on dict insertion order."""
    for path in sorted(root.rglob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(
            json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
        )
