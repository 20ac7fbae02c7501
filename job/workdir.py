"""The local work directory (NVMe scratch on a cloud box): one place that names its layout.

Stages meet here and at the run URI, never in each other's internals. Everything in it can be
rebuilt from the config, the data and the run URI, so losing it costs time, not work.
"""

import errno
import fcntl
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from job.errors import PermissionDeniedError, TransientError

# ``fcntl.flock`` on this file (holding the holder's pid and host) keeps one process per work directory,
# taken by the first process on each machine; the kernel drops it when that process dies, however it dies.
LOCK_FILE = ".lock"


@dataclass(frozen=True)
class WorkDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    @property
    def config(self) -> Path:
        return self.root / "config"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def dataset(self, dataset_id: str) -> Path:
        return self.data / dataset_id

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def latents(self, dataset_id: str) -> Path:
        return self.cache / "latents" / dataset_id

    @property
    def text_cache(self) -> Path:
        return self.cache / "text"

    @property
    def buckets(self) -> Path:
        return self.cache / "buckets"

    @property
    def offload(self) -> Path:
        return self.root / "offload"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    def resolve(self, path: str | None, default: Path) -> Path:
        """A path from the config (e.g. ``cache_dir_vae``): relative ones live inside the work dir."""
        if not path:
            return default
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() else self.root / candidate


class WorkdirLock:
    """``fcntl.flock`` on ``<workdir>/.lock``, held for the life of the process (or until ``release``)."""

    def __init__(self, root: Path):
        self.path = Path(root) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise PermissionDeniedError(
                    f"work directory {self.path.parent} is not writable ({exc.strerror}); point --workdir "
                    "(LOKR_WORKDIR) at a writable volume"
                ) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "pid unknown"
            os.close(fd)
            raise TransientError(
                f"work directory {self.path.parent} is in use by another lokr-job process ({holder}); two "
                "processes on one work directory would overwrite each other's files. Exiting 75: run again "
                "when it is done, or give this one a --workdir of its own"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None
