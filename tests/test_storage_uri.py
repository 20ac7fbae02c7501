"""URI parsing and the helpers every stage uses to build storage paths."""

import subprocess
import sys
from pathlib import Path

import pytest

from job.errors import ConfigError, ExitCode
from job.storage import URI, is_remote, join, name, parent, parse_uri
from job.storage.sync import match_patterns, unsafe_reason


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/data/images", URI(scheme="file", path="/data/images")),
        ("relative/dir", URI(scheme="file", path="relative/dir")),
        ("file:///data/x.json", URI(scheme="file", path="/data/x.json")),
        ("file://localhost/data/x.json", URI(scheme="file", path="/data/x.json")),
        ("s3://my-bucket/runs/r1/", URI(scheme="s3", bucket="my-bucket", path="runs/r1")),
        ("S3://my-bucket", URI(scheme="s3", bucket="my-bucket", path="")),
        ("hf://owner/name", URI(scheme="hf", repo_id="owner/name", path="")),
        ("hf://models/owner/name/sub/f.json", URI(scheme="hf", repo_id="owner/name", path="sub/f.json")),
        (
            "hf://datasets/owner/name@v1.0/imgs",
            URI(scheme="hf", repo_id="owner/name", repo_type="dataset", revision="v1.0", path="imgs"),
        ),
        (
            "hf://owner/name@refs%2Fpr%2F1/a",
            URI(scheme="hf", repo_id="owner/name", revision="refs/pr/1", path="a"),
        ),
        (
            "hf://owner/name@refs/pr/12/a/b",
            URI(scheme="hf", repo_id="owner/name", revision="refs/pr/12", path="a/b"),
        ),
        (
            "hf://datasets/o/n@refs/convert/parquet",
            URI(scheme="hf", repo_id="o/n", repo_type="dataset", revision="refs/convert/parquet", path=""),
        ),
    ],
)
def test_parse(text: str, expected: URI) -> None:
    assert parse_uri(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "s3://my-bucket/runs/r1",
        "s3://my-bucket",
        "hf://owner/name",
        "hf://datasets/owner/name@v1.0/imgs/a.png",
        "hf://owner/name@refs%2Fpr%2F1/a",
        "/abs/path",
    ],
)
def test_str_round_trips(text: str) -> None:
    assert str(parse_uri(text)) == text
    assert parse_uri(str(parse_uri(text))) == parse_uri(text)


def test_helpers_on_every_scheme() -> None:
    assert join("s3://b-1/run", "checkpoints", "checkpoint-00000010/x.bin") == (
        "s3://b-1/run/checkpoints/checkpoint-00000010/x.bin"
    )
    assert join("s3://b-1", "a") == "s3://b-1/a"
    assert join("hf://datasets/o/n@dev", "imgs/") == "hf://datasets/o/n@dev/imgs"
    assert join("/work/dir", "a/b") == "/work/dir/a/b"
    assert parent("hf://o/n/a/b.json") == "hf://o/n/a"
    assert parent("s3://b-1/a") == "s3://b-1"
    assert parent("s3://b-1") == "s3://b-1"
    assert parent("/work/dir/") == "/work"
    assert name("s3://b-1/a/b.json") == "b.json"
    assert name("hf://o/n") == ""
    assert name("/work/dir/f.txt") == "f.txt"
    assert is_remote("s3://b-1/x") and is_remote("hf://o/n")
    assert not is_remote("/x") and not is_remote("file:///x")
    uri = parse_uri("hf://o/n/a")
    assert uri.join("b").parent == uri


@pytest.mark.parametrize("part", ["..", "a/../../b", "../x"])
def test_join_refuses_climbing(part: str) -> None:
    with pytest.raises(ConfigError, match=r"'\.\.'"):
        join("s3://bkt/run", part)


@pytest.mark.parametrize(
    "text",
    [
        "s3://",
        "s3:/bkt/key",
        "s3://b",  # too short for a bucket name
        "s3://bad bucket/x",
        "hf://onlyowner",
        "hf://datasets/owner",
        "hf://owner/name@",
        "hf://-owner/name",
        "hf://owner/na..me",
        "hf://spaces/owner/name",
        "gs://bucket/key",
        "file://",
        "",
    ],
)
def test_malformed_uris_name_themselves(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_uri(text)
    assert caught.value.exit_code == ExitCode.BAD_CONFIG
    if text:
        assert repr(text) in str(caught.value)


@pytest.mark.parametrize(
    ("key", "unsafe"),
    [
        ("a/b.png", False),
        ("a..b/c", False),
        ("../x", True),
        ("a/../../x", True),
        ("/etc/passwd", True),
        ("a//b", True),
        ("./a", True),
        ("a\\..\\b", True),
        ("", True),
    ],
)
def test_unsafe_keys(key: str, unsafe: bool) -> None:
    assert (unsafe_reason(key) is not None) == unsafe


def test_patterns_follow_huggingface_hub() -> None:
    assert match_patterns("a/b/c.png", ["*.png"])  # '*' crosses '/'
    assert match_patterns("sub/x.txt", ["sub/"])
    assert not match_patterns("other/x.txt", ["sub/"])
    assert match_patterns("anything", None)


def test_importing_storage_stays_light() -> None:
    """``lokr-job --help`` imports the package; boto3 and huggingface_hub must load only on use."""
    code = (
        "import sys, job.storage, job.storage.sync, job.storage.base; "
        "print(sorted(m for m in ('boto3', 'botocore', 'huggingface_hub', 'tqdm', 'tenacity') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    assert out.stdout.strip() == "[]"
