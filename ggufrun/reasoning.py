"""Reasoning models: finding a model's thinking format, and keeping its thinking apart from its answer.

Qwen3, QwQ and the DeepSeek-R1 distills write their reasoning in a ``<think>...</think>`` block
before the answer (llama-server calls this format ``deepseek``). Some templates open the block
themselves in the generation prompt (QwQ, newer R1 templates), some let the model open it
(Qwen3), and Qwen3's closes an empty block there when ``enable_thinking`` is false. So where a
reply starts is read from the rendered prompt's end, per request (:func:`start_state`).

This module knows no API, no llama.cpp and no I/O: :class:`ThinkSplitter` splits streamed text
into thinking and answer pieces (for every API's replies and the chat window), and
:class:`ThinkWatch` counts a sequence's thinking tokens, token by token, and says when a
budget is spent (generation.py then forces the block's close). A model that does not reason
gets neither: its path is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

# OpenAI's reasoning_effort (and the Responses API's reasoning.effort) as a thinking budget in
# tokens: 0 turns thinking off, -1 sets no limit (high: above medium whatever --reasoning-budget is).
EFFORT_BUDGET: Mapping[str, int | None] = {"none": 0, "minimal": 256, "low": 1024, "medium": 4096, "high": -1}

# Where a reply starts: inside the block (the prompt opened it), before it (the model may open
# one), or in the answer (thinking is off, or the model does not reason).
THINKING, START, ANSWER = "thinking", "start", "answer"


@dataclass(frozen=True)
class ThinkFormat:
    """How a model marks its thinking; ``toggle``: its template reads ``enable_thinking``."""

    name: str = "deepseek"
    open: str = "<think>"
    close: str = "</think>"
    toggle: bool = False

    @property
    def close_text(self) -> str:
        """What closes a block the budget cuts, as Qwen3 and R1 close theirs."""
        return f"\n{self.close}\n\n"

    @property
    def empty_block(self) -> str:
        """What Qwen3's template writes to skip thinking: an empty block, closed."""
        return f"{self.open}\n\n{self.close}\n\n"


def detect(template_source: str | None, setting: str = "auto") -> ThinkFormat | None:
    """The reasoning format for a model: ``setting`` (``none``, ``deepseek``) wins; ``auto`` reads
    the GGUF's chat template (one that writes or strips ``<think>`` blocks). None: it does not reason."""
    if setting == "none":
        return None
    source = template_source or ""
    toggle = "enable_thinking" in source
    if setting == "deepseek":
        return ThinkFormat(toggle=toggle)
    if "<think>" in source or "</think>" in source:
        return ThinkFormat(toggle=toggle)
    return None


def start_state(prompt_tail: str, fmt: ThinkFormat) -> str:
    """Where a reply to a prompt ending in ``prompt_tail`` starts (THINKING, START or ANSWER)."""
    tail = prompt_tail.rstrip()
    if tail.endswith(fmt.close):
        return ANSWER
    if tail.endswith(fmt.open):
        return THINKING
    return START


def steer(fmt: ThinkFormat, start: str, on: bool, open_block: bool = False) -> tuple[str, str]:
    """(text to add after the rendered prompt, where the reply then starts). Thinking off where
    the template could not turn it off: the block is closed for the model (Qwen3's own way).
    ``open_block``: the block is opened for it (as QwQ's and R1's templates do), for a grammar
    that must wait for the block's end, which a model that skipped the block would never reach."""
    if not on and start != ANSWER:
        return (fmt.empty_block if start == START else fmt.close_text), ANSWER
    if on and open_block and start == START:
        return f"{fmt.open}\n", THINKING
    return "", start


def plan_reply(model: Any, tokens: list[int], fmt: ThinkFormat, on: bool, budget: int,
               open_block: bool = False) -> tuple[list[int], str, ThinkBudget | None]:
    """The prompt's tokens with what :func:`steer` adds, where the reply starts, and its thinking
    budget (None where it starts in the answer). ``budget`` <= 0: no limit. Chat and serve both
    plan a reasoning reply here."""
    start = start_state(model.detokenize(tokens[-8:], special=True), fmt)
    extra, start = steer(fmt, start, on, open_block=open_block)
    if extra:
        tokens = tokens + model.tokenize(extra, add_special=False, parse_special=True)
    if start == ANSWER:
        return tokens, start, None
    close = model.tokenize(fmt.close_text, add_special=False, parse_special=True)
    return tokens, start, ThinkBudget(fmt, start, budget if budget > 0 else None, close)


