"""The other APIs clients speak, end to end: a real `ggufrun serve` on loopback driven by the real
`anthropic`, `ollama` and `openai` (Responses) packages, plus llama-server's token routes.

SmolLM2-135M-Instruct (ChatML) answers where text matters; the tiny synthetic model serves the
auth checks. Greedy sampling (top_k 1) makes a streamed and a whole reply comparable."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from serverutil import ServerProcess, serve

from ggufrun.server.translate import supports

anthropic = pytest.importorskip("anthropic")
ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")

GREEDY = {"temperature": 0.0, "top_k": 1}
# anthropic >= 2 no longer has sampling arguments; the Messages API still takes them in the body.
CLAUDE_GREEDY = {"extra_body": GREEDY}


@pytest.fixture(scope="module")
def server_env(tmp_path_factory: pytest.TempPathFactory, seed_amx_verdict: Callable[[Path], None]) -> dict[str, str]:
    home = tmp_path_factory.mktemp("apis-home")
    seed_amx_verdict(home)
    return {"GGUFRUN_HOME": str(home), "GGUFRUN_HF_ENDPOINT": "http://127.0.0.1:9", "GGUFRUN_MS_ENDPOINT": "http://127.0.0.1:9"}


@pytest.fixture(scope="module")
def smol(smollm2_gguf: Path, server_env: dict[str, str]) -> Iterator[ServerProcess]:
    with serve(str(smollm2_gguf), "--served-model-name", "smol", "--parallel", "2", "--n-ctx", "2048", "--threads", "1",
               env=server_env) as server:
        yield server


@pytest.fixture(scope="module")
def keyed(tiny_model: Path, server_env: dict[str, str]) -> Iterator[ServerProcess]:
    with serve(str(tiny_model), "--served-model-name", "tiny", "--n-ctx", "256", "--threads", "1", "--api-key", "sekret",
               env=server_env) as server:
        yield server


def claude(server: ServerProcess, api_key: str = "unused") -> Any:
    return anthropic.Anthropic(base_url=server.url, api_key=api_key, max_retries=0, timeout=60)


def llama(server: ServerProcess, **headers: str) -> Any:
    return ollama.Client(host=server.url, timeout=60, headers=headers or None)


def oai(server: ServerProcess) -> Any:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def post(server: ServerProcess, path: str, body: Any) -> requests.Response:
    return requests.post(f"{server.url}{path}", json=body, timeout=60)


HI = [{"role": "user", "content": "Name three colours."}]
ASK = "What is the weather like in Paris?"
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"], "additionalProperties": False}
needs_tools = pytest.mark.skipif(not supports("tools"), reason="the chat pipeline has no tool calling in this build")


# ---- Anthropic Messages --------------------------------------------------------------------------

def test_anthropic_create_stream_and_count_agree(smol: ServerProcess) -> None:
    c = claude(smol)
    whole = c.messages.create(model="smol", max_tokens=8, messages=HI, system="Be brief.", **CLAUDE_GREEDY)
    assert whole.type == "message" and whole.role == "assistant" and whole.model == "smol"
    assert whole.content[0].type == "text" and whole.content[0].text
    assert whole.stop_reason in ("end_turn", "max_tokens")
    assert 0 < whole.usage.output_tokens <= 8

    with c.messages.stream(model="smol", max_tokens=8, messages=HI, system="Be brief.", **CLAUDE_GREEDY) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1, "the reply streamed in several deltas"
    assert "".join(pieces) == final.content[0].text == whole.content[0].text
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.stop_reason == whole.stop_reason

    counted = c.messages.count_tokens(model="smol", messages=HI, system="Be brief.")
    assert counted.input_tokens == whole.usage.input_tokens == final.usage.input_tokens > 5
    prefilled = [*HI, {"role": "assistant", "content": "The three colours are"}]  # the reply continues this text
    counted = c.messages.count_tokens(model="smol", messages=prefilled)
    assert counted.input_tokens == c.messages.create(model="smol", max_tokens=1, messages=prefilled).usage.input_tokens


def test_anthropic_stop_sequences_and_history(smol: ServerProcess) -> None:
    c = claude(smol)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Count from one to ten in words, comma separated."}]}]
    free = c.messages.create(model="smol", max_tokens=12, messages=messages, **CLAUDE_GREEDY).content[0].text
    words = free.split()
    assert len(words) >= 4, free
    stop = f" {words[3]}"
    cut = c.messages.create(model="smol", max_tokens=24, messages=messages, stop_sequences=["never", stop], **CLAUDE_GREEDY)
    assert cut.content[0].text == free[: free.index(stop)]
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)
    with c.messages.stream(model="smol", max_tokens=24, messages=messages, stop_sequences=[stop], **CLAUDE_GREEDY) as s:
        final = s.get_final_message()
    assert (final.stop_reason, final.stop_sequence, final.content[0].text) == ("stop_sequence", stop, cut.content[0].text)
    ended = c.messages.create(model="smol", max_tokens=12, messages=messages, stop_sequences=["never"], **CLAUDE_GREEDY)
    assert (ended.stop_reason, ended.stop_sequence) in (("end_turn", None), ("max_tokens", None))  # the template's own stop is no stop sequence
    # A prior assistant turn given as content blocks is part of the prompt.
    longer = [*messages, {"role": "assistant", "content": [{"type": "text", "text": free}]}, {"role": "user", "content": "Again."}]
    assert c.messages.count_tokens(model="smol", messages=longer).input_tokens > c.messages.count_tokens(model="smol", messages=messages).input_tokens


def test_anthropic_refusals_are_anthropic_errors(smol: ServerProcess) -> None:
    c = claude(smol)
    with pytest.raises(anthropic.BadRequestError) as info:
        c.messages.create(model="smol", max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}])
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "invalid_request_error"
    assert "image" in info.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError, match="thinking"):
        c.messages.create(model="smol", max_tokens=4, messages=HI, thinking={"type": "enabled", "budget_tokens": 1024})
    with pytest.raises(anthropic.BadRequestError, match="budget_tokens"):  # (as Anthropic: disabled takes no budget)
        c.messages.create(model="smol", max_tokens=4, messages=HI, thinking={"type": "disabled", "budget_tokens": 8})
    with pytest.raises(anthropic.NotFoundError) as missing:
        c.messages.create(model="nope", max_tokens=4, messages=HI)
    assert missing.value.body["error"]["type"] == "not_found_error"
    raw = post(smol, "/v1/messages", {"model": "smol", "messages": HI})  # max_tokens is required
    assert raw.status_code == 400 and raw.json()["error"]["message"].startswith("'max_tokens'")
    assert post(smol, "/v1/messages", {"model": "smol", "max_tokens": 4, "messages": HI, "bogus": 1}).status_code == 400
    tools = [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    if not supports("tools"):
        with pytest.raises(anthropic.BadRequestError, match="tools"):
            c.messages.create(model="smol", max_tokens=4, messages=HI, tools=tools)


@needs_tools
def test_anthropic_forced_tool_use_and_result_round_trip(smol: ServerProcess) -> None:
    """The grammar behind tool_choice makes even a 135M model answer with a valid tool_use block."""
    c = claude(smol)
    tools = [{"name": "get_weather", "description": "Current weather in a city", "input_schema": CITY}]
    forced = {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    # greedy: the streamed reply below must be this one
    reply = c.messages.create(model="smol", max_tokens=100, messages=[{"role": "user", "content": ASK}], tools=tools, tool_choice=forced,
                              extra_body={"temperature": 0})
    assert reply.stop_reason == "tool_use", reply
    use = [b for b in reply.content if b.type == "tool_use"][0]
    assert use.name == "get_weather" and isinstance(use.input["city"], str) and use.id
    assert len([b for b in reply.content if b.type == "tool_use"]) == 1
    with c.messages.stream(model="smol", max_tokens=100, messages=[{"role": "user", "content": ASK}], tools=tools, tool_choice=forced,
                           extra_body={"temperature": 0}) as s:
        final = s.get_final_message()
    streamed_use = [b for b in final.content if b.type == "tool_use"][0]
    assert streamed_use.name == "get_weather" and streamed_use.input == use.input and final.stop_reason == "tool_use"
    history = [{"role": "user", "content": ASK}, {"role": "assistant", "content": [use.model_dump()]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 21 C"}]}]
    answer = c.messages.create(model="smol", max_tokens=2, messages=history, tools=tools)  # the round trip renders: a token shows it
    assert answer.content and answer.stop_reason in ("end_turn", "max_tokens", "tool_use")
    more = c.messages.count_tokens(model="smol", messages=history, tools=tools).input_tokens
    assert more > c.messages.count_tokens(model="smol", messages=history).input_tokens, "tools are part of the counted prompt"


# ---- Ollama ----------------------------------------------------------------------------------------

def test_ollama_chat_whole_and_streamed(smol: ServerProcess) -> None:
    c = llama(smol)
    options = {**GREEDY, "num_predict": 8}
    whole = c.chat(model="smol", messages=HI, options=options)
    assert whole.done and whole.message.role == "assistant" and whole.message.content
    assert whole.done_reason in ("stop", "length") and 0 < whole.eval_count <= 8 and whole.prompt_eval_count > 5
    assert whole.total_duration >= whole.eval_duration > 0
    parts = list(c.chat(model="smol:latest", messages=HI, options=options, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done and len(parts) > 2
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count


def test_ollama_generate(smol: ServerProcess) -> None:
    c = llama(smol)
    whole = c.generate(model="smol", prompt="Name three colours.", system="Be brief.", options={**GREEDY, "num_predict": 6})
    assert whole.done and whole.response and whole.eval_count <= 6
    parts = list(c.generate(model="smol", prompt="Name three colours.", system="Be brief.", options={**GREEDY, "num_predict": 6}, stream=True))
    assert "".join(p.response for p in parts) == whole.response
    loaded = c.generate(model="smol")  # what `ollama run` sends first: load, generate nothing
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""


def test_ollama_models_show_ps_version(smol: ServerProcess) -> None:
    c = llama(smol)
    listed = c.list().models
    assert [m.model for m in listed] == ["smol"]
    assert listed[0].details.quantization_level == "Q4_1" and listed[0].details.family == "llama"
    assert listed[0].size > 50_000_000
    shown = c.show("smol")
    assert "<|im_start|>" in shown.template and shown.modelinfo["general.architecture"] == "llama"
    assert "completion" in shown.capabilities and shown.details.parameter_size == "135M"
    assert "/" not in json.dumps(shown.modelinfo.get("general.name", "")), "no file paths leak"
    c.chat(model="smol", messages=HI, options={"num_predict": 1})
    running = c.ps().models
    assert [m.model for m in running] == ["smol"] and running[0].context_length and running[0].context_length > 0
    assert requests.get(f"{smol.url}/api/version", timeout=10).json()["version"]


def test_ollama_embed(smol: ServerProcess) -> None:
    c = llama(smol)
    out = c.embed(model="smol", input=["red", "a longer sentence about the sea"])
    assert len(out.embeddings) == 2 and len(out.embeddings[0]) == 576  # SmolLM2-135M's n_embd
    assert math.isclose(sum(x * x for x in out.embeddings[1]), 1.0, rel_tol=1e-3)
    assert out.prompt_eval_count > 2
    legacy = c.embeddings(model="smol", prompt="red")
    assert legacy.embedding == pytest.approx(out.embeddings[0], abs=1e-4)


def test_ollama_refusals(smol: ServerProcess) -> None:
    c = llama(smol)
    with pytest.raises(ollama.ResponseError) as info:
        c.chat(model="smol", messages=HI, options={"num_ctx": 8192})
    assert info.value.status_code == 400 and "num_ctx" in info.value.error
    with pytest.raises(ollama.ResponseError) as missing:
        c.chat(model="nope", messages=HI)
    assert missing.value.status_code == 404
    with pytest.raises(ollama.ResponseError, match="images"):
        c.chat(model="smol", messages=[{"role": "user", "content": "what is this", "images": [b"\x89PNG"]}])
    with pytest.raises(ollama.ResponseError, match="think"):
        c.chat(model="smol", messages=HI, think=True)
    with pytest.raises(ollama.ResponseError, match="dimensions"):
        c.embed(model="smol", input="red", dimensions=8)
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"],
              "additionalProperties": False}
    if supports("response_format"):
        reply = c.chat(model="smol", messages=HI, format=schema, options={"num_predict": 60})
        assert reply.done_reason == "stop" and json.loads(reply.message.content)["colour"] in ("red", "green", "blue")
    else:
        with pytest.raises(ollama.ResponseError, match="format") as fmt:
            c.chat(model="smol", messages=HI, format=schema)
        assert fmt.value.status_code == 400
    bad = post(smol, "/api/chat", {"model": "smol", "messages": HI, "stream": False, "keep_alive": "soon"})
    assert bad.status_code == 400 and "keep_alive" in bad.json()["error"]


def test_logprobs_through_ollama_and_responses(smol: ServerProcess) -> None:
    whole = llama(smol).chat(model="smol", messages=HI, logprobs=True, top_logprobs=2, options={**GREEDY, "num_predict": 4})
    assert whole.logprobs and len(whole.logprobs) == whole.eval_count
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in whole.logprobs)
    assert whole.logprobs[0].top_logprobs[0].token == whole.logprobs[0].token, "greedy picks the most likely token"
    parts = list(llama(smol).chat(model="smol", messages=HI, logprobs=True, options={**GREEDY, "num_predict": 4}, stream=True))
    assert [t.token for p in parts for t in (p.logprobs or [])] == [t.token for t in whole.logprobs]
    reply = oai(smol).responses.create(model="smol", input="Name three colours.", max_output_tokens=4, top_logprobs=1,
                                       include=["message.output_text.logprobs"], temperature=0)
    entries = reply.output[0].content[0].logprobs
    assert len(entries) == reply.usage.output_tokens and "".join(e.token for e in entries) == reply.output_text


def test_ollama_tool_round_trip_renders(smol: ServerProcess) -> None:
    """An assistant turn with tool_calls and the tool's reply (matched by name) reach the prompt."""
    c = llama(smol)
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": CITY}}
    history = [{"role": "user", "content": ASK},
               {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "content": "Sunny, 21 C", "tool_name": "get_weather"}]
    reply = c.chat(model="smol", messages=history, tools=[tool], options={"num_predict": 1})  # the prompt's count is what is checked
    assert reply.done and reply.prompt_eval_count > c.chat(model="smol", messages=history[:1], options={"num_predict": 1}).prompt_eval_count


