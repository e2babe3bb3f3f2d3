"""Issue 19, the request half: every field bounded and checked against the model before llama.cpp
or numpy sees it, and replies that finish under a schema validate against it, on every API.

Unit tests read the checkers directly (the GBNF scanner, the schema bounds, the integer-range
grammar against Python's own integers); the rest run a real `ggufrun serve` with SmolLM2-135M
and real clients (openai, anthropic, ollama, jsonschema).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests
from serverutil import ServerProcess, serve

from ggufrun.llama.grammar import min_max_int
from ggufrun.server import gbnf, limits
from ggufrun.server.constraints import check_schema, schema_grammar
from ggufrun.server.protocol import ApiError

# ---- the checkers ---------------------------------------------------------------------------------

BAD_GRAMMARS = [
    ('root ::= "a"{5,2}', "minimum above its maximum"),  # llama.cpp: 2^64 rules, memory without limit
    ("root ::= " + "(" * 150_000 + '"a"' + ")" * 150_000, "bytes"),  # over the size limit first
    ("root ::= " + "(" * 1500 + '"a"' + ")" * 1500, "nested"),  # llama.cpp's parser recursion
    ('root ::= "a"{3000}', "2000"),  # llama.cpp silently turns {m,n} over 2000 into {m,}
    ('root ::= "a"{0,99999999999}', "repetition"),
    ("root ::= " + " ".join(f"r{i}" for i in range(16)) + "\n" +  # 16 x 10 x 2,000 elements, over 300,000
     "\n".join(f'r{i} ::= "abcdefghij"{{2000}}' for i in range(16)), "expands"),
    ("root ::= x", "never defined"),
    ('x ::= "a"', "no 'root'"),
    ('root ::= "a" )', "unbalanced"),
    ('root ::= ("a"', "never closed"),
    ('root ::= "a', "unterminated"),
    ("root ::= *", "nothing before it"),
    ('root ::= "a"\x00', "NUL"),
    ('root ::= (x ::= "a")', "inside another rule"),
]


@pytest.mark.parametrize("text,why", BAD_GRAMMARS, ids=[w for _, w in BAD_GRAMMARS])
def test_the_gbnf_checker_refuses_what_llama_cpp_must_not_parse(text: str, why: str) -> None:
    with pytest.raises(ApiError) as err:
        gbnf.check_gbnf(text, "grammar")
    assert err.value.status == 400 and err.value.param == "grammar" and why in err.value.message, err.value.message


def test_the_gbnf_checker_accepts_real_grammars_and_reports_token_ids() -> None:
    for text in ['root ::= [a-z]+ ("," [a-z]+)*  # a comment\n', 'root ::= "x"{0,2000} | "y"{2,} <think>',
                 'root ::= (\n  "a" |\n  "b"\n)?\n\nrest ::= root', 'root ::= "\\"" [^"\\\\]* "\\"" !<[5]> <[7]>']:
        shape = gbnf.check_gbnf(text)
        assert "root" in shape.rules
    assert gbnf.check_gbnf('root ::= <[7]> !<[49152]>').token_ids == {7, 49152}


BAD_SCHEMAS = [
    ({"type": "string", "maxLength": 100_000}, "s.maxLength"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "s.minLength"),
    ({"type": "array", "items": {"type": "string"}, "maxItems": 100_000}, "s.maxItems"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "s.uniqueItems"),
    ({"enum": list(range(100_000))}, "s.enum"),
    ({"type": "number", "maximum": 20}, "s.maximum"),
    ({"type": "integer", "multipleOf": 3}, "s.multipleOf"),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "email"}}}, "s.properties.a.format"),
    ({"type": "string", "pattern": "((a{999}){999}){999}"}, "s.pattern"),
    ({"type": "string", "pattern": "x" * 2000}, "s.pattern"),
    ({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(300)}}, "s.properties"),
    ({"anyOf": [{"type": "string", "maxLength": -1}]}, "s.anyOf[0].maxLength"),
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "s.properties.a.not"),
    ({"type": "string", "pattern": '^a"b$'}, "s.pattern"),  # written unescaped in the JSON string
    ({"type": "string", "pattern": "^[ -~]+$"}, "s.pattern"),  # a range holding '"' and '\\'
    ({"type": "string", "pattern": "^\\x22$"}, "s.pattern"),  # an escape naming a quote is a quote to llama.cpp
    ({"type": "string", "pattern": "^[\\x20-\\x7e]+$"}, "s.pattern"),  # escapes in a range holding both
]


@pytest.mark.parametrize("schema,param", BAD_SCHEMAS, ids=[p for _, p in BAD_SCHEMAS])
def test_schema_keywords_are_bounded_or_refused_by_name(schema: dict[str, Any], param: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(ApiError) as err:
        schema_grammar(schema, "s")
    assert err.value.status == 400 and err.value.param == param, err.value.message
    assert time.perf_counter() - t0 < 0.5  # refused before any conversion


def test_a_schema_within_the_limits_converts_to_a_grammar_the_checker_accepts() -> None:
    big = {"type": "object", "properties": {
        "text": {"type": "string", "maxLength": 1000}, "tags": {"type": "array", "items": {"enum": list(range(1024))}, "maxItems": 256},
        "age": {"type": "integer", "minimum": 0, "maximum": 130}, "when": {"type": "string", "format": "date"}}}
    check_schema(big, "s")
    grammar = schema_grammar(big, "s")
    assert gbnf.check_gbnf(grammar).depth <= gbnf.MAX_DEPTH
    # no raw control character can be sampled inside a JSON string (llama.cpp's C++ converter's rule)
    assert '[^"\\\\\\x7F\\x00-\\x1F]' in grammar
    # bounds on the list spelling of the type are written into the grammar too
    assert "a ::= ([5-7]) space" in schema_grammar({"type": "object", "properties": {"a": {"type": ["integer"], "minimum": 5,
                                                                                         "maximum": 7}}}, "s")
    # nor a quote, backslash or control character through a pattern's "." or [^...]
    pattern = schema_grammar({"type": "string", "pattern": "^.[^x]$"}, "s")
    assert pattern.count('[^"\\\\\\x7F\\x00-\\x1F') == 2, pattern


@pytest.mark.parametrize("lo,hi", [(0, 20), (-5, 5), (-30, -7), (7, 123), (0, 0), (99, 101), (-100, 100), (123, 4567),
                                   (5, None), (None, 5), (-12, None), (None, -3), (10, None), (None, 0), (0, None),
                                   (100, None), (905, None), (None, -905), (2000, None), (-905, -100)])  # zeros after the first digit
def test_integer_ranges_become_grammars_that_match_exactly_the_range(lo: int | None, hi: int | None) -> None:
    """Read the GBNF as a regular expression (it uses only literals, classes, groups and {m,n})."""
    text = min_max_int(lo, hi)
    pattern = re.compile(re.sub(r'"([^"]*)"', lambda m: re.escape(m.group(1)), text).replace(" ", ""))
    for v in range(-6000, 6000):
        assert bool(pattern.fullmatch(str(v))) == ((lo is None or v >= lo) and (hi is None or v <= hi)), (lo, hi, v)
    for s in ("01", "00", "-01", "+1", "", "1.0"):
        assert not pattern.fullmatch(s), (lo, hi, s)


# ---- a real server ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory, seed_amx_verdict: Any) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("limits-home")
    seed_amx_verdict(home)  # the session's AMX verdict and trial loads: no second check per server
    env = {"GGUFRUN_HOME": str(home), "GGUFRUN_HF_ENDPOINT": "http://127.0.0.1:9", "GGUFRUN_MS_ENDPOINT": "http://127.0.0.1:9"}
    with serve(str(smollm2_gguf), "--served-model-name", "smol", "--parallel", "4", "--n-ctx", "4096", "--threads", "1",
               "--temperature", "0", env=env) as server:
        yield server


def _post(srv: ServerProcess, path: str, body: Any, timeout: float = 120) -> requests.Response:
    return requests.post(f"{srv.url}{path}", json=body, timeout=timeout)


def _error_param(path: str, r: requests.Response) -> str:
    """The field an error names, in each API's own shape (Ollama's is a message only)."""
    body = r.json()
    if path.startswith("/api/"):
        return str(body["error"])
    if path == "/v1/messages":
        return str(body["error"]["message"])
    return str(body["error"]["param"])


MSG = [{"role": "user", "content": "Name a person."}]
HUGE = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 100_000}}}


@pytest.mark.parametrize("path,body,field", [
    ("/v1/chat/completions", {"model": "smol", "messages": MSG, "response_format": {
        "type": "json_schema", "json_schema": {"name": "p", "schema": HUGE}}}, "response_format.json_schema.schema.properties.name.maxLength"),
    ("/v1/chat/completions", {"model": "smol", "messages": MSG, "json_schema": HUGE}, "json_schema.properties.name.maxLength"),
    ("/api/chat", {"model": "smol", "messages": MSG, "stream": False, "format": HUGE}, "format.properties.name.maxLength"),
    ("/v1/responses", {"model": "smol", "input": "hi", "text": {"format": {"type": "json_schema", "name": "p", "schema": HUGE}}},
     "text.format.schema.properties.name.maxLength"),
    ("/v1/messages", {"model": "smol", "max_tokens": 5, "messages": MSG, "output_config": {"format": {"type": "json_schema", "schema": HUGE}}},
     "output_config.format.schema.properties.name.maxLength"),
    ("/v1/completions", {"model": "smol", "prompt": "x", "grammar": 'root ::= "a"{5,2}'}, "grammar"),
    ("/v1/completions", {"model": "smol", "prompt": "x", "grammar": "root ::= <[49152]>"}, "grammar"),
    ("/v1/chat/completions", {"model": "smol", "messages": MSG, "logit_bias": {"49152": 1}}, "logit_bias"),
    ("/v1/completions", {"model": "smol", "prompt": [1, 2, 49152]}, "prompt"),
    ("/v1/embeddings", {"model": "smol", "input": [[1], [99999]]}, "input[1]"),
    ("/api/embed", {"model": "smol", "input": ["a"] * 257}, "input"),
    ("/v1/embeddings", {"model": "smol", "input": ["word " * 200] * 100}, "input"),  # over MAX_EMBED_TOKENS
    ("/v1/chat/completions", {"model": "smol", "messages": MSG * 1025}, "messages"),
    ("/v1/responses", {"model": "smol", "input": [{"role": "user", "content": "x"}] * 1025}, "input"),
    ("/tokenize", {"content": "<|im_start|>" * 30_000}, "content"),
    ("/v1/completions", {"model": "smol", "prompt": "<|im_start|>" * 30_000}, "prompt"),
    ("/v1/chat/completions", {"model": "smol", "messages": MSG, "repeat_penalty": 0}, "repeat_penalty"),
    ("/v1/messages", {"model": "smol", "max_tokens": 5, "messages": MSG, "temperature": 5}, "temperature"),
    ("/api/chat", {"model": "smol", "stream": False, "messages": [{"role": "user", "content": 0}]}, "messages[0].content"),
])
def test_each_hostile_field_is_a_400_naming_it(smol: ServerProcess, path: str, body: dict[str, Any], field: str) -> None:
    r = _post(smol, path, body)
    assert r.status_code == 400, r.text
    assert field in _error_param(path, r), r.text
    assert smol.proc.poll() is None and requests.get(f"{smol.url}/health", timeout=5).ok


def _tokens(srv: ServerProcess, text: str) -> list[int]:
    return list(_post(srv, "/tokenize", {"content": text}).json()["tokens"])


def test_every_allowed_token_banned_with_logprobs_gives_json_numbers(smol: ServerProcess) -> None:
    """The grammar allows only "a" and logit_bias bans it: the logprob arithmetic saw only -inf."""
    (a,) = _tokens(smol, "a")
    body = {"model": "smol", "prompt": "x", "max_tokens": 2, "grammar": 'root ::= "a"', "logit_bias": {str(a): -100}}
    whole = _post(smol, "/v1/completions", {**body, "logprobs": 2})
    assert whole.status_code == 200 and "NaN" not in whole.text, whole.text
    lp = whole.json()["choices"][0]["logprobs"]
    assert lp is None or all(isinstance(v, float) for v in lp["token_logprobs"])
    chat = _post(smol, "/v1/chat/completions", {**{k: v for k, v in body.items() if k != "prompt"}, "messages": MSG, "logprobs": True, "top_logprobs": 2,
                                                  "stream": True})
    assert chat.status_code == 200 and "NaN" not in chat.text and "Infinity" not in chat.text
    for line in chat.text.splitlines():
        if line.startswith("data: {"):
            json.loads(line[6:])  # strict JSON: NaN would not parse with a strict reader either
            assert '"error"' not in line, line


def test_a_row_of_banned_tokens_has_finite_logprobs() -> None:
    import numpy as np

    from ggufrun.generation import MIN_LOGPROB, _logprob_info

    row = np.full(50, -np.inf, dtype=np.float32)
    value, top = _logprob_info(row, 0.7, 3, 2)
    assert value == MIN_LOGPROB and [v for _, v in top] == [MIN_LOGPROB] * 2
    json.dumps({"v": value}, allow_nan=False)


def test_usage_counts_every_prompt_of_a_list(smol: ServerProcess) -> None:
    one = _post(smol, "/v1/completions", {"model": "smol", "prompt": "hello there", "max_tokens": 1}).json()["usage"]
    two = _post(smol, "/v1/completions", {"model": "smol", "prompt": ["hello there", "hello there"], "max_tokens": 1, "n": 2}).json()
    assert two["usage"]["prompt_tokens"] == 2 * one["prompt_tokens"] and len(two["choices"]) == 4


def test_token_id_embeddings_are_embedded_as_given(smol: ServerProcess) -> None:
    """Special tokens (0, 1, 2 are SmolLM2's) once became empty text and a zero vector, and
    [1, 2] and [2, 1] the same text."""
    data = _post(smol, "/v1/embeddings", {"model": "smol", "input": [[0], [1], [2], [1, 2], [2, 1]]}).json()["data"]
    vectors = [d["embedding"] for d in data]
    assert all(any(abs(x) > 1e-6 for x in v) for v in vectors)
    assert len({json.dumps(v) for v in vectors}) == 5


def test_a_special_token_flood_does_not_stall_the_server(smol: ServerProcess) -> None:
    """Tokenising text full of special-token strings runs off the event loop: /health answers, in well
    under the time the flood takes to tokenise (on the loop, a check would wait for all of it)."""
    import threading

    # ~180k characters: ~1.3 s to tokenise here (llama.cpp's special-token split grows with the square of the
    # length: 11,000 pairs took twice that, per route); the bound below is relative to what each request took,
    # so the longer flood proved no more than this one
    flood = "<|im_start|><|im_end|>" * 8_000
    done: list[tuple[int, float]] = []

    def send(path: str, body: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        status = _post(smol, path, body, 300).status_code
        done.append((status, time.perf_counter() - t0))

    workers = [threading.Thread(target=send, args=pb)
               for pb in (("/tokenize", {"content": flood}), ("/v1/embeddings", {"model": "smol", "input": flood}))]
    for w in workers:
        w.start()
    worst = 0.0
    while any(w.is_alive() for w in workers):
        t0 = time.perf_counter()
        assert requests.get(f"{smol.url}/health", timeout=10).ok
        worst = max(worst, time.perf_counter() - t0)
        time.sleep(0.05)
    assert sorted(s for s, _ in done) == [200, 400], done  # the embedding is over a sequence's context
    assert worst < min(2.0, min(took for _, took in done) / 2), (worst, done)


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 21, "maximum": 29}},
          "required": ["name", "age"], "additionalProperties": False}


def test_a_reply_that_stops_under_a_schema_validates_on_every_api(smol: ServerProcess) -> None:
    """The integer range is a grammar now: SmolLM2 asked for an adult's age answers 30 unconstrained."""
    import anthropic
    import ollama
    import openai

    ask = "Give me a JSON person named Tom who is 30 years old."
    oa = openai.OpenAI(base_url=f"{smol.url}/v1", api_key="x", max_retries=0, timeout=120)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    replies: list[tuple[str, str, str]] = []
    r = oa.chat.completions.create(model="smol", messages=[{"role": "user", "content": ask}], max_tokens=60, response_format=fmt)  # type: ignore[arg-type]
    replies.append(("chat", r.choices[0].message.content or "", r.choices[0].finish_reason))
    c = oa.completions.create(model="smol", prompt=ask, max_tokens=60, extra_body={"json_schema": SCHEMA})
    replies.append(("completions", c.choices[0].text, c.choices[0].finish_reason))
    resp = oa.responses.create(model="smol", input=ask, max_output_tokens=60,
                               text={"format": {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}})
    replies.append(("responses", resp.output_text, "stop" if resp.status == "completed" else "length"))
    an = anthropic.Anthropic(base_url=smol.url, api_key="x", max_retries=0, timeout=120)
    m = an.messages.create(model="smol", max_tokens=60, messages=[{"role": "user", "content": ask}],
                           extra_body={"output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}})
    replies.append(("messages", "".join(b.text for b in m.content if b.type == "text"), "stop" if m.stop_reason == "end_turn" else "length"))
    ol = ollama.Client(host=smol.url, timeout=120).chat(model="smol", messages=[{"role": "user", "content": ask}], format=SCHEMA,
                                                        options={"num_predict": 60})
    replies.append(("ollama", ol.message.content or "", "stop" if ol.done_reason == "stop" else "length"))
    stopped = [(api, text) for api, text, finish in replies if finish == "stop"]
    assert len(stopped) >= 3, replies
    for api, text in stopped:
        jsonschema.validate(json.loads(text), SCHEMA)  # raises, naming the API's reply, when it does not
    # raw control characters never reach a JSON string: Ollama's format "json" with them favoured
    ids = sorted({t for ch in "\t\n\x01\x1b" for t in _tokens(smol, ch)})
    for _ in range(2):
        out = _post(smol, "/api/generate", {"model": "smol", "prompt": "JSON please", "format": "json", "stream": False,
                                            "options": {"num_predict": 40, "temperature": 1.0, "seed": _}}).json()
        if out.get("done_reason") == "stop":
            json.loads(out["response"])
    biased = _post(smol, "/v1/chat/completions", {"model": "smol", "messages": MSG, "max_tokens": 40, "response_format": {"type": "json_object"},
                                                  "logit_bias": {str(t): 8 for t in ids}}).json()["choices"][0]
    text = biased["message"]["content"]
    assert not re.search(r"[\x00-\x1f]", text), text  # the converter's JSON whitespace is " " alone
    if biased["finish_reason"] == "stop":
        json.loads(text)
