"""What wraps every route: the access log and request counters, the API key check, and the
error handler for what no API's own boundary caught (unknown routes and methods, a client that
left, any uncaught error). Errors render through the ``shape`` the app passes in, which knows
which API a path belongs to; nothing here knows any API.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import GgufrunError
from .api_errors import ApiError, api_error
from .metrics import Metrics
from .request import safe

log = logging.getLogger("ggufrun.server")

ErrorShape = Callable[[str, ApiError], dict[str, Any]]  # (path, error) -> the body in that path's API's shape


class AccessLog:
    """One log line per request on stderr, and the request counters for /metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: set[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"]
            client = scope.get("client") or ("-", 0)
            log.info('%s "%s %s" %d %.3fs', safe(client[0]), safe(scope["method"]), safe(path), status[0],
                     time.perf_counter() - started)
            self.metrics.request(path if path in self.routes else "other", status[0])


class BearerAuth:
    """With --api-key, every route but /health and the chat page needs ``Authorization: Bearer KEY``,
    or ``x-api-key: KEY`` as Anthropic's clients send it. The page itself holds nothing secret: it
    asks the user for the key and sends it with each call."""

    OPEN = frozenset({("GET", "/health"), ("GET", "/"), ("HEAD", "/")})

    def __init__(self, app: ASGIApp, api_key: str, shape: ErrorShape) -> None:
        self.app, self.shape = app, shape
        self.expected = f"Bearer {api_key}".encode()
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["method"], scope["path"]) not in self.OPEN and scope["method"] != "OPTIONS":
            headers = dict(scope["headers"])
            bearer = hmac.compare_digest(headers.get(b"authorization", b""), self.expected)
            if not (bearer or hmac.compare_digest(headers.get(b"x-api-key", b""), self.key)):
                message = "Missing or wrong API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'."
                body = self.shape(scope["path"], ApiError(401, message, kind="authentication_error"))
                response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def error_handler(shape: ErrorShape) -> Callable[[Request, Exception], Awaitable[Response]]:
    """The app's exception handler: any error as JSON in ``shape``, with its status and headers."""

    async def on_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, ClientDisconnect):
            log.info("client disconnected while sending the body of %s %s", request.method, safe(request.url.path))
            return Response(status_code=499)
        if isinstance(exc, HTTPException):  # unknown route (404) or method (405): JSON too
            kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
            message = f"No route {request.method} {safe(request.url.path)}." if exc.status_code in (404, 405) else str(exc.detail)
            error = ApiError(exc.status_code, message, kind=kind, headers=dict(exc.headers or {}))
        else:
            error = api_error(exc)
        # An ApiError was raised on purpose with its reason (a model that could not load, whose
        # failure the pool has logged in one line): only what nobody caught gets a traceback.
        if error.status >= 500 and not isinstance(exc, (GgufrunError, ApiError)):
            log.exception("unhandled error on %s %s", request.method, safe(request.url.path), exc_info=exc)
        return JSONResponse(shape(request.url.path, error), status_code=error.status, headers=error.headers)

    return on_error
