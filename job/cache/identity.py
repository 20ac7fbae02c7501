"""What identifies a model component (the VAE, the text encoder, the tokenizer): a hash of its files.

Hashing a text encoder's weights reads gigabytes, so each file's sha256 is remembered by path, size and
mtime in the work directory; an unchanged file is hashed once per work directory, not once per warm.
"""

import hashlib
from pathlib import Path

from job.files import read_json, write_json_atomic

_CHUNK = 8 * 1024 * 1024


class FileHashes:
    """sha256 of files, remembered in ``memo_path`` while their size and mtime stay the same."""

    def __init__(self, memo_path: Path) -> None:
        self._memo_path = memo_path
        stored = read_json(memo_path)
        self._memo: dict[str, list] = stored if isinstance(stored, dict) else {}
        self._dirty = False

    def sha256(self, path: Path) -> str:
        resolved = path.resolve()
        stat = resolved.stat()
        remembered = self._memo.get(str(resolved))
        if remembered and remembered[:2] == [stat.st_size, stat.st_mtime_ns]:
            return remembered[2]
        digest = hashlib.sha256()
        with resolved.open("rb") as file:
            while chunk := file.read(_CHUNK):
                digest.update(chunk)
        self._memo[str(resolved)] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
        self._dirty = True
        return digest.hexdigest()

    def save(self) -> None:
        if self._dirty:
            write_json_atomic(self._memo_path, self._memo)
            self._dirty = False


def folder_identity(folder: Path, hashes: FileHashes) -> str:
    """A hash of every file in ``folder`` (names and contents): config, weights, vocabulary."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{hashes.sha256(path)}\0".encode())
    return digest.hexdigest()
