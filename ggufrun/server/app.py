"""The HTTP layer: an OpenAI-compatible API, the seed's ``POST /`` demo, a chat page, health and metrics.

Handlers validate the body, render and tokenise the prompt, and hand the model's engine a Job
(see engine.py); they never call llama.cpp for generation themselves. Errors are JSON in OpenAI's
shape, ``{"error": {"message", "type", "param", "code"}}``, with the status the issue asks for:
malformed JSON 400, unknown model 404, prompt longer than the context 400 (with the counts),
invalid parameters 422, body too large 413, queue full 503 (with Retry-After).
"""

from __future__ import annotations

import asyncio
import datetime
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ConfigError, ContextOverflowError, GgufrunError
from ..settings import coerce
from ..templates import chat_tokens
from .engine import Backend, Engine, Event, GenRequest, Job, QueueFullError, ShuttingDownError
from .metrics import Metrics
from .models import ModelConfig, ModelPool, ServeConfig

log = logging.getLogger("ggufrun.server")

SHUTDOWN_GRACE = 3.0  # seconds running requests get to finish after SIGTERM (uvicorn then waits 5 s at most)
SEED_SYSTEM_PROMPT = "You are a helpful assistant."  # what the seed's FastAPI demo sends before the prompt
SEED_MAX_TOKENS = 512  # the seed demo's max_new_tokens
ROLES = {"system", "user", "assistant", "tool", "developer"}


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


def api_error(exc: BaseException) -> ApiError:
    """Any error as the ApiError a client sees; unknown ones become a 500 with no internals."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFullError):
        return ApiError(503, str(exc), kind="server_overloaded", headers={"Retry-After": "1"})
    if isinstance(exc, ContextOverflowError):
        extra = {"n_prompt_tokens": exc.n_tokens, "n_ctx": exc.n_ctx} if exc.n_ctx else {}
        return ApiError(400, str(exc), kind="exceed_context_size_error", extra=extra)
    if isinstance(exc, GgufrunError):
        status = exc.http_status
        kinds = {404: "not_found_error", 503: "server_unavailable"}
        return ApiError(status, str(exc), param="model" if status == 404 else None,
                        kind=kinds.get(status, "invalid_request_error" if status < 500 else "server_error"),
                        headers={"Retry-After": "1"} if status == 503 else None)
    return ApiError(500, "Internal server error. Set GGUFRUN_DEBUG=1 and see the server log.", kind="server_error")


# ---- request validation -------------------------------------------------------------------------

@dataclass
class GenParams:
    """The generation fields of a completions or chat request, validated."""

    model: str | None
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    sampling: dict[str, Any] = field(default_factory=dict)
    ignore_eos: bool = False


def _invalid(param: str, message: str) -> ApiError:
    return ApiError(422, f"Invalid '{param}': {message}", param=param)


def _typed(body: dict[str, Any], key: str, types: tuple[type, ...], what: str) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in types:
        raise _invalid(key, f"expected {what}, got {json.dumps(value)}.")
    if not isinstance(value, types):
        raise _invalid(key, f"expected {what}, got {type(value).__name__}.")
    return value


def _setting(body: dict[str, Any], key: str, name: str | None = None) -> Any:
    """A sampling field checked against the settings model's bounds (one source of limits)."""
    setting = name or key
    value = _typed(body, key, (int,) if setting in ("top_k", "seed") else (int, float), "an integer" if setting in ("top_k", "seed") else "a number")
    if value is None:
        return None
    try:
        return coerce(setting, value, "the request")
    except ConfigError as exc:
        raise ApiError(422, exc.message, param=key) from None


