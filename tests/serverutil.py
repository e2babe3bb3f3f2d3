"""A real `ggufrun serve` subprocess on a free loopback port, for tests and benchmarks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Where server logs go: tests/conftest.py points it into pytest's own temporary folder (where a run
# that was killed before it could clean up leaves them to pytest's rotation); None: the system's.
LOG_DIR: Path | None = None


def post_json(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST ``body`` as JSON; the status and the decoded reply, an error status included."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A started server: ``url``, the process, its stderr log and helpers to stop it."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None, port: int | None = None,
                 command: list[str] | None = None) -> None:
        """Start ``ggufrun serve ARGS --port PORT``, or ``COMMAND ARGS --port PORT`` (llama-server, say).
        ``port=0`` lets the server pick one: ``wait_ready`` reads it from the start-up line."""
        self.port = free_port() if port is None else port
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = tempfile.NamedTemporaryFile(prefix="ggufrun-serve-", suffix=".log", delete=False, dir=LOG_DIR)
        base = command or [sys.executable, "-m", "ggufrun.cli.main", "serve"]
        cmd = [*base, *args, "--port", str(self.port)]
        full_env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
        try:
            self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
        except BaseException:
            _end(None, self.log_file)
            raise
        # close() ends both; a caller that forgets it still has them ended when this object goes, or at exit
        self._end = weakref.finalize(self, _end, self.proc, self.log_file)

    def log(self) -> str:
        return Path(self.log_file.name).read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Poll /health until it says ready; raise with the server's log when it dies or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if self.port == 0:
                import re

                found = re.search(r"Listening on http://127\.0\.0\.1:(\d+) ", self.log())
                if found is None:
                    time.sleep(0.1)
                    continue
                self.port = int(found.group(1))
                self.url = f"http://127.0.0.1:{self.port}"
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    body = json.loads(resp.read())
                    if body.get("status") in ("ready", "ok"):  # ggufrun serve, llama-server
                        return body
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> float:
        """Send ``sig`` and wait; return the seconds the process took to exit (killed past ``timeout``)."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return time.monotonic() - started

    def close(self) -> None:
        """Stop the server and remove its log."""
        try:
            self.stop()
        finally:
            self._end()


def _end(proc: subprocess.Popen[bytes] | None, log_file: Any) -> None:
    """Kill ``proc`` if it still runs; close and remove its log."""
    try:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    finally:
        log_file.close()
        Path(log_file.name).unlink(missing_ok=True)


@contextmanager
def serve(*args: str, env: dict[str, str] | None = None, ready_timeout: float = 60.0,
          command: list[str] | None = None, port: int | None = None) -> Iterator[ServerProcess]:
    """``with serve(str(model), "--parallel", "4") as srv: ...`` -- started, ready, stopped after."""
    server = ServerProcess(list(args), env=env, command=command, port=port)
    try:
        server.wait_ready(ready_timeout)
        yield server
    finally:
        server.close()
