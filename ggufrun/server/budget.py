"""How many prompt and embedding tokens one engine step takes beside the replies being generated.

Every step decodes one token of each generating reply first; prompt chunks and embedding chunks
share what is left of a token budget (as vLLM's and SGLang's chunked prefill do). A prompt of
11k tokens or a batch of long texts to embed then costs the streams a bounded share of each step,
not a whole prefill: under ``auto`` the budget is steered so that steps take on average at most
:data:`SLACK` times a plain decode step (streams keep >= 1/SLACK of their pace) and one step at
most :data:`PEAK` times, measured on the machine as it runs. With nothing generating, the step takes all of ``n_batch``: a prompt or
text alone goes through at full speed.
"""

from __future__ import annotations

SLACK = 1.2  # steps with chunks may take this many plain decode steps, on average
PEAK = 2.0  # and one step at most this many (a stream's longest gap)
_FIRST = 16  # the budget before any step has been measured
_EMA = 0.2  # weight of the newest measurement in the running means


class StepBudget:
    """The per-step token budget: fixed (``step_tokens = N``) or steered (``auto``) from the measured
    time between decodes, a plain step's (only replies' tokens) against one that carried chunks.

    Steered, it is a rate (tokens per step, possibly under one) paid out as credit, and a cap on
    one step's chunk: a chunk has a fixed cost of its own (llama.cpp evaluates a batch whose
    sequences have unequal token counts in several micro-batches), so on a CPU a chunk of a few
    tokens every few steps keeps the streams' pace where a token every step would not."""

    def __init__(self, n_batch: int, fixed: int | None = None) -> None:
        self.n_batch = max(n_batch, 1)
        self.fixed = min(fixed, self.n_batch) if fixed else None
        self.tokens = self.fixed or min(_FIRST, self.n_batch)  # the most one step's chunks may take
        self.rate = float(self.tokens)  # tokens per step, on average
        self.credit = float(self.tokens)
        self.plain_s = 0.0  # running mean of a plain decode step, seconds
        self.per_token_s = 0.0  # running mean of what a chunk token adds to a step
        self._last_done = 0.0
        self._launched: tuple[int, int] = (0, 0)  # rows and chunk tokens of the decode in flight

    def allowance(self, rows: int) -> int:
        """Chunk tokens the next decode may take beside ``rows`` generating replies."""
        if not rows:
            return self.n_batch
        if self.fixed is not None:
            return max(min(self.fixed, self.n_batch - rows), 0)
        return max(min(self.tokens, int(self.credit), self.n_batch - rows), 0)

    def launched(self, rows: int, chunk: int) -> None:
        """Note what the decode just queued holds (and pay its chunk out of the credit)."""
        self._launched = (rows, chunk)
        if rows and self.fixed is None:
            self.credit = min(self.credit - chunk + self.rate, max(self.tokens, 1) + self.rate)

    def finished(self, now: float) -> None:
        """The decode in flight has finished at ``now`` (its rows were read): the time since the
        previous one finished is its cost, the engine's host work included (what a stream feels)."""
        period = now - self._last_done if self._last_done else 0.0
        self._last_done = now
        rows, chunk = self._launched
        self._launched = (0, 0)
        if not rows or period <= 0.0 or period > 60.0:
            return
        if not chunk:
            self.plain_s = period if not self.plain_s else (1 - _EMA) * self.plain_s + _EMA * period
            return
        if self.fixed is not None or not self.plain_s:
            return
        per_token = max(period - self.plain_s, 0.0) / chunk
        self.per_token_s = per_token if not self.per_token_s else (1 - _EMA) * self.per_token_s + _EMA * per_token
        if self.per_token_s <= 0.0:
            self.tokens = min(self.n_batch, self.tokens * 2)
            self.rate = float(self.tokens)
            return
        self.tokens = max(1, min(self.n_batch, int((PEAK - 1.0) * self.plain_s / self.per_token_s + 1e-6)))
        self.rate = min(float(self.tokens), (SLACK - 1.0) * self.plain_s / self.per_token_s)


def fixed_tokens(setting: object) -> int | None:
    """The ``step_tokens`` setting as a fixed count, or None for ``auto``."""
    return setting if isinstance(setting, int) and not isinstance(setting, bool) else None
