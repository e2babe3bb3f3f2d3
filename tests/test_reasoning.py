"""Reasoning models: thinking found from the template, split from the answer in every API, turned
on and off, budgeted, and kept out of the answer's grammar and tool calls.

The model is SmolLM2-135M with a Qwen3-style thinking template (tests/data/qwen3-thinking.jinja,
written into a copy as gguf-new-metadata would): its generation prompt opens a ``<think>``
block unless ``enable_thinking`` is false, as Qwen3-Thinking's and QwQ's do. SmolLM2 never closes
such a block on its own, so the tests close it with the thinking budget (the server's
``--reasoning-budget``, or a request's), or force the whole reply's shape with a ``grammar``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serverutil import ServerProcess, post_json, serve

from ggufrun.reasoning import ANSWER, START, THINKING, ThinkBudget, ThinkFormat, ThinkSplitter, ThinkWatch, detect, split

TEMPLATE = Path(__file__).parent / "data" / "qwen3-thinking.jinja"
GREEDY = {"temperature": 0.0, "top_k": 1}
BUDGET = 8  # the server's --reasoning-budget
FMT = ThinkFormat()


# ---- the parsing core, no model ------------------------------------------------------------------

def test_detect_reads_the_template_and_the_setting_wins() -> None:
    qwen3 = TEMPLATE.read_text()
    assert detect(qwen3) == ThinkFormat(toggle=True)
    assert detect("{{ messages }}") is None
    assert detect(qwen3, "none") is None
    assert detect("{{ messages }}", "deepseek") == ThinkFormat(toggle=False)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 64])
def test_splitter_never_shows_a_tag_whatever_the_pieces(size: int) -> None:
    text = "\n<think>\nI weigh </thi nk> and <think> as text.\n\n</think>\n\nThe answer: <b>4</b>."
    splitter = ThinkSplitter(FMT, START)
    parts = []
    for at in range(0, len(text), size):
        parts += splitter.feed(text[at:at + size])
    parts += splitter.finish()
    for kind, piece in parts:
        assert piece and "</think>" not in piece, (kind, piece)
    assert "".join(p for k, p in parts if k == THINKING) == "I weigh </thi nk> and <think> as text."
    assert "".join(p for k, p in parts if k == ANSWER) == "The answer: <b>4</b>."


def test_split_by_where_the_reply_starts() -> None:
    assert split("plan it\n</think>\n\nDone", FMT, THINKING) == ("plan it", "Done")
    assert split("No block <think>here</think>", FMT, START) == ("", "No block <think>here</think>")
    assert split("cut short inside", FMT, THINKING) == ("cut short inside", "")
    assert split("<thi", FMT, START) == ("", "<thi")


def test_watch_counts_thinking_tokens_and_asks_for_the_close_once() -> None:
    watch = ThinkWatch(ThinkBudget(FMT, THINKING, budget=3, close_tokens=[1, 2]))
    assert [watch.feed(p) for p in ("a", "b", "c", "d")] == [False, False, True, False]
    for piece in ("\n</", "think", ">"):
        watch.feed(piece)
    assert watch.state == ANSWER and watch.count == 7
    assert watch.feed("answer") is False and watch.count == 7
    plain = ThinkWatch(ThinkBudget(FMT, START))
    assert not plain.feed("Hello") and plain.state == ANSWER and plain.count == 0


def test_request_fields_are_checked_by_name() -> None:
    from ggufrun.server.api_errors import ApiError
    from ggufrun.server.protocol import parse_gen

    def gen(**body: Any) -> Any:
        return parse_gen({"messages": ASK, **body}, chat=True)

    p = gen(reasoning_effort="low")
    assert (p.thinking, p.thinking_param, p.reasoning_budget) == (True, "reasoning_effort", 1024)
    p = gen(chat_template_kwargs={"enable_thinking": False, "custom_flag": 1})
    assert p.thinking is False and p.template_kwargs == {"enable_thinking": False, "custom_flag": 1}
    assert gen(reasoning_budget=-1).reasoning_budget == -1
    for body, param in (({"reasoning_effort": "max"}, "reasoning_effort"),
                        ({"chat_template_kwargs": {"enable_thinking": "yes"}}, "chat_template_kwargs.enable_thinking"),
                        ({"chat_template_kwargs": {"raise_exception": 1}}, "chat_template_kwargs.raise_exception"),
                        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs.messages"),
                        ({"chat_template_kwargs": {"enable_thinking": False}, "reasoning_effort": "high"}, "reasoning_effort"),
                        ({"reasoning_effort": "low", "reasoning_budget": 0}, "reasoning_budget"),
                        ({"reasoning_budget": -2}, "reasoning_budget")):
        with pytest.raises(ApiError) as err:
            gen(**body)
        assert err.value.status == 400 and err.value.param == param, body


def test_an_answer_grammar_waits_for_the_blocks_close() -> None:
    from ggufrun.server.thinking import after_block
    from ggufrun.server.tools import TRIGGERS

    grammar, triggers = after_block('root ::= "{" [a-z]* "}"', None, FMT)
    assert grammar.startswith('root ::= "</think>" [ \\t\\n]{0,3} answer-root') and triggers == ["</think>"]
    _, moved = after_block("root ::= x", [TRIGGERS["qwen"], TRIGGERS["generic"]], FMT)
    import re
    tagged, generic = (re.compile(p) for p in moved)
    assert tagged.fullmatch("I could write <tool_call> here\n</think>\n\n<tool_call>\n{").start(1) > 30
    assert not tagged.fullmatch("thinking about <tool_call> still")  # a call inside the thinking triggers nothing
    assert generic.fullmatch('plan\n</think>\n\n{"tool_calls": [').group(1).startswith('{"tool_calls"')


def test_format_none_passes_the_switch_but_refuses_what_needs_parsing() -> None:
    from ggufrun.server.api_errors import ApiError
    from ggufrun.server.protocol import parse_gen
    from ggufrun.server.thinking import template_variables
    from ggufrun.settings import Settings

    qwen3 = TEMPLATE.read_text()

    def variables(source: str, **body: Any) -> dict[str, Any]:
        return template_variables(parse_gen({"messages": ASK, **body}, chat=True), None, Settings(), "m", source)

    # --reasoning-format none on a thinking template: the block stays in the answer, the switch still works
    assert variables(qwen3, chat_template_kwargs={"enable_thinking": False}) == {"enable_thinking": False}
    assert variables(qwen3, reasoning_effort="high") == {"enable_thinking": True}
    assert variables("{{ messages }}", reasoning_effort="none") == {}  # off, from a model that never thinks: fine
    for source, body, param in ((qwen3, {"reasoning_effort": "low"}, "reasoning_effort"),  # a budget needs the parsing
                                (qwen3, {"reasoning_budget": 64}, "reasoning_budget"),
                                ("{{ messages }}", {"reasoning_effort": "high"}, "reasoning_effort"),
                                ("<think>{{ messages }}", {"chat_template_kwargs": {"enable_thinking": False}},
                                 "chat_template_kwargs.enable_thinking")):  # no switch, and nobody to close the block
        with pytest.raises(ApiError) as err:
            variables(source, **body)
        assert err.value.param == param, body


# ---- a real model with a thinking template -------------------------------------------------------

@pytest.fixture(scope="module")
def thinking_gguf(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 with the Qwen3-style thinking template as its tokenizer.chat_template: what
    gguf-new-metadata --chat-template-file writes, copied byte for byte (crafted.set_string_kv)."""
    from crafted import set_string_kv

    dest = tmp_path_factory.mktemp("thinking") / "smollm2-think.gguf"
    return set_string_kv(smollm2_gguf, dest, "tokenizer.chat_template", TEMPLATE.read_text())


