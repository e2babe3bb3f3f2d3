"""What the Anthropic, Ollama and Responses translations share.

Each of those APIs turns its request into an OpenAI chat request body and hands it to
``Server.start_chat``, the server's one chat pipeline; the OpenAI results (a ``chat.completion``
object, or ``chat.completion.chunk`` objects) are then dressed in that API's shapes. This module
holds the pieces they have in common: which OpenAI fields the pipeline honours (so a translated
field it would ignore is refused instead), error conversion, and the streaming response.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from . import protocol as P
from .api_errors import ApiError, api_error
from .replies import Choices
from .request import read_json
from .streaming import EventStream, JobGroup, collect

if TYPE_CHECKING:
    from .core import Server
    from .protocol import GenParams

log = logging.getLogger("ggufrun.server")


@dataclass
class ChatRun:
    """A submitted chat completion: what ``Server.start_chat`` returns, with the two ways to read it."""

    group: JobGroup
    params: GenParams
    choices: Choices

    def chunks(self) -> AsyncIterator[dict[str, Any]]:
        """OpenAI ``chat.completion.chunk`` objects (``streamed`` bodies end with a usage chunk)."""
        return self.choices.chunks(self.group)

    async def whole(self, request: Request) -> dict[str, Any] | None:
        """The OpenAI ``chat.completion`` object; None (jobs cancelled) if the client left."""
        results = await collect(request, self.group)
        return None if results is None else self.choices.whole(results)


async def start_chat(server: Server, body: dict[str, Any], endpoint: str, n_ctx: int | None = None) -> ChatRun:
    """Submit a translated OpenAI chat body through the server's one chat pipeline (``n_ctx``: a
    smaller context for this request, Ollama's num_ctx)."""
    return ChatRun(*await server.start_chat(body, endpoint, n_ctx))


def supports(field: str) -> bool:
    """Whether the chat pipeline honours the OpenAI field ``field`` (protocol.py's list)."""
    return field in P.CHAT_FIELDS


