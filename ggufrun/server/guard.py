"""Connection-level limits that uvicorn lacks, so idle or trickling sockets cannot starve the server.

uvicorn's HTTP protocols have a keep-alive timeout between requests but no limit on how long a
client may take to send a request's headers or body, and no cap on open connections: 3,000
sockets that never send a byte, or 20,000 that send one byte every few seconds, each hold a
file descriptor and a protocol object forever, and /health stopped answering. Here:

* :func:`guarded_protocol`'s protocol closes a connection that has not completed a request's headers
  within ``HEADER_SECONDS`` (checked every half period, so between 1x and 1.5x), and, when more
  than ``MAX_CONNECTIONS`` are open, closes the longest-idle connection that is not in the
  middle of a request to make room for the new one;
* :class:`BodyGuard` (ASGI middleware) reads a request body within ``BODY_SECONDS`` and at most
  ``MAX_BODY_BYTES``, answering 408/413 in the API's error shape otherwise;
* :func:`raise_fd_limit` lifts the soft open-files limit to the hard one, so the cap, not EMFILE
  in accept(), decides which connections live.

Numbers are module constants (documented in the README's "Limits" paragraph).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Awaitable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("ggufrun.server")

HEADER_SECONDS = 10.0
BODY_SECONDS = 30.0
MAX_BODY_BYTES = 32 << 20
MAX_CONNECTIONS = 1024
KEEP_ALIVE_SECONDS = 5


def guarded_protocol() -> type:
    """uvicorn's HTTP protocol class with the header deadline and connection cap: httptools' (a C
    parser, uvicorn's own choice where installed), else h11's. Parsing requests and framing every
    streamed chunk run on the event loop and hold the GIL the engine thread needs between steps:
    on this tree's 2-core CI machine httptools took a 64-token stream's server CPU from 120 to 103 us
    a token. Built on demand: importing uvicorn pulls in click, which the core must not import."""
    Base: type
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # no httptools wheel for this platform: the pure-Python parser
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class GuardedProtocol(Base):  # type: ignore[misc,valid-type]
        """uvicorn's HTTP protocol with a header deadline and a cap on open connections."""

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._idle_since = self.loop.time()
            self._guard_timer = self.loop.call_later(HEADER_SECONDS / 2, self._check_progress)
            if len(self.connections) > MAX_CONNECTIONS:
                self._evict_idle()

        def connection_lost(self, exc: Exception | None) -> None:
            self._guard_timer.cancel()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            self._idle_since = self.loop.time()
            super().on_response_complete()

        def _busy(self) -> bool:
            """A request whose headers arrived and whose response is not finished: never cut."""
            return self.cycle is not None and not self.cycle.response_complete

        def _check_progress(self) -> None:
            if self.transport.is_closing():
                return
            if not self._busy() and self.loop.time() - self._idle_since >= HEADER_SECONDS:
                self.transport.close()  # no complete request headers in time: a slow or silent client
                return
            self._guard_timer = self.loop.call_later(HEADER_SECONDS / 2, self._check_progress)

        def _evict_idle(self) -> None:
            # Close the longest-idle tenth at once, so that a flood of new sockets costs one scan per
            # MAX_CONNECTIONS / 10 connections, not one per connection.
            live: list[Any] = [c for c in self.connections if not c.transport.is_closing()]
            if len(live) <= MAX_CONNECTIONS:
                return
            idle = sorted((c for c in live if c is not self and hasattr(c, "_idle_since") and not c._busy()),
                          key=lambda c: c._idle_since)
            if not idle:  # every connection is mid-request: refuse this one rather than exceed the cap
                self.transport.close()
                return
            for c in idle[: len(live) - MAX_CONNECTIONS * 9 // 10]:
                c.transport.close()

    return GuardedProtocol


def _error(status: int, message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()


async def _within(awaitable: Awaitable[Message], seconds: float) -> Message:
    """``asyncio.wait_for``, without the task it makes per call before Python 3.12 (every request
    body is read through here, on the event loop)."""
    import asyncio

    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


class BodyGuard:
    """Reads each HTTP request body up front, within a deadline and a size limit, then hands the
    app a replay of it (disconnects after the body still reach the app)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        import asyncio

        loop = asyncio.get_running_loop()
        deadline = loop.time() + BODY_SECONDS
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await _within(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                await self._reply(send, 408, f"The request body did not arrive within {BODY_SECONDS:g} s.",
                                  "timeout_error")
                return
            if message["type"] == "http.disconnect":  # the client left mid-body: nothing to answer
                from .request import safe

                log.info("client disconnected while sending the body of %s %s", scope.get("method"),
                         safe(scope.get("path", "")))
                return
            size += len(message.get("body", b""))
            if size > MAX_BODY_BYTES:
                await self._reply(send, 413, f"The request body is larger than {MAX_BODY_BYTES:,} bytes.",
                                  "invalid_request_error")
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _reply(send: Send, status: int, message: str, kind: str) -> None:
        body = _error(status, message, kind)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def raise_fd_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit (where the platform has one); return it."""
    try:
        import resource
    except ImportError:  # Windows
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft
