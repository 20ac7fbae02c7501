"""What every stage is a function of: the resolved config, the work directory and the run URI."""

import logging
from dataclasses import dataclass
from pathlib import Path

from job.config.loader import ResolvedConfig, load_config
from job.workdir import WorkDir

log = logging.getLogger("lokr")


@dataclass(frozen=True)
class JobContext:
    config: ResolvedConfig
    workdir: WorkDir
    run_uri: str | None = None


def open_context(
    config_uri: str, workdir: str | Path, run_uri: str | None, overrides: list[str]
) -> JobContext:
    """Load and validate the config (warnings logged once) and name the work directory."""
    config = load_config(config_uri.removeprefix("file://"), overrides)
    for warning in config.warnings:
        log.warning("%s", warning)
    return JobContext(config=config, workdir=WorkDir(Path(workdir)), run_uri=run_uri)
