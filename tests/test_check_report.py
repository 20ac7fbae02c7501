"""``lokr-job check``: census, estimates, every problem at once, exit codes, ``--json``, access probes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_check import _check, seed_config_on_tiny

from job.check import build_report
from job.check.estimate import GIB, VramEstimate, transformer_config, vram_estimate
from job.config.loader import load_config
from job.context import open_context
from job.errors import ExitCode


def test_the_seed_config_gets_a_census_and_estimates(tiny_job: Path, tmp_path: Path) -> None:
    config = seed_config_on_tiny(tiny_job, tmp_path)
    text = _check(config)
    assert text.returncode == 0, text.stderr
    for expected in (
        "datasets:",
        "dreambooth-subject (training, repeats 1000, scanned): 12 images, 12 usable",
        "pseudo-camera-10k-auraflow (regularisation, repeats 0",
        "buckets: 64x64 ×12",
        "training: 10000 steps",
        "cache:",
        "peak VRAM (estimate):",
        "LoKr",
    ):
        assert expected in text.stdout, text.stdout
    assert not (tmp_path / "lokr-work").exists()  # check writes nothing into a work directory

    result = _check(config, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["exit_code"] == 0 and report["steps"] == 10000
    camera, subject = report["datasets"]
    assert camera["buckets"] == {"64x64": 12} and camera["role"] == "regularisation"
    assert subject["usable"] == 12 and subject["captions"] == 1  # instanceprompt: one caption
    assert report["vram"]["adapter_parameters"] > 0 and report["cache"]["latents"] == 24


def test_sizes_beyond_the_positional_grid_fail_before_any_gpu(tiny_job: Path, tmp_path: Path) -> None:
    config = seed_config_on_tiny(tiny_job, tmp_path, tiny_sizes=False)
    backends = json.loads((tmp_path / "config" / "multidatabackend.json").read_text())
    for backend in backends:
        if "instance_data_dir" in backend:
            backend.update(resolution=2048, maximum_image_size=2048, target_downsample_size=2048)
    (tmp_path / "config" / "multidatabackend.json").write_text(json.dumps(backends))
    result = _check(config)
    assert result.returncode == ExitCode.BAD_CONFIG
    assert "pseudo-camera-10k-auraflow" in result.stdout and "dreambooth-subject" in result.stdout
    assert result.stdout.count("allows at most 1536x1536") == 2


def test_three_mistakes_are_listed_together(tiny_job: Path, tmp_path: Path) -> None:
    mistakes = ["learning_rte=1e-4", "train_batch_size=zero", "lr_scheduler=sometimes"]
    overrides = [arg for mistake in mistakes for arg in ("--set", mistake)]
    result = _check(tiny_job, *overrides)
    assert result.returncode == ExitCode.BAD_CONFIG
    for key in ("learning_rte", "train_batch_size", "lr_scheduler"):
        assert key in result.stderr, result.stderr
    assert "3 problems" in result.stderr

    as_json = _check(tiny_job, "--json", *overrides)
    report = json.loads(as_json.stdout)
    assert report == {"ok": False, "exit_code": 2, "problems": report["problems"]}
    assert len(report["problems"]) == 3


def _tiny_backends(tiny_job: Path, dest: Path, **changes: object) -> str:
    """The tiny job's backends with ``changes`` to its dataset, as a ``data_backend_config`` override."""
    backends = json.loads((tiny_job.parent / "multidatabackend.json").read_text())
    backends[0].update(instance_data_dir=str(tiny_job.parent.parent / "datasets" / "tiny-subject"))
    backends[0].update(changes)
    (dest / "backends.json").write_text(json.dumps(backends))
    return f"data_backend_config={dest / 'backends.json'}"


def test_data_that_is_all_skipped_exits_3_and_says_why(tiny_job: Path, tmp_path: Path) -> None:
    result = _check(tiny_job, "--json", "--set", _tiny_backends(tiny_job, tmp_path, minimum_image_size=512))
    assert result.returncode == ExitCode.BAD_DATA, result.stderr
    report = json.loads(result.stdout)
    (dataset,) = report["datasets"]
    assert dataset["usable"] == 0 and dataset["skipped"] == {"too small": 12}
    assert "under minimum_image_size" in "".join(dataset["skipped_examples"])


def test_the_full_size_estimate_counts_auraflow_and_shrinks_with_int8_and_offload(tiny_job: Path) -> None:
    config, source = transformer_config(None)
    full = load_config(tiny_job, ["base_model_precision=bf16", "gradient_checkpointing=true"])
    bf16 = vram_estimate(full, config, source, (1024, 1024))
    assert 6.7e9 < bf16.parameters < 6.9e9
    assert 12 * GIB < bf16.weights_bytes < 14 * GIB
    int8 = vram_estimate(
        load_config(tiny_job, ["base_model_precision=int8-quanto"]), config, source, (1024, 1024)
    )
    assert int8.weights_bytes < 0.6 * bf16.weights_bytes
    offload = load_config(
        tiny_job, ["base_model_precision=bf16", "enable_group_offload=true", "gradient_checkpointing=true"]
    )
    assert vram_estimate(offload, config, source, (1024, 1024)).weights_bytes < 2 * GIB
    unchecked = vram_estimate(
        load_config(tiny_job, ["base_model_precision=bf16"]), config, source, (1024, 1024)
    )
    assert unchecked.activation_bytes > 5 * bf16.activation_bytes


