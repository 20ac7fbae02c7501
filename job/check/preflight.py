"""Before a command spends anything: the access checks ``lokr-job check`` makes, for what the command needs.

``run`` needs everything; a stage run alone needs its own part: every stage writes the run URI (status,
lease), fetch reads the inputs, publish pushes to the Hub. A mistake is reported within seconds, with
the exit code ``check`` gives it (2 bad URI or missing repo, 4 credentials, 75 a store that did not answer
after retries), before anything is fetched, warmed or trained. A tracker that cannot work is a warning: the
run goes on without it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from job.check.access import Access, AccessNeed, check_access
from job.config.loader import ResolvedConfig
from job.errors import ConfigError, DataError, ExitCode, JobError, PermissionDeniedError, TransientError

log = logging.getLogger("lokr")

# Every stage writes status.json to the run URI (and holds its lease), so each needs it writable.
NEEDS: dict[str, frozenset[AccessNeed]] = {
    "run": frozenset(("inputs", "run_uri", "hub")),
    "fetch": frozenset(("inputs", "run_uri")),
    "warm": frozenset(("run_uri",)),
    "train": frozenset(("run_uri",)),
    "publish": frozenset(("run_uri", "hub")),
}
_ERRORS: dict[int, type[JobError]] = {
    int(ExitCode.BAD_CONFIG): ConfigError,
    int(ExitCode.BAD_DATA): DataError,
    int(ExitCode.NO_PERMISSION): PermissionDeniedError,
    int(ExitCode.TRANSIENT): TransientError,
}
# Which failure decides the exit code when several are found: the order ``run`` would meet them.
_PRIORITY = (ExitCode.BAD_CONFIG, ExitCode.NO_PERMISSION, ExitCode.BAD_DATA, ExitCode.TRANSIENT)
_WANDB_OFFLINE = {"offline", "disabled", "dryrun"}


def preflight(cfg: ResolvedConfig, run_uri: str | None, command: str) -> None:
    """Raise the ``JobError`` of the first access problem ``command`` would meet, naming every problem."""
    needs = NEEDS.get(command)
    if needs is None:
        return
    started = time.monotonic()
    results = check_access(cfg, run_uri, needs)
    failed = [a for a in results if not a.ok]
    elapsed = time.monotonic() - started
    for warning in tracker_warnings(cfg):
        log.warning("preflight: %s", warning)
    if not failed:
        log.info("preflight: %d access checks passed in %.1f s", len(results), elapsed)
        return
    code = next(int(c) for c in _PRIORITY if any(a.exit_code == int(c) for a in failed))
    log.info(
        "preflight: %d of %d access checks failed after %.1f s; nothing was fetched, warmed or trained",
        len(failed),
        len(results),
        elapsed,
    )
    messages = [_describe(a) for a in failed if a.exit_code == code]
    messages += [_describe(a) for a in failed if a.exit_code != code]
    if code == ExitCode.BAD_CONFIG:
        raise ConfigError(messages)
    raise _ERRORS.get(code, TransientError)("\n".join(messages))


def _describe(access: Access) -> str:
    return f"{access.what} ({access.uri}): {access.detail}"


def tracker_warnings(cfg: ResolvedConfig) -> list[str]:
    """What will keep a tracker from recording; the run itself goes on either way."""
    if cfg.job.report_to != "wandb":
        return []
    if os.environ.get("WANDB_MODE", "").lower() in _WANDB_OFFLINE:
        return []
    if os.environ.get("WANDB_API_KEY") or _netrc_has("api.wandb.ai"):
        return []
    return [
        "report_to is wandb but no wandb credentials are set (WANDB_API_KEY, or WANDB_MODE=offline to "
        "log locally): the run will go on without wandb"
    ]


def _netrc_has(host: str) -> bool:
    import netrc

    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False
