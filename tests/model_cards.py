"""Helpers for the model-card tests: the card's parts, and its python block run against local files."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from job.config.loader import ResolvedConfig


def front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, "the card must start with YAML front matter"
    return yaml.safe_load(match.group(1))


def python_block(card: str) -> str:
    (block,) = re.findall(r"```python\n(.*?)```", card, re.DOTALL)
    return block


def run_python_block(card: str, constants: dict[str, str], folder: Path) -> np.ndarray:
    """Run the card's code with each ``NAME = ...`` line of ``constants`` naming a local copy (the
    documented substitution), offline and on the CPU; return the image it saves."""
    code = python_block(card)
    for name, value in constants.items():
        code, replaced = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", code, flags=re.MULTILINE)
        assert replaced == 1, f"the card's code has no single {name} = line"
    folder.mkdir()
    (folder / "card.py").write_text(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "card.py"], cwd=folder, env=env, check=True, capture_output=True)
    return np.asarray(Image.open(folder / "output.png"))


def card_render_settings(cfg: ResolvedConfig) -> dict[str, Any]:
    """``infer`` keyword arguments matching what the card's code renders (at 64x64)."""
    return {
        "steps": cfg.job.validation_num_inference_steps,
        "guidance": cfg.job.validation_guidance,
        "width": 64,
        "height": 64,
        "seed": cfg.job.validation_seed,
        "negative_prompt": cfg.job.validation_negative_prompt,
        "max_sequence_length": cfg.job.max_token_length,
    }