def test_on_demand_latents_add_the_vae_to_the_estimate_unless_it_is_parked(tiny_job: Path) -> None:
    config, source = transformer_config(None)

    def estimate(*settings: str) -> VramEstimate:
        return vram_estimate(
            load_config(tiny_job, ["base_model_precision=bf16", *settings]), config, source, (1024, 1024)
        )

    warmed = estimate("gradient_checkpointing=true")
    on_demand = estimate("gradient_checkpointing=true", "vae_cache_ondemand=true")
    assert warmed.vae_bytes == 0
    # SDXL's float32 VAE (335 MB) stays beside the transformer, and at 1024 px an encode's feature maps
    # outgrow a checkpointed step's activations, which are freed while it runs.
    assert on_demand.vae_bytes > 0.4 * GIB
    assert on_demand.peak_bytes == warmed.peak_bytes + on_demand.vae_bytes
    # Without checkpointing the step's activations dwarf an encode: only the resident VAE adds, and a VAE
    # parked in CPU memory (offload_during_startup) adds nothing.
    resident = estimate("vae_cache_ondemand=true").vae_bytes
    assert 0.3 * GIB < resident < on_demand.vae_bytes
    assert estimate("vae_cache_ondemand=true", "offload_during_startup=true").vae_bytes == 0


def test_an_s3_run_uri_is_proven_writable_without_writing(tiny_job: Path, tmp_path: Path, s3) -> None:
    ctx = open_context(str(tiny_job), tmp_path / "work", s3.uri("runs/one"), [])
    report = build_report(ctx)
    (run,) = [a for a in report.access if a.what == "run URI"]
    assert run.ok, run.detail
    assert s3.keys() == []
    assert not s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads")  # aborted

    missing = build_report(open_context(str(tiny_job), tmp_path / "work", "s3://no-such-bucket/run", []))
    assert missing.exit_code == ExitCode.BAD_CONFIG
    assert any("no-such-bucket" in message for _, message in missing.problems)


def test_a_dataset_on_s3_not_fetched_yet_is_counted_from_its_listing(
    tiny_job: Path, tmp_path: Path, s3
) -> None:
    data = tiny_job.parent.parent / "datasets" / "tiny-subject"
    for path in sorted(data.iterdir()):
        s3.put(f"data/{path.name}", path.read_bytes())
    backends = _tiny_backends(tiny_job, tmp_path, instance_data_dir=s3.uri("data"))
    ctx = open_context(str(tiny_job), tmp_path / "work", None, [backends])
    report = build_report(ctx)
    (dataset,) = report.datasets
    assert not dataset.scanned and dataset.images == 12
    assert report.exit_code == 0 and report.estimates_note and report.steps == 24
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("namespace, ok", [("tester", True), ("someone-else", False)])
def test_hub_model_id_needs_a_write_token_in_its_namespace(
    tiny_job: Path, tmp_path: Path, hub, namespace: str, ok: bool
) -> None:
    overrides = ["push_to_hub=true", f"hub_model_id={namespace}/auraflow-lokr"]
    report = build_report(open_context(str(tiny_job), tmp_path / "work", None, overrides))
    (access,) = [a for a in report.access if a.what == "hub_model_id"]
    assert access.ok is ok, access.detail
    assert report.exit_code == (0 if ok else ExitCode.NO_PERMISSION)


def test_a_read_only_hub_token_cannot_push(tiny_job: Path, tmp_path: Path, hub) -> None:
    hub.token_role = "read"
    overrides = ["push_to_hub=true", "hub_model_id=tester/auraflow-lokr"]
    report = build_report(open_context(str(tiny_job), tmp_path / "work", None, overrides))
    assert report.exit_code == ExitCode.NO_PERMISSION
    assert any("read-only" in message for _, message in report.problems)


@pytest.mark.parametrize(
    ("precision", "bytes_per_weight"), [("int8-torchao", 1.0), ("fp8-torchao", 1.0), ("nf4-bnb", 0.5625)]
)
def test_every_precision_has_a_vram_estimate_marked_unmeasured(
    tiny_job: Path, precision: str, bytes_per_weight: float
) -> None:
    config, source = transformer_config(None)
    bf16 = vram_estimate(load_config(tiny_job, ["base_model_precision=bf16"]), config, source, (1024, 1024))
    quantized = vram_estimate(
        load_config(tiny_job, [f"base_model_precision={precision}"]), config, source, (1024, 1024)
    )
    assert quantized.unmeasured_precision == precision
    assert bf16.unmeasured_precision is None
    # Linear weights shrink from bf16's 2 bytes to bytes_per_weight; the rest (about 1%) stays bf16.
    assert quantized.weights_bytes == pytest.approx(bf16.weights_bytes * bytes_per_weight / 2, rel=0.02)


def test_check_accepts_a_gpu_only_precision_that_run_refuses_here(tiny_job: Path, tmp_path: Path) -> None:
    """check plans for the machine the job will run on; run on this CPU machine refuses before fetching."""
    settings = ("--set", "base_model_precision=fp8-torchao")
    checked = _check(tiny_job, "--workdir", str(tmp_path / "w"), *settings)
    assert checked.returncode == ExitCode.OK, checked.stderr[-2000:]
    assert "peak VRAM (estimate, fp8-torchao not yet measured on a GPU)" in checked.stdout
    run = ("run", "--config", str(tiny_job), "--workdir", str(tmp_path / "w"), *settings)
    # Run as on a machine without a GPU, wherever the suite runs.
    no_gpu = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    ran = subprocess.run(
        [sys.executable, "-m", "job", *run], capture_output=True, text=True, timeout=300, env=no_gpu
    )
    assert ran.returncode == ExitCode.BAD_CONFIG
    assert (
        "fp8-torchao: torchao's float8 weight-only kernels need an NVIDIA GPU of compute capability 8.9"
        in ran.stderr
    )
    assert not (tmp_path / "w" / "cache").exists()  # nothing was fetched or warmed
