"""Validation prompts: the main prompt, the library, ``<token>`` in prompts and nicknames."""

import dataclasses
import json
import logging
from pathlib import Path

import json5
import pytest

from job.config.backends import DatasetConfig
from job.config.loader import ResolvedConfig, load_config
from job.validate.prompts import safe_nickname, validation_prompts

SEED_CONFIG = Path(__file__).parent / "fixtures" / "seed" / "config"


def _with(cfg: ResolvedConfig, **changes: object) -> ResolvedConfig:
    return dataclasses.replace(cfg, **changes)


def _seed_datasets() -> list[DatasetConfig]:
    entries = json5.loads((SEED_CONFIG / "multidatabackend.json").read_text())
    # Only the fields lokr-job models (the loader warns about SimpleTuner's others and drops them).
    return [
        DatasetConfig.model_validate({k: v for k, v in e.items() if k in DatasetConfig.model_fields})
        for e in entries
        if e.get("dataset_type") != "text_embeds"
    ]


def test_seed_library_gets_the_subject_in_prompts_and_nicknames(tiny_job: Path) -> None:
    library = json.loads((SEED_CONFIG / "user_prompt_library.json").read_text())
    cfg = _with(load_config(tiny_job), datasets=_seed_datasets(), prompt_library=library)
    prompts = validation_prompts(cfg)
    subject = "the name of your subject goes here"
    assert list(prompts)[:3] == [
        "validation",
        "anime_the_name_of_your_subject_goes_here",
        "chef_the_name_of_your_subject_goes_here",
    ]
    assert prompts["validation"] == "a red circle on blue"
    assert prompts["chef_the_name_of_your_subject_goes_here"] == (
        f"a high-quality, detailed photograph of {subject} as a sous-chef, immersed in the art of culinary creation"
    )
    assert prompts["woman"] == library["woman"]
    assert len(prompts) == 1 + len(library)
    assert not any("<token>" in p for p in prompts.values())


def test_regularisation_data_is_not_the_subject(tiny_job: Path) -> None:
    # The seed lists the regularisation set first; the subject is the dreambooth set's prompt.
    regularisation = DatasetConfig(
        id="reg",
        instance_data_dir="/x",
        caption_strategy="instanceprompt",
        instance_prompt="a photo",
        is_regularisation_data=True,
    )
    subject = DatasetConfig(
        id="subject", instance_data_dir="/y", caption_strategy="instanceprompt", instance_prompt="sks dog"
    )
    cfg = _with(
        load_config(tiny_job), datasets=[regularisation, subject], prompt_library={"p_<token>": "<token>"}
    )
    assert validation_prompts(cfg)["p_sks_dog"] == "sks dog"


def test_without_an_instance_prompt_the_placeholder_is_dropped_with_a_warning(
    tiny_job: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The tiny job captions from text files: no dataset has an instance prompt.
    prompts = validation_prompts(load_config(tiny_job))
    assert prompts == {
        "validation": "a red circle on blue",
        "photo": "a photo of, a red circle on blue",
        "drawing": "a simple drawing of in the center of a white background",
    }
    assert any("no dataset has an instance_prompt" in r.getMessage() for r in caplog.records)
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "lokr.validate")


def test_nicknames_are_file_safe_and_unique(tiny_job: Path) -> None:
    library = {"validation": "again", "a/b\\c": "slashes", "a b c": "spaces", "..": "dots", "é!": "accents"}
    cfg = _with(load_config(tiny_job), prompt_library=library)
    assert list(validation_prompts(cfg)) == [
        "validation",
        "validation-2",
        "a_b_c",
        "a_b_c-2",
        "prompt",
        "prompt-2",
    ]
    assert len(safe_nickname("x" * 500)) == 120


def test_no_validation_prompt_means_library_only(tiny_job: Path) -> None:
    cfg = load_config(tiny_job, ["validation_prompt=null"])
    assert "validation" not in validation_prompts(cfg)
