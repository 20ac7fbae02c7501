"""The Hub backend against a local Hub server speaking the protocol huggingface_hub 2.4 uses."""

import os
from pathlib import Path

import pytest

from job.errors import ConfigError, ExitCode, PermissionDeniedError, TransientError
from job.storage import storage_for
from job.storage.hub import HubStorage
from job.storage.sync import MANIFEST_NAME, STAGING_NAME

DATA = "hf://datasets/org/pics"


def _local(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.relative_to(root).as_posix().startswith(".lokr")
    }


def _resolve_gets(hub) -> list:
    return hub.log.select(lambda e: e.method == "GET" and "/resolve/" in e.path)


@pytest.fixture
def pics(hub) -> dict[str, bytes]:
    files = {f"imgs/{i:02d}.png": os.urandom(1000 + i) for i in range(5)}
    files["imgs/sub/cap.txt"] = b"a caption"
    files["README.md"] = b"# pics"
    hub.seed("org/pics", files, repo_type="dataset")
    return files


def test_list_stat_read(hub, pics) -> None:
    hub.page_size = 2  # make huggingface_hub follow the Link header
    st = storage_for(DATA)
    assert isinstance(st, HubStorage)
    listed = st.list(f"{DATA}/imgs")
    assert [o.key for o in listed] == ["00.png", "01.png", "02.png", "03.png", "04.png", "sub/cap.txt"]
    assert [o.size for o in listed[:2]] == [1000, 1001] and all(o.etag for o in listed)
    assert sorted(o.key for o in st.list(DATA)) == sorted([*pics, ".gitattributes"])
    assert st.list(f"{DATA}/no-such-folder") == []
    info = st.stat(f"{DATA}/imgs/sub/cap.txt")
    assert info is not None and info.size == 9 and info.etag == listed[-1].etag
    assert st.stat(f"{DATA}/imgs/missing.png") is None
    assert st.stat(f"{DATA}/imgs") is None  # a folder is not an object
    assert st.read_bytes(f"{DATA}/imgs/sub/cap.txt") == b"a caption"
    st.download_file(f"{DATA}/imgs/01.png", Path(hub.root) / "x" / "one.png")
    assert (Path(hub.root) / "x" / "one.png").read_bytes() == pics["imgs/01.png"]


def test_revisions(hub) -> None:
    old = hub.seed("org/model", {"config.json": b"v1"})
    hub.commit("org/model", add={"config.json": b"v2"})
    hub.commit("org/model", add={"config.json": b"pr"}, branch="refs/pr/1")
    st = storage_for("hf://org/model")
    assert st.read_bytes("hf://org/model/config.json") == b"v2"
    assert st.read_bytes(f"hf://org/model@{old}/config.json") == b"v1"
    assert st.read_bytes("hf://models/org/model@refs%2Fpr%2F1/config.json") == b"pr"
    assert st.read_bytes("hf://org/model@refs/pr/1/config.json") == b"pr"
    with pytest.raises(ConfigError, match="no-such-branch"):
        st.read_bytes("hf://org/model@no-such-branch/config.json")


def test_download_prefix_is_incremental(hub, pics, tmp_path: Path) -> None:
    st, dest = storage_for(DATA), tmp_path / "data"
    first = st.download_prefix(f"{DATA}/imgs", dest, progress=False)
    assert (first.transferred, first.skipped) == (6, 0)
    assert _local(dest) == {k.removeprefix("imgs/"): v for k, v in pics.items() if k.startswith("imgs/")}
    assert (dest / MANIFEST_NAME).is_file() and not (dest / STAGING_NAME).exists()

    hub.log.clear()
    again = st.download_prefix(f"{DATA}/imgs", dest, progress=False)
    assert (again.transferred, again.skipped, again.bytes) == (0, 6, 0)
    assert _resolve_gets(hub) == []  # zero object bytes moved

    hub.commit("org/pics", "dataset", {"imgs/02.png": b"edited on the Hub"})
    hub.log.clear()
    changed = st.download_prefix(f"{DATA}/imgs", dest, progress=False)
    assert (changed.transferred, changed.skipped) == (1, 5)
    assert [e.path.rsplit("/", 2)[-2:] for e in _resolve_gets(hub)] == [["imgs", "02.png"]]
    assert (dest / "02.png").read_bytes() == b"edited on the Hub"


