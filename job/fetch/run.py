"""``lokr-job fetch``: every remote dataset, the base model and the helper models the config asks for (the
CLIP model of ``evaluation_type: clip``, the Tiny AutoEncoder of ``validation_preview``) into the work
directory.

The config set was already fetched when the context was opened (``job.config.remote``).
"""

from __future__ import annotations

import logging

from job.context import JobContext
from job.fetch.datasets import dataset_uri, fetch_dataset
from job.fetch.model import fetch_helper_models, fetch_model

log = logging.getLogger("lokr")


def fetch_inputs(ctx: JobContext, *, progress: bool = True) -> None:
    for dataset in ctx.config.backends:
        report = fetch_dataset(dataset, ctx.workdir, progress=progress)
        if report is None:
            log.info(
                "fetch: dataset %s is local (%s); nothing to fetch", dataset.id, dataset.instance_data_dir
            )
            continue
        source = dataset.dataset_name if dataset.type == "huggingface" else dataset_uri(dataset)
        log.info(
            "fetch: dataset %s from %s: %d files (%d bytes) fetched, %d up to date",
            dataset.id,
            source,
            report.transferred,
            report.bytes,
            report.skipped,
        )
    fetch_model(ctx.config.job, ctx.workdir, progress=progress)
    fetch_helper_models(ctx.config.job, ctx.workdir, progress=progress)
