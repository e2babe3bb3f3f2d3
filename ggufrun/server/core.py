"""The core every API stands on: the served models, their engines, prompt building and
prefill, the one generation pipeline, and embeddings. It speaks no API of its own.

Requests come in as OpenAI chat bodies (the lingua franca protocol.py checks; the other APIs
translate theirs into one) or as token lists; replies go out as the jobs' events, dressed by
replies.py. Errors are raised as ApiError / GgufrunError for each API's boundary to render.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from ..errors import ContextOverflowError, GgufrunError
from ..templates import chat_tokens
from . import constraints, lifecycle, limits, media
from . import protocol as P
from . import thinking
from . import tools as T
from .api_errors import ApiError, invalid
from .engine import Backend, Engine, GenRequest, Job, ShuttingDownError
from .metrics import Metrics
from .models import ModelConfig, ModelPool, ServeConfig
from .protocol import GenParams
from .replies import Choices
from .request import safe
from .streaming import JobGroup

SHUTDOWN_GRACE = 3.0  # seconds running requests get to finish after SIGTERM (uvicorn then waits 5 s at most)


def engine_fields() -> set[str]:
    """What this build's engine takes per request beyond text: GenRequest's fields plus the
    sampling parameters it knows. A request field the engine cannot honour is a 400."""
    names = {f.name for f in dataclasses.fields(GenRequest)}
    try:
        from ..generation import SamplingParams
    except ImportError:
        return names
    return names | {f.name for f in dataclasses.fields(SamplingParams)}


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
    """The served models and the one generation pipeline every API submits through."""

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

    def engine_supports(self, field: str) -> bool:
        """Whether this build's engine takes ``field`` (a GenRequest or sampling field)."""
        if self._engine_fields is None:
            self._engine_fields = engine_fields()
        return field in self._engine_fields

    def check_engine(self, params: GenParams, param_names: dict[str, str]) -> None:
        """Refuse what the engine of this build cannot do, rather than drop it."""
        wanted = {"grammar": params.grammar is not None, "logprobs": params.logprobs is not None,
                  "logit_bias": params.logit_bias is not None,
                  **{k: True for k in params.sampling if k in ("presence_penalty", "frequency_penalty", "repeat_last_n")}}
        for feature, asked in wanted.items():
            if asked and not self.engine_supports(feature):
                param = param_names.get(feature, feature)
                raise P.unsupported(param, "this build's engine cannot apply it yet.")

    async def acquire(self, cfg: ModelConfig) -> Engine:
        """The model's engine, loading it if needed; the caller must ``self.pool.release`` it after
        submitting. A model that fails to load is the server's fault (500), not the client's."""
        try:
            return await self.pool.acquire(cfg)
        except ShuttingDownError:
            raise
        except GgufrunError as exc:
            raise ApiError(500, f"Model '{cfg.id}' could not be loaded: {exc}", kind="server_error") from None

    async def submit(self, params: GenParams, cfg: ModelConfig, build: Callable[[Backend], list[list[int]]],
                     pictures: bool = False) -> JobGroup:
        """One job per prompt that ``build`` returns, times ``n``; submitted together or not at all.
        ``pictures``: ``build`` encodes images, in media's own threads (media.off_loop)."""
        engine = await self.acquire(cfg)
        jobs: list[Job] = []
        try:
            backend = engine.backend
            assert backend is not None
            def prepare(backend: Backend) -> tuple[list[list[int]], list[Any]]:
                params.grammar = constraints.finish(params.grammar, params.json_schema, params.grammar_param)
                prompts = build(backend)
                limits.check_generation(backend.model, prompts, params.n, params.logit_bias, params.grammar,
                                        params.grammar_param)
                if params.grammar is not None:  # (tools may have set it): the grammar's one-time index, here too
                    backend.model.prepare_grammars()
                count = len(prompts) * params.n  # (more than the engine can ever hold is its 400 below)
                grammars = limits.compile_grammars(backend.model, params.grammar, params.grammar_triggers,
                                                   count if count <= engine.parallel + engine.max_queue else 0)
                return prompts, grammars

            # off the event loop: rendering runs the GGUF's template, which may take up to its time
            # budget; converting a schema and compiling grammars take time too
            prompts, grammars = await (media.off_loop(prepare, backend) if pictures else asyncio.to_thread(prepare, backend))
            loop = asyncio.get_running_loop()
            requests = [self._gen_request(backend, tokens, params, k) for tokens in prompts for k in range(params.n)]
            jobs = [Job(request, loop) for request in requests]
            for job, grammar in zip(jobs, grammars):  # compiled above; the engine owns each once submitted
                job.grammar = grammar
            engine.submit_all(jobs, param="n" if params.n > 1 else "prompt")  # all or none: a 400 if they can never fit
        except BaseException:
            for job in jobs:
                job.cancel()
            raise
        finally:
            self.pool.release(engine)
        return JobGroup(jobs)

    def _gen_request(self, backend: Backend, tokens: list[int], params: GenParams, k: int) -> GenRequest:
        limit = lifecycle.request_context(backend.n_ctx_seq, params.n_ctx, params.model or self.config.models[0].id)
        if not tokens:
            raise ApiError(400, "The prompt is empty.", param="prompt")
        if len(tokens) >= limit:
            raise ContextOverflowError(
                f"The prompt has {len(tokens)} tokens; the context holds {limit} per request, so no room is left for a reply.",
                "Shorten the prompt or send a larger num_ctx." if limit < backend.n_ctx_seq else
                "Shorten the prompt or serve the model with a larger --n-ctx.", n_tokens=len(tokens), n_ctx=limit)
        room = limit - len(tokens)
        wanted = params.max_tokens or backend.settings.max_tokens or room
        sampling = {k: v for k, v in backend.settings.sampling(seed=True).items() if k != "max_tokens"}
        sampling.update(params.sampling)
        if k and sampling.get("seed", -1) >= 0:  # n choices from one seed must still differ
            sampling["seed"] = (sampling["seed"] + k) % (1 << 32)
        for name, value in (("grammar", params.grammar), ("grammar_triggers", params.grammar_triggers),
                            ("logprobs", params.logprobs), ("logit_bias", params.logit_bias)):
            if value is not None:
                sampling[name] = value
        if (params.draft[0] or params.draft[1]) and backend.model.speculator is None:
            raise ApiError(400, "This model is served without speculative decoding, so 'speculative.n_max'/'n_min' cannot apply.",
                           param="speculative.n_max" if params.draft[0] else "speculative.n_min")
        return GenRequest(prompt=tokens, max_tokens=min(wanted, room), sampling=sampling, stop=params.stop,
                          ignore_eos=params.ignore_eos, think=params.think, slot=params.slot,
                          images=params.images, draft=params.draft)

    async def start_chat(self, body: dict[str, Any], endpoint: str = "/v1/chat/completions",
                         n_ctx: int | None = None) -> tuple[JobGroup, GenParams, Choices]:
        """Validate an OpenAI chat body and submit its jobs. The other APIs (Ollama, Anthropic,
        Responses) translate their requests into such a body and read the same events:
        ``collect(request, group)`` + ``choices.whole(...)``, or ``merged(group)`` to stream."""
        P.check_fields(body, P.CHAT_FIELDS, P.CHAT_REFUSED, endpoint)
        params = P.parse_gen(body, chat=True)
        params.n_ctx = n_ctx
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
            elif params.grammar is None and self.engine_supports("grammar"):
                lazy = T.lazy_grammar(plan)  # tool_choice auto: a call the reply starts is made valid
                if lazy is not None:
                    params.grammar, params.grammar_triggers = lazy
            self.check_engine(params, {"grammar": "tool_choice" if tool_grammar else "response_format",
                                        "logprobs": "logprobs"})
            params.stop = [*params.stop, *(s for s in backend.template.stop if s not in params.stop)]
            rendered, tools = T.prepare_messages(plan, backend.with_system(messages), backend.template)
            variables = thinking.template_variables(params, backend.reasoning, backend.settings, cfg.id,
                                                     backend.template.jinja_source)
            if media.has_images(rendered):  # encoded here, off the loop and the engine thread
                tokens = media.prompt_tokens(backend, cfg.id, rendered, allow_urls=self.config.allow_image_urls,
                                             images=params.images, template=backend.template, tools=tools, variables=variables)
            else:
                tokens = chat_tokens(backend.template, backend.model, rendered, tools=tools, variables=variables)
            if not prefill:  # (a prefilled reply continues its own text, thinking or not)
                tokens = thinking.plan(params, backend.reasoning, backend.settings, backend.model, tokens)
            return [tokens + prefill_tokens(backend, prefill)]

        group = await self.submit(params, cfg, build, pictures=media.has_images(messages))
        return group, params, Choices(True, params.model or cfg.id, params, plan, params.n)

    async def embed_texts(self, model: str | None, inputs: list[str] | list[Any], n_ctx: int | None = None, *,
                          rank: bool = False) -> tuple[ModelConfig, list[list[float]], int]:
        """Embed texts (or token-id lists) with the named model: (its config, the vectors, tokens
        in all). Every API's embeddings come here, so each refuses the same inputs: a model served
        without embeddings, a token outside the vocabulary, a text longer than the embedder takes
        (a sequence's context on the generation context; one batch on an embedding model's own)."""
        cfg = self.lookup(model)
        if not cfg.embeddings:
            raise ApiError(400, f"Model '{cfg.id}' is served without embeddings.", param="model")
        engine = await self.acquire(cfg)
        try:
            backend = engine.backend
            assert backend is not None
            if backend.model.ranks != rank:  # a reranker's head gives scores, not vectors (rerank.py asks for them)
                why = "a reranker: send its texts to /v1/rerank" if backend.model.ranks else "not a reranker (no rank pooling)"
                raise ApiError(400, f"Model '{cfg.id}' is {why}.", param="model")
            # off the event loop: text full of special-token strings is slow to tokenise
            texts = await asyncio.to_thread(limits.embedding_tokens, backend.model, inputs, limits.embedding_limit(backend))
            if n_ctx is not None:  # Ollama's num_ctx: each text within it, and it within the served context
                lifecycle.check_embed_context(texts, lifecycle.request_context(backend.n_ctx_seq, n_ctx, cfg.id))
            future = engine.embed(texts)
        finally:
            self.pool.release(engine)
        vectors, n_tokens = await asyncio.wrap_future(future)
        return cfg, vectors, n_tokens


