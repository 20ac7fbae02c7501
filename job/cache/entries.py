"""Reading and writing cache entries: one safetensors file each, at ``store.entry_path``.

Apart from ``job.cache.store`` (the index) because this side needs torch: "is everything cached?" reads
only the index and never imports it.
"""

from pathlib import Path

# safetensors' save_file reaches numpy.ctypeslib through numpy's lazy module __getattr__. When writer
# threads do that first at the same time, one can see the submodule in sys.modules before numpy has it as
# an attribute and re-enter __getattr__ until RecursionError. Importing it here, on the main thread before
# any writer pool starts, resolves the attribute once for every thread.
import numpy.ctypeslib  # noqa: F401
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from job.cache.store import entry_path
from job.errors import DataError
from job.files import write_atomic


def save_entry(cache_dir: Path, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    write_atomic(entry_path(cache_dir, key), lambda temporary: save_file(contiguous, temporary, metadata))


def load_entry(cache_dir: Path, key: str) -> dict[str, torch.Tensor]:
    """The entry's tensors; ``DataError`` (run lokr-job warm) when its file is missing or unreadable."""
    try:
        return load_file(entry_path(cache_dir, key))
    except (OSError, SafetensorError) as exc:
        raise DataError(
            f"cache entry {entry_path(cache_dir, key)} is missing or unreadable ({exc}); run lokr-job warm"
        ) from None
