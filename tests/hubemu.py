"""A Hugging Face + ModelScope hub emulation: real threaded HTTP servers on 127.0.0.1.

It serves the routes the real client libraries call (see /work/shared/reference/hubs.md):

Hugging Face (``HF_ENDPOINT`` = ``emu.url``)
  HEAD/GET /{owner}/{repo}/resolve/{rev}/{path}  -> 302 to the CDN (a second port, as the real hub's
      cdn-lfs is another origin) with X-Repo-Commit, X-Linked-Etag (sha256) and X-Linked-Size
  GET      /api/models/{owner}/{repo}/tree/{rev}  -> the tree listing with lfs.oid
  GET      {cdn}/cdn/{owner}/{repo}/{path}        -> the body, Range supported
ModelScope (``endpoint`` = ``emu.url``)
  GET /api/v1/models/{owner}/{repo}/revisions
  GET /api/v1/models/{owner}/{repo}/repo/files?Revision=..&Recursive=..  -> Data.Files[] with Sha256
  GET /api/v1/models/{owner}/{repo}/repo?Revision=..&FilePath=..         -> the body, Range supported

Faults, per file or per hub: cut a transfer after N bytes (the connection is closed mid-body),
serve a corrupted body of the same size, answer every request of a hub with a status (``down``),
and slow the body down (to make two downloads overlap). Every request is logged.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHUNK = 16 * 1024


@dataclass
class Request:
    hub: str  # "hf" | "ms" | "cdn"
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Fault:
    cut_after: int | None = None  # close the connection after this many body bytes ...
    cuts: int = 0  # ... this many times
    corrupt: bool = False  # flip one byte in the middle (same size, wrong sha256)
    delay: float = 0.0  # seconds to sleep per CHUNK of body


@dataclass
class HubEmu:
    """Owns two servers (hub and CDN). Use as a context manager; ``url`` is the endpoint."""

    files: dict[tuple[str, str, str], bytes] = field(default_factory=dict)  # (hub, repo, path) -> body
    faults: dict[tuple[str, str, str], Fault] = field(default_factory=dict)
    down: dict[str, int] = field(default_factory=dict)  # hub -> status answered to everything
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._hub = _Server(self, "hub")
        self._cdn = _Server(self, "cdn")

    @property
    def url(self) -> str:
        return self._hub.url

    @property
    def cdn_url(self) -> str:
        return self._cdn.url

    def add(self, hub: str, repo: str, path: str, data: bytes) -> str:
        """Publish ``data`` as ``path`` in ``repo`` on ``hub`` ("hf" or "ms"); returns its sha256."""
        self.files[(hub, repo, path)] = data
        return hashlib.sha256(data).hexdigest()

    def fault(self, hub: str, repo: str, path: str, **kwargs: Any) -> Fault:
        fault = Fault(**kwargs)
        self.faults[(hub, repo, path)] = fault
        return fault

    def seen(self, hub: str | None = None, method: str | None = None, contains: str = "") -> list[Request]:
        with self._lock:
            return [r for r in self.requests if (hub is None or r.hub == hub) and (method is None or r.method == method)
                    and contains in r.path]

    def body_requests(self, path: str) -> list[Request]:
        """GETs that transfer the body of ``path`` (from the CDN or ModelScope's repo route), header
        reads (a closed range, ``bytes=0-N``) left out."""
        return [r for r in self._gets(path) if not _closed_range(r)]

    def header_reads(self, path: str) -> list[Request]:
        """Closed-range GETs of ``path`` (``bytes=A-B``): reading the header, not downloading."""
        return [r for r in self._gets(path) if _closed_range(r)]

    def header_bytes(self, path: str) -> int:
        """Bytes asked for by the header reads of ``path`` (each range's length)."""
        total = 0
        for r in self.header_reads(path):
            first, _, last = r.headers.get("Range", "")[6:].partition("-")
            total += int(last) - int(first) + 1
        return total

    def _gets(self, path: str) -> list[Request]:
        from urllib.parse import quote

        return [r for r in self.seen(method="GET") if r.hub in ("cdn", "ms")
                and (r.path.endswith(path) or r.path.endswith(quote(path, safe="")) or f"FilePath={quote(path, safe='')}" in r.path
                     or f"FilePath={path}" in r.path)]

    def _log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _take_cut(self, key: tuple[str, str, str]) -> int | None:
        with self._lock:
            fault = self.faults.get(key)
            if fault is None or fault.cut_after is None or fault.cuts <= 0:
                return None
            fault.cuts -= 1
            return fault.cut_after

    def __enter__(self) -> "HubEmu":
        self._hub.start()
        self._cdn.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hub.stop()
        self._cdn.stop()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-answer (a hub library giving up after a 500) is no fault of the
        # emulator; socketserver would print its traceback into the stderr a test reads.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Server:
    def __init__(self, emu: HubEmu, role: str) -> None:
        handler = type("Handler", (_Handler,), {"emu": emu, "role": role})
        self.httpd = _QuietServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    emu: HubEmu
    role: str  # "hub" | "cdn"
    method = "GET"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_GET(self) -> None:
        self._route("GET")

    # -- routing -----------------------------------------------------------------------------
    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/") if p]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        hub = "cdn" if self.role == "cdn" else "ms" if url.path.startswith("/api/v1/") else "hf"
        self.method = method
        self.emu._log(Request(hub, method, self.path, dict(self.headers.items())))
        status = self.emu.down.get("hf" if hub == "cdn" else hub)
        if status:
            return self._json(status, {"Code": status, "Message": "emulated outage", "error": "emulated outage"})
        if hub == "cdn" and len(parts) >= 4 and parts[0] == "cdn":
            return self._body(("hf", f"{parts[1]}/{parts[2]}", "/".join(parts[3:])), method)
        if hub == "ms" and len(parts) >= 6 and parts[:3] == ["api", "v1", "models"]:
            return self._modelscope(f"{parts[3]}/{parts[4]}", parts[5:], query, method)
        if hub == "hf" and len(parts) >= 5 and parts[2] == "resolve":
            return self._hf_resolve(f"{parts[0]}/{parts[1]}", "/".join(parts[4:]), method)
        if hub == "hf" and len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "tree":
            return self._hf_tree(f"{parts[2]}/{parts[3]}")
        self._json(404, {"error": f"no route {url.path}"})

    def _has_repo(self, hub: str, repo: str) -> bool:
        return any(h == hub and r == repo for h, r, _ in self.emu.files)

    # -- Hugging Face ------------------------------------------------------------------------
    def _hf_resolve(self, repo: str, path: str, method: str) -> None:
        if not self._has_repo("hf", repo):
            return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        data = self.emu.files.get(("hf", repo, path))
        if data is None:
            return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
        sha = hashlib.sha256(data).hexdigest()
        self._send(302, b"", {
            "Location": f"{self.emu.cdn_url}/cdn/{repo}/{path}",
            "X-Repo-Commit": COMMIT,
            "X-Linked-Etag": f'"{sha}"',
            "X-Linked-Size": str(len(data)),
            "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
        }, method)

    def _hf_tree(self, repo: str) -> None:
        listing = [{"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest(),
                    "lfs": {"oid": hashlib.sha256(d).hexdigest(), "size": len(d), "pointerSize": 134}}
                   for (h, r, p), d in self.emu.files.items() if h == "hf" and r == repo]
        if not listing:
            return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        self._json(200, listing)

    # -- ModelScope --------------------------------------------------------------------------
    def _modelscope(self, repo: str, rest: list[str], query: dict[str, str], method: str) -> None:
        if not self._has_repo("ms", repo):
            return self._json(404, {"Code": 10010205001, "Message": "model not found", "Success": False})
        if rest == ["revisions"]:
            return self._json(200, {"Code": 200, "Success": True, "Data": {"RevisionMap": {
                "Branches": [{"Revision": "master"}], "Tags": []}}})
        if rest == ["repo", "files"]:
            files = [{"Path": p, "Name": p.rsplit("/", 1)[-1], "Type": "blob", "Size": len(d),
                      "Sha256": hashlib.sha256(d).hexdigest(), "IsLFS": True, "Revision": COMMIT}
                     for (h, r, p), d in self.emu.files.items() if h == "ms" and r == repo]
            return self._json(200, {"Code": 200, "Success": True, "Data": {"Files": files}})
        if rest == ["repo"]:
            key = ("ms", repo, query.get("FilePath", ""))
            if key not in self.emu.files:
                return self._json(404, {"Code": 10010205001, "Message": "file not found", "Success": False})
            return self._body(key, method)
        self._json(404, {"Code": 404, "Message": "no such route", "Success": False})

    # -- bodies, with Range and faults ---------------------------------------------------------
    def _body(self, key: tuple[str, str, str], method: str) -> None:
        data = self.emu.files.get(key)
        if data is None:
            return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
        fault = self.emu.faults.get(key, Fault())
        if fault.corrupt:
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:]
        status, start, end = 200, 0, len(data) - 1
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        rng = self.headers.get("Range", "")
        if rng.startswith("bytes="):
            first, _, last = rng[6:].partition("-")
            start = int(first or 0)
            end = min(int(last), len(data) - 1) if last else len(data) - 1
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, method)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        part = data[start:end + 1]
        # A cut is spent on a transfer, not on a closed-range read of the header (bytes=0-N).
        cut = self.emu._take_cut(key) if method == "GET" and not (rng.startswith("bytes=") and last) else None
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(part))}.items():
            self.send_header(name, value)
        self.end_headers()
        if method == "HEAD":
            return
        limit = len(part) if cut is None else min(cut, len(part))
        try:
            for offset in range(0, limit, CHUNK):
                self.wfile.write(part[offset:min(offset + CHUNK, limit)])
                if fault.delay:
                    self.wfile.flush()
                    time.sleep(fault.delay)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        if cut is not None:  # drop the connection mid-body, as a flaky network does
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})}, self.method)

    def _send(self, status: int, body: bytes, headers: dict[str, str], method: str) -> None:
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD" and body:
            self.wfile.write(body)


def _closed_range(r: Request) -> bool:
    rng = r.headers.get("Range", "")
    return rng.startswith("bytes=") and not rng.endswith("-")


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
