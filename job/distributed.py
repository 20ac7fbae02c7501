"""Several processes, one job: who does what when the job runs under torchrun (``docker/launch.py``).

The work directory is per machine and shared by that machine's processes, so what fills it (fetching
the config set, data and model; warming the caches) runs on each machine's first process while the
others wait; training runs everywhere; publishing runs once, on global rank 0. A failure on the process
doing the work ends the others with the same exit code, so every rank tells the orchestrator the same
story (and none waits at a barrier for a peer that is gone).

A single process (no ``WORLD_SIZE`` above 1) just runs each step: no process group, no collective.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from job.errors import ConfigError, ExitCode, JobError

if TYPE_CHECKING:
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DeepSpeedPlugin

T = TypeVar("T")


class PeerFailedError(JobError):
    """Another rank failed at a step this one was waiting on; carries that rank's exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = ExitCode(exit_code)


def world_size() -> int:
    """The number of processes in the job (torchrun and ``accelerate launch`` set WORLD_SIZE)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def use_cpu() -> bool:
    """Whether to run on the CPU (gloo between processes): whenever there is no GPU. Told nothing, accelerate
    under torchrun without a GPU sets up a single-process state in *every* rank (each of them rank 0 of 1,
    training alone and writing the same files); ``ACCELERATE_USE_CPU`` forces the CPU too."""
    import torch

    return not torch.cuda.is_available()


def process_state() -> PartialState:
    """accelerate's process group state, created once (the ``Accelerator`` made later shares it)."""
    from accelerate import PartialState

    return PartialState(cpu=use_cpu())


def make_accelerator(*, deepspeed_plugin: DeepSpeedPlugin | None = None, **kwargs: object) -> Accelerator:
    """An ``Accelerator`` that is really distributed whenever the job runs as several processes."""
    from accelerate import Accelerator

    if deepspeed_plugin is not None:
        _single_process_rendezvous()
    # DeepSpeed runs on a machine without a GPU through its own CPU accelerator; accelerate's cpu=True
    # would silently switch DeepSpeed off.
    cpu = use_cpu() and deepspeed_plugin is None
    accelerator = Accelerator(cpu=cpu, deepspeed_plugin=deepspeed_plugin, **kwargs)
    if accelerator.num_processes != world_size():
        raise RuntimeError(
            f"WORLD_SIZE is {world_size()} but accelerate set up {accelerator.num_processes} process(es) "
            f"({accelerator.distributed_type}); the ranks would train apart and overwrite each other's files"
        )
    return accelerator


def _single_process_rendezvous() -> None:
    """DeepSpeed sets up torch.distributed even for one process, and without torchrun's variables it looks
    for MPI; a job started as a plain process is rank 0 of 1 on this machine."""
    if "WORLD_SIZE" in os.environ:
        return
    import socket

    with socket.socket() as probe:  # a free port for the one-member group
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(
        {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )


def any_rank(flag: Callable[[], bool]) -> Callable[[], bool]:
    """``flag``, asked on every rank at the same point, is true everywhere once it is true anywhere.

    For the stop request at a step boundary: a signal reaches the ranks at slightly different moments, and
    a rank that stopped a step before the others would leave them waiting in that step's all-reduce.
    """
    if world_size() == 1:
        return flag

    def agreed() -> bool:
        import torch
        import torch.distributed as dist

        value = torch.tensor([int(flag())], device=process_state().device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    return agreed


def require_same(value: object, what: str) -> None:
    """``ConfigError`` on every rank unless all ranks hold the same ``value`` (e.g. the step to resume from).

    On several machines each reads its own work directory; one that lacks a checkpoint the others resume
    from would train from step 0 and desynchronise the job (or hang it) instead of failing.
    """
    if world_size() == 1:
        return
    import torch.distributed as dist

    values: list[object] = [value] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if any(other != values[0] for other in values):
        listed = ", ".join(f"rank {rank}: {other}" for rank, other in enumerate(values))
        raise ConfigError(
            f"the processes disagree on {what} ({listed}); on several machines set LOKR_RUN_URI so that "
            "every machine fetches the same checkpoints"
        )


def on_each_machine_first(fn: Callable[[], T]) -> T:
    """Run ``fn`` on each machine's first process, then on its others (e.g. to read what it fetched)."""
    if world_size() == 1:
        return fn()
    first = process_state().is_local_main_process
    # Every rank takes part in both rounds: collectives must match one for one across ranks.
    early = _run_shared(fn, first, "the first process on this machine")
    late = _run_shared(fn, not first, "a later process")
    return early if first else late


def once_per_machine(fn: Callable[[], object]) -> None:
    """Run ``fn`` (which fills the shared work directory) on each machine's first process only."""
    if world_size() == 1:
        fn()
        return
    _run_shared(fn, process_state().is_local_main_process, "the first process on this machine")


def once(fn: Callable[[], object]) -> None:
    """Run ``fn`` (e.g. an upload) on global rank 0 only; the others wait for its outcome."""
    if world_size() == 1:
        fn()
        return
    _run_shared(fn, process_state().is_main_process, "rank 0")


def _run_shared(fn: Callable[[], T], selected: bool, who: str) -> T | None:
    """``fn`` where ``selected``; then every rank learns whether any of them failed, and fails alike."""
    import torch.distributed as dist

    result: T | None = None
    error: BaseException | None = None
    outcome = (0, "")
    if selected:
        try:
            result = fn()
        except JobError as exc:
            error, outcome = exc, (int(exc.exit_code), exc.message)
        except Exception as exc:
            error, outcome = exc, (int(ExitCode.BUG), f"{type(exc).__name__}: {exc}")
    outcomes: list[tuple[int, str]] = [outcome] * dist.get_world_size()
    dist.all_gather_object(outcomes, outcome)
    if error is not None:
        raise error
    failed = [(rank, code, text) for rank, (code, text) in enumerate(outcomes) if code]
    if failed:
        rank, code, text = failed[0]
        raise PeerFailedError(f"rank {rank} ({who}) failed, so this rank stops too: {text}", code)
    return result


# Long enough for rank 0's final validation and upload; a peer that died is noticed at once anyway.
_SHUTDOWN_WAIT_SECONDS = 1800


def shutdown() -> None:
    """Tear the process group down before exiting: left to the interpreter's exit, gloo's threads abort
    the process (SIGABRT), and the job's exit code (2, 75, ...) would be lost."""
    dist = sys.modules.get("torch.distributed")  # not imported: no group to tear down
    if dist is not None and dist.is_available() and dist.is_initialized():
        from datetime import timedelta

        # Rank 0 may still be validating or publishing: a peer that tears its side down first makes
        # gloo abort the process. Wait for everyone (bounded, so a dead peer cannot hang the exit).
        with contextlib.suppress(RuntimeError):
            dist.monitored_barrier(timeout=timedelta(seconds=_SHUTDOWN_WAIT_SECONDS))
        dist.destroy_process_group()