# ---- OpenAI Responses ------------------------------------------------------------------------------

def test_responses_whole_and_streamed(smol: ServerProcess) -> None:
    c = oai(smol)
    whole = c.responses.create(model="smol", input="Name three colours.", instructions="Be brief.", max_output_tokens=8,
                               temperature=0, extra_body={"top_k": 1})
    assert whole.object == "response" and whole.output_text and whole.output[0].type == "message"
    assert whole.status in ("completed", "incomplete") and 0 < whole.usage.output_tokens <= 8
    if whole.status == "incomplete":
        assert whole.incomplete_details.reason == "max_output_tokens"
    events = list(c.responses.create(model="smol", input=[{"role": "user", "content": [{"type": "input_text", "text": "Name three colours."}]}],
                                     instructions="Be brief.", max_output_tokens=8, temperature=0, stream=True, extra_body={"top_k": 1}))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text == whole.output_text
    assert events[-1].response.usage.input_tokens == whole.usage.input_tokens


def test_responses_refusals(smol: ServerProcess) -> None:
    c = oai(smol)
    with pytest.raises(openai.BadRequestError, match="store"):
        c.responses.create(model="smol", input="hi", store=True)
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        c.responses.create(model="smol", input="hi", previous_response_id="resp_1")
    with pytest.raises(openai.BadRequestError, match="web_search"):
        c.responses.create(model="smol", input="hi", tools=[{"type": "web_search"}])
    with pytest.raises(openai.BadRequestError, match="does not see images") as no_eyes:  # a text model (tests/test_vision.py: a vision one)
        c.responses.create(model="smol", input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}])
    assert no_eyes.value.body["param"] == "input[0].content[0].image_url"
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="nope", input="hi")
    if not supports("tools"):
        tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}
        with pytest.raises(openai.BadRequestError, match="tools"):
            c.responses.create(model="smol", input="hi", tools=[tool])


