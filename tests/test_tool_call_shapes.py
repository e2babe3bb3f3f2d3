"""Tool calls cut by max_tokens, and the same calls streamed or whole, through the real clients (openai,
anthropic) against a `ggufrun serve` process on loopback.

The model is a synthetic qwen2 carrying Qwen2.5's tool template (random weights): tool_choice
required makes the grammar force calls, and a logit_bias against the special tokens (end of turn
among them) makes it write call after call, so max_tokens can cut the second one anywhere.
"""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from serverutil import ServerProcess, serve

from ggufrun.server import tools as T
from ggufrun.server.translate import partial_object

TEMPLATE = (Path(__file__).parent / "data" / "qwen2.5-tools.jinja").read_text()
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"], "additionalProperties": False}}}
NO_END = {str(i): -100 for i in range(8)}  # the synthetic vocabulary's special tokens: <unk> <s> </s> <|im_start|> <|im_end|>...
MSGS = [{"role": "user", "content": "What is the weather in Paris and in London?"}]


@pytest.fixture(scope="module")
def toolsrv(tiny_model_factory: Any, tmp_path_factory: pytest.TempPathFactory,
            seed_amx_verdict: Callable[[Path], None]) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("tool-shapes-home")
    seed_amx_verdict(home)
    path = tiny_model_factory("qwen2", "q8_0", TEMPLATE)
    with serve(str(path), "--served-model-name", "toolmodel", "--n-ctx", "1024", "--threads", "1", "--temperature", "0",
               env={"GGUFRUN_HOME": str(home)}) as server:
        yield server


