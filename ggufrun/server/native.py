"""llama-server's native ``/completion`` (and ``/infill``) requests and replies: its field names
checked into the pipeline's GenParams, and the engine's events dressed as its objects.

Every field of its README is honoured or refused with a 400 naming it; unknown fields are
refused, as in ggufrun's other APIs. Sampling fields the engine has no sampler for (DRY, XTC,
mirostat, typical_p, dynamic temperature) are taken at their "off" values, where llama.cpp skips
them too; their tuning fields (dry_base, mirostat_tau...) only matter when those are on. Cuts the
engine does not make (``n_indent``, ``t_max_predict_ms``) are made here: the reply is cut and its
job cancelled, as llama-server stops the slot.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from . import protocol as P
from .api_errors import ApiError, api_error, invalid, unsupported
from .engine import Event
from .limits import check_text_size, check_token_ids
from .streaming import JobGroup, merged

# Sent as the OpenAI completions fields parse_gen checks (same names, bounds and messages).
_PASSED = {"model", "stream", "stop", "seed", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
           "frequency_penalty", "repeat_last_n", "ignore_eos", "grammar", "json_schema"}
# Samplers the engine lacks, with the value at which llama.cpp leaves them out of its chain too.
_OFF = {"typical_p": 1.0, "dynatemp_range": 0.0, "dry_multiplier": 0.0, "xtc_probability": 0.0, "mirostat": 0,
        "min_keep": 0, "n_cache_reuse": 0, "top_n_sigma": -1.0}
_WHY_OFF = {"typical_p": "locally typical sampling", "dynatemp_range": "dynamic temperature", "dry_multiplier": "DRY sampling",
            "xtc_probability": "XTC sampling", "mirostat": "Mirostat", "min_keep": "min_keep",
            "n_cache_reuse": "KV-shift cache reuse (the common prompt prefix is always reused)", "top_n_sigma": "top-n-sigma"}
# Tuning fields of those samplers: checked as numbers, used by nothing while their sampler is off.
_TUNING = {"dynatemp_exponent", "dry_base", "dry_allowed_length", "dry_penalty_last_n", "xtc_threshold", "mirostat_tau",
           "mirostat_eta", "adaptive_target", "adaptive_decay"}
# llama.cpp's default sampler order; the engine applies penalties, top_k, top_p, min_p and temperature in it.
_ORDER = ["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature"]
_NEUTRAL: dict[str, dict[str, Any]] = {"penalties": {"repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0},
            "top_k": {"top_k": 0}, "top_p": {"top_p": 1.0}, "min_p": {"min_p": 0.0}, "temperature": {"temperature": 1.0}}
_OWN = {"prompt", "n_predict", "max_tokens", "n_indent", "n_keep", "n_cmpl", "logit_bias", "n_probs", "t_max_predict_ms", "t_max_prompt_ms",
        "id_slot", "cache_prompt", "return_tokens", "samplers", "timings_per_token", "return_progress",
        "post_sampling_probs", "response_fields", "lora", "sse_ping_interval", "dry_sequence_breakers"}
COMPLETION_FIELDS = _PASSED | set(_OFF) | _TUNING | _OWN
INFILL_FIELDS = COMPLETION_FIELDS | {"input_prefix", "input_suffix", "input_extra"}
MAX_PROBS = 20  # alternatives per token the engine computes


@dataclass
class NativeRequest:
    """A checked /completion body: the pipeline's params plus what this module does itself."""

    params: P.GenParams
    prompts: list[list[str | int]]  # each prompt as text pieces and token ids (llama-server's mixed prompts)
    bias: list[tuple[int | str, float]] = field(default_factory=list)  # tokens or text, made ids at build
    n_predict: int | None = None  # the request's, -1 for "until the context is full"
    n_probs: int = 0
    n_indent: int = 0
    t_max_predict_ms: float = 0.0
    id_slot: int = -1
    return_tokens: bool = False
    response_fields: list[str] = field(default_factory=list)
    samplers: list[str] = field(default_factory=lambda: list(_NEUTRAL))  # those that run, in order
    settings: dict[str, Any] = field(default_factory=dict)  # generation_settings, filled in at build


