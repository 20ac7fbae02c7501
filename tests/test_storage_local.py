"""The local backend: the same contract as S3 and the Hub, on the filesystem."""

import os
from pathlib import Path

import pytest

from job.errors import ConfigError, ExitCode
from job.storage import Storage, storage_for
from job.storage.local import LocalStorage
from job.storage.sync import MANIFEST_NAME


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    files = {"a.png": b"A" * 10, "sub/b.png": b"B" * 20, "sub/deep/c.txt": b"caption"}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_storage_for_local(tmp_path: Path) -> None:
    assert isinstance(storage_for(str(tmp_path)), LocalStorage)
    assert isinstance(storage_for(f"file://{tmp_path}"), LocalStorage)
    assert isinstance(storage_for(str(tmp_path)), Storage)


def test_read_write_stat_list_delete(tmp_path: Path, source: Path) -> None:
    st = LocalStorage()
    st.write_bytes(tmp_path / "out" / "x.json", b"{}")
    assert st.read_bytes(f"file://{tmp_path}/out/x.json") == b"{}"
    info = st.stat(tmp_path / "out" / "x.json")
    assert info is not None and info.size == 2 and info.etag
    assert st.stat(tmp_path / "out") is None  # a folder is not an object
    assert st.stat(tmp_path / "nope") is None
    assert [o.key for o in st.list(source)] == ["a.png", "sub/b.png", "sub/deep/c.txt"]
    assert [o.key for o in st.list(source / "sub")] == ["b.png", "deep/c.txt"]
    assert st.list(tmp_path / "missing") == []
    st.delete(source / "sub")
    st.delete(source / "a.png")
    st.delete(source / "never-existed")
    assert _tree(source) == {}
    with pytest.raises(ConfigError):
        st.delete("/")


def test_missing_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        LocalStorage().read_bytes(tmp_path / "absent.json")
    assert caught.value.exit_code == ExitCode.BAD_CONFIG
    assert "absent.json" in str(caught.value)


def test_download_prefix_is_incremental(tmp_path: Path, source: Path) -> None:
    st, dest = LocalStorage(), tmp_path / "dest"
    first = st.download_prefix(source, dest, progress=False)
    assert (first.transferred, first.skipped, first.bytes) == (3, 0, 37)
    assert _tree(dest) == {**_tree(source), MANIFEST_NAME: (dest / MANIFEST_NAME).read_bytes()}
    again = st.download_prefix(source, dest, progress=False)
    assert (again.transferred, again.skipped, again.bytes) == (0, 3, 0)
    (source / "sub" / "b.png").write_bytes(b"changed")
    os.utime(source / "sub" / "b.png", ns=(1, 1))  # a different mtime whatever the clock's resolution
    changed = st.download_prefix(source, dest, progress=False)
    assert (changed.transferred, changed.skipped) == (1, 2)
    assert (dest / "sub" / "b.png").read_bytes() == b"changed"
    (dest / "a.png").unlink()  # deleted locally: fetched again even though the manifest lists it
    assert st.download_prefix(source, dest, progress=False).transferred == 1
    assert not [p for p in dest.rglob("*") if ".lokr-part" in p.name]


def test_download_prefix_allow_patterns(tmp_path: Path, source: Path) -> None:
    report = LocalStorage().download_prefix(source, tmp_path / "d", progress=False, allow_patterns=["*.png"])
    assert report.transferred == 2
    assert not (tmp_path / "d" / "sub" / "deep" / "c.txt").exists()


def test_upload_folder_skips_bookkeeping(tmp_path: Path, source: Path) -> None:
    st = LocalStorage()
    st.download_prefix(source, tmp_path / "work", progress=False)
    report = st.upload_folder(tmp_path / "work", tmp_path / "copy")
    assert report.transferred == 3
    assert _tree(tmp_path / "copy") == _tree(source)
