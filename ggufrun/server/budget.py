"""How much prompt and embedding work one engine step takes beside the replies being generated.

Every step decodes one token of each generating reply first; then either a prompt chunk or a chunk
of the text being embedded goes in, up to a budget (as vLLM's and SGLang's chunked prefill do). A
prompt of 11k tokens or a batch of long texts to embed then costs the streams a bounded share of
each step, not a whole prefill: under ``auto`` the budget is a time, steered so that steps take on
average at most :data:`SLACK` times a plain decode step (streams keep >= 1/SLACK of their pace) and
one step at most :data:`PEAK` times (both per kind of work), measured on the machine as it runs.

The budget is spent in estimated seconds, not tokens: each kind of chunk has its own measured cost
(a fixed part and a part per token). One token budget for both let the dearer kind calibrate it for the other (an embedding
chunk beside a prompt chunk made llama.cpp output every token of both: the budget learnt ~7 ms a
token where a prompt token costs ~0.5, and a new stream's prompt beside a long text waited 2.4 s).
The two kinds also take turns by the time each has had (:meth:`StepBudget.pick`), so a new stream's
prompt never waits behind a whole text and a text is never starved by a stream of prompts.

With nothing generating, a step takes all of ``n_batch``: a prompt or text alone goes at full speed.
A short prompt (or any not long one, in a burst of requests) is read whole at once, outside the
budget (:meth:`StepBudget.whole`, :data:`SHORT`): the budget is for prompts too long to wait for.
"""

from __future__ import annotations

from collections.abc import Sequence

# Steps with chunks may take this many plain decode steps on average, while that kind of work waits:
# streams keep >= 0.83 of their pace beside prompts, >= 0.77 beside texts to embed (issue 22's bars: 0.8
# and 0.7). Texts get more: each text is chunks of its own (one embedding sequence) and those are dear
# beside the rows on a CPU (SmolLM2 on the loaded 2-core box: ~30-40 ms a token, ~16 alone).
SLACK = {"prompt": 1.2, "embed": 1.3}
# and one step at most this many (a stream's longest gap; issue 22's bar beside long prompts: p99 < 3x).
# A text's chunks may be larger and rarer: on a CPU a few tokens beside the rows cost nearly what a
# whole chunk does (~35 ms a token in chunks of 8 against ~5 in chunks of 340, SmolLM2), so capfuls of
# one plain step left a 1,000-token text ~1 token a step, 95 s beside one stream (18.7 s alone).
PEAK = {"prompt": 2.0, "embed": 4.0}
# Requests waiting for their first token: a prompt that reads in at most SHORT plain steps is read whole
# at once, outside the budget (the streams lose those steps once, as beside llama-server's every prompt;
# reading it a little each step only makes its request wait, and on a CPU each chunk's fixed cost is
# paid again). Where the prompts waiting outnumber the streams (a burst: reading them first serves the most
# requests soonest), W per stream, prompts of up to W times that are (a long one counting SHORT plain steps
# over its own cost among the W). Longer prompts (issue 22's 11k tokens beside 12 streams, whose bars are
# that streams keep >= 0.8 of their pace and a step stays < 3x a plain one) go within the budget to their
# end: a prompt is judged by its whole length (reading long prompts' last 8 plain steps whole made that p99
# gap 8.5x on an H100). With the slack alone, sixteen pictures sent at once were read ~20 tokens a step
# beside the first replies (Qwen2.5-VL-3B on an H200: 0.55x llama-server's throughput at 16 clients;
# SmolVLM's layout on a 2-core CPU: 0.79x; 1.35x with a fixed 2,048 tokens).
SHORT = 8.0
_FIRST = 16  # the tokens a step may take before its kind's cost has been measured
_EMA = 0.2  # weight of the newest measurement in the running means

KINDS = ("prompt", "embed")


