"""A private Docker engine that builds and runs lokr-job's real Dockerfile on a machine without one (CI):
Debian's docker.io (dockerd, and a client whose `docker build` is BuildKit) on a socket and data root of
its own, a base image made with debootstrap in place of the CUDA one, and the CPU torch wheel served from
a local index in place of PyTorch's cu128 one. Only build-args swap them: the Dockerfile is the users'.

    python scripts/docker_sandbox.py build --tag lokr-job:test   # start, build, report, stop

tests/test_image.py and scripts/bench_image.py use the classes below. Everything is torn down by
`Engine.stop()`: dockerd is stopped by its PID and its folder removed.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "docker" / "constraints.txt"
# Debian's docker.io puts its BuildKit-capable client here; a `docker` earlier on PATH may lack buildx.
CLIENT = "/usr/bin/docker"
PACKAGES = ("docker.io", "debootstrap")
# The base stands in for nvidia/cuda:*-base-ubuntu24.04: a plain Debian with the same Python the CI venv
# (and the local CPU torch wheel) was made for.
BASE_SUITE = "bookworm"
BASE_MIRROR = "http://deb.debian.org/debian"
BASE_TAG = f"lokr-sandbox-base:{BASE_SUITE}"
# The machine's CA bundle, which a network that re-signs TLS needs: given to pip as a build secret.
CA_BUNDLE = Path(os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"))


class SandboxError(RuntimeError):
    """The sandbox could not be made: the message says which step and shows its output."""


def log(message: str) -> None:
    print(f"docker_sandbox: {message}", file=sys.stderr, flush=True)


def run(command: list[str], *, what: str, **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise SandboxError(
            f"{what} failed (exit {result.returncode}): {' '.join(command)}\n{result.stderr[-3000:]}"
        )
    return result


def ensure_packages() -> None:
    """dockerd, its client and debootstrap, from Debian's packages when missing (needs root and apt)."""
    if shutil.which("dockerd") and Path(CLIENT).exists() and shutil.which("debootstrap"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SandboxError(
            f"dockerd, {CLIENT} and debootstrap are needed: install Debian's {' '.join(PACKAGES)} (as root)"
        )
    log(f"installing {' '.join(PACKAGES)} from Debian's packages")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], what="apt-get update", env=env)
    run(["apt-get", "install", "-y", "-qq", *PACKAGES], what="apt-get install", env=env)


class Engine:
    """dockerd on a private socket, data root and exec root, all under one temporary folder."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="lokr-dockerd-"))
        self.socket = self.root / "docker.sock"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "dockerd.log"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_BUILDKIT": "1"}

    def start(self, timeout: float = 60) -> Engine:
        # No bridge and no iptables: every container here uses the host's network, so the moto server and
        # the wheel index on 127.0.0.1 are reachable, and the host's firewall is left alone.
        command = [
            "dockerd",
            f"--host=unix://{self.socket}",
            f"--data-root={self.root / 'data'}",
            f"--exec-root={self.root / 'exec'}",
            f"--pidfile={self.root / 'dockerd.pid'}",
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
        ]
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SandboxError(f"dockerd exited {self.process.returncode}:\n{self.log_tail()}")
            if subprocess.run([CLIENT, "info"], env=self.env, capture_output=True).returncode == 0:
                log(f"dockerd {self.process.pid} ready on {self.socket}")
                return self
            time.sleep(0.5)
        raise SandboxError(f"dockerd did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def docker(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess[str]:
        if check:
            return run([CLIENT, *args], what=f"docker {args[0]}", env=self.env, **kwargs)
        return subprocess.run([CLIENT, *args], env=self.env, capture_output=True, text=True, **kwargs)

    def stop(self) -> None:
        """Removes every container, stops dockerd by its PID and deletes its folder."""
        if self.process is not None and self.process.poll() is None:
            ids = self.docker("ps", "-aq", check=False).stdout.split()
            if ids:
                self.docker("rm", "-f", *ids, check=False)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            log(f"dockerd {self.process.pid} stopped")
        # Whatever dockerd left mounted (it unmounts on a clean stop) must go before the folder can.
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(str(self.root))), reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def engine() -> Iterator[Engine]:
    ensure_packages()
    started = Engine()
    try:
        yield started.start()
    finally:
        started.stop()


def make_base(dockerd: Engine, tag: str = BASE_TAG) -> str:
    """A minimal Debian made by debootstrap and imported into the engine as `tag`."""
    rootfs = Path(tempfile.mkdtemp(prefix="lokr-rootfs-"))
    try:
        started = time.monotonic()
        run(["debootstrap", "--variant=minbase", BASE_SUITE, str(rootfs), BASE_MIRROR], what="debootstrap")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        dockerd.docker("import", "-", tag, stdin=tar.stdout)
        if tar.wait() != 0:
            raise SandboxError(f"tar of {rootfs} failed")
        log(f"base image {tag} made by debootstrap in {time.monotonic() - started:.0f} s")
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    return tag


class TorchIndex:
    """A package index on 127.0.0.1 with the CPU torch wheel of the pin and its dependencies: the image's
    TORCH_INDEX_URL, so the build installs a CPU torch instead of gigabytes of CUDA."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="lokr-torch-index-"))
        self.server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> TorchIndex:
        pin = next(line for line in CONSTRAINTS.read_text().splitlines() if line.startswith("torch=="))
        wheels = self.root / "wheels"
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--only-binary",
                ":all:",
                "--dest",
                str(wheels),
                "--constraint",
                str(CONSTRAINTS),
                pin,
            ],
            what=f"pip download {pin}",
        )
        torch = [w.name for w in wheels.glob("torch-*.whl")]
        if not any("+cpu" in name for name in torch):
            raise SandboxError(
                f"pip found {torch} for {pin}, not a CPU build: give pip a find-links with one"
            )
        # PEP 503's layout: one folder per normalised project name, whose listing links the files.
        for wheel in wheels.glob("*.whl"):
            project = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
            (self.root / "simple" / project).mkdir(parents=True, exist_ok=True)
            wheel.rename(self.root / "simple" / project / wheel.name)
        handler = functools.partial(_QuietHandler, directory=str(self.root / "simple"))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        shutil.rmtree(self.root, ignore_errors=True)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def torch_index() -> Iterator[TorchIndex]:
    index = TorchIndex()
    try:
        yield index.start()
    finally:
        index.stop()


