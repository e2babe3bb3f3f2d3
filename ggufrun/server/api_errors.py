"""The error a client sees: :class:`ApiError` (status, message, the field at fault) and
:func:`api_error`, which turns any exception into one. Each API renders it in its own shape;
this is OpenAI's, which the server answers with where no API claims the path.

Below protocol.py and constraints.py (both raise these), so neither imports the other for them.
"""

from __future__ import annotations

import os
import re
from typing import Any

from ..errors import ContextOverflowError, GgufrunError


class ApiError(Exception):
    """A client error with its HTTP status and the request field at fault."""

    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status, **self.extra}}


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, f"Invalid '{param}': {message}", param=param)


def unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"'{param}' is not supported by this server: {why}", param=param, kind="invalid_request_error")


def api_error(exc: BaseException) -> ApiError:
    """Any error as the ApiError a client sees; unknown ones become a 500 with no internals, and no
    message names a filesystem path (:func:`scrub_paths`)."""
    error = _api_error(exc)
    message = scrub_paths(error.message)
    if message == error.message:
        return error
    return ApiError(error.status, message, param=error.param, kind=error.kind, headers=error.headers, extra=error.extra)


def _api_error(exc: BaseException) -> ApiError:
    from .engine import QueueFullError

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFullError):
        return ApiError(503, str(exc), kind="server_overloaded", headers={"Retry-After": "1"})
    if isinstance(exc, ContextOverflowError):
        if not exc.n_ctx:  # the shared KV cache ran out mid-batch: capacity, not the request's fault
            return ApiError(503, f"{exc} The server is at capacity; retry shortly.", kind="server_overloaded",
                            headers={"Retry-After": "1"})
        return ApiError(400, str(exc), kind="exceed_context_size_error", extra={"n_prompt_tokens": exc.n_tokens, "n_ctx": exc.n_ctx})
    if isinstance(exc, GgufrunError):
        status = 400 if exc.http_status == 422 else exc.http_status
        kinds = {404: "not_found_error", 503: "server_unavailable"}
        param = getattr(exc, "param", None) or ("model" if status == 404 else None)
        return ApiError(status, str(exc), param=param,
                        kind=kinds.get(status, "invalid_request_error" if status < 500 else "server_error"),
                        headers={"Retry-After": "1"} if status == 503 else None)
    return ApiError(500, "Internal server error. Set GGUFRUN_DEBUG=1 and see the server log.", kind="server_error")


_PATHISH = re.compile(r"(?:[A-Za-z]:)?[\\/][^\s'\"`,;()<>\[\]{}]+")


def _on_disk(path: str) -> bool:
    """Whether ``path`` lies under a directory that exists (other than the root): a file path,
    not a route such as /v1/chat/completions."""
    head = os.path.dirname(path)
    while head and os.path.dirname(head) != head:
        if os.path.isdir(head):
            return True
        head = os.path.dirname(head)
    return False


def scrub_paths(text: str) -> str:
    """``text`` with every absolute filesystem path cut to its last part: an error a client
    reads must not tell it where the server keeps its files (the server log keeps them)."""
    if "/" not in text and "\\" not in text:
        return text

    def repl(match: re.Match[str]) -> str:
        raw = match.group(0)
        path = raw.rstrip(".:")
        if not _on_disk(path):
            return raw
        return os.path.basename(path.rstrip("/\\")) + raw[len(path):]

    return _PATHISH.sub(repl, text)
