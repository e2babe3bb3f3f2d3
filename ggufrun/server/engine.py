"""The scheduler: continuous batching of many requests over one model, on one thread.

llama.cpp contexts are not thread-safe, so every llama call for a model (load, decode, sample,
embed, free) happens on that model's engine thread. HTTP handlers run on the asyncio loop; they
hand the engine a :class:`Job` and read its events from an ``asyncio.Queue`` that the engine fills
through ``loop.call_soon_threadsafe``.

Each step the engine builds one batch: the last sampled token of every generating sequence, then
chunks of waiting prompts up to ``n_batch`` tokens, and evaluates it with one ``llama_decode``
(``Model.decode``). So a new request's prompt is processed alongside the others' next tokens
instead of after them, and ``--parallel N`` sequences cost little more per step than one.

Requests beyond the N slots wait in a bounded queue (``--max-queue``); past that, ``submit``
raises :class:`QueueFullError` (HTTP 503 with Retry-After). A cancelled job (client gone) leaves
its slot at the next step. ``stop(grace)`` refuses new work, lets running jobs finish for
``grace`` seconds, then cancels them, frees the model on this thread and ends it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import GgufrunError, ModelLoadError
from ..templates import split_stop
from .metrics import Metrics

log = logging.getLogger("ggufrun.server")


class QueueFullError(GgufrunError):
    """Every slot is busy and the wait queue is full."""

    http_status = 503


class ShuttingDownError(GgufrunError):
    """The server is stopping (or the model is being unloaded) and takes no new work."""

    http_status = 503


@dataclass
class Backend:
    """What the engine thread loaded: the model and how requests to it are shaped."""

    model: Any  # ggufrun.runtime.Model
    settings: Any  # ggufrun.settings.Settings, already merged
    template: Any  # ggufrun.templates.ChatTemplate
    n_ctx_seq: int  # the longest sequence (prompt + reply) one request may use
    description: str = ""


@dataclass
class GenRequest:
    """One generation, already tokenised and validated by the HTTP layer."""

    prompt: list[int]
    max_tokens: int  # >= 1, already capped so that prompt + reply fits n_ctx_seq
    sampling: dict[str, Any]  # Sampler keyword arguments
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass(slots=True)
class Event:
    """What a job's queue receives: text, then exactly one terminal event (done or error)."""

    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: GgufrunError | None = None


