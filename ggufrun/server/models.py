"""Which models a server offers, how requests name them, and which of them are resident.

A serve config (``--config serve.toml``) lists models, each with its own settings::

    [server]                    # every key optional; command-line flags win
    host = "127.0.0.1"
    port = 13003                # 0: a free port, printed at start-up
    max_loaded = 2              # resident models at most; the least recently used goes first
    keep_alive = "5m"           # unload a model idle this long (Ollama's keep_alive; "-1": never)
    max_num_ctx = 32768         # a request's num_ctx above n_ctx reloads the model with it, up to this (default 0: a 400)
    parallel = 4                # default slots per model (sequences decoded together)
    max_queue = 64
    api_key = "..."
    cors = ["http://localhost:3000"]
    allowed_hosts = ["llm.lan"]  # Host names served beyond the loopback ones ("*": any)

    [[models]]
    model = "qwen2-7b-q5"           # a registry name, hf:/ms: reference or a .gguf path
    served_model_name = ["qwen2:7b"] # names clients use (vLLM's --served-model-name); the model name works too
    parallel = 2
    embeddings = true               # serve /v1/embeddings on the same context (default true)
    system = "@assistant"           # default system prompt: @NAME, a file or the text (default: the registry entry's)
    n_ctx = 8192                    # any ggufrun setting: n_gpu_layers, flash_attn, temperature...

A model loads on its first request, on its own engine thread, and unloads after ``keep_alive``
idle, or when another needs its memory or its place under ``max_loaded`` (lifecycle.py).
``n_ctx`` is per request, as Ollama's num_ctx: a model with ``parallel = 4`` gets a KV cache of 4 x n_ctx cells (capped at the
trained length), so four full-length requests fit at once.
"""

from __future__ import annotations

from pathlib import PurePath

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, GgufrunError, UnknownModelError
from ..remote import DEFAULT_PORT
from ..settings import FIELDS, Settings, coerce, load_toml, resolve
from .engine import Backend, Engine, ShuttingDownError
from .lifecycle import (DEFAULT_KEEP_ALIVE, REAP_SECONDS, KeepAliveError, Residency, estimate, format_keep_alive,
                        parse_keep_alive)
from .metrics import Metrics

if TYPE_CHECKING:
    from ..gguf_info import MemoryEstimate
    from ..registry import ModelSpec

log = logging.getLogger("ggufrun.server")

_SERVER_KEYS = {"host", "port", "max_loaded", "keep_alive", "max_num_ctx", "parallel", "max_queue", "api_key", "cors",
                "max_body_bytes", "allowed_hosts"}
_MODEL_KEYS = {"model", "served_model_name", "parallel", "embeddings", "system"}
EVICT_WAIT = 60.0  # seconds a request waits for a busy model to finish before loading another fails
# The most tokens a reply generates when neither the request nor the model's settings (models.toml,
# config, environment, --max-tokens) give a limit. llama-server generates until the context is full
# and Ollama until 10 x num_ctx: with a small model that loops, minutes of text nobody asked for.
# 2048 tokens hold a long answer or a page of code; a request may still ask for up to its context.
SERVE_MAX_TOKENS = 2048


@dataclass(frozen=True)
class ModelConfig:
    """One served model: what to load, the names it answers to, its settings table."""

    model: str
    served_names: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    parallel: int | None = None  # None: the server's --parallel
    embeddings: bool = True
    system: str | None = None  # the default system prompt (@NAME, a file or text); None: the registry entry's
    origin: str = "command line"  # where its settings come from, for errors: a serve config's table, else the flags

    @functools.cached_property  # read several times a request
    def id(self) -> str:
        """The name /v1/models lists first and responses carry: a served name, else the registry
        alias or the file's name, never a path (clients and /health must not learn the disk layout)."""
        if self.served_names:
            return self.served_names[0]
        return PurePath(self.model).name if "/" in self.model or "\\" in self.model else self.model


