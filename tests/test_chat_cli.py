"""`ggufrun chat` as a user runs it: the real REPL in a pseudo-terminal (pexpect), one-shot -p and
stdin modes in real processes, template choice as --verbose reports it, and bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from cliutil import run_here

REPO = Path(__file__).resolve().parent.parent
FAST = ["--threads", "1", "--temperature", "0"]


def ggufrun(*args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ggufrun.cli.main", *args], cwd=REPO, input=input,
                          capture_output=True, text=True, timeout=timeout, env=os.environ.copy(), check=False)


def spawn(*args: str, timeout: float = 60) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "ggufrun.cli.main", "chat", *args], cwd=str(REPO), env=os.environ.copy(),
                          encoding="utf-8", timeout=timeout, dimensions=(50, 220))
    child.expect("Ctrl-D or /exit to leave")
    child.expect_exact(">>> ")
    return child


def say(child: pexpect.spawn, text: str) -> int:
    """Send a message, wait for its reply to end (the stats line) and the next prompt; return the
    number of tokens generated."""
    child.sendline(text)
    child.expect(r"\d+ prompt tokens.* (\d+) generated · first token [\d.]+ s · [\d.]+ tok/s")
    generated = int(child.match.group(1))
    child.expect_exact(">>> ")
    return generated


def command(child: pexpect.spawn, line: str, expect: str) -> re.Match[str]:
    child.sendline(line)
    child.expect(expect)
    match = child.match
    child.expect_exact(">>> ")
    return match


def leave(child: pexpect.spawn, how: str = "/exit") -> int:
    if how == "ctrl-d":
        child.sendeof()
    else:
        child.sendline(how)
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


# ---- the REPL on the tiny synthetic model ------------------------------------------------------


def test_repl_streams_replies_and_runs_commands(tiny_model: Path, tmp_path: Path) -> None:
    child = spawn(str(tiny_model), *FAST, "--max-tokens", "12")
    assert say(child, "Hello there") > 0
    command(child, "/stats", "conversation: 2 messages; KV cache: \\d+ of \\d+ tokens")
    say(child, "And again")
    reuse = command(child, "/stats", r"(\d+) prompt tokens of which (\d+) \(\d+%\) reused from the KV cache")
    assert int(reuse.group(2)) > 0  # the second turn reused the first one's tokens

    saved = tmp_path / "talk.json"
    command(child, f"/save {saved}", "Saved 4 messages")
    command(child, "/reset", "Conversation cleared.")
    command(child, "/stats", "conversation: 0 messages; KV cache: 0 of")
    command(child, f"/load {saved}", "Loaded 4 messages")
    command(child, "/stats", "conversation: 4 messages")
    assert [m["content"] for m in json.loads(saved.read_text())["messages"] if m["role"] == "user"] == ["Hello there", "And again"]

    # bad input inside a session: one line, and the session goes on
    command(child, "/set temperature hot", "Error: Invalid temperature='hot' in /set: expected float.")
    command(child, "/set nonsense 1", "Error: Unknown setting 'nonsense'")
    command(child, "/load /no/such.json", "Error: Cannot read /no/such.json")
    command(child, "/system ./missing-prompt.txt", "Error: System prompt file not found")
    command(child, "/nope", "Error: Unknown command '/nope'")
    command(child, "/set temperature 0.5", "temperature = 0.5")
    say(child, "Still here?")
    assert leave(child) == 0


def test_multiline_input_and_ctrl_d(tiny_model: Path, tmp_path: Path) -> None:
    child = spawn(str(tiny_model), *FAST, "--max-tokens", "4")
    child.sendline("first line \\")
    child.expect_exact("... ")
    say(child, "second line")
    child.sendline('"""')
    child.sendline("a block")
    say(child, 'that ends here"""')
    command(child, f"/save {tmp_path / 'no-such-folder' / 'x.json'}", "Error: Cannot write")
    child.sendline("/set")
    child.expect("max_tokens = 4")
    child.expect_exact(">>> ")
    assert leave(child, "ctrl-d") == 0


