"""A finished run found again: this recipe's output, in the work directory or at the run URI, is published
as it is instead of being trained a second time (a rerun after the push failed, or a reused run URI)."""

from __future__ import annotations

import json
import logging

from job.context import JobContext
from job.redact import redact
from job.storage import join, storage_for
from job.train.output import RESULT_FILE, is_finished

log = logging.getLogger("lokr")


def finished_output(ctx: JobContext) -> bool:
    """True when ``output/`` holds this recipe's finished weights, downloaded from the run URI if only
    the run URI has them."""
    cfg, output = ctx.config, ctx.workdir.output
    if is_finished(output, config_hash=cfg.hash, step=None):
        return True
    if not ctx.run_uri:
        return False
    remote = join(ctx.run_uri, "output")
    storage = storage_for(remote)
    record_uri = join(remote, RESULT_FILE)
    if storage.stat(record_uri) is None:
        return False
    try:
        record = json.loads(storage.read_bytes(record_uri))
    except ValueError:
        return False
    if not isinstance(record, dict) or record.get("config_hash") != cfg.hash:
        return False
    log.info("run: %s holds this recipe's finished output; downloading it", redact(remote))
    storage.download_prefix(remote, output, progress=True)
    return is_finished(output, config_hash=cfg.hash, step=None)