def parse_gen(body: dict[str, Any], *, chat: bool) -> GenParams:
    model = _typed(body, "model", (str,), "a string")
    n = _typed(body, "n", (int,), "an integer")
    if n not in (None, 1):
        raise _invalid("n", "only n=1 is supported.")
    stream = bool(_typed(body, "stream", (bool,), "true or false"))
    options = _typed(body, "stream_options", (dict,), "an object") or {}
    include_usage = options.get("include_usage") is True
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _typed(body, key, (int,), "an integer")
    if max_tokens is not None and max_tokens <= 0:
        raise _invalid(key, f"must be >= 1 (got {max_tokens}).")
    stop = _typed(body, "stop", (str, list), "a string or a list of strings")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 16 or not all(isinstance(s, str) and s for s in stops):
        raise _invalid("stop", "expected up to 16 non-empty strings.")
    sampling = {name: v for name in ("temperature", "top_p", "top_k", "min_p", "seed") if (v := _setting(body, name)) is not None}
    penalty = _setting(body, "repeat_penalty")
    if penalty is not None:
        sampling["repeat_penalty"] = penalty
    ignore_eos = bool(_typed(body, "ignore_eos", (bool,), "true or false"))
    return GenParams(model=model, stream=stream, include_usage=include_usage, max_tokens=max_tokens, stop=stops,
                     sampling=sampling, ignore_eos=ignore_eos)


def parse_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "expected a non-empty list of {role, content} objects.")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise _invalid(f"messages[{i}].role", f"expected one of {', '.join(sorted(ROLES))}.")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise _invalid(f"messages[{i}].content", "expected a string or a list of content parts.")
        for j, part in enumerate(content if isinstance(content, list) else ()):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _invalid(f"messages[{i}].content[{j}]", 'expected {"type": "text", "text": "..."} (only text is supported).')
        out.append({**m, "role": "system" if m["role"] == "developer" else m["role"]})
    return out


