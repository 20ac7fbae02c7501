"""A real HTTP webhook receiver on 127.0.0.1: records every POST, fails on demand through a ``FaultPlan``.

with WebhookReceiver() as receiver:
    receiver.faults.configure(rate=1.0, kinds=["500"], limit=2)  # the first two POSTs fail
    Webhook(receiver.url).post("start", {...})
    receiver.bodies  # the JSON bodies accepted, in order
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .faults import FaultPlan


class WebhookReceiver:
    def __init__(self, path: str = "/hooks/secret-path") -> None:
        self.path = path
        self.faults = FaultPlan()
        self.bodies: list[dict[str, Any]] = []
        self.raw: list[bytes] = []  # every request body, failed ones included
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start the receiver first (use it as a context manager)"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}{self.path}"

    @property
    def events(self) -> list[str]:
        with self._lock:
            return [body["event"] for body in self.bodies]

    def __enter__(self) -> WebhookReceiver:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        # A short poll interval: shutdown() waits for one poll.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _record(self, raw: bytes, headers: dict[str, str], accepted: bool) -> None:
        with self._lock:
            self.raw.append(raw)
            self.headers.append(headers)
            if accepted:
                self.bodies.append(json.loads(raw))

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                fault = receiver.faults.draw("POST", self.path)
                if self.path != receiver.path:
                    receiver._record(raw, headers, accepted=False)
                    self._answer(404, b'{"error": "unknown webhook"}')
                elif fault in ("drop", "cut"):
                    receiver._record(raw, headers, accepted=False)
                    self.close_connection = True  # no response at all
                elif fault is not None:
                    receiver._record(raw, headers, accepted=False)
                    extra = {"Retry-After": receiver.faults.retry_after} if fault == "429" else {}
                    self._answer(int(fault), b'{"error": "injected"}', extra)
                else:
                    receiver._record(raw, headers, accepted=True)
                    self._answer(204, b"")

            def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output quiet

        return Handler
