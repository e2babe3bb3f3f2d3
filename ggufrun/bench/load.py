"""Bounded load against any OpenAI-compatible endpoint (ggufrun serve, llama-server, vLLM, Ollama).

``run_load`` sends a fixed number of streamed completions from ``concurrency`` client threads
and times every server-sent event, so a run always ends by itself. Standard library only
(http.client in threads): the measuring client must not be the bottleneck or a dependency.

Tokens are counted from the stream: ``usage.completion_tokens`` when the server reports it,
else one token per event that carries text (what llama.cpp-based servers send).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit

from ..errors import BenchUsageError

DEFAULT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
ENDPOINTS = ("completions", "chat")


@dataclass
class RequestSample:
    """One request as the client saw it; times are seconds from the request's start."""

    ok: bool
    client: int = 0  # which client thread sent it (its body variant is client % len(variants))
    tokens: int = 0
    ttft: float | None = None
    seconds: float = 0.0
    gaps: list[float] = field(default_factory=list)  # inter-token latencies
    error: str = ""
    text: str = ""  # the streamed text, only when run_load(keep_text=True)
    finish_reason: str | None = None  # the last one the stream named
    number: int = 0  # the request's number, 0..requests-1 (what a callable variant was given)


@dataclass
class LoadResult:
    """One concurrency level: the raw samples plus the numbers derived from them."""

    url: str
    model: str
    endpoint: str
    concurrency: int
    requests: int
    seconds: float
    samples: list[RequestSample]

    @property
    def errors(self) -> int:
        return sum(not s.ok for s in self.samples)

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.samples)

    @property
    def tokens_per_second(self) -> float:
        return self.total_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def requests_per_second(self) -> float:
        done = sum(s.ok for s in self.samples)
        return done / self.seconds if self.seconds > 0 else 0.0

    def ttft(self, q: float) -> float | None:
        return percentile([s.ttft for s in self.samples if s.ok and s.ttft is not None], q)

    def itl(self, q: float) -> float | None:
        return percentile([g for s in self.samples if s.ok for g in s.gaps], q)

    def summary(self) -> dict[str, Any]:
        """A flat row for tables and reports."""
        first_error = next((s.error for s in self.samples if not s.ok), "")
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "tokens": self.total_tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_s": round(self.tokens_per_second, 2),
            "requests_per_s": round(self.requests_per_second, 3),
            "ttft_p50_s": _round(self.ttft(50)),
            "ttft_p99_s": _round(self.ttft(99)),
            "itl_p50_ms": _round(_ms(self.itl(50))),
            "itl_p99_ms": _round(_ms(self.itl(99))),
            "first_error": first_error,
        }

    def as_dict(self) -> dict[str, Any]:
        return {**self.summary(), "url": self.url, "model": self.model, "endpoint": self.endpoint,
                "samples": [asdict(s) for s in self.samples]}


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000.0


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def run_load(
    url: str,
    model: str,
    concurrency: int,
    requests: int,
    max_tokens: int = 64,
    prompt: str = DEFAULT_PROMPT,
    api_key: str | None = None,
    endpoint: str = "completions",
    timeout: float = 300.0,
    params: Mapping[str, Any] | None = None,
    variants: Sequence[Mapping[str, Any] | Callable[[int], Mapping[str, Any]]] = ({},),
    keep_text: bool = False,
) -> LoadResult:
    """Send ``requests`` streamed requests from ``concurrency`` threads; return the measured level.

    ``endpoint`` is "completions" (/v1/completions) or "chat" (/v1/chat/completions).
    ``params`` go into every request body (default: greedy, ``{"temperature": 0}``); client thread i
    adds ``variants[i % len(variants)]`` (e.g. a response_format for half of the clients); a
    callable variant is called with each request's number for a body of its own (a fresh schema).
    ``keep_text`` keeps each reply's text, to check what the server did with the variant.
    Failed requests are counted, not raised. Raises BenchUsageError for a bad URL or argument.
    """
    if concurrency < 1 or requests < 1:
        raise BenchUsageError(f"Concurrency and requests must be >= 1 (got {concurrency} and {requests}).")
    if endpoint not in ENDPOINTS:
        raise BenchUsageError(f"Unknown endpoint '{endpoint}'.", f"Choose one of: {', '.join(ENDPOINTS)}.")
    if not variants:
        raise BenchUsageError("Give at least one request variant.")
    target = _Target.parse(url, endpoint, api_key, timeout)
    base = {**(params or {"temperature": 0})}
    bodies = [v if callable(v) else _body(model, prompt, max_tokens, endpoint, {**base, **v}) for v in variants]

    samples: list[RequestSample] = []
    lock = threading.Lock()
    remaining = [requests]

    def take() -> int:
        """The next request's number, -1 when none is left."""
        with lock:
            if remaining[0] <= 0:
                return -1
            remaining[0] -= 1
            return requests - 1 - remaining[0]

    def worker(client: int) -> None:
        variant = bodies[client % len(bodies)]
        conn: http.client.HTTPConnection | None = None
        while (number := take()) >= 0:
            body = _body(model, prompt, max_tokens, endpoint, {**base, **variant(number)}) if callable(variant) else variant
            reused = conn is not None
            conn = conn or target.connect()
            sample = _one_request(conn, target, body, endpoint, keep_text)
            if reused and not sample.ok and sample.ttft is None and sample.error.startswith(_STALE):
                # The server closed the kept-alive connection after the last response (llama-server
                # does): that is no failed request, so send it again on a fresh connection.
                conn.close()
                conn = target.connect()
                sample = _one_request(conn, target, body, endpoint, keep_text)
            sample.client, sample.number = client, number
            if not sample.ok:  # a broken connection must not poison the next request
                conn.close()
                conn = None
            with lock:
                samples.append(sample)
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True, name=f"loadgen-{i}") for i in range(min(concurrency, requests))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    return LoadResult(url=url, model=model, endpoint=endpoint, concurrency=concurrency, requests=requests,
                      seconds=seconds, samples=samples)


