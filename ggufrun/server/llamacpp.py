"""llama-server's own routes, with its fields and answers plus an optional ``model`` (ggufrun
serves several; on a GET, ``?model=``): the token routes ``/tokenize``, ``/detokenize``,
``/apply-template``; ``/completion`` and ``/infill`` (native.py, fim.py); ``/props``; ``/slots``
with save / restore / erase (slots.py); ``/embedding``; ``/rerank`` and its aliases (rerank.py).
Each goes through the one engine of its model. Errors are in the OpenAI shape, as llama-server's are."""

from __future__ import annotations

import asyncio
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from .. import __version__

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import fim, limits, native, rerank, slots
from .api_errors import unsupported
from .core import backend_for, chat_prompt
from .engine import Backend
from .protocol import ApiError
from .request import read_json
from .streaming import EventStream, sse, unless_gone

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

    async def complete(request: Request, infill: bool) -> Response:
        body = await read_json(request, limit)
        req = native.parse_completion(body, request.url.path, infill=infill)
        params = req.params
        if infill:
            prefix = fim.check_mixed(body.get("input_prefix"), "input_prefix")
            suffix = fim.check_mixed(body.get("input_suffix"), "input_suffix")
            extra = fim.check_extra(body.get("input_extra"))
        cfg = server.lookup(params.model)
        params.slot = slots.check_id(server, cfg, req.id_slot, "id_slot")
        texts: list[str] = []

        def build(backend: Backend) -> list[list[int]]:
            model = backend.model
            params.logit_bias = native.bias_ids(model, req.bias)
            server.check_engine(params, {"grammar": "grammar" if body.get("grammar") else "json_schema", "logprobs": "n_probs"})
            if infill:
                specials = model.vocab_specials()
                fim.refuse_without_fim(cfg.id, specials, "input_prefix")
                middle = str(req.prompts[0][0])
                prompt = model.tokenize(middle, add_special=False, parse_special=True) if middle else []
                prompts = [fim.infill_tokens(model, specials, prefix, suffix, extra, prompt, n_batch=model.n_batch,
                                             n_predict=req.n_predict or -1, n_ctx=backend.n_ctx_seq)]
            else:
                prompts = [native.prompt_tokens(model, p) for p in req.prompts]
            texts[:] = [model.detokenize(t, special=True) for t in prompts]
            sampling = {**backend.settings.sampling(seed=True), **params.sampling}
            native.check_infill(req, sampling, model)
            req.settings = native.generation_settings(req, sampling, backend.n_ctx_seq, params.model or cfg.id,
                                                      backend.settings.max_tokens)
            return prompts

        group = await server.submit(params, cfg, build)
        replies = native.NativeReplies(req, group, params.model or cfg.id, texts)
        if params.stream:  # llama-server's native stream: one object an event, no [DONE]
            return EventStream(replies.group, (sse(obj) async for obj in replies.stream()))  # type: ignore[return-value]
        results = await unless_gone(request, replies.group, replies.whole())
        if results is None:
            return Response(status_code=499)
        return JSONResponse(results[0] if len(results) == 1 else results)

    async def completion(request: Request) -> Response:
        return await complete(request, False)

    async def infill(request: Request) -> Response:
        return await complete(request, True)

    async def props(request: Request) -> Response:
        if request.method == "POST":
            raise ApiError(501, "Changing the server's properties over HTTP is not supported (llama-server allows it only when started with its own props flag); restart ggufrun serve with other flags instead.",
                           kind="not_supported_error")
        async with backend_for(server, _query_model(request)) as (backend, cfg):
            defaults = native.NativeRequest(params=native.P.GenParams(model=None, stream=True), prompts=[])
            sampling = backend.settings.sampling(seed=True)
            settings = native.generation_settings(defaults, sampling, backend.n_ctx_seq, cfg.id, backend.settings.max_tokens)
            parallel = cfg.parallel or server.config.parallel
            return JSONResponse({
                "default_generation_settings": {"id": 0, "id_task": -1, "n_ctx": backend.n_ctx_seq, "speculative": False,
                                                "is_processing": False, "params": settings, "prompt": ""},
                "total_slots": parallel, "model_alias": cfg.id, "model_path": PurePath(str(backend.model.path)).name,
                "chat_template": backend.template.jinja_source or "", "modalities": {"vision": backend.vision is not None, "audio": False},
                "build_info": f"ggufrun {__version__}", "is_sleeping": False,
                "infill": not fim.missing(backend.model.vocab_specials()), "rerank": backend.model.ranks})

    async def list_slots(request: Request) -> Response:
        return JSONResponse(await slots.states(server, _query_model(request), request.query_params.get("fail_on_no_slot")))

    async def slot_action(request: Request) -> Response:
        empty = request.headers.get("content-length") in (None, "0") and "transfer-encoding" not in request.headers
        body = {} if empty else await read_json(request, limit)  # erase takes no body
        return JSONResponse(await slots.act(server, request.path_params["id_slot"], request.query_params.get("action"), body,
                                            _query_model(request)))

    async def embedding(request: Request) -> Response:
        body = await read_json(request, limit)
        _fields(body, {"model", "content", "input", "embd_normalize", "encoding_format"})
        if body.get("encoding_format") not in (None, "float"):
            raise unsupported("encoding_format", "the native route answers floats (base64 is /v1/embeddings').")
        key = "input" if body.get("input") is not None else "content"
        raw = body.get(key)

        def ids(value: Any) -> bool:
            return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)

        inputs = [raw] if isinstance(raw, str) or ids(raw) else raw
        if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) or ids(t) for t in inputs):
            raise _invalid(key, "expected a string, token ids, or a list of such.")
        if any(isinstance(t, str) and not t.strip() for t in inputs):
            raise _invalid(key, "expected non-empty text.")
        norm = body.get("embd_normalize", 2)
        if isinstance(norm, bool) or not isinstance(norm, int) or not -1 <= norm < 1 << 31:  # llama-server's int
            raise _invalid("embd_normalize", "expected -1 (none), 0 (max absolute), 1 (taxicab), 2 (Euclidean) or p > 2.")
        if norm == -1:
            raise unsupported("embd_normalize", "vectors come normalised from the engine; -1 (raw) cannot be honoured.")
        _, vectors, _ = await server.embed_texts(_body_model(body), inputs)
        return JSONResponse([{"index": i, "embedding": [rerank.renormalise(v, norm)]} for i, v in enumerate(vectors)])

    async def rerank_route(request: Request) -> Response:
        body = await read_json(request, limit)
        return JSONResponse(await rerank.rerank(server, body))

    return [Route("/tokenize", tokenize, methods=["POST"]), Route("/detokenize", detokenize, methods=["POST"]),
            Route("/apply-template", apply_template, methods=["POST"]),
            Route("/completion", completion, methods=["POST"]), Route("/completions", completion, methods=["POST"]),
            Route("/infill", infill, methods=["POST"]), Route("/props", props, methods=["GET", "POST"]),
            Route("/slots", list_slots, methods=["GET"]), Route("/slots/{id_slot}", slot_action, methods=["POST"]),
            Route("/embedding", embedding, methods=["POST"]), Route("/embeddings", embedding, methods=["POST"]),
            *(Route(path, rerank_route, methods=["POST"]) for path in ("/rerank", "/reranking", "/v1/rerank", "/v1/reranking"))]


def _body_model(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _invalid("model", "expected a string.")
    return model or None


def _query_model(request: Request) -> str | None:
    """``?model=`` on a GET (llama-server's router mode names the model so)."""
    return request.query_params.get("model") or None
