"""Where a relative path written inside a config file points.

Two conventions meet here: DESIGN.md's (relative to the file that mentions the path) and SimpleTuner's
(relative to the folder that holds ``config/``, the directory SimpleTuner is started from). Both work.
"""

import difflib
import os
from pathlib import Path

# Enough to find config/x.json next to config/auraflow/x.json without walking a 10k-image dataset.
_SEARCH_DEPTH = 3
_SEARCH_LIMIT = 5000
REMOTE_SCHEMES = ("s3://", "hf://")


def is_remote(value: str) -> bool:
    return value.startswith(REMOTE_SCHEMES)


def candidates(value: str, referring_file: Path) -> list[Path]:
    """The places ``value`` may mean, most specific first (duplicates removed)."""
    raw = Path(os.path.expanduser(value))
    if raw.is_absolute():
        return [raw]
    here = referring_file.resolve().parent
    places = [here / raw]
    places += [folder.parent / raw for folder in (here, *here.parents) if folder.name == "config"]
    if raw.parts and raw.parts[0] == "config" and len(raw.parts) > 1:
        places.append(here / Path(*raw.parts[1:]))
    unique: list[Path] = []
    for place in places:
        if place not in unique:
            unique.append(place)
    return unique


def resolve_local(value: str, referring_file: Path) -> Path | None:
    """The first candidate that exists, or None."""
    return next((p for p in candidates(value, referring_file) if p.exists()), None)


def resolve(value: str, referring_file: Path) -> str:
    """A URI stays a URI; a path becomes absolute (the existing candidate, else the first)."""
    if is_remote(value):
        return value
    value = value.removeprefix("file://")
    found = resolve_local(value, referring_file)
    return str(found or candidates(value, referring_file)[0])


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
    return sorted(
        {p for name in names for p in by_name[name]}, key=lambda p: (p.name != wanted, len(p.parts))
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