def _int(body: dict[str, Any], key: str, low: int, high: int | None = None) -> int | None:
    value = P.typed(body, key, (int,), "an integer")
    if value is not None and (value < low or (high is not None and value > high)):
        raise invalid(key, f"must be {low} or more (got {value})." if high is None else f"must be between {low} and {high} (got {value}).")
    return value


def _prompt_list(value: Any) -> list[list[str | int]]:
    """llama-server's prompt shapes: a string, token ids, ids and strings mixed, {"prompt_string"}, or a list of those."""
    def one(item: Any) -> list[str | int] | None:
        if isinstance(item, str):
            return [item]
        if isinstance(item, dict):
            if item.get("multimodal_data"):
                raise unsupported("prompt.multimodal_data", "the served models read text only.")
            if set(item) - {"prompt_string", "multimodal_data"} or not isinstance(item.get("prompt_string"), str):
                raise invalid("prompt", 'a prompt object is {"prompt_string": "..."}.')
            return [item["prompt_string"]]
        if isinstance(item, list) and item and all(isinstance(t, str) or (isinstance(t, int) and not isinstance(t, bool))
                                                   for t in item):
            return list(item)
        return None

    def token(t: Any) -> bool:
        return isinstance(t, int) and not isinstance(t, bool)

    prompts: list[list[str | int] | None]
    if isinstance(value, (str, dict)):
        prompts = [one(value)]
    elif isinstance(value, list) and value and all(isinstance(t, str) or token(t) for t in value) and any(token(t) for t in value):
        prompts = [one(value)]  # token ids, or ids and strings mixed: one prompt
    elif isinstance(value, list):
        prompts = [one(v) for v in value]  # several prompts (a list of strings among them)
    else:
        prompts = []
    if None in prompts:
        prompts = []
    if not prompts or len(prompts) > P.MAX_N:
        raise invalid("prompt", f"expected a string, token ids, token ids and strings mixed, or a list of up to {P.MAX_N} "
                      "such prompts.")
    checked = [p for p in prompts if p is not None]
    check_text_size([t for p in checked for t in p if isinstance(t, str)], "prompt")
    return checked


def _logit_bias(value: Any) -> list[tuple[int | str, float]]:
    """[[token or text, bias or false], ...] or {"token or text": bias or false}; false bans the token."""
    if value is None:
        return []
    pairs = list(value.items()) if isinstance(value, dict) else value
    if not isinstance(pairs, list):
        raise invalid("logit_bias", "expected [[token, bias], ...] or {token: bias}.")
    out: list[tuple[int | str, float]] = []
    for pair in pairs:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise invalid("logit_bias", "expected [[token, bias], ...] or {token: bias}.")
        key, bias = pair
        # ASCII digits only and bounded: str.isdigit() passes "²" and 5000-digit keys, which int() refuses (a 500)
        if isinstance(value, dict) and re.fullmatch(r"-?[0-9]{1,18}", key):
            key = int(key)
        elif isinstance(value, dict) and re.fullmatch(r"-?[0-9]+", key):
            raise invalid("logit_bias", f"token id {key[:20]}... is out of range.")
        if not (isinstance(key, str) or (isinstance(key, int) and not isinstance(key, bool))):
            raise invalid("logit_bias", f"a key is a token id or a text (got {json.dumps(key)}).")
        if bias is False:
            out.append((key, -math.inf))
        elif isinstance(bias, (int, float)) and not isinstance(bias, bool):
            out.append((key, float(bias)))
        else:
            raise invalid("logit_bias", f"a bias is a number or false (got {json.dumps(bias)}).")
    check_text_size([k for k, _ in out if isinstance(k, str)], "logit_bias")
    return out


