"""One generation pipeline per sequence, and sampling for a whole decode step at once.

:class:`Generation` owns everything that happens to one sequence after its logits exist: the
sampler state (penalty window fed with the prompt, as llama-server replays it; an optional
grammar; a per-request random generator), detokenising (a UTF-8 character split across tokens is
held back), stop tokens (single-token stops by id) and stop strings (by text), the limits and the
stats. Chat (``runtime.Model.generate``) and the server engine both drive it.

:func:`sample_rows` samples every row of a step's logits matrix together, vectorised in numpy:
penalties and logit bias are sparse scatters, and the truncating filters run over the few
candidates within reach of each row's top logit, not over the vocabulary (with no truncation at
all, the draw is an inverse CDF in token-id order). The order is
llama.cpp's default chain: penalties, bias, top-k, top-p (over the top-k distribution), min-p
(relative to the most likely token), temperature, one uniform draw from the request's own
generator. So a seed gives the same draw whatever else shares the step. Under any truncating
filter a token more than :data:`REACH` nats below the top logit counts as probability 0.

This module stays free of llama.cpp: a grammar comes from ``runtime.Grammar`` through a factory.
"""

from __future__ import annotations

import codecs
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .errors import GgufrunError
from .reasoning import ThinkBudget, ThinkWatch
from .settings import Settings

_DEFAULTS = Settings()

REACH = 30.0  # exp(-30) ~ 1e-13: below any probability a float32 draw can pick
_LN_EPS = -1e30


class GrammarLike(Protocol):
    def allows(self, token: int) -> bool: ...
    def mask(self, row: np.ndarray) -> None: ...
    def accept(self, token: int) -> None: ...
    def close(self) -> None: ...


class Vocab(Protocol):
    """What the pipeline needs from a model (runtime.Model has it)."""

    n_vocab: int

    def token_bytes(self, token: int, *, special: bool = False) -> bytes: ...
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]: ...
    def is_eog(self, token: int) -> bool: ...


@dataclass
class SamplingParams:
    """One request's sampling, as the engine <-> API contract names it."""

    # ggufrun's defaults, declared once in settings.Settings
    temperature: float = _DEFAULTS.temperature
    top_p: float = _DEFAULTS.top_p
    top_k: int = _DEFAULTS.top_k
    min_p: float = _DEFAULTS.min_p
    repeat_penalty: float = _DEFAULTS.repeat_penalty
    presence_penalty: float = _DEFAULTS.presence_penalty
    frequency_penalty: float = _DEFAULTS.frequency_penalty
    repeat_last_n: int = _DEFAULTS.repeat_last_n  # -1 = the whole sequence, 0 = penalties off
    seed: int = _DEFAULTS.seed  # -1 = random
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> bias; -inf (or <= -100) bans
    grammar: str | None = None  # GBNF text
    logprobs: int | None = None  # None = off; 0..20 = the sampled token's logprob plus that many alternatives
    # llama.cpp's infill sampler (llama-server's "infill" in samplers): -1 off, else where it runs in
    # the draw chain, after this many of top-k, top-p, min-p, temperature. Only a llama.cpp chain has it.
    infill: int = -1

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SamplingParams:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in values.items() if k in known and v is not None})

    @property
    def greedy(self) -> bool:
        # the infill sampler can drop the likeliest token (merged into its prefix): its chain draws
        return self.temperature <= 0 and self.infill < 0

    @property
    def penalised(self) -> bool:
        return self.repeat_last_n != 0 and (
            self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0)


@dataclass(slots=True)
class TokenInfo:
    """One generated token for logprobs: its text and, when asked, its logprob and the top alternatives."""

    id: int
    text: str
    logprob: float | None = None
    top: list[tuple[str, float]] = field(default_factory=list)
    top_ids: list[int] = field(default_factory=list)  # the alternatives' token ids (llama-server's probs name them)


@dataclass
class GenStats:
    """Counts and timings of one generation, as `ollama run --verbose` and llama-server's `timings` report them."""

    prompt_tokens: int = 0  # tokens in the prompt
    cached_tokens: int = 0  # of those, reused from the KV cache
    prompt_seconds: float = 0.0  # time to evaluate the uncached prompt tokens
    gen_tokens: int = 0
    gen_seconds: float = 0.0  # from the first generated token to the last
    ttft_seconds: float = 0.0  # from the start to the first generated token
    finish_reason: str = ""  # "stop" (end of turn or stop string), "length" (max_tokens or context full)
    reasoning_tokens: int = 0  # of gen_tokens, those a reasoning model spent thinking (its tags included)
    draft_n: int = 0  # speculative decoding: draft tokens checked (llama-server's timings.draft_n)
    draft_accepted: int = 0  # of those, kept (timings.draft_n_accepted)

    @property
    def prompt_tps(self) -> float:
        evaluated = self.prompt_tokens - self.cached_tokens
        return evaluated / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def gen_tps(self) -> float:
        # The first token comes from the prompt's logits; rate over the decodes that followed it.
        return (self.gen_tokens - 1) / self.gen_seconds if self.gen_tokens > 1 and self.gen_seconds > 0 else 0.0