def build(
    dockerd: Engine,
    tag: str,
    *,
    base: str,
    index_url: str,
    context: Path = ROOT,
    log_path: Path | None = None,
) -> float:
    """`docker build` of the Dockerfile in `context`; returns its wall seconds. The log goes to `log_path`."""
    command = [CLIENT, "build", "--network", "host", "--progress", "plain", "--tag", tag]
    command += ["--build-arg", f"CUDA_IMAGE={base}", "--build-arg", f"TORCH_INDEX_URL={index_url}"]
    if CA_BUNDLE.is_file():
        command += ["--secret", f"id=ca-bundle,src={CA_BUNDLE}"]
    started = time.monotonic()
    result = subprocess.run([*command, str(context)], env=dockerd.env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if log_path is not None:
        log_path.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SandboxError(
            f"docker build of {context} failed (exit {result.returncode}):\n{result.stderr[-4000:]}"
        )
    log(f"built {tag} in {seconds:.1f} s")
    return seconds


def layers(dockerd: Engine, tag: str) -> list[tuple[str, int]]:
    """The image's layers, bottom first: (diff id, bytes of its uncompressed tar), read from `docker save`."""
    diff_ids = json.loads(
        dockerd.docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", tag).stdout
    )
    sizes: dict[str, int] = {}
    manifest: list[dict] = []
    save = subprocess.Popen([CLIENT, "save", tag], env=dockerd.env, stdout=subprocess.PIPE)
    with tarfile.open(fileobj=save.stdout, mode="r|") as archive:
        for member in archive:
            if member.name.endswith("layer.tar"):
                sizes[member.name] = member.size
            elif member.name == "manifest.json":
                extracted = archive.extractfile(member)
                assert extracted is not None
                manifest = json.load(extracted)
    if save.wait() != 0 or not manifest:
        raise SandboxError(f"docker save {tag} failed")
    return list(zip(diff_ids, (sizes[name] for name in manifest[0]["Layers"]), strict=True))


def copy_context(destination: Path) -> Path:
    """The build context (what .dockerignore lets through) copied, for builds of a changed checkout."""
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, destination / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in ("job", "docker"):
        shutil.copytree(ROOT / folder, destination / folder, ignore=ignore)
    return destination


def image_bytes(dockerd: Engine, tag: str) -> int:
    return int(dockerd.docker("image", "inspect", "--format", "{{.Size}}", tag).stdout)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build_parser = sub.add_parser("build", help="start an engine, build the image, print its layers, stop")
    build_parser.add_argument("--tag", default="lokr-job:sandbox")
    args = parser.parse_args()
    try:
        with engine() as dockerd, torch_index() as index:
            build(dockerd, args.tag, base=make_base(dockerd), index_url=index.url)
            for diff_id, size in layers(dockerd, args.tag):
                print(f"{size / 1e6:10.2f} MB  {diff_id}")
            print(f"{image_bytes(dockerd, args.tag) / 1e9:.2f} GB  {args.tag}")
    except SandboxError as error:
        log(str(error))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
