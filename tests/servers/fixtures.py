"""pytest fixtures for the storage test servers. Register with ``from servers.fixtures import *`` (or
``pytest_plugins``) in ``tests/conftest.py``.

- ``fast_retries``: retry waits of milliseconds (``LOKR_RETRY_*``), so fault tests stay fast.
- ``moto_server`` (session): moto's threaded S3 server; its endpoint URL.
- ``s3``: a fresh bucket behind a fault-injecting proxy; ``AWS_ENDPOINT_URL`` and fake credentials set.
- ``hub``: a fresh Hub server; ``HF_ENDPOINT``, ``HF_TOKEN`` and a private ``HF_HOME`` set.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .faults import FaultPlan, RequestLog
from .hub import HubServer
from .s3 import FAKE_CREDENTIALS, FaultProxy, start_moto

__all__ = ["HUB_TOKEN", "S3Env", "fast_retries", "hub", "moto_server", "s3"]

HUB_TOKEN = "hf_test_token_0123456789"
_buckets = itertools.count()


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOKR_RETRY_ATTEMPTS", "8")
    monkeypatch.setenv("LOKR_RETRY_BASE_SECONDS", "0.01")
    monkeypatch.setenv("LOKR_RETRY_MAX_SECONDS", "2")


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    server, url = start_moto()
    yield url
    server.stop()


@dataclass
class S3Env:
    """One test's bucket. ``client`` talks to moto directly (no faults, not logged) to seed and inspect."""

    bucket: str
    url: str  # the proxy: what the code under test uses
    moto_url: str
    proxy: FaultProxy
    client: Any

    @property
    def faults(self) -> FaultPlan:
        return self.proxy.faults

    @property
    def log(self) -> RequestLog:
        return self.proxy.log

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture
def s3(
    moto_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fast_retries: None
) -> Iterator[S3Env]:
    import boto3
    from botocore.config import Config

    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    for key, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    # Never read the developer's ~/.aws, nor ask an instance metadata service.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    proxy = FaultProxy(moto_server).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    client = boto3.client(
        "s3",
        endpoint_url=moto_server,
        config=Config(s3={"addressing_style": "path"}),
        region_name="us-east-1",
    )
    bucket = f"lokr-test-{next(_buckets)}"
    client.create_bucket(Bucket=bucket)
    try:
        yield S3Env(bucket=bucket, url=proxy.url, moto_url=moto_server, proxy=proxy, client=client)
    finally:
        proxy.stop()


@pytest.fixture
def hub(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory, fast_retries: None
) -> Iterator[HubServer]:
    home = tmp_path_factory.mktemp("hub")  # not tmp_path: tests use that as their download target
    server = HubServer(home / "data", token=HUB_TOKEN).start()
    # The token's user may push to the "someone" organisation, where the tests' repos live: run and publish
    # check the namespace before they spend anything.
    server.orgs = ["someone"]
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(home / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    # huggingface_hub read HF_ENDPOINT when it was imported, which may have been before this fixture ran:
    # point its import-time default here too, so nothing that forgets to pass an endpoint reaches out.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    try:
        yield server
    finally:
        server.stop()
