"""The S3 backend against moto's real S3 API, through a proxy that drops, cuts and refuses requests."""

import os
import time
from pathlib import Path

import pytest

from job.errors import ConfigError, ExitCode, PermissionDeniedError, TransientError
from job.storage import storage_for
from job.storage.s3 import S3Storage
from job.storage.sync import MANIFEST_NAME


def _files(n: int, size: int = 1500) -> dict[str, bytes]:
    return {f"data/img-{i:03d}.bin": os.urandom(size + i) for i in range(n)}


def _local(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _data_files(root: Path) -> dict[str, bytes]:
    return {k: v for k, v in _local(root).items() if not k.startswith(".lokr")}


def test_round_trip_and_prefix_semantics(s3, tmp_path: Path) -> None:
    st = storage_for(s3.uri())
    assert isinstance(st, S3Storage)
    st.write_bytes(s3.uri("run/ckpt/a.json"), b'{"a": 1}')
    st.write_bytes(s3.uri("run/ckpt/sub/b.bin"), b"b" * 100)
    st.write_bytes(s3.uri("run/ckpt-2/c.bin"), b"c")
    assert st.read_bytes(s3.uri("run/ckpt/a.json")) == b'{"a": 1}'
    listed = st.list(s3.uri("run/ckpt"))
    assert [(o.key, o.size) for o in listed] == [("a.json", 8), ("sub/b.bin", 100)]
    assert all(o.etag and o.mtime for o in listed)
    info = st.stat(s3.uri("run/ckpt/sub/b.bin"))
    assert info is not None and info.size == 100 and info.etag == listed[1].etag
    assert st.stat(s3.uri("run/ckpt/missing")) is None
    assert st.list(s3.uri("nothing/here")) == []

    st.download_file(s3.uri("run/ckpt/sub/b.bin"), tmp_path / "one" / "b.bin")
    assert (tmp_path / "one" / "b.bin").read_bytes() == b"b" * 100
    (tmp_path / "file.txt").write_bytes(b"up")
    st.upload_file(tmp_path / "file.txt", s3.uri("run/file.txt"))
    assert s3.get("run/file.txt") == b"up"

    st.delete(s3.uri("run/ckpt"))  # the folder, not its sibling "ckpt-2"
    assert s3.keys() == ["run/ckpt-2/c.bin", "run/file.txt"]
    st.delete(s3.uri("run/file.txt"))
    st.delete(s3.uri("run/never-existed"))
    assert s3.keys() == ["run/ckpt-2/c.bin"]
    with pytest.raises(ConfigError):
        st.delete(s3.uri())  # the whole bucket: refused


def test_download_prefix_is_incremental(s3, tmp_path: Path) -> None:
    files = _files(12)
    for key, data in files.items():
        s3.put(key, data)
    st, dest = storage_for(s3.uri()), tmp_path / "data"

    first = st.download_prefix(s3.uri("data"), dest, progress=False)
    assert (first.transferred, first.skipped) == (12, 0)
    assert first.bytes == sum(map(len, files.values())) == s3.proxy.object_bytes()
    assert _data_files(dest) == {k.removeprefix("data/"): v for k, v in files.items()}
    assert (dest / MANIFEST_NAME).is_file()

    s3.log.clear()
    again = st.download_prefix(s3.uri("data"), dest, progress=False)
    assert (again.transferred, again.skipped, again.bytes) == (0, 12, 0)
    assert s3.proxy.object_bytes() == 0 and s3.proxy.object_requests("HEAD") == []

    s3.put("data/img-003.bin", b"changed remotely")
    s3.log.clear()
    changed = st.download_prefix(s3.uri("data"), dest, progress=False)
    assert (changed.transferred, changed.skipped) == (1, 11)
    assert [e.path for e in s3.proxy.object_requests()] == [f"/{s3.bucket}/data/img-003.bin"]
    assert (dest / "img-003.bin").read_bytes() == b"changed remotely"


def test_download_prefix_allow_patterns_and_folder_markers(s3, tmp_path: Path) -> None:
    s3.put("ds/a.png", b"a")
    s3.put("ds/a.txt", b"caption")
    s3.put("ds/sub/", b"")  # the folder marker the S3 console writes
    s3.put("ds/sub/b.png", b"b")
    report = storage_for(s3.uri()).download_prefix(
        s3.uri("ds"), tmp_path, progress=False, allow_patterns=["*.png"]
    )
    assert report.transferred == 2
    assert _data_files(tmp_path) == {"a.png": b"a", "sub/b.png": b"b"}


def test_many_small_objects_download_concurrently(s3, tmp_path: Path) -> None:
    files = _files(32, size=200)
    for key, data in files.items():
        s3.put(key, data)
    s3.faults.configure(delay=0.15)  # network latency: what makes a sequential loop slow
    s3.log.clear()
    started = time.monotonic()
    report = storage_for(s3.uri()).download_prefix(s3.uri("data"), tmp_path, progress=False)
    elapsed = time.monotonic() - started
    assert report.transferred == 32
    assert s3.log.peak_in_flight >= 8
    assert len(s3.proxy.object_requests("HEAD")) == 0  # sizes come from the listing: one GET per object
    assert elapsed < 32 * 0.15 / 2  # a sequential loop needs at least 4.8 s


def test_keys_escaping_the_folder_are_refused(s3, tmp_path: Path) -> None:
    s3.put("data/ok.bin", b"ok")
    s3.put("data/../../evil.bin", b"evil")
    dest = tmp_path / "inner" / "dest"
    with pytest.raises(ConfigError, match=r"\.\./\.\./evil\.bin") as caught:
        storage_for(s3.uri()).download_prefix(s3.uri("data"), dest, progress=False)
    assert caught.value.exit_code == ExitCode.BAD_CONFIG
    assert _local(tmp_path) == {}  # refused before anything was written


def test_cut_download_leaves_no_partial_file(s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOKR_RETRY_ATTEMPTS", "2")
    s3.put("data/big.bin", os.urandom(200_000))
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "big.bin").write_bytes(b"previous version")
    s3.faults.configure(rate=1.0, kinds=["cut"], methods=["GET"], path=r"/data/big\.bin$")
    with pytest.raises(TransientError) as caught:
        storage_for(s3.uri()).download_prefix(s3.uri("data"), dest, progress=False)
    assert caught.value.exit_code == ExitCode.TRANSIENT
    assert s3.proxy.object_bytes() > 0  # bytes did arrive before each cut...
    assert (dest / "big.bin").read_bytes() == b"previous version"  # ...but never under the final name
    assert [p.name for p in dest.iterdir() if p.name != MANIFEST_NAME] == ["big.bin"]


def test_thirty_percent_faults_still_give_identical_bytes(s3, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LOKR_RETRY_ATTEMPTS", "12")
    source = tmp_path / "up"
    originals = {f"f{i:02d}.bin": os.urandom(3000 + 97 * i) for i in range(16)}
    for name, data in originals.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    st = storage_for(s3.uri())
    s3.faults.configure(rate=0.3, seed=7)
    assert st.upload_folder(source, s3.uri("ckpt"), progress=False).transferred == 16
    report = st.download_prefix(s3.uri("ckpt"), tmp_path / "down", progress=False)
    assert st.read_bytes(s3.uri("ckpt/f05.bin")) == originals["f05.bin"]
    faults = {e.fault for e in s3.log.faults()}
    s3.faults.off()
    assert report.transferred == 16
    assert _data_files(tmp_path / "down") == originals
    assert {k.removeprefix("ckpt/"): s3.get(k) for k in s3.keys("ckpt/")} == originals
    assert len(s3.log.faults()) >= 5 and len(faults) >= 3  # several kinds of failure, not one


def test_retry_after_is_honoured(s3) -> None:
    s3.put("x.bin", b"x")
    s3.faults.configure(rate=1.0, kinds=["429"], limit=1, retry_after="1")
    started = time.monotonic()
    assert storage_for(s3.uri()).read_bytes(s3.uri("x.bin")) == b"x"
    assert time.monotonic() - started >= 1.0


def test_exhausted_retries_are_transient(s3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOKR_RETRY_ATTEMPTS", "3")
    s3.put("x.bin", b"x")
    s3.faults.configure(rate=1.0, kinds=["503"])
    with pytest.raises(TransientError, match=r"after 3 attempts") as caught:
        storage_for(s3.uri()).read_bytes(s3.uri("x.bin"))
    assert caught.value.exit_code == ExitCode.TRANSIENT
    assert len(s3.log.faults()) == 3


def test_wrong_credentials_are_permission_denied(s3) -> None:
    from servers.s3 import iam_auth

    with iam_auth(s3.moto_url), pytest.raises(PermissionDeniedError) as caught:
        storage_for(s3.uri()).read_bytes(s3.uri("any.bin"))
    assert caught.value.exit_code == ExitCode.NO_PERMISSION
    message = str(caught.value)
    assert s3.bucket in message and "InvalidAccessKeyId" in message and "credentials in use: env" in message
    assert (
        os.environ["AWS_SECRET_ACCESS_KEY"] not in message and os.environ["AWS_ACCESS_KEY_ID"] not in message
    )
    assert len(s3.log.select()) == 1  # refused at once, not retried


def test_no_credentials_are_permission_denied(s3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(PermissionDeniedError, match=s3.bucket):
        storage_for(s3.uri()).list(s3.uri("x"))


def test_missing_objects_and_buckets_are_config_errors(s3) -> None:
    st = storage_for(s3.uri())
    with pytest.raises(ConfigError, match=rf"s3://{s3.bucket}/no/such\.json") as caught:
        st.read_bytes(s3.uri("no/such.json"))
    assert caught.value.exit_code == ExitCode.BAD_CONFIG
    with pytest.raises(ConfigError, match="no-such-bucket-xyz"):
        st.list("s3://no-such-bucket-xyz/data")
    with pytest.raises(ConfigError, match="no-such-bucket-xyz"):
        st.stat("s3://no-such-bucket-xyz/a.json")
    with pytest.raises(ConfigError, match="bucket, not an object"):
        st.read_bytes(s3.uri())
    assert len(s3.log.faults()) == 0 and all(e.status < 500 for e in s3.log.select())


def test_explicit_endpoint_overrides_the_environment(s3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    s3.put("k.bin", b"k")
    st = storage_for(s3.uri(), endpoint_url=s3.url, region="eu-west-1")
    assert st.read_bytes(s3.uri("k.bin")) == b"k"
    assert s3.log.select()[0].path == f"/{s3.bucket}/k.bin"  # path-style addressing


def test_one_backend_per_endpoint_and_credentials(s3, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint asks for its store several times: the same settings give the same backend (one boto3
    client, its connections kept); another endpoint or other credentials give another one."""
    s3.put("k.bin", b"k")
    first = storage_for(s3.uri())
    assert storage_for(s3.uri("other/key")) is first
    assert storage_for(s3.uri(), endpoint_url=s3.url) is not first  # other options: another backend
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.moto_url)  # straight to moto, past the proxy
    direct = storage_for(s3.uri())
    assert direct is not first
    s3.log.clear()
    assert direct.read_bytes(s3.uri("k.bin")) == b"k"
    assert s3.log.select() == []  # the new endpoint was used, not the old client
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "another-key-id")
    assert storage_for(s3.uri()) is not direct


def test_large_objects_go_through_the_transfer_manager_and_survive_a_cut(s3, tmp_path: Path) -> None:
    """Above the multipart threshold (8 MiB) an object comes in ranged parts, each retried on its own."""
    big, small = os.urandom(9 * 2**20), os.urandom(3000)
    s3.put("m/big.bin", big)
    s3.put("m/small.bin", small)
    s3.faults.configure(methods=["GET"], path=r"/m/big\.bin$", script=["cut"])
    report = storage_for(s3.uri()).download_prefix(s3.uri("m"), tmp_path, progress=False)
    assert report.transferred == 2
    assert _data_files(tmp_path) == {"big.bin": big, "small.bin": small}
    assert len(s3.log.faults()) == 1
    assert len(s3.proxy.object_requests("GET")) >= 4  # two parts of big.bin, one cut and retried; small.bin


def test_transfers_log_progress_without_a_terminal(s3, tmp_path: Path, caplog) -> None:
    """In a container log (no TTY) a transfer reports through job.progress, not a redrawn bar."""
    files = _files(3)
    for key, data in files.items():
        s3.put(key, data)
    st = storage_for(s3.uri())
    total = sum(map(len, files.values()))
    with caplog.at_level("INFO", logger="lokr.progress"):
        st.download_prefix(s3.uri("data"), tmp_path / "down", progress=True)
        st.upload_folder(tmp_path / "down", s3.uri("copy"), progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "lokr.progress"]
    assert f"fetch {s3.uri('data')}: finished, {total}/{total} B (100%)" in lines[0]
    assert f"upload {s3.uri('copy')}: finished, {total}/{total} B (100%)" in lines[1]