@dataclass(frozen=True)
class ServeConfig:
    models: tuple[ModelConfig, ...]
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    max_loaded: int = 3  # as OLLAMA_MAX_LOADED_MODELS on a CPU
    keep_alive: float = DEFAULT_KEEP_ALIVE  # seconds an idle model stays loaded; negative: forever
    max_num_ctx: int = 0  # the largest num_ctx a request may reload a model with (0: none, a larger one is a 400)
    parallel: int = 4
    max_queue: int = 64
    api_key: str | None = None
    cors: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()  # Host names beyond the loopback ones and the bound address (security.py)
    max_body_bytes: int = 8 * 1024 * 1024
    models_file: Path | None = None  # the --models overlay for the registry
    allow_image_urls: bool = False  # fetch http(s) image URLs in requests (server/media.py); data: URLs always

    def with_overrides(self, **values: Any) -> ServeConfig:
        """Command-line values (None = not given) over the file's."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    def with_settings(self, settings: dict[str, Any]) -> ServeConfig:
        """Command-line settings flags over every model's table (the command line wins)."""
        given = {k: coerce(k, v, "command line") for k, v in settings.items() if v is not None}
        return replace(self, models=tuple(replace(m, settings={**m.settings, **given}) for m in self.models))


def read_serve_config(path: Path) -> ServeConfig:
    """Parse a serve config strictly; errors name the file and the bad key."""
    data = load_toml(path)
    unknown = set(data) - {"server", "models"}
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}.", "Use [server] and [[models]].")
    server = data.get("server", {})
    if not isinstance(server, dict):
        raise ConfigError(f"{path}: [server] must be a table.")
    bad = set(server) - _SERVER_KEYS
    if bad:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(bad))} in [server].", f"Allowed: {', '.join(sorted(_SERVER_KEYS))}.")
    raw_models = data.get("models", [])
    if not isinstance(raw_models, list) or not raw_models:
        raise ConfigError(f"{path}: no models.", 'Add a [[models]] table with model = "NAME".')
    models = tuple(_model_from_toml(raw, f"{path} [[models]] #{i + 1}") for i, raw in enumerate(raw_models))
    _check_names(models, str(path))
    values: dict[str, Any] = {}
    for key in ("port", "max_loaded", "parallel", "max_queue", "max_body_bytes", "max_num_ctx"):
        if key in server:
            values[key] = _positive_int(server[key], f"{path} [server] {key}",
                                        allow_zero=key in ("max_queue", "port", "max_num_ctx"))
    if values.get("port", 1) > 65535:
        raise ConfigError(f"{path} [server] port must be 0-65535 (0: any free port; got {values['port']}).")
    if "host" in server:
        values["host"] = str(server["host"])
    if "keep_alive" in server:
        values["keep_alive"] = keep_alive_setting(server["keep_alive"], f"{path} [server] keep_alive")
    if "api_key" in server:
        values["api_key"] = str(server["api_key"]) or None
    for key, what in (("cors", "an origin"), ("allowed_hosts", "a host name")):
        if key in server:
            items = server[key]
            items = [items] if isinstance(items, str) else items
            if not isinstance(items, list) or not all(isinstance(c, str) for c in items):
                raise ConfigError(f"{path} [server] {key} must be {what} string or a list of them (got {server[key]!r}).")
            values[key] = tuple(items)
    return ServeConfig(models=models, **values)


def keep_alive_setting(value: Any, where: str) -> float:
    """A serve keep_alive ("5m", 300, "-1") as ServeConfig holds it: seconds, -1.0 for forever."""
    try:
        seconds = parse_keep_alive(value, where)
    except KeepAliveError as exc:
        raise ConfigError(str(exc)) from None
    return -1.0 if seconds is None else seconds