def test_context_overflow_in_the_repl(tiny_model: Path) -> None:
    child = spawn(str(tiny_model), *FAST, "--n-ctx", "256", "--max-tokens", "40")
    child.sendline("word " * 400)
    child.expect(r"Error: That message needs \d+ tokens .* the context holds 256")
    child.expect_exact(">>> ")
    for _ in range(6):
        child.sendline("tell me more about rivers and seas " * 4)
        index = child.expect(["dropped the oldest", r"tok/s"])
        if index == 0:
            break
        child.expect_exact(">>> ")
    else:
        pytest.fail("the conversation never passed the context")
    child.expect("tok/s")
    child.expect_exact(">>> ")
    assert leave(child) == 0


# ---- the REPL on gemma3-270m --------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_stops_a_reply_and_keeps_the_session(gemma_in_cache: Path) -> None:
    child = spawn("gemma3-270m", *FAST, "--max-tokens", "4000", "--n-ctx", "4096", timeout=120)
    child.sendline("Count from one to one thousand in words.")
    child.expect_exact("Count from one to one thousand in words.\r\n")
    child.expect(r"\w\w")  # the reply has started streaming
    child.sendintr()
    child.expect_exact("(stopped)")
    child.expect(r"(\d+) generated")
    assert 0 < int(child.match.group(1)) < 4000
    child.expect_exact(">>> ")
    command(child, "/stats", "conversation: 2 messages")  # the partial reply was kept
    child.sendintr()  # Ctrl-C at the prompt does not leave either
    child.expect("Ctrl-D or /exit to leave")
    command(child, "/set max_tokens 8", "max_tokens = 8")
    say(child, "Write one sentence about rivers.")
    assert leave(child) == 0


# ---- one-shot and stdin ---------------------------------------------------------------------------


