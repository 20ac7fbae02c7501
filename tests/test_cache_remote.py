"""Remote cache shards: a warmed machine uploads a few tar shards; a fresh machine unpacks them and warms
without loading the VAE or the text encoder."""

import json

from job.cache.remote import SHARD_INDEX, cache_uri, download_caches, upload_caches
from job.cache.warm import warm_caches
from job.context import open_context


def test_shards_let_a_fresh_machine_skip_the_encoders(tiny_job, tmp_path):
    run_uri = str(tmp_path / "run")
    first = open_context(str(tiny_job), tmp_path / "first", run_uri, ["cache_uri=run"])
    assert cache_uri(first.config.job.cache_uri, first.run_uri) == str(tmp_path / "run" / "cache")
    assert download_caches(first) == 0  # nothing there yet
    report = warm_caches(first)
    assert report.vae_loaded and report.text_encoder_loaded
    assert upload_caches(first, report) == 2
    shards = json.loads((tmp_path / "run" / "cache" / SHARD_INDEX).read_text())["shards"]
    assert sorted(shards) == ["latents-tiny-subject.tar", "text.tar"]
    # Warm again with nothing new: no second upload.
    assert upload_caches(first, warm_caches(first)) == 0

    fresh = open_context(str(tiny_job), tmp_path / "second", run_uri, ["cache_uri=run"])
    assert download_caches(fresh) == 2
    report = warm_caches(fresh)
    assert not report.vae_loaded and not report.text_encoder_loaded
    assert download_caches(fresh) == 0  # already unpacked: not fetched again


def test_no_cache_uri_means_no_remote_caches(tiny_job, tmp_path):
    ctx = open_context(str(tiny_job), tmp_path / "work", str(tmp_path / "run"), [])
    assert cache_uri(ctx.config.job.cache_uri, ctx.run_uri) is None
    assert download_caches(ctx) == 0
