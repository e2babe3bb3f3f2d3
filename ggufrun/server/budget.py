"""How many prompt and embedding tokens one engine step takes beside the replies being generated.

Every step decodes one token of each generating reply first; prompt chunks and embedding chunks
share what is left of a token budget (as vLLM's and SGLang's chunked prefill do). A prompt of
11k tokens or a batch of long texts to embed then costs the streams a bounded share of each step,
not a whole prefill: under ``auto`` the budget is steered so a step that carries such chunks takes
at most :data:`SLACK` times a plain decode step (streams keep >= 1/SLACK of their pace), measured
on the machine as it runs. With nothing generating, the step takes all of ``n_batch``: a prompt or
text alone goes through at full speed.
"""

from __future__ import annotations

SLACK = 1.25  # a step with chunks may take this many plain decode steps
_FIRST = 16  # the budget before any step has been measured
_EMA = 0.2  # weight of the newest plain step in the plain step's running mean


class StepBudget:
    """The per-step token budget: fixed (``step_tokens = N``) or steered (``auto``) from the measured
    time between decodes: a plain step's (only replies' tokens) against one that carried chunks."""

    def __init__(self, n_batch: int, fixed: int | None = None) -> None:
        self.n_batch = max(n_batch, 1)
        self.fixed = min(fixed, self.n_batch) if fixed else None
        self.tokens = self.fixed or min(_FIRST, self.n_batch)
        self.plain_s = 0.0  # running mean of a plain decode step, seconds
        self._last_done = 0.0
        self._launched: tuple[int, int, int] = (0, 0, 0)  # rows, chunk tokens, budget of the decode in flight

    def allowance(self, rows: int) -> int:
        """Chunk tokens the next decode may take beside ``rows`` generating replies."""
        if not rows:
            return self.n_batch
        return max(min(self.tokens, self.n_batch - rows), 0)

    def launched(self, rows: int, chunk: int) -> None:
        """Note what the decode just queued holds."""
        self._launched = (rows, chunk, self.tokens)

    def finished(self, now: float) -> None:
        """The decode in flight has finished at ``now`` (its rows were read): the time since the
        previous one finished is its cost, the engine's host work included (what a stream feels)."""
        period = now - self._last_done if self._last_done else 0.0
        self._last_done = now
        rows, chunk, budget = self._launched
        self._launched = (0, 0, 0)
        if not rows or period <= 0.0 or period > 60.0:
            return
        if not chunk:
            self.plain_s = period if not self.plain_s else (1 - _EMA) * self.plain_s + _EMA * period
            return
        if self.fixed is not None or not self.plain_s:
            return
        target = (SLACK - 1.0) * self.plain_s  # what the chunks may add to a step
        extra = period - self.plain_s
        if extra > target:  # too long: shrink in proportion
            new = chunk * target / extra
        elif chunk >= budget:  # within bounds and the budget was what held it: grow, at most doubling
            new = chunk * min(target / extra, 2.0) if extra > 0 else chunk * 2.0
        else:
            return
        self.tokens = max(1, min(self.n_batch, int(0.5 * self.tokens + 0.5 * new)))


def fixed_tokens(setting: object) -> int | None:
    """The ``step_tokens`` setting as a fixed count, or None for ``auto``."""
    return setting if isinstance(setting, int) and not isinstance(setting, bool) else None