# The engine's llama.cpp draw chain, in its order: the infill sampler goes among these.
_CHAIN = ["top_k", "top_p", "min_p", "temperature"]


def _samplers(value: Any, body: dict[str, Any], sampled: bool = True) -> tuple[dict[str, Any], list[str]]:
    """``samplers``: those the engine applies, in llama.cpp's order, and llama.cpp's infill sampler
    where listed (after top-k); a sampler left out is neutral (as in llama.cpp's chain), which
    contradicts a request that also sets its parameter, unless nothing is sampled (``sampled``
    false: n_predict 0, as llama.vim's context-only requests send temperature with no samplers).
    Returns the sampling values (neutral ones, ``infill``'s place) and the samplers that run."""
    if value is None:
        return {}, list(_NEUTRAL)
    names = list(value) if isinstance(value, list) else None
    if isinstance(value, str):  # llama-server's short form: one letter a sampler
        letters = {"e": "penalties", "d": "dry", "s": "top_n_sigma", "k": "top_k", "y": "typ_p", "p": "top_p", "m": "min_p",
                   "x": "xtc", "t": "temperature", "i": "infill"}
        names = [letters.get(c, c) for c in value]
    if names is None or not all(isinstance(n, str) for n in names):
        raise invalid("samplers", "expected a list of sampler names.")
    names = [{"typical_p": "typ_p", "nucleus": "top_p", "top-k": "top_k", "top-p": "top_p", "min-p": "min_p",
              "temp": "temperature", "repetition": "penalties"}.get(n, n) for n in names]
    out: dict[str, Any] = {}
    listed = list(names)
    if "infill" in names:
        at = names.index("infill")
        before, after = names[:at], names[at + 1:]
        if "infill" in after:
            raise unsupported("samplers", "the infill sampler runs once in this server's chain.")
        if "penalties" in after:
            raise unsupported("samplers", "penalties run before the infill sampler here (list 'penalties' first).")
        if "top_k" not in before:
            raise unsupported("samplers", "the infill sampler compares every pair of candidates, so this server runs it "
                              f"after top_k (1 to {INFILL_TOP_K_MAX}): list 'top_k' before 'infill'.")
        out["infill"] = max(_CHAIN.index(n) + 1 for n in before if n in _CHAIN)
        names = before + after
    for n in names:
        if n not in _ORDER:
            raise unsupported("samplers", f"sampler '{n}' is not one this server applies (it has {', '.join(_ORDER)}, infill).")
    positions = [_ORDER.index(n) for n in names]
    if positions != sorted(set(positions)):
        raise unsupported("samplers", f"the engine applies its samplers in llama.cpp's default order ({', '.join(_ORDER)}).")
    for sampler, neutral in _NEUTRAL.items():
        if sampler in names:
            continue
        for key, v in neutral.items():
            if sampled and body.get(key) is not None and body[key] != v:
                raise invalid("samplers", f"'{sampler}' is left out, which contradicts '{key}': {json.dumps(body[key])}.")
            out[key] = v
    return out, [n for n in listed if n in _NEUTRAL or n == "infill"]


INFILL_TOP_K_MAX = 256  # the infill sampler's pairwise merge: 65k comparisons a token at most


def check_infill(req: NativeRequest, sampling: dict[str, Any], model: Any) -> None:
    """A request with the infill sampler: top_k that bounds its candidates, and a vocabulary
    llama.cpp's infill sampler can read (it aborts on a token over 512 bytes); else a 400."""
    if req.params.sampling.get("infill", -1) < 0:
        return
    top_k = sampling.get("top_k") or 0
    if not 0 < top_k <= INFILL_TOP_K_MAX:
        raise unsupported("top_k", f"the infill sampler compares every pair of candidates: it needs top_k from 1 to "
                          f"{INFILL_TOP_K_MAX} before it (got {top_k}).")
    from ..llama.sampler import infill_refusal

    why = infill_refusal(model)
    if why:
        raise unsupported("samplers", f"the infill sampler cannot run on this model: {why}")