@pytest.fixture(scope="module")
def think(thinking_gguf: Path, tmp_path_factory: pytest.TempPathFactory, seed_amx_verdict: Any) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("home")
    seed_amx_verdict(home)  # the session's AMX verdict: no second check per server
    env = {"GGUFRUN_HOME": str(home), "GGUFRUN_HF_ENDPOINT": "http://127.0.0.1:9", "GGUFRUN_MS_ENDPOINT": "http://127.0.0.1:9"}
    with serve(str(thinking_gguf), "--served-model-name", "think", "--parallel", "2", "--n-ctx", "2048", "--threads", "1",
               "--reasoning-budget", str(BUDGET), env=env) as server:
        yield server


def openai_client(server: ServerProcess) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


ASK = [{"role": "user", "content": "Explain in detail how photosynthesis works."}]


def test_openai_reasoning_content_whole_and_streamed(think: ServerProcess) -> None:
    oa = openai_client(think)
    r = oa.chat.completions.create(model="think", messages=ASK, max_tokens=16, extra_body=GREEDY)
    msg = r.choices[0].message
    reasoning = msg.model_extra["reasoning_content"]
    assert reasoning and msg.content and "<think>" not in msg.content + reasoning and "</think>" not in msg.content + reasoning
    details = r.usage.completion_tokens_details
    assert BUDGET <= details.reasoning_tokens < r.usage.completion_tokens
    thought, answer = "", ""
    for chunk in oa.chat.completions.create(model="think", messages=ASK, max_tokens=16, stream=True, extra_body=GREEDY):
        if chunk.choices:
            delta = chunk.choices[0].delta
            thought += (delta.model_extra or {}).get("reasoning_content") or ""
            answer += delta.content or ""
    assert (thought, answer) == (reasoning, msg.content)


