"""tool_choice "auto" with a lazy grammar: the reply is free until it starts a tool call, and the
call is then constrained (llama.cpp's trigger patterns, as llama-server does), on a real server.

The model is scripted, not trained: a tiny synthetic qwen2 whose token embeddings are zero, so
every logit is 0 and logit_bias alone ranks the tokens; presence and frequency penalties over the
last 8 tokens push each token below the next once used, so greedy decoding spells "<tool_call>"
and then, unconstrained, starts it over. Only the grammar makes what follows a valid call."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from crafted import craft
from serverutil import ServerProcess, serve

QWEN25_TOOLS_TEMPLATE = (Path(__file__).parent / "data" / "qwen2.5-tools.jinja").read_text()
UNITS = {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                          "parameters": {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}},
                                                         "required": ["unit"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def scripted(tiny_model_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    """The zero-logit model and the logit_bias that makes it write "<tool_call>" first."""
    from ggufrun.runtime import Model
    from ggufrun.settings import Settings

    src = tiny_model_factory("qwen2", "q8_0", QWEN25_TOOLS_TEMPLATE)
    path = craft(src, tmp_path_factory.mktemp("scripted") / "zero.gguf", zero_tensors=("token_embd.weight",))
    with Model.load(path, Settings(n_gpu_layers=0, n_ctx=256)) as m:
        ids = m.tokenize("<tool_call>", add_special=False)
    assert len(set(ids)) == len(ids) > 1  # distinct tokens: each is used once
    return path, {str(t): 10.0 - 0.4 * i for i, t in enumerate(ids)}


@pytest.fixture(scope="module")
def zero_server(scripted: tuple[Path, dict[str, float]], tmp_path_factory: pytest.TempPathFactory,
                seed_amx_verdict: Callable[[Path], None]) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("home")
    seed_amx_verdict(home)
    env = {"GGUFRUN_HOME": str(home), "GGUFRUN_HF_ENDPOINT": "http://127.0.0.1:9",
           "GGUFRUN_MS_ENDPOINT": "http://127.0.0.1:9"}
    with serve(str(scripted[0]), "--served-model-name", "zero", "--parallel", "1", "--n-ctx", "1024", "--threads", "1",
               "--temperature", "0", env=env) as server:
        yield server


def test_auto_tool_call_is_constrained_once_the_reply_starts_one(zero_server: ServerProcess,
                                                                scripted: tuple[Path, dict[str, float]]) -> None:
    import openai

    oa = openai.OpenAI(base_url=f"{zero_server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    ask: dict[str, Any] = {"model": "zero", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 80,
                           "logit_bias": scripted[1], "presence_penalty": 2.0, "frequency_penalty": 2.0,
                           "extra_body": {"repeat_last_n": 8}}  # the penalties see the script, not the prompt
    free = oa.chat.completions.create(**ask)  # no tools: the same script, unconstrained
    assert free.choices[0].message.content.startswith("<tool_call><")  # not a call: it starts over
    r = oa.chat.completions.create(**ask, tools=[UNITS], tool_choice="auto", parallel_tool_calls=False)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content, choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["unit"] in ("c", "f")
    stream = oa.chat.completions.create(**ask, tools=[UNITS], tool_choice="auto", parallel_tool_calls=False, stream=True)
    deltas = [c.choices[0] for c in stream if c.choices]
    calls = [tc for d in deltas for tc in (d.delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and deltas[-1].finish_reason == "tool_calls"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == json.loads(call.function.arguments)


def test_auto_with_a_schema_the_converter_refuses_runs_unconstrained(zero_server: ServerProcess,
                                                                      scripted: tuple[Path, dict[str, float]]) -> None:
    """tool_choice auto promises no grammar: a tool whose schema cannot become one (an unanchored
    pattern) is still offered, and the reply is free (the script starts over, not a forced call);
    tool_choice required with the same tool is the client's 400, naming the field."""
    import openai

    zip_tool = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"zip": {"type": "string", "pattern": "[0-9]{5}"}}}}}
    oa = openai.OpenAI(base_url=f"{zero_server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    ask: dict[str, Any] = {"model": "zero", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 30,
                           "logit_bias": scripted[1], "presence_penalty": 2.0, "frequency_penalty": 2.0,
                           "extra_body": {"repeat_last_n": 8}, "tools": [zip_tool]}
    r = oa.chat.completions.create(**ask, tool_choice="auto")
    assert r.choices[0].message.content.startswith("<tool_call><") and not r.choices[0].message.tool_calls
    with pytest.raises(openai.BadRequestError) as err:
        oa.chat.completions.create(**ask, tool_choice="required")
    assert "pattern" in str(err.value).lower() or "tools" in str(err.value).lower()