class StepBudget:
    """The per-step budget: fixed (``step_tokens = N``: N tokens of either kind) or steered
    (``auto``) from the measured time between decodes, a plain step's (only replies' tokens)
    against one that carried a chunk of one kind.

    Steered, it is a rate (seconds of chunk work per step, possibly a fraction of a token's) paid
    out as credit, and a cap on one step's chunk: a chunk has a fixed cost of its own (llama.cpp
    evaluates a batch whose sequences have unequal token counts in several micro-batches), so on a
    CPU a chunk of a few tokens every few steps keeps the streams' pace where a token every step
    would not."""

    def __init__(self, n_batch: int, fixed: int | None = None) -> None:
        self.n_batch = max(n_batch, 1)
        self.fixed = min(fixed, self.n_batch) if fixed else None
        self.plain_s = 0.0  # running mean of a plain decode step, seconds
        # What a chunk of each kind adds to a step: fixed_s + token_s * tokens, fitted to the measured steps
        # (running means of n, y, n*n, n*y). The fixed part is real: beside the rows, a chunk is a micro-batch
        # of its own (llama.cpp splits a batch whose sequences have unequal token counts), another pass
        # over the weights; on a CPU it costs most of a plain step.
        self.token_s = dict.fromkeys(KINDS, 0.0)
        self.fixed_s = dict.fromkeys(KINDS, 0.0)
        self._fit: dict[str, list[float]] = {}
        self._largest = dict.fromkeys(KINDS, 0)  # the longest chunk of each kind measured: the next is at most twice it
        # seconds a prompt token took in a chunk decoded with no rows beside it, its pass included (running
        # mean): what a prompt read whole costs at most, learnt from the prompts read while nothing generates
        self.alone_s = 0.0
        self._split: set[str] = set()  # kinds whose fixed part has been told apart (chunks of several sizes seen)
        self.credit_s = 0.0  # seconds of chunk work the next steps may still take
        self.spent_s = dict.fromkeys(KINDS, 0.0)  # estimated seconds each kind has had (for pick's turns)
        self._waiting: list[str] = []  # the kinds with work waiting at the last pick
        self.share = 0.0  # prompts waiting per stream generating, as weighed last (whole)
        self._last_done = 0.0
        # rows, kind, tokens of the decode in flight; when its step began; host time that step spent admitting
        # requests; the chunk's micro-batches; whether rows carried drafts
        self._launched: tuple[int, str, int, float, float, int, bool] = (0, "", 0, 0.0, 0.0, 1, False)

    def weigh(self, pending: Sequence[int], rows: int) -> None:
        """``pending``: the tokens each waiting prompt had to read when it came (its whole length, not
        what is left: a long prompt's last chunk is no short prompt), beside ``rows`` streams
        generating (empty when the step's chunk is of another kind)."""
        short = SHORT * self.plain_s
        count = 0.0
        for n in pending:  # a long prompt counts the less the longer it is: a burst is of short ones
            cost = self._prompt_s(n)
            count += 1.0 if cost <= short else short / cost
        self.share = count / max(rows, 1)

    def _prompt_s(self, tokens: int) -> float:
        """A prompt's estimated cost read whole: one chunk, whose fixed part (a pass of its own) is
        taken as at most a plain step's, plus the fitted cost per token; before one is measured, a
        plain step per _FIRST tokens (a guess on the dear side: an unmeasured long prompt is not read
        whole). The fitted fixed part can carry a one-off: the first 16 tokens of a picture prompt
        took 66 ms on an H100 (llama.cpp planning a new batch shape), the fit's fixed part read ~65 ms
        beside 8 ms plain steps, and pictures waiting beside the first replies were not short. A token
        read alone (:meth:`_alone`) bounds it: that one-off can also land in the fit's cost per token."""
        alone = self.alone_s * tokens or float("inf")
        if not self.token_s["prompt"]:
            return min(tokens * self.plain_s / _FIRST, alone)
        return min(min(self.fixed_s["prompt"], self.plain_s) + self.token_s["prompt"] * tokens, alone)

    def whole(self, tokens: int) -> bool:
        """Whether a prompt of ``tokens`` (as in :meth:`weigh`) is read whole now, outside the budget:
        it reads in at most SHORT plain steps, times the prompts waiting per stream (as weighed last)
        where they outnumber the streams."""
        if self.fixed is not None:
            return False
        if not self.plain_s:
            return False
        return self._prompt_s(tokens) <= SHORT * self.plain_s * max(self.share, 1.0)

    def cap_s(self, kind: str) -> float:
        """The most work of ``kind`` one step may carry beside the rows (0 before a plain step is measured)."""
        return (PEAK[kind] - 1.0) * self.plain_s

    @property
    def _credit_cap_s(self) -> float:
        return max((self.cap_s(k) for k in self._waiting), default=self.cap_s(KINDS[0])) + self.rate_s

    @property
    def rate_s(self) -> float:
        """Chunk work per step on average, for the kinds waiting."""
        slack = max((SLACK[k] for k in self._waiting), default=SLACK["prompt"]) - 1.0
        return slack * self.plain_s

    def cost_s(self, kind: str, tokens: int, passes: int = 1) -> float:
        """The estimated seconds a chunk of ``tokens`` of ``kind`` adds to a step, in ``passes``
        micro-batches of its own (one per distinct length among its sequences' parts: llama.cpp
        splits a batch over split KV streams into parts of equal length per sequence)."""
        return self.fixed_s[kind] * max(passes, 1) + self.token_s[kind] * tokens if tokens else 0.0

    def allowance(self, rows: int, kind: str, want: int, passes: int = 1) -> int:
        """Tokens of ``kind`` the next decode may take beside ``rows`` generating replies, ``want``
        being what waits (in ``passes`` parts of distinct lengths, taken whole). Steered: all that
        waits when it fits a step's cap (a new stream's short prompt goes at once, running the
        credit at most a cap into debt); else a capful once the credit holds one (a chunk's fixed
        cost is spread over as many tokens as a step may take, from one sequence); else nothing
        this step."""
        room = max(self.n_batch - rows, 0)
        if not rows:
            return min(self.n_batch, want)
        if self.fixed is not None:
            return min(self.fixed, room, want)
        if not self.plain_s or not self.token_s[kind]:
            return min(_FIRST, room, want)  # not measured yet: a small chunk measures it
        whole = self.cost_s(kind, want, passes)
        cap = self.cap_s(kind)
        if want <= min(room, max(2 * self._largest[kind], _FIRST)) and whole <= min(cap, self.credit_s + cap):
            return want
        if self.credit_s >= cap:
            n = max(int((cap - self.fixed_s[kind]) / self.token_s[kind] + 1e-9), 1)  # one at least: a chunk dearer than the cap still goes
            mean = self._fit[kind][0]
            if kind not in self._split and abs(n - mean) <= 0.1 * mean:
                # chunks all of one size cannot tell the fixed part from the per-token one: one of another size can
                n = n // 2 if n >= 2 else 2
            return min(n, 2 * self._largest[kind], room, want)
        return 0

    def pick(self, kinds: list[str]) -> str:
        """Which kind of chunk the next step carries, among those with work waiting: the one that has
        had the least time. A kind with nothing waiting banks no time for later."""
        self._waiting = kinds
        if not kinds:
            return KINDS[0]
        for kind in KINDS:
            if kind not in kinds:
                others = [self.spent_s[k] for k in kinds]
                self.spent_s[kind] = max(others, default=0.0)
        return min(kinds, key=lambda k: self.spent_s[k])

    def launched(self, rows: int, kind: str, tokens: int, started: float, setup_s: float = 0.0, passes: int = 1,
                 drafted: bool = False, whole: int = 0) -> None:
        """Note what the decode just queued holds (and pay its chunk out of the credit); ``started``:
        when its step's work began (before llama_decode, which computes in the call on a CPU);
        ``setup_s``: host time the step spent admitting requests before it, left out of the fit;
        ``passes``: the chunk's parts of distinct lengths (cost_s); ``drafted``: some rows carry
        speculative drafts (their drafting and wider rows are neither a plain step nor the chunk's);
        ``whole``: tokens of the chunk read whole outside the budget (:meth:`whole`), not paid from the credit."""
        passes = max(passes, 1)
        self._launched = (rows, kind, tokens, started, setup_s, passes, drafted)
        if not tokens:
            if rows and self.fixed is None:
                self.credit_s = min(self.credit_s + self.rate_s, self._credit_cap_s)
            return
        spent = self.cost_s(kind, tokens, passes) if self.token_s[kind] else tokens * (self.plain_s / _FIRST or 1e-3)
        self.spent_s[kind] += spent
        if whole:
            spent = self.cost_s(kind, tokens - whole, max(passes - 1, 1)) if self.token_s[kind] and tokens > whole else 0.0
        if rows and self.fixed is None:
            self.credit_s = min(self.credit_s - spent + self.rate_s, self._credit_cap_s)

    def idle(self) -> None:
        """A step found no decode in flight: the next one's cost counts from its own start."""
        self._last_done = 0.0

    def finished(self, now: float) -> None:
        """The decode in flight has finished at ``now`` (its rows were read): the time since the
        previous one finished (or since its step began, after an idle spell) is its cost, the
        engine's host work included (what a stream feels)."""
        rows, kind, tokens, started, setup_s, passes, drafted = self._launched
        # Admitting a request (its first chunk's step) is a one-off of host work: an 11k-token prompt's
        # took ~10 ms on an H100's host, which taught the fit 6-7 ms a prompt token where the device
        # spends ~0.25, so long prompts crept in at ~60 tokens a step.
        period = now - (self._last_done or started) - setup_s if started else 0.0
        self._last_done = now
        self._launched = (0, "", 0, 0.0, 0.0, 1, False)
        if drafted or period <= 0.0 or period > 60.0:
            return
        if not rows:
            if kind == "prompt" and tokens >= _FIRST:
                self._alone(tokens, period)
            return
        if not tokens:
            self.plain_s = period if not self.plain_s else (1 - _EMA) * self.plain_s + _EMA * period
            return
        if not self.plain_s:
            return
        # Micro-batches past the first are told from the fit's own fixed part: the fit stays one of single-part chunks.
        self._learn(kind, tokens, max(period - self.plain_s - (passes - 1) * self.fixed_s[kind], 0.0))

    def _alone(self, n: int, period: float) -> None:
        """A prompt chunk of ``n`` tokens took ``period`` with no rows beside it: a prompt read whole costs at most
        that rate (:meth:`_prompt_s`). Why: on an H100 the first 16-token picture chunk beside one reply
        took 55 ms (llama.cpp planning a new batch shape) where 262 tokens alone took 20 ms; the fit read
        3.5 ms a token from it, and fifteen pictures then went in one token a step until the first reply
        ended (Qwen2.5-VL-3B, 0.91x llama-server's throughput). Only there: as a bound on the fit's cost a
        token beside rows it made chunks of a 3,000-token prompt too large on a CPU (their attention grows
        along the prompt; a stream's p99 gap went from 2.3x to 5.1x a plain step)."""
        rate = period / n
        self.alone_s = rate if not self.alone_s else (1 - _EMA) * self.alone_s + _EMA * rate

    def _learn(self, kind: str, n: int, y: float) -> None:
        """Fold one chunk (``n`` tokens, ``y`` seconds over a plain step) into its kind's fit."""
        self._largest[kind] = max(self._largest[kind], n)
        fit = self._fit.get(kind)
        point = [float(n), y, float(n * n), n * y]
        if fit is None:
            fit = self._fit[kind] = point
        else:
            for i, v in enumerate(point):
                fit[i] = (1 - _EMA) * fit[i] + _EMA * v
        mn, my, mnn, mny = fit
        var = mnn - mn * mn
        floor = max((PEAK[kind] - 1.0) * self.plain_s / self.n_batch, 1e-9)  # never free: at the floor a capful is a whole batch
        if var > (0.05 * mn) ** 2:  # sizes varied enough to tell the fixed part from the per-token one
            per = max((mny - mn * my) / var, floor)
            self.token_s[kind], self.fixed_s[kind] = per, min(max(my - per * mn, 0.0), my)
            self._split.add(kind)
        else:  # chunks of one size lately: the fixed part as last told apart, the rest per token
            fixed = min(self.fixed_s[kind], my)
            self.token_s[kind], self.fixed_s[kind] = max((my - fixed) / max(mn, 1.0), floor), fixed

    def describe(self) -> str:
        """For the step profile: the per-token costs and the cap, in ms."""
        if self.fixed is not None:
            return f"fixed {self.fixed} tokens"
        return (f"plain step {1e3 * self.plain_s:.2f} ms, credit {1e3 * self.credit_s:.2f} ms; "
                f"a chunk adds: prompt {1e3 * self.fixed_s['prompt']:.2f} + {1e3 * self.token_s['prompt']:.3f}/token ms, "
                f"embedding {1e3 * self.fixed_s['embed']:.2f} + {1e3 * self.token_s['embed']:.3f}/token ms")


def fixed_tokens(setting: object) -> int | None:
    """The ``step_tokens`` setting as a fixed count, or None for ``auto``."""
    return setting if isinstance(setting, int) and not isinstance(setting, bool) else None