def openai_client(server: ServerProcess) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _streamed(stream: Any) -> tuple[str, dict[int, dict[str, str]], str | None]:
    """Content, calls by index (id, name, arguments joined) and finish_reason of a chat stream."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        content += choice.delta.content or ""
        for tc in choice.delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = tc.id or call["id"]
            call["name"] = (tc.function.name or call["name"]) if tc.function else call["name"]
            call["arguments"] += (tc.function.arguments or "") if tc.function else ""
    return content, calls, finish


def test_a_cut_parallel_call_leaves_no_markup_and_streams_as_whole(toolsrv: ServerProcess) -> None:
    oa = openai_client(toolsrv)
    kw = dict(model="toolmodel", messages=MSGS, tools=[WEATHER], tool_choice="required", logit_bias=NO_END)
    ref = oa.chat.completions.create(**kw, max_tokens=200, logprobs=True)
    tokens = [t.token for t in ref.choices[0].logprobs.content]
    text, second_args = "", 0
    for i, token in enumerate(tokens):  # the token that opens the second call's arguments
        text += token
        if text.count('"arguments": {') == 2:
            second_args = i + 1
            break
    assert second_args, text
    # cut before the second call's arguments began, inside them, and after several whole calls
    for max_tokens, n_calls in ((second_args - 4, 1), (second_args + 3, 2), (200, None)):
        whole = oa.chat.completions.create(**kw, max_tokens=max_tokens).choices[0]
        content, streamed, finish = _streamed(oa.chat.completions.create(**kw, max_tokens=max_tokens, stream=True))
        assert whole.finish_reason == finish == "length"
        assert whole.message.content is None and content == "", (whole.message.content, content)  # no <tool_call> markup
        calls = whole.message.tool_calls
        assert n_calls is None and len(calls) > 2 or len(calls) == n_calls, calls
        assert len(streamed) == len(calls)
        for k, call in enumerate(calls):  # the same argument text streamed and whole; OpenAI's ids
            assert streamed[k]["arguments"] == call.function.arguments and streamed[k]["name"] == call.function.name
            assert call.id.startswith("call_") and streamed[k]["id"].startswith("call_")
        for call in calls[:-1]:  # every call before the last is whole JSON; the last one may be cut
            assert json.loads(call.function.arguments)["city"] is not None
    cut = oa.chat.completions.create(**kw, max_tokens=second_args + 3).choices[0].message.tool_calls[1]
    assert cut.function.arguments.startswith("{") and not cut.function.arguments.endswith("}")


def test_anthropic_tool_use_ids_and_a_cut_input(toolsrv: ServerProcess) -> None:
    import anthropic

    ac = anthropic.Anthropic(base_url=toolsrv.url, api_key="unused", max_retries=0, timeout=120)
    tool = {"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}
    kw: dict[str, Any] = dict(model="toolmodel", messages=MSGS, tools=[tool], tool_choice={"type": "any"})
    whole = ac.messages.create(**kw, max_tokens=300)
    (block,) = whole.content
    assert whole.stop_reason == "tool_use" and block.type == "tool_use" and block.id.startswith("toolu_")
    assert isinstance(block.input["city"], str)
    with ac.messages.stream(**kw, max_tokens=300) as s:
        final = s.get_final_message()
    assert final.content[0].id.startswith("toolu_") and final.content[0].input == block.input
    # cut inside the arguments: a tool_use block whose input is what was written (no 500, no text),
    # the same object the SDK builds from the streamed partial JSON
    ids = openai_client(toolsrv).chat.completions.create(model="toolmodel", messages=MSGS, tools=[WEATHER], tool_choice="required",
                                                         max_tokens=300, logprobs=True).choices[0].logprobs.content
    text, at = "", 0
    for i, t in enumerate(ids):
        text += t.token
        if '"arguments": {"ci' in text:
            at = i + 1
            break
    seen = []
    for max_tokens in range(at - 4, at + 20, 3):  # before, at and inside the arguments
        whole = ac.messages.create(**kw, max_tokens=max_tokens)
        with ac.messages.stream(**kw, max_tokens=max_tokens) as s:
            final = s.get_final_message()
        assert whole.stop_reason == final.stop_reason == "max_tokens"
        assert [b.type for b in whole.content] == [b.type for b in final.content] and all(b.type == "tool_use" for b in whole.content)
        assert [b.input for b in whole.content] == [b.input for b in final.content], (max_tokens, whole.content, final.content)
        seen += [b.input for b in whole.content]
    assert {} in seen and {"city": ""} in seen, seen  # cut before the city's value was whole, and after


def _incomplete_response(stream: Any) -> Any:
    """The response of a stream's response.incomplete event (the SDK's get_final_response wants
    response.completed, which OpenAI does not send for an incomplete response either)."""
    last = None
    for event in stream:
        if event.type in ("response.incomplete", "response.completed"):
            last = event
    assert last is not None and last.type == "response.incomplete", last
    return last.response


def test_responses_cut_items_are_incomplete(toolsrv: ServerProcess) -> None:
    oa = openai_client(toolsrv)
    tool = {"type": "function", **WEATHER["function"]}
    cut_text = oa.responses.create(model="toolmodel", input="Tell me a story.", max_output_tokens=5)
    streamed = _incomplete_response(oa.responses.create(model="toolmodel", input="Tell me a story.", max_output_tokens=5, stream=True))
    for r in (cut_text, streamed):
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
        assert [(o.type, o.status) for o in r.output] == [("message", "incomplete")]
    kw: dict[str, Any] = dict(model="toolmodel", input="Weather in Paris?", tools=[tool], tool_choice="required")
    done = oa.responses.create(**kw, max_output_tokens=300)
    assert done.status == "completed" and [(o.type, o.status) for o in done.output] == [("function_call", "completed")]
    assert done.output[0].id.startswith("fc_") and done.output[0].call_id.startswith("call_")
    tokens = oa.chat.completions.create(model="toolmodel", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
                                        tool_choice="required", max_tokens=300, logprobs=True).choices[0].logprobs.content
    at = next(i for i in range(len(tokens)) if '"arguments": {' in "".join(t.token for t in tokens[: i + 1])) + 1
    whole = oa.responses.create(**kw, max_output_tokens=at + 2)  # cut inside the arguments
    streamed = _incomplete_response(oa.responses.create(**kw, max_output_tokens=at + 2, stream=True))
    for r in (whole, streamed):
        assert r.status == "incomplete" and [(o.type, o.status) for o in r.output] == [("function_call", "incomplete")], r.output
    assert whole.output[0].arguments == streamed.output[0].arguments and whole.output[0].arguments.startswith("{")
    assert whole.output[0].call_id.startswith("call_") and streamed.output[0].id.startswith("fc_")


def test_cut_replies_in_the_json_formats_keep_the_whole_calls() -> None:
    plan = T.parse_tools({"tools": [WEATHER], "tool_choice": "required"})
    assert plan is not None
    plan.fmt = "generic"
    cut = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_weather", "argu'
    content, calls = T.parse_reply(plan, cut, cut=True)
    assert content is None and [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Oslo"}]
    assert T.parse_reply(plan, cut)[1] == []  # not cut (a stop): malformed, given back as it was
    plan.fmt = "llama3"
    content, calls = T.parse_reply(plan, '{"name": "get_weather", "parameters": {"city": "Rome"}}\n{"name": "get_we', cut=True)
    assert content is None and len(calls) == 1
    plan.fmt = "qwen"
    # cut before the second call's arguments: its markup is dropped, not given as content
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "A"}}\n</tool_call>\n<tool_call>\n{"na'
    content, calls = T.parse_reply(plan, text, cut=True)
    assert content is None and [c["function"]["arguments"] for c in calls] == ['{"city": "A"}']
    # arguments written as a JSON string are read whole (re-serialised), streamed or not
    stream = T.ToolStream(plan, incremental=True)
    text = '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"B\\"}"}\n</tool_call>'
    events = [e for ch in text for e in stream.feed(ch)] + stream.finish()
    assert [k for k, _ in events] == ["call"] and events[0][1]["function"]["arguments"] == '{"city": "B"}'
    assert T.parse_reply(plan, text)[1][0]["function"]["arguments"] == '{"city": "B"}'


@pytest.mark.parametrize("text", ['{"city": "Par', '{"city": "Paris", "n": 1', '{"city": "Paris", "n', '{"a": [1, 2, {"b": tr',
                                  '{', '{"a": "x\\', '{"a": {"b": "c"}, "d": 12.5e', '{"a": "\\u00e', '{"a": "b\\"c',
                                  '{"a": ["x", "y', '{"a": nul'])
def test_partial_arguments_read_as_the_anthropic_sdk_reads_them(text: str) -> None:
    jiter = pytest.importorskip("jiter")  # the anthropic SDK's parser of a stream's partial input_json
    assert partial_object(text) == jiter.from_json(text.encode(), partial_mode=True)


def test_ollama_a_cut_call_is_read_as_far_as_it_goes() -> None:
    """Ollama carries arguments as objects: the last call of a reply cut by num_predict gives the
    object written so far, as Anthropic's tool_use does (it was a 500); a whole reply's malformed
    arguments are still the server's error. (Through the API no client can force a call on Ollama's
    side, and a random model never starts one, so the translation is checked directly.)"""
    from ggufrun.server.api_errors import ApiError
    from ggufrun.server.ollama import _ollama_calls

    calls = [{"function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
             {"function": {"name": "get_weather", "arguments": '{"city": "Lon'}}]
    out = _ollama_calls(calls, cut=True)
    assert [c["function"]["arguments"] for c in out] == [{"city": "Oslo"}, {}]
    with pytest.raises(ApiError):
        _ollama_calls(calls, cut=False)


def test_partial_arguments_of_a_long_cut_reply_are_read_without_copying_it_per_value() -> None:
    """A cut reply as long as max_tokens allows holds tens of thousands of values; every one is a
    place the JSON could be closed, and building all those closings first (one copy of the text
    each) took gigabytes. Only the longest few are tried."""
    jiter = pytest.importorskip("jiter")
    text = '{"a": [' + "1, " * 30000 + '"x'
    tracemalloc.start()
    try:
        value = partial_object(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert value == jiter.from_json(text.encode(), partial_mode=True) == {"a": [1] * 30000}
    assert peak < 20 * 1024 * 1024  # (all the closings: over a gigabyte)