@needs_tools
def test_responses_function_call_and_output_round_trip(smol: ServerProcess) -> None:
    c = oai(smol)
    tool = {"type": "function", "name": "get_weather", "description": "Current weather in a city", "parameters": CITY, "strict": True}
    forced = {"type": "function", "name": "get_weather"}
    whole = c.responses.create(model="smol", input=ASK, tools=[tool], tool_choice=forced, parallel_tool_calls=False, max_output_tokens=100,
                             temperature=0)
    calls = [o for o in whole.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and isinstance(json.loads(calls[0].arguments)["city"], str)
    events = list(c.responses.create(model="smol", input=ASK, tools=[tool], tool_choice=forced, parallel_tool_calls=False,
                                     max_output_tokens=100, stream=True, temperature=0))
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    done = [e for e in events if e.type == "response.function_call_arguments.done"][0]
    assert done.arguments == "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(done.arguments) == json.loads(calls[0].arguments)
    history = [{"role": "user", "content": ASK},
               {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
               {"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 21 C"}]
    answer = c.responses.create(model="smol", input=history, tools=[tool], max_output_tokens=1)  # the prompt's count is what is checked
    assert answer.status in ("completed", "incomplete") and answer.usage.input_tokens > whole.usage.input_tokens


# ---- llama-server's token routes ------------------------------------------------------------------

def test_tokenize_detokenize_apply_template(smol: ServerProcess) -> None:
    tokens = post(smol, "/tokenize", {"content": "Hello world"}).json()["tokens"]
    assert len(tokens) == 2 and all(isinstance(t, int) for t in tokens)
    pieces = post(smol, "/tokenize", {"content": "Hello world", "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == tokens and "".join(p["piece"] for p in pieces) == "Hello world"
    special = post(smol, "/tokenize", {"content": "<|im_start|>", "parse_special": True}).json()["tokens"]
    literal = post(smol, "/tokenize", {"content": "<|im_start|>", "parse_special": False}).json()["tokens"]
    assert len(special) == 1 and len(literal) > 1
    assert post(smol, "/detokenize", {"tokens": tokens}).json() == {"content": "Hello world"}
    prompt = post(smol, "/apply-template", {"messages": HI}).json()["prompt"]
    assert prompt.endswith("<|im_start|>assistant\n") and "Name three colours." in prompt
    counted = claude(smol).messages.count_tokens(model="smol", messages=HI).input_tokens
    assert len(post(smol, "/tokenize", {"content": prompt, "parse_special": True}).json()["tokens"]) == counted
    bad = post(smol, "/detokenize", {"tokens": [10**9]})
    assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]
    assert post(smol, "/tokenize", {"content": 5}).status_code == 400
    assert post(smol, "/tokenize", {"content": "x", "bogus": True}).status_code == 400


# ---- auth ------------------------------------------------------------------------------------------

def test_api_key_as_bearer_or_x_api_key(keyed: ServerProcess) -> None:
    reply = claude(keyed, api_key="sekret").messages.create(model="tiny", max_tokens=2, messages=HI)
    assert reply.type == "message" and reply.usage.input_tokens > 0
    with pytest.raises(anthropic.AuthenticationError) as info:
        claude(keyed, api_key="wrong").messages.create(model="tiny", max_tokens=2, messages=HI)
    assert info.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(ollama.ResponseError) as denied:
        llama(keyed).list()
    assert denied.value.status_code == 401
    assert [m.model for m in llama(keyed, Authorization="Bearer sekret").list().models] == ["tiny"]
    assert requests.post(f"{keyed.url}/tokenize", json={"content": "a"}, headers={"x-api-key": "sekret"}, timeout=10).ok


def test_pipeline_errors_name_the_clients_field(smol: ServerProcess) -> None:
    bad = post(smol, "/api/chat", {"model": "smol", "messages": HI, "stream": False, "options": {"temperature": -1}})
    assert bad.status_code == 400 and "'options.temperature'" in bad.json()["error"]
    with pytest.raises(openai.BadRequestError, match="'max_output_tokens'"):
        oai(smol).responses.create(model="smol", input="hi", max_output_tokens=0)
    verbose = post(smol, "/api/show", {"model": "smol", "verbose": True})
    assert verbose.status_code == 400 and "verbose" in verbose.json()["error"]


def _metric(server: ServerProcess, name: str, label: str = "") -> float:
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name) and label in line)


# Replies that cannot end before the client leaves, whatever the model would say: ignore_eos, or a
# schema that needs hundreds of numbers (the grammar allows no end before them).
_NUMBERS = {"type": "object", "properties": {"n": {"type": "array", "items": {"type": "integer"}, "minItems": 400}},
            "required": ["n"], "additionalProperties": False}
_LONG = [{"role": "user", "content": "List numbers."}]
_LEAVERS = {
    "openai chat": ("/v1/chat/completions", {"messages": _LONG, "max_tokens": 1500, "ignore_eos": True}),
    "openai completions": ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True}),
    "responses": ("/v1/responses", {"input": "List numbers.", "max_output_tokens": 1500,
                                    "text": {"format": {"type": "json_schema", "name": "n", "schema": _NUMBERS}}}),
    "anthropic": ("/v1/messages", {"messages": _LONG, "max_tokens": 1500,
                                   "output_config": {"format": {"type": "json_schema", "schema": _NUMBERS}}}),
    "ollama chat": ("/api/chat", {"messages": _LONG, "format": _NUMBERS, "options": {"num_predict": 1500}}),
    "ollama generate": ("/api/generate", {"prompt": "List numbers.", "format": _NUMBERS, "options": {"num_predict": 1500}}),
}


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("api", list(_LEAVERS))
def test_a_client_that_leaves_frees_its_slot(smol: ServerProcess, api: str, stream: bool) -> None:
    """A client that hangs up while its reply is generated, streamed or not, on any API: the job is
    cancelled at the engine's next step (its slot free again) and the log has no traceback."""
    import socket
    import time

    path, fields = _LEAVERS[api]
    body = json.dumps({"model": "smol", "stream": stream, **fields}).encode()
    deadline = time.monotonic() + 60
    while _metric(smol, "ggufrun_active_requests") and time.monotonic() < deadline:  # an earlier test's reply
        time.sleep(0.05)
    cancelled = _metric(smol, "ggufrun_completions_total", 'reason="cancelled"')
    with socket.create_connection(("127.0.0.1", smol.port), timeout=10) as client:
        client.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{smol.port}\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 60
        while _metric(smol, "ggufrun_active_requests") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _metric(smol, "ggufrun_active_requests") >= 1, "the request never got a slot"
    deadline = time.monotonic() + 60
    while (_metric(smol, "ggufrun_active_requests") or _metric(smol, "ggufrun_completions_total", 'reason="cancelled"') == cancelled) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(smol, "ggufrun_completions_total", 'reason="cancelled"') == cancelled + 1, f"{api}: the generation went on"
    assert _metric(smol, "ggufrun_active_requests") == 0
    log = smol.log()
    assert "Traceback" not in log and "RuntimeError" not in log, log[-3000:]


