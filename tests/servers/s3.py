"""A real S3 API for tests: moto's threaded server, behind a reverse proxy that injects faults and logs.

Clients talk to the proxy (``FaultProxy.url``); the proxy forwards to moto untouched, Host header included,
so SigV4 signatures still verify when moto's IAM checks are on (``iam_auth``).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from .faults import FaultPlan, LoggedRequest, RequestLog

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "expect"}
_S3_ERRORS = {500: "InternalError", 503: "SlowDown", 429: "TooManyRequests"}


def start_moto() -> tuple[Any, str]:
    """A moto server (``ThreadedMotoServer``) on a free port of 127.0.0.1, and its endpoint URL."""
    from moto.server import ThreadedMotoServer  # half a second to import: only when a test needs S3

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


@contextlib.contextmanager
def iam_auth(moto_url: str) -> Iterator[None]:
    """Turn on moto's credential checks (unknown access keys get 403 InvalidAccessKeyId), then off again.
    The setting is process-wide, so this must not overlap other S3 tests."""

    def post(value: str) -> None:
        # Not form-encoded (urllib's default), or Flask swallows the body as form data.
        request = urllib.request.Request(
            f"{moto_url}/moto-api/reset-auth",
            data=value.encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(request, timeout=10).close()

    post("0")
    try:
        yield
    finally:
        post("inf")


def iam_user_keys(moto_url: str, name: str) -> tuple[str, str]:
    """A moto IAM user allowed every S3 action, and its access key id and secret: keys that still work
    once ``iam_auth`` is on (moto generates them in AWS's shapes, ``AKIA`` + 16 and 40 characters)."""
    import boto3

    iam = boto3.client("iam", endpoint_url=moto_url, region_name="us-east-1")
    iam.create_user(UserName=name)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


class FaultProxy:
    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.faults = FaultPlan()
        self.log = RequestLog()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self._httpd.daemon_threads = True
        self._httpd.proxy = self  # type: ignore[attr-defined]

    def start(self) -> FaultProxy:
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def object_requests(self, method: str = "GET") -> list[LoggedRequest]:
        """Requests on object keys (path-style ``/bucket/key``), not bucket-level calls such as listings."""
        return self.log.select(lambda e: e.method == method and len(e.path.strip("/").split("/", 1)) == 2)

    def object_bytes(self, method: str = "GET") -> int:
        return sum(e.sent for e in self.object_requests(method))


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without TCP_NODELAY each response waits out the
    # client's delayed ACK (about 40 ms), which would swamp every latency the tests and benchmarks see.
    disable_nagle_algorithm = True
    timeout = 30
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _proxy(self) -> None:
        proxy: FaultProxy = self.server.proxy
        body = self._read_body()
        path, _, query = self.path.partition("?")
        entry = LoggedRequest(self.command, path, query, 0, 0, len(body))
        # Logged before any answer goes out (fields are filled in before bytes are written), so a test
        # that reads the log right after its call returns sees every request.
        proxy.log.add(entry)
        proxy.log.enter()
        try:
            if proxy.faults.delay:
                time.sleep(proxy.faults.delay)
            entry.fault = fault = proxy.faults.draw(self.command, path)
            if fault in ("500", "503", "429"):
                self._reply(entry, int(fault), self._error_headers(proxy), self._error_body(int(fault)))
                return
            if fault == "drop":
                self.close_connection = True
                return
            status, headers, data = self._forward(proxy, body)
            if fault == "cut" and len(data) > 1 and self.command != "HEAD":
                # Promise the whole body, deliver half, hang up: what a reset mid-transfer looks like.
                self.send_response(status)
                for key, value in headers:
                    if key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                entry.status, entry.sent = status, len(data) // 2
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            if fault == "cut":  # nothing to cut: drop the response instead
                self.close_connection = True
                return
            self._reply(entry, status, headers, data)
        finally:
            proxy.log.leave()

    def _forward(self, proxy: FaultProxy, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            response = conn.getresponse()
            data = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
            return response.status, kept, data
        finally:
            conn.close()

    def _reply(self, entry: LoggedRequest, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        self.send_response(status)
        has_length = False
        for key, value in headers:
            if key.lower() == "content-length":
                if self.command != "HEAD":
                    continue  # recomputed below from what we actually send
                has_length = True
            self.send_header(key, value)
        if not has_length:
            self.send_header("Content-Length", str(len(data)))
        entry.status = status
        entry.sent = 0 if self.command == "HEAD" else len(data)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    @staticmethod
    def _error_headers(proxy: FaultProxy) -> list[tuple[str, str]]:
        return [("Content-Type", "application/xml"), ("Retry-After", proxy.faults.retry_after)]

    @staticmethod
    def _error_body(status: int) -> bytes:
        code = _S3_ERRORS[status]
        return (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>injected fault</Message><RequestId>fault</RequestId></Error>"
        ).encode()