def single_model_config(name: str, served_names: tuple[str, ...], settings: dict[str, Any],
                        system: str | None = None) -> ServeConfig:
    """The config of ``ggufrun serve NAME``: one model whose settings (and system prompt) come from the flags."""
    models = (ModelConfig(model=name, served_names=served_names, system=system),)
    _check_names(models, "the command line")
    return ServeConfig(models=models).with_settings(settings)


@dataclass(frozen=True)
class ModelDefaults:
    """What a served model gives a request that leaves a field out, as Ollama applies a Modelfile's
    SYSTEM and PARAMETERs: the sampling settings and max_tokens (a request's own fields win), and
    the system prompt (a request with a system message of its own, instructions or system keeps it)."""

    settings: Settings
    system: str | None = None


def model_defaults(spec: ModelSpec, cfg: ModelConfig) -> ModelDefaults:
    """The defaults of ``cfg``'s model (``spec``, its registry entry): the one place they are
    resolved, for generation and for what /api/show and the chat page show. Raises ConfigError."""
    from .. import prompts

    # serve's own max_tokens is the lowest layer: the entry's defaults, the config file, the
    # environment and --max-tokens (0: until the end of turn or the context) all override it.
    settings = resolve({"max_tokens": SERVE_MAX_TOKENS, **(spec.defaults or {})}, cfg.settings)
    chosen = cfg.system if cfg.system is not None else spec.system
    return ModelDefaults(settings=settings, system=prompts.resolve_system(chosen) if chosen else None)  # "": none


def _model_from_toml(raw: Any, where: str) -> ModelConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table.")
    unknown = set(raw) - _MODEL_KEYS - set(FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}.",
                          f"Allowed: {', '.join(sorted(_MODEL_KEYS))} and the settings {', '.join(FIELDS)}.")
    model = raw.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ConfigError(f'{where} needs model = "NAME" (a registry name or a .gguf path).')
    names = raw.get("served_model_name", [])
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise ConfigError(f"{where}: served_model_name must be a name or a list of names.")
    settings = {k: coerce(k, v, where) for k, v in raw.items() if k in FIELDS}
    parallel = _positive_int(raw["parallel"], f"{where} parallel") if "parallel" in raw else None
    embeddings = raw.get("embeddings", True)
    if not isinstance(embeddings, bool):
        raise ConfigError(f"{where}: embeddings must be true or false.")
    system = raw.get("system")
    if system is not None and not isinstance(system, str):
        raise ConfigError(f'{where}: system must be a string (@NAME, a file or the text; "" for none).')
    return ModelConfig(model=model.strip(), served_names=tuple(n.strip() for n in names), settings=settings,
                       parallel=parallel, embeddings=embeddings, system=system, origin=where)