def _partial(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` may begin ``tag`` (held until the next piece)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ThinkSplitter:
    """Splits a reply's text, fed in pieces as it streams, into ("thinking" | "answer", text)
    pieces. A tag is never shown, not even half of one: text that may begin a tag is held until
    the next piece decides. Space around the block (the template's newlines) is dropped."""

    def __init__(self, fmt: ThinkFormat, start: str) -> None:
        self.fmt = fmt
        self.state = start
        self.buf = ""
        self.lead = True  # at the start of the current part: leading space is dropped

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buf += text
        out: list[tuple[str, str]] = []
        while True:
            if self.state == START:
                head = self.buf.lstrip()
                if head.startswith(self.fmt.open):
                    self.buf, self.state, self.lead = head[len(self.fmt.open):], THINKING, True
                    continue
                if not head or self.fmt.open.startswith(head):
                    return out  # space, or maybe the open tag: wait
                self.state = ANSWER
                continue
            if self.lead:
                self.buf = self.buf.lstrip()
                if not self.buf:
                    return out
                self.lead = False
            if self.state == ANSWER:
                if self.buf:
                    out.append((ANSWER, self.buf))
                self.buf = ""
                return out
            at = self.buf.find(self.fmt.close)
            if at >= 0:
                thought = self.buf[:at].rstrip()
                if thought:
                    out.append((THINKING, thought))
                self.buf, self.state, self.lead = self.buf[at + len(self.fmt.close):], ANSWER, True
                continue
            keep = _partial(self.buf, self.fmt.close)
            safe = self.buf[: len(self.buf) - keep]
            shown = safe.rstrip()  # space before the close tag is the template's, not the thought's
            if shown:
                out.append((THINKING, shown))
            self.buf = self.buf[len(shown):]
            return out

    def finish(self) -> list[tuple[str, str]]:
        """What is still held, once the reply has ended (cut short, say, inside the block)."""
        text, self.buf = self.buf, ""
        if self.state == THINKING:
            text = text.rstrip()
        kind = THINKING if self.state == THINKING else ANSWER
        return [(kind, text)] if text.strip() else []


def split(text: str, fmt: ThinkFormat, start: str) -> tuple[str, str]:
    """(thinking, answer) of a whole reply."""
    splitter = ThinkSplitter(fmt, start)
    parts = splitter.feed(text) + splitter.finish()
    return "".join(t for k, t in parts if k == THINKING), "".join(t for k, t in parts if k == ANSWER)


@dataclass
class ThinkBudget:
    """What a sequence's generation needs to watch its thinking: where it starts, the budget in
    tokens (None: no limit) and the tokens that close a block."""

    fmt: ThinkFormat
    start: str
    budget: int | None = None
    close_tokens: list[int] = field(default_factory=list)


class ThinkWatch:
    """Follows one sequence token by token: counts its thinking tokens (the tags included) and
    says, once, when the budget is spent and the block must be closed."""

    def __init__(self, plan: ThinkBudget) -> None:
        self.plan = plan
        self.state = plan.start
        self.tail = ""
        self.count = 0
        self.forced = False

    def feed(self, piece: str) -> bool:
        """Take one token's text; True when the close tag's tokens must follow now."""
        if self.state == ANSWER:
            return False
        fmt = self.plan.fmt
        self.tail += piece
        if self.state == START:
            head = self.tail.lstrip()
            if head.startswith(fmt.open):
                self.state, self.tail = THINKING, head[len(fmt.open):]
            elif head and not fmt.open.startswith(head):
                self.state, self.count = ANSWER, 0  # no block: what looked like its start was answer
                return False
            self.count += 1
            if self.state == START:
                return False
        else:
            self.count += 1
        if fmt.close in self.tail:
            self.state = ANSWER
            return False
        self.tail = self.tail[-len(fmt.close):]
        budget = self.plan.budget
        if budget is not None and self.count >= budget and not self.forced and self.plan.close_tokens:
            self.forced = True
            return True
        return False
