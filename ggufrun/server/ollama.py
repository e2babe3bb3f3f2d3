"""Ollama's API (``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/embeddings``, ``/api/tags``,
``/api/show``, ``/api/ps``, ``/api/version``, and the store: ``/api/pull``, ``/api/delete``,
``/api/copy``) over the server's OpenAI chat pipeline, so that the ``ollama`` package and Ollama
front-ends work against ggufrun. Replies stream as NDJSON (Ollama's default); errors are
``{"error": "..."}``. Durations are nanoseconds, as Ollama reports them. ``keep_alive`` and
``options.num_ctx`` are a model's lifecycle (lifecycle.py): how long it stays loaded, and a
request's context within the one it was loaded with.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import __version__
from ..errors import GgufrunError
from . import media
from .lifecycle import KeepAliveError, has_gpu, parse_keep_alive, request_context
from .protocol import ApiError
from .translate import (Refused, as_error, body_of, choice_of, chunk_error, guarded, ndjson, require, start_chat, stream,
                        streamed, supports, tool_arguments)

if TYPE_CHECKING:
    from ..gguf_info import GGUFInfo
    from ..settings import Settings
    from .core import Server
    from .translate import ChatRun
    from .models import ModelConfig

# Ollama clients compare /api/version against the Ollama release that added a feature; this
# is the release whose API (format schemas, tools, /api/embed) the routes below follow.
OLLAMA_API_VERSION = "0.12.0"
# Ollama's options that map onto OpenAI chat fields, and num_ctx (_residence); the rest (num_gpu,
# num_thread, mirostat, ...) are load-time or sampler settings ggufrun takes at `ggufrun serve`, so refused.
OPTIONS = {"num_predict": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
           "seed": "seed", "stop": "stop", "repeat_penalty": "repeat_penalty", "presence_penalty": "presence_penalty",
           "frequency_penalty": "frequency_penalty", "repeat_last_n": "repeat_last_n"}
UNTIL_CONTEXT_FULL = 1 << 30  # a max_tokens no context holds
DONE_REASONS = {"stop": "stop", "length": "length", "tool_calls": "stop", "cancelled": "stop"}
MESSAGE_KNOWN = {"role", "content", "images", "thinking", "tool_calls", "tool_name", "name"}
CHAT_KNOWN = {"model", "messages", "tools", "format", "options", "stream", "keep_alive", "think", "logprobs", "top_logprobs"}
GENERATE_KNOWN = {"model", "prompt", "suffix", "system", "template", "context", "stream", "raw", "format", "images", "options",
                  "keep_alive", "think", "logprobs", "top_logprobs"}


def _render_error(status: int, kind: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": message}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


# OpenAI field -> how an Ollama client spells it, for error messages.
NAMES = {**{openai: f"options.{name}" for name, openai in OPTIONS.items()}, "response_format": "format",
         "chat_template_kwargs.enable_thinking": "think", "reasoning_effort": "think",
         "response_format.json_schema.schema": "format"}


@dataclass(frozen=True)
class Residence:
    """A request's say on its model's lifecycle: keep_alive (``given`` false: the server's
    --keep-alive applies again, as in Ollama) and options.num_ctx."""

    given: bool
    keep_alive: float | None  # seconds; None: forever
    num_ctx: int | None


def _residence(body: dict[str, Any]) -> Residence:
    keep_alive = body.get("keep_alive")
    try:
        seconds = None if keep_alive is None else parse_keep_alive(keep_alive)
    except KeepAliveError as exc:
        raise Refused("keep_alive", str(exc)) from None
    options = body.get("options")
    num_ctx = options.get("num_ctx") if isinstance(options, dict) else None
    if num_ctx is not None and (not isinstance(num_ctx, int) or isinstance(num_ctx, bool) or num_ctx < 1):
        raise Refused("options.num_ctx", f"'options.num_ctx' must be a number of tokens >= 1 (got {num_ctx!r}).")
    return Residence(keep_alive is not None, seconds, num_ctx)


def _keep(server: Server, cfg: ModelConfig, residence: Residence) -> None:
    """The model's keep_alive from now on: the request's, else the server's default (as Ollama does)."""
    residency = server.pool.residency
    residency.keep(cfg.id, residence.keep_alive if residence.given else residency.default)


