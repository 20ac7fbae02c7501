"""A Hub dataset repo (SimpleTuner's ``type: huggingface``) as a folder of images with caption files.

Supported: the image-folder layout, images with ``.txt`` captions beside them, or a ``metadata.jsonl`` /
``metadata.csv`` whose ``file_name`` column names each image and whose ``caption_column`` holds its caption
(written out as ``.txt`` files beside the images, so ``caption_strategy`` ``textfile`` reads them). A split
folder (``<split>/`` or ``data/<split>/``) is fetched alone when the repo has one. Datasets stored as
parquet or arrow tables are refused with what to do instead.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from job.config.backends import DatasetConfig
from job.data.discovery import IMAGE_EXTENSIONS
from job.errors import ConfigError
from job.files import write_bytes_atomic
from job.storage import TransferReport, parse_uri, storage_for

log = logging.getLogger("lokr")

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_TABLE_SUFFIXES = (".parquet", ".arrow")
# download_prefix matches case-sensitively: both spellings of every extension.
_PATTERNS = sorted(
    {f"*{e}" for e in IMAGE_EXTENSIONS}
    | {f"*{e.upper()}" for e in IMAGE_EXTENSIONS}
    | {"*.txt", *(f"*{m}" for m in METADATA_FILES)}
)


def fetch_hub_dataset(dataset: DatasetConfig, dest: Path, *, progress: bool = True) -> TransferReport:
    """Mirror the dataset's images and captions into ``dest``; write captions from metadata files."""
    repo = replace(parse_uri(f"hf://datasets/{dataset.dataset_name}"), revision=dataset.revision)
    storage = storage_for(repo)
    keys = [o.key for o in storage.list(repo)]
    if not keys:
        raise ConfigError(f"dataset {dataset.id!r}: the Hub dataset {repo} is empty")
    split = _split_folder(keys, dataset.split)
    inside = [k.removeprefix(f"{split}/") for k in keys if not split or k.startswith(f"{split}/")]
    if not any(_is_image(k) for k in inside):
        tables = [k for k in inside if k.endswith(_TABLE_SUFFIXES)]
        found = f"it stores its data as tables ({tables[0]}…)" if tables else "it holds no image files"
        raise ConfigError(
            f"dataset {dataset.id!r}: cannot use the Hub dataset {repo}: {found}. lokr-job reads image-folder "
            "datasets: image files with .txt captions beside them, or with a metadata.jsonl/metadata.csv "
            f"whose file_name column names each image and whose {dataset.caption_column!r} column holds its "
            "caption. Convert it (e.g. save each row's image and caption as files) and push that layout"
        )
    report = storage.download_prefix(repo.join(split), dest, progress=progress, allow_patterns=_PATTERNS)
    own_captions = {k for k in inside if k.endswith(".txt")}
    written = write_metadata_captions(dest, dataset.caption_column, keep=own_captions)
    if written:
        log.info("fetch: dataset %s: %d captions written from metadata", dataset.id, written)
    return report


def _split_folder(keys: list[str], split: str) -> str:
    for folder in (split, f"data/{split}"):
        if any(k.startswith(f"{folder}/") for k in keys):
            return folder
    return ""


def _is_image(key: str) -> bool:
    return Path(key).suffix.lower() in IMAGE_EXTENSIONS


def write_metadata_captions(root: Path, column: str, *, keep: set[str]) -> int:
    """Write ``<image>.txt`` for each image a metadata file under ``root`` captions; caption files the
    repo itself holds (``keep``, relative to ``root``) are left alone. Returns how many were (re)written."""
    written = 0
    for metadata in sorted(p for name in METADATA_FILES for p in root.rglob(name)):
        if any(part.startswith(".") for part in metadata.relative_to(root).parts):
            continue  # a download's staging area
        for line, row in _rows(metadata):
            name, caption = row.get("file_name"), row.get(column)
            where = f"{metadata}:{line}"
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{where}: no file_name (the image-folder metadata names each image in it)")
            if caption is None:
                raise ConfigError(
                    f"{where}: no {column!r} column (caption_column); it has {', '.join(sorted(row))}"
                )
            captions = caption if isinstance(caption, list) else [caption]
            image = metadata.parent / name
            if not image.resolve().is_relative_to(root.resolve()):
                raise ConfigError(f"{where}: file_name {name!r} points outside the dataset")
            target = image.with_suffix(".txt")
            if not image.is_file() or target.relative_to(root).as_posix() in keep:
                continue
            text = "\n".join(str(c).strip() for c in captions) + "\n"
            # Unchanged captions are not rewritten: their mtimes stay, so the data scan reuses what it knows.
            if not target.is_file() or target.read_text(encoding="utf-8") != text:
                write_bytes_atomic(target, text.encode("utf-8"))
                written += 1
    return written


def _rows(metadata: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    text = metadata.read_text(encoding="utf-8-sig")
    if metadata.suffix == ".csv":
        for index, row in enumerate(csv.DictReader(text.splitlines()), start=2):
            yield index, row
        return
    for index, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{metadata}:{index}: not a JSON object per line: {exc.msg}") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{metadata}:{index}: each line must be a JSON object")
        yield index, row
