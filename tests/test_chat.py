"""ChatSession on real GGUF files (gemma3-270m and synthetic models), and --system prompts."""

from __future__ import annotations

from typing import Any

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ggufrun.chat import ChatSession
from ggufrun.generation import split_stop
from ggufrun.errors import (
    ConfigError,
    ContextOverflowError,
    GgufrunError,
    TemplateError,
)
from ggufrun.prompts import available, resolve_system
from ggufrun.settings import Settings

GREEDY = Settings(threads=1, n_ctx=512, temperature=0.0, max_tokens=12)


# ---- --system ------------------------------------------------------------------------------


def test_shipped_prompts_by_name() -> None:
    assert {"assistant", "translator", "json"} <= set(available())
    assert "JSON" in (resolve_system("@json") or "")
    assert resolve_system(None) is None
    assert resolve_system("You are a pirate.") == "You are a pirate."


def test_user_prompts_come_first(ggufrun_home: Path) -> None:
    (ggufrun_home / "prompts").mkdir()
    (ggufrun_home / "prompts" / "json.txt").write_text("mine\n")
    assert resolve_system("@json") == "mine"


def test_system_prompt_from_a_file(tmp_path: Path) -> None:
    f = tmp_path / "sys.txt"
    f.write_text("  From a file.\n")
    assert resolve_system(str(f)) == "From a file."


@pytest.mark.parametrize(("value", "message"), [
    ("@nope", "Unknown system prompt '@nope'.*@assistant"),
    ("./missing.txt", "System prompt file not found: ./missing.txt"),
    ("/no/such/prompt", "not found"),
])
def test_bad_system_values_are_one_line_errors(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_system(value)


def test_unreadable_system_file(tmp_path: Path) -> None:
    f = tmp_path / "bin.txt"
    f.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="not UTF-8"):
        resolve_system(str(f))
    with pytest.raises(ConfigError, match="is a folder"):
        resolve_system(str(tmp_path) + "/")


# ---- stop strings --------------------------------------------------------------------------


def test_split_stop_holds_back_a_possible_stop() -> None:
    stops = ("\nUser:",)
    assert split_stop("Hello", stops) == ("Hello", "", None)
    assert split_stop("Hello\nUs", stops) == ("Hello", "\nUs", None)
    assert split_stop("Hello\nUser: more", stops) == ("Hello", "", "\nUser:")
    assert split_stop("a\nb", stops) == ("a\nb", "", None)


# ---- sessions on gemma3-270m ---------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_model(tiny_model_factory: Any) -> Iterator[object]:
    """A tiny synthetic gemma3 without a template (gemma3-270m's case) keeps the default suite fast;
    the real file runs in the slow tests."""
    from ggufrun.runtime import Model

    with Model.load(tiny_model_factory("gemma3", "q8_0", False), GREEDY) as model:
        yield model


@pytest.fixture
def session(gemma_model: object) -> ChatSession:
    gemma_model.reset()  # type: ignore[attr-defined]
    return ChatSession(gemma_model, GREEDY, family="gemma")  # type: ignore[arg-type]


def test_gemma_file_without_template_uses_gemma_turns(session: ChatSession) -> None:
    assert session.model.chat_template is None
    assert (session.template.name, session.template.source) == ("gemma", "family")
    # <end_of_turn> is one token in Gemma's vocabulary, so it is matched by id
    assert session._stop_ids and not session._text_stops


def test_two_turns_reuse_the_kv_cache(session: ChatSession) -> None:
    first = session.ask("Write one sentence about rivers.")
    text = "".join(first)
    assert text.strip() and first.stats.gen_tokens > 0
    assert session.history == [{"role": "user", "content": "Write one sentence about rivers."},
                               {"role": "assistant", "content": text}]
    second = session.ask("And one about mountains.")
    "".join(second)
    # the whole first exchange is reused, up to where the re-rendered reply differs at most
    assert second.stats.cached_tokens >= first.stats.prompt_tokens
    assert second.stats.prompt_tokens > second.stats.cached_tokens
    assert "reused from the KV cache" in session.stats_text()
    assert len(session.history) == 4


def test_system_prompt_is_folded_and_kept(session: ChatSession) -> None:
    session.system = "Answer in French."
    tokens = session.tokens()
    text = session.model.detokenize(tokens, special=True)
    bos = session.model.detokenize([session.model.bos_id], special=True)
    assert text.startswith(bos + "<start_of_turn>user\nAnswer in French.")
    assert tokens.count(session.model.bos_id) == 1


def test_cancel_keeps_what_was_said(session: ChatSession) -> None:
    session.settings = Settings(threads=1, n_ctx=512, temperature=0.0, max_tokens=200)
    reply = session.ask("Count from one to one hundred in words.")
    pieces = []
    for piece in reply:
        pieces.append(piece)
        if len(pieces) == 3:
            reply.cancel()
    assert reply.cancelled and reply.stats.finish_reason == "cancelled"
    assert 1 <= reply.stats.gen_tokens <= 4
    assert session.history[-1] == {"role": "assistant", "content": "".join(pieces)}
    session.settings = GREEDY
    assert "".join(session.ask("Thanks.")).strip()  # the session goes on


