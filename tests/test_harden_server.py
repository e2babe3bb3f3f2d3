"""serve binds before it loads, and idle or trickling sockets cannot starve it (bounded loopback floods)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crafted import craft
from flood import close_all, closed_by_server, health_latency, open_idle, trickle
from serverutil import ROOT, free_port, serve


def _serve(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ggufrun.cli.main", "serve", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    return proc, time.monotonic() - t0


def test_the_guarded_protocol_is_httptools_where_installed() -> None:
    """serve parses HTTP with httptools (a dependency) under the guards; h11 only where it is missing.
    A broken import would fall back quietly and cost every request and streamed chunk more GIL."""
    pytest.importorskip("httptools")
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from ggufrun.server.guard import guarded_protocol

    protocol = guarded_protocol()
    assert issubclass(protocol, HttpToolsProtocol)
    assert {"connection_made", "connection_lost", "on_response_complete"} <= set(vars(protocol))


def test_port_in_use_fails_before_the_model_loads(tiny_model_factory, tmp_path: Path) -> None:
    # A file llama.cpp would abort on: the port error must come first, so the model is never opened.
    bad = craft(tiny_model_factory("qwen2", "f16", True), tmp_path / "bad.gguf", kv={"qwen2.block_count": 0})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, seconds = _serve(str(bad), "--port", str(port))
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"Cannot listen on 127.0.0.1:{port}" in lines[0] and "in use" in lines[0]
    assert seconds < 15


def test_unresolvable_host_fails_fast(tiny_model: Path) -> None:
    proc, seconds = _serve(str(tiny_model), "--host", "no-such-host.invalid", "--port", str(free_port()))
    assert proc.returncode == 1
    assert "does not resolve" in proc.stderr.strip().splitlines()[-1]
    assert seconds < 15


@pytest.mark.slow  # seconds of real waiting; the default suite stays under 90 s
def test_idle_and_trickling_sockets_do_not_stop_health(tiny_model: Path) -> None:
    from ggufrun.server.guard import MAX_CONNECTIONS

    with serve(str(tiny_model), "--threads", "1") as srv:
        idle = open_idle("127.0.0.1", srv.port, 3000)
        trickling = open_idle("127.0.0.1", srv.port, 1500)
        trickle(trickling, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # then a header line a round: never complete
        try:
            assert health_latency(srv.url, timeout=8) < 8  # served even while the burst is being accepted
            worst = 0.0
            for _ in range(4):  # a header line per trickling socket per round, /health answered each time
                trickle(trickling)
                worst = max(worst, health_latency(srv.url, timeout=5))
                time.sleep(0.5)
            assert worst < 1.0
            # beyond the cap the longest-idle connections were closed: the server holds at most MAX_CONNECTIONS
            assert closed_by_server(idle) + closed_by_server(trickling) >= 4500 - MAX_CONNECTIONS - 5
        finally:
            close_all(idle + trickling)


@pytest.mark.slow
def test_silent_connections_are_closed_and_slow_bodies_get_408(tiny_model: Path) -> None:
    from ggufrun.server.guard import BODY_SECONDS, HEADER_SECONDS

    with serve(str(tiny_model), "--threads", "1") as srv:
        silent = open_idle("127.0.0.1", srv.port, 50)
        slow = socket.create_connection(("127.0.0.1", srv.port))
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"messages\":")
        time.sleep(HEADER_SECONDS * 1.5 + 1)
        assert closed_by_server(silent) == 50
        slow.settimeout(BODY_SECONDS)
        reply = b""
        while chunk := slow.recv(4096):  # the server closes after its answer (headers and body may come apart)
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive" in reply
        close_all(silent + [slow])
