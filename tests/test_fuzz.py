"""A bounded fuzz of every route with hostile requests (issue 19): grammars, JSON schemas,
logit_bias, huge arrays, special-token floods and wrong-typed fields, against a real `ggufrun
serve` with SmolLM2-135M on loopback.

Beside the fuzz a streaming reply runs the whole time. The suite asserts no crash (the process
alive), no 5xx, no traceback in the log, no stall (no input that, sent again, makes the stream
wait over 2 s between tokens or /health over 2 s), and the server's RSS bounded. The inputs are drawn from a seeded generator, so
a failure names a reproducible case; the default run tries FAST inputs, the slow one SLOW.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from serverutil import ServerProcess, serve

FAST, SLOW = 24, 800  # the default run stays a few seconds; -m slow sends 800
STALL = 2.0  # seconds: the most a running stream may wait between two tokens
RSS_LIMIT = 2 << 30  # bytes: SmolLM2 serves in ~0.4 GB; a grammar or array that grows memory goes far past
N_VOCAB = 49152
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>"]
MSG = [{"role": "user", "content": "Hi"}]

# ---- the inputs ---------------------------------------------------------------------------------------


def _count(rng: random.Random) -> int:
    return rng.choice([0, 1, 2, 5, 100, 999, 1000, 1001, 1999, 2000, 2001, 5000, 100_000, 10**12])


def grammar(rng: random.Random) -> str:
    """GBNF, mostly near a limit: repetition bounds in any order, deep groups, token references,
    undefined rules, broken syntax."""
    lo, hi = _count(rng), _count(rng)
    depth = rng.choice([1, 3, 100, 999, 1001, 5000, 100_000])
    atoms = ['"a"', "[a-z]", ".", f"<[{rng.choice([0, 2, 100, N_VOCAB - 1, N_VOCAB, 10**9])}]>", "x", '"\\x00"', "<think>",
             '"ab"', "[^\"\\\\]", "!<[5]>"]
    atom = rng.choice(atoms)
    op = rng.choice(["", "*", "+", "?", f"{{{lo}}}", f"{{{lo},}}", f"{{{lo},{hi}}}", "**", "{", "{,3}"])
    body = "(" * depth + atom + ")" * depth if depth < 2000 else "(" * depth + atom
    tail = rng.choice(["", "x", "y", '| "b"'])
    rules = [f"root ::= {body}{op} {tail}"]
    if rng.random() < 0.6:
        rules.append(f'x ::= "c"{rng.choice(["", "*", "{2,1}", "{0,2000}"])} | root')
    if rng.random() < 0.1:
        rules = [r.replace("root", "start") for r in rules]
    text = "\n".join(rules)
    if rng.random() < 0.1:
        text = text[: rng.randrange(len(text) + 1)]  # cut anywhere: unterminated strings and groups
    return text


def schema(rng: random.Random, depth: int = 0) -> Any:
    """A JSON schema with random keywords, many of them out of bounds or unenforceable."""
    if depth > 3 or rng.random() < 0.25:
        return rng.choice([{"type": t} for t in ("string", "integer", "number", "boolean", "null")] + [{}, True])
    kind = rng.choice(["string", "integer", "number", "array", "object", None, ["string", "null"], "frob"])
    s: dict[str, Any] = {} if kind is None else {"type": kind}
    for _ in range(rng.randint(1, 4)):
        key = rng.choice(["maxLength", "minLength", "minItems", "maxItems", "enum", "pattern", "minimum", "maximum",
                          "exclusiveMinimum", "uniqueItems", "format", "properties", "anyOf", "items", "$ref",
                          "additionalProperties", "required", "const", "multipleOf", "not"])
        if key in ("maxLength", "minLength", "minItems", "maxItems"):
            s[key] = rng.choice([0, 1, 3, 20, 1000, 1001, 100_000, -1, 2.5, True, "9"])
        elif key == "enum":
            s[key] = list(range(rng.choice([1, 3, 1024, 1025, 20_000]))) if rng.random() < 0.7 else "x"
        elif key == "pattern":
            s[key] = rng.choice(["^[a-z]{1,5}$", "((a{999}){999}){999}", "a" * 1200, "[0-9]{5}", "(", ".*", "^\\d{3}-\\d{4}$"])
        elif key in ("minimum", "maximum", "exclusiveMinimum"):
            s[key] = rng.choice([0, 21, -5, 29, 1.5, 10**30, -(10**30), "3"])
        elif key == "uniqueItems":
            s[key] = rng.choice([True, False])
        elif key == "format":
            s[key] = rng.choice(["date", "email", "uuid", "date-time", "uri"])
        elif key == "properties":
            s[key] = {f"p{i}": schema(rng, depth + 1) for i in range(rng.choice([1, 2, 3, 300]))}
        elif key == "anyOf":
            s[key] = [schema(rng, depth + 1) for _ in range(rng.randint(1, 3))]
        elif key == "items":
            s[key] = schema(rng, depth + 1)
        elif key == "$ref":
            s[key] = rng.choice(["#/$defs/a", "http://127.0.0.1:9/s.json", "#/nowhere"])
            s["$defs"] = {"a": {"type": "string", "maxLength": rng.choice([5, 100_000])}}
        elif key == "additionalProperties":
            s[key] = rng.choice([False, True, {"type": "integer"}])
        elif key == "required":
            s[key] = ["p0", "missing"]
        elif key == "const":
            s[key] = rng.choice(["x", 5, {"a": [1, 2]}, "\u0001"])
        else:
            s[key] = rng.choice([3, {"type": "string"}])
    return s


def bias(rng: random.Random) -> Any:
    keys = ["0", "1", "49151", "49152", "-1", "99999999999", "abc", "1.5", " 5", "00007"]
    return {rng.choice(keys): rng.choice([-100, 100, 5, -101, 1e308, "x", None, 0.5]) for _ in range(rng.randint(1, 4))}


def flood(rng: random.Random) -> str:
    k = rng.choice([10, 1000, 5000, 20_000, 25_000])
    return "".join(rng.choice(SPECIAL) for _ in range(k))


def case(rng: random.Random) -> tuple[str, Any]:
    """One (path, body): a kind of hostile input delivered through a random route."""
    kind = rng.choice(["grammar", "schema", "schema", "bias", "arrays", "flood", "fields"])
    small = {"max_tokens": 2}
    if kind == "grammar":
        g = grammar(rng)
        return rng.choice([("/v1/completions", {"prompt": "x", "grammar": g, **small}),
                           ("/v1/chat/completions", {"messages": MSG, "grammar": g, **small})])
    if kind == "schema":
        s = schema(rng)
        tool = {"type": "function", "function": {"name": "f", "parameters": s}}
        return rng.choice([
            ("/v1/chat/completions", {"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": s}}, **small}),
            ("/v1/completions", {"prompt": "x", "json_schema": s, **small}),
            ("/v1/chat/completions", {"messages": MSG, "tools": [tool], "tool_choice": rng.choice(["auto", "required"]), **small}),
            ("/api/chat", {"messages": MSG, "format": s, "stream": False, "options": {"num_predict": 2}}),
            ("/api/generate", {"prompt": "x", "format": s, "stream": False, "options": {"num_predict": 2}}),
            ("/v1/responses", {"input": "x", "max_output_tokens": 16, "text": {"format": {"type": "json_schema", "name": "s", "schema": s}}}),
            ("/v1/messages", {"messages": MSG, "max_tokens": 2, "output_config": {"format": {"type": "json_schema", "schema": s}}}),
        ])
    if kind == "bias":
        b = bias(rng)
        return rng.choice([("/v1/chat/completions", {"messages": MSG, "logit_bias": b, "logprobs": True, **small}),
                           ("/v1/completions", {"prompt": "x", "logit_bias": b, "logprobs": 3, "stream": rng.random() < 0.5, **small})])
    if kind == "arrays":
        # (a long prompt that is accepted is prefill, not a hostile input: generation routes get
        # arrays that are short, or over a limit)
        n = rng.choice([16, 17, 256, 257, 1024, 1025, 5000])
        m = rng.choice([16, 17, 1025, 5000])
        return rng.choice([
            ("/v1/chat/completions", {"messages": MSG * m, **small}),
            ("/v1/responses", {"input": [{"role": "user", "content": "x"}] * m, "max_output_tokens": 16}),
            ("/v1/embeddings", {"input": ["hello"] * n}),
            ("/api/embed", {"input": [[1, 2, 3]] * n}),
            ("/v1/completions", {"prompt": ["x"] * n, **small}),
            ("/v1/completions", {"prompt": [rng.randrange(-5, 60_000) for _ in range(m)], **small}),
            ("/v1/chat/completions", {"messages": MSG, "stop": ["x"] * n, **small}),
            ("/v1/embeddings", {"input": [[rng.choice([0, 1, 2, 49151, 49152])] for _ in range(min(n, 300))]}),
        ])
    if kind == "flood":
        text = flood(rng)
        # A text to embed is short or over a sequence's context (refused): one of 1,000 tokens is
        # accepted work, not a hostile input, and beside the watched stream it goes at the step
        # budget's pace (about a token a step on a loaded 2-core CPU: past this suite's timeouts).
        embed = text if len(text) < 200 else text * 5
        return rng.choice([("/tokenize", {"content": text}), ("/v1/embeddings", {"input": embed}), ("/api/embed", {"input": [embed]}),
                           ("/apply-template", {"messages": [{"role": "user", "content": text}]}),
                           ("/v1/messages/count_tokens", {"messages": [{"role": "user", "content": text}]}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": text[:300]}], **small})])
    field, values = rng.choice([
        ("temperature", [5, -1, "hot", None, 1e308]), ("top_p", [2, -0.1, "x"]), ("n", [0, 17, 2.5, True]),
        ("max_tokens", [0, -1, 10**12, "9"]), ("seed", [-2, 2**40, "s"]), ("repeat_penalty", [0, -1, 11]),
        ("top_k", [-5, 10**9]), ("min_p", [2, -1]), ("presence_penalty", [3, "x"]), ("stop", [[""], 5, ["x"] * 20]),
    ])
    v = rng.choice(values)
    return rng.choice([("/v1/chat/completions", {"messages": MSG, field: v, **small}),
                       ("/v1/messages", {"messages": [{"role": "user", "content": rng.choice(["x", 0, None, [1]])}], "max_tokens": 2,
                                         field if field in ("temperature", "top_p", "top_k") else "temperature": v}),
                       ("/api/chat", {"messages": [{"role": "user", "content": rng.choice(["x", 0, False])}], "stream": False,
                                      "options": {"num_predict": 2, field if field != "max_tokens" else "num_predict": v}})])


# ---- the watch beside it ---------------------------------------------------------------------------------


class Watch:
    """A stream that runs for the whole fuzz (restarted when it ends) and a /health poll, recording
    their longest waits, and the server's peak RSS."""

    def __init__(self, srv: ServerProcess) -> None:
        self.srv = srv
        self.stop = threading.Event()
        self.streaming = threading.Event()  # the stream's first token has come
        self.worst_gap = self.worst_health = 0.0
        self.stalls: list[tuple[float, float]] = []  # (start, end) of every wait over STALL, stream or /health
        self.peak_rss = 0
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._stream, daemon=True), threading.Thread(target=self._health, daemon=True)]

    def __enter__(self) -> Watch:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def _rss(self) -> None:
        try:
            for line in Path(f"/proc/{self.srv.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.peak_rss = max(self.peak_rss, int(line.split()[1]) * 1024)
        except OSError:
            pass

    def _stream(self) -> None:
        body = {"messages": [{"role": "user", "content": "Count to a thousand."}], "stream": True, "max_tokens": 400,
                "ignore_eos": True, "temperature": 0}
        while not self.stop.is_set():
            try:
                with requests.post(f"{self.srv.url}/v1/chat/completions", json=body, stream=True, timeout=60) as r:
                    if r.status_code != 200:
                        self.errors.append(f"watch stream: {r.status_code} {r.text[:200]}")
                        return
                    last = None
                    for line in r.iter_lines():
                        now = time.perf_counter()
                        if line.startswith(b"data: {"):
                            if b'"error"' in line:
                                self.errors.append(f"watch stream error: {line[:300]!r}")
                            self.streaming.set()
                            if last is not None:
                                self.worst_gap = max(self.worst_gap, now - last)
                                if now - last > STALL:
                                    self.stalls.append((last, now))
                            last = now
                        if self.stop.is_set():
                            break
            except requests.RequestException as exc:
                self.errors.append(f"watch stream: {exc}")
                return

    def _health(self) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                requests.get(f"{self.srv.url}/health", timeout=30)
            except requests.RequestException as exc:
                self.errors.append(f"health: {exc}")
                return
            t1 = time.perf_counter()
            self.worst_health = max(self.worst_health, t1 - t0)
            if t1 - t0 > STALL:
                self.stalls.append((t0, t1))
            self._rss()
            time.sleep(0.1)


# ---- the runs ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory, seed_amx_verdict: Any) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("fuzz-home")
    seed_amx_verdict(home)  # the session's AMX verdict and trial loads: no second check per server
    env = {"GGUFRUN_HOME": str(home), "GGUFRUN_HF_ENDPOINT": "http://127.0.0.1:9", "GGUFRUN_MS_ENDPOINT": "http://127.0.0.1:9"}
    # Small batches: a step that prefills a long prompt beside the watched stream stays short (the
    # stall this suite looks for is a hostile input's, not prefill's on a shared 2-core machine).
    with serve(str(smollm2_gguf), "--served-model-name", "smol", "--parallel", "4", "--n-ctx", "2048", "--threads", "1",
               "--batch-size", "64", "--ubatch-size", "64", env=env) as server:
        yield server


def send(srv: ServerProcess, path: str, body: Any, where: str) -> None:
    """One input: no 5xx, strict JSON, the server alive."""
    try:
        r = requests.post(f"{srv.url}{path}", data=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=120)
    except requests.RequestException as exc:
        pytest.fail(f"{where} to {path}: {exc}\n{srv.log()[-3000:]}")
    assert r.status_code < 500, f"{where} to {path}: {r.status_code} {r.text[:500]}"
    if "text/event-stream" in r.headers.get("content-type", ""):
        assert "NaN" not in r.text and "Infinity" not in r.text and '"server_error"' not in r.text, r.text[:500]
    elif r.content:
        r.json()
        assert "NaN" not in r.text, r.text[:500]
    assert srv.proc.poll() is None, f"{where} to {path} ended the server:\n{srv.log()[-3000:]}"
    send.status = r.status_code  # type: ignore[attr-defined]


def fuzz(srv: ServerProcess, n: int, seed: int, report: Callable[[str], None]) -> int:
    """Send ``n`` inputs beside the watch; return how many stalls were replayed (and did not recur)."""
    rng = random.Random(seed)
    statuses: dict[int, int] = {}
    sent: list[tuple[str, Any, float, float]] = []
    with Watch(srv) as watch:
        assert watch.streaming.wait(60), watch.errors  # the stream is running before the first input
        for i in range(n):
            path, body = case(rng)
            if path not in ("/tokenize", "/apply-template") and rng.random() < 0.9:
                body = {"model": "smol", **body}
            t0 = time.perf_counter()
            send(srv, path, body, f"input {i} (seed {seed})")
            sent.append((path, body, t0, time.perf_counter()))
            statuses[send.status] = statuses.get(send.status, 0) + 1  # type: ignore[attr-defined]
    report(f"fuzz: {n} inputs (seed {seed}), statuses {dict(sorted(statuses.items()))}, worst stream gap "
           f"{watch.worst_gap:.2f} s, worst /health {watch.worst_health:.2f} s, peak RSS {watch.peak_rss >> 20} MiB, "
           f"{len(watch.stalls)} waits over {STALL} s")
    assert not watch.errors, watch.errors
    assert 0 < watch.peak_rss < RSS_LIMIT
    assert "Traceback" not in srv.log(), srv.log()[-4000:]
    # A wait over STALL is the server's only if it recurs: this shared machine's load alone makes a
    # lone stream wait seconds at times. Each input in flight during one is sent again, twice,
    # beside a fresh stream; a hostile input stalls every time.
    suspects = {id(x): x for a, b in watch.stalls for x in sent if x[2] <= b and x[3] >= a}
    for path, body, _, _ in list(suspects.values())[:6]:
        recurred = 0
        for _ in range(2):
            with Watch(srv) as again:
                assert again.streaming.wait(60), again.errors
                send(srv, path, body, "replay")
                time.sleep(0.5)
            recurred += bool(again.stalls)
        assert recurred < 2, f"{path} stalls the server every time: {json.dumps(body)[:500]}"
    assert requests.get(f"{srv.url}/health", timeout=5).json()["status"] == "ready"
    return len(suspects)


def test_fuzz_every_route(smol: ServerProcess) -> None:
    fuzz(smol, FAST, seed=19, report=print)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fuzz_every_route_long(smol: ServerProcess) -> None:
    for seed in (1, 2, 3, 4):
        fuzz(smol, SLOW // 4, seed=seed, report=print)