def _positive_int(value: Any, where: str, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ConfigError(f"{where} must be an integer >= {0 if allow_zero else 1} (got {value!r}).")
    return value


def _check_names(models: tuple[ModelConfig, ...], where: str) -> None:
    seen: dict[str, str] = {}
    for cfg in models:
        # the id too: two files of one base name, unnamed, would share an engine and a slots folder
        for name in (*cfg.served_names, cfg.id, cfg.model):
            if seen.get(name, cfg.model) != cfg.model:
                raise ConfigError(f"{where}: the name '{name}' is used by two models ({seen[name]} and {cfg.model}).",
                                  "Give each a distinct served_model_name.")
            seen[name] = cfg.model


class ModelPool:
    """The served models: name lookup, load on first use, at most ``max_loaded`` resident (LRU)."""

    def __init__(self, config: ServeConfig, registry: Any, metrics: Metrics) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self._engines: OrderedDict[str, Engine] = OrderedDict()  # by ModelConfig.id, least recently used first
        self._load_lock = asyncio.Lock()
        self.closing = False
        self.residency = Residency(None if config.keep_alive < 0 else config.keep_alive)
        self._reaper: asyncio.Task[None] | None = None
        self._grown: dict[str, int] = {}  # model id -> the n_ctx a request's num_ctx reloaded it with
        self._names: dict[str, ModelConfig] = {}
        from ..speculative import check_tuning

        for cfg in config.models:
            # an unknown name, a missing file or a bad system prompt or setting fails now, before the server starts
            spec = registry.resolve(cfg.model)
            check_tuning(model_defaults(spec, cfg).settings, [(f"models.toml entry '{spec.name}'", spec.defaults),
                                                              (cfg.origin, cfg.settings)])
            for name in (*cfg.served_names, cfg.id, cfg.model):
                self._names.setdefault(name, cfg)
        metrics.add_gauges(self._gauges)

    def defaults(self, cfg: ModelConfig) -> ModelDefaults:
        """The system prompt and settings ``cfg``'s requests get by default (model_defaults)."""
        return model_defaults(self.registry.resolve(cfg.model), cfg)

    def ids(self) -> list[str]:
        return [cfg.id for cfg in self.config.models]

    def lookup(self, name: str | None) -> ModelConfig:
        """The model a request names (the first one when it names none); raise UnknownModelError (404)."""
        if not name:
            return self.config.models[0]
        cfg = self._names.get(name) or self._by_registry_name(name)
        if cfg is None:
            raise UnknownModelError(f"Model '{name}' is not served here.", f"Served models: {', '.join(self.ids())}.")
        return cfg

    def _by_registry_name(self, name: str) -> ModelConfig | None:
        """A registry spelling of a served model ("gemma3-270m:q4_k_m" for "gemma3-270m")."""
        try:
            wanted = self.registry.resolve(name).name
        except GgufrunError:
            return None
        for cfg in self.config.models:
            try:
                if self.registry.resolve(cfg.model).name == wanted:
                    self._names[name] = cfg
                    return cfg
            except GgufrunError:
                continue
        return None

    def status(self) -> str:
        """'error' while a model's engine has died (its next request restarts it), 'loading' while any
        model loads, else 'ready'."""
        states = [e.state for e in self._engines.values()]
        if "crashed" in states:
            return "error"
        return "loading" if "loading" in states else "ready"

    def resident(self, name: str) -> Engine | None:
        """The engine of the model with id ``name`` if it is resident (loaded or loading), else None."""
        return self._engines.get(name)

    def loaded(self) -> dict[str, str]:
        return {name: engine.state for name, engine in self._engines.items()}

    async def acquire(self, cfg: ModelConfig) -> Engine:
        """The model's ready engine, loading it (and evicting the LRU idle one) when needed. The
        caller must ``release`` after submitting, so the engine is not evicted in between."""
        if self.closing:
            raise ShuttingDownError("The server is shutting down.", "Retry against another instance.")
        engine = self._engines.get(cfg.id)
        if engine is None or engine.state in ("failed", "crashed", "stopped"):
            # Only loads queue up behind this lock; requests to resident models never wait on it.
            async with self._load_lock:
                engine = self._engines.get(cfg.id)
                if engine is None or engine.state in ("failed", "crashed", "stopped"):
                    if engine is not None:
                        del self._engines[cfg.id]  # a failed load is retried by the next request
                    await self._make_room(self._sized(cfg))
                    engine = self._start(cfg)
        # No await from here to the lease: eviction (which skips leased engines) cannot slip in.
        self._engines.move_to_end(cfg.id)
        engine.leases += 1
        self.residency.touch(cfg.id)
        try:
            await engine.wait_ready()
        except BaseException:
            engine.leases -= 1
            raise
        return engine

    def release(self, engine: Engine) -> None:
        engine.leases -= 1
        self.residency.touch(engine.name)

    def unload(self, name: str) -> bool | None:
        """Unload model ``name`` now (Ollama's keep_alive 0, ``ggufrun stop``): True when done, False
        when it is busy (it unloads once its requests end), None when it is not resident."""
        engine = self._engines.get(name)
        if engine is None:
            return None
        self.residency.keep(name, 0.0)
        if engine.busy() or engine.state == "loading":
            return False
        self._evict(name, "asked to")
        return True

    def _evict(self, name: str, why: str) -> Engine:
        """Take ``name`` out of the pool and stop its engine; the caller has checked it is idle
        (with no await since: a request leases it on the loop, atomically with that check)."""
        engine = self._engines.pop(name)
        self.residency.forget(name)
        log.info("unloading model %s (%s)", name, why)
        engine.stop()
        return engine

    async def _reap(self) -> None:
        """Unload models idle past their keep_alive; a busy model's idle time starts again."""
        while not self.closing:
            await asyncio.sleep(REAP_SECONDS)
            now = time.monotonic()
            try:
                for name, engine in list(self._engines.items()):
                    if engine.state == "loading":
                        continue
                    if engine.busy():
                        self.residency.touch(name)
                    elif self.residency.expired(name, now):
                        keep = self.residency.keep_alive(name)
                        self._evict(name, f"idle for keep_alive {format_keep_alive(keep)}" if keep else "keep_alive 0")
            except Exception:  # noqa: BLE001 (a reaper that died would leave every model loaded, silently)
                log.exception("checking idle models failed")

    def preload(self, cfg: ModelConfig) -> Engine:
        """Start loading a model now (``ggufrun serve NAME``), so /health says loading, then ready."""
        return self._engines.get(cfg.id) or self._start(cfg)

    def _sized(self, cfg: ModelConfig) -> ModelConfig:
        """``cfg`` with the context a request's num_ctx reloaded it with, if one did."""
        grown = self._grown.get(cfg.id)
        return replace(cfg, settings={**cfg.settings, "n_ctx": grown}) if grown else cfg

    async def fit_context(self, cfg: ModelConfig, n_ctx: int) -> None:
        """Reload ``cfg``'s model with ``n_ctx`` tokens per request when a request asks for more than
        it was loaded with and --max-num-ctx allows that (Ollama reloads for a num_ctx). It keeps
        the larger context from then on (its later loads too), so that smaller requests fit in it
        without reloading it back. Waits for the running requests to end (never cuts them); ShuttingDownError (503)
        when they do not end within EVICT_WAIT."""
        if n_ctx > self.config.max_num_ctx:
            return  # within the served context, or the 400 of lifecycle.request_context
        engine = await self.acquire(cfg)
        try:
            assert engine.backend is not None
            have, trained = engine.backend.n_ctx_seq, engine.backend.model.n_ctx_train
        finally:
            self.release(engine)
        if n_ctx <= have or n_ctx > trained:
            return  # it fits; or no reload could hold it (the 400 says the limit)
        self._grown[cfg.id] = max(n_ctx, self._grown.get(cfg.id, 0))
        waited = 0.0
        while self._engines.get(cfg.id) is engine and engine.busy():
            if waited >= EVICT_WAIT:
                raise ShuttingDownError(f"Model '{cfg.id}' is busy; it reloads with num_ctx {n_ctx} once its requests end.",
                                        "Retry shortly.")
            await asyncio.sleep(0.05)
            waited += 0.05
        if self._engines.get(cfg.id) is engine:  # (no await since the check: nobody leased it in between)
            self._evict(cfg.id, f"reloading with num_ctx {n_ctx}")
            await asyncio.to_thread(engine.join, 10.0)

    def _start(self, cfg: ModelConfig) -> Engine:
        cfg = self._sized(cfg)
        parallel = cfg.parallel or self.config.parallel
        self.residency.snapshot_capacity()  # before the first load: the room every model shares
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())
        engine = Engine(cfg.id, lambda: self._load(cfg, parallel), parallel=parallel, max_queue=self.config.max_queue,
                        metrics=self.metrics, load_embedder=_load_embedder if cfg.embeddings else None)
        self._engines[cfg.id] = engine
        log.info("loading model %s (%s)", cfg.id, cfg.model)
        return engine.start()

    async def _make_room(self, cfg: ModelConfig) -> None:
        """Unload least recently used idle models until ``cfg`` fits: under --max-loaded, and in
        memory by its estimate (when its file is here to estimate from)."""
        need = await asyncio.to_thread(self._estimate, cfg)
        self.residency.set_memory(cfg.id, need)
        waited = 0.0
        while True:
            full = len(self._engines) >= self.config.max_loaded
            short = self.residency.shortfall(need, list(self._engines)) if need and self._engines and not full else None
            if not full and short is None:
                return
            idle = [e for e in self._engines.values() if not e.busy() and e.state != "loading"]
            if idle:
                victim = idle[0]  # the OrderedDict keeps least recently used first
                why = f"--max-loaded {self.config.max_loaded}" if full else f"'{cfg.id}' {short}"
                self._evict(victim.name, f"least recently used; {why}")
                await asyncio.to_thread(victim.join, 10.0)
                continue
            if waited >= EVICT_WAIT:
                reason = "" if full else f" ('{cfg.id}' {short})"
                raise ShuttingDownError(f"All {len(self._engines)} resident models are busy; "
                                        f"cannot load another now{reason}.",
                                        "Retry later, or raise --max-loaded." if full else "Retry later.")
            await asyncio.sleep(0.1)
            waited += 0.1

    def _estimate(self, cfg: ModelConfig) -> MemoryEstimate | None:
        """``cfg``'s memory as it would load now; None when its file is not here yet (a load fetches it)."""
        from ..gguf_info import inspect

        try:
            spec = self.registry.resolve(cfg.model)
            path = spec.cache_path()
            if spec.from_repo or not path.is_file():
                return None
            info = inspect(path)
            parallel = cfg.parallel or self.config.parallel
            settings = model_defaults(spec, cfg).settings
            plan = kv_plan(settings.n_ctx, parallel, info.context_length, extra=1 if cfg.embeddings else 0)
            return estimate(info, plan.cells, settings.n_gpu_layers, plan.n_ctx_seq, (settings.cache_type_k, settings.cache_type_v))
        except GgufrunError:
            return None  # the load reports it

    def _load(self, cfg: ModelConfig, parallel: int) -> Backend:
        """Runs on the engine thread: fetch if needed, load with one KV cache for every slot."""
        from ..fetch import ensure_local
        from ..gguf_info import inspect
        from ..loader import open_model
        from ..reasoning import detect
        from ..templates import select_template

        spec = self.registry.resolve(cfg.model)
        defaults = model_defaults(spec, cfg)
        per_request = defaults.settings
        path = ensure_local(spec)
        from ..trial import trial_load

        trial_load(path)  # a file that makes llama.cpp abort kills a child process, not this server
        info = inspect(path)
        plan = kv_plan(per_request.n_ctx, parallel, info.context_length, extra=1 if cfg.embeddings else 0)
        # Embeddings run on this same context, in one more sequence with its own part of the cache
        # (one slot's worth of cells more). Sharing the slots' cells as one pool (a unified cache)
        # saved that memory, but there a sequence's cells land where the others leave room, which
        # changes the order of attention's sums: a seeded or greedy reply changed with what ran
        # beside it, and is slower per step (Model.load).
        loaded = open_model(cfg.model, self.registry, {**cfg.settings, "n_ctx": plan.n_ctx_seq},
                            n_seq_max=parallel + (1 if cfg.embeddings else 0), kv_cells=plan.cells)
        model = loaded.model
        asked = model.settings.image_encoders
        if loaded.vision is None and asked != "auto":
            # the flag goes to every served model; one without a projector says so rather than drop it unsaid
            log.warning("%s has no vision projector: --image-encoders %s does nothing for it", cfg.id, asked)
        elif getattr(loaded.vision, "encoders", None) is not None:  # (a TextOnly projector encodes nothing)
            from ..vision import encoders_note

            note = encoders_note(asked, loaded.vision.encoders)
            if note:
                log.warning("%s: %s", cfg.id, note)
        # what it really takes: its cells, and the layers llama.cpp got ("auto" resolved)
        self.residency.set_memory(cfg.id, estimate(info, plan.cells, model.settings.n_gpu_layers, plan.n_ctx_seq,
                                                        (model.settings.cache_type_k, model.settings.cache_type_v)))
        # Structured output's vocabulary index (0.1-0.5 s), here before any request: built by the
        # first burst of constrained requests it starved the engine thread of the GIL (issue 22).
        # Embedding and reranking models (pooled outputs) seldom take a grammar: theirs is built by
        # the first constrained request, off the event loop (Server.submit).
        if not model.pools_embeddings:
            model.prepare_grammars()
        bos = model.detokenize([model.bos_id], special=True) if model.bos_id >= 0 else ""
        eos = model.detokenize([model.eos_id], special=True) if model.eos_id >= 0 else ""
        template = select_template(model.chat_template, loaded.family, per_request.template, bos_token=bos, eos_token=eos)
        return Backend(model=model, settings=per_request, template=template, n_ctx_seq=plan.n_ctx_seq,
                       description=model.description, embed_seq=parallel if cfg.embeddings else None,
                       system=defaults.system, reasoning=detect(template.jinja_source, per_request.reasoning_format),
                       vision=loaded.vision)

    def _gauges(self) -> dict[str, dict[str, float]]:
        queue, active, loaded = {}, {}, {}
        for name, engine in list(self._engines.items()):
            running, waiting = engine.counts()
            queue[name], active[name] = float(waiting), float(running)
            loaded[name] = 1.0 if engine.state == "ready" else 0.0
        return {"ggufrun_queue_depth": queue, "ggufrun_active_requests": active, "ggufrun_model_loaded": loaded}

    def drain(self, grace: float) -> None:
        """Take no new requests; running ones get ``grace`` seconds to finish, then are cut."""
        self.closing = True
        for engine in self._engines.values():
            engine.stop(grace)

    async def shutdown(self, grace: float) -> None:
        """Drain, then wait for every engine thread to free its model."""
        self.drain(grace)
        if self._reaper is not None:
            self._reaper.cancel()
        engines = list(self._engines.values())
        self._engines.clear()
        for engine in engines:
            await asyncio.to_thread(engine.join, grace + 2.0)