class DrawLike(Protocol):
    top_k: int  # 0: no top-k (draw over the whole row); else draw_among may be given the top candidates

    def draw(self, row: np.ndarray) -> int: ...
    def draw_among(self, ids: np.ndarray, logits: np.ndarray) -> int: ...
    def close(self) -> None: ...


class SeqSampler:
    """The sampling state of one sequence: penalty window, bias, grammar and random generator.

    ``draw`` (from ``runtime.Model.draw_chain``) is llama.cpp's truncate-and-draw chain seeded for
    this request; where given, it replaces the numpy draw (measured faster per row on the CPU)."""

    def __init__(self, params: SamplingParams, prompt: list[int] = (), grammar: GrammarLike | None = None,  # type: ignore[assignment]
                 n_ctx: int = 0, draw: DrawLike | None = None) -> None:
        self.params = params
        self.draw = draw
        self._rng: np.random.Generator | None = None  # made on the first draw: a greedy reply never needs one
        self.grammar = grammar
        last_n = params.repeat_last_n if params.repeat_last_n >= 0 else (n_ctx or 1 << 30)
        self._window: deque[int] | None = deque(maxlen=last_n) if params.penalised else None
        self._counts: dict[int, int] = {}
        if self._window is not None:
            for t in prompt[-last_n:] if last_n else ():
                if t >= 0:  # image tokens (ggufrun.images) are no vocabulary entries to penalise
                    self._push(t)
        bias = {int(t): float(b) for t, b in params.logit_bias.items()}
        self.bias_ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        self.bias_vals = np.array([-np.inf if b <= -100 else b for b in bias.values()], dtype=np.float32)
        self.forced: deque[int] | None = None  # tokens that come next whatever the logits say (a thinking budget's close)

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None:  # without a seed, fresh OS entropy: replies still differ from one request to the next
            self._rng = np.random.Generator(np.random.PCG64(self.params.seed if self.params.seed >= 0 else None))
        return self._rng

    def take_forced(self, drawn: int) -> int:
        """The next forced token in place of ``drawn``; a grammar that would reject it ends the forcing."""
        assert self.forced
        token = self.forced[0]
        if self.grammar is not None and not self.grammar.allows(token):
            self.forced = None
            return drawn
        self.forced.popleft()
        return token

    def _push(self, token: int) -> None:
        w = self._window
        assert w is not None
        if len(w) == w.maxlen and w.maxlen:
            old = w[0]
            c = self._counts[old] - 1
            if c:
                self._counts[old] = c
            else:
                del self._counts[old]
        w.append(token)
        self._counts[token] = self._counts.get(token, 0) + 1

    def accept(self, token: int) -> None:
        if self._window is not None and self._window.maxlen:
            self._push(token)
        if self.grammar is not None:
            self.grammar.accept(token)

    def penalty_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        ids = np.fromiter(self._counts.keys(), dtype=np.int64, count=len(self._counts))
        return ids, np.fromiter(self._counts.values(), dtype=np.float32, count=len(self._counts))

    def close(self) -> None:
        if self.grammar is not None:
            self.grammar.close()
            self.grammar = None
        if self.draw is not None:
            self.draw.close()
            self.draw = None


def _penalise(logits: np.ndarray, seqs: list[SeqSampler]) -> None:
    """Repetition (llama.cpp's divide-positive/multiply-negative), frequency and presence
    penalties, then logit bias: sparse scatters over every row at once, in place."""
    rows, cols, counts, rep, freq, pres = [], [], [], [], [], []
    brows, bcols, bvals = [], [], []
    for r, s in enumerate(seqs):
        p = s.params
        if s._window is not None and s._counts:
            ids, cnt = s.penalty_arrays()
            rows.append(np.full(len(ids), r))
            cols.append(ids)
            counts.append(cnt)
            rep.append(np.full(len(ids), p.repeat_penalty, dtype=np.float32))
            freq.append(np.full(len(ids), p.frequency_penalty, dtype=np.float32))
            pres.append(np.full(len(ids), p.presence_penalty, dtype=np.float32))
        if len(s.bias_ids):
            brows.append(np.full(len(s.bias_ids), r))
            bcols.append(s.bias_ids)
            bvals.append(s.bias_vals)
    if rows:
        r_, c_ = np.concatenate(rows), np.concatenate(cols)
        x = logits[r_, c_]
        rp = np.concatenate(rep)
        x = np.where(x <= 0, x * rp, x / rp) - np.concatenate(counts) * np.concatenate(freq) - np.concatenate(pres)
        logits[r_, c_] = x
    if brows:
        r_, c_ = np.concatenate(brows), np.concatenate(bcols)
        logits[r_, c_] += np.concatenate(bvals)


_TIERS = (4.0, 8.0, 16.0, REACH)  # candidate reaches tried in turn (nats below the top logit)
_WIDE = 4096  # more candidates than this in a top-k row: partition instead of sorting them