def sweep(url: str, model: str, levels: Sequence[int], requests: int,
          on_level: Callable[[LoadResult], None] | None = None, **kwargs: Any) -> list[LoadResult]:
    """run_load for each concurrency level in turn; Ctrl-C keeps the levels already measured."""
    results: list[LoadResult] = []
    try:
        for level in levels:
            result = run_load(url, model, level, requests, **kwargs)
            results.append(result)
            if on_level:
                on_level(result)
    except KeyboardInterrupt:
        if not results:
            raise
    return results


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str
    headers: dict[str, str]
    timeout: float

    @classmethod
    def parse(cls, url: str, endpoint: str, api_key: str | None, timeout: float) -> "_Target":
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BenchUsageError(f"Invalid server URL '{url}'.", "Use http://HOST:PORT, e.g. http://127.0.0.1:13003.")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise BenchUsageError(f"Invalid port in '{url}'.") from None
        base = parts.path.rstrip("/")
        if base.endswith("/v1"):
            base = base[:-3]
        path = f"{base}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}"
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        return cls(parts.scheme, parts.hostname, port, path, headers, timeout)

    def connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)


def _body(model: str, prompt: str, max_tokens: int, endpoint: str, params: Mapping[str, Any]) -> bytes:
    payload: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "stream": True, **params}
    if endpoint == "chat":  # (a variant may bring messages of its own)
        payload.setdefault("messages", [{"role": "user", "content": prompt}])
    else:
        payload.setdefault("prompt", prompt)
    return json.dumps(payload).encode()


_STALE = ("RemoteDisconnected", "BrokenPipeError", "ConnectionResetError", "BadStatusLine")


def _one_request(conn: http.client.HTTPConnection, target: _Target, body: bytes, endpoint: str,
                 keep_text: bool = False) -> RequestSample:
    start = time.perf_counter()
    sample = RequestSample(ok=False)
    last: float | None = None
    usage_tokens: int | None = None
    try:
        conn.request("POST", target.path, body=body, headers=target.headers)
        resp = conn.getresponse()
        if resp.status != 200:
            detail = resp.read(300).decode("utf-8", "replace").strip()
            sample.error = f"HTTP {resp.status}: {detail}"
            return sample
        done = False
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                continue
            event = json.loads(data)
            if "error" in event:
                sample.error = f"stream error: {json.dumps(event['error'])[:200]}"
                resp.read()
                return sample
            usage = event.get("usage") or {}
            if usage.get("completion_tokens") is not None:
                usage_tokens = int(usage["completion_tokens"])
            for choice in event.get("choices") or ():
                sample.finish_reason = choice.get("finish_reason") or sample.finish_reason
            text = _text(event, endpoint)
            if text:
                if keep_text:
                    sample.text += text
                now = time.perf_counter() - start
                if last is None:
                    sample.ttft = now
                else:
                    sample.gaps.append(now - last)
                last = now
                sample.tokens += 1
        if not done:
            sample.error = "stream ended without [DONE]"
            return sample
        if usage_tokens is not None:
            sample.tokens = usage_tokens
        sample.ok = True
    except (OSError, http.client.HTTPException, ValueError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"
    finally:
        sample.seconds = time.perf_counter() - start
    return sample


def _text(event: dict[str, Any], endpoint: str) -> str:
    out = []
    for choice in event.get("choices") or ():
        piece = (choice.get("delta") or {}).get("content") if endpoint == "chat" else choice.get("text")
        if isinstance(piece, str):
            out.append(piece)
    return "".join(out)
