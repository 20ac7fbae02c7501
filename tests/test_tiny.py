"""The embedded default job: deterministic bytes, a loadable pipeline, LoKr targets, a sane tokenizer."""

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import json5
import pytest
import torch

from job.tiny import PROMPT_LIBRARY, VALIDATION_PROMPT, captions, write_tiny_job

REPO = Path(__file__).resolve().parents[1]


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("tiny-a")
    write_tiny_job(dest)
    return dest


@pytest.fixture(scope="module")
def pipe(job_dir: Path):
    from diffusers import AuraFlowPipeline

    pipeline = AuraFlowPipeline.from_pretrained(job_dir / "model")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def lycoris_preset_reset() -> Iterator[None]:
    """``apply_preset`` sets class attributes process-wide; put them back so other tests see defaults."""
    from lycoris import LycorisNetwork

    names = [
        "ENABLE_CONV",
        "TARGET_REPLACE_MODULE",
        "TARGET_REPLACE_NAME",
        "MODULE_ALGO_MAP",
        "NAME_ALGO_MAP",
        "LORA_PREFIX",
        "USE_FNMATCH",
        "TARGET_EXCLUDE_NAME",
    ]
    saved = {name: getattr(LycorisNetwork, name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(LycorisNetwork, name, value)


def test_builds_are_byte_identical_across_processes(job_dir: Path, tmp_path: Path) -> None:
    # A second process with another hash seed: catches set/dict-order and per-process randomness.
    other = tmp_path / "tiny-b"
    code = "import sys, pathlib, job.tiny; job.tiny.write_tiny_job(pathlib.Path(sys.argv[1]))"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    subprocess.run(
        [sys.executable, "-c", code, str(other)], check=True, cwd=REPO, env=env, capture_output=True
    )
    a, b = _tree(job_dir), _tree(other)
    assert list(a) == list(b)
    assert [name for name in a if a[name] != b[name]] == []


def test_rebuild_in_place_is_identical(tmp_path: Path) -> None:
    write_tiny_job(tmp_path)
    first = _tree(tmp_path)
    write_tiny_job(tmp_path)
    second = _tree(tmp_path)
    assert first == second


def test_layout_and_config(job_dir: Path) -> None:
    config = json.loads((job_dir / "config" / "config.json").read_text())
    assert config["pretrained_model_name_or_path"] == "model"
    assert config["data_backend_config"] == "config/multidatabackend.json"
    assert config["lycoris_config"] == "config/lycoris_config.json"
    assert "output_dir" not in config
    backends = json.loads((job_dir / "config" / "multidatabackend.json").read_text())
    data_dir = job_dir / backends[0]["instance_data_dir"]
    pngs = sorted(data_dir.glob("*.png"))
    assert len(pngs) == 12
    for png in pngs:
        caption = png.with_suffix(".txt").read_text().strip()
        assert png.stem == caption.replace(" ", "_")
    sizes = set()
    from PIL import Image

    for png in pngs:
        with Image.open(png) as image:
            assert image.mode == "RGB"
            sizes.add(image.size)
    assert len(sizes) >= 3  # square and both orientations, so aspect buckets exist
    # The trailing commas of the seed's file are kept on purpose; it must still parse as JSON5.
    assert json5.loads((job_dir / "config" / "lycoris_config.json").read_text())["algo"] == "lokr"


def test_pipeline_generates_64px_in_two_steps(pipe) -> None:
    generator = torch.Generator().manual_seed(0)
    out = pipe(
        VALIDATION_PROMPT, height=64, width=64, num_inference_steps=2, generator=generator, output_type="pt"
    )
    assert out.images.shape == (1, 3, 64, 64)
    assert torch.isfinite(out.images).all()


def test_pipeline_handles_non_square(pipe) -> None:
    out = pipe("a photo", height=48, width=64, num_inference_steps=1, guidance_scale=1.0, output_type="pt")
    assert out.images.shape == (1, 3, 48, 64)


def test_seed_lycoris_preset_wraps_attention(job_dir: Path, lycoris_preset_reset: None) -> None:
    from diffusers import AuraFlowTransformer2DModel
    from lycoris import LycorisNetwork, create_lycoris

    seed_config = json5.loads((job_dir / "config" / "lycoris_config.json").read_text())
    transformer = AuraFlowTransformer2DModel.from_pretrained(job_dir / "model", subfolder="transformer")
    assert any(type(m).__name__ == "Attention" for m in transformer.modules())
    LycorisNetwork.apply_preset(seed_config["apply_preset"])
    network = create_lycoris(
        transformer,
        seed_config["multiplier"],
        linear_dim=seed_config["linear_dim"],
        linear_alpha=seed_config["linear_alpha"],
        algo=seed_config["algo"],
        factor=seed_config["factor"],
    )
    network.apply_to()
    # 1 joint block x 8 projections + 2 single blocks x 4, as on the real model (4x8 + 32x4 = 160).
    assert len(network.loras) == 16
    assert sum(p.numel() for p in network.parameters()) > 0


def test_tokenizer_knows_every_caption_word(pipe) -> None:
    tokenizer = pipe.tokenizer
    texts = [*captions(), VALIDATION_PROMPT, *PROMPT_LIBRARY.values()]
    for text in texts:
        ids = tokenizer(text).input_ids
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Caption words are whole tokens, not spelt out letter by letter.
    for caption in captions():
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(caption).input_ids)
        assert tokens == [f"▁{word}" for word in caption.split()] + ["</s>"]
    assert pipe.text_encoder.config.vocab_size >= len(tokenizer)


def test_build_leaves_global_rng_alone(tmp_path: Path) -> None:
    from job.model.tiny import build_tiny_pipeline

    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    build_tiny_pipeline(tmp_path / "model")
    assert torch.equal(torch.rand(3), expected)