def _draw(logits: np.ndarray, seqs: list[SeqSampler], u: np.ndarray) -> np.ndarray:
    """Truncate (top-k, top-p, min-p) and draw with temperature, for rows that all sample.

    Candidates are the tokens within a reach of the row's top logit, the smallest reach that
    provably holds the answer: all of the top k (top-p's mass is over them), everything above the
    min-p line, or (top-p alone) enough mass. Only they are sorted, not the vocabulary."""
    n, v = logits.shape
    top = logits.max(axis=1)
    top_k = np.array([s.params.top_k if 0 < s.params.top_k < v else 0 for s in seqs])
    top_p = np.array([s.params.top_p for s in seqs], dtype=np.float64)
    min_p = np.array([s.params.min_p for s in seqs], dtype=np.float64)
    temp = np.array([s.params.temperature for s in seqs], dtype=np.float64)
    out = np.zeros(n, dtype=np.int64)
    truncating = (top_k > 0) | (top_p < 1.0) | (min_p > 0.0)
    for i in np.flatnonzero(~truncating):  # the whole distribution: inverse CDF in token order, no sort
        c = np.cumsum(np.exp((logits[i].astype(np.float64) - top[i]) / temp[i]))
        out[i] = min(int(np.searchsorted(c, u[i] * c[-1], side="right")), v - 1)
    if not truncating.any():
        return out
    min_reach = np.where(min_p > 0, -np.log(np.maximum(min_p, 1e-300)), np.inf)
    z = np.ones(n)  # top-p's normaliser relative to the top token: over the vocabulary unless top-k is on
    full_z = (top_k == 0) & (top_p < 1.0)
    for i in np.flatnonzero(full_z):
        z[i] = np.exp(logits[i].astype(np.float64) - top[i]).sum()
    reach = np.full(n, REACH)
    pending = truncating.copy()
    for tier in _TIERS[:-1]:
        rows = np.flatnonzero(pending)
        if not len(rows):
            break
        sub = logits[rows]
        k = top_k[rows]
        ok = (k == 0) & (min_reach[rows] <= tier)
        if (k > 0).any():
            ok |= (k > 0) & (np.count_nonzero(sub >= (top[rows] - tier)[:, None], axis=1) >= k)
        for j in np.flatnonzero((k == 0) & (top_p[rows] < 1.0) & ~ok):
            row = sub[j]
            near = row[row >= top[rows[j]] - tier].astype(np.float64)
            ok[j] = np.exp(near - top[rows[j]]).sum() >= top_p[rows[j]] * z[rows[j]]
        reach[rows[ok]] = tier
        pending[rows[ok]] = False
    # Without top-k, nothing below the min-p line can be kept: no need to sort it.
    reach = np.where(top_k == 0, np.minimum(reach, min_reach), reach)
    rows = np.flatnonzero(truncating)
    sub = logits[rows] if len(rows) < n else logits
    tsub = top[rows]
    mask = sub >= (tsub - reach[rows]).astype(np.float32)[:, None]
    counts = np.count_nonzero(mask, axis=1)
    # A flat row puts thousands of tokens within reach; with top-k only its top k matter, found by
    # a partition (linear) rather than a sort.
    wide = np.flatnonzero((counts > _WIDE) & (top_k[rows] > 0))
    extra: dict[int, np.ndarray] = {}
    for j in wide:
        kk = int(top_k[rows[j]])
        extra[int(j)] = np.argpartition(sub[j], v - kk)[v - kk :]
        mask[j] = False
        counts[j] = kk
    r, c = np.nonzero(mask)
    if extra:
        r = np.concatenate([r, *(np.full(len(x), j) for j, x in extra.items())])
        c = np.concatenate([c, *extra.values()])
        order_rc = np.argsort(r, kind="stable")
        r, c = r[order_rc], c[order_rc]
    m = len(rows)
    width = int(counts.max())
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    pos = np.arange(len(r)) - starts[r]
    vals = np.full((m, width), -np.inf, dtype=np.float64)
    ids = np.zeros((m, width), dtype=np.int64)
    vals[r, pos] = sub[r, c]
    ids[r, pos] = c
    order = np.argsort(-vals, axis=1, kind="stable")  # ties: the lower token id first
    vals = np.take_along_axis(vals, order, axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    col = np.arange(width)[None, :]
    tk, tp, mp, tt = top_k[rows, None], top_p[rows, None], min_p[rows, None], temp[rows, None]
    keep = np.isfinite(vals)
    keep &= (tk == 0) | (col < tk)
    e = np.where(keep, np.exp(vals - tsub[:, None].astype(np.float64)), 0.0)
    zr = np.where(full_z[rows], z[rows], e.sum(axis=1))[:, None]
    before = (np.cumsum(e, axis=1) - e) / zr  # probability mass of the better candidates
    keep &= (tp >= 1.0) | (before < tp)
    keep &= e >= mp  # e is p / p_max
    keep[:, 0] = True  # min_keep = 1
    w = np.where(keep, np.exp((vals - tsub[:, None]) / tt), 0.0)
    cw = np.cumsum(w, axis=1)
    pick = (cw < (u[rows] * cw[:, -1])[:, None]).sum(axis=1)
    pick = np.minimum(pick, keep.sum(axis=1) - 1)
    out[rows] = ids[np.arange(m), pick]
    return out


# Rows per thread: of the compiled helper (each reads ~5 MB of logits at 8 rows, started per step),
# or per task of the numpy path's pool, measured for that path: a task costs ~25 us a row (152k vocabulary) plus ~7 numpy passes
# that each release and retake the GIL; retaking it beside a thread running Python (the server's
# HTTP side) can wait out the 5 ms switch interval, so many small tasks lose (two rows a task
# lowered served sampled/greedy 0.80 -> 0.67 at 64 clients on a 16-core H100 host). Measured on
# a 2-core dev box (bench/sampling_speed.py --rows-per-worker N [--busy]): 16 rows alone 0.6 ms
# in two tasks of 8, 0.7 ms as one of 16; beside a busy Python thread 8 and 16 were within the
# noise (83-103 vs 87-98 ms at 16 rows, 145-161 vs 120-160 ms at 64), both well under the
# whole-vocabulary chain's 108-246 and 280-540 ms. So 8, as before.
_ROWS_PER_WORKER = 8
_pool: Any = None


def _workers(n: int) -> int:
    """Threads for a step of ``n`` rows (1: do it here)."""
    return max(1, min(os.cpu_count() or 1, n // _ROWS_PER_WORKER))


def _start_pool() -> Any:
    global _pool
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="ggufrun-sample")
    return _pool


def _argmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise argmax, split over threads for a big step: a [64, 152k] matrix freshly copied from
    the GPU is 39 MB that one core reads at memory speed (~3 ms on the H100 host). In one call of
    the compiled helper (threads started in C) where the install built it, else numpy's argmax
    (which releases the GIL) in chunks on the pool."""
    from . import native

    n = logits.shape[0]
    workers = _workers(n)
    if native.available() and logits.dtype == np.float32 and logits.strides[1] == 4:
        return native.argmax_rows(logits, workers)
    if workers < 2:
        return logits.argmax(axis=1)
    bounds = np.linspace(0, n, workers + 1).astype(int)
    parts = [_start_pool().submit(np.argmax, logits[a:b], 1) for a, b in zip(bounds[:-1], bounds[1:])]
    return np.concatenate([p.result() for p in parts])


def _draw_rows(logits: np.ndarray, seqs: list[SeqSampler], u: np.ndarray) -> np.ndarray:
    """Draw every row. With the compiled helper, here: its one call splits the candidate search
    over threads itself. Without it, a chunk of rows a pool task for a big step
    (:func:`_draw_chunk`): serially, the numpy search's gathers and sorts and the per-row chain
    calls cost as much again as the pass over the logits."""
    from . import native

    n = len(seqs)
    workers = _workers(n)
    if native.available():
        return _draw_chunk(logits, seqs, u, workers)
    if workers < 2:
        return _draw_chunk(logits, seqs, u)
    bounds = np.linspace(0, n, workers + 1).astype(int)
    parts = [_start_pool().submit(_draw_chunk, logits[a:b], seqs[a:b], u[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return np.concatenate([p.result() for p in parts])


def _draw_chunk(logits: np.ndarray, seqs: list[SeqSampler], u: np.ndarray, threads: int = 1) -> np.ndarray:
    """Rows with a llama.cpp chain draw through it; the rest through the numpy :func:`_draw`.

    A chain with top-k gets only its row's top candidates (:func:`_top_k_candidates`, vectorised
    over the rows), so each of its rows costs one C call over a few dozen entries, instead of
    filling and sorting the whole vocabulary. Each sequence's chain is used by one thread only."""
    chained = [i for i, s in enumerate(seqs) if s.draw is not None]
    if not chained:
        return _draw(logits, seqs, u)
    out = np.zeros(len(seqs), dtype=np.int64)
    topk = [i for i in chained if seqs[i].draw.top_k > 0]  # type: ignore[union-attr]
    found: dict[int, tuple[np.ndarray, np.ndarray] | None] = {}
    if topk:
        sub = logits if len(topk) == len(seqs) else logits[topk]
        ks = np.array([seqs[i].draw.top_k for i in topk])  # type: ignore[union-attr]
        drawn, cands = _draw_compiled(sub, ks, [seqs[i].draw for i in topk], threads)
        if drawn is not None:
            for i, token in zip(topk, drawn.tolist()):
                if token >= 0:
                    out[i] = token
                    chained.remove(i)
                else:
                    found[i] = None
        else:
            found = dict(zip(topk, cands if cands is not None else _top_k_candidates(sub, ks, threads)))
    for i in chained:
        draw = seqs[i].draw
        assert draw is not None
        cand = found.get(i)
        out[i] = draw.draw(logits[i]) if cand is None else draw.draw_among(*cand)
    rest = [i for i, s in enumerate(seqs) if s.draw is None]
    if rest:
        out[rest] = _draw(logits[rest], [seqs[i] for i in rest], u[rest])
    return out


def _draw_compiled(logits: np.ndarray, ks: np.ndarray, draws: list[Any],
                   threads: int) -> tuple[np.ndarray | None, list[tuple[np.ndarray, np.ndarray] | None] | None]:
    """(tokens, None) from the compiled helper: the top-k search, then each row's llama.cpp chain
    over its candidates, both in C (-1: a row to draw from whole). Where the chains have no
    batched call, (None, the rows' candidates) from the one search; (None, None) without the
    helper. One call each, where a Python round trip per row cost ~10 us (0.6 ms at 64 rows)."""
    from . import native

    if not native.available():
        return None, None
    ids, vals, counts = native.topk_arrays(logits, ks, threads)
    batched = getattr(type(draws[0]), "draw_rows", None)
    drawn: np.ndarray | None = batched(draws, ids, vals, counts) if batched is not None else None
    return (drawn, None) if drawn is not None else (None, native.candidates_of(ids, vals, counts))


# Top-k candidates are found through column maxima: a row's first v - v % _GROUPS logits seen as
# _GROUPS x (v // _GROUPS), maxed down the groups (one contiguous, vectorised pass). The k-th
# largest column maximum is a threshold that at least k tokens reach, and only the few columns
# whose maximum reaches it are read again: ~23 us a 152k row in all, against ~90 us to fill and
# partially sort the whole row for the chain (2-core dev box).
_GROUPS = 64


def _top_k_candidates(logits: np.ndarray, ks: np.ndarray, threads: int = 1) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Per row, (ids, logits) of a candidate set holding the row's ``ks[row]`` largest logits, or
    None where it would not (NaN, a vocabulary under k x _GROUPS). Every token at or above the
    row's threshold is in (ties too), so the top k of the candidates are the top k of the row: a
    chain that starts with top-k draws the same token from them as from the whole row (exact ties
    inside the top k aside: llama.cpp's partial sort orders those as it happens to). The compiled
    helper (ggufrun/native.py) when the install built it: one call, on ``threads`` threads of its
    own; else whole-matrix numpy, no per-row Python, but ~25 calls that each take the GIL back."""
    from . import native

    if native.available():  # the same contract in one C call (ggufrun/_topk.c)
        return native.topk_candidates(logits, ks, threads)
    n, v = logits.shape
    cols = v // _GROUPS
    small = ks <= cols  # rows whose k has a threshold among the column maxima; the others come back None
    if not small.all():
        out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * n
        rows = np.flatnonzero(small)
        if len(rows):
            for r, found in zip(rows.tolist(), _top_k_candidates(logits[rows], ks[rows])):
                out[r] = found
        return out
    j = int(ks.max())
    body = logits[:, : cols * _GROUPS].reshape(n, _GROUPS, cols)  # token g * cols + c at [:, g, c]
    colmax = body.max(axis=1)
    threshold = np.partition(colmax, cols - j, axis=1)[:, cols - j]  # >= j tokens reach it
    flat = np.flatnonzero(colmax >= threshold[:, None])
    row, col = flat // cols, flat % cols
    block = body[row, :, col]  # [columns, _GROUPS]
    hit_col, hit_group = np.nonzero(block >= threshold[row][:, None])
    rows = row[hit_col]
    ids = (hit_group * cols + col[hit_col]).astype(np.int32)
    vals = block[hit_col, hit_group]
    if cols * _GROUPS < v:  # the tail that does not fill a column: always a candidate
        tail = np.arange(cols * _GROUPS, v, dtype=np.int32)
        rows = np.concatenate([rows, np.repeat(np.arange(n), len(tail))])
        ids = np.concatenate([ids, np.tile(tail, n)])
        vals = np.concatenate([vals, logits[:, cols * _GROUPS :].reshape(-1)])
    # In token order, as in the whole row: the chain breaks ties by position, so the same token.
    order = np.argsort(rows.astype(np.int64) * v + ids)
    rows, ids, vals = rows[order], ids[order], vals[order]
    bounds = np.searchsorted(rows, np.arange(n + 1))
    ok = ~np.isnan(threshold)  # a NaN among the top columns: no order to trust, the whole row goes
    return [(ids[a:b], vals[a:b]) if good and b - a >= k else None
            for a, b, k, good in zip(bounds[:-1], bounds[1:], ks, ok)]


def _logprob_info(row: np.ndarray, temp: float, token: int, n_top: int) -> tuple[float, list[tuple[int, float]]]:
    scaled = row.astype(np.float64) / (temp if temp > 0 else 1.0)
    m = scaled.max()
    if not math.isfinite(m):  # every token banned: no distribution to speak of
        ids = np.argsort(-scaled, kind="stable")[:n_top]
        return MIN_LOGPROB, [(int(i), MIN_LOGPROB) for i in ids]
    lse = m + math.log(np.exp(scaled - m).sum())
    top: list[tuple[int, float]] = []
    if n_top:
        idx = np.argpartition(-scaled, n_top - 1)[:n_top]
        idx = idx[np.argsort(-scaled[idx], kind="stable")]
        top = [(int(i), float(scaled[i] - lse)) for i in idx]
    return _finite(scaled[token] - lse), [(i, _finite(v)) for i, v in top]


# OpenAI's floor for a token the model gives no chance: a logprob must be a JSON number, and with
# every token banned (-inf logits) the arithmetic above gives -inf or NaN.
MIN_LOGPROB = -9999.0


def _finite(value: float) -> float:
    return float(value) if math.isfinite(value) else MIN_LOGPROB


# A grammar row whose draw does not fit is drawn again among the tokens the grammar allows. With
# no more candidates than this (grammar_filter's prefilter leaves a few hundred in a JSON structure
# state) all of them are checked: ~62 ns a token, against ~9 ms for a 152k vocabulary (2-core dev box).
_CHECK_ALL = 4096
# Else (a permissive state, inside a string) only the best logits are checked, this many and then
# this many, until the draw's k best allowed tokens are among them; then every candidate.
_SCAN = (256, 2048)


def _constrain(logits: np.ndarray, tokens: np.ndarray, seqs: list[SeqSampler]) -> None:
    """Where a row's grammar rejects its drawn token, draw again under the grammar (in place).

    As llama-server: the cheap draw first, the grammar only when it missed; the new token is the
    chain's over the grammar-masked row, found from only the allowed tokens that can matter."""
    for i, s in enumerate(seqs):
        g = s.grammar
        if g is not None and not g.allows(int(tokens[i])):
            tokens[i] = _redraw(logits[i], s)


def _redraw(row: np.ndarray, s: SeqSampler) -> int:
    """The token the row's sampling picks from ``row`` masked by the grammar (-1: it allows nothing).

    A top-k chain's (or greedy) pick depends only on the k (1) best allowed tokens, and the chain
    draws the same from them, in token order, as from the masked row; logprobs need every allowed
    token (their normaliser), and those rows and the numpy draw get the masked row itself."""
    p, g = s.params, s.grammar
    assert g is not None
    if p.logprobs is not None:
        k = 0
    elif p.greedy:
        k = 1
    elif s.draw is not None:
        k = s.draw.top_k
    else:
        k = p.top_k if 0 < p.top_k < len(row) else 0
    if not hasattr(g, "candidates"):  # a grammar that only masks whole rows
        g.mask(row)
        ids = np.flatnonzero(~np.isneginf(row))
    else:
        ids = _allowed(row, g, k)  # type: ignore[arg-type]
    if p.logprobs is not None or (s.draw is None and not p.greedy):
        keep = row[ids]
        row[:] = -np.inf
        row[ids] = keep
    vals = row[ids]
    if not np.isfinite(vals).any():
        return -1
    if p.greedy:
        return int(ids[np.argmax(vals)])  # ids ascend: the lowest id among equal logits, as argmax
    u = s.rng.random()
    if s.draw is not None:
        return s.draw.draw_among(ids, vals)
    return int(_draw(row[None], [s], np.array([u]))[0])


class SubsetGrammar(GrammarLike, Protocol):
    """A grammar that can answer for some tokens (runtime.Grammar)."""

    def allowed(self, ids: np.ndarray) -> np.ndarray: ...
    def candidates(self) -> Any: ...  # grammar_filter.Candidates: .count, .ids(), .may(ids)
    def allowed_candidates(self) -> np.ndarray: ...  # the candidates it allows, ascending


def _allowed(row: np.ndarray, g: SubsetGrammar, k: int) -> np.ndarray:
    """Ascending ids of allowed tokens among which are the row's ``k`` best allowed ones (k = 0:
    every allowed token). Tokens are examined best logit first only while that can stop early."""
    cand = g.candidates()
    v = len(row)
    above = np.inf  # every token at or above this logit has been examined
    found: list[np.ndarray] = []
    if k > 0 and cand.count > _CHECK_ALL:
        n = 0
        for c in _SCAN:
            if 4 * c > v:
                break
            top = _top_region(row, c)
            if top is None:  # NaN or -inf: no order to go by
                break
            threshold, region = top
            if above != np.inf:
                region = region[row[region] < above]
            region = region[cand.may(region)]
            hit = region[g.allowed(region)]
            found.append(hit)
            n += len(hit)
            above = threshold
            if n >= k:  # every allowed token not examined has a lower logit than these k
                return np.sort(np.concatenate(found))
    if not found:
        return g.allowed_candidates()  # found already when the token was accepted, where few
    ids = cand.ids()
    ids = ids[~(row[ids] >= above)]
    ids = ids[g.allowed(ids)]
    return np.sort(np.concatenate([*found, ids]))


def _top_region(row: np.ndarray, c: int) -> tuple[float, np.ndarray] | None:
    """The row's ``c``-th largest logit and the ascending ids of every token at or above it;
    None where there is no order to go by (a NaN, or that logit is -inf). The compiled search
    takes ~20 us where a partition of a 152k row takes ~0.5 ms."""
    from . import native

    if native.available() and c <= len(row) // 64:  # (the compiled search needs a block of 64 per k)
        found = native.topk_candidates(row[None], np.array([c]))[0]
        if found is None:
            return None
        threshold = float(found[1].min())
        return (threshold, found[0].astype(np.int64)) if threshold > -np.inf else None
    threshold = np.partition(row, len(row) - c)[len(row) - c]
    if not threshold > -np.inf:
        return None
    return float(threshold), np.flatnonzero(row >= threshold)


def sample_rows(logits: np.ndarray, seqs: list[SeqSampler]) -> tuple[list[int], list[tuple[float, list[tuple[int, float]]] | None]]:
    """Sample one token per row of ``logits`` (float32 [rows, n_vocab], modified in place) for
    ``seqs`` (one per row); return the tokens and, per row, (logprob, top alternatives) or None.
    The caller accepts the tokens into the samplers (``SeqSampler.accept``)."""
    n = logits.shape[0]
    _penalise(logits, seqs)
    tokens = np.zeros(n, dtype=np.int64)
    greedy = np.array([s.params.greedy for s in seqs], dtype=bool)
    if greedy.any():
        gi = np.flatnonzero(greedy)
        tokens[gi] = _argmax_rows(logits if greedy.all() else logits[gi])
    if not greedy.all():
        si = np.flatnonzero(~greedy)
        # One uniform per sampled row from its own generator: batch-independent by construction.
        u = np.array([seqs[i].rng.random() for i in si])
        sub = logits if len(si) == n else logits[si]
        tokens[si] = _draw_rows(sub, [seqs[i] for i in si], u)
    _constrain(logits, tokens, seqs)
    infos: list[tuple[float, list[tuple[int, float]]] | None] = [None] * n
    for i, s in enumerate(seqs):
        if s.forced:
            tokens[i] = s.take_forced(int(tokens[i]))
        if s.params.logprobs is not None and tokens[i] >= 0:
            infos[i] = _logprob_info(logits[i], s.params.temperature, int(tokens[i]), s.params.logprobs)
    return [int(t) for t in tokens], infos


def classify_stops(vocab: Vocab, stops: list[str] | tuple[str, ...]) -> tuple[frozenset[int], tuple[str, ...]]:
    """Stop strings that are one control token are matched by id (they print as nothing); every
    other stop is matched in the text, which also catches it inside a longer token."""
    named, texts = _classify_stops(vocab, stops)
    return frozenset(named), texts


def _classify_stops(vocab: Vocab, stops: list[str] | tuple[str, ...]) -> tuple[dict[int, str], tuple[str, ...]]:
    """classify_stops, with the stop string each id stands for."""
    ids: dict[int, str] = {}
    texts = []
    for s in stops:
        if not s:
            continue
        toks = vocab.tokenize(s, add_special=False, parse_special=True)
        if len(toks) == 1:
            ids.setdefault(toks[0], s)
            if vocab.token_bytes(toks[0]):
                texts.append(s)
        else:
            texts.append(s)
    return ids, tuple(texts)


def split_stop(pending: str, stops: tuple[str, ...] | list[str]) -> tuple[str, str, str | None]:
    """Split streamed text into (safe to show, held back, the stop string hit or None).

    Text that might be the start of a stop string is held back until the next piece decides,
    so a client never sees half of "<|im_end|>". On a hit, everything from the stop on is dropped;
    the earliest stop wins (the first listed, where two start at the same place).
    """
    hits = [(i, s) for s in stops if s and (i := pending.find(s)) >= 0]
    if hits:
        at, stop = min(hits, key=lambda h: h[0])
        return pending[:at], "", stop
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(pending)), hold, -1):
            if pending.endswith(s[:k]):
                hold = k
                break
    return (pending[:-hold], pending[-hold:], None) if hold else (pending, "", None)