def _common(body: dict[str, Any], known: set[str], out: dict[str, Any]) -> None:
    """The fields /api/chat and /api/generate share, into the OpenAI body ``out``."""
    unknown = sorted(k for k in set(body) - known if body[k] not in (None, "", [], {}))
    if unknown:
        raise Refused(unknown[0], f"Unknown field '{unknown[0]}'.")
    if body.get("model") not in (None, ""):
        if not isinstance(body["model"], str):
            raise Refused("model", "'model' must be a string.")
        out["model"] = _model_name(body["model"])
    stream_flag = body.get("stream", True)  # Ollama streams unless told not to
    if not isinstance(stream_flag, bool):
        raise Refused("stream", "'stream' must be true or false.")
    out["stream"] = stream_flag
    _residence(body)
    think = body.get("think")
    if isinstance(think, bool):  # false is accepted from any model; true is refused by one that does not reason
        out["chat_template_kwargs"] = {"enable_thinking": think}
    elif think in ("low", "medium", "high"):  # (gpt-oss's levels): a thinking budget, reasoning.EFFORT_BUDGET
        out["reasoning_effort"] = think
    elif think is not None:
        raise Refused("think", "'think' must be true, false, or one of low, medium, high.")
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt, "strict": True}}
    elif fmt not in (None, ""):
        raise Refused("format", "'format' must be \"json\" or a JSON schema object.")
    if body.get("logprobs") is not None and not isinstance(body["logprobs"], bool):
        raise Refused("logprobs", "'logprobs' must be true or false.")
    if body.get("logprobs"):
        out["logprobs"] = True
        if body.get("top_logprobs"):
            out["top_logprobs"] = body["top_logprobs"]
    elif body.get("top_logprobs"):
        raise Refused("top_logprobs", "'top_logprobs' needs 'logprobs': true.")
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise Refused("options", "'options' must be an object.")
    for name, value in options.items():
        if value is None or name == "num_ctx":  # (num_ctx: _residence, the engine's context per request)
            continue
        if name not in OPTIONS:
            raise Refused(f"options.{name}", f"Option '{name}' is not supported per request; set it when starting `ggufrun serve` (options: {', '.join(sorted([*OPTIONS, 'num_ctx']))}).")
        if name == "num_predict":
            if not isinstance(value, int) or isinstance(value, bool) or value < -2 or value == 0:
                raise Refused("options.num_predict", "'options.num_predict' must be >= 1, or -1 / -2 to generate until the context is full.")
            # -1 (Ollama: no limit) and -2 (fill the context) both run until the context is full:
            # the server caps every max_tokens at the room the prompt leaves.
            out["max_tokens"] = value if value > 0 else UNTIL_CONTEXT_FULL
        elif name == "stop" and isinstance(value, list) and not value:
            continue
        else:
            out[OPTIONS[name]] = value


def _model_name(name: str) -> str:
    # Ollama clients add the default tag to a bare name ("smollm" -> "smollm:latest").
    return name[: -len(":latest")] if name.endswith(":latest") else name


