"""Benchmark the caches: warm throughput against a bare VAE loop, and the cost of a warm with nothing to do.

    python scripts/bench_cache.py [--images 10000] [--size 32] [--batch 16] [--repeats 3]
        [--torch-threads N] [--model DIR] [--no-append]

Generates ``--images`` random PNGs, warms them once (scan, decode, transform, encode, write), then times
the same VAE (``job.cache.encode.encode_latents``) over the same pixel tensors held in memory, then a
second warm (the "is everything cached?" check: discovery, keys and index reads, no model loaded) and
``TrainingData.open``. Each is run ``--repeats`` times (a fresh work directory for each first warm) and
the fastest run is reported: on a shared machine the slower runs measure the neighbours. Library imports
happen before timing; model loading is inside the first warm. Prints a table and appends it to
BENCHMARKS.md. The default model is the tiny AuraFlow; ``--model`` takes a real pipeline folder (captions
are one instance prompt, so the text side costs one embedding).
"""

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from benchmarks import append_section
from PIL import Image

from job.cache import layout
from job.cache.dataset import TrainingData
from job.cache.encode import encode_latents, image_to_pixels
from job.cache.warm import warm_caches
from job.config.loader import load_config
from job.context import JobContext
from job.data.images import decode_rgb
from job.data.location import local_data_dir
from job.data.scan import scan_dataset
from job.data.transform import apply_transform
from job.model.components import compute_device, load_vae, model_geometry
from job.workdir import WorkDir


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=32, help="image side and resolution (pixel_area), px")
    parser.add_argument("--batch", type=int, default=16, help="vae_batch_size")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the fastest counts")
    parser.add_argument(
        "--torch-threads", type=int, help="torch.set_num_threads (default: torch's own choice)"
    )
    parser.add_argument("--model", type=Path, help="diffusers AuraFlow folder (default: build the tiny one)")
    parser.add_argument("--no-append", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    import diffusers  # noqa: F401  (imported now, so that no timing includes it)
    import transformers  # noqa: F401

    with tempfile.TemporaryDirectory(prefix="bench-cache-") as scratch:
        root = Path(scratch)
        model = args.model or _tiny_model(root / "model")
        config = _write_job(root, model, args.images, args.size, args.batch)
        runs = [
            _measure(
                JobContext(load_config(config), WorkDir(root / f"work{run}")), model, args.images, args.batch
            )
            for run in range(args.repeats)
        ]
        results = {name: min(run[name] for run in runs) for name in runs[0]}

    model_name = "tiny AuraFlow" if args.model is None else str(args.model)
    rows = [
        (
            "images",
            f"{args.images} × {args.size}x{args.size} px PNG, {model_name}, vae_batch_size {args.batch}",
        ),
        ("first warm (scan, decode, crop, encode, write)", _rate(results["warm_s"], args.images)),
        ("bare VAE loop, same tensors in memory", _rate(results["bare_s"], args.images)),
        ("warm throughput / bare loop", f"{results['bare_s'] / results['warm_s']:.2f}"),
        (f'second warm: "is everything cached?" ({args.images} entries)', f"{results['second_s']:.3f} s"),
        ("TrainingData.open (plans and indexes)", f"{results['open_s']:.3f} s"),
    ]
    table = "\n".join(
        ["| measure | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]
    )
    print(table)
    if not args.no_append:
        _append(table, sys.argv[1:])


def _tiny_model(dest: Path) -> Path:
    from job.model.tiny import build_tiny_pipeline

    build_tiny_pipeline(dest)
    return dest


def _write_job(root: Path, model: Path, count: int, size: int, batch: int) -> Path:
    images = root / "images"
    for index in range(count):
        folder = images / f"{index // 1000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(index).integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:06d}.png", compress_level=1)
    config_dir = root / "config"
    config_dir.mkdir()
    backends = [
        {
            "id": "bench",
            "type": "local",
            "instance_data_dir": str(images),
            "caption_strategy": "instanceprompt",
            "instance_prompt": "a photo",
            "crop": True,
            "crop_aspect": "square",
        },
        {"id": "text", "dataset_type": "text_embeds", "cache_dir": "cache/text"},
    ]
    (config_dir / "multidatabackend.json").write_text(json.dumps(backends))
    (config_dir / "lycoris_config.json").write_text(json.dumps({"algo": "lokr"}))
    settings = {
        "pretrained_model_name_or_path": str(model),
        "data_backend_config": "multidatabackend.json",
        "lycoris_config": "lycoris_config.json",
        "max_train_steps": 1,
        "resolution": size,
        "vae_batch_size": batch,
    }
    (config_dir / "config.json").write_text(json.dumps(settings))
    return config_dir / "config.json"


def _measure(ctx: JobContext, model: Path, count: int, batch: int) -> dict[str, float]:
    started = time.perf_counter()
    first = warm_caches(ctx)
    warm_s = time.perf_counter() - started
    assert first.datasets[0].latents_new == count, first

    started = time.perf_counter()
    second = warm_caches(ctx)
    second_s = time.perf_counter() - started
    assert second.encoded == 0 and not second.vae_loaded

    started = time.perf_counter()
    TrainingData.open(ctx)
    open_s = time.perf_counter() - started

    return {
        "warm_s": warm_s,
        "second_s": second_s,
        "open_s": open_s,
        "bare_s": _bare_loop(ctx, model, batch),
    }


def _bare_loop(ctx: JobContext, model: Path, batch: int) -> float:
    """The VAE alone: the same function, batches and tensors as warm, pixels prepared beforehand."""
    dataset = ctx.config.datasets[0]
    images = local_data_dir(dataset, ctx.workdir)
    scan = scan_dataset(
        dataset,
        images,
        model_geometry(model),
        seed=ctx.config.job.seed,
        aspect_rounding=ctx.config.job.aspect_bucket_rounding,
        probe_path=layout.probe_path(ctx.workdir, dataset.id),
    )
    pixels = [
        image_to_pixels(apply_transform(decode_rgb((images / s.relpath).read_bytes()), s.transform))
        for s in scan.samples
    ]
    seeds = list(range(len(pixels)))  # any seeds: sampling costs the same
    device = compute_device()
    vae = load_vae(model, device)
    encode_latents(vae, torch.stack(pixels[:batch]), seeds[:batch])  # warm-up: allocator, kernels
    started = time.perf_counter()
    for first in range(0, len(pixels), batch):
        encode_latents(vae, torch.stack(pixels[first : first + batch]), seeds[first : first + batch])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _rate(seconds: float, count: int) -> str:
    return f"{seconds:.2f} s, {count / seconds:,.0f} img/s"


def _torch_software() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{device}; torch {torch.__version__}"


def _append(table: str, argv: list[str]) -> None:
    append_section("Cache warm-up and the cached check", "bench_cache.py", argv, _torch_software(), table)


if __name__ == "__main__":
    main()
