"""The pipeline's replies in OpenAI's shapes: ``chat.completion`` / ``text_completion`` objects,
whole or as a stream of chunks, with usage, logprobs, tool calls and llama-server's ``timings``.

The OpenAI API (openai.py) sends them as they are; the Anthropic, Ollama and Responses APIs read
the same objects and dress them in their own shapes (translate.py), so this is the one place that
turns the engine's events into a reply.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ..reasoning import THINKING, ThinkSplitter, split
from . import tools as T
from .api_errors import api_error
from .engine import Event
from .protocol import GenParams
from .streaming import DONE, Collected, JobGroup, merged, sse


def timings(done: Event) -> dict[str, Any]:
    """llama-server's ``timings`` object (the engine's when it reports one)."""
    if getattr(done, "timings", None):
        return dict(done.timings)
    prompt_ms = float(getattr(done, "prompt_ms", 0.0) or 0.0)
    predicted_ms = float(getattr(done, "predicted_ms", 0.0) or 0.0)
    cached = int(getattr(done, "cached_tokens", 0) or 0)
    prompt_n = max(done.prompt_tokens - cached, 0)
    gen_n = done.completion_tokens
    return {"cache_n": cached, "prompt_n": prompt_n, "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
            "prompt_per_second": prompt_n * 1000.0 / prompt_ms if prompt_ms else 0.0,
            "predicted_n": gen_n, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / gen_n if gen_n else 0.0,
            "predicted_per_second": gen_n * 1000.0 / predicted_ms if predicted_ms else 0.0}


def usage(dones: dict[int, Event], n: int, reasoning: bool = False) -> dict[str, Any]:
    """Usage of the finished choices by index: the n choices of one prompt share it (index // n); with
    ``reasoning`` (a thinking reply), the thinking tokens apart."""
    prompt = sum(d.prompt_tokens for i, d in dones.items() if i % n == 0)
    completion = sum(d.completion_tokens for d in dones.values())
    cached = int(getattr(next(iter(dones.values())), "cached_tokens", 0) or 0) if dones else 0
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                           "prompt_tokens_details": {"cached_tokens": cached}}
    if reasoning:
        out["completion_tokens_details"] = {"reasoning_tokens": sum(int(getattr(d, "reasoning_tokens", 0) or 0)
                                                                    for d in dones.values())}
    return out


def chat_logprobs(tokens: list[Any]) -> dict[str, Any]:
    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

    return {"content": [{**entry(t.text, t.logprob), "top_logprobs": [entry(s, lp) for s, lp in t.top]} for t in tokens],
            "refusal": None}


def text_logprobs(tokens: list[Any], offset: int = 0) -> dict[str, Any]:
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens], "text_offset": offsets}


class Choices:
    """Dresses the jobs' events in OpenAI's chat or text-completion objects, streamed or whole."""

    def __init__(self, chat: bool, model: str, params: GenParams, plan: T.ToolPlan | None, n: int) -> None:
        self.chat, self.model, self.params = chat, model, params
        self.plan = plan if plan is not None and plan.active else None
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.streams = [T.ToolStream(self.plan, incremental=True) if self.plan else None for _ in range(n)]
        think = params.think  # a reasoning model's reply: its thinking block goes out apart, as reasoning_content
        self.splitters = [ThinkSplitter(think.fmt, think.start) if think is not None else None for _ in range(n)]
        self.n_calls = [0] * n
        self.cut = [False] * n  # per choice: it ended at max_tokens (a call in it may be cut short)
        self.offsets = [0] * n
        # Per choice, the stop string that ended it once it has: not in OpenAI's objects, but the
        # Anthropic translation reports it (stop_reason "stop_sequence").
        self.stop_sequences: list[str | None] = [None] * n

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": f"{self.object}.chunk" if self.chat else self.object, "created": self.created,
                "model": self.model, "system_fingerprint": "ggufrun", "choices": choices, **extra}

    def _delta(self, i: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        if self.chat:
            return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": i, "text": delta.get("content", ""), "logprobs": logprobs, "finish_reason": finish}

    def _logprobs(self, i: int, tokens: list[Any]) -> Any:
        if self.params.logprobs is None or not tokens:
            return None
        if self.chat:
            return chat_logprobs(tokens)
        out = text_logprobs(tokens, self.offsets[i])
        self.offsets[i] += sum(len(t.text) for t in tokens)
        return out

    def _call_deltas(self, i: int, call: dict[str, Any]) -> list[dict[str, Any]]:
        k = self.n_calls[i]
        self.n_calls[i] += 1
        args = call["function"]["arguments"]
        head = {"index": k, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"], "arguments": ""}}
        out = [self._delta(i, {"tool_calls": [head]})]
        for pos in range(0, len(args), 16):  # argument fragments, as OpenAI streams them
            out.append(self._delta(i, {"tool_calls": [{"index": k, "function": {"arguments": args[pos:pos + 16]}}]}))
        return out

    def _pieces(self, i: int, text: str, final: bool) -> list[dict[str, Any]]:
        splitter = self.splitters[i]
        if splitter is None:
            return self._answer_pieces(i, text, final)
        parts = splitter.feed(text) if text else []
        if final:
            parts += splitter.finish()
        out: list[dict[str, Any]] = []
        for kind, value in parts:  # thinking as reasoning_content deltas (DeepSeek's and llama-server's convention)
            out.extend([self._delta(i, {"reasoning_content": value})] if kind == THINKING else
                       self._answer_pieces(i, value, False))
        if final:
            out.extend(self._answer_pieces(i, "", True))
        return out

    def _answer_pieces(self, i: int, text: str, final: bool) -> list[dict[str, Any]]:
        stream = self.streams[i]
        if stream is None:
            return [self._delta(i, {"content": text})] if text else []
        parts = stream.feed(text) if text else []
        if final:
            parts += stream.finish(self.cut[i])
        out = []
        for kind, value in parts:
            if kind == "content":
                out.append(self._delta(i, {"content": value}))
            elif kind == "call":
                out.extend(self._call_deltas(i, value))
            elif kind == "call_start":
                self.n_calls[i] += 1
                out.append(self._delta(i, {"tool_calls": [{"index": self.n_calls[i] - 1, "id": value["id"], "type": "function",
                                                           "function": {"name": value["function"]["name"], "arguments": ""}}]}))
            else:  # "args": a fragment of the current call's arguments, as the model writes them
                out.append(self._delta(i, {"tool_calls": [{"index": self.n_calls[i] - 1, "function": {"arguments": value}}]}))
        return out

    def _finish(self, i: int, reason: str) -> str:
        """OpenAI's "tool_calls" when the reply ended in calls; "length" stays when one was cut short."""
        return "tool_calls" if self.n_calls[i] and reason == "stop" else reason

    async def sse(self, group: JobGroup) -> AsyncIterator[bytes]:
        async for chunk in self.chunks(group):
            yield sse(chunk)
        yield DONE

    async def chunks(self, group: JobGroup) -> AsyncIterator[dict[str, Any]]:
        """The chunk objects of the stream (an error as an ``{"error": ...}`` object, then the end);
        the Anthropic, Ollama and Responses translations read these too."""
        n = len(group.jobs)
        if self.chat:
            yield self._chunk([self._delta(i, {"role": "assistant", "content": ""}) for i in range(n)])
        dones: dict[int, Event] = {}
        async for i, event in merged(group):
            if event.kind == "text":
                tokens = getattr(event, "tokens", None) or []
                pieces = self._pieces(i, event.text, final=False)
                logprobs = self._logprobs(i, tokens)
                if logprobs is not None and not pieces:  # text held back by the tool parser keeps its logprobs
                    pieces = [self._delta(i, {"content": ""})]
                for k, piece in enumerate(pieces):
                    if k == 0 and logprobs is not None:
                        piece["logprobs"] = logprobs
                    yield self._chunk([piece])
            elif event.kind == "done":
                self.stop_sequences[i] = getattr(event, "stop_sequence", None)
                self.cut[i] = event.finish_reason == "length"
                for piece in self._pieces(i, "", final=True):
                    yield self._chunk([piece])
                dones[i] = event
                last = len(dones) == n
                extra: dict[str, Any] = {"timings": timings(event)} if last and n == 1 else {}
                yield self._chunk([self._delta(i, {}, self._finish(i, event.finish_reason))], **extra)
                if last and self.params.include_usage:
                    yield self._chunk([], usage=usage(dones, self.params.n, self.params.think is not None))
            else:
                assert event.error is not None
                yield api_error(event.error).body()
                break

    def whole(self, results: list[Collected]) -> dict[str, Any]:
        choices = []
        for i, r in enumerate(results):
            assert r.done is not None
            self.stop_sequences[i] = getattr(r.done, "stop_sequence", None)
            logprobs = self._logprobs(i, r.tokens)
            if not self.chat:
                choices.append({"index": i, "text": r.text, "logprobs": logprobs, "finish_reason": r.done.finish_reason})
                continue
            message: dict[str, Any] = {"role": "assistant", "content": r.text}
            answer = r.text
            if self.params.think is not None:
                thought, answer = split(r.text, self.params.think.fmt, self.params.think.start)
                message["content"] = answer
                if thought:
                    message["reasoning_content"] = thought
            if self.plan is not None:
                content, calls = T.parse_reply(self.plan, answer, cut=r.done.finish_reason == "length")
                message["content"] = content
                if calls:
                    message["tool_calls"] = calls
                    self.n_calls[i] = len(calls)
            message["refusal"] = None
            choices.append({"index": i, "message": message, "logprobs": logprobs,
                            "finish_reason": self._finish(i, r.done.finish_reason)})
        dones = {i: r.done for i, r in enumerate(results) if r.done is not None}
        body = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "system_fingerprint": "ggufrun", "choices": choices,
                "usage": usage(dones, self.params.n, self.params.think is not None)}
        if len(dones) == 1:
            body["timings"] = timings(next(iter(dones.values())))
        return body