def _chat_messages(messages: Any) -> list[dict[str, Any]]:
    """Ollama messages as OpenAI ones: tool_calls get ids, a tool reply is matched to its call by name."""
    if not isinstance(messages, list):
        raise Refused("messages", "'messages' must be a list.")
    out: list[dict[str, Any]] = []
    pending: dict[str, list[str]] = {}  # tool name -> ids of calls not answered yet
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise Refused(f"{where}.role", f"'{where}.role' must be system, user, assistant or tool.")
        unknown = sorted(k for k in m if k not in MESSAGE_KNOWN and m[k] is not None)
        if unknown:
            raise Refused(f"{where}.{unknown[0]}", f"Unknown field '{where}.{unknown[0]}'.")
        content = m.get("content")
        content = "" if content is None else content  # 0, false or [] are not text: refused below
        if not isinstance(content, str):
            raise Refused(f"{where}.content", f"'{where}.content' must be a string.")
        message: dict[str, Any] = {"role": m["role"], "content": content}
        if m.get("images"):  # shown to the model before the message's text, as Ollama does
            if m["role"] != "user":
                raise Refused(f"{where}.images", f"'{where}.images' may only be on a user message.")
            message["content"] = media.ollama_content(content, m["images"], f"{where}.images")
        if m.get("thinking"):
            if m["role"] != "assistant" or not isinstance(m["thinking"], str):
                raise Refused(f"{where}.thinking", f"'{where}.thinking' must be a string, on an assistant message.")
            message["reasoning_content"] = m["thinking"]  # the template renders it where it keeps thinking
        calls = m.get("tool_calls")
        if calls and (m["role"] != "assistant" or not isinstance(calls, list)):
            raise Refused(f"{where}.tool_calls", f"'{where}.tool_calls' must be a list, on an assistant message.")
        if calls:
            message["tool_calls"] = []
            for j, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
                    raise Refused(f"{where}.tool_calls[{j}]", f"'{where}.tool_calls[{j}]' needs function.name.")
                call_id = f"call_{uuid.uuid4().hex[:24]}"
                pending.setdefault(function["name"], []).append(call_id)
                arguments = function.get("arguments") or {}
                message["tool_calls"].append({"id": call_id, "type": "function", "function": {
                    "name": function["name"], "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}})
            message["content"] = content or None
        if m["role"] == "tool":
            name = m.get("tool_name") or m.get("name") or ""
            if not isinstance(name, str):
                raise Refused(f"{where}.tool_name", f"'{where}.tool_name' must be a string.")
            ids = pending.get(name) or next((v for v in pending.values() if v), [])
            message["tool_call_id"] = ids.pop(0) if ids else f"call_{uuid.uuid4().hex[:24]}"
        out.append(message)
    return out


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise Refused("tools", "'tools' must be a list.")
    for i, tool in enumerate(tools):
        if not (isinstance(tool, dict) and tool.get("type", "function") == "function" and isinstance(tool.get("function"), dict)):
            raise Refused(f"tools[{i}]", f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": {{...}}}}.")
    return [{"type": "function", "function": tool["function"]} for tool in tools]


def chat_to_openai(body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _common(body, CHAT_KNOWN, out)
    out["messages"] = _chat_messages(body.get("messages") or [])
    if body.get("tools"):
        out["tools"] = _tools(body["tools"])
    require(out, NAMES)
    return streamed(out)


def generate_to_openai(body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _common(body, GENERATE_KNOWN, out)
    for key, why in (("suffix", "fill-in-the-middle"), ("template", "a per-request template"), ("context", "a context array"),
                     ("raw", "raw prompts")):
        if body.get(key):
            raise Refused(key, f"'{key}' is not supported ({why}); use /v1/completions for raw prompts.")
    prompt = body.get("prompt") or ""
    system = body.get("system") or ""
    if not isinstance(prompt, str) or not isinstance(system, str):
        raise Refused("prompt", "'prompt' and 'system' must be strings.")
    user: Any = media.ollama_content(prompt, body["images"], "images") if body.get("images") else prompt
    out["messages"] = ([{"role": "system", "content": system}] if system else []) + ([{"role": "user", "content": user}] if user else [])
    require(out, NAMES)
    return streamed(out)


def _stats(usage: dict[str, Any] | None, timings: dict[str, Any] | None, started: float, done_reason: str,
           load_ns: int = 0) -> dict[str, Any]:
    """Ollama's counters and nanosecond durations, from the engine's llama-server-style timings."""
    usage, timings = usage or {}, timings or {}
    return {"done": True, "done_reason": done_reason, "total_duration": int((time.perf_counter() - started) * 1e9),
            "load_duration": load_ns, "prompt_eval_count": usage.get("prompt_tokens", 0),
            "prompt_eval_duration": int(float(timings.get("prompt_ms") or 0) * 1e6),
            "eval_count": usage.get("completion_tokens", 0), "eval_duration": int(float(timings.get("predicted_ms") or 0) * 1e6)}


def _logprobs(choice: dict[str, Any]) -> list[dict[str, Any]] | None:
    """OpenAI's logprobs content as Ollama's: token, logprob and the top alternatives."""
    content = (choice.get("logprobs") or {}).get("content")
    if not content:
        return None
    return [{"token": t["token"], "logprob": t["logprob"],
             "top_logprobs": [{"token": a["token"], "logprob": a["logprob"]} for a in t.get("top_logprobs") or []]}
            for t in content]


def _ollama_calls(calls: list[dict[str, Any]], cut: bool) -> list[dict[str, Any]]:
    """Ollama's calls carry arguments as objects. ``cut``: the reply stopped at num_predict, so the
    last call's arguments are read as far as they go (done_reason says "length"), as Anthropic's are."""
    return [{"function": {"name": c["function"]["name"],
                          "arguments": tool_arguments(c["function"].get("arguments") or "", "tool call's",
                                                      cut=cut and i == len(calls) - 1)}} for i, c in enumerate(calls)]


async def _ndjson(run: ChatRun, model: str, started: float, chat: bool, load_ns: int = 0) -> AsyncIterator[bytes]:
    """Ollama's NDJSON stream from the OpenAI chunks of ``run``."""
    finish = "stop"
    timings: dict[str, Any] | None = None
    calls: dict[int, dict[str, Any]] = {}
    async for chunk in run.chunks():
        error = chunk_error(chunk)
        if error is not None:
            yield ndjson({"error": error[2]})
            return
        choice = choice_of(chunk)
        if choice is None:  # the last chunk: usage only
            if calls:
                try:
                    found = _ollama_calls([calls[k] for k in sorted(calls)], cut=finish == "length")
                except ApiError as exc:
                    yield ndjson({"error": exc.message})
                    return
                message = {"role": "assistant", "content": "", "tool_calls": found}
                yield ndjson({"model": model, "created_at": _now(), "message": message, "done": False})
            final: dict[str, Any] = {"model": model, "created_at": _now()}
            final.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
            final.update(_stats(chunk.get("usage"), timings, started, DONE_REASONS.get(finish, "stop"), load_ns))
            yield ndjson(final)
            return
        finish = choice.get("finish_reason") or finish
        timings = chunk.get("timings") or timings
        delta = choice.get("delta") or {}
        for call in delta.get("tool_calls") or []:
            entry = calls.setdefault(call.get("index", 0), {"function": {"name": "", "arguments": ""}})
            function = call.get("function") or {}
            entry["function"]["name"] += function.get("name") or ""
            entry["function"]["arguments"] += function.get("arguments") or ""
        logprobs = _logprobs(choice)
        if delta.get("reasoning_content"):
            thought = delta["reasoning_content"]
            part = {"message": {"role": "assistant", "content": "", "thinking": thought}} if chat else {"response": "", "thinking": thought}
            yield ndjson({"model": model, "created_at": _now(), **part, "done": False})
        if delta.get("content") or logprobs:
            text = delta.get("content") or ""
            part = {"message": {"role": "assistant", "content": text}} if chat else {"response": text}
            yield ndjson({"model": model, "created_at": _now(), **part, "done": False,
                          **({"logprobs": logprobs} if logprobs else {})})


def parameters(settings: Settings) -> str:
    """The settings a request gets by default, as ``ollama show`` lists a Modelfile's PARAMETERs:
    one ``name value`` line each, in Ollama's names (num_predict -1: until the context is full)."""
    values = {name: getattr(settings, OPTIONS[name]) for name in OPTIONS if name not in ("stop", "num_predict")}
    values["num_predict"] = settings.max_tokens or -1
    return "\n".join(f"{name:<30} {value}" for name, value in sorted(values.items()))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def routes(server: Server) -> list[Route]:
    info_cache: dict[str, GGUFInfo] = {}

    async def header(cfg: ModelConfig) -> tuple[Path, GGUFInfo | None]:
        """The served file and its GGUF header facts (read off the loop, kept once read: a model
        not fetched yet is read again once its first load has fetched it)."""
        from ..gguf_info import inspect

        path = server.pool.registry.resolve(cfg.model).cache_path()
        if cfg.id not in info_cache:
            try:
                info_cache[cfg.id] = await asyncio.to_thread(inspect, path)
            except Exception:  # noqa: BLE001 (a listing should not fail on one unreadable file)
                return path, None
        return path, info_cache[cfg.id]

    def details(info: GGUFInfo | None) -> dict[str, Any]:
        if info is None:
            return {"format": "gguf"}
        n = info.parameter_count
        size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"
        family = info.architecture or ""
        return {"parent_model": "", "format": "gguf", "family": family, "families": [family] if family else None,
                "parameter_size": size, "quantization_level": info.file_type}

    async def entry(cfg: ModelConfig) -> dict[str, Any]:
        path, info = await header(cfg)
        modified = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc).isoformat() if path.exists() else None
        return {"name": cfg.id, "model": cfg.id, "modified_at": modified, "size": _size(path), "digest": "", "details": details(info)}

    async def generate_like(request: Request, chat: bool) -> Response:
        started = time.perf_counter()
        body = await body_of(server, request)
        openai_body = chat_to_openai(body) if chat else generate_to_openai(body)
        residence = _residence(body)
        model = body.get("model") or server.lookup(None).id
        cfg = server.lookup(openai_body.get("model"))
        before = server.pool.resident(cfg.id)
        fresh = before is None or before.state != "ready"

        def load_ns() -> int:
            """How long the load this request waited for took (Ollama's load_duration); 0 if none."""
            engine = server.pool.resident(cfg.id)
            return int(engine.backend.model.load_seconds * 1e9) if fresh and engine and engine.backend else 0

        # Ollama's own load and unload: nothing to generate loads the model (`ollama run` does
        # this first); with keep_alive 0 it unloads it (`ollama stop`), once its requests end.
        part = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
        if not openai_body["messages"] and residence.given and residence.keep_alive == 0:
            server.pool.unload(cfg.id)
            return JSONResponse({"model": model, "created_at": _now(), **part, "done": True, "done_reason": "unload"})
        if residence.num_ctx is not None:  # more than the model was loaded with: reloaded, where serve allows it
            await server.pool.fit_context(cfg, residence.num_ctx)
        if not openai_body["messages"]:
            engine = await server.acquire(cfg)
            try:
                assert engine.backend is not None
                request_context(engine.backend.n_ctx_seq, residence.num_ctx, cfg.id)  # a load it cannot honour is refused too
                _keep(server, cfg, residence)
            finally:
                server.pool.release(engine)
            return JSONResponse({"model": model, "created_at": _now(), **part, "done": True, "done_reason": "load",
                                 "total_duration": int((time.perf_counter() - started) * 1e9), "load_duration": load_ns()})
        run = await start_chat(server, openai_body, "/api/chat" if chat else "/api/generate", residence.num_ctx)
        _keep(server, cfg, residence)
        if openai_body["stream"]:
            return stream(run, _ndjson(run, model, started, chat, load_ns()), "application/x-ndjson")
        result = await run.whole(request)
        if result is None:
            return Response(status_code=499)
        choice = result["choices"][0]
        message = choice["message"]
        out: dict[str, Any] = {"model": model, "created_at": _now()}
        if chat:
            reply: dict[str, Any] = {"role": "assistant", "content": message.get("content") or ""}
            if message.get("reasoning_content"):
                reply["thinking"] = message["reasoning_content"]
            if message.get("tool_calls"):
                reply["tool_calls"] = _ollama_calls(message["tool_calls"], cut=choice.get("finish_reason") == "length")
            out["message"] = reply
        else:
            out["response"] = message.get("content") or ""
            if message.get("reasoning_content"):
                out["thinking"] = message["reasoning_content"]
        if openai_body.get("logprobs"):
            out["logprobs"] = _logprobs(choice) or []
        out.update(_stats(result.get("usage"), result.get("timings"), started, DONE_REASONS.get(choice["finish_reason"], "stop"),
                          load_ns()))
        return JSONResponse(out)

    @guarded(_render_error, NAMES)
    async def chat(request: Request) -> Response:
        return await generate_like(request, chat=True)

    @guarded(_render_error, NAMES)
    async def generate(request: Request) -> Response:
        return await generate_like(request, chat=False)

    async def vectors(model: Any, texts: list[str], residence: Residence) -> tuple[str, list[list[float]], int]:
        if model is not None and not isinstance(model, str):
            raise Refused("model", "'model' must be a string.")
        if residence.num_ctx is not None:
            await server.pool.fit_context(server.lookup(_model_name(model) if model else None), residence.num_ctx)
        cfg, result, n_tokens = await server.embed_texts(_model_name(model) if model else None, texts, residence.num_ctx)
        _keep(server, cfg, residence)
        return cfg.id, result, n_tokens

    def embed_fields(body: dict[str, Any], known: set[str]) -> Residence:
        unknown = sorted(k for k in set(body) - known if body[k] is not None)
        if unknown:
            raise Refused(unknown[0], f"Unknown field '{unknown[0]}'.")
        residence = _residence(body)
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise Refused("options", "'options' must be an object.")
        other = sorted(k for k, v in options.items() if k != "num_ctx" and v is not None)
        if other:
            raise Refused(f"options.{other[0]}", f"Option '{other[0]}' is not supported for embeddings (num_ctx is).")
        if body.get("dimensions") is not None:
            raise Refused("dimensions", "'dimensions' is not supported: ggufrun returns the model's full embedding.")
        return residence

    @guarded(_render_error)
    async def embed(request: Request) -> Response:
        started = time.perf_counter()
        body = await body_of(server, request)
        # truncate is accepted either way: an input longer than the context is refused, never cut.
        residence = embed_fields(body, {"model", "input", "truncate", "options", "keep_alive", "dimensions"})
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts) or len(texts) > 256:
            raise Refused("input", "'input' must be a non-empty string or a list of 1 to 256 non-empty strings.")
        name, result, n_tokens = await vectors(body.get("model"), texts, residence)
        return JSONResponse({"model": body.get("model") or name, "embeddings": result,
                             "total_duration": int((time.perf_counter() - started) * 1e9), "load_duration": 0,
                             "prompt_eval_count": n_tokens})

    @guarded(_render_error)
    async def embeddings(request: Request) -> Response:
        body = await body_of(server, request)
        residence = embed_fields(body, {"model", "prompt", "options", "keep_alive"})
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise Refused("prompt", "'prompt' must be a non-empty string.")
        _, result, _ = await vectors(body.get("model"), [prompt], residence)
        return JSONResponse({"embedding": result[0]})

    @guarded(_render_error)
    async def tags(request: Request) -> Response:
        return JSONResponse({"models": [await entry(cfg) for cfg in server.config.models]})

    @guarded(_render_error)
    async def show(request: Request) -> Response:
        body = await body_of(server, request)
        unknown = sorted(set(body) - {"model", "name", "verbose"})
        if unknown:
            raise Refused(unknown[0], f"Unknown field '{unknown[0]}'.")
        if body.get("verbose"):
            raise Refused("verbose", "'verbose' is not supported: model_info leaves out the tokenizer's arrays.")
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise Refused("model", "'model' must name a served model.")
        cfg = server.lookup(_model_name(name))
        _, info = await header(cfg)
        facts = await entry(cfg)
        model_info = {} if info is None else {k: v for k, v in info.metadata.items()
                                              if isinstance(v, (str, int, float, bool)) and k != "tokenizer.chat_template"}
        capabilities = ["completion", *(["embedding"] if cfg.embeddings else []), *(["tools"] if supports("tools") else [])]
        defaults = server.pool.defaults(cfg)
        shown: dict[str, Any] = {"modelfile": "", "parameters": parameters(defaults.settings),
                                 "template": (info.chat_template if info else None) or "", "details": facts["details"],
                                 "model_info": model_info, "capabilities": capabilities, "modified_at": facts["modified_at"]}
        if defaults.system is not None:
            shown["system"] = defaults.system
        return JSONResponse(shown)

    @guarded(_render_error)
    async def ps(request: Request) -> Response:
        """The loaded models, as `ollama ps` reads them: size is the memory estimate (weights, KV
        cache for every slot, compute), size_vram its share on GPUs (0 without one)."""
        models = []
        gpu = await asyncio.to_thread(has_gpu)
        for name, state in server.pool.loaded().items():
            engine = server.pool.resident(name)
            if state != "ready" or engine is None or engine.backend is None:
                continue
            cfg = server.lookup(name)
            facts = await entry(cfg)
            memory = server.pool.residency.memory(name)
            size = memory.total if memory else facts["size"]
            models.append({**facts, "size": size, "size_vram": memory.gpu if memory and gpu else 0,
                           "expires_at": server.pool.residency.expires_at(name, engine.busy()),
                           "context_length": engine.backend.n_ctx_seq})
        return JSONResponse({"models": models})

    def named(body: dict[str, Any], *keys: str) -> str:
        """The model a store request names (``model``, or the older ``name``), never a file path."""
        from ..refs import parse

        value = next((body[k] for k in keys if body.get(k) not in (None, "")), None)
        if not isinstance(value, str):
            raise Refused(keys[0], f"'{keys[0]}' must name a model.")
        if parse(value).kind == "path":  # a remote client must not point the server at its disk
            raise Refused(keys[0], f"'{keys[0]}' must be a registry name or an hf:/ms: reference, not a file path.")
        value = _model_name(value)
        # a name /api/tags lists (served_model_name) stands for the model it serves
        return next((cfg.model for cfg in server.config.models if value in cfg.served_names), value)

    @guarded(_render_error)
    async def pull(request: Request) -> Response:
        """Download a model into the cache through ggufrun's fetcher (both hubs, verified), with
        Ollama's progress lines. A client that goes away does not stop it: the download finishes
        into the cache (atomically, as `ggufrun pull`)."""
        from ..fetch import pull as fetch_pull

        body = await body_of(server, request)
        unknown = sorted(k for k in set(body) - {"model", "name", "stream", "insecure"} if body[k] is not None)
        if unknown:
            raise Refused(unknown[0], f"Unknown field '{unknown[0]}'.")
        if body.get("insecure"):
            raise Refused("insecure", "'insecure' is not supported: ggufrun always verifies TLS and every file's size "
                                      "and sha256.")
        stream_flag = body.get("stream", True)
        if not isinstance(stream_flag, bool):
            raise Refused("stream", "'stream' must be true or false.")
        spec = await asyncio.to_thread(server.pool.registry.resolve, named(body, "model", "name"))
        digest = f"sha256:{spec.sha256.lower()}" if spec.sha256 else None
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue()
        last: dict[str, float] = {}

        def progress(desc: str, done: int, total: int | None) -> None:
            now = time.monotonic()
            if done != total and now - last.get(desc, 0.0) < 0.1:  # ten lines a second per file at most
                return
            last[desc] = now
            line: dict[str, Any] = {"status": "verifying sha256 digest" if desc.startswith("verifying") else f"pulling {desc}"}
            line.update({k: v for k, v in (("digest", digest), ("total", total), ("completed", done)) if v is not None})
            loop.call_soon_threadsafe(lines.put_nowait, line)

        def work() -> None:
            try:
                result = fetch_pull(spec, progress=progress)
                if result.cached:
                    size = result.path.stat().st_size
                    progress(spec.filename, size, size)
                loop.call_soon_threadsafe(lines.put_nowait, None)
            except BaseException as exc:  # noqa: BLE001 (sent to the client as the error line)
                loop.call_soon_threadsafe(lines.put_nowait, exc)

        task = asyncio.ensure_future(asyncio.to_thread(work))
        if not stream_flag:
            await task
            while (item := lines.get_nowait()) is not None:
                if isinstance(item, BaseException):
                    raise item
            return JSONResponse({"status": "success"})

        async def lines_out() -> AsyncIterator[bytes]:
            yield ndjson({"status": "pulling manifest"})
            while (item := await lines.get()) is not None:
                if isinstance(item, BaseException):
                    yield ndjson({"error": as_error(item)[2]})
                    return
                yield ndjson(item)
            for status in ("writing manifest", "success"):
                yield ndjson({"status": status})

        return StreamingResponse(lines_out(), media_type="application/x-ndjson")

    @guarded(_render_error)
    async def delete(request: Request) -> Response:
        """Remove a model from the cache (only the cache: `ggufrun rm`'s rules), unloading it first;
        a name /api/copy made leaves the registry too."""
        from ..aliases import forget_copy
        from ..fetch import remove

        body = await body_of(server, request)
        name = named(body, "model", "name")
        spec = await asyncio.to_thread(server.pool.registry.resolve, name)
        if spec.path is not None:  # (a served model given by path): the cache is all /api/delete may touch
            raise Refused("model", f"Model '{body.get('model') or body.get('name')}' is served from a file outside the cache; "
                                   "only cached models can be deleted.")
        for cfg in server.config.models:  # a served model whose file this is: unloaded first, unless in use
            try:
                same = server.pool.registry.resolve(cfg.model).cache_path() == spec.cache_path()
            except GgufrunError:
                continue
            if same and server.pool.unload(cfg.id) is False:
                raise Refused("model", f"Model '{name}' is in use; it unloads when its requests end. Retry then.", status=409)
        removed = await asyncio.to_thread(remove, spec)
        smaller = await asyncio.to_thread(forget_copy, server.pool.registry, name)  # a copy's name goes with it
        if smaller is not None:
            server.pool.registry = smaller
        elif not any(p.suffix == ".gguf" for p in removed):
            raise Refused("model", f"model '{name}' not found", status=404)
        return JSONResponse({})

    @guarded(_render_error)
    async def copy(request: Request) -> Response:
        """A second name for a cached model: a models.toml entry and a hard link (aliases.py)."""
        from ..aliases import copy_model, with_entry

        body = await body_of(server, request)
        unknown = sorted(set(body) - {"source", "destination"})
        if unknown:
            raise Refused(unknown[0], f"Unknown field '{unknown[0]}'.")
        source, destination = named(body, "source"), body.get("destination")
        if not isinstance(destination, str) or not destination:
            raise Refused("destination", "'destination' must name the copy.")
        entry = await asyncio.to_thread(copy_model, server.pool.registry, source, destination)
        server.pool.registry = with_entry(server.pool.registry, entry)
        return JSONResponse({})

    async def version(request: Request) -> Response:
        return JSONResponse({"version": OLLAMA_API_VERSION, "ggufrun": __version__})

    return [Route("/api/chat", chat, methods=["POST"]), Route("/api/generate", generate, methods=["POST"]),
            Route("/api/embed", embed, methods=["POST"]), Route("/api/embeddings", embeddings, methods=["POST"]),
            Route("/api/tags", tags, methods=["GET"]), Route("/api/show", show, methods=["POST"]),
            Route("/api/ps", ps, methods=["GET"]), Route("/api/version", version, methods=["GET"]),
            Route("/api/pull", pull, methods=["POST"]), Route("/api/delete", delete, methods=["DELETE"]),
            Route("/api/copy", copy, methods=["POST"])]