def test_thinking_off_leaves_a_block_the_model_writes_anyway_in_the_answer(think: ServerProcess) -> None:
    oa = openai_client(think)
    grammar = 'root ::= "<think>\\n" [a-z ]{3,12} "\\n</think>\\n\\n" "Paris"'
    # enable_thinking false: the template closes an empty block, so the reply is all answer, tags and all
    r = oa.chat.completions.create(model="think", messages=ASK, max_tokens=40,
                                   extra_body={**GREEDY, "grammar": grammar, "chat_template_kwargs": {"enable_thinking": False}})
    msg = r.choices[0].message
    assert msg.content.startswith("<think>\n") and msg.content.endswith("</think>\n\nParis")
    assert (msg.model_extra or {}).get("reasoning_content") is None
    assert r.usage.completion_tokens_details is None  # thinking was off: nothing to report


def test_the_budget_closes_a_block_that_would_run_on(think: ServerProcess) -> None:
    oa = openai_client(think)
    run_on = oa.chat.completions.create(model="think", messages=ASK, max_tokens=16, extra_body={**GREEDY, "reasoning_budget": -1})
    assert run_on.choices[0].finish_reason == "length" and not run_on.choices[0].message.content
    assert run_on.usage.completion_tokens_details.reasoning_tokens == 16
    cut = oa.chat.completions.create(model="think", messages=ASK, max_tokens=16, extra_body={**GREEDY, "reasoning_budget": 5})
    assert 5 <= cut.usage.completion_tokens_details.reasoning_tokens <= 5 + 6  # the budget, then the close's tokens
    assert cut.choices[0].message.content
    # thinking off: the answer starts at once, so a few tokens show it (as in the three APIs' tests below)
    off = oa.chat.completions.create(model="think", messages=ASK, max_tokens=4, reasoning_effort="none", extra_body=GREEDY)
    assert (off.choices[0].message.model_extra or {}).get("reasoning_content") is None and off.choices[0].message.content


def test_earlier_turns_thinking_is_rendered_as_the_template_keeps_it(think: ServerProcess) -> None:
    import urllib.request

    def prompt(**body: Any) -> str:
        req = urllib.request.Request(f"{think.url}/apply-template", json.dumps({"model": "think", **body}).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return str(json.loads(resp.read())["prompt"])

    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    loop = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call], "reasoning_content": "I need the tool."},
            {"role": "tool", "tool_call_id": "c1", "content": "18C"}]
    assert "<think>\nI need the tool.\n</think>" in prompt(messages=loop, tools=[WEATHER])  # after the last query: kept
    later = [*loop, {"role": "assistant", "content": "18C.", "reasoning_content": "Easy."}, {"role": "user", "content": "And Rome?"}]
    assert "I need the tool." not in prompt(messages=later, tools=[WEATHER])  # before it: Qwen3's template drops it
    off = prompt(messages=ASK, chat_template_kwargs={"enable_thinking": False})
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and prompt(messages=ASK).endswith("<think>\n")


