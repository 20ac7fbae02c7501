"""What every stage is a function of: the resolved config, the work directory and the run URI."""

import logging
from dataclasses import dataclass
from pathlib import Path

from job.config.loader import ResolvedConfig, load_config
from job.storage import is_remote
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
    """Load and validate the config (warnings logged once) and name the work directory. A config on S3
    or the Hub is first fetched, with the files it references, into the work directory."""
    work = WorkDir(Path(workdir))
    if is_remote(config_uri):
        from job.config.remote import fetch_config

        local, origin = fetch_config(config_uri, work, overrides)
        config = load_config(local, overrides, remote_origin=origin)
    else:
        config = load_config(config_uri.removeprefix("file://"), overrides)
    for warning in config.warnings:
        log.warning("%s", warning)
    return JobContext(config=config, workdir=work, run_uri=run_uri)
