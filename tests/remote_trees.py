"""Helpers for the remote-storage tests: folders as {relative path: bytes}, seeded onto the test servers."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tree_files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative POSIX path; hidden bookkeeping (``.lokr-…``, ``.cache``) left out."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


def put_tree_s3(s3: Any, root: Path, prefix: str) -> None:
    for rel, data in tree_files(root).items():
        s3.put(f"{prefix}/{rel}", data)


def put_tree_hub(hub: Any, repo_id: str, root: Path, prefix: str, repo_type: str = "model") -> str:
    files = {f"{prefix}/{rel}" if prefix else rel: data for rel, data in tree_files(root).items()}
    return hub.seed(repo_id, files, repo_type=repo_type)