def parse_completion(body: dict[str, Any], endpoint: str, *, infill: bool = False) -> NativeRequest:
    """A /completion (or /infill) body checked; raise ApiError (400) naming the field."""
    fields = INFILL_FIELDS if infill else COMPLETION_FIELDS
    for key in body:
        if key not in fields:
            raise ApiError(400, f"Unrecognized request argument supplied to {endpoint}: '{key}'.", param=key)
    params = P.parse_gen({k: v for k, v in body.items() if k in _PASSED}, chat=False)
    for key, off in _OFF.items():
        value = P.typed(body, key, (int, float), "a number")
        if value is not None and value != off and not (key == "top_n_sigma" and value <= 0):
            raise unsupported(key, f"{_WHY_OFF[key]} is not available in this server's sampler (send {off} or leave it out).")
    for key in _TUNING:
        P.typed(body, key, (int, float), "a number")
    breakers = body.get("dry_sequence_breakers")
    if breakers is not None and not (isinstance(breakers, list) and all(isinstance(b, str) for b in breakers)):
        raise invalid("dry_sequence_breakers", "expected a list of strings.")
    n_predict = _int(body, "n_predict", -1) if body.get("n_predict") is not None else _int(body, "max_tokens", -1)
    neutral, samplers = _samplers(body.get("samplers"), body, sampled=n_predict != 0)
    params.sampling.update(neutral)
    # n_predict 0: the prompt into the cache only, one token sampled and not returned
    params.max_tokens = None if n_predict is None else (1 << 30 if n_predict == -1 else max(n_predict, 1))
    n_cmpl = _int(body, "n_cmpl", 1, P.MAX_N)
    params.n = n_cmpl or 1
    n_probs = _int(body, "n_probs", 0, MAX_PROBS) or 0
    params.logprobs = n_probs  # always on: the reply's token ids (tokens, return_tokens) come with it
    _int(body, "n_keep", -1)  # only read when a context shift drops tokens: ggufrun never shifts (too long is a 400)
    if body.get("cache_prompt") is False:
        raise unsupported("cache_prompt", "the prompt's KV cache is always reused (false cannot be honoured).")
    P.typed(body, "cache_prompt", (bool,), "true or false")
    for key, why in (("timings_per_token", "timings come with the final reply only."),
                     ("return_progress", "prompt progress is not reported."),
                     ("post_sampling_probs", "probabilities are reported before sampling only (logprob, top_logprobs).")):
        if P.typed(body, key, (bool,), "true or false"):
            raise unsupported(key, why)
    if P.typed(body, "lora", (list,), "a list of adapters"):
        raise unsupported("lora", "this server loads no LoRA adapters.")
    ping = P.typed(body, "sse_ping_interval", (int, float), "a number")
    if ping is not None and ping != -1:
        raise unsupported("sse_ping_interval", "this server sends no SSE pings (send -1 or leave it out).")
    fields_ = P.typed(body, "response_fields", (list,), "a list of field names") or []
    if not all(isinstance(f, str) for f in fields_):
        raise invalid("response_fields", "expected a list of field names.")
    t_max = P.typed(body, "t_max_predict_ms", (int, float), "a number of milliseconds") or 0
    # llama-server reads no t_max_prompt_ms (a TODO in its task params): llama.vim and llama.vscode
    # send it with every request, so it is checked and, as there, bounds nothing (see the README)
    P.typed(body, "t_max_prompt_ms", (int, float), "a number of milliseconds")
    if infill:  # /infill's prompt is text after the prefix (llama-server: a string, optional)
        prompts: list[list[str | int]] = [[P.typed(body, "prompt", (str,), "a string") or ""]]
        check_text_size([prompts[0][0]], "prompt")  # type: ignore[list-item]
    elif body.get("prompt") is None:
        raise invalid("prompt", "is required.")
    else:
        prompts = _prompt_list(body["prompt"])
    req = NativeRequest(params=params, prompts=prompts,
                        bias=_logit_bias(body.get("logit_bias")), n_predict=n_predict, n_probs=n_probs,
                        n_indent=_int(body, "n_indent", 0) or 0, t_max_predict_ms=max(float(t_max), 0.0),
                        id_slot=-1 if (slot := _int(body, "id_slot", -1)) is None else slot,
                        return_tokens=bool(P.typed(body, "return_tokens", (bool,), "true or false")),
                        response_fields=fields_, samplers=samplers)
    return req


