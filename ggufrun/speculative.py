"""Speculative decoding: a drafter guesses the next few tokens, the target checks them in one decode.

libllama has no speculative API (llama.cpp keeps it in its common library), so it is built here on
what every ggufrun generation already uses: the target evaluates ``[last token] + draft`` in one
``llama_decode`` with logits at every position; each position's row goes through the sequence's own
sampler (penalties, bias, grammar, its seeded generator), in order, and the reply keeps tokens while
the sampled token equals the draft's; the first that differs (or the token after a fully accepted
draft) is the target's own. The rejected tail leaves the KV cache (``llama_memory_seq_rm``).

Why this is exact: with a deterministic draft token ``x``, drawing ``t`` from the target's
distribution ``p`` and keeping ``x`` iff ``t == x`` accepts ``x`` with probability ``p(x)`` and
otherwise yields ``t`` from ``p`` without ``x``, renormalised: the standard rejection rule, with
one draw per generated token. So a seeded reply is the same token for token with or without
speculation, greedy or sampled, and penalties, bias, stop strings, grammars and logprobs see only
accepted tokens and the target's logits.

Two drafters: :class:`NgramDrafter` (the latest earlier occurrence of the text's last few tokens
proposes what followed it: no second model; editing and code tasks repeat) and
:class:`ModelDrafter` (a small model of the same vocabulary, greedy, in its own context with one
sequence per target sequence). :class:`Speculator` holds one of them with the per-sequence pace:
the draft length follows what gets accepted, and a sequence whose drafts keep failing stops drafting
for exponentially longer spans, so speculation that does not pay costs next to nothing.

This module stays free of llama.cpp: the models it drives are ``llama.model.Model`` objects.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, overload

import numpy as np

from .errors import ConfigError, ContextOverflowError

DRAFT_MAX = 16  # llama-server's speculative.n_max default
DRAFT_MIN = 0  # llama-server's speculative.n_min default
NGRAM_SIZES = (4, 3)  # longest first: a longer match predicts better (2-grams drafted free text in vain)
P_MIN = 0.75  # a model draft stops at a token its drafter gives less than this (llama.cpp's p_min)
FIRST_DRAFT = 4  # a sequence's first draft length, doubled while drafts are accepted whole
# Steps a sequence whose drafts all failed waits, at most, before drafting again. Each failed try
# costs a draft (a catch-up decode and a short draft in the draft model) and a wider target decode:
# about two tokens' time once per BACKOFF_MAX steps, under 1% at 256.
BACKOFF_MAX = 256
# The time guard (Guard): a draft accepted in full can still cost more than it saves (a draft model
# about as slow as its target on a CPU), and a rejected one costs more than its share of steps where
# a GPU rebuilds its graphs after a verify batch. So drafting is judged by the clock too.
# Plain steps after a drafted one charged to the drafting: its after-effects. On a CPU whose cache
# held the target's weights, a draft model's decode evicts them and the next several target steps
# ran ~1.5x slower (SmolLM2 F16 + Q4_1); on a GPU a verify batch breaks the graph reuse.
GUARD_AFTER = 8
GUARD_EPISODE = 4  # drafted steps a judged stretch spans at most (a draft always accepted never pauses: judge it soon)
GUARD_PLAIN = 3  # plain steps a batch width needs timed before drafting there is judged
# Drafting goes on only where it beats plain steps by this much: a closer verdict is within a shared
# machine's noise (16 CPU streams drafting in vain were judged paying at 1-2% margins), and a gain that
# small is not worth a slowdown where the verdict was wrong.
GUARD_MARGIN = 0.05
GUARD_REFRESH = 32  # judged stretches between fresh plain timings (the context grows, the load drifts)
# Steps between tries of drafting that did not pay for its time: 16, 32 ... GUARD_MAX. A clock's
# verdict covers a whole stretch of steps, firmer than one rejected draft: it starts 16 steps out.
GUARD_FIRST = 16
GUARD_MAX = 4 * BACKOFF_MAX
# A try that did not pay is charged what it cost (its catch-up, its slower steps), and the pause
# after it is long enough that such tries take at most this share of the time, up to GUARD_LONGEST
# steps: a draft model that costs a target decode a token (SmolLM2 Q4_1 for F16 on a CPU) lost
# ~0.4 s a try on a 100-token catch-up, where 16 steps of 31 ms had made it 80% of the time.
GUARD_SHARE = 0.02
GUARD_LONGEST = 8 * GUARD_MAX
# A draft model's catch-up after a pause feeds at most this many of the latest tokens (after the
# text's first SINK, which attention leans on); a longer backlog's middle is left out of its cache.
CATCHUP_WINDOW = 256
SINK = 4
# A serving step's tokens from generating sequences, drafts included, stay within this: past it a
# batch is busy enough that extra positions cost the others time (64 streams draft nothing).
STEP_TOKENS = 32


class Drafter(Protocol):
    costly: bool  # whether a call that drafts nothing still costs time (the guard charges it)
    catchup_s: float  # the last call's backlog catch-up decode (0: none), for the time guard
    decode_s: float | None  # the last call's quickest one-token draft decode (None: none timed)

    def draft(self, items: list[tuple[int, Sequence[int], int]]) -> list[list[int]]:
        """Per (seq_id, tokens so far, most to draft): the guessed continuation (maybe empty).
        Between two ``forget(seq_id)`` a sequence's tokens only grow."""
        ...

    def forget(self, seq_id: int) -> None: ...
    def close(self) -> None: ...


