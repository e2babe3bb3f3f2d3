"""Reasoning models: thinking found from the template, split from the answer in every API, turned
on and off, budgeted, and kept out of the answer's grammar and tool calls.

The model is SmolLM2-135M with a Qwen3-style thinking template (tests/data/qwen3-thinking.jinja,
written into a copy by gguf's own gguf-new-metadata): its generation prompt opens a ``<think>``
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
from serverutil import ServerProcess, serve

from ggufrun.reasoning import ANSWER, START, THINKING, ThinkBudget, ThinkFormat, ThinkSplitter, ThinkWatch, detect, split

TEMPLATE = Path(__file__).parent / "data" / "qwen3-thinking.jinja"
GREEDY = {"temperature": 0.0, "top_k": 1}
BUDGET = 12  # the server's --reasoning-budget
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


# ---- a real model with a thinking template -------------------------------------------------------

@pytest.fixture(scope="module")
def thinking_gguf(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 with the Qwen3-style thinking template, by gguf-new-metadata --chat-template-file."""
    dest = tmp_path_factory.mktemp("thinking") / "smollm2-think.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(smollm2_gguf), str(dest),
                    "--chat-template-file", str(TEMPLATE), "--force"], check=True, capture_output=True)
    return dest


@pytest.fixture(scope="module")
def think(thinking_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"GGUFRUN_HOME": str(tmp_path_factory.mktemp("home")), "GGUFRUN_HF_ENDPOINT": "http://127.0.0.1:9",
           "GGUFRUN_MS_ENDPOINT": "http://127.0.0.1:9"}
    with serve(str(thinking_gguf), "--served-model-name", "think", "--parallel", "2", "--n-ctx", "2048", "--threads", "2",
               "--reasoning-budget", str(BUDGET), env=env) as server:
        yield server


def openai_client(server: ServerProcess) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


ASK = [{"role": "user", "content": "Explain in detail how photosynthesis works."}]


def test_openai_reasoning_content_whole_and_streamed(think: ServerProcess) -> None:
    oa = openai_client(think)
    r = oa.chat.completions.create(model="think", messages=ASK, max_tokens=40, extra_body=GREEDY)
    msg = r.choices[0].message
    reasoning = msg.model_extra["reasoning_content"]
    assert reasoning and msg.content and "<think>" not in msg.content + reasoning and "</think>" not in msg.content + reasoning
    details = r.usage.completion_tokens_details
    assert BUDGET <= details.reasoning_tokens < r.usage.completion_tokens
    thought, answer = "", ""
    for chunk in oa.chat.completions.create(model="think", messages=ASK, max_tokens=40, stream=True, extra_body=GREEDY):
        if chunk.choices:
            delta = chunk.choices[0].delta
            thought += (delta.model_extra or {}).get("reasoning_content") or ""
            answer += delta.content or ""
    assert (thought, answer) == (reasoning, msg.content)


def test_thinking_off_leaves_a_block_the_model_writes_anyway_in_the_answer(think: ServerProcess) -> None:
    oa = openai_client(think)
    grammar = 'root ::= "<think>\\n" [a-z ]{3,20} "\\n</think>\\n\\n" "Paris"'
    # enable_thinking false: the template closes an empty block, so the reply is all answer, tags and all
    r = oa.chat.completions.create(model="think", messages=ASK, max_tokens=40,
                                   extra_body={**GREEDY, "grammar": grammar, "chat_template_kwargs": {"enable_thinking": False}})
    msg = r.choices[0].message
    assert msg.content.startswith("<think>\n") and msg.content.endswith("</think>\n\nParis")
    assert (msg.model_extra or {}).get("reasoning_content") is None
    assert r.usage.completion_tokens_details is None  # thinking was off: nothing to report


def test_the_budget_closes_a_block_that_would_run_on(think: ServerProcess) -> None:
    oa = openai_client(think)
    run_on = oa.chat.completions.create(model="think", messages=ASK, max_tokens=40, extra_body={**GREEDY, "reasoning_budget": -1})
    assert run_on.choices[0].finish_reason == "length" and not run_on.choices[0].message.content
    assert run_on.usage.completion_tokens_details.reasoning_tokens == 40
    cut = oa.chat.completions.create(model="think", messages=ASK, max_tokens=40, extra_body={**GREEDY, "reasoning_budget": 5})
    assert 5 <= cut.usage.completion_tokens_details.reasoning_tokens <= 5 + 6  # the budget, then the close's tokens
    assert cut.choices[0].message.content
    off = oa.chat.completions.create(model="think", messages=ASK, max_tokens=20, reasoning_effort="none", extra_body=GREEDY)
    assert (off.choices[0].message.model_extra or {}).get("reasoning_content") is None and off.choices[0].message.content
