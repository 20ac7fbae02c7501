"""Benchmark the training loop: ``lokr-job train`` against a bare PyTorch loop doing the same work.

    python scripts/bench_train.py [--steps 200] [--repeat 3] [--threads N] [--no-append]

Builds the tiny job and warms its caches. The bare loop (``BareLoop``, about 30 lines, no framework) has the
same transformer, LoKr, AdamW, clipping and batches (read from the cache beforehand, in the trainer's order)
and writes flow matching out inline. Three figures:
- steady-state s/step of ``lokr-job train`` run as a subprocess (the tiny config: adamw, norm clipping, no
  mixed precision; one checkpoint, at the end), from its own log line, against the bare loop run alone:
  best of ``--repeat`` runs each, alternating (other load only ever slows a run down);
- the same two loops interleaved step by step in this process (``build_trainer`` sets up exactly what
  ``lokr-job train`` runs), the median of the per-pair ratios: a shared machine's load drifts too slowly
  to bias a pair, so this is the steadier ratio;
- process start to the first step done, for ``lokr-job train``.
``--threads`` sets torch's CPU threads for everything. Prints a table and appends it to BENCHMARKS.md.
The goal is a ratio of at most 1.05.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from benchmarks import append_section

from job.cache.dataset import TrainingData
from job.context import open_context

STEADY = re.compile(r"steady state ([0-9.]+) s/step")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run (default 200)")
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs of each loop (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for both loops")
    parser.add_argument("--no-append", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by torch in the lokr-job subprocess

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        _cli("tiny", str(root / "job"))
        config = root / "job" / "config" / "config.json"
        workdir = root / "work"
        _cli("warm", "--config", str(config), "--workdir", str(workdir))
        batches = _batches(config, workdir, args.steps)
        job_runs, bare_runs = [], []
        for _ in range(args.repeat):
            job_runs.append(_lokr_job_train(config, workdir, args.steps))
            bare_runs.append(BareLoop(root / "job" / "model", config, batches).run())
        paired_job, paired_bare, ratios = _interleaved(config, workdir, batches)
    job_wall = min(run.steady for run in job_runs)
    bare_wall = min(bare_runs)
    table = (
        "| measure | bare loop s/step | `lokr-job train` s/step | ratio |\n|---|---|---|---|\n"
        f"| separate runs (best of {args.repeat}) | {bare_wall:.4f} | {job_wall:.4f} "
        f"| {job_wall / bare_wall:.3f} |\n"
        f"| interleaved step by step (median) | {paired_bare:.4f} | {paired_job:.4f} "
        f"| {statistics.median(ratios):.3f} |\n\n"
        "Process start to first step done (`lokr-job train`, tiny model): "
        f"{min(run.first_step for run in job_runs):.1f} s. {args.steps} steps per run, "
        f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores at the end; goal: ratio ≤ 1.05."
    )
    print(table)
    if not args.no_append:
        _append(table, sys.argv[1:])


def _cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "job", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"lokr-job {args[0]} failed:\n{result.stderr[-3000:]}")
    return result.stderr


@dataclass(frozen=True)
class JobRun:
    steady: float  # wall s/step from lokr-job's own log line
    first_step: float  # seconds from process start to "first step done"


def _lokr_job_train(config: Path, workdir: Path, steps: int) -> JobRun:
    # A fresh start each time: no finished output to skip, no checkpoint to resume.
    shutil.rmtree(workdir / "output", ignore_errors=True)
    overrides = [
        f"max_train_steps={steps}",
        f"checkpoint_step_interval={steps}",
        "resume_from_checkpoint=none",
    ]
    command = [sys.executable, "-m", "job", "train", "--config", str(config), "--workdir", str(workdir)]
    for override in overrides:
        command += ["--set", override]
    started = time.perf_counter()
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    first_step, steady, lines = None, None, []
    for line in process.stderr:
        lines.append(line)
        if first_step is None and "first step done" in line:
            first_step = time.perf_counter() - started
        if match := STEADY.search(line):
            steady = float(match.group(1))
    if process.wait() != 0 or first_step is None or steady is None:
        raise SystemExit("lokr-job train failed:\n" + "".join(lines[-40:]))
    return JobRun(steady=steady, first_step=first_step)


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # latents, prompt embeddings, prompt mask


def _batches(config: Path, workdir: Path, steps: int) -> list[Batch]:
    """The batches ``lokr-job train`` reads, in its order, held in memory."""
    ctx = open_context(str(config), workdir, None, [f"max_train_steps={steps}"])
    data = TrainingData.open(ctx)
    batches = []
    for step in range(steps):
        batch = data.batch(*divmod(step, data.batches_per_epoch))
        batches.append((batch.latents, batch.prompt_embeds, batch.prompt_mask))
    return batches


def _interleaved(config: Path, workdir: Path, batches: list[Batch]) -> tuple[float, float, list[float]]:
    """(median lokr-job s/step, median bare s/step, per-pair ratios), the loops alternating step by step."""
    from accelerate import Accelerator

    from job.train.run import build_trainer

    steps = len(batches)
    overrides = [f"max_train_steps={steps}", "resume_from_checkpoint=none"]
    ctx = open_context(str(config), workdir, None, overrides)
    accelerator = Accelerator(mixed_precision=ctx.config.job.mixed_precision)
    run = build_trainer(ctx, accelerator, TrainingData.open(ctx), steps)
    bare = BareLoop(config.parent.parent / "model", config, batches)
    job_times, bare_times = [], []
    for step in range(steps):
        # ABBA order, so neither loop always runs right after the other.
        for loop in ("job", "bare") if step % 2 else ("bare", "job"):
            started = time.perf_counter()
            if loop == "job":
                run.trainer.step(run.state)
            else:
                bare.step(step)
            (job_times if loop == "job" else bare_times).append(time.perf_counter() - started)
    warm = steps // 10 + 1
    ratios = [a / b for a, b in zip(job_times[warm:], bare_times[warm:], strict=True)]
    return statistics.median(job_times[warm:]), statistics.median(bare_times[warm:]), ratios


class BareLoop:
    """The reference: the same model, LoKr, optimizer, clipping and batches, and nothing else."""

    def __init__(self, model: Path, config: Path, batches: list[Batch]):
        import json5
        from diffusers import AuraFlowTransformer2DModel
        from lycoris import LycorisNetwork, create_lycoris

        lycoris = json5.loads((config.parent / "lycoris_config.json").read_text())
        self.transformer = AuraFlowTransformer2DModel.from_pretrained(model, subfolder="transformer")
        self.transformer.requires_grad_(False)
        LycorisNetwork.apply_preset(lycoris.pop("apply_preset"))
        self.network = create_lycoris(self.transformer, lycoris.pop("multiplier"), **lycoris)
        self.network.apply_to()
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=1e-3, weight_decay=1e-2)
        self.batches = batches

    def step(self, step: int) -> None:
        latents, embeds, mask = self.batches[step]
        generator = torch.Generator().manual_seed(step)
        sigmas = torch.sigmoid(torch.randn(latents.shape[0], generator=generator))
        noise = torch.randn(latents.shape, generator=generator)
        sigma = sigmas.view(-1, 1, 1, 1)
        prediction = self.transformer(
            hidden_states=(1 - sigma) * latents + sigma * noise,
            encoder_hidden_states=embeds * mask.unsqueeze(-1),
            timestep=sigmas,
            return_dict=False,
        )[0]
        loss = torch.nn.functional.mse_loss(prediction.float(), noise - latents)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.item()

    def run(self) -> float:
        """Steady-state s/step over all the batches (lokr-job's warm-up rule: the first tenth left out)."""
        durations = []
        for step in range(len(self.batches)):
            started = time.perf_counter()
            self.step(step)
            durations.append(time.perf_counter() - started)
        return statistics.fmean(durations[len(durations) // 10 + 1 :])


def _torch_software() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{device}; torch {torch.__version__}"


def _append(table: str, argv: list[str]) -> None:
    append_section(
        "Training loop overhead: lokr-job train vs a bare loop",
        "bench_train.py",
        argv,
        _torch_software(),
        table,
    )


if __name__ == "__main__":
    main()