@dataclass(frozen=True)
class KvPlan:
    """How a served model's KV cache is laid out: every one of ``parallel`` slots can hold a
    request of ``n_ctx_seq`` tokens (prompt + reply) at the same time, in ``cells`` cells (each
    slot's own part of them, or one pool shared with an embedding sequence: Model.load)."""

    n_ctx_seq: int
    parallel: int
    cells: int


def kv_plan(n_ctx: int, parallel: int, n_ctx_train: int | None, *, extra: int = 0) -> KvPlan:
    """``--n-ctx`` is per request (0 = the trained length, and never beyond it), as in chat; the
    cache is sized for all slots at once (and ``extra`` sequences more: the embeddings'), each
    sequence in its own part, so admission never has to cut a running reply."""
    trained = n_ctx_train or n_ctx or 4096
    n_ctx_seq = min(n_ctx or trained, trained)
    return KvPlan(n_ctx_seq=n_ctx_seq, parallel=parallel, cells=n_ctx_seq * (parallel + extra))


def _load_embedder(backend: Backend) -> Any:
    """The generation context itself, in its spare sequence (no second context, no more memory);
    a model that pools its embeddings (an embedding model) gets a second context on the same
    weights with embeddings on, since pooling needs them on from the start."""
    from ..runtime import SeqEmbedder

    model = backend.model
    if backend.embed_seq is not None and not model.pools_embeddings:
        return SeqEmbedder(model, backend.embed_seq)
    try:
        return model.new_context(n_ctx=backend.settings.batch_size, embeddings=True)
    except GgufrunError as exc:
        raise GgufrunError(f"This model cannot produce embeddings: {exc.message}") from None