def prompt_tokens(model: Any, prompt: list[str | int], param: str = "prompt") -> list[int]:
    """A mixed prompt's tokens: BOS (where the model adds one) when it starts with text; text with
    special tokens parsed, ids as given (llama-server's tokenize_mixed for a prompt)."""
    out: list[int] = []
    for k, part in enumerate(prompt):
        if isinstance(part, str):
            out += model.tokenize(part, add_special=k == 0, parse_special=True) if part or k == 0 else []
        else:
            check_token_ids([part], model.n_vocab, param)
            out.append(part)
    return out


def bias_ids(model: Any, bias: list[tuple[int | str, float]]) -> dict[int, float] | None:
    """The logit bias by token id: a text's every token gets the bias (llama-server's rule)."""
    out: dict[int, float] = {}
    for key, value in bias:
        ids = [key] if isinstance(key, int) else model.tokenize(key, add_special=False, parse_special=False)
        check_token_ids(ids, model.n_vocab, "logit_bias")
        for t in ids:
            out[t] = value
    return out or None


def generation_settings(req: NativeRequest, sampling: dict[str, Any], n_ctx: int, model: str, max_tokens: int) -> dict[str, Any]:
    """llama-server's generation_settings (and /props' params) for what this request runs with."""
    p = req.params
    n_predict = req.n_predict if req.n_predict is not None else (max_tokens or -1)  # (0: prompt only, as asked)
    return {"n_ctx": n_ctx, "model": model, "seed": sampling.get("seed", -1), "temperature": sampling.get("temperature"),
            "dynatemp_range": 0.0, "dynatemp_exponent": 1.0, "top_k": sampling.get("top_k"), "top_p": sampling.get("top_p"),
            "min_p": sampling.get("min_p"), "top_n_sigma": -1.0, "xtc_probability": 0.0, "xtc_threshold": 0.1,
            "typical_p": 1.0, "repeat_last_n": sampling.get("repeat_last_n"), "repeat_penalty": sampling.get("repeat_penalty"),
            "presence_penalty": sampling.get("presence_penalty"), "frequency_penalty": sampling.get("frequency_penalty"),
            "dry_multiplier": 0.0, "mirostat": 0, "stop": list(p.stop), "max_tokens": n_predict, "n_predict": n_predict,
            "n_keep": 0, "n_discard": 0, "ignore_eos": p.ignore_eos, "stream": p.stream,
            "logit_bias": [{"token": t, "bias": b if math.isfinite(b) else False} for t, b in (p.logit_bias or {}).items()],
            "n_probs": req.n_probs, "min_keep": 0, "grammar": p.grammar or "", "n_indent": req.n_indent,
            "t_max_predict_ms": req.t_max_predict_ms,
            "samplers": list(req.samplers),
            "timings_per_token": False, "post_sampling_probs": False, "lora": []}


def _probs(tokens: list[Any]) -> list[dict[str, Any]]:
    def entry(tid: int, text: str, logprob: float) -> dict[str, Any]:
        return {"id": tid, "token": text, "bytes": list(text.encode("utf-8", "replace")), "logprob": logprob}

    return [{**entry(t.id, t.text, t.logprob), "top_logprobs": [entry(i, s, lp) for i, (s, lp) in zip(t.top_ids, t.top)]}
            for t in tokens]


