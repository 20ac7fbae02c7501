"""The local work directory (NVMe scratch on a cloud box): one place that names its layout.

Stages meet here and at the run URI, never in each other's internals. Everything in it can be
rebuilt from the config, the data and the run URI, so losing it costs time, not work.
"""

from dataclasses import dataclass
from pathlib import Path


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