class Text(Sequence[int]):
    """A sequence's cached tokens and its last sampled one, read in place: drafting sees the whole
    text every step without copying it (a drafter reads the end and what is new)."""

    __slots__ = ("hist", "last")

    def __init__(self, hist: Sequence[int], last: int) -> None:
        self.hist, self.last = hist, last

    def __len__(self) -> int:
        return len(self.hist) + 1

    def __iter__(self) -> Iterator[int]:
        yield from self.hist
        yield self.last

    @overload
    def __getitem__(self, i: int) -> int: ...
    @overload
    def __getitem__(self, i: slice) -> list[int]: ...

    def __getitem__(self, i: int | slice) -> int | list[int]:
        n = len(self.hist)
        if isinstance(i, slice):
            start, stop, step = i.indices(n + 1)
            if step != 1:
                return list(self)[i]
            out = list(self.hist[start:min(stop, n)])
            return out + [self.last] if start <= n < stop else out
        if i < 0:
            i += n + 1
        if i == n:
            return self.last
        if not 0 <= i < n:
            raise IndexError(i)
        return self.hist[i]


class NgramDrafter:
    """Prompt and history lookup: the continuation of the latest earlier occurrence of the last
    4 or 3 tokens. Each sequence keeps its own copy of the text and an index (n-gram -> where its
    latest follower starts), both extended by what is new since the last draft: a step costs a
    few dict lookups, not a scan or a copy of the context."""

    label = "ngram"
    costly = False  # a lookup that finds nothing costs next to no time
    catchup_s = 0.0  # no decodes: nothing for the time guard to charge
    decode_s: float | None = None

    def __init__(self) -> None:
        self._seqs: dict[int, tuple[list[int], list[dict[tuple[int, ...], int]]]] = {}

    def _index(self, seq_id: int, tokens: Sequence[int]) -> tuple[list[int], list[dict[tuple[int, ...], int]]]:
        known = self._seqs.get(seq_id)
        # A text only grows between forget()s; the check at the end of what is indexed catches a caller that broke that.
        if known is None or len(tokens) < len(known[0]) or (known[0] and tokens[len(known[0]) - 1] != known[0][-1]):
            known = self._seqs[seq_id] = ([], [{} for _ in NGRAM_SIZES])
        text, index = known
        old = len(text)
        text.extend(tokens[old:])
        for i in range(old, len(text)):
            for k, n in enumerate(NGRAM_SIZES):
                if i >= n:
                    index[k][tuple(text[i - n : i])] = i
        return known

    def draft(self, items: list[tuple[int, Sequence[int], int]]) -> list[list[int]]:
        out = []
        for seq_id, tokens, n_max in items:
            guess: list[int] = []
            if n_max > 0:  # (a paused sequence's index catches up when it next drafts)
                text, index = self._index(seq_id, tokens)
                for k, n in enumerate(NGRAM_SIZES):
                    at = index[k].get(tuple(text[-n:])) if len(text) > n else None
                    if at is not None:
                        guess = text[at : at + n_max]
                        break
            out.append(guess)
        return out

    def forget(self, seq_id: int) -> None:
        self._seqs.pop(seq_id, None)

    def close(self) -> None:
        self._seqs.clear()


