"""A small Hugging Face Hub for tests: the endpoints huggingface_hub 2.4 calls to read, list and commit.

Repos live in memory as commits (path -> git blob id); blob contents live in ``<root>/blobs``. Every file
is offered in the ``regular`` upload mode, so uploads need neither LFS nor Xet. Requests can be failed on
purpose (``faults``) and are all recorded (``log``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote

from .faults import FaultPlan, LoggedRequest, RequestLog

_TYPES = {"models": "model", "datasets": "dataset"}
_URL_PREFIX = {"model": "", "dataset": "datasets/"}


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def blob_oid(data: bytes) -> str:
    """The git blob id the Hub reports for a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Repo:
    private: bool
    refs: dict[str, str] = field(default_factory=dict)
    trees: dict[str, dict[str, str]] = field(default_factory=dict)  # commit sha -> {path: blob oid}


class HubServer:
    def __init__(self, root: Path, *, token: str | None = None, page_size: int = 1000):
        self.root = root
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        self.token = token
        self.page_size = page_size
        # Who the token belongs to, for whoami: its user, organisations and role ("read", "write").
        self.user = "tester"
        self.orgs: list[str] = []
        self.token_role = "write"
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.commits = 0
        self.faults = FaultPlan()
        self.log = RequestLog()
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None

    # -- lifecycle and test helpers -------------------------------------------------------------------

    def start(self) -> HubServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def url(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> bool:
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                return False
            self.repos[(repo_type, repo_id)] = _Repo(private=private)
            self.commit(
                repo_id, repo_type, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
            )
            return True

    def seed(
        self, repo_id: str, files: dict[str, bytes], repo_type: str = "model", private: bool = False
    ) -> str:
        self.create_repo(repo_id, repo_type, private)
        return self.commit(repo_id, repo_type, files, message="seed")

    def commit(
        self,
        repo_id: str,
        repo_type: str = "model",
        add: dict[str, bytes] | None = None,
        delete: list[str] = (),  # type: ignore[assignment]
        *,
        branch: str = "main",
        message: str = "",
    ) -> str:
        """Apply a commit; paths in ``delete`` ending in '/' are folders. Returns the new commit sha."""
        with self._lock:
            repo = self.repos[(repo_type, repo_id)]
            parent = repo.refs.get(branch, "")
            tree = dict(repo.trees.get(parent, {}))
            for path in delete:
                if path.endswith("/"):
                    gone = [p for p in tree if p.startswith(path)]
                else:
                    gone = [path] if path in tree else []
                if not gone:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                for p in gone:
                    del tree[p]
            for path, data in (add or {}).items():
                oid = blob_oid(data)
                blob = self.root / "blobs" / oid
                if not blob.exists():
                    blob.write_bytes(data)
                tree[path] = oid
            self.commits += 1
            sha = hashlib.sha1(
                f"{parent}:{self.commits}:{message}:{sorted(tree.items())}".encode()
            ).hexdigest()
            repo.trees[sha] = tree
            repo.refs[branch] = sha
            return sha

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        repo, sha = self._resolve(repo_type, repo_id, revision)
        return {p: (self.root / "blobs" / oid).read_bytes() for p, oid in repo.trees[sha].items()}

    # -- internals used by the handler ----------------------------------------------------------------

    def _repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _resolve(self, repo_type: str, repo_id: str, revision: str) -> tuple[_Repo, str]:
        repo = self._repo(repo_type, repo_id)
        sha = repo.refs.get(revision) or (revision if revision in repo.trees else None)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo, sha

    def _entries(self, tree: dict[str, str], folder: str, recursive: bool) -> list[dict[str, Any]]:
        base = f"{folder}/" if folder else ""
        files, dirs = [], set()
        for path, oid in sorted(tree.items()):
            if not path.startswith(base):
                continue
            rest = path[len(base) :].split("/")
            for depth in range(1, len(rest)):
                if depth == 1 or recursive:
                    dirs.add(base + "/".join(rest[:depth]))
            if len(rest) == 1 or recursive:
                files.append(self._file_entry(path, oid))
        dir_entries = [
            {"type": "directory", "oid": blob_oid(d.encode()), "size": 0, "path": d} for d in sorted(dirs)
        ]
        return dir_entries + files

    def _file_entry(self, path: str, oid: str) -> dict[str, Any]:
        return {"type": "file", "oid": oid, "size": (self.root / "blobs" / oid).stat().st_size, "path": path}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without TCP_NODELAY each response waits out the
    # client's delayed ACK (about 40 ms), which would swamp every latency the tests and benchmarks see.
    disable_nagle_algorithm = True
    timeout = 30
    server: Any

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        raw_path, _, self.query = self.path.partition("?")
        self.entry = LoggedRequest(self.command, raw_path, self.query, 0, 0, len(self.body))
        self.hub.log.add(self.entry)  # before answering: see the S3 proxy
        self.hub.log.enter()
        try:
            self.entry.fault = self.fault = self.hub.faults.draw(self.command, raw_path)
            if self.fault in ("500", "503", "429"):
                status = int(self.fault)
                self._send(status, {"error": "injected fault"}, {"Retry-After": self.hub.faults.retry_after})
            elif self.fault == "drop":
                self.close_connection = True
            else:
                try:
                    self._route([unquote(s) for s in raw_path.strip("/").split("/")])
                except HubError as err:
                    headers = {"X-Error-Message": err.message}
                    if err.code:
                        headers["X-Error-Code"] = err.code
                    self._send(err.status, {"error": err.message}, headers)
        finally:
            self.hub.log.leave()

    # -- responses ------------------------------------------------------------------------------------

    def _send(
        self, status: int, payload: Any, headers: dict[str, str] | None = None, raw: bytes | None = None
    ) -> None:
        body = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        if raw is None:
            self.send_header("Content-Type", "application/json")
        self.entry.status = status
        if self.command == "HEAD":
            self.end_headers()
            return
        if self.fault == "cut" and len(body) > 1:
            body = body[: len(body) // 2]
            self.close_connection = True
        self.entry.sent = len(body)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _sent_token(self) -> str | None:
        header = self.headers.get("Authorization", "")
        return header[7:] if header.lower().startswith("bearer ") else None

    def _token_ok(self, repo: _Repo | None = None, write: bool = False) -> None:
        expected = self.hub.token
        authorised = expected is None or self._sent_token() == expected
        if write and not authorised:
            raise HubError(401, "You must be authenticated to write")
        if repo is not None and repo.private and not authorised:
            raise HubError(401, "Repository not found", "RepoNotFound")

    # -- routing --------------------------------------------------------------------------------------

    def _route(self, parts: list[str]) -> None:
        method, hub = self.command, self.hub
        sent = self._sent_token()
        if sent is not None and hub.token is not None and sent != hub.token:
            # Like the Hub: a wrong token is refused outright, before looking at what was asked for.
            raise HubError(401, "Invalid credentials in Authorization header")
        if parts[:2] == ["api", "whoami-v2"] and method == "GET":
            if sent is None:
                raise HubError(401, "Invalid credentials in Authorization header")
            return self._send(
                200,
                {
                    "type": "user",
                    "name": hub.user,
                    "orgs": [{"name": org, "roleInOrg": "write"} for org in hub.orgs],
                    "auth": {
                        "type": "access_token",
                        "accessToken": {"displayName": "test", "role": hub.token_role},
                    },
                },
            )
        if parts[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._send(200, {"errors": [], "warnings": []})
        if parts[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo()
        if parts[0] == "api" and len(parts) >= 4 and parts[1] in _TYPES:
            repo_type, repo_id, rest = _TYPES[parts[1]], f"{parts[2]}/{parts[3]}", parts[4:]
            with hub._lock:
                repo = hub._repo(repo_type, repo_id)
                self._token_ok(repo, write=bool(rest) and rest[0] in ("preupload", "commit"))
                if not rest and method == "GET":
                    return self._info(repo_type, repo_id, "main")
                action, revision, tail = rest[0], rest[1] if len(rest) > 1 else "main", "/".join(rest[2:])
                if action == "revision" and method == "GET":
                    return self._info(repo_type, repo_id, revision)
                if action == "tree" and method == "GET":
                    return self._tree(repo_type, repo_id, revision, tail)
                if action == "paths-info" and method == "POST":
                    return self._paths_info(repo_type, repo_id, revision)
                if action == "preupload" and method == "POST":
                    return self._preupload(repo_type, repo_id, revision)
                if action == "commit" and method == "POST":
                    return self._commit(repo_type, repo_id, revision)
        repo_type = "dataset" if parts[0] == "datasets" else "model"
        offset = 1 if parts[0] == "datasets" else 0
        if len(parts) >= offset + 5 and parts[offset + 2] == "resolve" and method in ("GET", "HEAD"):
            repo_id = f"{parts[offset]}/{parts[offset + 1]}"
            with hub._lock:
                self._token_ok(hub._repo(repo_type, repo_id))
                return self._resolve(repo_type, repo_id, parts[offset + 3], "/".join(parts[offset + 4 :]))
        raise HubError(404, f"no route for {method} {self.path}")

    def _info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo, sha = self.hub._resolve(repo_type, repo_id, revision)
        tree = repo.trees[sha]
        blobs = "blobs=" in self.query.lower()
        siblings = [
            {"rfilename": p, **({"size": self.hub._file_entry(p, o)["size"], "blobId": o} if blobs else {})}
            for p, o in sorted(tree.items())
        ]
        owner = repo_id.split("/")[0]
        self._send(
            200, {"id": repo_id, "author": owner, "sha": sha, "private": repo.private, "siblings": siblings}
        )

    def _tree(self, repo_type: str, repo_id: str, revision: str, folder: str) -> None:
        repo, sha = self.hub._resolve(repo_type, repo_id, revision)
        tree = repo.trees[sha]
        params = parse_qs(self.query)
        if folder and not any(p.startswith(f"{folder}/") for p in tree):
            raise HubError(404, f"{folder} not found", "EntryNotFound")
        recursive = params.get("recursive", ["false"])[0].lower() == "true"
        entries = self.hub._entries(tree, folder, recursive)
        start = int(params.get("cursor", ["0"])[0])
        page = entries[start : start + self.hub.page_size]
        headers = {}
        if start + self.hub.page_size < len(entries):
            kept = "&".join(f"{k}={quote(v[0])}" for k, v in params.items() if k != "cursor")
            link = f"http://{self.headers['Host']}{self.path.partition('?')[0]}?{kept}&cursor={start + self.hub.page_size}"
            headers["Link"] = f'<{link}>; rel="next"'
        self._send(200, page, headers)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo, sha = self.hub._resolve(repo_type, repo_id, revision)
        tree = repo.trees[sha]
        found = []
        for path in parse_qs(self.body.decode()).get("paths", []):
            path = path.strip("/")
            if path in tree:
                found.append(self.hub._file_entry(path, tree[path]))
            elif any(p.startswith(f"{path}/") for p in tree):
                found.append({"type": "directory", "oid": blob_oid(path.encode()), "size": 0, "path": path})
        self._send(200, found)

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo, sha = self.hub._resolve(repo_type, repo_id, revision)
        oid = repo.trees[sha].get(path)
        if oid is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        data = (self.hub.root / "blobs" / oid).read_bytes()
        headers = {"X-Repo-Commit": sha, "ETag": f'"{oid}"', "Accept-Ranges": "bytes"}
        headers["Content-Type"] = "application/octet-stream"
        status, total = 200, len(data)
        wanted = self.headers.get("Range", "")
        if wanted.startswith("bytes="):
            first, _, last = wanted[6:].partition("-")
            begin, end = int(first or 0), int(last) if last else total - 1
            data = data[begin : end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {begin}-{begin + len(data) - 1}/{total}"
        headers["Content-Length"] = str(len(data))
        self._send(status, None, headers, raw=data)

    def _create_repo(self) -> None:
        self._token_ok(write=True)
        spec = json.loads(self.body or b"{}")
        repo_type = spec.get("type") or "model"
        repo_id = f"{spec['organization']}/{spec['name']}" if spec.get("organization") else spec["name"]
        private = spec.get("visibility") == "private" or bool(spec.get("private"))
        url = f"http://{self.headers['Host']}/{_URL_PREFIX[repo_type]}{repo_id}"
        if not self.hub.create_repo(repo_id, repo_type, private):
            return self._send(409, {"error": "You already created this repo", "url": url})
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo, sha = self.hub._resolve(repo_type, repo_id, revision)
        files = json.loads(self.body)["files"]
        answer = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": repo.trees[sha].get(f["path"]),
            }
            for f in files
        ]
        self._send(200, {"files": answer, "commitOid": sha})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        _, head = self.hub._resolve(repo_type, repo_id, revision)
        if "create_pr=1" in self.query:
            raise HubError(400, "pull requests are not supported by this test server")
        add: dict[str, bytes] = {}
        delete: list[str] = []
        message = ""
        for line in self.body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary", "")
                if value.get("parentCommit") and value["parentCommit"] != head:
                    raise HubError(412, "A commit has happened since the parent commit")
            elif key == "file":
                add[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                delete.append(value["path"].rstrip("/"))
            elif key == "deletedFolder":
                delete.append(value["path"].rstrip("/") + "/")
            else:
                raise HubError(400, f"unsupported commit operation {key!r}")
        sha = self.hub.commit(repo_id, repo_type, add, delete, branch=revision, message=message)
        url = f"http://{self.headers['Host']}/{_URL_PREFIX[repo_type]}{repo_id}/commit/{sha}"
        self._send(200, {"success": True, "commitOid": sha, "commitUrl": url, "hookOutput": ""})