def test_commands(session: ChatSession, tmp_path: Path) -> None:
    "".join(session.ask("Hi"))
    assert "/reset" in session.command("/help").text
    assert session.command("/set temperature 0.3").text == "temperature = 0.3"
    assert session.settings.temperature == 0.3
    assert "top_k = 40" in session.command("/set").text
    assert "Template: chatml" in session.command("/set template chatml").text
    assert session.template.source == "override"
    assert session.command("/system @json").text == "System prompt set."
    assert "JSON" in session.command("/system").text
    assert "KV cache" in session.command("/stats").text
    saved = tmp_path / "chat.json"
    assert "Saved 2 messages" in session.command(f"/save {saved}").text
    before = list(session.history)
    assert session.command("/reset").text == "Conversation cleared."
    assert session.history == [] and session.model.seq_len(0) == 0
    assert session.command(f"/load {saved}").text.startswith("Loaded 2 messages")
    assert session.history == before and "JSON" in (session.system or "")
    assert json.loads(saved.read_text())["format"] == "ggufrun-chat"
    assert session.command("/exit").exit and session.command("/bye").exit


@pytest.mark.parametrize(("line", "error", "message"), [
    ("/set nonsense 1", ConfigError, "Unknown setting 'nonsense'"),
    ("/set temperature hot", ConfigError, "Invalid temperature='hot'.*expected float"),
    ("/set top_p 2", ConfigError, "must be <= 1"),
    ("/set n_ctx 100", ConfigError, "cannot change while the model is loaded"),
    ("/set temperature", ConfigError, "needs a value"),
    ("/set template vicuna", TemplateError, "Unknown template"),
    ("/frobnicate", ConfigError, "Unknown command '/frobnicate'"),
    ("/load /no/such/file.json", GgufrunError, "Cannot read"),
    ("/save", ConfigError, "needs one file name"),
    ("/system @nope", ConfigError, "Unknown system prompt"),
])
def test_bad_commands_leave_the_session_as_it_was(session: ChatSession, line: str, error: type, message: str) -> None:
    before = (session.settings, session.template, session.system, list(session.history))
    with pytest.raises(error, match=message):
        session.command(line)
    assert (session.settings, session.template, session.system, list(session.history)) == before


def test_load_rejects_a_file_that_is_not_a_transcript(session: ChatSession, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"messages": [{"role": "wizard"}]}')
    with pytest.raises(GgufrunError, match="not a saved chat"):
        session.load(bad)
    bad.write_text("not json")
    with pytest.raises(GgufrunError, match="not JSON"):
        session.load(bad)
    bad.write_text('{"messages": [{"role": "assistant", "content": "ok", "reasoning_content": "\\ud800"}]}')
    with pytest.raises(GgufrunError, match="thinking is not valid UTF-8"):
        session.load(bad)


@pytest.mark.slow
def test_context_overflow_drops_the_oldest_turns_and_keeps_the_system_prompt(gemma_path: Path) -> None:
    from ggufrun.runtime import Model

    settings = Settings(threads=1, n_ctx=160, temperature=0.0, max_tokens=4)
    with Model.load(gemma_path, settings) as model:
        s = ChatSession(model, settings, family="gemma", system="Be brief.")
        notices = []
        for i in range(6):
            reply = s.ask(f"Question {i}: " + "tell me about the sea and the sky " * 5)
            "".join(reply)
            notices.append(reply.notice)
            assert reply.stats.prompt_tokens <= model.n_ctx - s.reply_room()
            assert model.seq_len(0) <= model.n_ctx
        assert notices[0] is None
        dropped = [n for n in notices if n]
        assert dropped and "dropped the oldest" in dropped[0] and "system prompt stays" in dropped[0]
        assert s.history[0]["content"].startswith("Question ") and not s.history[0]["content"].startswith("Question 0")
        assert s.messages()[0] == {"role": "system", "content": "Be brief."}

        # one message larger than the context: a clear error, and the conversation is unchanged
        before = list(s.history)
        with pytest.raises(ContextOverflowError, match=f"That message needs .* tokens.*context holds {model.n_ctx}"):
            s.ask("word " * 400)
        assert s.history == before
        reply = s.ask("Still there?")
        "".join(reply)
        assert reply.stats.gen_tokens > 0 and s.history[-1]["role"] == "assistant"  # the session goes on


def test_chat_refuses_draft_tuning_without_a_drafter(tiny_model_factory: Any, capsys: pytest.CaptureFixture[str],
                                                     ggufrun_home: Path) -> None:
    """--draft-max alone would change nothing: refused before the model loads."""
    from ggufrun.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["chat", str(tiny_model_factory("gemma3", "q8_0", False)), "--draft-max", "4", "-p", "hi"])
    assert exit_.value.code == 2
    assert "--draft-max tune(s) speculative decoding: give --spec ngram or --draft-model too." in capsys.readouterr().err