@asynccontextmanager
async def backend_for(server: Server, model: str | None) -> AsyncIterator[tuple[Backend, ModelConfig]]:
    """The named model's loaded backend, leased (not evicted) while the block runs on the loop."""
    cfg = server.lookup(model)
    engine = await server.acquire(cfg)
    try:
        assert engine.backend is not None
        yield engine.backend, cfg
    finally:
        server.pool.release(engine)


async def chat_prompt(server: Server, body: dict[str, Any]) -> tuple[str, list[int]]:
    """The prompt text and tokens an OpenAI chat body renders to (tools included), without
    generating: for count_tokens and /apply-template."""
    messages = P.parse_messages(body)
    prefill = split_prefill(messages)  # as start_chat does: the count is the prompt a reply would get
    plan = T.parse_tools(body)
    params = GenParams(model=None)
    P.parse_reasoning(body, params)  # thinking on or off changes the prompt (and a model that cannot think refuses it)
    async with backend_for(server, P.model_name(body)) as (backend, cfg):
        def render() -> tuple[str, list[int]]:  # a template may take seconds: off the event loop, as chat's
            T.choose_format(plan, backend.template)
            rendered, tools = T.prepare_messages(plan, backend.with_system(messages), backend.template)
            variables = thinking.template_variables(params, backend.reasoning, backend.settings, cfg.id,
                                                     backend.template.jinja_source)
            text = backend.template.render(media.as_text(rendered), add_generation_prompt=True, tools=tools, variables=variables)
            if media.has_images(rendered):  # an image's tokens count as in the reply's prompt
                tokens = media.prompt_tokens(backend, cfg.id, rendered, allow_urls=server.config.allow_image_urls, images=[],
                                             template=backend.template, tools=tools, variables=variables)
            else:
                tokens = chat_tokens(backend.template, backend.model, rendered, tools=tools, variables=variables)
            if not prefill:  # what start_chat adds to turn thinking off where the template cannot
                steered = thinking.plan(params, backend.reasoning, backend.settings, backend.model, tokens)
                text += backend.model.detokenize(steered[len(tokens):], special=True)
                tokens = steered
            return text + prefill, tokens + prefill_tokens(backend, prefill)

        return await asyncio.to_thread(render)