def test_download_logs_progress_without_a_terminal(hub, pics, tmp_path: Path, caplog) -> None:
    """In a container log (no TTY) a fetch reports through job.progress, not huggingface_hub's bars."""
    total = sum(len(v) for k, v in pics.items() if k.startswith("imgs/"))
    with caplog.at_level("INFO", logger="lokr.progress"):
        storage_for(DATA).download_prefix(f"{DATA}/imgs", tmp_path / "all", progress=True)
        # An update of some files takes the other path (one download per file).
        (tmp_path / "all" / "00.png").unlink()
        storage_for(DATA).download_prefix(f"{DATA}/imgs", tmp_path / "all", progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "lokr.progress"]
    assert [line.rsplit(" in ", 1)[0] for line in lines] == [
        f"fetch {DATA}/imgs: finished, {total}/{total} B (100%)",
        f"fetch {DATA}/imgs: finished, 1000/1000 B (100%)",
    ]


def test_download_prefix_allow_patterns(hub, pics, tmp_path: Path) -> None:
    report = storage_for(DATA).download_prefix(
        DATA, tmp_path, progress=False, allow_patterns=["*.txt", "README.md"]
    )
    assert report.transferred == 2
    assert _local(tmp_path) == {"README.md": b"# pics", "imgs/sub/cap.txt": b"a caption"}


def test_keys_escaping_the_folder_are_refused(hub, tmp_path: Path) -> None:
    hub.seed("org/evil", {"data/ok.bin": b"ok", "data/../../evil.bin": b"evil"}, repo_type="dataset")
    with pytest.raises(ConfigError, match=r"\.\./\.\./evil\.bin"):
        storage_for(DATA).download_prefix(
            "hf://datasets/org/evil/data", tmp_path / "in" / "dest", progress=False
        )
    assert _local(tmp_path) == {}


