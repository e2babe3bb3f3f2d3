"""Ollama's API (``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/embeddings``, ``/api/tags``,
``/api/show``, ``/api/ps``, ``/api/version``) over the server's OpenAI chat pipeline, so that the
``ollama`` package and Ollama front-ends work against ggufrun. Replies stream as NDJSON (Ollama's
default); errors are ``{"error": "..."}``. Durations are nanoseconds, as Ollama reports them.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from . import media
from .protocol import ApiError
from .translate import (Refused, body_of, choice_of, chunk_error, guarded, ndjson, require, start_chat, stream, streamed,
                        supports, tool_arguments)

if TYPE_CHECKING:
    from ..gguf_info import GGUFInfo
    from ..settings import Settings
    from .core import Server
    from .translate import ChatRun
    from .models import ModelConfig

# Ollama clients compare /api/version against the Ollama release that added a feature; this
# is the release whose API (format schemas, tools, /api/embed) the routes below follow.
OLLAMA_API_VERSION = "0.12.0"
# Ollama's options that map onto OpenAI chat fields; the rest (num_ctx, num_gpu, num_thread,
# mirostat, ...) are load-time or sampler settings ggufrun takes at `ggufrun serve`, so refused.
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


def _check_keep_alive(body: dict[str, Any]) -> None:
    keep_alive = body.get("keep_alive")
    if keep_alive is not None and not (isinstance(keep_alive, (int, float)) and keep_alive < 0 or keep_alive in ("-1", "-1s", "-1m", "-1h")):
        raise Refused("keep_alive", "'keep_alive': ggufrun keeps a model loaded until another needs the room (see --max-loaded); only a negative keep_alive (keep loaded) is supported.")


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
    _check_keep_alive(body)
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
        if value is None:
            continue
        if name not in OPTIONS:
            raise Refused(f"options.{name}", f"Option '{name}' is not supported per request; set it when starting `ggufrun serve` (options: {', '.join(sorted(OPTIONS))}).")
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


def _stats(usage: dict[str, Any] | None, timings: dict[str, Any] | None, started: float, done_reason: str) -> dict[str, Any]:
    """Ollama's counters and nanosecond durations, from the engine's llama-server-style timings."""
    usage, timings = usage or {}, timings or {}
    return {"done": True, "done_reason": done_reason, "total_duration": int((time.perf_counter() - started) * 1e9),
            "load_duration": 0, "prompt_eval_count": usage.get("prompt_tokens", 0),
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


def _ollama_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"function": {"name": c["function"]["name"],
                          "arguments": tool_arguments(c["function"].get("arguments") or "", "tool call's")}} for c in calls]


async def _ndjson(run: ChatRun, model: str, started: float, chat: bool) -> AsyncIterator[bytes]:
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
                try:  # Ollama carries arguments as objects: a call cut short (num_predict) has none to send
                    found = _ollama_calls([calls[k] for k in sorted(calls)])
                except ApiError as exc:
                    yield ndjson({"error": exc.message})
                    return
                message = {"role": "assistant", "content": "", "tool_calls": found}
                yield ndjson({"model": model, "created_at": _now(), "message": message, "done": False})
            final: dict[str, Any] = {"model": model, "created_at": _now()}
            final.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
            final.update(_stats(chunk.get("usage"), timings, started, DONE_REASONS.get(finish, "stop")))
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
        model = body.get("model") or server.lookup(None).id
        if not openai_body["messages"]:
            # Ollama loads the model when asked to generate nothing (`ollama run` does this first).
            cfg = server.lookup(openai_body.get("model"))
            server.pool.release(await server.acquire(cfg))
            part = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
            return JSONResponse({"model": model, "created_at": _now(), **part, "done": True, "done_reason": "load"})
        run = await start_chat(server, openai_body, "/api/chat" if chat else "/api/generate")
        if openai_body["stream"]:
            return stream(run, _ndjson(run, model, started, chat), "application/x-ndjson")
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
                reply["tool_calls"] = _ollama_calls(message["tool_calls"])
            out["message"] = reply
        else:
            out["response"] = message.get("content") or ""
            if message.get("reasoning_content"):
                out["thinking"] = message["reasoning_content"]
        if openai_body.get("logprobs"):
            out["logprobs"] = _logprobs(choice) or []
        out.update(_stats(result.get("usage"), result.get("timings"), started, DONE_REASONS.get(choice["finish_reason"], "stop")))
        return JSONResponse(out)

    @guarded(_render_error, NAMES)
    async def chat(request: Request) -> Response:
        return await generate_like(request, chat=True)

    @guarded(_render_error, NAMES)
    async def generate(request: Request) -> Response:
        return await generate_like(request, chat=False)

    async def vectors(model: Any, texts: list[str]) -> tuple[str, list[list[float]], int]:
        if model is not None and not isinstance(model, str):
            raise Refused("model", "'model' must be a string.")
        cfg, result, n_tokens = await server.embed_texts(_model_name(model) if model else None, texts)
        return cfg.id, result, n_tokens

    def embed_fields(body: dict[str, Any], known: set[str]) -> None:
        unknown = sorted(k for k in set(body) - known if body[k] is not None)
        if unknown:
            raise Refused(unknown[0], f"Unknown field '{unknown[0]}'.")
        _check_keep_alive(body)
        if body.get("options"):
            raise Refused("options", "'options' are not supported for embeddings.")
        if body.get("dimensions") is not None:
            raise Refused("dimensions", "'dimensions' is not supported: ggufrun returns the model's full embedding.")

    @guarded(_render_error)
    async def embed(request: Request) -> Response:
        started = time.perf_counter()
        body = await body_of(server, request)
        # truncate is accepted either way: an input longer than the context is refused, never cut.
        embed_fields(body, {"model", "input", "truncate", "options", "keep_alive", "dimensions"})
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts) or len(texts) > 256:
            raise Refused("input", "'input' must be a non-empty string or a list of 1 to 256 non-empty strings.")
        name, result, n_tokens = await vectors(body.get("model"), texts)
        return JSONResponse({"model": body.get("model") or name, "embeddings": result,
                             "total_duration": int((time.perf_counter() - started) * 1e9), "load_duration": 0,
                             "prompt_eval_count": n_tokens})

    @guarded(_render_error)
    async def embeddings(request: Request) -> Response:
        body = await body_of(server, request)
        embed_fields(body, {"model", "prompt", "options", "keep_alive"})
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise Refused("prompt", "'prompt' must be a non-empty string.")
        _, result, _ = await vectors(body.get("model"), [prompt])
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
        models = []
        for name, state in server.pool.loaded().items():
            if state != "ready":
                continue
            cfg = server.lookup(name)
            facts = await entry(cfg)
            engine = server.pool.resident(name)
            backend = engine.backend if engine is not None else None
            models.append({**facts, "size_vram": 0 if not backend or not backend.settings.n_gpu_layers else facts["size"],
                           "context_length": backend.n_ctx_seq if backend else None})
        return JSONResponse({"models": models})

    async def version(request: Request) -> Response:
        return JSONResponse({"version": OLLAMA_API_VERSION, "ggufrun": __version__})

    return [Route("/api/chat", chat, methods=["POST"]), Route("/api/generate", generate, methods=["POST"]),
            Route("/api/embed", embed, methods=["POST"]), Route("/api/embeddings", embeddings, methods=["POST"]),
            Route("/api/tags", tags, methods=["GET"]), Route("/api/show", show, methods=["POST"]),
            Route("/api/ps", ps, methods=["GET"]), Route("/api/version", version, methods=["GET"])]
