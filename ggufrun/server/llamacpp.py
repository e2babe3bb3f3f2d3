"""llama-server's token routes: ``POST /tokenize``, ``/detokenize`` and ``/apply-template``,
with the same fields and answers, plus an optional ``model`` (ggufrun serves several).
Errors are in the OpenAI shape, as llama-server's are."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import limits
from .core import backend_for, chat_prompt
from .protocol import ApiError
from .request import read_json

if TYPE_CHECKING:
    from .core import Server


def _invalid(param: str, message: str) -> ApiError:
    return ApiError(400, f"Invalid '{param}': {message}", param=param)


def _fields(body: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise _invalid(unknown[0], f"unknown field (known: {', '.join(sorted(known))}).")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise _invalid("model", "expected a string.")


def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise _invalid(key, "expected true or false.")
    return value


def _piece(data: bytes) -> str | list[int]:
    """A token's text, or its bytes when they are not valid UTF-8 alone (as llama-server answers)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return list(data)


def routes(server: Server) -> list[Route]:
    limit = server.config.max_body_bytes

    async def tokenize(request: Request) -> Response:
        body = await read_json(request, limit)
        _fields(body, {"model", "content", "add_special", "parse_special", "with_pieces"})
        content = body.get("content")
        if not isinstance(content, str):
            raise _invalid("content", "expected a string.")
        add_special = _flag(body, "add_special", False)
        parse_special = _flag(body, "parse_special", True)
        with_pieces = _flag(body, "with_pieces", False)
        async with backend_for(server, body.get("model")) as (backend, _):
            model = backend.model
            limits.check_text_size([content], "content")

            def run() -> list[Any]:  # off the event loop: special-token strings are slow to find
                tokens = model.tokenize(content, add_special=add_special, parse_special=parse_special) if content else []
                if not with_pieces:
                    return tokens
                return [{"id": t, "piece": _piece(model.token_bytes(t, special=True))} for t in tokens]

            return JSONResponse({"tokens": await asyncio.to_thread(run)})

    async def detokenize(request: Request) -> Response:
        body = await read_json(request, limit)
        _fields(body, {"model", "tokens"})
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise _invalid("tokens", "expected a list of token ids.")
        async with backend_for(server, body.get("model")) as (backend, _):
            model = backend.model
            bad = next((t for t in tokens if not 0 <= t < model.n_vocab), None)
            if bad is not None:
                raise _invalid("tokens", f"token id {bad} is outside the vocabulary of {model.n_vocab}.")
            return JSONResponse({"content": model.detokenize(tokens, special=True)})

    async def apply_template(request: Request) -> Response:
        body = await read_json(request, limit)
        _fields(body, {"model", "messages", "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs", "reasoning_effort"})
        prompt, _ = await chat_prompt(server, body)
        return JSONResponse({"prompt": prompt})

    return [Route("/tokenize", tokenize, methods=["POST"]), Route("/detokenize", detokenize, methods=["POST"]),
            Route("/apply-template", apply_template, methods=["POST"])]