class Refused(Exception):
    """A request field this API cannot honour: a 400 in the API's own error shape."""

    def __init__(self, param: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.message, self.status = param, message, status


def require(body: dict[str, Any], names: dict[str, str]) -> None:
    """Refuse the first OpenAI field of ``body`` the pipeline would ignore, naming it as the
    client spelled it (``names`` maps OpenAI field -> the client's field)."""
    for key in body:
        if not supports(key):
            param = names.get(key, key)
            raise Refused(param, f"'{param}' is not supported by this server yet.")


def as_error(exc: BaseException, names: dict[str, str] | None = None) -> tuple[int, str, str, str | None]:
    """(status, kind, message, param) for any error, with validation errors as 400 (api_error maps
    them); ``names`` renames the chat pipeline's field to the client's spelling, in the message
    and the param."""
    if isinstance(exc, Refused):
        return exc.status, "invalid_request_error", exc.message, exc.param
    error = api_error(exc)
    message, param = error.message, error.param
    # a path inside a renamed field (a schema keyword's, say) keeps its tail: the longest prefix wins
    prefix = max((k for k in names or () if (error.param or "").startswith((f"{k}.", f"{k}["))), key=len, default=None)
    if names and prefix is not None and error.param not in names:
        names = {error.param: names[prefix] + error.param[len(prefix):]}  # type: ignore[dict-item,index]
    if names and error.param in names:
        param = names[error.param]
        message = message.replace(f"'{error.param}'", f"'{param}'")
        if f"'{param}'" not in message:
            message = f"{message.rstrip('.')} (field '{param}')."
    return error.status, error.kind, message, param


Handler = Callable[[Request], Awaitable[Response]]


def guarded(render: Callable[[int, str, str, str | None], dict[str, Any]],
            names: dict[str, str] | None = None) -> Callable[[Handler], Handler]:
    """Wrap a handler so that any error answers in its API's error shape (``render(status, kind,
    message, param)``) instead of the OpenAI shape the app's exception handlers write."""

    def wrap(handler: Handler) -> Handler:
        async def guarded_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except ClientDisconnect:
                raise  # the app's handler logs it; nobody is left to read an error
            except Exception as exc:  # noqa: BLE001 (this is the API's error boundary)
                status, kind, message, param = as_error(exc, names)
                if status >= 500 and not isinstance(exc, (ApiError, Refused)):
                    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
                headers = api_error(exc).headers if not isinstance(exc, Refused) else {}
                return JSONResponse(render(status, kind, message, param), status_code=status, headers=headers)

        return guarded_handler

    return wrap


async def body_of(server: Server, request: Request) -> dict[str, Any]:
    return await read_json(request, server.config.max_body_bytes)


def stream(run: ChatRun, chunks: AsyncIterator[bytes], media_type: str) -> Response:
    """A streamed reply that cancels the generation when the client goes away."""
    return EventStream(run.group, chunks, media_type)  # type: ignore[return-value]


def streamed(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` asking for the usage chunk at the end of a stream, which every translation reports."""
    return {**body, "stream_options": {"include_usage": True}} if body.get("stream") else body


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event with a name, as Anthropic and the Responses API send them."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


def ndjson(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def chunk_error(chunk: dict[str, Any]) -> tuple[int, str, str] | None:
    """(status, kind, message) when an OpenAI stream chunk is an error object."""
    error = chunk.get("error")
    if not isinstance(error, dict):
        return None
    return int(error.get("code") or 500), str(error.get("type") or "server_error"), str(error.get("message") or "error")


def choice_of(chunk: dict[str, Any]) -> dict[str, Any] | None:
    choices = chunk.get("choices") or []
    return choices[0] if choices else None


def tool_arguments(text: str, where: str, cut: bool = False) -> Any:
    """A tool call's JSON arguments as an object (Anthropic and Ollama carry objects, not strings);
    ``cut``: the reply stopped at max_tokens inside them, so they are read as far as they go."""
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError:
        if cut:
            return partial_object(text)
        raise ApiError(500, f"The model's {where} arguments are not valid JSON.", kind="server_error") from None


def partial_object(text: str) -> dict[str, Any]:
    """The object that JSON cut short holds so far: open arrays and objects closed, a member whose
    value (a string among them) is not whole dropped. The Anthropic SDK reads a stream's cut
    input_json_delta the same way (jiter's partial mode), so a cut tool_use has one input streamed or not."""
    closers: list[str] = []  # what closes each open container or string, innermost last
    ends: list[tuple[int, list[str]]] = []  # where a complete value ends, and the closers there
    in_string = escape = False
    for i, ch in enumerate(text):
        if in_string:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_string = False
                closers.pop()
                ends.append((i + 1, list(closers)))
            continue
        if ch == '"':
            in_string = True
            closers.append('"')
        elif ch in "{[":
            closers.append("}" if ch == "{" else "]")
            ends.append((i + 1, list(closers)))  # an empty container is a whole value
        elif ch in "}]" and closers:
            closers.pop()
            ends.append((i + 1, list(closers)))
        elif ch.isalnum() and (i + 1 == len(text) or not (text[i + 1].isalnum() or text[i + 1] in ".+-")):
            ends.append((i + 1, list(closers)))  # the end of a number, true, false or null
    for end, open_ in ends[-1:-257:-1]:  # the longest 256 only: each candidate is a copy of the text
        try:
            value = json.loads(text[:end] + "".join(reversed(open_)))
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def text_of(content: Any, where: str, part_types: tuple[str, ...] = ("text",)) -> str:
    """A string, or a list of text parts/blocks, as one string; anything else is refused."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for i, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") in part_types and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise Refused(f"{where}[{i}]", f"'{where}[{i}]': content of type {kind!r} is not supported (only text).")
            out.append(part["text"])
        return "".join(out)
    raise Refused(where, f"'{where}' must be a string or a list of text blocks.")