def test_anthropic_thinking_blocks_whole_and_streamed(think: ServerProcess) -> None:
    import anthropic

    c = anthropic.Anthropic(base_url=think.url, api_key="unused", max_retries=0, timeout=120)
    ask: dict[str, Any] = {"model": "think", "max_tokens": 16, "messages": ASK, "extra_body": GREEDY,
                           "thinking": {"type": "enabled", "budget_tokens": 6}}
    m = c.messages.create(**ask)
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.content[0].thinking and m.content[1].text and "</think>" not in m.content[1].text
    with c.messages.stream(**ask) as s:
        kinds = [(e.type, getattr(getattr(e, "delta", None), "type", None)) for e in s]
        final = s.get_final_message()
    assert ("content_block_delta", "thinking_delta") in kinds and ("content_block_delta", "text_delta") in kinds
    assert [(b.type, getattr(b, "thinking", None) or b.text) for b in final.content] == \
        [(b.type, getattr(b, "thinking", None) or b.text) for b in m.content]
    off = c.messages.create(**{**ask, "max_tokens": 4, "thinking": {"type": "disabled"}})  # no block to wait for
    assert [b.type for b in off.content] == ["text"]
    # a thinking block sent back is the assistant turn's reasoning: this template keeps it after the last query
    def counted(blocks: list[dict[str, Any]]) -> int:
        use = {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}}
        return c.messages.count_tokens(model="think", tools=[{"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}],
                                       messages=[*ASK, {"role": "assistant", "content": [*blocks, use]},
                                                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                                                               "content": "18C"}]}]).input_tokens
    assert counted([{"type": "thinking", "thinking": "I need the weather tool.", "signature": ""}]) > counted([])
    with pytest.raises(anthropic.BadRequestError, match="budget_tokens"):
        c.messages.create(**{**ask, "thinking": {"type": "enabled", "budget_tokens": 24}})


def test_ollama_message_thinking_whole_and_streamed(think: ServerProcess) -> None:
    import ollama

    client = ollama.Client(host=think.url, timeout=120)
    options = {"temperature": 0, "top_k": 1, "num_predict": 16}
    r = client.chat(model="think", messages=ASK, think=True, options=options)
    assert r.message.thinking and r.message.content and "<think>" not in r.message.thinking
    thought, answer = "", ""
    for part in client.chat(model="think", messages=ASK, think=True, options=options, stream=True):
        thought += part.message.thinking or ""
        answer += part.message.content or ""
    assert (thought, answer) == (r.message.thinking, r.message.content)
    off = client.chat(model="think", messages=ASK, think=False, options={**options, "num_predict": 4})  # no block to wait for
    assert not off.message.thinking and off.message.content
    g = client.generate(model="think", prompt="Explain in detail how photosynthesis works.", options=options)
    assert g.thinking and g.response


def test_responses_reasoning_items_and_reasoning_tokens(think: ServerProcess) -> None:
    oa = openai_client(think)
    ask: dict[str, Any] = {"model": "think", "input": ASK[0]["content"], "max_output_tokens": 16, "extra_body": GREEDY}
    r = oa.responses.create(**ask)
    assert [item.type for item in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text and r.output_text
    assert BUDGET <= r.usage.output_tokens_details.reasoning_tokens < r.usage.output_tokens
    events = list(oa.responses.create(**ask, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    done = [e for e in events if e.type in ("response.completed", "response.incomplete")][-1].response
    assert deltas == done.output[0].content[0].text == r.output[0].content[0].text
    assert done.output_text == r.output_text
    off = oa.responses.create(**{**ask, "max_output_tokens": 4}, reasoning={"effort": "none"})  # no block to wait for
    assert [item.type for item in off.output] == ["message"] and off.reasoning.effort == "none"
    assert off.usage.output_tokens_details.reasoning_tokens == 0
    with pytest.raises(Exception, match="reasoning.summary"):
        oa.responses.create(**ask, reasoning={"effort": "low", "summary": "auto"})


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                                                           "required": ["city"], "additionalProperties": False}}}


def test_tool_call_and_json_schema_come_after_the_thinking(think: ServerProcess) -> None:
    import jsonschema

    oa = openai_client(think)
    weather = [{"role": "user", "content": "What is the weather in Paris? Think it through first."}]
    r = oa.chat.completions.create(model="think", messages=weather, max_tokens=80, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                                   extra_body=GREEDY)
    msg = r.choices[0].message
    assert (msg.model_extra or {}).get("reasoning_content")  # the grammar left the thinking free ...
    assert r.choices[0].finish_reason == "tool_calls" and msg.tool_calls[0].function.name == "get_weather"
    assert "city" in json.loads(msg.tool_calls[0].function.arguments)  # ... and made the answer a call
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 30}}, "required": ["answer"],
              "additionalProperties": False}
    r = oa.chat.completions.create(model="think", messages=ASK, max_tokens=80, extra_body=GREEDY,
                                   response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    msg = r.choices[0].message
    assert (msg.model_extra or {}).get("reasoning_content")
    jsonschema.validate(json.loads(msg.content), schema)
    streamed = "".join(c.choices[0].delta.content or "" for c in oa.chat.completions.create(
        model="think", messages=ASK, max_tokens=80, stream=True, extra_body=GREEDY,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}) if c.choices)
    assert streamed == msg.content


