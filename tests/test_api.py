"""The OpenAI API as real clients use it: openai-python (sync, async, stream, parse), openai-node,
langchain-openai and raw HTTP, against real `ggufrun serve` processes on loopback.

Two servers per module: SmolLM2-135M-Instruct (a real ChatML instruct model, for structured output
and plain replies) and a synthetic qwen2 model carrying Qwen2.5's tool template (random weights: a
grammar forces its tool calls, so the round trip is exercised whatever it would have said).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from serverutil import ServerProcess, serve

from ggufrun.generation import SamplingParams
from ggufrun.server import tools as T
from ggufrun.server.constraints import embed_rules, from_response_format, schema_grammar
from ggufrun.server.engine import GenRequest
from ggufrun.server.protocol import ApiError, parse_body, parse_messages

QWEN25_TOOLS_TEMPLATE = (Path(__file__).parent / "data" / "qwen2.5-tools.jinja").read_text()
ENGINE = {f.name for f in dataclasses.fields(GenRequest)} | {f.name for f in dataclasses.fields(SamplingParams)}
needs_grammar = pytest.mark.skipif("grammar" not in ENGINE, reason="the engine branch's per-sequence grammar is not merged yet")
needs_logprobs = pytest.mark.skipif("logprobs" not in ENGINE, reason="the engine branch's logprobs are not merged yet")

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server_env(tmp_path_factory: pytest.TempPathFactory, seed_amx_verdict: Callable[[Path], None]) -> dict[str, str]:
    home = tmp_path_factory.mktemp("api-home")
    seed_amx_verdict(home)
    return {"GGUFRUN_HOME": str(home), "GGUFRUN_HF_ENDPOINT": "http://127.0.0.1:9", "GGUFRUN_MS_ENDPOINT": "http://127.0.0.1:9"}


@pytest.fixture(scope="module")
def smol(smollm2_gguf: Path, server_env: dict[str, str]) -> Iterator[ServerProcess]:
    """SmolLM2 served by its path, with no --served-model-name: its id must be the file name."""
    with serve(str(smollm2_gguf), "--parallel", "4", "--n-ctx", "2048", "--threads", "1", "--temperature", "0",
               "--batch-size", "256", env=server_env) as server:
        yield server


@pytest.fixture(scope="module")
def toolsrv(tiny_model_factory: Any, server_env: dict[str, str]) -> Iterator[ServerProcess]:
    path = tiny_model_factory("qwen2", "q8_0", QWEN25_TOOLS_TEMPLATE)
    with serve(str(path), "--served-model-name", "toolmodel", "--parallel", "2", "--n-ctx", "1024", "--threads", "1",
               "--temperature", "0", env=server_env) as server:
        yield server


def client(server: ServerProcess) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def post(server: ServerProcess, path: str, body: Any) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(f"{server.url}{path}", data=data, headers={"Content-Type": "application/json"}, timeout=120)


SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"


def chat(server: ServerProcess, **body: Any) -> requests.Response:
    return post(server, "/v1/chat/completions", {"model": SMOL, "max_tokens": 8, **body})


# ---- without a server ----------------------------------------------------------------------------

def test_hostile_bodies_are_400s_not_500s() -> None:
    for raw, fragment in ((b"[" * 50_000 + b"]" * 50_000, "nested"), (b'{"a":' * 100 + b"1" + b"}" * 100, "nested deeper"),
                          (b'{"model": "\\ud800x"}', "surrogate"), (b'{"m": NaN}', "NaN"), (b"\xff\xfe", "Malformed")):
        with pytest.raises(ApiError) as err:
            parse_body(raw)
        assert err.value.status == 400 and fragment in err.value.message, raw[:40]


def test_capacity_errors_are_503_with_retry_after() -> None:
    from ggufrun.errors import ContextOverflowError
    from ggufrun.server.protocol import api_error

    full = api_error(ContextOverflowError("llama_decode failed (code 1): the KV cache is full."))
    assert full.status == 503 and full.headers["Retry-After"] == "1"
    long = api_error(ContextOverflowError("too long", n_tokens=900, n_ctx=512))
    assert long.status == 400 and long.extra == {"n_prompt_tokens": 900, "n_ctx": 512}


def test_messages_are_normalised_for_templates() -> None:
    msgs = parse_messages({"messages": [
        {"role": "developer", "content": [{"type": "text", "text": "be"}, {"type": "text", "text": "brief"}]},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21C"}]})
    assert msgs[0] == {"role": "system", "content": "be\nbrief"}
    assert msgs[2]["content"] == "" and msgs[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert msgs[3]["tool_call_id"] == "c1"
    for bad, param in (({"role": "tool", "content": "x"}, "messages[0].tool_call_id"),
                       ({"role": "user", "content": [{"type": "image_url", "image_url": {}}]}, "messages[0].content[0].image_url.url"),
                       ({"role": "user", "content": "x", "tool_calls": []}, "messages[0].tool_calls"),
                       ({"role": "assistant", "content": None}, "messages[0].content")):
        with pytest.raises(ApiError) as err:
            parse_messages({"messages": [bad]})
        assert err.value.status == 400 and err.value.param == param, bad


def test_tool_replies_parse_in_every_format_and_stream_whole_calls() -> None:
    plan = T.parse_tools({"tools": [WEATHER, TIME]})
    assert plan is not None and plan.choice == "auto"
    plan.fmt = "qwen"
    content, calls = T.parse_reply(plan, 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    assert content == "Sure." and [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert T.parse_reply(plan, "no call here") == ("no call here", [])
    assert T.parse_reply(plan, '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>')[1] == []  # not a tool offered
    plan.fmt = "llama3"
    assert T.parse_reply(plan, '{"name": "get_time", "parameters": {}}')[1][0]["function"]["name"] == "get_time"
    plan.fmt = "generic"
    assert len(T.parse_reply(plan, '{"tool_calls": [{"name": "get_time", "arguments": {}}, '
                                   '{"name": "get_weather", "arguments": {"city": "x"}}]}')[1]) == 2
    plan.parallel = False
    assert len(T.parse_reply(plan, '{"tool_calls": [{"name": "get_time", "arguments": {}}, '
                                   '{"name": "get_weather", "arguments": {"city": "x"}}]}')[1]) == 1
    plan.fmt, plan.parallel = "qwen", True
    stream = T.ToolStream(plan)
    text = 'ok <tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    events = [e for ch in text for e in stream.feed(ch)] + stream.finish()
    assert "".join(v for k, v in events if k == "content") == "ok " and [k for k, _ in events][-1] == "call"
    assert not any("<tool" in v for k, v in events if k == "content")  # the tag never leaks as content
    # incremental: the name first, then the arguments as they are written, never the call's own "}"
    stream = T.ToolStream(plan, incremental=True)
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "P}aris", "x": {}}}\n</tool_call>'
    events = [e for ch in text for e in stream.feed(ch)] + stream.finish()
    assert events[0][0] == "call_start" and events[0][1]["function"]["name"] == "get_weather"
    fragments = [v for k, v in events if k == "args"]
    assert len(fragments) > 10 and json.loads("".join(fragments)) == {"city": "P}aris", "x": {}}


def test_tool_choice_becomes_a_grammar_and_bad_tools_are_400() -> None:
    plan = T.parse_tools({"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                          "parallel_tool_calls": False})
    assert plan is not None and plan.forced == "get_weather"
    plan.fmt = "qwen"
    gbnf = T.grammar(plan)
    assert gbnf is not None and gbnf.startswith('root ::= "<tool_call>\\n" tc-root "\\n</tool_call>"\n') and "get_time" not in gbnf
    assert T.grammar(T.parse_tools({"tools": [WEATHER]})) is None  # auto: the model decides
    for body, param in (({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
                        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
                        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
                        ({"tool_choice": "required"}, "tool_choice"),
                        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls")):
        with pytest.raises(ApiError) as err:
            T.parse_tools(body)
        assert err.value.status == 400 and err.value.param == param, body


def test_response_format_converts_or_is_refused() -> None:
    schema, param = from_response_format({"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}})
    grammar = schema_grammar(schema, param)
    assert schema == PERSON and "root ::=" in grammar and '"\\"age\\""' in grammar
    assert from_response_format({"type": "text"})[0] is None
    for fmt, param in (({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}},
                        "response_format.json_schema.schema"),
                       ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "http://example.com/s"}}},
                        "response_format.json_schema.schema"),
                       ({"type": "xml"}, "response_format.type"),
                       ({"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}}, "response_format.json_schema.name")):
        with pytest.raises(ApiError) as err:
            schema_grammar(*from_response_format(fmt))
        assert err.value.status == 400 and err.value.param == param, fmt
    rules, root = embed_rules('root ::= "{" space x "}"\nx ::= [a-z] | "root"\nspace ::= " "?', "p")
    assert root == "p-root" and 'p-root ::= "{" p-space p-x "}"' in rules and 'p-x ::= [a-z] | "root"' in rules


# ---- the server: no silent ignoring ----------------------------------------------------------------

def test_every_unhonoured_field_is_a_400_naming_it(smol: ServerProcess) -> None:
    import openai

    cases = [({"frobnicate": 1}, "frobnicate"), ({"audio": {"voice": "x"}}, "audio"), ({"functions": []}, "functions"),
             ({"reasoning_effort": "high"}, "reasoning_effort"), ({"store": True}, "store"), ({"modalities": ["audio"]}, "modalities"),
             ({"n": 0}, "n"), ({"top_logprobs": 2}, "top_logprobs"), ({"stream_options": {"include_usage": True}}, "stream_options"),
             ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
              "response_format.json_schema.schema"),
             ({"tool_choice": "required"}, "tool_choice"), ({"logit_bias": {"abc": 1}}, "logit_bias"),
             ({"presence_penalty": 3}, "presence_penalty"),
             # llama-server's per-request draft bounds, on a model served without a drafter: nothing to bound
             ({"speculative.n_max": 4}, "speculative.n_max"), ({"speculative.n_min": 1}, "speculative.n_min"),
             ({"speculative.p_min": 0.5}, "speculative.p_min"),
             ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content[0].image_url.url")]
    for extra, param in cases:
        r = chat(smol, messages=[{"role": "user", "content": "hi"}], **extra) if "messages" not in extra else chat(smol, **extra)
        assert r.status_code == 400, (extra, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", (extra, error)
    for path, body, param in (("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
                              ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
                              ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
                              ("/v1/embeddings", {"input": "x", "dimensions": 8}, "dimensions"),
                              ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, "encoding_format")):
        r = post(smol, path, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, body, r.text)
    with pytest.raises(openai.BadRequestError):  # what SDK users catch
        client(smol).chat.completions.create(model=SMOL, messages=[{"role": "user", "content": "hi"}], temperature=-1)
    # speculative.n_max 0 asks for no drafts, which a server without a drafter honours
    assert chat(smol, messages=[{"role": "user", "content": "hi"}], max_tokens=1, **{"speculative.n_max": 0}).status_code == 200


def test_hostile_requests_get_400_404_405_json(smol: ServerProcess) -> None:
    deep = b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    assert post(smol, "/v1/chat/completions", deep).status_code == 400
    r = post(smol, "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"
    r = chat(smol, model="m" * 5000, messages=[{"role": "user", "content": "hi"}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    # another file with the served file's base name, or the same file by a path: not a served name
    for probe in (f"/etc/{SMOL}", f"../{SMOL}", f"/nonexistent/dir/{SMOL}"):
        r = chat(smol, model=probe, messages=[{"role": "user", "content": "hi"}])
        assert r.status_code == 404 and r.json()["error"]["param"] == "model", probe
    r = requests.get(f"{smol.url}/v1/nope", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = requests.get(f"{smol.url}/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and "error" in r.json()
    assert chat(smol, messages=[{"role": "user", "content": "still fine"}]).status_code == 200


def test_ids_health_and_logs_reveal_no_paths(smol: ServerProcess, smollm2_gguf: Path) -> None:
    models = requests.get(f"{smol.url}/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == [SMOL] and str(smollm2_gguf.parent) not in json.dumps(models)
    assert client(smol).models.retrieve(SMOL).id == SMOL
    assert requests.get(f"{smol.url}/v1/models/etc/{SMOL}", timeout=10).status_code == 404
    health = requests.get(f"{smol.url}/health", timeout=10).text
    assert str(smollm2_gguf.parent) not in health and SMOL in health
    # a percent-encoded newline in the path must not start a forged log line
    with socket.create_connection(("127.0.0.1", smol.port), timeout=10) as s:
        s.sendall(b"GET /x%0aFORGED-LINE HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert b"404" in s.recv(4096)
    r = post(smol, "/", {"prompt": "hi\nFORGED-SEED-LINE", "max_tokens": 2})
    assert r.status_code == 200
    log_lines = smol.log().splitlines()
    assert not any(line.startswith("FORGED") for line in log_lines), smol.log()[-2000:]
    assert any("FORGED-LINE" in line for line in log_lines)  # logged, escaped, on its own request's line


def test_disconnect_mid_body_is_logged_not_500(smol: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", smol.port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"messages\": [")
    for _ in range(50):
        if "disconnected while sending the body" in smol.log():
            break
        asyncio.run(asyncio.sleep(0.1))
    assert "disconnected while sending the body" in smol.log()
    assert "Traceback" not in smol.log()


# ---- the server: message shapes, n, prompts, usage, timings, embeddings --------------------------------

def test_content_parts_tool_round_trip_and_prefill_render(smol: ServerProcess) -> None:
    parts = chat(smol, messages=[{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}])
    plain = chat(smol, messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert parts.status_code == plain.status_code == 200
    assert parts.json()["choices"][0]["message"]["content"] == plain.json()["choices"][0]["message"]["content"]
    loop = chat(smol, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'}], tools=[WEATHER], max_tokens=1)
    assert loop.status_code == 200, loop.text
    # prefill: the reply continues the assistant's text instead of starting a new turn
    # one token each: the loop's and the prefill's checks read the status and the prompt, not the reply
    opened = chat(smol, messages=[{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "My favourite colour is"}],
                  max_tokens=1)
    fresh = chat(smol, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=1)
    assert opened.status_code == 200
    assert opened.json()["usage"]["prompt_tokens"] > fresh.json()["usage"]["prompt_tokens"]


def test_n_choices_prompt_lists_usage_and_timings(smol: ServerProcess) -> None:
    body = {"messages": [{"role": "user", "content": "Tell me a word."}], "n": 3, "temperature": 1.0, "seed": 7, "max_tokens": 6}
    r = chat(smol, **body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in data["choices"]}) > 1  # n choices from one seed still differ
    assert data["usage"]["completion_tokens"] >= 3
    comp = post(smol, "/v1/completions", {"model": SMOL, "prompt": ["The sky is", "Water is"], "max_tokens": 4})
    assert comp.status_code == 200 and [c["index"] for c in comp.json()["choices"]] == [0, 1]
    one = post(smol, "/v1/completions", {"model": SMOL, "prompt": "The sky is", "max_tokens": 4}).json()
    assert comp.json()["choices"][0]["text"] == one["choices"][0]["text"]
    timings = one["timings"]
    assert timings["predicted_n"] == one["usage"]["completion_tokens"] and timings["prompt_n"] + timings["cache_n"] == one["usage"]["prompt_tokens"]
    # usage in a stream only when asked (include_usage), and then in its own final chunk
    oa = client(smol)
    chunks = list(oa.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True,
                                             stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])
    chunks = list(oa.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True))
    assert chunks[-1].choices and chunks[-1].choices[0].finish_reason in ("stop", "length")
    streamed_n = list(oa.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, n=2,
                                                 stream=True))
    assert {c.choices[0].index for c in streamed_n if c.choices} == {0, 1}


def test_long_inputs_are_refused_not_cut(smol: ServerProcess) -> None:
    # a text goes through in chunks of the steps' batches, so the limit is a sequence's context
    r = post(smol, "/v1/embeddings", {"model": SMOL, "input": "word " * 2100})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"] and r.json()["error"]["param"] == "input"
    r = chat(smol, messages=[{"role": "user", "content": "word " * 2100}])
    assert r.status_code == 400 and r.json()["error"]["n_ctx"] == 2048


def test_embeddings_base64_and_token_input(smol: ServerProcess) -> None:
    oa = client(smol)
    floats = post(smol, "/v1/embeddings", {"model": SMOL, "input": "The quick brown fox"}).json()["data"][0]["embedding"]
    b64 = post(smol, "/v1/embeddings", {"model": SMOL, "input": "The quick brown fox", "encoding_format": "base64"}).json()
    raw = base64.b64decode(b64["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(decoded) == len(floats) == 576 and max(abs(a - b) for a, b in zip(decoded, floats)) < 1e-6
    assert oa.embeddings.create(model=SMOL, input="The quick brown fox").data[0].embedding == pytest.approx(floats, abs=1e-6)
    by_ids = post(smol, "/v1/embeddings", {"model": SMOL, "input": [[504, 2365, 6354, 16438]]})
    assert by_ids.status_code == 200 and len(by_ids.json()["data"][0]["embedding"]) == 576
    r = post(smol, "/v1/embeddings", {"model": SMOL, "input": [[10**7]]})
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]


def test_openai_node_sdk_embeddings_and_stream(smol: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> None:
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.skip("npm/node not installed")
    cache = Path(os.environ.get("GGUFRUN_TEST_CACHE", Path.home() / ".cache" / "ggufrun-tests")) / "node-openai"
    if not (cache / "node_modules" / "openai").exists():
        cache.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([npm, "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(cache), "openai@6"],
                              check=False, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            pytest.skip(f"npm install openai failed (offline?): {proc.stderr[-300:]}")
    script = tmp_path_factory.mktemp("node") / "check.mjs"
    script.write_text(f"""
