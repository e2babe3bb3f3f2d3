"""The HTTP layer: an OpenAI-compatible API, the seed's ``POST /`` demo, a chat page, health and metrics.

Handlers validate the body (protocol.py), render and tokenise the prompt, and hand the model's
engine one Job per choice (see engine.py); they never call llama.cpp for generation themselves.
Replies are read by streaming.py. Errors are JSON in OpenAI's shape with the status the issue
asks for: malformed or invalid requests 400, unknown model or route 404, wrong method 405,
prompt longer than the context 400 (with the counts), body too large 413, queue or KV cache
full 503 (with Retry-After).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import hmac
import logging
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import PurePath
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ContextOverflowError, GgufrunError
from ..templates import chat_tokens
from . import constraints, limits
from . import protocol as P
from . import tools as T
from .engine import Backend, Engine, Event, GenRequest, Job, ShuttingDownError
from .metrics import Metrics
from .models import ModelConfig, ModelPool, ServeConfig
from .protocol import ApiError, GenParams, api_error, invalid
from .streaming import DONE, Collected, EventStream, JobGroup, collect, merged, sse

log = logging.getLogger("ggufrun.server")

SHUTDOWN_GRACE = 3.0  # seconds running requests get to finish after SIGTERM (uvicorn then waits 5 s at most)
SEED_SYSTEM_PROMPT = "You are a helpful assistant."  # what the seed's FastAPI demo sends before the prompt
SEED_MAX_TOKENS = 512  # the seed demo's max_new_tokens


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


def engine_fields() -> set[str]:
    """What this build's engine takes per request beyond text: GenRequest's fields plus the
    sampling parameters it knows. A request field the engine cannot honour is a 400."""
    names = {f.name for f in dataclasses.fields(GenRequest)}
    try:
        from ..generation import SamplingParams
    except ImportError:
        return names
    return names | {f.name for f in dataclasses.fields(SamplingParams)}


def _timings(done: Event) -> dict[str, Any]:
    """llama-server's ``timings`` object (the engine's when it reports one)."""
    if getattr(done, "timings", None):
        return dict(done.timings)
    prompt_ms = float(getattr(done, "prompt_ms", 0.0) or 0.0)
    predicted_ms = float(getattr(done, "predicted_ms", 0.0) or 0.0)
    cached = int(getattr(done, "cached_tokens", 0) or 0)
    prompt_n = max(done.prompt_tokens - cached, 0)
    gen_n = done.completion_tokens
    return {"cache_n": cached, "prompt_n": prompt_n, "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
            "prompt_per_second": prompt_n * 1000.0 / prompt_ms if prompt_ms else 0.0,
            "predicted_n": gen_n, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / gen_n if gen_n else 0.0,
            "predicted_per_second": gen_n * 1000.0 / predicted_ms if predicted_ms else 0.0}


def _usage(dones: dict[int, Event], n: int) -> dict[str, Any]:
    """Usage of the finished choices by index: the n choices of one prompt share it (index // n)."""
    prompt = sum(d.prompt_tokens for i, d in dones.items() if i % n == 0)
    completion = sum(d.completion_tokens for d in dones.values())
    cached = int(getattr(next(iter(dones.values())), "cached_tokens", 0) or 0) if dones else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _chat_logprobs(tokens: list[Any]) -> dict[str, Any]:
    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

    return {"content": [{**entry(t.text, t.logprob), "top_logprobs": [entry(s, lp) for s, lp in t.top]} for t in tokens],
            "refusal": None}


def _text_logprobs(tokens: list[Any], offset: int = 0) -> dict[str, Any]:
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens], "text_offset": offsets}