def test_ctrl_c_during_a_one_shot_reply_exits_130(smollm2_gguf: Path) -> None:
    # The README: 130 for Ctrl-C. What was streamed stays on stdout; a script sees the interruption.
    # (SmolLM2: a real model that answers at length, loaded in a third of gemma3-270m's time.)
    proc = subprocess.Popen([sys.executable, "-m", "ggufrun.cli.main", "chat", str(smollm2_gguf), *FAST, "--max-tokens", "4000",
                             "-p", "Count from one to one thousand in words."], cwd=REPO, env=os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.read(2)  # the reply has started streaming
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert len(first) == 2 and err.splitlines()[-1] == "Interrupted."
    assert len((first + out).split()) < 1000




@pytest.mark.slow
def test_one_shot_prints_only_the_reply(gemma_in_cache: Path, gemma_path: Path) -> None:
    from ggufrun.chat import ChatSession
    from ggufrun.runtime import Model
    from ggufrun.settings import resolve

    prompt = "Write one sentence about rivers."
    once = ggufrun("chat", "gemma3-270m", "-p", prompt, *FAST, "--max-tokens", "8")
    assert once.returncode == 0, once.stderr
    piped = ggufrun("chat", "gemma3-270m", *FAST, "--max-tokens", "8", input=prompt + "\n")
    assert piped.returncode == 0, piped.stderr

    from ggufrun import registry

    # the registry entry's defaults (repeat_penalty 1.1, which now sees the prompt) apply in the CLI too
    defaults = registry.load().resolve("gemma3-270m").defaults
    settings = resolve(defaults, {"threads": 1, "temperature": 0, "max_tokens": 8})
    with Model.load(gemma_path, settings) as model:
        expected = "".join(ChatSession(model, settings, family="gemma").ask(prompt))
    assert expected.strip()
    assert once.stdout == expected + ("" if expected.endswith("\n") else "\n")
    # stdin is read whole, trailing newline included, so the prompt differs by that "\n" only
    assert piped.stdout.strip() and ">>>" not in piped.stdout and "tok/s" not in piped.stdout


def test_verbose_names_the_template(tiny_model_factory, gemma_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """In this process (cliutil.run_here): what is checked is ggufrun's own stderr lines, and five processes added
    ~0.4 s of CPU each to start."""
    cases = [
        (tiny_model_factory("qwen2", "q8_0", True), [], "template: gguf (from the GGUF's tokenizer.chat_template)"),
        (tiny_model_factory("qwen2", "q8_0", False), [], "template: chatml (from the model family's built-in template)"),
        (tiny_model_factory("gemma3", "q8_0", False), [], "template: gemma (from the model family's built-in template)"),
        (tiny_model_factory("qwen2", "q8_0", True), ["--template", "plain"], "template: plain (from --template)"),
        (gemma_path, [], "template: gemma (from the model family's built-in template)"),
    ]
    for path, extra, line in cases:
        out = run_here(capsys, "chat", str(path), "-p", "Hi", *FAST, "--max-tokens", "2", "--verbose", *extra, text=True)
        assert out.returncode == 0, out.stderr
        assert line in out.stderr
        assert "template" not in out.stdout and "tok/s" not in out.stdout
        assert "generated" in out.stderr  # --verbose also reports the reply's stats, on stderr


def test_registry_family_is_used_when_the_file_has_no_template(tiny_model_factory, ggufrun_home: Path) -> None:
    # A user registry entry says llama3 for a qwen2-shaped file without a template: the entry wins over the guess.
    src = tiny_model_factory("qwen2", "q8_0", False)
    (ggufrun_home / "models.toml").write_text(
        '[tiny-qwen]\nfamily = "llama3"\nquants = ["q8_0"]\nfile = "tiny-{quant}.gguf"\n'
        'sources = [{ hub = "huggingface", repo = "nobody/tiny" }]\n')
    dest = ggufrun_home / "models" / "tiny-qwen" / "tiny-q8_0.gguf"
    dest.parent.mkdir(parents=True)
    os.link(src, dest)
    out = ggufrun("chat", "tiny-qwen", "-p", "Hi", *FAST, "--max-tokens", "2", "--verbose")
    assert out.returncode == 0, out.stderr
    assert "template: llama3 (from the model family's built-in template)" in out.stderr


# ---- bad input: one line, non-zero exit -------------------------------------------------------------


def test_bad_input_is_one_clear_line(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Refusals, so in this process (cliutil.run_here): a process each added only its start."""
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    unreadable = tmp_path / "prompt.txt"
    unreadable.write_bytes(b"\xff\xfe\xfa")
    cases = [
        (["no-such-model", "-p", "hi"], "Error: Unknown model 'no-such-model'."),
        ([str(not_gguf), "-p", "hi"], "is not a valid GGUF file"),
        ([str(tiny_model), "--n-ctx", "1000000", "-p", "hi"], "Error: n_ctx=1000000 is larger than the model's trained context"),
        ([str(tiny_model), "--system", str(unreadable), "-p", "hi"], "is not UTF-8 text"),
        ([str(tiny_model), "--system", "@nope", "-p", "hi"], "Error: Unknown system prompt '@nope'."),
        ([str(tiny_model), "--temperature", "hot", "-p", "hi"], "Error: Invalid temperature='hot' in command line"),
        ([str(tiny_model), "--template", "vicuna", "-p", "hi"], "Error: Unknown template 'vicuna'."),
    ]
    for args, message in cases:
        out = run_here(capsys, "chat", *args)
        stderr = out.stderr.decode()
        assert out.returncode != 0, args
        lines = [line for line in stderr.splitlines() if line.startswith("Error:")]
        assert len(lines) == 1 and message in lines[0], stderr
        assert "Traceback" not in stderr and out.stdout == b""
