"""The config reference names every key the code accepts or knowingly ignores."""

from pathlib import Path

from job.config.backends import DatasetConfig, TextEmbedsConfig
from job.config.schema import JobConfig, LycorisConfig
from job.config.simpletuner import options

REFERENCE = (Path(__file__).parents[1] / "docs" / "config.md").read_text()


def test_every_config_key_is_documented() -> None:
    keys = set(JobConfig.model_fields) | set(DatasetConfig.model_fields) | set(TextEmbedsConfig.model_fields)
    keys |= set(LycorisConfig.model_fields) | set(options().config) | set(options().dataset)
    missing = sorted(k for k in keys if f"`{k}`" not in REFERENCE)
    assert missing == []