class _Choices:
    """Dresses the jobs' events in OpenAI's chat or text-completion objects, streamed or whole."""

    def __init__(self, chat: bool, model: str, params: GenParams, plan: T.ToolPlan | None, n: int) -> None:
        self.chat, self.model, self.params = chat, model, params
        self.plan = plan if plan is not None and plan.active else None
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.streams = [T.ToolStream(self.plan, incremental=True) if self.plan else None for _ in range(n)]
        self.n_calls = [0] * n
        self.offsets = [0] * n
        # Per choice, the stop string that ended it once it has: not in OpenAI's objects, but the
        # Anthropic translation reports it (stop_reason "stop_sequence").
        self.stop_sequences: list[str | None] = [None] * n

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": f"{self.object}.chunk" if self.chat else self.object, "created": self.created,
                "model": self.model, "system_fingerprint": "ggufrun", "choices": choices, **extra}

    def _delta(self, i: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        if self.chat:
            return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": i, "text": delta.get("content", ""), "logprobs": logprobs, "finish_reason": finish}

    def _logprobs(self, i: int, tokens: list[Any]) -> Any:
        if self.params.logprobs is None or not tokens:
            return None
        if self.chat:
            return _chat_logprobs(tokens)
        out = _text_logprobs(tokens, self.offsets[i])
        self.offsets[i] += sum(len(t.text) for t in tokens)
        return out

    def _call_deltas(self, i: int, call: dict[str, Any]) -> list[dict[str, Any]]:
        k = self.n_calls[i]
        self.n_calls[i] += 1
        args = call["function"]["arguments"]
        head = {"index": k, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"], "arguments": ""}}
        out = [self._delta(i, {"tool_calls": [head]})]
        for pos in range(0, len(args), 16):  # argument fragments, as OpenAI streams them
            out.append(self._delta(i, {"tool_calls": [{"index": k, "function": {"arguments": args[pos:pos + 16]}}]}))
        return out

    def _pieces(self, i: int, text: str, final: bool) -> list[dict[str, Any]]:
        stream = self.streams[i]
        if stream is None:
            return [self._delta(i, {"content": text})] if text else []
        parts = stream.feed(text) if text else []
        if final:
            parts += stream.finish()
        out = []
        for kind, value in parts:
            if kind == "content":
                out.append(self._delta(i, {"content": value}))
            elif kind == "call":
                out.extend(self._call_deltas(i, value))
            elif kind == "call_start":
                self.n_calls[i] += 1
                out.append(self._delta(i, {"tool_calls": [{"index": self.n_calls[i] - 1, "id": value["id"], "type": "function",
                                                           "function": {"name": value["function"]["name"], "arguments": ""}}]}))
            else:  # "args": a fragment of the current call's arguments, as the model writes them
                out.append(self._delta(i, {"tool_calls": [{"index": self.n_calls[i] - 1, "function": {"arguments": value}}]}))
        return out

    def _finish(self, i: int, reason: str) -> str:
        """OpenAI's "tool_calls" when the reply ended in calls; "length" stays when one was cut short."""
        return "tool_calls" if self.n_calls[i] and reason == "stop" else reason

    async def sse(self, group: JobGroup) -> AsyncIterator[bytes]:
        async for chunk in self.chunks(group):
            yield sse(chunk)
        yield DONE

    async def chunks(self, group: JobGroup) -> AsyncIterator[dict[str, Any]]:
        """The chunk objects of the stream (an error as an ``{"error": ...}`` object, then the end);
        the Anthropic, Ollama and Responses translations read these too."""
        n = len(group.jobs)
        if self.chat:
            yield self._chunk([self._delta(i, {"role": "assistant", "content": ""}) for i in range(n)])
        dones: dict[int, Event] = {}
        async for i, event in merged(group):
            if event.kind == "text":
                tokens = getattr(event, "tokens", None) or []
                pieces = self._pieces(i, event.text, final=False)
                logprobs = self._logprobs(i, tokens)
                if logprobs is not None and not pieces:  # text held back by the tool parser keeps its logprobs
                    pieces = [self._delta(i, {"content": ""})]
                for k, piece in enumerate(pieces):
                    if k == 0 and logprobs is not None:
                        piece["logprobs"] = logprobs
                    yield self._chunk([piece])
            elif event.kind == "done":
                self.stop_sequences[i] = getattr(event, "stop_sequence", None)
                for piece in self._pieces(i, "", final=True):
                    yield self._chunk([piece])
                dones[i] = event
                last = len(dones) == n
                extra: dict[str, Any] = {"timings": _timings(event)} if last and n == 1 else {}
                yield self._chunk([self._delta(i, {}, self._finish(i, event.finish_reason))], **extra)
                if last and self.params.include_usage:
                    yield self._chunk([], usage=_usage(dones, self.params.n))
            else:
                assert event.error is not None
                yield api_error(event.error).body()
                break

    def whole(self, results: list[Collected]) -> dict[str, Any]:
        choices = []
        for i, r in enumerate(results):
            assert r.done is not None
            self.stop_sequences[i] = getattr(r.done, "stop_sequence", None)
            logprobs = self._logprobs(i, r.tokens)
            if not self.chat:
                choices.append({"index": i, "text": r.text, "logprobs": logprobs, "finish_reason": r.done.finish_reason})
                continue
            message: dict[str, Any] = {"role": "assistant", "content": r.text}
            if self.plan is not None:
                content, calls = T.parse_reply(self.plan, r.text)
                message["content"] = content
                if calls:
                    message["tool_calls"] = calls
                    self.n_calls[i] = len(calls)
            message["refusal"] = None
            choices.append({"index": i, "message": message, "logprobs": logprobs,
                            "finish_reason": self._finish(i, r.done.finish_reason)})
        dones = {i: r.done for i, r in enumerate(results) if r.done is not None}
        body = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "system_fingerprint": "ggufrun", "choices": choices, "usage": _usage(dones, self.params.n)}
        if len(dones) == 1:
            body["timings"] = _timings(next(iter(dones.values())))
        return body


# ---- the application -----------------------------------------------------------------------------


def split_prefill(messages: list[dict[str, Any]]) -> str:
    """Take a final assistant message (no tool calls) off ``messages``: the reply continues its
    text (assistant prefill). Returns that text ("" when there is none)."""
    if messages[-1]["role"] != "assistant" or messages[-1].get("tool_calls"):
        return ""
    prefill: str = messages.pop()["content"]
    if not messages:
        raise invalid("messages", "a conversation cannot be only an assistant message.")
    return prefill


def prefill_tokens(backend: Backend, prefill: str) -> list[int]:
    """The prefill's tokens, as plain text after the rendered prompt."""
    return backend.model.tokenize(prefill, add_special=False, parse_special=False) if prefill else []

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
        self._engine_fields: set[str] | None = None

    def begin_shutdown(self) -> None:
        """Called from the signal handler: running requests get SHUTDOWN_GRACE seconds, then end
        with an error event, so their streams close cleanly before uvicorn's own deadline."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.pool.drain, SHUTDOWN_GRACE)

    def lookup(self, name: str | None) -> ModelConfig:
        """The served model a request names. Only served names count: a path, or another file
        with a served file's base name, is a 404 (the model field must not probe the disk)."""
        if name is not None and ("/" in name or "\\" in name or name.lower().endswith(".gguf")):
            exact = {n for cfg in self.config.models for n in (*cfg.served_names, cfg.id, cfg.model)}
            if name not in exact:
                raise ApiError(404, f"Model '{safe(name)}' is not served here. Served models: {', '.join(self.pool.ids())}.",
                               param="model", kind="not_found_error")
        return self.pool.lookup(name)

    def _supports(self, field: str) -> bool:
        if self._engine_fields is None:
            self._engine_fields = engine_fields()
        return field in self._engine_fields

    def _check_engine(self, params: GenParams, param_names: dict[str, str]) -> None:
        """Refuse what the engine of this build cannot do, rather than drop it."""
        wanted = {"grammar": params.grammar is not None, "logprobs": params.logprobs is not None,
                  "logit_bias": params.logit_bias is not None,
                  **{k: True for k in params.sampling if k in ("presence_penalty", "frequency_penalty", "repeat_last_n")}}
        for feature, asked in wanted.items():
            if asked and not self._supports(feature):
                param = param_names.get(feature, feature)
                raise P.unsupported(param, "this build's engine cannot apply it yet.")

    async def _engine(self, cfg: ModelConfig) -> Engine:
        """The model's engine; a model that fails to load is the server's fault (500), not the client's."""
        try:
            return await self.pool.acquire(cfg)
        except ShuttingDownError:
            raise
        except GgufrunError as exc:
            raise ApiError(500, f"Model '{cfg.id}' could not be loaded: {exc}", kind="server_error") from None

    async def _submit(self, params: GenParams, cfg: ModelConfig, build: Callable[[Backend], list[list[int]]]) -> JobGroup:
        """One job per prompt that ``build`` returns, times ``n``; submitted together or not at all."""
        engine = await self._engine(cfg)
        jobs: list[Job] = []
        try:
            backend = engine.backend
            assert backend is not None
            def prepare(backend: Backend) -> tuple[list[list[int]], list[Any]]:
                constraints.finish(params)  # a schema's grammar, built and checked
                prompts = build(backend)
                limits.check_generation(backend.model, params, prompts)
                if params.grammar is not None:  # (tools may have set it): the grammar's one-time index, here too
                    backend.model.prepare_grammars()
                return prompts, limits.compile_grammars(backend.model, params, len(prompts) * params.n)

            # off the event loop: rendering runs the GGUF's template, which may take up to its time
            # budget; converting a schema and compiling grammars take time too
            prompts, grammars = await asyncio.to_thread(prepare, backend)
            loop = asyncio.get_running_loop()
            requests = [self._gen_request(backend, tokens, params, k) for tokens in prompts for k in range(params.n)]
            for request in requests:
                job = Job(request, loop)
                job.grammar = grammars.pop(0) if grammars else None
                engine.submit(job)
                jobs.append(job)
        except BaseException:
            for job in jobs:
                job.cancel()
            raise
        finally:
            self.pool.release(engine)
        return JobGroup(jobs)

    def _gen_request(self, backend: Backend, tokens: list[int], params: GenParams, k: int) -> GenRequest:
        limit = backend.n_ctx_seq
        if not tokens:
            raise ApiError(400, "The prompt is empty.", param="prompt")
        if len(tokens) >= limit:
            raise ContextOverflowError(
                f"The prompt has {len(tokens)} tokens; the context holds {limit} per request, so no room is left for a reply.",
                "Shorten the prompt or serve the model with a larger --n-ctx.", n_tokens=len(tokens), n_ctx=limit)
        room = limit - len(tokens)
        wanted = params.max_tokens or backend.settings.max_tokens or room
        sampling = {k: v for k, v in backend.settings.sampling().items() if k != "max_tokens"}
        sampling["seed"] = backend.settings.seed
        sampling.update(params.sampling)
        if k and sampling.get("seed", -1) >= 0:  # n choices from one seed must still differ
            sampling["seed"] = (sampling["seed"] + k) % (1 << 32)
        for name, value in (("grammar", params.grammar), ("grammar_triggers", params.grammar_triggers),
                            ("logprobs", params.logprobs), ("logit_bias", params.logit_bias)):
            if value is not None:
                sampling[name] = value
        return GenRequest(prompt=tokens, max_tokens=min(wanted, room), sampling=sampling, stop=params.stop,
                          ignore_eos=params.ignore_eos)

    async def chat_completions(self, request: Request) -> Response:
        body = await read_json(request, self.config.max_body_bytes)
        group, params, choices = await self.start_chat(body)
        return await self._respond(request, group, params, choices)

    async def start_chat(self, body: dict[str, Any], endpoint: str = "/v1/chat/completions") -> tuple[JobGroup, GenParams, _Choices]:
        """Validate an OpenAI chat body and submit its jobs. The other APIs (Ollama, Anthropic,
        Responses) translate their requests into such a body and read the same events:
        ``collect(request, group)`` + ``choices.whole(...)``, or ``merged(group)`` to stream."""
        P.check_fields(body, P.CHAT_FIELDS, P.CHAT_REFUSED, endpoint)
        params = P.parse_gen(body, chat=True)
        messages = P.parse_messages(body)
        plan = T.parse_tools(body)
        cfg = self.lookup(params.model)
        prefill = split_prefill(messages)

        def build(backend: Backend) -> list[list[int]]:
            T.choose_format(plan, backend.template)
            tool_grammar = T.grammar(plan)
            if tool_grammar is not None:
                if params.grammar is not None:
                    raise invalid("tool_choice", "a forced tool call cannot be combined with response_format or a grammar.")
                params.grammar = tool_grammar
            elif params.grammar is None and self._supports("grammar"):
                lazy = T.lazy_grammar(plan)  # tool_choice auto: a call the reply starts is made valid
                if lazy is not None:
                    params.grammar, params.grammar_triggers = lazy
            self._check_engine(params, {"grammar": "tool_choice" if tool_grammar else "response_format",
                                        "logprobs": "logprobs"})
            params.stop = [*params.stop, *(s for s in backend.template.stop if s not in params.stop)]
            rendered, tools = T.prepare_messages(plan, messages, backend.template)
            return [chat_tokens(backend.template, backend.model, rendered, tools=tools) + prefill_tokens(backend, prefill)]

        group = await self._submit(params, cfg, build)
        return group, params, _Choices(True, params.model or cfg.id, params, plan, params.n)

    async def completions(self, request: Request) -> Response:
        body = await read_json(request, self.config.max_body_bytes)
        P.check_fields(body, P.COMPLETION_FIELDS, P.COMPLETION_REFUSED, "/v1/completions")
        params = P.parse_gen(body, chat=False)
        prompts = P.parse_prompts(body)
        cfg = self.lookup(params.model)

        def build(backend: Backend) -> list[list[int]]:
            self._check_engine(params, {"grammar": "grammar" if body.get("grammar") else "json_schema"})
            out = []
            for j, prompt in enumerate(prompts):
                if isinstance(prompt, list):
                    bad = [t for t in prompt if t >= backend.model.n_vocab]
                    if bad:
                        raise invalid("prompt", f"token id {bad[0]} is outside the vocabulary of {backend.model.n_vocab}.")
                    out.append(list(prompt))
                else:
                    out.append(backend.model.tokenize(prompt, add_special=True, parse_special=True))
            return out

        group = await self._submit(params, cfg, build)
        choices = _Choices(False, params.model or cfg.id, params, None, len(group.jobs))
        return await self._respond(request, group, params, choices)

    async def _respond(self, request: Request, group: JobGroup, params: GenParams, choices: _Choices) -> Response:
        if params.stream:
            return EventStream(group, choices.sse(group))  # type: ignore[return-value]
        results = await collect(request, group)
        if results is None:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        return JSONResponse(choices.whole(results))

    async def embed_texts(self, model: str | None, inputs: list[str] | list[Any]) -> tuple[ModelConfig, list[list[float]], int]:
        """Embed texts (or token-id lists) with the named model: (its config, the vectors, tokens
        in all). Every API's embeddings come here, so each refuses the same inputs: a model served
        without embeddings, a token outside the vocabulary, a text longer than one batch (the
        embedder would cut it)."""
        cfg = self.lookup(model)
        if not cfg.embeddings:
            raise ApiError(400, f"Model '{cfg.id}' is served without embeddings.", param="model")
        engine = await self._engine(cfg)
        try:
            backend = engine.backend
            assert backend is not None
            # off the event loop: text full of special-token strings is slow to tokenise
            texts = await asyncio.to_thread(limits.embedding_tokens, backend.model, inputs)
            future = engine.embed(texts)
        finally:
            self.pool.release(engine)
        vectors, n_tokens = await asyncio.wrap_future(future)
        return cfg, vectors, n_tokens

    async def embeddings(self, request: Request) -> Response:
        body = await read_json(request, self.config.max_body_bytes)
        params = P.parse_embeddings(body)
        cfg, vectors, n_tokens = await self.embed_texts(params.model, params.inputs)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if params.base64 else v}
                for i, v in enumerate(vectors)]
        return JSONResponse({"object": "list", "model": params.model or cfg.id, "data": data,
                             "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})

    async def seed_demo(self, request: Request) -> Response:
        """The seed's FastAPI demo: {"prompt"} -> {"response", "status", "time"}, with its system prompt."""
        body = await read_json(request, self.config.max_body_bytes)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise invalid("prompt", "expected a string.")
        rest = {k: v for k, v in body.items() if k != "prompt"}
        P.check_fields(rest, {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "repeat_penalty", "stop"},
                       {}, "POST /")
        params = P.parse_gen(rest, chat=True)
        messages = [{"role": "system", "content": SEED_SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        cfg = self.lookup(params.model)

        def build(backend: Backend) -> list[list[int]]:
            params.stop = [*params.stop, *backend.template.stop]
            params.max_tokens = params.max_tokens or backend.settings.max_tokens or SEED_MAX_TOKENS
            return [chat_tokens(backend.template, backend.model, messages)]

        group = await self._submit(params, cfg, build)
        results = await collect(request, group)
        if results is None:
            return Response(status_code=499)
        now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        log.info('[%s] prompt:"%s", response:"%s"', now, safe(prompt), safe(results[0].text))
        return JSONResponse({"response": results[0].text, "status": 200, "time": now})

    async def list_models(self, request: Request) -> Response:
        loaded = self.pool.loaded()
        data = [{"id": cfg.id, "object": "model", "created": self.started, "owned_by": "ggufrun",
                 "aliases": [n for n in cfg.served_names if n != cfg.id],
                 "status": loaded.get(cfg.id, "not loaded")} for cfg in self.config.models]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        """``GET /v1/models/{id}`` (openai's ``models.retrieve``): served names only, as for requests."""
        name = request.path_params["name"]
        if len(name) > P.MAX_NAME:
            raise invalid("model", f"model names are at most {P.MAX_NAME} characters (got {len(name)}).")
        cfg = self.lookup(name)
        return JSONResponse({"id": name, "object": "model", "created": self.started, "owned_by": "ggufrun",
                             "status": self.pool.loaded().get(cfg.id, "not loaded")})

    async def health(self, request: Request) -> Response:
        status = self.pool.status()
        # model ids only: a served id is never a path (ModelConfig.id), and /health needs no key
        models = {PurePath(name).name: state for name, state in self.pool.loaded().items()}
        return JSONResponse({"status": status, "models": models}, status_code=200 if status == "ready" else 503)

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
            log.info('%s "%s %s" %d %.3fs', safe(client[0]), safe(scope["method"]), safe(path), status[0],
                     time.perf_counter() - started)
            self.metrics.request(path if path in self.routes else "other", status[0])


class BearerAuth:
    """With --api-key, every route but /health and the chat page needs ``Authorization: Bearer KEY``,
    or ``x-api-key: KEY`` as Anthropic's clients send it. The page itself holds nothing secret: it
    asks the user for the key and sends it with each call."""

    OPEN = frozenset({("GET", "/health"), ("GET", "/"), ("HEAD", "/")})

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["method"], scope["path"]) not in self.OPEN and scope["method"] != "OPTIONS":
            headers = dict(scope["headers"])
            bearer = hmac.compare_digest(headers.get(b"authorization", b""), self.expected)
            if not (bearer or hmac.compare_digest(headers.get(b"x-api-key", b""), self.key)):
                message = "Missing or wrong API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'."
                body = error_shape(scope["path"], ApiError(401, message, kind="authentication_error"))
                response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def error_shape(path: str, error: ApiError) -> dict[str, Any]:
    """``error``'s body in the shape the clients of ``path``'s API read (Anthropic's under
    /v1/messages, Ollama's under /api/, else OpenAI's): for the errors no route handler answers
    (a wrong key, an unknown route or method)."""
    from . import anthropic

    if path.startswith("/v1/messages"):
        return anthropic.error_body(error.status, error.message)
    if path.startswith("/api/"):
        return {"error": error.message}
    return error.body()


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
        if isinstance(exc, ClientDisconnect):
            log.info("client disconnected while sending the body of %s %s", request.method, safe(request.url.path))
            return Response(status_code=499)
        if isinstance(exc, HTTPException):  # unknown route (404) or method (405): JSON too
            kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
            message = f"No route {request.method} {safe(request.url.path)}." if exc.status_code in (404, 405) else str(exc.detail)
            error = ApiError(exc.status_code, message, kind=kind, headers=dict(exc.headers or {}))
        else:
            error = api_error(exc)
        if error.status >= 500 and not isinstance(exc, GgufrunError):
            log.exception("unhandled error on %s %s", request.method, safe(request.url.path), exc_info=exc)
        return JSONResponse(error_shape(request.url.path, error), status_code=error.status, headers=error.headers)

    routes = [
        Route("/", server.page, methods=["GET"]),
        Route("/", server.seed_demo, methods=["POST"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics_text, methods=["GET"]),
        Route("/v1/models", server.list_models, methods=["GET"]),
        Route("/v1/models/{name:path}", server.get_model, methods=["GET"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/embeddings", server.embeddings, methods=["POST"]),
        *other_api_routes(server),
    ]
    middleware = [Middleware(AccessLog, metrics=metrics, routes={r.path for r in routes})]
    if config.cors:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(config.cors), allow_methods=["GET", "POST", "OPTIONS"],
                                     allow_headers=["*"]))  # the SDKs add x-stainless-*, anthropic-*, openai-*
    if config.api_key:
        middleware.append(Middleware(BearerAuth, api_key=config.api_key))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={ApiError: on_error, GgufrunError: on_error, HTTPException: on_error,
                                        ClientDisconnect: on_error, Exception: on_error})
    app.state.server = server
    return app
