"""Storage URIs: a local path (or ``file://``), ``s3://bucket/key`` and ``hf://[models/|datasets/]owner/name[@rev]/path``.

The ``hf://`` form follows huggingface_hub's HfFileSystem: a model repo when no type is given, a revision
after ``@`` that may be URL-encoded (``@refs%2Fpr%2F1``) or one of the special refs written out
(``@refs/pr/1``, ``@refs/convert/parquet``). Parsing is pure string work: no boto3, no huggingface_hub,
so that ``lokr-job --help`` and config validation stay fast.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass, replace
from typing import Literal, TypeAlias
from urllib.parse import quote, unquote

from job.errors import ConfigError

Scheme = Literal["file", "s3", "hf"]

_S3_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{2,254}$")
# The Hub's rule for owner and name: letters, digits, "-", "_", "."; no leading/trailing "-" or "."; no "--"/"..".
_HF_PART = re.compile(r"^(?!.*(?:--|\.\.))[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?$")
_HF_SPECIAL_REF = re.compile(r"^(refs/pr/\d+|refs/convert/[A-Za-z0-9_-]+)(?:/|$)")
_HF_TYPES = {"models": "model", "datasets": "dataset"}


@dataclass(frozen=True)
class URI:
    """A parsed storage location.

    ``path`` is the local path (scheme ``file``), the object key (``s3``) or the path inside the repo (``hf``),
    without leading or trailing slashes for remote schemes; ``""`` is the bucket or repo root.
    """

    scheme: Scheme
    path: str
    bucket: str = ""  # s3 only
    repo_id: str = ""  # hf only: "owner/name"
    repo_type: Literal["model", "dataset"] = "model"  # hf only
    revision: str | None = None  # hf only; None means the repo's default branch

    @property
    def is_remote(self) -> bool:
        return self.scheme != "file"

    @property
    def name(self) -> str:
        """The last path component ("" at a bucket or repo root)."""
        if self.scheme == "file":
            return os.path.basename(self.path.rstrip(os.sep)) or self.path
        return posixpath.basename(self.path)

    @property
    def parent(self) -> URI:
        """The containing folder; the root is its own parent."""
        if self.scheme == "file":
            trimmed = self.path.rstrip(os.sep) or self.path
            return replace(self, path=os.path.dirname(trimmed) or ".")
        return replace(self, path=posixpath.dirname(self.path))

    def join(self, *parts: str) -> URI:
        """A child location. Parts may hold slashes; ``..``, ``.`` and empty segments are refused, because a
        joined key that climbs out of its prefix is how a download escapes its folder."""
        segments: list[str] = []
        for part in parts:
            for segment in str(part).replace("\\", "/").split("/"):
                if segment in ("", "."):
                    continue
                if segment == "..":
                    raise ConfigError(
                        f"cannot join {part!r} onto {self}: '..' is not allowed in a storage path"
                    )
                segments.append(segment)
        if not segments:
            return self
        if self.scheme == "file":
            return replace(self, path=os.path.join(self.path, *segments))
        return replace(self, path="/".join([self.path, *segments]) if self.path else "/".join(segments))

    def __str__(self) -> str:
        if self.scheme == "file":
            return self.path
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.path}" if self.path else f"s3://{self.bucket}"
        head = "datasets/" if self.repo_type == "dataset" else ""
        rev = f"@{quote(self.revision, safe='')}" if self.revision is not None else ""
        tail = f"/{self.path}" if self.path else ""
        return f"hf://{head}{self.repo_id}{rev}{tail}"


# What the storage functions accept: a URI string, a local path object, or an already parsed URI.
Location: TypeAlias = str | os.PathLike[str] | URI


def parse_uri(value: Location) -> URI:
    """Parse ``value``; raise ``ConfigError`` naming it when it is malformed."""
    if isinstance(value, URI):
        return value
    if isinstance(value, os.PathLike):
        return URI(scheme="file", path=os.fspath(value))
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"empty storage location {value!r}: give a local path, s3://bucket/key or hf://owner/name"
        )
    text = value.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        if re.match(r"^(s3|hf|file):/?[^/]", text, re.IGNORECASE):
            raise ConfigError(f"malformed URI {value!r}: write '<scheme>://' with two slashes")
        return URI(scheme="file", path=os.path.expanduser(text))
    scheme = scheme.lower()
    if scheme == "file":
        # file:///abs/path and file://localhost/abs/path; a bare file://rel/path is taken as relative.
        path = rest[len("localhost") :] if rest.startswith("localhost/") else rest
        if not path:
            raise ConfigError(f"malformed URI {value!r}: no path after file://")
        return URI(scheme="file", path=unquote(path))
    if scheme == "s3":
        return _parse_s3(value, rest)
    if scheme == "hf":
        return _parse_hf(value, rest)
    raise ConfigError(f"unsupported URI scheme in {value!r}: use a local path, file://, s3:// or hf://")


def _parse_s3(value: str, rest: str) -> URI:
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ConfigError(f"malformed URI {value!r}: no bucket name after s3://")
    if not _S3_BUCKET.match(bucket):
        raise ConfigError(f"malformed URI {value!r}: {bucket!r} is not a valid S3 bucket name")
    return URI(scheme="s3", bucket=bucket, path=key.strip("/"))


def _parse_hf(value: str, rest: str) -> URI:
    parts = rest.strip("/").split("/")
    repo_type: Literal["model", "dataset"] = "model"
    if parts and parts[0] in _HF_TYPES:
        repo_type = _HF_TYPES[parts[0]]  # type: ignore[assignment]
        parts = parts[1:]
    elif parts and parts[0] in ("spaces", "buckets", "kernels"):
        raise ConfigError(f"unsupported Hub URI {value!r}: only model and dataset repos are supported")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ConfigError(f"malformed Hub URI {value!r}: expected hf://[datasets/]owner/name[@revision]/path")
    owner, name_rev, tail = parts[0], parts[1], "/".join(parts[2:])
    name, at, revision = name_rev.partition("@")
    if at:
        # "@refs/pr/1/file" written out: the special ref swallows the next segments (HfFileSystem does the same).
        spelled = f"{revision}/{tail}" if tail else revision
        special = _HF_SPECIAL_REF.match(spelled)
        if special:
            revision, tail = special.group(1), spelled[len(special.group(1)) :]
        revision = unquote(revision)
        if not revision:
            raise ConfigError(f"malformed Hub URI {value!r}: empty revision after '@'")
    for part in (owner, name):
        if not _HF_PART.match(part):
            raise ConfigError(f"malformed Hub URI {value!r}: {part!r} is not a valid repo owner or name")
    return URI(
        scheme="hf",
        repo_id=f"{owner}/{name}",
        repo_type=repo_type,
        revision=revision if at else None,
        path=tail.strip("/"),
    )


def join(uri: Location, *parts: str) -> str:
    """``uri`` with ``parts`` appended, as a string."""
    return str(parse_uri(uri).join(*parts))


def parent(uri: Location) -> str:
    return str(parse_uri(uri).parent)


def name(uri: Location) -> str:
    return parse_uri(uri).name


def is_remote(uri: Location) -> bool:
    return parse_uri(uri).is_remote