def test_wrong_types_and_long_texts_are_refused_in_each_apis_shape(smol: ServerProcess) -> None:
    """Inputs a client can get wrong end in that API's 400, naming the field, not a 500; Ollama's
    embeddings refuse what /v1/embeddings refuses (a text longer than a batch is never cut)."""
    cases = [
        ("/v1/messages/count_tokens", {"model": 5, "messages": [{"role": "user", "content": "hi"}]}, "model"),
        ("/api/embed", {"model": 5, "input": "red"}, "model"),
        ("/api/embed", {"model": "smol", "input": "red", "keep_alive": "5 minutes"}, "keep_alive"),
        ("/api/embed", {"model": "smol", "input": "red", "options": {"num_ctx": 1 << 20}}, "num_ctx"),
        ("/api/embed", {"model": "smol", "input": "river " * 3000}, "input"),
        ("/api/embeddings", {"model": "smol", "prompt": "river " * 3000}, "input"),
        ("/v1/responses", {"model": "smol", "input": "hi", "include": [{}]}, "include"),
        ("/v1/responses", {"model": "smol", "input": "hi", "user": 7}, "user"),
        ("/v1/responses", {"model": "smol", "input": "hi", "stream_options": 5}, "stream_options"),
        ("/v1/messages/count_tokens", {"model": "smol", "messages": [{"role": "user", "content": "hi"}],
                                       "output_config": {"effort": "high"}}, "effort"),
        ("/api/chat", {"model": "smol", "stream": False, "messages": [
            {"role": "assistant", "content": "", "tool_calls": 5}]}, "tool_calls"),
        ("/api/chat", {"model": "smol", "stream": False, "messages": [
            {"role": "tool", "content": "18C", "tool_name": ["a"]}]}, "tool_name"),
        ("/api/chat", {"model": "smol", "stream": False, "messages": [
            {"role": "user", "content": "hi", "tool_calls": [{"function": {"name": "f"}}]}]}, "tool_calls"),
        ("/api/chat", {"model": "smol", "stream": False, "messages": [{"role": "user", "content": "hi", "colour": "red"}]},
         "colour"),
    ]
    for path, body, field in cases:
        r = post(smol, path, body)
        assert r.status_code == 400, (path, body, r.status_code, r.text[:300])
        assert field in r.text, (path, r.text[:300])
        if path == "/v1/responses":  # OpenAI's error shape names the field
            assert r.json()["error"]["param"] == field, r.text


