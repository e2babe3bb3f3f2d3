"""A tiny real OpenAI-compatible SSE server on 127.0.0.1 for the load generator's tests.

It streams ``max_tokens`` words with a fixed delay between them, over HTTP/1.1 chunked
encoding with keep-alive, as llama-server does. ``fail_every`` makes every N-th request a 500.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "SSEServer"

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        n = self.server.count(body)
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
            return self._plain(404, b'{"error": "not found"}')
        if self.server.fail_every and n % self.server.fail_every == 0:
            return self._plain(500, b'{"error": {"message": "boom"}}')
        chat = self.path.endswith("chat/completions")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for event in self._events(body, chat):
            data = f"data: {event}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def _events(self, body: dict, chat: bool) -> Iterator[str]:
        for i in range(int(body.get("max_tokens", 16))):
            time.sleep(self.server.delay)
            word = f" w{i}"
            choice = {"index": 0, "delta": {"content": word}} if chat else {"index": 0, "text": word}
            yield json.dumps({"model": body.get("model"), "choices": [choice]})
        yield "[DONE]"

    def _plain(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class SSEServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, delay: float = 0.002, fail_every: int = 0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.delay = delay
        self.fail_every = fail_every
        self._n = 0
        self.bodies: list[dict] = []  # every request body received, in order
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def count(self, body: dict) -> int:
        with self._lock:
            self.bodies.append(body)
            self._n += 1
            return self._n

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> "SSEServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
