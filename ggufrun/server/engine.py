"""The scheduler: continuous batching of many requests over one model, on one thread.

llama.cpp contexts are not thread-safe, so every llama call for a model (load, decode, sample,
embed, free) happens on that model's engine thread. HTTP handlers run on the asyncio loop; they
hand the engine a :class:`Job` and read its events from an ``asyncio.Queue`` that the engine fills
through ``loop.call_soon_threadsafe``.

Each step the engine builds one batch: the last sampled token of every generating sequence, then
a chunk of the waiting prompts or of the text being embedded, within a per-step budget
(budget.py: in estimated time, so a step stays within a multiple of a plain decode step, the
prompts and the text taking turns), and evaluates it with one ``llama_decode`` (``Model.decode``).
So a new request's prompt, or a text to embed, is processed alongside the others' next tokens
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
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ContextOverflowError, GgufrunError, ModelLoadError
from ..generation import GenStats, Generation, SamplingParams, TokenInfo
from ..images import count_runs, run_end, runs_end
from .budget import StepBudget, fixed_tokens
from .metrics import Metrics

log = logging.getLogger("ggufrun.server")
_SHARE_MIN = 16  # prompt tokens in common worth sharing KV cells for


# A documented test hook (README, environment variables): a job whose seed is this number fails inside the
# engine's batched sampling, as a bug in one request's sampler would, so tests can check that it
# ends alone. Unset in production.
FAULT_SEED = os.environ.get("GGUFRUN_TEST_FAULT_SEED")


class JobFailedError(GgufrunError):
    """One request failed inside the engine (its sampler, grammar or text hand-out); only it ends."""

    http_status = 500


class QueueFullError(GgufrunError):
    """Every slot is busy and the wait queue is full."""

    http_status = 503


class TooManyJobsError(GgufrunError):
    """A request needs more sequences than the engine can ever hold at once (slots + queue): no
    retry can succeed, so it is the client's error (400), not a 503."""

    http_status = 400

    def __init__(self, message: str, hint: str | None = None, *, param: str | None = None) -> None:
        super().__init__(message, hint)
        self.param = param