@pytest.mark.slow  # another server / two more processes: the path is covered in-process too
def test_a_block_the_model_opens_itself_is_split_too(smollm2_gguf: Path, tmp_path: Path, seed_amx_verdict: Any) -> None:
    """--reasoning-format deepseek on a template that never opens the block: the reply may (here,
    by its grammar) open one itself, as Qwen3 does; the tags are found in the reply's text."""
    seed_amx_verdict(tmp_path)
    env = {"GGUFRUN_HOME": str(tmp_path), "GGUFRUN_HF_ENDPOINT": "http://127.0.0.1:9", "GGUFRUN_MS_ENDPOINT": "http://127.0.0.1:9"}
    with serve(str(smollm2_gguf), "--served-model-name", "smol", "--n-ctx", "512", "--threads", "1",
               "--reasoning-format", "deepseek", env=env) as server:
        oa = openai_client(server)
        grammar = 'root ::= "<think>\\n" [a-z ]{3,12} "\\n</think>\\n\\n" "Paris"'
        r = oa.chat.completions.create(model="smol", messages=ASK, max_tokens=40, extra_body={**GREEDY, "grammar": grammar})
        msg = r.choices[0].message
        assert msg.content == "Paris" and 3 <= len(msg.model_extra["reasoning_content"]) <= 12
        assert r.usage.completion_tokens_details.reasoning_tokens < r.usage.completion_tokens
        plain = oa.chat.completions.create(model="smol", messages=ASK, max_tokens=4, extra_body=GREEDY)
        assert plain.choices[0].message.content and (plain.choices[0].message.model_extra or {}).get("reasoning_content") is None
        # thinking off on a template that cannot switch it: the server closes an empty block for the model,
        # and the prompt that /apply-template and count_tokens report is that prompt
        off = {"messages": ASK, "chat_template_kwargs": {"enable_thinking": False}}
        status, shown = post_json(f"{server.url}/apply-template", off)
        assert status == 200 and shown["prompt"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        status, on = post_json(f"{server.url}/v1/messages/count_tokens", {"model": "smol", "messages": ASK})
        status_off, counted = post_json(f"{server.url}/v1/messages/count_tokens",
                                        {"model": "smol", "messages": ASK, "thinking": {"type": "disabled"}})
        assert status == status_off == 200 and counted["input_tokens"] > on["input_tokens"]


def test_a_model_that_does_not_reason_refuses_thinking_by_name(tiny_model: Path, tmp_path: Path, seed_amx_verdict: Any) -> None:
    """A ChatML template that opens no thinking block (the tiny synthetic model's: what is refused
    depends on the template alone, and this server starts in a third of SmolLM2's time)."""
    import anthropic
    import ollama
    import openai

    seed_amx_verdict(tmp_path)
    env = {"GGUFRUN_HOME": str(tmp_path), "GGUFRUN_HF_ENDPOINT": "http://127.0.0.1:9", "GGUFRUN_MS_ENDPOINT": "http://127.0.0.1:9"}
    with serve(str(tiny_model), "--served-model-name", "smol", "--n-ctx", "512", "--threads", "1", env=env) as server:
        oa = openai_client(server)
        for extra, param in (({"reasoning_effort": "high"}, "reasoning_effort"),
                             ({"extra_body": {"chat_template_kwargs": {"enable_thinking": True}}}, "chat_template_kwargs.enable_thinking")):
            with pytest.raises(openai.BadRequestError) as err:
                oa.chat.completions.create(model="smol", messages=ASK, max_tokens=2, **extra)
            assert err.value.body["param"] == param and "does not reason" in err.value.body["message"]
        ok = oa.chat.completions.create(model="smol", messages=ASK, max_tokens=2, reasoning_effort="none")
        assert "reasoning_tokens" not in str(ok.usage) and (ok.choices[0].message.model_extra or {}).get("reasoning_content") is None
        with pytest.raises(ollama.ResponseError, match="think"):
            ollama.Client(host=server.url).chat(model="smol", messages=ASK, think=True, options={"num_predict": 2})
        assert ollama.Client(host=server.url).chat(model="smol", messages=ASK, think=False, options={"num_predict": 2}).message
        with pytest.raises(anthropic.BadRequestError, match="'thinking'"):
            anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0).messages.create(
                model="smol", max_tokens=8, messages=ASK, thinking={"type": "enabled", "budget_tokens": 4})
        with pytest.raises(openai.BadRequestError, match="reasoning.effort"):
            oa.responses.create(model="smol", input="Hi", reasoning={"effort": "high"})