class ModelDrafter:
    """A small model of the target's vocabulary drafting greedily in a context of its own, one
    sequence per target sequence (its KV keeps the common prefix between steps). It syncs lazily:
    a sequence is fed nothing while it does not draft, and the backlog of accepted tokens goes in
    one batch when it next drafts, so a paused sequence costs no draft work at all. A backlog longer
    than CATCHUP_WINDOW tokens is not fed whole: the draft keeps the text's first SINK tokens and
    reads only the last CATCHUP_WINDOW (at the positions after them), so a try after a long pause
    costs a bounded decode, not one that grows with the pause. Every sequence drafting in a step
    goes through the same decodes: one to catch up, then one per drafted position. What it shares
    with the target's text is found from what it was fed (only its own guesses after that are
    compared), not by a scan of the context each step."""

    costly = True  # drafting costs decodes even where p_min leaves no draft

    def __init__(self, model: Any, name: str, p_min: float = P_MIN) -> None:
        self.model = model
        self.label = name
        self.p_min = p_min
        self._fed: dict[int, int] = {}  # seq -> leading cells of its draft cache known to hold its text
        # seq -> (head, skip): cells from ``head`` on hold the text ``skip`` tokens further on (a windowed catch-up)
        self._gap: dict[int, tuple[int, int]] = {}
        self._blind: set[int] = set()  # texts holding image positions: not the draft's to read (until forget)
        # The last draft call's timings, for the time guard: a backlog's catch-up decode (a one-off:
        # 0 where the catch-up was a step's worth) and the quickest of its one-token draft decodes.
        self.catchup_s = 0.0
        self.decode_s: float | None = None

    def _held(self, seq_id: int, tokens: Sequence[int]) -> int:
        """How many leading cells of the draft's cache hold ``tokens`` (by the sequence's gap): what it
        was fed, then its own guesses as far as they were right (a full comparison once per reply)."""
        head, skip = self._gap.get(seq_id, (0, 0))
        cached = self.model.history(seq_id)
        top = min(len(cached), len(tokens) - skip)
        n = self._fed.get(seq_id, 0)
        if n > top:  # a text that did not grow (a caller's mistake): compared whole, never trusted
            n = 0
        while n < top and cached[n] == tokens[n + skip if n >= head else n]:
            n += 1
        return n

    def _plan(self, seq_id: int, tokens: Sequence[int], n_max: int) -> list[int]:
        """Cut the sequence's draft cache to what still holds ``tokens`` and return what to feed."""
        m = self.model
        head, skip = self._gap.get(seq_id, (0, 0))
        cells = self._held(seq_id, tokens)
        if skip and cells <= head:  # only the kept start still matches: the cells are the text's again
            skip = 0
        cells = min(cells, len(tokens) - 1 - skip)  # the last token goes in again for its logits
        at = cells + skip  # the text's next token to feed
        todo: list[int] = []
        if len(tokens) - at > CATCHUP_WINDOW or cells + len(tokens) - at + n_max > m.seq_cells:
            # of the text's first tokens, what its cache still holds (with a gap kept, cells > its head = SINK)
            head = min(SINK, len(tokens) - 1)
            cells = min(cells, head)
            todo = list(tokens[cells:head])
            at = max(len(tokens) - CATCHUP_WINDOW, head)
            skip = at - head
        if m.truncate(seq_id, cells) < cells:
            # The cache could not drop a tail and cleared (recurrent and some sliding-window caches, at
            # every missed guess): planned again from an empty cache, so that it reads the window, not the text.
            self._fed.pop(seq_id, None)
            self._gap.pop(seq_id, None)
            return self._plan(seq_id, tokens, n_max)
        self._gap[seq_id] = (head, skip) if skip else (0, 0)
        return todo + list(tokens[at:])

    def draft(self, items: list[tuple[int, Sequence[int], int]]) -> list[list[int]]:
        m = self.model
        out: list[list[int]] = [[] for _ in items]
        self.catchup_s, self.decode_s = 0.0, None
        live = []
        for i, (seq_id, tokens, n_max) in enumerate(items):
            if n_max <= 0 or seq_id in self._blind or min(len(tokens), SINK + CATCHUP_WINDOW) + n_max > m.seq_cells:
                continue
            todo = self._plan(seq_id, tokens, n_max)
            if min(todo) < 0:  # image positions: not the draft's to read
                self._blind.add(seq_id)
                continue
            live.append((i, seq_id, todo, n_max))
        if not live:
            return out
        clock = time.perf_counter
        try:
            t0 = clock()
            rows = self._decode([(seq_id, todo) for _, seq_id, todo, _ in live])
            if any(len(todo) > n_max + 1 for _, _, todo, n_max in live):  # more than a step's accepted tokens
                self.catchup_s = clock() - t0
            for _, seq_id, _, _ in live:
                self._fed[seq_id] = m.seq_len(seq_id)
            for step in range(max(n for _, _, _, n in live)):
                picks = _greedy(rows, self.p_min)
                going = []
                for (i, seq_id, _, n_max), tok in zip(live, picks):
                    if tok < 0:
                        continue
                    out[i].append(tok)
                    if len(out[i]) < n_max:
                        going.append((i, seq_id, [tok], n_max))
                live = going
                if not live:
                    break
                t0 = clock()
                rows = self._decode([(seq_id, todo) for _, seq_id, todo, _ in live])
                took = clock() - t0
                self.decode_s = took if self.decode_s is None else min(self.decode_s, took)
        except ContextOverflowError:  # the draft's cache is full: these sequences go on without drafts
            pass
        return out

    def _decode(self, items: list[tuple[int, list[int]]]) -> np.ndarray:
        """One decode (a long catch-up alone, in chunks) with a row per item: a view of the logits
        while one decode did it (read before the next decode), else a copy."""
        m = self.model
        if sum(len(t) for _, t in items) <= m.n_batch:
            m.decode([(s, t, True) for s, t in items])
            return m.logits_rows(len(items))  # type: ignore[no-any-return]
        rows = []
        for seq_id, todo in items:
            m.decode([(seq_id, todo, True)])
            rows.append(np.array(m.logits_rows(1))[0])
        return np.stack(rows)

    def forget(self, seq_id: int) -> None:
        """The next draft for the sequence finds what it shares of its cache by comparing (a
        windowed cache, whose cells are not the text's positions, starts afresh)."""
        self._fed.pop(seq_id, None)
        self._blind.discard(seq_id)
        if self._gap.pop(seq_id, (0, 0))[1]:
            self.model.reset(seq_id)

    def close(self) -> None:
        self.model.close()