import OpenAI from {json.dumps(str(cache / 'node_modules' / 'openai' / 'index.mjs'))};
const c = new OpenAI({{baseURL: process.argv[2] + "/v1", apiKey: "x", maxRetries: 0}});
const e = await c.embeddings.create({{model: {json.dumps(SMOL)}, input: "The quick brown fox"}});
const v = e.data[0].embedding;
let text = "";
const stream = await c.chat.completions.create({{model: {json.dumps(SMOL)}, messages: [{{role: "user", content: "Hi"}}],
  max_tokens: 5, stream: true, stream_options: {{include_usage: true}}}});
let usage = null;
for await (const chunk of stream) {{ if (chunk.choices[0]) text += chunk.choices[0].delta.content || ""; if (chunk.usage) usage = chunk.usage; }}
console.log(JSON.stringify({{dims: v.length, norm: Math.sqrt(v.reduce((a, x) => a + x * x, 0)), text, usage}}));
""")
    proc = subprocess.run(["node", str(script), smol.url], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["dims"] == 576 and abs(out["norm"] - 1.0) < 1e-3  # was 144 zeros when base64 was ignored
    assert out["text"] and out["usage"]["completion_tokens"] >= 1


# ---- tools on a tool-capable template ----------------------------------------------------------------

def test_tools_reach_the_gguf_template(toolsrv: ServerProcess) -> None:
    msgs = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
    without = post(toolsrv, "/v1/chat/completions", {"messages": msgs, "max_tokens": 1})
    with_tools = post(toolsrv, "/v1/chat/completions", {"messages": msgs, "max_tokens": 1, "tools": [WEATHER]})
    assert with_tools.status_code == 200, with_tools.text
    assert with_tools.json()["usage"]["prompt_tokens"] > without.json()["usage"]["prompt_tokens"] + 40
    none = post(toolsrv, "/v1/chat/completions", {"messages": msgs, "max_tokens": 1, "tools": [WEATHER], "tool_choice": "none"})
    assert none.json()["usage"]["prompt_tokens"] == without.json()["usage"]["prompt_tokens"]


@needs_grammar
def test_forced_tool_call_round_trip_with_openai_sdk(toolsrv: ServerProcess) -> None:
    oa = client(toolsrv)
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
    r = oa.chat.completions.create(model="toolmodel", messages=msgs, tools=[WEATHER, TIME], tool_choice="required",
                                   parallel_tool_calls=False, max_tokens=300)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1, choice
    call = choice.message.tool_calls[0]
    assert call.function.name in ("get_weather", "get_time") and isinstance(json.loads(call.function.arguments), dict)
    named = oa.chat.completions.create(model="toolmodel", messages=msgs, tools=[WEATHER, TIME], max_tokens=300,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    args = json.loads(named.choices[0].message.tool_calls[0].function.arguments)
    assert named.choices[0].message.tool_calls[0].function.name == "get_weather" and isinstance(args["city"], str)
    msgs += [named.choices[0].message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": named.choices[0].message.tool_calls[0].id, "content": '{"temp_c": 21}'}]
    follow = oa.chat.completions.create(model="toolmodel", messages=msgs, tools=[WEATHER], max_tokens=5, tool_choice="none")
    assert follow.choices[0].message.tool_calls is None
    # streamed: index, id and name first, then argument fragments that join to the same JSON
    stream = oa.chat.completions.create(model="toolmodel", messages=msgs[:1], tools=[WEATHER], max_tokens=300, stream=True,
                                        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    deltas = [c.choices[0] for c in stream if c.choices]
    calls = [tc for d in deltas for tc in (d.delta.tool_calls or [])]
    assert calls[0].id and calls[0].function.name == "get_weather" and all(tc.index == 0 for tc in calls)
    assert isinstance(json.loads("".join(tc.function.arguments or "" for tc in calls))["city"], str)
    assert deltas[-1].finish_reason == "tool_calls"


@needs_grammar
def test_langchain_bind_tools(toolsrv: ServerProcess) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(model="toolmodel", base_url=f"{toolsrv.url}/v1", api_key="x", max_tokens=300, max_retries=0)
    msg = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Paris?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"


# ---- structured output on the real model -------------------------------------------------------------

@needs_grammar
def test_json_schema_output_validates_streamed_or_not(smol: ServerProcess) -> None:
    import jsonschema
    from pydantic import BaseModel

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}}
    msgs = [{"role": "user", "content": "Describe a person as JSON."}]
    r = chat(smol, messages=msgs, response_format=fmt, max_tokens=60)
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), PERSON)
    text = "".join(c.choices[0].delta.content or "" for c in client(smol).chat.completions.create(
        model=SMOL, messages=msgs, response_format=fmt, max_tokens=60, stream=True) if c.choices)
    jsonschema.validate(json.loads(text), PERSON)
    # greedy and room to finish: a sampled string could run past a small max_tokens, cut (finish_reason
    # "length") before the object closes, as OpenAI's own json_object replies can be
    small = [{"role": "user", "content": 'Reply with the JSON object {"ok": true} and nothing else.'}]
    r = chat(smol, messages=small, response_format={"type": "json_object"}, max_tokens=100, temperature=0)
    assert r.json()["choices"][0]["finish_reason"] == "stop", r.text
    assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"]), dict)
    r = post(smol, "/v1/completions", {"model": SMOL, "prompt": "Answer: ", "grammar": 'root ::= "YES" | "NO"', "max_tokens": 4})
    assert r.json()["choices"][0]["text"] in ("YES", "NO")
    bad = post(smol, "/v1/completions", {"model": SMOL, "prompt": "x", "grammar": 'root ::= ("unclosed'})
    assert bad.status_code == 400, bad.text

    class Person(BaseModel):
        name: str
        age: int

    parsed = client(smol).chat.completions.parse(model=SMOL, messages=msgs, response_format=Person, max_tokens=60)
    assert isinstance(parsed.choices[0].message.parsed, Person)


@needs_grammar
def test_async_client_and_langchain_structured_output(smol: ServerProcess) -> None:
    import openai
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        country: str

    async def run() -> list[Any]:
        oa = openai.AsyncOpenAI(base_url=f"{smol.url}/v1", api_key="x", max_retries=0)
        return list(await asyncio.gather(*(oa.chat.completions.parse(
            model=SMOL, messages=[{"role": "user", "content": f"A city, number {i}."}], response_format=City, max_tokens=60)
            for i in range(3))))

    assert all(isinstance(r.choices[0].message.parsed, City) for r in asyncio.run(run()))
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(model=SMOL, base_url=f"{smol.url}/v1", api_key="x", max_tokens=60, max_retries=0)
    assert isinstance(llm.with_structured_output(City, method="json_schema").invoke("Name a city."), City)


@needs_logprobs
def test_logprobs_chat_and_completions(smol: ServerProcess) -> None:
    import math

    r = client(smol).chat.completions.create(model=SMOL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                             logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert content and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob
    assert math.isclose(content[0].logprob, content[0].top_logprobs[0].logprob, abs_tol=1e-4)  # greedy picks the top one
    comp = post(smol, "/v1/completions", {"model": SMOL, "prompt": "The sky is", "max_tokens": 3, "logprobs": 2}).json()
    lp = comp["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == 3 and all(len(t) <= 2 for t in lp["top_logprobs"])
    streamed = [c for c in client(smol).chat.completions.create(model=SMOL, messages=[{"role": "user", "content": "Hi"}],
                                                                max_tokens=3, logprobs=True, stream=True) if c.choices]
    assert sum(len(c.choices[0].logprobs.content) for c in streamed if c.choices[0].logprobs) == 3


def test_penalties_logit_bias_and_seed_take_effect(smol: ServerProcess) -> None:
    # 12 tokens: a penalty moves the reply at its first token here (the prompt's "\n" is penalised too)
    prompt = {"model": SMOL, "prompt": "List the colours of the rainbow, one per line:\n", "max_tokens": 12, "temperature": 0}
    base = post(smol, "/v1/completions", prompt).json()["choices"][0]["text"]
    for field in ("presence_penalty", "frequency_penalty"):
        changed = post(smol, "/v1/completions", {**prompt, field: 2.0}).json()["choices"][0]["text"]
        assert changed != base, field
    biased = post(smol, "/v1/completions", {**prompt, "max_tokens": 3, "logit_bias": {"504": 100}}).json()["choices"][0]["text"]
    assert biased and biased == biased[: len(biased) // 3] * 3  # the one boosted token, three times
    seeded = {**prompt, "temperature": 1.0, "seed": 11, "max_tokens": 12}
    assert post(smol, "/v1/completions", seeded).json()["choices"][0]["text"] == \
        post(smol, "/v1/completions", seeded).json()["choices"][0]["text"]


@needs_grammar
def test_required_tool_call_on_a_template_without_tools(smol: ServerProcess) -> None:
    """SmolLM2's template knows no tools: they go into the system message in the generic JSON
    form, and the grammar makes even a 135M model answer with a valid call."""
    import jsonschema

    r = chat(smol, messages=[{"role": "user", "content": "What is the weather like in Paris?"}], tools=[WEATHER],
             tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=80)
    # one call, greedily: with parallel calls allowed a sampled 135M model may repeat the call past max_tokens
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
