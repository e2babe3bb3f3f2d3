"""Reading a request, for every API: the body as checked JSON, and values made safe for a log line."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from . import protocol as P
from .api_errors import ApiError


def safe(value: Any) -> str:
    """A value for one log line: control characters escaped, so a request cannot forge lines."""
    return str(value).encode("unicode_escape", "backslashreplace").decode("ascii")[:300]


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a checked JSON object: 413 past ``limit`` bytes, 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"Request body of {declared} bytes is larger than the limit of {limit}.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"Request body is larger than the limit of {limit} bytes.")
        chunks.append(chunk)
    return P.parse_body(b"".join(chunks))