def test_uploads_are_one_commit_each(hub, tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-00000010"
    files = {
        "lokr.safetensors": os.urandom(5000),
        "optimizer/state.bin": os.urandom(3000),
        "README.md": b"# c",
    }
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    (folder / MANIFEST_NAME).write_text("{}")  # bookkeeping never travels
    st = storage_for("hf://me/adapter")
    st.write_bytes("hf://me/adapter/status.json", b"{}")  # creates the repo (private) on first write
    assert hub.repos[("model", "me/adapter")].private
    before = hub.commits
    report = st.upload_folder(
        folder, "hf://me/adapter/checkpoints/checkpoint-00000010", commit_message="ckpt 10"
    )
    assert report.transferred == 3 and hub.commits == before + 1
    stored = hub.files("me/adapter")
    assert {k: v for k, v in stored.items() if k.startswith("checkpoints/")} == {
        f"checkpoints/checkpoint-00000010/{k}": v for k, v in files.items()
    }
    (tmp_path / "card.md").write_bytes(b"card")
    st.upload_file(tmp_path / "card.md", "hf://me/adapter/output/card.md")
    st.delete("hf://me/adapter/checkpoints/checkpoint-00000010")
    st.delete("hf://me/adapter/status.json")
    st.delete("hf://me/adapter/never-existed")  # nothing to do: no commit
    assert hub.commits == before + 4
    assert sorted(hub.files("me/adapter")) == [".gitattributes", "output/card.md"]


def test_thirty_percent_faults_still_give_identical_bytes(hub, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LOKR_RETRY_ATTEMPTS", "12")
    originals = {f"w/{i}.bin": os.urandom(4000 + i) for i in range(3)}
    hub.seed("org/w", originals)
    source = tmp_path / "up"
    source.mkdir()
    for i in range(3):
        (source / f"u{i}.bin").write_bytes(os.urandom(3000 + i))
    st = storage_for("hf://org/w")
    hub.faults.configure(rate=0.3, seed=3)
    report = st.download_prefix("hf://org/w/w", tmp_path / "down", progress=False)
    st.upload_folder(source, "hf://org/w/up")
    read_back = st.read_bytes("hf://org/w/up/u1.bin")
    injected = len(hub.log.faults())
    hub.faults.off()
    assert report.transferred == 3
    assert _local(tmp_path / "down") == {k.removeprefix("w/"): v for k, v in originals.items()}
    assert read_back == (source / "u1.bin").read_bytes()
    assert {k: v for k, v in hub.files("org/w").items() if k.startswith("up/")} == {
        f"up/{p.name}": p.read_bytes() for p in source.iterdir()
    }
    assert injected >= 3


def test_cut_download_leaves_no_partial_file(hub, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LOKR_RETRY_ATTEMPTS", "2")
    hub.seed("org/m", {"big.bin": os.urandom(100_000)})
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "big.bin").write_bytes(b"previous version")
    # The first GET is cut mid-body (huggingface_hub then resumes with a Range request), later ones fail.
    hub.faults.configure(methods=["GET"], path=r"/resolve/.*/big\.bin$", script=["cut"] + ["500"] * 20)
    with pytest.raises(TransientError) as caught:
        storage_for("hf://org/m").download_prefix(
            "hf://org/m", dest, progress=False, allow_patterns=["big.bin"]
        )
    assert caught.value.exit_code == ExitCode.TRANSIENT
    cut = [e for e in hub.log.faults() if e.fault == "cut"]
    assert len(cut) == 1 and 0 < cut[0].sent < 100_000
    assert (dest / "big.bin").read_bytes() == b"previous version"
    assert {p.name for p in dest.iterdir()} <= {MANIFEST_NAME, STAGING_NAME, "big.bin"}


def test_cut_download_resumes_with_a_range_request(hub, tmp_path: Path) -> None:
    """huggingface_hub keeps what it received in 10 MiB chunks and asks for the rest with a Range header."""
    mib = 2**20
    data = os.urandom(24 * mib)
    hub.seed("org/m", {"big.bin": data})
    hub.faults.configure(methods=["GET"], path=r"/resolve/.*/big\.bin$", script=["cut"])
    report = storage_for("hf://org/m").download_prefix("hf://org/m", tmp_path, progress=False)
    assert report.transferred == 2  # big.bin and .gitattributes
    assert (tmp_path / "big.bin").read_bytes() == data
    gets = [e for e in hub.log.select() if e.method == "GET" and e.path.endswith("/big.bin")]
    assert [(e.status, e.sent) for e in gets] == [(200, 12 * mib), (206, 14 * mib)]


def test_wrong_token_is_permission_denied(hub, pics, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token")
    with pytest.raises(PermissionDeniedError) as caught:
        storage_for(DATA).read_bytes(f"{DATA}/README.md")
    assert caught.value.exit_code == ExitCode.NO_PERMISSION
    message = str(caught.value)
    assert "org/pics" in message and "HF_TOKEN set" in message and "hf_wrong_token" not in message
    with pytest.raises(PermissionDeniedError, match="org/pics"):
        storage_for(DATA).list(DATA)
    with pytest.raises(PermissionDeniedError, match="me/new"):
        storage_for(DATA).write_bytes("hf://me/new/x.json", b"{}")


def test_private_repo_without_token_is_permission_denied(hub, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.seed("org/private", {"a.json": b"{}"}, private=True)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_TOKEN_PATH", str(Path(hub.root) / "no-token-file"))
    with pytest.raises(PermissionDeniedError, match=r"org/private.*no token"):
        storage_for("hf://org/private").read_bytes("hf://org/private/a.json")


def test_missing_things_are_config_errors(hub, pics) -> None:
    st = storage_for(DATA)
    with pytest.raises(ConfigError, match=r"org/absent") as caught:
        st.list("hf://org/absent")
    assert caught.value.exit_code == ExitCode.BAD_CONFIG
    with pytest.raises(ConfigError, match=r"hf://datasets/org/pics/imgs/nope\.png"):
        st.read_bytes(f"{DATA}/imgs/nope.png")
    with pytest.raises(ConfigError, match="org/pics"):
        st.read_bytes("hf://org/pics/README.md")  # a model repo of that name does not exist
    with pytest.raises(ConfigError, match="names a repo"):
        st.read_bytes(DATA)
    assert all(e.status < 500 for e in hub.log.select())


def test_endpoint_is_read_at_call_time(hub, pics, monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub froze HF_ENDPOINT at import; the backend must still follow the variable."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    st = storage_for(DATA)
    assert st.read_bytes(f"{DATA}/README.md") == b"# pics"
    assert [o.key for o in st.list(f"{DATA}/imgs/sub")] == ["cap.txt"]