class Generation:
    """One sequence's generation after its prompt: feed it each sampled token with :meth:`accept`.

    ``accept`` returns the text now safe to show and a finish reason once the sequence ends
    ("stop": end of generation, a stop token or string; "length": ``max_tokens`` or ``n_ctx``).
    Text held back (a possible stop string, half a UTF-8 character) comes out of :meth:`finish`.
    """

    def __init__(self, vocab: Vocab, prompt: list[int], params: SamplingParams, *, max_tokens: int = 0,
                 n_ctx: int = 0, stop: list[str] | tuple[str, ...] = (), stop_ids: frozenset[int] | None = None,
                 ignore_eos: bool = False, cached: int = 0, grammar_factory: Callable[[str], GrammarLike] | None = None,
                 draw_factory: Callable[[SamplingParams], DrawLike | None] | None = None,
                 think: ThinkBudget | None = None) -> None:
        self.vocab = vocab
        self.params = params
        self.max_tokens = max_tokens
        self.n_ctx = n_ctx
        self.ignore_eos = ignore_eos
        self._stop_names: dict[int, str] = {}
        if stop_ids is None:
            self._stop_names, self.stop_texts = _classify_stops(vocab, stop)
            self.stop_ids = frozenset(self._stop_names)
        else:
            self.stop_ids, self.stop_texts = stop_ids, tuple(stop)
        self.stop_sequence: str | None = None  # the stop string that ended the sequence (Anthropic reports it)
        bad = next((t for t in params.logit_bias if not 0 <= int(t) < vocab.n_vocab), None)
        if bad is not None:  # numpy would raise mid-step, in the sampling of every row at once
            raise GgufrunError(f"Invalid 'logit_bias': token id {bad} is outside the vocabulary of {vocab.n_vocab}.")
        grammar = grammar_factory(params.grammar) if params.grammar and grammar_factory is not None else None
        draw = draw_factory(params) if draw_factory is not None and not params.greedy else None
        if params.infill >= 0 and draw is None:
            raise GgufrunError("The infill sampler runs only in llama.cpp's sampler chain (no draw_factory was given).")
        self.sampler = SeqSampler(params, prompt, grammar, n_ctx, draw)
        self.n_prompt = len(prompt)
        self.stats = GenStats(prompt_tokens=len(prompt), cached_tokens=cached)
        self.started = time.perf_counter()
        self._first = 0.0
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self.finish_reason = ""
        self.tokens: list[TokenInfo] = []  # logprob entries behind the text not yet returned
        self.watch = ThinkWatch(think) if think is not None else None  # a reasoning model's thinking, counted

    @property
    def n_gen(self) -> int:
        return self.stats.gen_tokens

    def accept(self, token: int, info: tuple[float, list[tuple[int, float]]] | None = None) -> tuple[str, str | None]:
        """Take one sampled token; return (text to show, finish reason or None)."""
        now = time.perf_counter()
        st = self.stats
        if st.gen_tokens == 0 and not self._first:
            self._first = now
            st.prompt_seconds = st.ttft_seconds = now - self.started
        else:
            st.gen_seconds = now - self._first
        if token < 0:  # the grammar allows nothing more: the structure is complete
            return self._end("stop")
        if self._stops_at(token):
            self.stop_sequence = self._stop_names.get(token)
            return self._end("stop")
        self.sampler.accept(token)
        st.gen_tokens += 1
        piece = self._utf8.decode(self.vocab.token_bytes(token))
        if self.watch is not None:
            if self.watch.feed(piece):  # the thinking budget is spent: its block's close comes next
                self.sampler.forced = deque(self.watch.plan.close_tokens)
            st.reasoning_tokens = self.watch.count
        if self.params.logprobs is not None:
            lp, top = info if info is not None else (None, [])
            self.tokens.append(TokenInfo(token, self.vocab.token_bytes(token).decode("utf-8", "replace"), lp,
                                         [(self.vocab.token_bytes(t).decode("utf-8", "replace"), v) for t, v in top],
                                         [t for t, _ in top]))
        text = self._held + piece
        if self.stop_texts:
            text, self._held, hit = split_stop(text, self.stop_texts)
            if hit is not None:
                self.stop_sequence = hit
                return self._end("stop", text, flush=False)
        else:
            self._held = ""
        if self._full(st.gen_tokens):
            return self._end("length", text)
        return text, None

    def ending(self, token: int, text: str, reason: str) -> list[tuple[int, str]]:
        """What a stream yields for the token :meth:`accept` ended on: the token with its text where
        it was a real token cut by the length limit, else only the text (if any) as (-1, text)."""
        if token >= 0 and reason == "length":
            return [(token, text)]
        return [(-1, text)] if text else []

    def context_full(self) -> list[tuple[int, str]]:
        """End the sequence because the KV cache has no cell left; what is still held back, as (-1, text)."""
        self.finish_reason = self.stats.finish_reason = "length"
        tail = self.finish()
        return [(-1, tail)] if tail else []

    def ends_at(self, token: int) -> bool:
        """Whether :meth:`accept` will surely end the sequence on ``token`` (end of generation, a stop
        token, a length limit): the engine leaves such a token out of the next decode. A stop string
        is found only by :meth:`accept`; a token that completes one has been decoded in vain."""
        return token < 0 or self._stops_at(token) or self._full(self.stats.gen_tokens + 1)

    def _stops_at(self, token: int) -> bool:
        # ignore_eos also passes over the template's stop tokens (end-of-turn markers); stop
        # strings that print as text are still matched in accept's text.
        return not self.ignore_eos and (token in self.stop_ids or self.vocab.is_eog(token))

    def _full(self, n_gen: int) -> bool:
        """Whether ``n_gen`` generated tokens reach max_tokens or the context."""
        return bool((self.max_tokens and n_gen >= self.max_tokens) or (self.n_ctx and self.n_prompt + n_gen >= self.n_ctx))

    def _end(self, reason: str, text: str = "", *, flush: bool = True) -> tuple[str, str]:
        self.finish_reason = self.stats.finish_reason = reason
        if flush:
            text += self.finish()
        return text, reason

    def finish(self) -> str:
        """Text still held back (call once the sequence ends for any reason)."""
        tail = self._held + self._utf8.decode(b"", final=True)
        self._held = ""
        return tail

    def take_tokens(self) -> list[TokenInfo]:
        out, self.tokens = self.tokens, []
        return out

    def close(self) -> None:
        if not self.finish_reason:
            self.finish_reason = self.stats.finish_reason = "cancelled"
        self.sampler.close()