class Job:
    """A request's handle on both sides: the engine writes events, the handler reads them."""

    def __init__(self, request: GenRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.created = time.perf_counter()
        self.first_token_at: float | None = None
        # Set on the loop thread, read by the engine thread each step; a bool flip needs no lock.
        self.cancelled = False
        self.finished = False

    def cancel(self) -> None:
        """Called on the loop thread when the client goes away: the engine drops the job at its next
        step, and a reader still waiting on the queue (a job that never left it) wakes up."""
        if not self.cancelled:
            self.cancelled = True
            self.events.put_nowait(Event("done", finish_reason="cancelled"))

    def emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
            pass


@dataclass
class _EmbedJob:
    texts: list[str]
    future: concurrent.futures.Future[tuple[list[list[float]], int]]


@dataclass
class _Slot:
    seq_id: int
    job: Job | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet decoded
    last: int = -1  # the sampled token not yet decoded
    n_gen: int = 0
    sampler: Any = None
    decoder: Any = None
    held: str = ""  # text held back because it may be the start of a stop string
    used_at: float = 0.0


class Engine:
    """One model, one thread, up to ``parallel`` sequences decoded together."""

    def __init__(
        self,
        name: str,
        load: Callable[[], Backend],
        *,
        parallel: int,
        max_queue: int,
        metrics: Metrics,
        load_embedder: Callable[[Backend], Any] | None = None,
    ) -> None:
        self.name = name
        self.parallel = parallel
        self.max_queue = max_queue
        self.metrics = metrics
        self._load = load
        self._load_embedder = load_embedder
        self.backend: Backend | None = None
        self.state = "loading"  # loading | ready | failed | stopped
        self.loaded = concurrent.futures.Future[Backend]()
        self._cv = threading.Condition()
        self._queue: deque[Job] = deque()
        self._embeds: deque[_EmbedJob] = deque()
        self._slots = [_Slot(i) for i in range(parallel)]
        self._n_active = 0  # slots holding a job; read under the lock by submit()
        self._stopping = False
        self._deadline = 0.0
        self.leases = 0  # handlers between "engine is ready" and submit(); blocks eviction
        self.last_used = time.monotonic()
        self._embedder: Any = None
        self._thread = threading.Thread(target=self._run, name=f"engine:{name}", daemon=True)

    # ---- the loop thread's side -------------------------------------------------------------

    def start(self) -> Engine:
        self._thread.start()
        return self

    async def wait_ready(self) -> Backend:
        """The loaded backend; re-raises the load error."""
        return await asyncio.wrap_future(self.loaded)

    def submit(self, job: Job) -> None:
        """Queue a job; raise QueueFullError or ShuttingDownError."""
        with self._cv:
            if self._stopping:
                raise ShuttingDownError(f"Model '{self.name}' is shutting down.", "Retry in a moment.")
            waiting = len(self._queue) - (self.parallel - self._n_active)
            if waiting >= self.max_queue:
                raise QueueFullError(
                    f"Model '{self.name}' is busy: {self._n_active} requests running and {max(waiting, 0)} waiting.",
                    "Retry shortly.",
                )
            self._queue.append(job)
            self.last_used = time.monotonic()
            self._cv.notify()

    def embed(self, texts: list[str]) -> concurrent.futures.Future[tuple[list[list[float]], int]]:
        """Vectors and the token count, computed on the engine thread (the only one touching llama.cpp)."""
        future: concurrent.futures.Future[tuple[list[list[float]], int]] = concurrent.futures.Future()
        with self._cv:
            if self._stopping:
                raise ShuttingDownError(f"Model '{self.name}' is shutting down.")
            self._embeds.append(_EmbedJob(texts, future))
            self.last_used = time.monotonic()
            self._cv.notify()
        return future

    def busy(self) -> bool:
        with self._cv:
            return bool(self._n_active or self._queue or self._embeds or self.leases)

    def counts(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        with self._cv:
            return self._n_active, len(self._queue)

    def stop(self, grace: float = 0.0) -> None:
        """Refuse new work; cancel running jobs after ``grace`` seconds; the thread then ends."""
        with self._cv:
            if not self._stopping:
                self._stopping = True
                self._deadline = time.monotonic() + grace
            else:
                self._deadline = min(self._deadline, time.monotonic() + grace)
            self._cv.notify()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    # ---- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.backend = self._load()
        except BaseException as exc:
            self.state = "failed"
            err = exc if isinstance(exc, GgufrunError) else ModelLoadError(f"Loading '{self.name}' failed: {exc}.")
            log.error("loading model %s failed: %s", self.name, err, exc_info=not isinstance(exc, GgufrunError))
            self.loaded.set_exception(err)
            self._refuse_queued(err)
            return
        self.state = "ready"
        self.loaded.set_result(self.backend)
        log.info("model %s ready (%s, %d slots, %d tokens per request)", self.name, self.backend.description,
                 self.parallel, self.backend.n_ctx_seq)
        try:
            self._serve()
        except BaseException as exc:
            log.exception("engine for %s failed", self.name)
            err = ModelLoadError(f"The engine for '{self.name}' failed: {exc}.")
            for slot in self._slots:
                if slot.job is not None:
                    self._end(slot, error=err)
            self._refuse_queued(err)
        finally:
            self.state = "stopped"
            self._close()

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not (self._queue or self._embeds or self._n_active or self._stopping):
                    self._cv.wait()
                if self._stopping:
                    self._refuse_queued(ShuttingDownError("The server is shutting down.", "Retry against another instance."))
                    if not self._n_active or time.monotonic() >= self._deadline:
                        break
                embeds = list(self._embeds)
                self._embeds.clear()
                admitted = []
                for slot in self._slots:
                    if slot.job is not None or self._stopping:
                        continue
                    while self._queue and self._queue[0].cancelled:  # its client left while it waited
                        self._queue.popleft()
                    if not self._queue:
                        break
                    slot.job = self._queue.popleft()
                    self._n_active += 1
                    admitted.append(slot)
            for job in embeds:
                self._embed(job)
            for slot in admitted:
                self._admit(slot)
            if self._n_active:
                self._step()
        cut = ShuttingDownError("The server is shutting down; this reply was cut short.")
        for slot in self._slots:
            if slot.job is not None:
                self._end(slot, error=cut)

    def _refuse_queued(self, err: GgufrunError) -> None:
        while self._queue:
            self._queue.popleft().emit(Event("error", error=err))
        while self._embeds:
            self._embeds.popleft().future.set_exception(err)

    def _admit(self, slot: _Slot) -> None:
        """Give a job its slot: reuse the KV cache prefix it shares with the prompt, set up sampling."""
        from ..runtime import Sampler, TokenDecoder

        assert slot.job is not None and self.backend is not None
        model = self.backend.model
        req = slot.job.request
        # Prefer this slot's own cache; another idle slot with a longer shared prefix swaps in.
        shared = {s.seq_id: model.common_prefix(s.seq_id, req.prompt) for s in self._slots if s.job is None or s is slot}
        best = max((s for s in self._slots if s.seq_id in shared), key=lambda s: shared[s.seq_id])
        if best is not slot and shared[best.seq_id] > shared[slot.seq_id]:
            best.job, slot.job = slot.job, None
            slot = best
        common = min(shared[slot.seq_id], len(req.prompt) - 1)
        kept = model.truncate(slot.seq_id, common)
        slot.pending = list(req.prompt[kept:])
        slot.last = -1
        slot.n_gen = 0
        slot.held = ""
        slot.used_at = time.monotonic()
        slot.sampler = Sampler(model, **req.sampling)
        slot.decoder = TokenDecoder(model)
        self.metrics.prompt(self.name, len(req.prompt))

    def _step(self) -> None:
        assert self.backend is not None
        model = self.backend.model
        for slot in self._slots:
            if slot.job is not None and slot.job.cancelled:
                self._end(slot, finish_reason="cancelled")
        if self._stopping and time.monotonic() >= self._deadline:
            return
        running = [s for s in self._slots if s.job is not None]
        if not running:
            return
        self._make_room(running)
        running = [s for s in self._slots if s.job is not None]
        budget = model.n_batch
        batch: list[tuple[_Slot, list[int], bool]] = []
        for slot in running:  # generating sequences first: one token each keeps their pace steady
            if not slot.pending and budget > 0:
                batch.append((slot, [slot.last], True))
                budget -= 1
        for slot in running:
            if slot.pending and budget > 0:
                chunk, slot.pending = slot.pending[:budget], slot.pending[budget:]
                batch.append((slot, chunk, not slot.pending))
                budget -= len(chunk)
        try:
            outputs = model.decode([(s.seq_id, toks, want) for s, toks, want in batch])
        except GgufrunError as exc:
            for slot, _, _ in batch:
                model.reset(slot.seq_id)
                self._end(slot, error=exc)
            return
        sampled = 0
        for (slot, _, _), index in zip(batch, outputs):
            if index >= 0 and slot.job is not None:
                self._accept(slot, model.sample(slot.sampler, index))
                sampled += 1
        if sampled:
            self.metrics.generated(self.name, sampled)

    def _make_room(self, running: list[_Slot]) -> None:
        """Keep this step within the KV cache: drop idle slots' cached prefixes first, then end
        the longest running sequence (finish_reason "length") rather than fail the whole batch."""
        assert self.backend is not None
        model = self.backend.model

        def need() -> int:
            used = sum(model.seq_len(s.seq_id) for s in self._slots)
            step = sum(1 if not s.pending else min(len(s.pending), model.n_batch) for s in self._slots if s.job is not None)
            return used + step - model.n_ctx

        if need() <= 0:
            return
        for slot in sorted((s for s in self._slots if s.job is None), key=lambda s: s.used_at):
            model.reset(slot.seq_id)
            if need() <= 0:
                return
        while need() > 0:
            victims = [s for s in self._slots if s.job is not None and not s.pending]
            if not victims:
                return
            self._end(max(victims, key=lambda s: model.seq_len(s.seq_id)), finish_reason="length")

    def _accept(self, slot: _Slot, token: int) -> None:
        """Take one sampled token: end of turn, text and stop strings, length limits."""
        assert slot.job is not None and self.backend is not None
        job = slot.job
        req = job.request
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
            self.metrics.ttft(self.name, job.first_token_at - job.created)
        if self.backend.model.is_eog(token) and not req.ignore_eos:
            self._end(slot, finish_reason="stop")
            return
        slot.n_gen += 1
        slot.last = token
        text = slot.held + slot.decoder.feed(token)
        if req.stop:
            text, slot.held, hit = split_stop(text, req.stop)
            if hit:
                if text:
                    job.emit(Event("text", text))
                self._end(slot, finish_reason="stop", flush=False)
                return
        if text:
            job.emit(Event("text", text))
        if slot.n_gen >= req.max_tokens or self.backend.model.seq_len(slot.seq_id) + 1 >= self.backend.n_ctx_seq:
            self._end(slot, finish_reason="length")

    def _end(self, slot: _Slot, *, finish_reason: str = "", error: GgufrunError | None = None, flush: bool = True) -> None:
        job = slot.job
        if job is None:
            return
        if error is not None:
            job.emit(Event("error", error=error))
        elif not job.cancelled:
            tail = slot.held + (slot.decoder.flush() if flush and slot.decoder is not None else "")
            if flush and tail:
                job.emit(Event("text", tail))
            job.emit(Event("done", finish_reason=finish_reason, prompt_tokens=len(job.request.prompt),
                           completion_tokens=slot.n_gen))
        job.finished = True
        self.metrics.finished(self.name, "error" if error is not None else finish_reason or "cancelled")
        if slot.sampler is not None:
            slot.sampler.close()
        slot.sampler = slot.decoder = None
        slot.job = None
        slot.pending = []
        slot.held = ""
        slot.used_at = time.monotonic()
        with self._cv:
            self._n_active -= 1

    def _embed(self, job: _EmbedJob) -> None:
        assert self.backend is not None
        try:
            if self._embedder is None:
                if self._load_embedder is None:
                    raise GgufrunError(f"Model '{self.name}' does not serve embeddings.")
                self._embedder = self._load_embedder(self.backend)
            job.future.set_result(self._embedder.embed(job.texts))
        except GgufrunError as exc:
            job.future.set_exception(exc)
        except Exception as exc:  # noqa: BLE001 -- reported to the client as a 500, not a dead thread
            job.future.set_exception(ModelLoadError(f"Embedding failed: {exc}."))

    def _close(self) -> None:
        for holder in (self._embedder, self.backend.model if self.backend else None):
            if holder is not None:
                holder.close()
        self._embedder = None