def test_responses_stream_starts_each_message_afresh_and_ollama_reads_a_cut_call_as_far_as_it_goes() -> None:
    """The stream translators over a scripted run of OpenAI chunks (text, a tool call, text again):
    the second Responses message holds only its own text; an Ollama stream whose tool call was cut
    short (num_predict) sends what the call holds so far and ends "length", not a broken connection."""
    import asyncio

    from ggufrun.server.ollama import _ndjson
    from ggufrun.server.responses import _Builder, events

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    class Scripted:  # a finished generation's chunks, as ChatRun.chunks() yields them
        def __init__(self, chunks: list[dict[str, Any]]) -> None:
            self._chunks = chunks

        async def chunks(self) -> Any:
            for c in self._chunks:
                yield c

    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    script = [chunk({"content": "AAA"}), chunk({"tool_calls": [call]}), chunk({"content": "BBB"}, "stop"),
              {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}}]

    async def collect(gen: Any) -> list[bytes]:
        return [b async for b in gen]

    out = asyncio.run(collect(events(Scripted(script), _Builder({}, "m"))))  # type: ignore[arg-type]
    done = [json.loads(line[6:]) for b in out for line in b.decode().splitlines() if line.startswith("data: ")]
    texts = [e["text"] for e in done if e["type"] == "response.output_text.done"]
    assert texts == ["AAA", "BBB"], texts
    cut = {**call, "function": {"name": "f", "arguments": '{"a": 1, "b'}}
    lines = asyncio.run(collect(_ndjson(Scripted([chunk({"tool_calls": [cut]}, "length"), script[-1]]),  # type: ignore[arg-type]
                                        "m", 0.0, True)))
    parts = [json.loads(line) for line in lines]
    # the cut call is read as far as it goes, as Anthropic's tool_use is, and the stream ends "length"
    assert parts[-2]["message"]["tool_calls"] == [{"function": {"name": "f", "arguments": {"a": 1}}}], parts
    assert parts[-1]["done"] and parts[-1]["done_reason"] == "length"


def test_unknown_routes_and_methods_answer_in_their_apis_shape(smol: ServerProcess) -> None:
    wrong_method = requests.get(f"{smol.url}/v1/messages", timeout=30)
    assert wrong_method.status_code == 405 and wrong_method.json()["type"] == "error"  # Anthropic's shape
    assert "GET" in wrong_method.json()["error"]["message"]
    unknown = requests.post(f"{smol.url}/api/nope", json={}, timeout=30)
    assert unknown.status_code == 404 and set(unknown.json()) == {"error"}  # Ollama's
    openai_side = requests.post(f"{smol.url}/v1/nope", json={}, timeout=30)
    assert openai_side.status_code == 404 and openai_side.json()["error"]["type"] == "not_found_error"  # OpenAI's
