"""Bounded loopback socket floods against a server, for tests and bench/soak.py."""

from __future__ import annotations

import socket
import time
import urllib.request


def open_idle(host: str, port: int, n: int) -> list[socket.socket]:
    """``n`` connections that never send a byte (half-open from the server's point of view)."""
    out = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect((host, port))
        except BlockingIOError:
            pass
        out.append(s)
    return out


def trickle(socks: list[socket.socket], data: bytes = b"X-Slow: 1\r\n") -> int:
    """Send ``data`` (by default one more header line of a request that never ends: a slowloris client,
    valid to every HTTP parser) on every socket still open; return how many were still open."""
    alive = 0
    for s in socks:
        try:
            s.send(data)
            alive += 1
        except OSError:
            pass
    return alive


def closed_by_server(socks: list[socket.socket]) -> int:
    """How many of ``socks`` the server has closed (a read reaches EOF or an error), reading past
    whatever it answered first (an error status, before it closes)."""
    n = 0
    for s in socks:
        try:
            while s.recv(4096):
                pass
            n += 1
        except BlockingIOError:
            pass
        except OSError:
            n += 1
    return n


def health_latency(url: str, timeout: float = 5.0) -> float:
    """Seconds one GET /health took (raises on failure or timeout)."""
    t0 = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=max(timeout - (time.monotonic() - t0), 0.1)) as resp:
                resp.read()
                assert resp.status == 200
            return time.monotonic() - t0
        except ConnectionResetError:
            # Past the connection cap the server closes the longest-idle sockets; one accepted but not
            # yet read during a flood can be among them. A client retries; the deadline still holds.
            if time.monotonic() - t0 >= timeout:
                raise


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()