def pick_fields(reply: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    """llama-server's response_fields: only these, "a/b" taken out of a nested object as "a/b"."""
    out: dict[str, Any] = {}
    for name in fields:
        value: Any = reply
        for part in name.split("/"):
            if not isinstance(value, dict) or part not in value:
                break
            value = value[part]
        else:
            out[name] = value
    return out


def indent_cut(text: str, n_indent: int) -> int | None:
    """Where llama-server cuts a reply whose new line is indented less than ``n_indent``: at that
    line's first non-blank character (its indentation stays); None when no line is."""
    start = text.find("\n")
    while start >= 0:
        pos = start + 1
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos < len(text) and pos - start - 1 < n_indent:
            return pos
        start = text.find("\n", start + 1)
    return None


@dataclass
class _Reply:
    text: str = ""
    tokens: list[Any] = field(default_factory=list)
    done: Event | None = None
    first_at: float = 0.0
    cut: str = ""  # "limit" when n_indent or t_max_predict_ms ended it here


class CutGroup(JobGroup):
    """A request's jobs, where one job cut here (cancelled by n_indent or t_max_predict_ms) does
    not count as the client gone: the stream goes on with its final object and the other jobs."""

    def __init__(self, jobs: list[Any]) -> None:
        super().__init__(jobs)
        self.gone = False

    def cancel(self) -> None:
        self.gone = True
        super().cancel()

    @property
    def cancelled(self) -> bool:
        return self.gone


class NativeReplies:
    """The engine's events of one /completion request as llama-server's objects."""

    def __init__(self, req: NativeRequest, group: JobGroup, model: str, prompt_texts: list[str]) -> None:
        self.req, self.model, self.prompt_texts = req, model, prompt_texts
        self.n_ctx: int = req.settings["n_ctx"]  # the engine's, filled in at build
        self.group = CutGroup(group.jobs)  # (EventStream and the disconnect watcher take this one)
        self.replies = [_Reply() for _ in group.jobs]
        self.started = time.perf_counter()

    def _feed(self, i: int, event: Event) -> tuple[str, list[Any]]:
        """Take a text event; return the text and tokens to hand out (less where a cut ends the reply)."""
        r = self.replies[i]
        now = time.perf_counter()
        if not r.first_at:
            r.first_at = now
        text, tokens = event.text, list(event.tokens)
        if self.req.n_indent and "\n" in r.text + text:
            # only from the reply's last line on: the lines before it were checked with earlier tokens
            # (llama.vim sends n_indent with every request; rescanning the whole reply a token is quadratic)
            base = max(r.text.rfind("\n"), 0)
            cut = indent_cut(r.text[base:] + text, self.req.n_indent)
            if cut is not None:
                text, r.cut = text[: max(base + cut - len(r.text), 0)], "limit"
        if not r.cut and self.req.t_max_predict_ms and "\n" in text and (now - r.first_at) * 1e3 > self.req.t_max_predict_ms:
            r.cut = "limit"  # a new line past the time limit: llama-server stops there, the new line included
        r.text += text
        r.tokens += tokens
        if r.cut:
            self.group.jobs[i].cancel()
        return text, tokens

    def _final(self, i: int, stream: bool) -> dict[str, Any]:
        r, req = self.replies[i], self.req
        job = self.group.jobs[i]
        done = r.done
        reason = "limit" if r.cut else {"length": "limit"}.get(done.finish_reason if done else "", "eos")
        word = (done.stop_sequence or "") if done is not None and not r.cut else ""
        if word:
            reason = "word"
        n_prompt = len(job.request.prompt)
        n_gen = len(r.tokens) if req.n_predict != 0 else 0
        if done is not None and done.timings:
            timings = dict(done.timings)
        else:  # cut here: the engine's counts stopped with the job; the clock's are these
            now = time.perf_counter()
            gen_ms = (now - r.first_at) * 1e3 if r.first_at else 0.0
            prompt_ms = ((r.first_at or now) - self.started) * 1e3
            timings = {"cache_n": 0, "prompt_n": n_prompt, "prompt_ms": prompt_ms, "prompt_per_token_ms": prompt_ms / n_prompt,
                       "prompt_per_second": 1e3 * n_prompt / prompt_ms if prompt_ms else 0.0, "predicted_n": n_gen,
                       "predicted_ms": gen_ms, "predicted_per_token_ms": gen_ms / max(n_gen, 1),
                       "predicted_per_second": 1e3 * n_gen / gen_ms if gen_ms else 0.0}
        timings["predicted_n"] = n_gen
        content = "" if stream or req.n_predict == 0 else r.text
        out: dict[str, Any] = {
            "index": i, "content": content,
            "tokens": [] if stream or not req.return_tokens or req.n_predict == 0 else [t.id for t in r.tokens],
            "id_slot": job.slot, "stop": True, "model": self.model, "tokens_predicted": n_gen, "tokens_evaluated": n_prompt,
            "generation_settings": req.settings, "prompt": self.prompt_texts[i // req.params.n],
            "has_new_line": "\n" in r.text, "truncated": reason == "limit" and n_prompt + n_gen + 1 >= self.n_ctx,
            "stop_type": reason, "stopping_word": word, "tokens_cached": n_prompt + n_gen - 1 if n_gen else n_prompt,
            "timings": timings,
            # the booleans older llama-server builds sent (and llama.vim-era clients still read)
            "stopped_eos": reason == "eos", "stopped_limit": reason == "limit", "stopped_word": reason == "word",
        }
        if not stream and req.n_probs and req.n_predict != 0:
            out["completion_probabilities"] = _probs(r.tokens)
        return pick_fields(out, req.response_fields) if req.response_fields else out

    async def stream(self) -> AsyncIterator[dict[str, Any]]:
        """Partial objects as tokens come, then each job's final one; an error as {"error": ...}."""
        async with contextlib.aclosing(self._events()) as events:
            async for i, event in events:
                if event.kind == "error":
                    assert event.error is not None
                    yield api_error(event.error).body()
                    return
                if event.kind == "text":
                    text, tokens = self._feed(i, event)
                    if (text or tokens) and self.req.n_predict != 0:
                        yield self._partial(i, text, tokens)
                if event.kind == "done" or self.replies[i].cut:
                    yield self._final(i, True)

    async def whole(self) -> list[dict[str, Any]]:
        """Every job's final object; an error event raises its error."""
        async with contextlib.aclosing(self._events()) as events:
            async for i, event in events:
                if event.kind == "error":
                    assert event.error is not None
                    raise event.error
                if event.kind == "text":
                    self._feed(i, event)
        return [self._final(i, False) for i in range(len(self.group.jobs))]

    async def _events(self) -> AsyncGenerator[tuple[int, Event], None]:
        """The jobs' events until each has ended (its done event, or a cut made here)."""
        open_jobs = set(range(len(self.group.jobs)))
        async with contextlib.aclosing(merged(self.group)) as events:
            async for i, event in events:
                if i not in open_jobs:
                    continue  # the "cancelled" end of a job cut here
                if event.kind == "done":
                    self.replies[i].done = event
                yield i, event
                if event.kind != "text" or self.replies[i].cut:
                    open_jobs.discard(i)
                if not open_jobs or event.kind == "error":
                    return

    def _partial(self, i: int, text: str, tokens: list[Any]) -> dict[str, Any]:
        job = self.group.jobs[i]
        part: dict[str, Any] = {"index": i, "content": text, "tokens": [t.id for t in tokens], "stop": False,
                                "id_slot": job.slot, "tokens_predicted": len(self.replies[i].tokens),
                                "tokens_evaluated": len(job.request.prompt)}
        if self.req.n_probs:
            part["completion_probabilities"] = _probs(tokens)
        return part