class SlotBusyError(GgufrunError):
    """A slot operation (save, restore, erase) named a slot a request is running in."""

    http_status = 409


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
    embed_seq: int | None = None  # a sequence beyond the slots for embeddings on this context (its cells are reserved per text)
    reasoning: Any = None  # reasoning.ThinkFormat when the model thinks before it answers
    system: str | None = None  # the model's default system prompt (models.ModelDefaults)
    vision: Any = None  # llama.vision.Projector when the model sees images (server/media.py)

    def with_system(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``messages`` with the model's default system prompt first, unless they carry a system
        message of their own (every API's system field arrives as one), as Ollama applies SYSTEM."""
        if self.system is None or any(m.get("role") == "system" for m in messages):
            return messages
        return [{"role": "system", "content": self.system}, *messages]


@dataclass
class GenRequest:
    """One generation, already tokenised and validated by the HTTP layer.

    ``sampling`` holds :class:`ggufrun.generation.SamplingParams` fields: temperature, top_p,
    top_k, min_p, repeat_penalty, presence_penalty, frequency_penalty, repeat_last_n, seed,
    logit_bias ({token id: bias}, -inf or <= -100 bans), grammar (GBNF text; a grammar llama.cpp
    rejects raises GrammarError, 400, from :meth:`Engine.submit`), grammar_triggers (patterns that
    make the grammar lazy: it applies from where one matches the reply) and logprobs (None = off, 0..20 =
    the sampled token's logprob plus that many alternatives, after temperature, penalties and bias).
    """

    prompt: list[int]
    max_tokens: int  # >= 1, already capped so that prompt + reply fits n_ctx_seq
    sampling: dict[str, Any]  # SamplingParams fields
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    think: Any = None  # reasoning.ThinkBudget: thinking tokens counted (and budgeted) for a reasoning model
    draft: tuple[int | None, int | None] = (None, None)  # the request's speculative.n_max, n_min (None: the server's)
    slot: int | None = None  # the slot (sequence) it must run in (llama-server's id_slot); it waits for it
    images: list[Any] = field(default_factory=list)  # the embeddings its image tokens name, held while it lives


@dataclass(slots=True)
class Event:
    """What a job's queue receives: text, then exactly one terminal event (done or error).

    A text event carries ``tokens`` (the TokenInfo behind its text) when logprobs were asked; the
    done event carries the counts and ``timings`` (llama-server's object: prompt_n, prompt_ms,
    predicted_n, predicted_ms, their per-token and per-second rates, cache_n)."""

    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: GgufrunError | None = None
    tokens: list[TokenInfo] = field(default_factory=list)
    cached_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    stop_sequence: str | None = None  # done: the stop string that ended the reply, if one did
    reasoning_tokens: int = 0  # done: of completion_tokens, those spent thinking


def timings(stats: GenStats) -> dict[str, float]:
    """llama-server's ``timings`` object from one generation's stats."""
    prompt_n = stats.prompt_tokens - stats.cached_tokens
    prompt_ms, predicted_ms = stats.prompt_seconds * 1e3, stats.gen_seconds * 1e3
    return {
        "cache_n": stats.cached_tokens, "prompt_n": prompt_n, "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
        "prompt_per_second": 1e3 * prompt_n / prompt_ms if prompt_ms else 0.0,
        "predicted_n": stats.gen_tokens, "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / max(stats.gen_tokens - 1, 1),
        "predicted_per_second": stats.gen_tps,
        **({"draft_n": stats.draft_n, "draft_n_accepted": stats.draft_accepted} if stats.draft_n else {}),
    }


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
        self.finished = False  # set by the engine thread with the terminal event; cancel() is then a no-op
        self.grammar: Any = None  # compiled at submit, so a bad grammar is the client's 400 there
        # The request this job is one choice (or prompt) of: admission shares the slots between
        # requests, not jobs (Engine._next_job).
        self.group: object = self
        # A job paused for another request (Engine._preempt): its Generation (sampler, grammar and
        # random state), and the tokens whose KV it had (prompt, reply so far), recomputed on return.
        self.paused: Generation | None = None
        self.resume: list[int] = []
        self.slot = -1  # the slot it runs in, once admitted (llama-server's id_slot in replies)

    def cancel(self) -> None:
        """Called on the loop thread when the client goes away: the engine drops the job at its next
        step, and a reader still waiting on the queue (a job that never left it) wakes up."""
        if not self.cancelled and not self.finished:
            self.cancelled = True
            self.events.put_nowait(Event("done", finish_reason="cancelled"))

    def emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
            pass


def _deliver(batch: list[tuple[Job, Event]]) -> None:
    for job, event in batch:
        job.events.put_nowait(event)


def _post(outbox: list[tuple[Job, Event]]) -> None:
    """Hand a step's events to their loops: one wake-up per loop, not one per event (64 streams'
    tokens in one callback rather than 64 self-pipe writes and 64 turns of the loop)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Event]]] = {}
    for job, event in outbox:
        by_loop.setdefault(job.loop, []).append((job, event))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, batch)
        except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
            pass


@dataclass
class _EmbedJob:
    texts: Sequence[str | list[int]]  # token ids, or text tokenised on the engine thread
    future: concurrent.futures.Future[tuple[list[list[float]], int]]
    vectors: list[list[float]] = field(default_factory=list)
    n_tokens: int = 0
    steps: Any = None  # the text being embedded on a context of its own: a Model.embed_steps generator, one decode per step
    cells: int = 0  # KV cells reserved for that text (embeddings on the generation context)
    waiting: bool = False  # its text waits for cells: admissions pause meanwhile
    tokens: list[int] | None = None  # that text's tokens, kept while it waits and while it is embedded
    sent: int = 0  # on the generation context: tokens of that text in decodes so far (chunks of the steps' batches)
    total: Any = None  # and the sum of their hidden states (float64), for the mean

    def drop(self) -> None:
        if self.steps is not None:
            self.steps.close()  # now, on the engine thread, while the model is alive (not at garbage collection)
            self.steps = None
        self.cells, self.waiting = 0, False


@dataclass
class _Slot:
    seq_id: int
    job: Job | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet decoded
    to_read: int = 0  # the prompt tokens it had to decode when admitted (budget.whole judges a prompt by them)
    last: int = -1  # the sampled token not yet decoded
    gen: Generation | None = None
    reserved: int = 0  # KV cells promised to this job at admission (prompt + max_tokens)
    used_at: float = 0.0
    draft: list[int] = field(default_factory=list)  # speculative tokens decoded after ``last`` in the step in flight



def _done(reason: str, st: GenStats, gen: Any) -> Event:
    """A reply's closing event from its generation's stats (``gen`` None: it never started)."""
    return Event("done", finish_reason=reason, prompt_tokens=st.prompt_tokens, cached_tokens=st.cached_tokens,
                 completion_tokens=st.gen_tokens, timings=timings(st),
                 stop_sequence=gen.stop_sequence if gen is not None else None, reasoning_tokens=st.reasoning_tokens)

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
        self.state = "loading"  # loading | ready | failed (load) | crashed (while serving) | stopped
        self.loaded = concurrent.futures.Future[Backend]()
        self._cv = threading.Condition()
        self._queue: deque[Job] = deque()
        self._embeds: deque[_EmbedJob] = deque()
        self._slots = [_Slot(i) for i in range(parallel)]
        self._n_active = 0  # slots holding a job; read under the lock by submit()
        self._stopping = False
        self._deadline = 0.0
        self.leases = 0  # handlers between "engine is ready" and submit(); blocks eviction
        self.error: GgufrunError | None = None  # why the engine failed or crashed
        self._embedder: Any = None
        self._thread = threading.Thread(target=self._run, name=f"engine:{name}", daemon=True)
        self._profile = _StepProfile(name) if os.environ.get("GGUFRUN_STEP_PROFILE") else None
        self._inflight: list[tuple[_Slot, Job]] = []  # the queued decode's output rows, in order, with their jobs
        self._outbox: list[tuple[Job, Event]] | None = None  # events of step()'s hand-out, posted together
        self._preempted = 0  # replies paused for other requests, in all
        self._budget: StepBudget | None = None  # set once loaded (it needs n_batch and the settings)
        self._embed_rows: tuple[_EmbedJob, int, int] | None = None  # the decode in flight's embedding chunk: job, first output, count
        self._decoded = False  # a decode was queued since the last step read its results
        self._turn = 0  # which waiting prompt goes first this step
        self._calls: deque[tuple[int, Callable[[Any, int], Any], concurrent.futures.Future[Any]]] = deque()

    # ---- the loop thread's side -------------------------------------------------------------

    def start(self) -> Engine:
        self._thread.start()
        return self

    async def wait_ready(self) -> Backend:
        """The loaded backend; re-raises the load error."""
        if self.loaded.done():  # every request asks: no future to chain once the model is in
            return self.loaded.result()
        return await asyncio.wrap_future(self.loaded)

    def submit(self, job: Job) -> None:
        """Queue a job; raise QueueFullError, ShuttingDownError or GrammarError (a grammar llama.cpp rejects)."""
        self.submit_all([job])

    def submit_all(self, jobs: list[Job], param: str | None = None) -> None:
        """Queue one request's jobs (its prompts times its choices) together or not at all.

        Raises TooManyJobsError (400, naming ``param``) when they outnumber the slots plus the
        queue, so that waiting cannot help; QueueFullError (503) when the queue is full now;
        ShuttingDownError; GrammarError (a grammar llama.cpp rejects)."""
        capacity = self.parallel + self.max_queue
        if len(jobs) > capacity:
            raise TooManyJobsError(
                f"This request needs {len(jobs)} sequences (prompts x n); model '{self.name}' runs {self.parallel} at once "
                f"and queues {self.max_queue} more, so it can never be accepted.",
                f"Send at most {capacity} per request, or serve with a larger --parallel or --max-queue.", param=param)
        for job in jobs:
            job.group = jobs[0]
            grammar = job.request.sampling.get("grammar")
            if grammar and job.grammar is None and self.backend is not None:
                # Parsing reads only the immutable vocabulary, so it is safe off the engine thread.
                job.grammar = self.backend.model.grammar(grammar, job.request.sampling.get("grammar_triggers") or ())
        with self._cv:
            if self._stopping or self.state != "ready":
                raise self._refusal()
            while self._queue and self._queue[-1].cancelled and self._queue[-1].paused is None:  # clients that gave up
                self._queue.pop()
            if any(j.cancelled and j.paused is None for j in self._queue):  # (a paused one is the engine's to free)
                self._queue = deque(j for j in self._queue if not j.cancelled or j.paused is not None)
            waiting = len(self._queue) + len(jobs) - (self.parallel - self._n_active)
            if waiting > self.max_queue:
                raise QueueFullError(
                    f"Model '{self.name}' is busy: {self._n_active} requests running and "
                    f"{max(len(self._queue) - (self.parallel - self._n_active), 0)} waiting.",
                    "Retry shortly.",
                )
            self._queue.extend(jobs)
            self._cv.notify()

    def _refusal(self) -> GgufrunError:
        if self.error is not None:
            return self.error
        return ShuttingDownError(f"Model '{self.name}' is shutting down.", "Retry in a moment.")

    def embed(self, texts: Sequence[str | list[int]]) -> concurrent.futures.Future[tuple[list[list[float]], int]]:
        """Vectors and the token count, computed on the engine thread one text per step, between
        generation steps; cancelling the future drops the rest of the work."""
        future: concurrent.futures.Future[tuple[list[list[float]], int]] = concurrent.futures.Future()
        with self._cv:
            if self._stopping or self.state != "ready":
                raise self._refusal()
            self._embeds.append(_EmbedJob(texts, future))
            self._cv.notify()
        return future

    def call_on_slot(self, slot: int, fn: Callable[[Any, int], Any]) -> concurrent.futures.Future[Any]:
        """Run ``fn(model, seq_id)`` on the engine thread between steps (llama-server's slot save,
        restore, erase); its future raises SlotBusyError while a request runs in that slot."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._cv:
            if self._stopping or self.state != "ready":
                raise self._refusal()
            self._calls.append((slot, fn, future))
            self._cv.notify()
        return future

    def slot_states(self) -> list[tuple[int, bool, int]]:
        """(slot id, whether a request runs in it, tokens in its KV cache) per slot: a snapshot."""
        model = self.backend.model if self.backend is not None else None
        return [(s.seq_id, s.job is not None, model.seq_len(s.seq_id) if model is not None else 0) for s in self._slots]

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
            err = exc if isinstance(exc, GgufrunError) else ModelLoadError(f"Loading '{self.name}' failed: {exc}.")
            log.error("loading model %s failed: %s", self.name, err, exc_info=not isinstance(exc, GgufrunError))
            self._fail(err, "failed")
            self.loaded.set_exception(err)
            return
        self._budget = StepBudget(self.backend.model.n_batch, fixed_tokens(getattr(self.backend.settings, "step_tokens", None)))
        self.state = "ready"
        self.loaded.set_result(self.backend)
        log.info("model %s ready (%s, %d slots, %d tokens per request)", self.name, self.backend.description,
                 self.parallel, self.backend.n_ctx_seq)
        try:
            self._serve()
        except BaseException as exc:
            log.exception("engine for %s failed", self.name)
            err = ModelLoadError(f"The engine for '{self.name}' failed: {exc}.")
            self._fail(err, "crashed")
            for slot in self._slots:
                if slot.job is not None:
                    self._end(slot, error=err)
        finally:
            if self.state != "crashed" and self.state != "failed":
                self.state = "stopped"
            if self._inflight and self.backend is not None:  # a crash with a decode queued: let it finish before freeing
                self.backend.model.synchronize()
            self._close()

    def _fail(self, err: GgufrunError, state: str) -> None:
        """Refuse everything waiting and everything submitted from now on, atomically with submit()."""
        with self._cv:
            self.error = err
            self.state = state
            self._stopping = True
            self._refuse_queued(err)

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not (self._queue or self._embeds or self._n_active or self._stopping or self._inflight or self._calls):
                    self._cv.wait()
                if self._stopping:
                    self._refuse_queued(ShuttingDownError("The server is shutting down.", "Retry against another instance."))
                    if not self._n_active or time.monotonic() >= self._deadline:
                        break
            self.step()
        if self._inflight and self.backend is not None:
            self.backend.model.synchronize()  # nothing may be freed under the device's feet
        self._inflight = []
        cut = ShuttingDownError("The server is shutting down; this reply was cut short.")
        for slot in self._slots:
            if slot.job is not None:
                self._end(slot, error=cut)

    def _admissions(self) -> list[_Slot]:
        """Under the lock: queued jobs that get a slot now (:meth:`_next_job` picks, fair between
        requests). A job is admitted only when its KV budget (prompt + max_tokens) is free, so no
        running reply is ever cut short for room; otherwise it (and those behind it) wait. A request
        with no slot while another holds several gets one of them (:meth:`_preempt`)."""
        if self._stopping or self.backend is None or (self._embeds and self._embeds[0].waiting):
            return []
        self._drop_cancelled_paused()
        admitted: list[_Slot] = []
        cells = self.backend.model.n_ctx
        reserved = self._reserved()
        held: dict[object, int] = {}
        for s in self._slots:
            if s.job is not None:
                held[s.job.group] = held.get(s.job.group, 0) + 1
        free = [s for s in self._slots if s.job is None]
        while True:
            while self._queue and self._queue[0].cancelled and self._queue[0].paused is None:  # its client left
                self._queue.popleft()
            job = self._next_job(held)
            if job is None:
                break
            need = len(job.request.prompt) + job.request.max_tokens
            pinned = job.request.slot
            if pinned is not None and all(s.seq_id != pinned for s in free):
                break  # its slot is busy: it waits (as in llama-server), and those behind it too
            if not free or (reserved + need > cells and (reserved or admitted)):
                victim = self._victim(held, job, reserved + need - cells)
                if victim is None:
                    break
                reserved -= victim.reserved
                held[victim.job.group] -= 1  # type: ignore[union-attr]
                self._preempt(victim)
                free.append(victim)
                continue
            if self._prefilling(job.request.prompt):
                break  # n > 1 or a common system prompt: wait a step or two and share its KV instead
            slot = free.pop(next(i for i, s in enumerate(free) if s.seq_id == pinned) if pinned is not None else 0)
            self._queue.remove(job)
            slot.job = job
            slot.reserved = need
            reserved += need
            held[job.group] = held.get(job.group, 0) + 1
            self._n_active += 1
            admitted.append(slot)
        return admitted

    def _next_job(self, held: dict[object, int]) -> Job | None:
        """The queued job to admit next: the first job of the request holding the fewest slots
        (earliest first among equals), so a request's ``n`` choices or list of prompts take turns
        with other requests instead of all going first."""
        best: Job | None = None
        best_key = (0, 0)
        seen: set[int] = set()
        for i, job in enumerate(self._queue):
            if job.cancelled or id(job.group) in seen:
                continue
            seen.add(id(job.group))
            key = (held.get(job.group, 0), i)
            if best is None or key < best_key:
                best, best_key = job, key
        return best

    def _victim(self, held: dict[object, int], job: Job, short: int) -> _Slot | None:
        """A running job to pause so that ``job`` can start: only for a request that holds no slot,
        and only a job of a request holding two or more (its share is then taken from it, not from
        a request with one). With ``n: 16``, huge ``max_tokens`` and ``ignore_eos``, one request
        kept another client's 3-token request waiting over 150 s. The victim's reservation must make
        the room ``job`` lacks (``short`` cells); the youngest reply goes (the least to recompute)."""
        if held.get(job.group, 0):
            return None
        candidates = [s for s in self._slots if s.job is not None and s.gen is not None and not s.pending
                      and s.last >= 0 and held.get(s.job.group, 0) >= 2 and s.reserved >= short]
        if not candidates:
            return None
        return min(candidates, key=lambda s: (-held[s.job.group], s.gen.n_gen))  # type: ignore[union-attr]

    def _preempt(self, slot: _Slot) -> None:
        """Pause the slot's job back to the head of the queue (under the lock, on the engine thread).
        Its Generation keeps every state a reply has; the KV of its tokens (prompt, reply so far and
        the token sampled now, handed out in this step) is evaluated again when it returns, as vLLM's
        recompute preemption does. Its cells stay until the next job takes the slot."""
        assert slot.job is not None and slot.gen is not None and self.backend is not None
        job = slot.job
        job.paused, job.resume = slot.gen, self.backend.model.cached_tokens(slot.seq_id) + [slot.last]
        slot.job, slot.gen, slot.last, slot.reserved = None, None, -1, 0
        slot.used_at = time.monotonic()
        self._n_active -= 1
        self._queue.appendleft(job)
        self._preempted += 1
        log.info("paused a reply of %s after %d tokens for another request", self.name, job.paused.n_gen)

    def _drop_cancelled_paused(self) -> None:
        """Free the Generation of paused jobs whose client left (on the engine thread)."""
        if not any(j.cancelled and j.paused is not None for j in self._queue):
            return
        for job in [j for j in self._queue if j.cancelled and j.paused is not None]:
            self._queue.remove(job)
            job.finished = True
            job.paused.close()  # type: ignore[union-attr]
            job.paused = None
            self.metrics.finished(self.name, "cancelled")

    def _reserved(self) -> int:
        """KV cells promised to running jobs and to the text being embedded."""
        embedding = self._embeds[0].cells if self._embeds else 0
        return sum(s.reserved for s in self._slots if s.job is not None) + embedding

    def _refuse_queued(self, err: GgufrunError) -> None:
        while self._queue:
            job = self._queue.popleft()
            job.finished = True
            job.emit(Event("error", error=err))
            if job.paused is not None:  # on the engine thread: the callers are
                job.paused.close()
                job.paused = None
        while self._calls:
            _set_exception(self._calls.popleft()[2], err)
        while self._embeds:
            embed = self._embeds.popleft()
            embed.drop()  # on the engine thread: the caller is
            _set_exception(embed.future, err)

    def _prefilling(self, prompt: list[int]) -> bool:
        """Whether a running slot is still evaluating a long prefix this prompt shares (another
        choice of an n > 1 request, the same system prompt): then waiting a step or two and copying
        its KV cells beats evaluating them twice. Waits only for the shared part, not the rest, and
        not for what some running slot already holds: jobs admitted in the same pass copy it too
        (waiting on those made a burst of same-prompt requests enter one per step: 64 clients took
        64 steps to fill the batch)."""
        if self.backend is None:
            return False
        model = self.backend.model
        running = [s for s in self._slots if s.job is not None and s.job.request.prompt[:_SHARE_MIN] == prompt[:_SHARE_MIN]]
        if not any(s.pending or s.gen is None for s in running):
            return False  # nothing is being evaluated: no prefix to wait for
        held = max((model.common_prefix(s.seq_id, prompt) for s in running if s.gen is not None), default=0)
        for s in running:
            if not (s.pending or s.gen is None):
                continue
            other = s.job.request.prompt  # type: ignore[union-attr]
            lcp = next((i for i, (a, b) in enumerate(zip(prompt, other)) if a != b), min(len(prompt), len(other)))
            done = model.seq_len(s.seq_id) if s.gen is not None else 0  # admitted this pass: nothing evaluated yet
            if lcp - max(done, held) >= _SHARE_MIN:
                return True
        return False

    def _admit(self, slot: _Slot) -> None:
        """Give a job its slot: reuse the KV cache prefix it shares with the prompt, set up its Generation."""
        assert slot.job is not None and self.backend is not None
        model = self.backend.model
        job = slot.job
        req = job.request
        tokens = job.resume or req.prompt  # a paused reply returns with its tokens so far
        # Prefer this slot's own cache; another idle slot with a longer shared prefix swaps in.
        shared = {s.seq_id: model.common_prefix(s.seq_id, tokens) for s in self._slots if s.job is None or s is slot}
        best = max((s for s in self._slots if s.seq_id in shared), key=lambda s: shared[s.seq_id])
        if best is not slot and shared[best.seq_id] > shared[slot.seq_id] and req.slot is None:
            best.job, slot.job = slot.job, None
            best.reserved, slot.reserved = slot.reserved, 0
            slot = best
        common = min(shared[slot.seq_id], len(tokens) - 1)
        # A running sequence (another choice of the same n > 1 request, or the same system prompt)
        # may hold a longer prefix: share its KV cells rather than evaluate them again.
        donors = [(model.common_prefix(s.seq_id, tokens), s) for s in self._slots
                  if s.job is not None and s is not slot and s.gen is not None]
        best_n, donor = max(donors, key=lambda d: d[0], default=(0, None))
        if donor is not None and min(best_n, len(tokens) - 1) >= max(common + _SHARE_MIN, 1):
            kept = model.copy_prefix(donor.seq_id, slot.seq_id, min(best_n, len(tokens) - 1))
        else:
            kept = model.truncate(slot.seq_id, common)
        slot.pending = list(tokens[kept:])
        slot.to_read = len(slot.pending)
        slot.last = -1
        slot.used_at = time.monotonic()
        job.slot = slot.seq_id
        if job.paused is not None:
            slot.gen, job.paused, job.resume = job.paused, None, []
            if model.speculator is not None:  # its text may sit in another sequence now: the drafter starts afresh there
                model.speculator.begin(slot.seq_id, *req.draft)
            return
        params = SamplingParams.from_dict(req.sampling)
        slot.gen = Generation(model, req.prompt, params, max_tokens=req.max_tokens, n_ctx=self.backend.n_ctx_seq,
                              stop=req.stop, ignore_eos=req.ignore_eos, cached=kept, think=req.think,
                              grammar_factory=lambda _text: job.grammar, draw_factory=model.draw_chain)
        slot.gen.started = job.created
        job.grammar = None  # the Generation owns (and frees) it now
        if model.speculator is not None:
            model.speculator.begin(slot.seq_id, *req.draft)
        self.metrics.prompt(self.name, len(req.prompt))

    def step(self) -> None:
        """One turn of the pipeline: finish the decode in flight and sample its rows; admit waiting
        jobs; launch the next decode (every running sequence's token plus prompt chunks); then, while
        the device computes it, hand out the tokens just sampled (detokenising, stop strings, events).

        llama_decode returns once the work is queued, so this bookkeeping and the HTTP side's
        streaming run beside the device instead of between its steps (on an H100 at 64 streams they
        took 5-7 ms of a 25 ms step). A token that surely ends its sequence (end of generation, a
        length limit) is not decoded; one that completes a stop string is, in vain. One text
        waiting to be embedded is embedded between the two, when nothing is in flight on the context."""
        assert self.backend is not None
        model = self.backend.model
        prof = self._profile
        t0 = time.perf_counter()
        if prof is not None and self._inflight:
            model.synchronize()
        t1 = time.perf_counter()
        decoded, self._decoded = self._decoded, False
        sampled = self._collect(model)
        self._embed_collect(model)
        t2 = time.perf_counter()
        if self._budget is not None and decoded:
            self._budget.finished(t2)
        elif self._budget is not None:
            self._budget.idle()
        with self._cv:  # the head now (the last one may have finished in _embed_collect)
            embed = self._embeds[0] if self._embeds else None
        if embed is not None:
            self._embed_one(embed)
        for slot in self._slots:
            if slot.job is not None and slot.job.cancelled:
                self._end(slot, finish_reason="cancelled")
        if self._calls:
            self._slot_calls(model)
        for slot, job, tok, _ in sampled:
            if slot.job is job:
                assert slot.gen is not None
                slot.last = -1 if slot.gen.ends_at(tok) else tok
        failed: tuple[GgufrunError, list[_Slot]] | None = None
        admit_s = 0.0
        if not (self._stopping and time.monotonic() >= self._deadline):
            with self._cv:
                admitted = self._admissions()
            ta = time.perf_counter()
            for slot in admitted:
                entering = slot.job
                try:
                    self._admit(slot)
                except Exception as setup_exc:  # noqa: BLE001 -- this request's setup failed: it ends alone
                    self._fail_job(entering, setup_exc)
            admit_s = time.perf_counter() - ta if admitted else 0.0
            failed = self._launch(model, waiting=len(sampled), setup_s=admit_s)
        t3 = time.perf_counter()
        n = 0
        self._outbox = []
        try:
            for slot, job, tok, info in sampled:
                if slot.job is job or job.paused is not None:
                    try:
                        if slot.job is job:
                            self._accept(slot, tok, info)
                        else:  # paused in this step, after its token was sampled
                            self._accept_paused(job, tok, info)
                    except Exception as hand_out_exc:  # noqa: BLE001 -- one reply's hand-out failed: it ends alone
                        self._fail_job(job, hand_out_exc)
                    n += 1
        finally:  # posted even when a hand-out fails: the crash handler's errors must not land in a dead outbox
            outbox, self._outbox = self._outbox, None
            _post(outbox)
        if n:
            self.metrics.generated(self.name, n)
        if failed is not None:
            exc, slots = failed
            for slot in slots:
                model.reset(slot.seq_id)
                self._end(slot, error=exc)
        if prof is not None:
            end = time.perf_counter()
            prof.add(len(self._inflight), len(sampled), t1 - t0, t2 - t1, admit_s, t3 - t2 - admit_s, end - t3,
                     min(t0 - prof.last_end, 1.0) if prof.last_end else 0.0)
            prof.last_end = end

    def _collect(self, model: Any) -> list[tuple[_Slot, Job, int, Any]]:
        """Sample the rows of the decode in flight whose jobs still run: (slot, job, token, logprob info)."""
        rows, self._inflight = self._inflight, []
        if not rows:
            return []
        live = [i for i, (slot, job) in enumerate(rows) if slot.job is job and not job.cancelled]
        if not live:
            model.synchronize()
            for slot, _ in rows:
                slot.draft = []
            return []
        if any(slot.draft for slot, _ in rows):  # speculating sequences own several rows each
            return self._collect_drafts(model, rows, live)
        logits = model.logits_rows(len(rows))  # waits for the device
        if len(live) < len(rows):
            logits = logits[live]  # a copy: ended jobs' samplers are already freed
        seqs = [rows[i][0].gen.sampler for i in live]  # type: ignore[union-attr]
        try:
            tokens, infos = _sample(logits, seqs)
        except Exception as exc:  # noqa: BLE001
            # One request's sampler failed the step: sample the rows one by one, so that only the
            # rows that fail alone end. (Rows the batched pass had already penalised in place get
            # their penalties twice for this one token: only when some sampler is broken.)
            log.warning("batched sampling failed (%s); sampling %d rows one by one", exc, len(seqs))
            out = []
            for k, i in enumerate(live):
                try:
                    (tok,), (info,) = _sample(logits[k : k + 1], [seqs[k]])
                except Exception as row_exc:  # noqa: BLE001
                    self._fail_job(rows[i][1], row_exc)
                    continue
                out.append((rows[i][0], rows[i][1], tok, info))
            return out
        return [(rows[i][0], rows[i][1], tok, info) for i, tok, info in zip(live, tokens, infos)]

    def _launch(self, model: Any, waiting: int = 0, setup_s: float = 0.0) -> tuple[GgufrunError, list[_Slot]] | None:
        """Queue the next decode; on failure return the error and the slots it was for.

        Generating sequences first (one token each keeps their pace steady), then a chunk of the
        waiting prompts or of the text being embedded, within the step's budget (budget.py: in
        estimated time, the two kinds taking turns by the time each has had, so that neither
        starves the other). ``waiting``: tokens sampled and not yet handed out (after this
        launch); the budget holds for them too, even where no row goes on: a reply's last token
        waited behind a whole 512-token chunk (seconds on a CPU). ``setup_s``: host time this step
        spent admitting requests, a one-off the budget must not read as the chunk's cost."""
        running = [s for s in self._slots if s.job is not None]
        embed = self._embed_chunkable()
        if not running and embed is None:
            return None
        assert self._budget is not None
        budget = model.n_batch
        rows = [s for s in running if not s.pending and s.last >= 0][:budget]
        drafts = self._drafts(model, rows)  # speculative tokens after some rows' last (their outputs too)
        self._make_room(running, extra=(min(len(embed.tokens) - embed.sent, model.n_batch) if embed is not None else 0)  # type: ignore[arg-type]
                        + sum(len(d) for d in drafts.values()))
        batch: list[tuple[_Slot, list[int], int]] = []
        used = 0  # tokens (all outputs) of the generating rows
        for k, slot in enumerate(rows):
            draft = drafts.get(slot.seq_id)  # (a draft takes only the room the rows after it leave)
            slot.draft = draft[: max(budget - used - (len(rows) - k), 0)] if draft else []
            batch.append((slot, [slot.last, *slot.draft], 1 + len(slot.draft)))
            used += 1 + len(slot.draft)
        n_rows = len(batch)
        # One kind of chunk a step: prompts' or the text's. With embeddings on, llama.cpp makes every
        # token of the decode an output (a prompt chunk's too: logits for each, and the rows read
        # back shift), so the two never share a decode; they take turns by the time each has had.
        prompts = [s for s in running if s.pending]
        kinds = (["prompt"] if prompts else []) + (["embed"] if embed is not None else [])
        kind = self._budget.pick(kinds)
        if kind == "embed" and embed is not None:
            queued = min(len(embed.tokens) - embed.sent, max(model.output_rows - used, 8))  # type: ignore[arg-type]
        else:
            queued = sum(len(slot.pending) for slot in prompts)
        # Prompts of unequal lengths in one decode are a micro-batch each (a fixed cost per part): the whole-fits
        # check counts them; a capful takes one prompt's tokens.
        parts = len({len(s.pending) for s in prompts}) if kind == "prompt" else 1
        # short prompts (longer ones too in a burst) are read whole first, outside the budget (StepBudget.whole),
        # judged by their whole length: a long prompt's last chunk is no short prompt
        self._budget.weigh([s.to_read for s in prompts] if kind == "prompt" else [], n_rows)
        whole: list[_Slot] = []
        rest: list[_Slot] = []
        for s in prompts:
            (whole if kind == "prompt" and n_rows and self._budget.whole(s.to_read) else rest).append(s)
        unbudgeted = sum(len(s.pending) for s in whole)
        if whole:
            queued -= unbudgeted
            parts = len({len(s.pending) for s in rest})
        chunks = min(budget - used, unbudgeted + (self._budget.allowance(n_rows or waiting, kind, queued, parts) if queued else 0))
        embed_part: list[int] = []
        if kind == "embed" and embed is not None and chunks > 0:
            # every token of the chunk is an output (a logits row each in llama.cpp's buffer): capped in queued
            embed_part = embed.tokens[embed.sent : embed.sent + chunks]  # type: ignore[index]
        elif prompts:
            self._turn = (self._turn + 1) % len(rest) if rest else 0  # which budgeted prompt goes first: each in turn
            cut = runs_end if not n_rows and len(prompts) == 1 else run_end  # alone: whole text and image runs
            for slot in whole + rest[self._turn:] + rest[: self._turn]:
                if chunks <= 0:
                    break
                # text and images in one decode (model.mixed_runs, without drafts' several outputs): no cut
                free = min(slot.pending[:chunks]) >= 0 or (model.mixed_runs and not drafts)
                take = chunks if free else cut(slot.pending, chunks, whole=model.whole_images)
                if not take:
                    continue  # a whole image waits for a step with room for it (gemma-3)
                chunk, slot.pending = slot.pending[:take], slot.pending[take:]
                batch.append((slot, chunk, not slot.pending))
                chunks -= len(chunk)
        if not batch and not embed_part:
            return None
        items = [(s.seq_id, toks, want) for s, toks, want in batch]
        started = time.perf_counter()
        try:
            if embed_part:
                assert embed is not None and self.backend is not None and self.backend.embed_seq is not None
                outputs_ = model.decode(items, embed=(self.backend.embed_seq, embed_part))
            else:
                outputs_ = model.decode(items)
        except GgufrunError as exc:
            for slot, _, _ in batch:
                slot.draft = []
            if embed_part:
                self._embed_done(embed, exc)  # type: ignore[arg-type]
            return exc, [slot for slot, _, _ in batch]
        self._decoded = True
        n_chunks = sum(len(t) for _, t, _ in batch[n_rows:]) + len(embed_part)
        row_lengths = {len(toks) for _, toks, _ in batch[:n_rows]}
        passes = len({len(toks) for _, toks, _ in batch[n_rows:]} - row_lengths) + (1 if embed_part else 0)
        if not model.mixed_runs or drafts:  # a lone prompt's runs: a decode each
            passes += sum(count_runs(toks) - 1 for _, toks, _ in batch[n_rows:] if min(toks) < 0)
        self._budget.launched(n_rows or waiting, kind, n_chunks, started, setup_s, passes,
                              drafted=any(slot.draft for slot, _, _ in batch[:n_rows]), whole=min(unbudgeted, n_chunks))
        for slot, _, _ in batch:
            if not slot.pending:
                slot.last = -1
        self._inflight = [(slot, slot.job) for (slot, _, _), index in zip(batch, outputs_) if index >= 0]  # type: ignore[misc]
        if embed_part:
            assert embed is not None
            self._embed_rows = (embed, used, len(embed_part))  # after every generating row's outputs, drafts' too
            embed.sent += len(embed_part)
        if self._profile is not None:
            self._profile.chunks(kind, n_chunks, self._budget)
        return None

    def _drafts(self, model: Any, gen: list[_Slot]) -> dict[int, list[int]]:
        """Speculative drafts for this step's generating sequences ``gen`` (speculative.step_drafts),
        each within its own reservation and part of the cache."""
        if model.speculator is None:
            return {}
        from ..speculative import step_drafts

        items = [(s.seq_id, s.last, min(s.reserved, model.seq_cells) - model.seq_len(s.seq_id) - 1) for s in gen]
        return {seq: d for (seq, _, _), d in zip(items, step_drafts(model.speculator, model, items, len(gen)))}

    def _collect_drafts(self, model: Any, rows: list[tuple[_Slot, Job]], live: list[int]) -> list[tuple[_Slot, Job, int, Any]]:
        """_collect for a step with drafts: each speculating sequence's rows are checked in order
        (speculative.engine_verify), its tokens taken and handed out now; the others' single rows
        are sampled together as usual."""
        from ..speculative import engine_verify

        spans, at = [], 0
        for slot, _ in rows:
            spans.append((at, 1 + len(slot.draft)))
            at += 1 + len(slot.draft)
        logits = model.logits_rows(at)  # waits for the device
        plain = [i for i in live if not rows[i][0].draft]
        out: list[tuple[_Slot, Job, int, Any]] = []
        if plain:
            picked = logits[[spans[i][0] for i in plain]]  # a copy, as _collect's
            seqs = [rows[i][0].gen.sampler for i in plain]  # type: ignore[union-attr]
            try:
                tokens, infos = _sample(picked, seqs)
                out = [(rows[i][0], rows[i][1], tok, info) for i, tok, info in zip(plain, tokens, infos)]
            except Exception as exc:  # noqa: BLE001 -- as _collect: those rows end, the others go on
                for i in plain:
                    self._fail_job(rows[i][1], exc)
        for i in live:
            slot, job = rows[i]
            draft, slot.draft = slot.draft, []
            if not draft or slot.job is not job:
                continue
            start, n = spans[i]
            try:
                taken = engine_verify(model, model.speculator, slot.seq_id, logits[start : start + n], draft, slot.gen,
                                      lambda tok, info, slot=slot: self._take(slot, tok, info))
            except Exception as exc:  # noqa: BLE001 -- this reply's sampler or hand-out failed: it ends alone
                self._fail_job(job, exc)
                continue
            self.metrics.generated(self.name, len(taken))
            if slot.job is job:
                slot.last = taken[-1]
        for slot, _ in rows:
            slot.draft = []
        return out

    def _take(self, slot: _Slot, token: int, info: Any) -> bool:
        """One verified token through _accept; True once the reply has ended."""
        job = slot.job
        self._accept(slot, token, info)
        return slot.job is not job

    def _make_room(self, running: list[_Slot], extra: int = 0) -> None:
        """Keep this step (and ``extra`` more cells) within the KV cache by dropping idle slots'
        cached prefixes, oldest first. Admission reserved every running job's cells, so running
        replies are never cut."""
        assert self.backend is not None
        model = self.backend.model

        embedding = self.backend.embed_seq

        def need() -> int:
            used = sum(model.seq_len(s.seq_id) for s in self._slots)
            if embedding is not None:  # a text being embedded holds cells between steps
                used += model.seq_len(embedding)
            step = sum(min(len(s.pending), model.n_batch) if s.pending else int(s.last >= 0) for s in running)
            return used + step + extra - model.n_ctx

        if need() <= 0:
            return
        for slot in sorted((s for s in self._slots if s.job is None), key=lambda s: s.used_at):
            model.reset(slot.seq_id)
            if need() <= 0:
                return

    def _accept(self, slot: _Slot, token: int, info: Any) -> None:
        """Take one sampled token through the slot's Generation; emit its text; end the job when it ends."""
        assert slot.job is not None and slot.gen is not None
        job, gen = slot.job, slot.gen
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
            self.metrics.ttft(self.name, job.first_token_at - job.created)
        text, reason = gen.accept(token, info)
        if text or gen.tokens:
            self._emit(job, Event("text", text, tokens=gen.take_tokens()))
        if reason is not None:
            self._end(slot, finish_reason=reason)

    def _accept_paused(self, job: Job, token: int, info: Any) -> None:
        """The token a paused job sampled in the step that paused it; a stop string it completes
        ends the job in the queue."""
        gen = job.paused
        assert gen is not None
        text, reason = gen.accept(token, info)
        if text or gen.tokens:
            self._emit(job, Event("text", text, tokens=gen.take_tokens()))
        if reason is None:
            return
        with self._cv:
            if job in self._queue:
                self._queue.remove(job)
        job.paused, job.resume = None, []
        self._emit(job, _done(reason, gen.stats, gen))
        job.finished = True
        self.metrics.finished(self.name, reason)
        gen.close()
        if job.grammar is not None:  # as _end frees a finished slot's
            job.grammar.close()
            job.grammar = None

    def _slot_calls(self, model: Any) -> None:
        """Run the queued slot calls (call_on_slot) on their slots, refused for a slot that is busy."""
        with self._cv:
            calls, self._calls = list(self._calls), deque()
        for seq_id, fn, future in calls:
            if future.cancelled():
                continue
            if any(s.seq_id == seq_id and s.job is not None for s in self._slots):
                _set_exception(future, SlotBusyError(f"Slot {seq_id} of '{self.name}' is processing a request.",
                                                     "Retry when it is idle (GET /slots shows is_processing)."))
                continue
            try:
                result = fn(model, seq_id)
            except Exception as exc:  # noqa: BLE001 -- the caller's error, reported to its client
                _set_exception(future, exc)
                continue
            if not future.done():
                future.set_result(result)

    def _fail_job(self, job: Job | None, exc: BaseException) -> None:
        """End one job with an error and free its slot (its KV cells too); the others run on."""
        if isinstance(exc, GgufrunError):
            err = exc
        else:
            log.error("request on %s failed in the engine", self.name, exc_info=exc)
            err = JobFailedError(f"The request failed in the engine: {type(exc).__name__}: {exc}.",
                                 "Other requests were not affected; see the server log.")
        slot = next((s for s in self._slots if job is not None and s.job is job), None)
        if slot is None:
            if job is not None and job.paused is not None:  # failed handing out the token it was paused on
                with self._cv:
                    if job in self._queue:
                        self._queue.remove(job)
                job.paused.close()
                job.paused, job.resume, job.finished = None, [], True
                if job.grammar is not None:
                    job.grammar.close()
                    job.grammar = None
                self._emit(job, Event("error", error=err))
                self.metrics.finished(self.name, "error")
            return
        # Its KV cells stay, as a finished job's do (the bookkeeping matches them; a decode may be in
        # flight): the next admission to the slot keeps what it shares of them.
        self._end(slot, error=err)

    def _emit(self, job: Job, event: Event) -> None:
        if self._outbox is not None:  # inside step()'s hand-out: posted together at its end
            self._outbox.append((job, event))
        else:
            job.emit(event)

    def _end(self, slot: _Slot, *, finish_reason: str = "", error: GgufrunError | None = None) -> None:
        job, gen = slot.job, slot.gen
        if job is None:
            return
        if error is not None:
            self._emit(job, Event("error", error=error))
        elif not job.cancelled:
            tail = gen.finish() if gen is not None else ""
            if tail:
                self._emit(job, Event("text", tail))
            st = gen.stats if gen is not None else GenStats(prompt_tokens=len(job.request.prompt))
            self._emit(job, _done(finish_reason, st, gen))
        job.finished = True
        self.metrics.finished(self.name, "error" if error is not None else finish_reason or "cancelled")
        if gen is not None:
            gen.close()
        if job.grammar is not None:
            job.grammar.close()
            job.grammar = None
        slot.gen = None
        slot.job = None
        slot.pending = []
        slot.reserved = 0
        slot.used_at = time.monotonic()
        with self._cv:
            self._n_active -= 1

    def _embed_one(self, job: _EmbedJob) -> None:
        """Move the oldest embedding request on. On the generation context (the usual case) this
        starts its next text, whose chunks then ride in the steps' decodes (:meth:`_launch`); an
        embedding model's own context embeds one chunk per step here. A cancelled request is dropped."""
        assert self.backend is not None
        error: GgufrunError | None = None
        if not job.future.cancelled():
            try:
                if self._embedder is None:
                    if self._load_embedder is None:
                        raise GgufrunError(f"Model '{self.name}' does not serve embeddings.")
                    self._embedder = self._load_embedder(self.backend)
                shared = getattr(self._embedder, "shares_context", False)
                if shared and (job.total is not None or self._embed_rows is not None):
                    return  # its text is under way in the steps' decodes
                if job.steps is None:
                    if job.tokens is None:
                        item = job.texts[len(job.vectors)]  # token ids from the handler (tokenised off the loop), or text
                        job.tokens = list(item) if isinstance(item, list) else self.backend.model.tokenize(item)
                        if not shared:  # an embedding model's context pools one batch (the server refuses longer texts)
                            job.tokens = job.tokens[: self.backend.model.n_batch]
                    tokens = job.tokens
                    if shared:
                        # Its text goes into the requests' cache: its cells are reserved as a job's are,
                        # so it waits (a step at a time) rather than take a running reply's room.
                        cells = self.backend.model.n_ctx
                        room = self.backend.model.seq_cells  # its sequence's own part of the cache, or all of it
                        if len(tokens) > room:
                            raise ContextOverflowError(f"The text has {len(tokens)} tokens; the KV cache holds {room}.",
                                                       n_tokens=len(tokens), n_ctx=room)
                        with self._cv:
                            # Until it has room, no new request is admitted: it cannot be starved.
                            job.waiting = self._reserved() + len(tokens) > cells
                            if job.waiting:
                                return
                            job.cells = len(tokens)
                        if job.total is None:
                            import numpy as np

                            job.total = np.zeros(self.backend.model.n_embd, dtype=np.float64)
                            self.backend.model.reset(self.backend.embed_seq)
                        return  # _launch sends its chunks
                    job.steps = self._embedder.embed_steps(tokens)
                try:
                    next(job.steps)
                    return  # more of this text at the next step
                except StopIteration as done:
                    job.steps, job.cells, job.tokens = None, 0, None
                    vector, n = done.value
                job.vectors.append(vector)
                job.n_tokens += n
            except GgufrunError as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 -- reported to the client as a 500, not a dead thread
                error = ModelLoadError(f"Embedding failed: {exc}.")
            if error is None and len(job.vectors) < len(job.texts):
                return
        self._embed_done(job, error)

    def _embed_chunkable(self) -> _EmbedJob | None:
        """The embedding request whose text has chunks to send in this step's decode, if any."""
        with self._cv:
            job = self._embeds[0] if self._embeds else None
        if (job is None or job.total is None or job.tokens is None or job.waiting or job.future.cancelled()
                or self._embed_rows is not None or job.sent >= len(job.tokens)):
            return None
        return job

    def _embed_collect(self, model: Any) -> None:
        """Add the finished decode's embedding chunk to its text's sum; finish the text at its end."""
        if self._embed_rows is None:
            return
        job, first, n = self._embed_rows
        self._embed_rows = None
        assert self.backend is not None
        if job.future.cancelled():
            self._embed_done(job, None)
            return
        try:
            job.total += model.embedding_rows(first, n).sum(axis=0, dtype=job.total.dtype)
        except GgufrunError as exc:
            self._embed_done(job, exc)
            return
        if job.sent < len(job.tokens):  # type: ignore[arg-type]
            return
        norm = float((job.total * job.total).sum()) ** 0.5 or 1.0  # the mean's direction: no need to divide by the count
        job.vectors.append((job.total / norm).tolist())
        job.n_tokens += job.sent
        model.reset(self.backend.embed_seq)
        job.tokens, job.total, job.sent, job.cells = None, None, 0, 0
        if len(job.vectors) == len(job.texts):
            self._embed_done(job, None)

    def _embed_done(self, job: _EmbedJob, error: GgufrunError | None) -> None:
        """Take a finished, failed or cancelled embedding request off the queue and answer it."""
        job.drop()
        if job.total is not None and self.backend is not None and self.backend.embed_seq is not None:
            self.backend.model.reset(self.backend.embed_seq)  # its text's cells go back to the requests
        job.tokens, job.total, job.sent = None, None, 0
        if self._embed_rows is not None and self._embed_rows[0] is job:
            self._embed_rows = None
        with self._cv:  # off the queue before the handler hears back
            if self._embeds and self._embeds[0] is job:
                self._embeds.popleft()
        if error is not None:
            _set_exception(job.future, error)
        elif not job.future.done():
            try:
                job.future.set_result((job.vectors, job.n_tokens))
            except concurrent.futures.InvalidStateError:  # cancelled meanwhile by the handler
                pass

    def _close(self) -> None:
        # A handler holding a lease may still be tokenising with this model (off the loop): wait
        # for it (bounded) rather than free the vocabulary under it.
        deadline = time.monotonic() + 10.0
        while self.leases > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        for job in self._embeds:
            job.drop()
        for holder in (self._embedder, self.backend.model if self.backend else None):
            if holder is not None:
                holder.close()
        self._embedder = None


class _StepProfile:
    """GGUFRUN_STEP_PROFILE=1: where a step's time goes, logged every 64 steps, to see what bounds
    throughput: waiting for the device, sampling, admitting and launching the next decode, handing
    tokens out while it runs, and the engine loop between steps."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.n = 0
        self.sums = [0.0] * 8
        self.last_end = 0.0
        self.chunk_sums = {"prompt": 0, "embed": 0}  # tokens of each kind decoded beside the rows
        self.budget: StepBudget | None = None

    def chunks(self, kind: str, tokens: int, budget: StepBudget) -> None:
        self.chunk_sums[kind] += tokens
        self.budget = budget

    def add(self, rows: int, sampled: int, *phases: float) -> None:
        self.n += 1
        for i, v in enumerate((rows, sampled, *phases)):
            self.sums[i] += v
        if self.n % 64 == 0:
            s = [v / self.n for v in self.sums]
            log.info("steps %s: %d steps, per step %.1f rows decoding, %.1f sampled, %.1f prompt and %.1f embedding tokens "
                     "(budget: %s); ms: device wait %.2f, sample %.2f, admit %.2f, launch %.2f, accept+emit %.2f, between steps %.2f",
                     self.name, self.n, *s[:2], self.chunk_sums["prompt"] / self.n, self.chunk_sums["embed"] / self.n,
                     self.budget.describe() if self.budget is not None else "-", *(1e3 * v for v in s[2:]))
            self.n, self.sums, self.chunk_sums = 0, [0.0] * 8, {"prompt": 0, "embed": 0}


def _sample(logits: Any, seqs: list[Any]) -> tuple[list[int], list[Any]]:
    from ..generation import sample_rows

    if FAULT_SEED is not None and any(str(s.params.seed) == FAULT_SEED for s in seqs):
        raise RuntimeError(f"injected sampling fault for seed {FAULT_SEED} (GGUFRUN_TEST_FAULT_SEED)")
    return sample_rows(logits, seqs)


def _set_exception(future: concurrent.futures.Future[Any], exc: BaseException) -> None:
    if not future.done():
        try:
            future.set_exception(exc)
        except concurrent.futures.InvalidStateError:  # cancelled meanwhile by the handler
            pass