# ---- ggufrun chat ----------------------------------------------------------------------------------

def test_chat_session_keeps_thinking_apart_and_think_off_turns_it_off(thinking_gguf: Path) -> None:
    from ggufrun.chat import ChatSession, format_stats
    from ggufrun.runtime import Model
    from ggufrun.settings import Settings

    settings = Settings(n_gpu_layers=0, n_ctx=1024, threads=1, temperature=0.0, top_k=1, max_tokens=20, reasoning_budget=6)
    with Model.load(thinking_gguf, settings) as model:
        s = ChatSession(model, settings)
        reply = s.ask(ASK[0]["content"])
        parts = list(reply.parts())
        kinds = [k for k, _ in parts]
        assert kinds[0] == THINKING and kinds[-1] == ANSWER and kinds == sorted(kinds, reverse=True)  # thinking, then answer
        assert reply.thinking and reply.text and "</think>" not in reply.text
        assert s.history[-1] == {"role": "assistant", "content": reply.text, "reasoning_content": reply.thinking}
        assert 6 <= reply.stats.reasoning_tokens < reply.stats.gen_tokens
        assert f"({reply.stats.reasoning_tokens} thinking)" in format_stats(reply.stats)
        assert s.command("/think off").text == "Thinking off."
        off = s.ask("And respiration?")
        assert "".join(off) and not off.thinking and off.stats.reasoning_tokens == 0


@pytest.mark.slow  # another server / two more processes: the path is covered in-process too
def test_chat_cli_shows_thinking_on_stderr_only_when_asked(thinking_gguf: Path) -> None:
    run = [sys.executable, "-m", "ggufrun.cli.main", "chat", str(thinking_gguf), "-p", ASK[0]["content"], "--threads", "1",
           "--temperature", "0", "--max-tokens", "20", "--reasoning-budget", "6", "--verbose"]
    shown = subprocess.run([*run, "--show-thinking"], capture_output=True, text=True, timeout=300, check=False)
    hidden = subprocess.run(run, capture_output=True, text=True, timeout=300, check=False)
    assert shown.returncode == hidden.returncode == 0, shown.stderr + hidden.stderr
    assert shown.stdout == hidden.stdout and shown.stdout.strip() and "think>" not in shown.stdout
    assert "thinking)" in hidden.stderr  # the stats line counts the thinking tokens apart
    thought = shown.stderr.split("template:")[-1]
    assert len(shown.stderr) > len(hidden.stderr) and "think>" not in thought


def test_the_seed_route_answers_with_the_answer_alone(think: ServerProcess) -> None:
    """POST / (the seed's demo) goes through the same thinking plan and returns the answer, as chat's
    window does: the same text as OpenAI chat's content for the same messages."""
    import requests

    r = requests.post(f"{think.url}/", json={"prompt": ASK[0]["content"], "max_tokens": 16, **GREEDY}, timeout=120)
    assert r.status_code == 200, r.text
    msg = openai_client(think).chat.completions.create(
        model="think", max_tokens=16, extra_body=GREEDY,
        messages=[{"role": "system", "content": "You are a helpful assistant."}, *ASK]).choices[0].message
    assert msg.model_extra["reasoning_content"] and r.json()["response"] == msg.content


def test_the_chat_page_shows_thinking_apart_from_the_answer(think: ServerProcess, tmp_path: Path) -> None:
    """The page reads reasoning_content: the thinking is shown (dimmed) above the answer, not dropped."""
    import os

    from test_server import CHROMIUM, DevTools

    if not os.path.exists(CHROMIUM):
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    browser = DevTools(tmp_path / "chromium-profile")
    try:
        browser.open(think.url)
        browser.wait_for("document.body.dataset.defaults === 'loaded'")
        browser.evaluate("document.getElementById('max-tokens').value = '16'; document.getElementById('temperature').value = '0';"
                         "document.getElementById('input').value = 'Explain photosynthesis.'; document.getElementById('send').click(); true")
        browser.wait_for("document.querySelector('.msg.assistant.done') !== null")
        thought = browser.evaluate("(document.querySelector('.msg.assistant .thinking') || {}).textContent || ''")
        answer = browser.evaluate("document.querySelector('.msg.assistant .text').textContent")
        assert thought and "<think>" not in thought + answer and "</think>" not in thought + answer
    finally:
        browser.close()
