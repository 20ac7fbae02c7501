"""Nothing read back from a checkpoint may run code.

A run URI is shared storage: whoever can write to it can replace a checkpoint file. lokr-job reads its own
files as safetensors, JSON or ``torch.load(weights_only=True)``, which constructs nothing but tensors and
plain containers. DeepSpeed is the exception: it unpickles its ZeRO files with ``weights_only=False``, so a
pickle there naming ``os.system`` would run when a resume loads it.

So before any checkpoint is loaded, every pickle in it is disassembled (not run) and the globals it names
are checked against torch's ``weights_only`` allowlist plus the few plain-data classes DeepSpeed and
accelerate write. A checkpoint naming anything else, or holding a pickle that cannot be disassembled that
way, is refused whole (``DataError``, exit 3), before any of its files is unpickled: the user inspects it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from job.errors import DataError

_ZIP_MAGIC = b"PK\x03\x04"
# Read by safetensors and json, which construct nothing (a safetensors header's length may begin 0x80).
_NEVER_UNPICKLED = (".safetensors", ".json")
_PICKLE_PROTO = 0x80

# Plain-data classes in the files DeepSpeed and accelerate write (ZeRO optimizer states; the random states'
# numpy arrays): constructing them runs no code of the file's choosing.
_TRUSTED_GLOBALS = frozenset(
    {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
        "numpy.dtype",
        "numpy.ndarray",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
    }
)


def refuse_pickled_code(folder: Path) -> None:
    """``DataError`` naming every file under ``folder`` whose pickle could run code when loaded."""
    problems = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(_NEVER_UNPICKLED)):
        problem = _pickle_problem(path)
        if problem is not None:
            problems.append(f"{path.relative_to(folder).as_posix()} {problem}")
    if problems:
        raise DataError(
            f"checkpoint {folder} was not loaded: {'; '.join(problems)}. lokr-job and DeepSpeed never write "
            "these, so the files were changed after they were written (anyone who can write to the run URI "
            "can change them). Nothing in the checkpoint was unpickled; inspect it, then delete it (training "
            "then resumes from the one before) or set resume_from_checkpoint to another checkpoint"
        )


def _pickle_problem(path: Path) -> str | None:
    with path.open("rb") as handle:
        head = handle.read(4)
    if head == _ZIP_MAGIC:
        try:
            named = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as exc:  # any opcode it cannot follow statically: it may build code dynamically
            return f"holds a pickle that cannot be checked without running it ({type(exc).__name__}: {exc})"
        unsafe = sorted(set(named) - _TRUSTED_GLOBALS)
        return f"names {', '.join(unsafe)} (code a pickle can call)" if unsafe else None
    if head[:1] == bytes([_PICKLE_PROTO]):
        return "is a bare pickle (not a torch.save archive), which can run anything when loaded"
    return None
