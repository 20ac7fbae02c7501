"""Where a relative path written inside a config file points.

Two conventions meet here: DESIGN.md's (relative to the file that mentions the path) and SimpleTuner's
(relative to the folder that holds ``config/``, the directory SimpleTuner is started from). Both work,
for a config set on this disk and for one fetched from S3 or the Hub (``RemoteOrigin``).
"""

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from job.storage import join, storage_for

# Enough to find config/x.json next to config/auraflow/x.json without walking a 10k-image dataset.
_SEARCH_DEPTH = 3
_SEARCH_LIMIT = 5000
REMOTE_SCHEMES = ("s3://", "hf://")


def is_remote(value: str) -> bool:
    return value.startswith(REMOTE_SCHEMES)


def candidates(value: str, referring_file: Path, root: Path | None = None) -> list[Path]:
    """The places ``value`` may mean, most specific first (duplicates removed).

    ``root`` bounds the search for a ``config/`` folder upwards: a config set mirrored from a bucket or
    repo stops at the mirror's root, as the bucket or repo root is where its own search stops.
    """
    raw = Path(os.path.expanduser(value))
    if raw.is_absolute():
        return [raw]
    here = referring_file.resolve().parent
    top = root.resolve() if root is not None else None
    places = [here / raw]
    places += [
        folder.parent / raw
        for folder in (here, *here.parents)
        if folder.name == "config" and (top is None or (folder != top and folder.is_relative_to(top)))
    ]
    if raw.parts and raw.parts[0] == "config" and len(raw.parts) > 1:
        places.append(here / Path(*raw.parts[1:]))
    unique: list[Path] = []
    for place in places:
        if place not in unique:
            unique.append(place)
    return unique


def resolve_local(value: str, referring_file: Path, root: Path | None = None) -> Path | None:
    """The first candidate that exists, or None."""
    return next((p for p in candidates(value, referring_file, root) if p.exists()), None)


def resolve(value: str, referring_file: Path, root: Path | None = None) -> str:
    """A URI stays a URI; a path becomes absolute (the existing candidate, else the first)."""
    if is_remote(value):
        return value
    value = value.removeprefix("file://")
    found = resolve_local(value, referring_file, root)
    return str(found or candidates(value, referring_file, root)[0])


@dataclass(frozen=True)
class RemoteOrigin:
    """Where a config set fetched from S3 or the Hub came from.

    ``mirror`` holds the fetched files at their paths under ``root_uri`` (the bucket or repo root), so the
    local rules above find them; a relative path they name that is not in the mirror (a dataset, the model)
    means the same place under ``root_uri``.
    """

    root_uri: str
    mirror: Path

    def uri_of(self, local: Path) -> str | None:
        """The remote location a path inside the mirror stands for; None outside it."""
        relative = Path(os.path.relpath(os.path.normpath(local), self.mirror.resolve()))
        if relative.parts[:1] == ("..",):
            return None
        return join(self.root_uri, relative.as_posix())

    def remote_candidates(self, value: str, referring_file: Path) -> list[str]:
        """The remote places a relative ``value`` may mean, in the same order as the local rules; none for
        a URI or an absolute path, which mean what they say."""
        if is_remote(value) or value.startswith("file://"):
            return []
        found = (self.uri_of(place) for place in candidates(value, referring_file, self.mirror))
        return list(dict.fromkeys(uri for uri in found if uri))

    def find_folder(self, value: str, referring_file: Path) -> tuple[str | None, list[str]]:
        """The first remote candidate with objects under it (checked by listing), and every place looked."""
        looked = self.remote_candidates(value, referring_file)
        found = next((uri for uri in looked if storage_for(uri).list(uri)), None)
        return found, looked


def similar_files(value: str, referring_file: Path) -> list[Path]:
    """Files near the config whose names resemble ``value``'s, best first."""
    wanted = Path(value).name
    roots = {referring_file.resolve().parent}
    roots |= {c.parent for c in candidates(value, referring_file)[1:2]}
    roots |= {folder.parent for folder in referring_file.resolve().parents if folder.name == "config"}
    found: list[Path] = []
    for root in roots:
        found += _walk(root)
    by_name: dict[str, list[Path]] = {}
    for path in found:
        by_name.setdefault(path.name, []).append(path)
    names = difflib.get_close_matches(wanted, list(by_name), n=3, cutoff=0.6)
    # difflib ranks the names best first; ties fall to the shallower path, then the path itself, so the
    # hint never depends on set order (string hashing differs between processes).
    return sorted(
        {p for name in names for p in by_name[name]},
        key=lambda p: (p.name != wanted, names.index(p.name), len(p.parts), str(p)),
    )


def _walk(root: Path) -> list[Path]:
    files: list[Path] = []
    if not root.is_dir():
        return files
    base_depth = len(root.parts)
    for folder, dirs, names in os.walk(root):
        if len(Path(folder).parts) - base_depth >= _SEARCH_DEPTH:
            dirs.clear()
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [Path(folder) / n for n in names]
        if len(files) > _SEARCH_LIMIT:
            break
    return files
