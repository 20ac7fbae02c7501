"""``lokr-job publish``: the finished model to the run URI (``<run_uri>/output/``) and the Hub.

The run URI copy goes first, so once it is done the trained weights survive the machine whatever the Hub
does. The Hub push is one commit (the LoKr adapter, its LyCORIS config and EMA adapter, or the full-rank
``transformer/``; the model card; the latest validation images); when it keeps failing the stage exits 75
and a rerun of ``lokr-job publish`` finishes it, no retraining.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from job.config.loader import ResolvedConfig
from job.context import JobContext
from job.errors import ConfigError, TransientError
from job.lease import fence
from job.model.source import local_model_path
from job.publish.bundle import assemble_hub_folder, require_trained, trained_step
from job.storage import join, storage_for
from job.workdir import WorkDir

log = logging.getLogger("lokr")

# What each model_type leaves in output/, as logs and commit messages name it.
_TRAINED = {"lora": "LoKr adapter", "full": "full-rank transformer"}


def publish_output(ctx: JobContext) -> None:
    job, output = ctx.config.job, ctx.workdir.output
    trained = _TRAINED[job.model_type]
    if not job.push_to_hub and not ctx.run_uri:
        log.info(
            "publish: push_to_hub is off and no run URI is set; nothing to publish (the %s is in %s)",
            trained,
            output,
        )
        return
    require_trained(output, job.model_type)
    if ctx.run_uri:
        target = join(ctx.run_uri, "output")
        fence(target)
        report = storage_for(target).upload_folder(
            output, target, commit_message="lokr-job: training output", progress=True
        )
        log.info("publish: %d files (%d bytes) copied to %s", report.transferred, report.bytes, target)
    if job.push_to_hub:
        try:
            url = push_to_hub(ctx.config, ctx.workdir)
        except TransientError as exc:
            safe = f"{output}" + (f" and {join(ctx.run_uri, 'output')}" if ctx.run_uri else "")
            raise TransientError(
                f"{exc.message}. The {trained} is safe in {safe}; run lokr-job publish again to finish"
            ) from exc
        log.info("publish: %s pushed to %s", trained, url)


def push_to_hub(cfg: ResolvedConfig, workdir: WorkDir) -> str:
    """Create ``hub_model_id`` if needed (private unless ``hub_private`` is false) and upload the trained
    model's files in one commit; return the repo's ``hf://`` URI."""
    from job.storage.hub import HubStorage

    repo_id = cfg.job.hub_model_id or ""
    if repo_id.count("/") != 1:
        raise ConfigError(f"hub_model_id {repo_id!r}: write it as owner/name (e.g. you/auraflow-lokr)")
    repo = f"hf://{repo_id}"
    step = trained_step(cfg, workdir.output)
    message = f"lokr-job: {_TRAINED[cfg.job.model_type]} at step {step}"
    # Staged beside the output (same filesystem), so the files are hard links, not copies.
    with tempfile.TemporaryDirectory(dir=workdir.root, prefix=".publish-") as staging:
        files = assemble_hub_folder(
            cfg, workdir.output, Path(staging), base_model=lambda: local_model_path(cfg.job, workdir)
        )
        HubStorage(private=cfg.job.hub_private).upload_folder(
            staging, repo, commit_message=message, progress=True
        )
    log.info("publish: %s ← %s", repo, ", ".join(files))
    return repo
