"""`sky jobs launch ARGS...` up to where it would call the API server; writes what SkyPilot made of it.

    python skypilot_launch.py OUT.json [sky jobs launch arguments ...]

Runs under the SkyPilot venv (the Makefile's $(VENV)/sky), not the project's: tests/test_skypilot.py calls it.
SkyPilot's own CLI parses the task file and the flags (`--env`, `--secret NAME` read from this environment,
`--image-id`, `--num-nodes`, `--gpus`); its own recovery executor says which exit codes relaunch the job; its
own code generators write the script each node runs. Nothing reaches a cloud or the network. OUT.json gets
{"error": message} when the CLI refuses, else the task as parsed.
"""

from __future__ import annotations

import asyncio
import copy
import json
import sys
from pathlib import Path
from typing import Any
from unittest import mock

from click.testing import CliRunner
from sky import backends, dag, task
from sky.backends import task_codegen
from sky.client.cli import command
from sky.jobs import recovery_strategy
from sky.skylet import constants, log_lib

# Exit codes of the job (job/errors.py), and 137: SkyPilot's code for the nodes it kills when another fails.
EXIT_CODE_LISTS = [[75], [2], [3], [4], [1], [137], [2, 137], [75, 137]]
NODE_IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]


class Submitted(Exception):
    """Raised where `sky jobs launch` would submit the job to the API server."""


def launched_task(args: list[str]) -> tuple[task.Task | None, str]:
    """The task `sky jobs launch ARGS` would submit, or None and the CLI's refusal."""
    submitted: list[dag.Dag] = []

    def submit(job_dag: dag.Dag, *_: Any, **__: Any) -> None:
        submitted.append(job_dag)
        raise Submitted

    with mock.patch.object(command.managed_jobs, "launch", submit):
        result = CliRunner().invoke(command.cli, ["jobs", "launch", *args, "--yes"])
    if not submitted:
        return None, f"{result.output}\n{result.exception!r}"
    return submitted[0].tasks[0], ""


def executor(job: task.Task) -> recovery_strategy.StrategyExecutor:
    """The managed-job controller's recovery executor for the job (a fresh one: it counts restarts)."""

    async def make() -> recovery_strategy.StrategyExecutor:
        # make() takes job_recovery out of the task's resources, hence the copy.
        return recovery_strategy.StrategyExecutor.make(
            "lokr", backends.CloudVmRayBackend(), copy.deepcopy(job), 1, 0, None, set(), asyncio.Lock(),
            asyncio.Condition(),
        )  # fmt: skip

    return asyncio.run(make())


def node_scripts(job: task.Task) -> list[str]:
    """The script each node runs, with the variables SkyPilot sets there (cloud_vm_ray_backend, task_codegen)."""
    gpus = next(iter(job.resources)).accelerators or {}
    envs = task.get_plaintext_envs_and_secrets(job.envs_and_secrets)
    ips = NODE_IPS[: job.num_nodes]
    run = task_codegen.TaskCodeGen.build_task_bash_script(job.run)
    return [
        log_lib.make_task_bash_script(
            run,
            env_vars=envs
            | {
                constants.SKYPILOT_NODE_IPS: "\n".join(ips),
                constants.SKYPILOT_NUM_NODES: str(len(ips)),
                constants.SKYPILOT_NUM_GPUS_PER_NODE: str(sum(gpus.values())),
                constants.SKYPILOT_NODE_RANK: str(rank),
            },
        )
        for rank in range(len(ips))
    ]


def main(out: Path, args: list[str]) -> None:
    job, error = launched_task(args)
    if job is None:
        out.write_text(json.dumps({"error": error}))
        return
    report = {
        "num_nodes": job.num_nodes,
        "envs": dict(job.envs),
        "secrets": task.get_plaintext_envs_and_secrets(job.secrets),
        "resources": [
            {
                "use_spot": r.use_spot,
                "image_id": r.extract_docker_image(),
                "accelerators": r.accelerators,
                "job_recovery": r.job_recovery,
            }
            for r in job.resources
        ],
        "strategy": type(executor(job)).__name__,
        # What the controller does when the job's nodes exit with these codes while the cluster is up.
        "restarts": {
            json.dumps(codes): executor(job).should_restart_on_failure(exit_codes=codes)
            for codes in EXIT_CODE_LISTS
        },
        "node_scripts": node_scripts(job),
    }
    out.write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