def _greedy(rows: np.ndarray, p_min: float) -> list[int]:
    """Each row's argmax, or -1 where its probability is below ``p_min`` (a guess not worth checking)."""
    best = rows.argmax(axis=1)
    if p_min <= 0:
        return [int(t) for t in best]
    out = []
    for row, t in zip(rows, best):
        top = row[t]
        # The softmax's sum over the logits within 20 of the top only: each one left out adds under
        # e^-20 (152k of them: 3e-4 in all, fine for a threshold), and the exp runs on a few hundred
        # values instead of the whole vocabulary (60 us a drafted token, not 140, on 152k here).
        z = np.exp(row[row > top - 20.0] - top, dtype=np.float32).sum(dtype=np.float32)
        out.append(int(t) if 1.0 / z >= p_min else -1)
    return out


@dataclass
class Pace:
    """One sequence's drafting pace: how long a draft to ask for, and how many steps to wait
    after drafts that were all rejected (1, 2, 4 ... BACKOFF_MAX)."""

    n_max: int = DRAFT_MAX
    n_min: int = DRAFT_MIN
    length: int = DRAFT_MAX
    misses: int = 0
    wait: int = 0

    def want(self) -> int:
        if self.wait > 0:
            self.wait -= 1
            return 0
        return self.length

    def record(self, drafted: int, accepted: int) -> None:
        if not drafted:
            return
        if accepted == 0:
            self.misses += 1
            self.wait = _backoff(self.misses)
            self.length = max(1, self.length // 2)
            return
        if 2 * accepted >= drafted:  # a draft that paid: the run of failures ends
            self.misses = 0
        self.length = min(self.n_max, 2 * self.length) if accepted == drafted else max(1, accepted + 1)


def _backoff(misses: int) -> int:
    """Steps to wait after ``misses`` failed drafts in a row: 0, 1, 2, 4 ... BACKOFF_MAX."""
    return min(1 << (misses - 1), BACKOFF_MAX) if misses > 0 else 0


class Guard:
    """Time-based back-off: drafting must emit tokens faster than plain steps do, by the clock.

    A step is the time between two ``tick`` calls (one per decode step: Model.stream's loop, the
    engine's launch) and emits its generating sequences' tokens plus the drafted tokens accepted.
    Plain steps give the baseline (per batch width: the lower quartile of the latest 8 seconds per token);
    a stretch of drafting steps, and the GUARD_AFTER steps after it, is one episode, judged against
    it. An episode no faster than plain pauses drafting for 16, 32 ... GUARD_MAX steps, or longer
    where the try cost more: long enough that such tries take at most GUARD_SHARE of the time. One
    that paid ends the run. A draft model whose single decode takes as long as a plain step can
    never pay, whatever it gets accepted: that is a verdict at once. A draft model's catch-up after
    a pause is a one-off: not held against the drafting's pace, but charged to the try's cost.
    Steps whose batch width changed (a request joined or left: a prompt may have gone in) or that
    follow a new reply's prompt are not timed."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.plain: dict[int, deque[float]] = {}  # batch width -> recent plain steps' seconds per token
        self.judged: dict[int, int] = {}  # batch width -> episodes judged since its last plain timing
        self.slow = 0  # episodes in a row that did not pay
        self.wait = 0  # steps left before drafting may be tried again
        self.episodes = self.paid = 0  # totals, for tests and bench
        self.debt = 0.0  # seconds of catch-up decodes neither charged to a verdict nor paid back by drafting that paid
        self._last: float | None = None
        self._n = 0
        self._extra = 0  # drafted tokens accepted in the step being timed
        self._drafting = False  # the step being timed decoded a draft
        self._catchup = 0.0  # seconds of it that were a catch-up
        self._verified = 0.0  # when the step being timed had its draft verified
        self._untimed = 0  # steps after a verdict given mid-step: neither baseline nor episode (after-effects)
        self._ep: list[float] | None = None  # the open episode: [seconds, tokens, drafted steps, plain steps after its last draft]

    def restart(self) -> None:
        """The next step is not timed (a prompt went in before it): an open episode is judged as it
        stands (a short reply ends it; a drafted step it ended with is timed to its verification)."""
        if self._drafting and self._last is not None and self._verified > self._last and self._n > 0:
            self._time(self._verified - self._last - self._catchup, self._n + self._extra)
        ep = self._ep
        if ep is not None and ep[2] > 0 and ep[1] > 0:
            self._judge(ep)
        self._last, self._ep = None, None

    def tick(self, n: int) -> bool:
        """A decode step of ``n`` generating sequences starts: time the one before. Returns whether
        this step may draft."""
        now = self.clock()
        if self._last is not None and n == self._n and n > 0:
            self._time(now - self._last - self._catchup, n + self._extra)
        elif self._ep is not None:  # the width changed: the stretch is judged as it stands, at its own width
            ep, self._ep = self._ep, None
            if ep[2] > 0:
                self._judge(ep)
        self._last, self._n, self._extra, self._drafting, self._catchup = now, n, 0, False, 0.0
        if self.wait > 0:
            self.wait -= 1
            return False
        if self._ep is not None and self.slow > 0:  # a try while backing off: one drafted step, then its after-effects
            return False
        return len(self.plain.get(n, ())) >= GUARD_PLAIN

    def drafted(self, catchup_s: float = 0.0, decode_s: float | None = None) -> None:
        """This step drafted: ``catchup_s`` of it went to a backlog's catch-up decode, and a draft
        decode took at least ``decode_s`` (None: none was timed)."""
        self._drafting = True
        self._catchup += catchup_s
        self.debt += catchup_s
        low = self._low() if decode_s is not None else None
        if decode_s is not None and low is not None and decode_s >= self._n * low:
            # Each drafted token costs a draft decode, a plain step's worth: no acceptance can pay it.
            self.episodes += 1
            self._slower(self.debt + decode_s, low)
            self._ep, self._last, self._untimed = None, None, GUARD_AFTER

    def accepted(self, tokens: int) -> None:
        """A draft of this step was verified, ``tokens`` of it kept."""
        self._extra += tokens
        self._verified = self.clock()

    def _time(self, seconds: float, tokens: int) -> None:
        if self._untimed > 0:
            self._untimed -= 1
            return
        ep = self._ep
        if self._drafting:
            if ep is None:
                ep = self._ep = [0.0, 0.0, 0, 0]
            ep[2] += 1
            ep[3] = 0
        elif ep is None:  # a plain step clear of drafting's after-effects: the baseline
            self.plain.setdefault(self._n, deque(maxlen=8)).append(seconds / tokens)
            self.judged[self._n] = 0
            return
        else:
            ep[3] += 1
        ep[0] += seconds
        ep[1] += tokens
        if ep[3] >= GUARD_AFTER or (self._drafting and ep[2] >= GUARD_EPISODE):
            self._ep = None
            self._judge(ep)

    def _low(self) -> float | None:
        """Seconds per token of a plain step at this width: the lower quartile of the latest (None:
        none timed). A neighbour's load only ever slows a step, and a drafter is kept only where it
        beats plain steps at their usual best."""
        base = self.plain.get(self._n)
        return sorted(base)[len(base) // 4] if base else None

    def _judge(self, ep: list[float]) -> None:
        low = self._low()
        if low is None:
            return
        self.episodes += 1
        if ep[0] / ep[1] < low * (1 - GUARD_MARGIN):
            self.paid += 1
            self.slow = 0
            self.debt = max(self.debt - (ep[1] * low - ep[0]), 0.0)  # its catch-ups are paid back from what it saves
        else:
            self._slower(self.debt + ep[0] - ep[1] * low, low)
        self.judged[self._n] = self.judged.get(self._n, 0) + 1
        if self.judged[self._n] >= GUARD_REFRESH and self.wait < GUARD_AFTER + GUARD_PLAIN:  # a fresh baseline
            self.wait = GUARD_AFTER + GUARD_PLAIN

    def _slower(self, lost: float, per_token: float) -> None:
        """A try that did not pay and cost ``lost`` seconds: pause 16, 32 ... GUARD_MAX steps, or as
        many as make such tries GUARD_SHARE of the time (at most GUARD_LONGEST)."""
        self.slow += 1
        self.debt = 0.0
        steps = lost / (GUARD_SHARE * max(self._n, 1) * per_token) if per_token > 0 else 0.0
        self.wait = int(min(max(min(GUARD_FIRST << min(self.slow - 1, 16), GUARD_MAX), steps), GUARD_LONGEST))


@dataclass
class SpecStats:
    """Totals over a speculator's life, for bench's acceptance-rate column."""

    drafts: int = 0  # verifications with a draft
    drafted: int = 0  # draft tokens checked
    accepted: int = 0  # of those, kept

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class Speculator:
    """A drafter with each sequence's pace; attached to a target ``Model`` (``model.speculator``),
    where ``Model.stream`` (chat, bench) and the server's engine find it."""

    drafter: Any
    n_max: int = DRAFT_MAX
    n_min: int = DRAFT_MIN
    paces: dict[int, Pace] = field(default_factory=dict)
    stats: SpecStats = field(default_factory=SpecStats)
    # The latest run of failed drafts, server-wide: a new reply starts where the last left off, so
    # a pair that never agrees settles at one try per BACKOFF_MAX steps instead of relearning it
    # (seven failed drafts in a reply's first ~130 steps) every reply. One draft that pays resets it.
    misses: int = 0
    guard: Guard = field(default_factory=Guard)
    _may: bool = True  # the guard lets this step draft

    @property
    def label(self) -> str:
        return str(self.drafter.label)

    def begin(self, seq_id: int, n_max: int | None = None, n_min: int | None = None) -> None:
        """A new reply in ``seq_id``, with the request's own draft bounds where it gave them."""
        top = self.n_max if n_max is None else n_max
        # a draft minimum above the maximum would drop every draft: bounded by it, as llama-server does
        n_min = min(self.n_min if n_min is None else n_min, top)
        # A first draft is short: a wrong one costs its verification, a right one doubles the next.
        pace = Pace(n_max=top, n_min=n_min, length=min(top, FIRST_DRAFT), misses=self.misses)
        pace.wait = _backoff(self.misses)
        self.paces[seq_id] = pace
        self.drafter.forget(seq_id)
        self.guard.restart()

    def step(self, n_generating: int) -> None:
        """A decode step starts (once per step, before ``want``): the time guard times the last."""
        self._may = self.guard.tick(n_generating)

    def want(self, seq_id: int) -> int:
        """How many tokens the sequence's pace asks to draft this step (0 while it waits, or while
        the time guard holds drafting back)."""
        if not self._may:
            return 0
        pace = self.paces.get(seq_id) or self.paces.setdefault(seq_id, Pace(self.n_max, self.n_min, min(self.n_max, FIRST_DRAFT)))
        n = pace.want()
        # A try while the clock backs drafting off is a short draft: it costs its decodes either way.
        return min(n, FIRST_DRAFT) if self.guard.slow else n

    def drafts(self, items: list[tuple[int, Sequence[int], int]]) -> list[list[int]]:
        """Drafts for (seq_id, tokens so far, room): each asks for what its pace wants (within
        ``room``), and one shorter than the sequence's draft minimum is dropped."""
        return self.make([(seq_id, tokens, min(self.want(seq_id), room)) for seq_id, tokens, room in items])

    def make(self, asks: list[tuple[int, Sequence[int], int]]) -> list[list[int]]:
        """Drafts for (seq_id, tokens so far, length) whose length ``want`` already gave; only the
        sequences asking for some tokens reach the drafter, and none asking for fewer than its draft
        minimum (such a draft would be dropped after its drafting cost was paid)."""
        asks = [(seq_id, tokens, n if n > 0 and n >= self.paces[seq_id].n_min else 0) for seq_id, tokens, n in asks]
        if not any(n > 0 for _, _, n in asks):
            return [[] for _ in asks]
        out = self.drafter.draft(asks)
        for k, (seq_id, _, n) in enumerate(asks):
            if not n or not out[k] or len(out[k]) < self.paces[seq_id].n_min:
                out[k] = []
            out[k] = out[k][:n]
        if any(out) or self.drafter.costly:  # a model's draft cut to nothing by p_min still cost its decodes
            self.guard.drafted(self.drafter.catchup_s, self.drafter.decode_s)
        return out

    def record(self, seq_id: int, drafted: int, accepted: int) -> None:
        if drafted:
            self.stats.drafts += 1
            self.stats.drafted += drafted
            self.stats.accepted += accepted
            self.guard.accepted(accepted)
        pace = self.paces.get(seq_id)
        if pace is not None:
            pace.record(drafted, accepted)
            if drafted:
                self.misses = pace.misses

    def close(self) -> None:
        self.drafter.close()


def verify(rows: Any, draft: list[int], gen: Any, accept: Any) -> list[int]:
    """Walk the target's rows for ``[last] + draft`` in order: sample each with the sequence's own
    sampler, hand the token to ``accept(token, info)`` (which returns True once the reply ended),
    and go on while it equals the draft's. Returns the tokens taken: the accepted draft tokens and
    then the target's own one (the correction, or the bonus after a fully accepted draft)."""
    from .generation import sample_rows

    out: list[int] = []
    sampler = gen.sampler
    for i in range(len(draft) + 1):
        (tok,), (info,) = sample_rows(rows[i : i + 1], [sampler])
        out.append(tok)
        if accept(tok, info) or i == len(draft) or tok != draft[i]:
            break
    if draft:
        gen.stats.draft_n += len(draft)
        gen.stats.draft_accepted += sum(1 for a, b in zip(out, draft) if a == b)
    return out


def stream(model: Any, spec: Speculator, gen: Any, tokens: list[int], seq_id: int = 0) -> Generator[tuple[int, str], None, None]:
    """``Model.stream`` with speculation: the same contract (yield (token, text) per generated
    token, then (-1, held-back text)). A step with a draft decodes the last token and the draft
    and keeps what ``verify`` accepts; a step without one (a paused pace, no lookup match) is
    Model.stream's own: the token sampled, its decode queued, and only then handed out, so that
    speculation that does not pay costs no more per token than none (on a GPU the hand-out
    overlaps the decode)."""
    st = gen.stats
    gen.started = time.perf_counter()
    kept = model.truncate(seq_id, min(model.common_prefix(seq_id, tokens), len(tokens) - 1))
    st.cached_tokens = kept
    idx = model.decode([(seq_id, tokens[kept:], True)])[0]
    spec.begin(seq_id)
    sampler = gen.sampler
    draft: list[int] = []
    ended: list[list[tuple[int, str]]] = []  # what the token that ended the reply yields
    pieces: list[tuple[int, str]] = []

    def take(tok: int, info: Any) -> bool:
        text, reason = gen.accept(tok, info)
        if reason is not None:
            ended.append(gen.ending(tok, text, reason))
            return True
        pieces.append((tok, text))
        return False

    try:
        while True:
            held: Any = None  # a token sampled whose decode goes before its hand-out (a step without a draft)
            if draft:
                base = model.seq_len(seq_id) - len(draft)  # the last token included
                pieces.clear()
                out = verify(model.logits_rows(len(draft) + 1), draft, gen, take)
                spec.record(seq_id, len(draft), len(out) - 1)
                model.truncate(seq_id, base + len(out) - 1)
                yield from pieces
                if ended:
                    yield from ended[0]
                    return
                last = out[-1]
            else:
                last, info = model.sample_one(sampler, idx)
                held = (last, info)
            draft, going = [], held is None or not gen.ends_at(last)
            spec.step(1)
            if going:
                room = model.n_ctx - model.seq_len(seq_id) - 1
                left = (gen.max_tokens - gen.n_gen - 1 - (held is not None)) if gen.max_tokens else room
                want = min(spec.want(seq_id), room, left)  # before the history is copied: a paused sequence costs nothing
                if want > 0:
                    draft = spec.make([(seq_id, Text(model.history(seq_id), last), want)])[0]
                if draft:
                    model.decode([(seq_id, [last, *draft], len(draft) + 1)])
                else:
                    going = model.decode_one(seq_id, last)  # False: the context is full
                idx = 0
            if held is not None:
                text, reason = gen.accept(*held)
                if reason is not None:
                    yield from gen.ending(last, text, reason)
                    return
                yield last, text
            if not going:  # the context is full
                yield from gen.context_full()
                return
    finally:
        gen.close()


def check_vocab(target: Any, draft: Any, target_name: str, draft_name: str) -> None:
    """Refuse (ConfigError) a draft model whose tokens are not the target's: the same count, the
    same special tokens and the same text for every id (a stride of them past 65,536)."""
    why = None
    if target.n_vocab != draft.n_vocab:
        why = f"{draft.n_vocab} tokens against {target.n_vocab}"
    else:
        for what in ("bos_id", "eos_id", "eot_id"):
            a, b = getattr(target, what), getattr(draft, what)
            if a != b:
                why = f"its {what.split('_')[0]} token is {b}, the target's {a}"
                break
    if why is None:
        n = target.n_vocab
        ids = range(n) if n <= 65536 else sorted({*range(0, n, max(n // 16384, 1)), *range(max(n - 2048, 0), n)})
        for i in ids:
            a, b = target.token_bytes(i, special=True), draft.token_bytes(i, special=True)
            if a != b:
                why = f"token {i} is {b!r} there and {a!r} in the target"
                break
            if target.is_eog(i) != draft.is_eog(i):
                why = f"token {i} ends generation in one and not the other"
                break
    if why is not None:
        raise ConfigError(f"Draft model '{draft_name}' does not share the vocabulary of '{target_name}': {why}.",
                          "Use a draft from the same model family (same tokenizer), or --spec ngram.")


TUNING = ("draft_max", "draft_min", "draft_p_min")


def check_tuning(settings: Any, layers: list[tuple[str, Any]]) -> None:
    """Refuse (ConfigError) draft tuning that nothing would use: ``draft_max``/``draft_min``/``draft_p_min``
    set in one of ``layers`` ((origin, values): the command line, a models.toml entry, a serve config
    table) while the merged ``settings`` do not speculate, or ``draft_p_min`` beside n-gram lookup
    (it bounds a draft model's confidence; a lookup has none). ``layers`` go lowest first: one whose
    drafter a later layer turned off (``--spec off``, ``--draft-model ""``) was overridden knowingly.
    config.toml and the environment are defaults for whenever a drafter is chosen: not checked."""
    drafting = settings.spec != "off" or bool(settings.draft_model)
    for i, (origin, values) in enumerate(layers):
        given = [k for k in TUNING if (values or {}).get(k) is not None]
        overridden = any((later or {}).get(k) is not None for _, later in layers[i + 1:] for k in ("spec", "draft_model"))
        if not given or (overridden and not drafting):
            continue
        cli = origin == "command line"
        names = [f"--{k.replace('_', '-')}" if cli else k for k in given]
        where = "" if cli else f" in {origin}"
        if not drafting:
            hint = ("give --spec ngram or --draft-model too." if cli
                    else 'add spec = "ngram" or draft_model = "NAME" beside it (or --spec/--draft-model), or remove it.')
            raise ConfigError(f"{', '.join(names)}{where} tune(s) speculative decoding: {hint}")
        if "draft_p_min" in given and not settings.draft_model:
            raise ConfigError(f"{names[given.index('draft_p_min')]}{where} bounds a draft model's confidence, and n-gram "
                              "lookup (--spec ngram) has none: use it with --draft-model, or drop it.")


def build(target: Any, settings: Any, target_name: str, load_draft: Any) -> Speculator | None:
    """The speculator ``settings`` ask for (None for none): ``spec = "ngram"``, or ``draft_model``
    loaded by ``load_draft(name)`` (a ``Model``, closed again when its vocabulary is refused)."""
    if settings.spec == "ngram" and settings.draft_model:
        raise ConfigError(f"Both --spec ngram and --draft-model {settings.draft_model} were given.",
                          "Choose one way of drafting.")
    if settings.draft_min > settings.draft_max:
        raise ConfigError(f"--draft-min {settings.draft_min} is more than --draft-max {settings.draft_max}.")
    drafter: Any
    if settings.spec == "ngram":
        drafter = NgramDrafter()
    elif settings.draft_model:
        draft = load_draft(settings.draft_model)
        try:
            check_vocab(target, draft, target_name, settings.draft_model)
        except BaseException:
            draft.close()
            raise
        drafter = ModelDrafter(draft, settings.draft_model, p_min=settings.draft_p_min)
    else:
        return None
    return Speculator(drafter, n_max=settings.draft_max, n_min=settings.draft_min)


def step_drafts(spec: Speculator, model: Any, items: list[tuple[int, int, int]], n_generating: int) -> list[list[int]]:
    """The serving engine's drafts for one step: per (seq_id, last token, room) of the sequences
    generating, within STEP_TOKENS for the step's generating tokens in all (a busy batch gets
    short drafts or none: its extra positions would cost every sequence time)."""
    spec.step(n_generating)
    share = (STEP_TOKENS - n_generating) // max(n_generating, 1)
    if share <= 0 or not items:
        return [[] for _ in items]
    wants = [min(spec.want(seq_id), room, share) for seq_id, _, room in items]
    if not any(n > 0 for n in wants):  # every sequence paused: no history copied, nothing drafted
        return [[] for _ in items]
    return spec.make([(seq_id, Text(model.history(seq_id), last) if n > 0 else [], n)
                      for (seq_id, last, _), n in zip(items, wants)])


def engine_verify(model: Any, spec: Speculator, seq_id: int, rows: Any, draft: list[int], gen: Any, accept: Any) -> list[int]:
    """Check one sequence's draft inside a serving step: ``verify`` over its rows, then the rejected
    tail out of the KV cache and the pace updated. Returns the tokens taken."""
    out = verify(rows, draft, gen, accept)
    spec.record(seq_id, len(draft), len(out) - 1)
    model.truncate(seq_id, model.seq_len(seq_id) - (len(draft) - (len(out) - 1)))
    return out