def parse_prompt(body: dict[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
        return prompt
    raise _invalid("prompt", "expected a string (or one string in a list, or a list of token ids).")


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object: 413 past ``limit`` bytes, 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"Request body of {declared} bytes is larger than the limit of {limit}.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"Request body is larger than the limit of {limit} bytes.")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks) or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"Malformed JSON body: {exc}.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The body must be a JSON object.")
    return data


# ---- responses ----------------------------------------------------------------------------------

def _json_line(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream:
    """A server-sent-events response that cancels its job as soon as the client goes away:
    a watcher sees ``http.disconnect`` even while the job still waits in the queue."""

    def __init__(self, job: Job, chunks: AsyncIterator[bytes], media_type: str = "text/event-stream; charset=utf-8") -> None:
        self.job = job
        self.chunks = chunks
        self.media_type = media_type.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        watcher.add_done_callback(lambda _: self.job.cancel())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", self.media_type), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]})
            async for chunk in self.chunks:
                if self.job.cancelled:
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away mid-send
            pass
        finally:
            self.job.cancel()  # no-op when the job already ended; frees the slot otherwise
            watcher.cancel()
            await self.chunks.aclose()  # type: ignore[attr-defined]


async def _events(job: Job) -> AsyncIterator[Event]:
    while True:
        event = await job.events.get()
        yield event
        if event.kind != "text":
            return


def _usage(event: Event) -> dict[str, int]:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


@dataclass
class _Shape:
    """How one endpoint dresses text in OpenAI's objects (chat vs text completions)."""

    chat: bool
    model: str
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def chunk(self, text: str | None, finish: str | None = None, *, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice]}

    def whole(self, text: str, done: Event) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                                      "finish_reason": done.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
                "model": self.model, "choices": [choice], "usage": _usage(done)}


async def chat_chunks(job: Job, shape: _Shape, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    """The job's results as OpenAI chunk objects (an error as an ``{"error": ...}`` object); the
    Anthropic, Ollama and Responses APIs translate these, so every API streams through one path."""
    if shape.chat:
        yield shape.chunk(None, first=True)
    async for event in _events(job):
        if event.kind == "text":
            yield shape.chunk(event.text)
        elif event.kind == "done":
            final = shape.chunk(None, event.finish_reason)
            if include_usage:
                yield final
                final = {**shape.chunk(None), "choices": [], "usage": _usage(event)}
            else:
                final["usage"] = _usage(event)  # llama-server and vLLM send it; clients ignore what they don't know
            yield final
        else:
            assert event.error is not None
            yield api_error(event.error).body()


async def _sse(job: Job, shape: _Shape, include_usage: bool) -> AsyncIterator[bytes]:
    async for chunk in chat_chunks(job, shape, include_usage):
        yield _json_line(chunk)
    yield b"data: [DONE]\n\n"


async def collect(request: Request, job: Job) -> tuple[str, Event] | None:
    """The whole reply of a non-streamed request; None (and the job cancelled) if the client left."""
    parts: list[str] = []
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        while True:
            getter = asyncio.ensure_future(job.events.get())
            await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                job.cancel()
                return None
            event = getter.result()
            if event.kind == "text":
                parts.append(event.text)
            elif event.kind == "done":
                return "".join(parts), event
            else:
                assert event.error is not None
                raise event.error
    finally:
        watcher.cancel()
        job.cancel()  # a no-op once the job ended; frees the slot when this task is cancelled (shutdown)


@dataclass
class ChatRun:
    """A submitted chat completion: what the other APIs (anthropic.py, ollama.py, responses.py)
    get from ``Server.start_chat`` and translate into their own shapes."""

    job: Job
    params: GenParams
    shape: _Shape

    def chunks(self) -> AsyncIterator[dict[str, Any]]:
        """OpenAI ``chat.completion.chunk`` objects, the last one (no choices) with the usage."""
        return chat_chunks(self.job, self.shape, include_usage=True)

    async def whole(self, request: Request) -> dict[str, Any] | None:
        """The OpenAI ``chat.completion`` object; None (job cancelled) if the client left."""
        result = await collect(request, self.job)
        return None if result is None else self.shape.whole(*result)


# ---- the application -----------------------------------------------------------------------------

class Server:
    """The app's state and handlers."""

    def __init__(self, config: ServeConfig, registry: Any, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.pool = ModelPool(config, registry, metrics)
        self.started = int(time.time())
        self.loop: asyncio.AbstractEventLoop | None = None
        self.fatal: GgufrunError | None = None  # the preloaded model failed: the server stops, run() raises it
        self.stop_server: Callable[[], None] | None = None

    def begin_shutdown(self) -> None:
        """Called from the signal handler: running requests get SHUTDOWN_GRACE seconds, then end
        with an error event, so their streams close cleanly before uvicorn's own deadline."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.pool.drain, SHUTDOWN_GRACE)

    async def _engine(self, cfg: ModelConfig) -> Engine:
        """The model's engine; a model that fails to load is the server's fault (500), not the client's."""
        try:
            return await self.pool.acquire(cfg)
        except ShuttingDownError:
            raise
        except GgufrunError as exc:
            raise ApiError(500, f"Model '{cfg.id}' could not be loaded: {exc}", kind="server_error") from None

    async def _prepare(self, params: GenParams, cfg: ModelConfig,
                       build: Callable[[Backend], list[int]]) -> Job:
        engine = await self._engine(cfg)
        try:
            backend = engine.backend
            assert backend is not None
            tokens = build(backend)
            job = Job(self._gen_request(backend, tokens, params), asyncio.get_running_loop())
            engine.submit(job)
        finally:
            self.pool.release(engine)
        return job

    def _gen_request(self, backend: Backend, tokens: list[int], params: GenParams) -> GenRequest:
        limit = backend.n_ctx_seq
        if not tokens:
            raise ApiError(400, "The prompt is empty.", param="prompt")
        if len(tokens) >= limit:
            raise ContextOverflowError(
                f"The prompt has {len(tokens)} tokens; the context holds {limit} per request, so no room is left for a reply.",
                "Shorten the prompt or serve the model with a larger --n-ctx.", n_tokens=len(tokens), n_ctx=limit)
        room = limit - len(tokens)
        wanted = params.max_tokens or backend.settings.max_tokens or room
        sampling = {k: backend.settings.sampling()[k] for k in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")}
        sampling["seed"] = backend.settings.seed
        sampling.update(params.sampling)
        return GenRequest(prompt=tokens, max_tokens=min(wanted, room), sampling=sampling, stop=params.stop,
                          ignore_eos=params.ignore_eos)

    async def _respond(self, request: Request, job: Job, params: GenParams, shape: _Shape) -> Response:
        if params.stream:
            return EventStream(job, _sse(job, shape, params.include_usage))  # type: ignore[return-value]
        result = await collect(request, job)
        if result is None:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        return JSONResponse(shape.whole(*result))

    async def start_chat(self, body: dict[str, Any]) -> ChatRun:
        """Validate an OpenAI chat request body and submit it: the one chat pipeline every API uses."""
        params = parse_gen(body, chat=True)
        messages = parse_messages(body)
        cfg = self.pool.lookup(params.model)

        def build(backend: Backend) -> list[int]:
            params.stop = [*params.stop, *(s for s in backend.template.stop if s not in params.stop)]
            return chat_tokens(backend.template, backend.model, messages)

        job = await self._prepare(params, cfg, build)
        return ChatRun(job, params, _Shape(chat=True, model=params.model or cfg.id))

    async def chat_completions(self, request: Request) -> Response:
        body = await read_json(request, self.config.max_body_bytes)
        run = await self.start_chat(body)
        return await self._respond(request, run.job, run.params, run.shape)

    async def completions(self, request: Request) -> Response:
        body = await read_json(request, self.config.max_body_bytes)
        params = parse_gen(body, chat=False)
        prompt = parse_prompt(body)
        cfg = self.pool.lookup(params.model)

        def build(backend: Backend) -> list[int]:
            if isinstance(prompt, list):
                bad = [t for t in prompt if t >= backend.model.n_vocab]
                if bad:
                    raise _invalid("prompt", f"token id {bad[0]} is outside the vocabulary of {backend.model.n_vocab}.")
                return list(prompt)
            return backend.model.tokenize(prompt, add_special=True, parse_special=True)

        job = await self._prepare(params, cfg, build)
        return await self._respond(request, job, params, _Shape(chat=False, model=params.model or cfg.id))

    async def embeddings(self, request: Request) -> Response:
        body = await read_json(request, self.config.max_body_bytes)
        model = _typed(body, "model", (str,), "a string")
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts) or len(texts) > 256:
            raise _invalid("input", "expected a string or a list of 1 to 256 strings.")
        empty = next((i for i, t in enumerate(texts) if not t.strip()), None)
        if empty is not None:
            raise _invalid(f"input[{empty}]", "expected non-empty text.")
        cfg = self.pool.lookup(model)
        if not cfg.embeddings:
            raise ApiError(400, f"Model '{cfg.id}' is served without embeddings.", param="model")
        engine = await self._engine(cfg)
        try:
            future = engine.embed(texts)
        finally:
            self.pool.release(engine)
        vectors, n_tokens = await asyncio.wrap_future(future)
        return JSONResponse({"object": "list", "model": model or cfg.id,
                             "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                             "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})

    async def seed_demo(self, request: Request) -> Response:
        """The seed's FastAPI demo: {"prompt"} -> {"response", "status", "time"}, with its system prompt."""
        body = await read_json(request, self.config.max_body_bytes)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise _invalid("prompt", "expected a string.")
        params = parse_gen({k: v for k, v in body.items() if k != "prompt"}, chat=True)
        messages = [{"role": "system", "content": SEED_SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        cfg = self.pool.lookup(params.model)

        def build(backend: Backend) -> list[int]:
            params.stop = [*params.stop, *backend.template.stop]
            params.max_tokens = params.max_tokens or backend.settings.max_tokens or SEED_MAX_TOKENS
            return chat_tokens(backend.template, backend.model, messages)

        job = await self._prepare(params, cfg, build)
        result = await collect(request, job)
        if result is None:
            return Response(status_code=499)
        now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        log.info('[%s] prompt:"%s", response:%r', now, prompt, result[0])
        return JSONResponse({"response": result[0], "status": 200, "time": now})

    async def list_models(self, request: Request) -> Response:
        loaded = self.pool.loaded()
        data = [{"id": cfg.id, "object": "model", "created": self.started, "owned_by": "ggufrun",
                 "aliases": [n for n in (*cfg.served_names, cfg.model) if n != cfg.id],
                 "status": loaded.get(cfg.id, "not loaded")} for cfg in self.config.models]
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        status = self.pool.status()
        return JSONResponse({"status": status, "models": self.pool.loaded()}, status_code=200 if status == "ready" else 503)

    async def metrics_text(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def page(self, request: Request) -> Response:
        html = resources.files("ggufrun.server").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html)


# ---- middleware ----------------------------------------------------------------------------------

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
            log.info('%s "%s %s" %d %.3fs', client[0], scope["method"], path, status[0], time.perf_counter() - started)
            self.metrics.request(path if path in self.routes else "other", status[0])


class BearerAuth:
    """With --api-key, every route but /health needs ``Authorization: Bearer KEY``, or
    ``x-api-key: KEY`` as Anthropic's clients send it."""

    OPEN = frozenset({"/health"})

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.OPEN:
            headers = dict(scope["headers"])
            bearer = hmac.compare_digest(headers.get(b"authorization", b""), self.expected)
            if not (bearer or hmac.compare_digest(headers.get(b"x-api-key", b""), self.key)):
                error = ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'.",
                                 kind="authentication_error")
                body = error.body()
                if scope["path"].startswith("/v1/messages"):
                    from .anthropic import error_body
                    body = error_body(401, error.message)
                elif scope["path"].startswith("/api/"):
                    body = {"error": error.message}
                response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def other_api_routes(server: Server) -> list[Route]:
    """The Anthropic, Ollama and Responses APIs and llama-server's token routes, each a
    translation onto ``Server.start_chat`` (imported here: they import this module)."""
    from . import anthropic, llamacpp, ollama, responses

    return [*anthropic.routes(server), *ollama.routes(server), *responses.routes(server), *llamacpp.routes(server)]


def create_app(config: ServeConfig, *, registry: Any = None, preload: bool = False) -> Starlette:
    """The ASGI app for ``config``. ``preload`` starts loading the first model at start-up
    (``ggufrun serve NAME``); otherwise each model loads on its first request."""
    if registry is None:
        from .. import registry as registry_mod

        registry = registry_mod.load(config.models_file)
    metrics = Metrics()
    server = Server(config, registry, metrics)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        server.loop = asyncio.get_running_loop()
        if preload:
            engine = server.pool.preload(config.models[0])
            engine.loaded.add_done_callback(lambda f: server.loop.call_soon_threadsafe(preload_done, f))  # type: ignore[union-attr]
        yield
        await server.pool.shutdown(SHUTDOWN_GRACE)

    def preload_done(future: Any) -> None:
        error = future.exception()
        if error is not None and server.stop_server is not None:
            server.fatal = error if isinstance(error, GgufrunError) else GgufrunError(str(error))
            server.stop_server()

    async def on_error(request: Request, exc: Exception) -> Response:
        error = api_error(exc)
        if error.status >= 500 and not isinstance(exc, GgufrunError):
            log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    routes = [
        Route("/", server.page, methods=["GET"]),
        Route("/", server.seed_demo, methods=["POST"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics_text, methods=["GET"]),
        Route("/v1/models", server.list_models, methods=["GET"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/embeddings", server.embeddings, methods=["POST"]),
        *other_api_routes(server),
    ]
    middleware = [Middleware(AccessLog, metrics=metrics, routes={r.path for r in routes})]
    if config.cors:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(config.cors), allow_methods=["GET", "POST", "OPTIONS"],
                                     allow_headers=["Authorization", "Content-Type", "x-api-key", "anthropic-version"]))
    if config.api_key:
        middleware.append(Middleware(BearerAuth, api_key=config.api_key))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={ApiError: on_error, GgufrunError: on_error, Exception: on_error})
    app.state.server = server
    return app
