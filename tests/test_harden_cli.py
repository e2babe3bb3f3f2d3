"""The command line against hostile files and bytes: one line and a non-zero exit, never a traceback
or a hang; the REPL survives bad /load files and bad input; synth never replaces a non-regular file."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from cliutil import run_here

REPO = Path(__file__).resolve().parent.parent


def run(*args: str | bytes, input: bytes | None = None, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "ggufrun.cli.main", *args], cwd=REPO, input=input,
                          capture_output=True, timeout=timeout, env={**os.environ, **(env or {})}, check=False)


def one_line_error(proc: subprocess.CompletedProcess[bytes]) -> str:
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode in (1, 2), (proc.returncode, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in err, err
    return lines[0]


def _hostile_files(tmp_path: Path) -> dict[str, Path]:
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\x00\xff\xfe GGUF \x89PNG" * 20)
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 3000 + "]" * 3000 + "\n")
    deep_tables = tmp_path / "deep_tables.toml"
    deep_tables.write_text("a = " + "{b = " * 3000 + "1" + "}" * 3000 + "\n")
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    return {"binary": binary, "deep": deep, "deep_tables": deep_tables, "fifo": fifo, "urandom": Path("/dev/urandom")}


@pytest.mark.parametrize("case, words", [("binary", "not UTF-8"), ("deep", "nested too deeply"),
                                         ("deep_tables", "nested too deeply"), ("fifo", "not a regular file"),
                                         ("urandom", "not a regular file")])
@pytest.mark.timeout(20)  # a FIFO opened for reading blocks in this process: the 20 s its own process had
def test_hostile_models_and_config_files(case: str, words: str, tmp_path: Path, ggufrun_home: Path,
                                        tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before anything is loaded, so in this process (cliutil.run_here)."""
    path = _hostile_files(tmp_path)[case]
    assert words in one_line_error(run_here(capsys, "--models", str(path), "list"))
    config = ggufrun_home / "config.toml"
    if case in ("fifo", "urandom"):
        config.symlink_to(path)
    else:
        config.write_bytes(path.read_bytes())
    assert words in one_line_error(run_here(capsys, "chat", str(tiny_model), "-p", "hi"))


def test_invalid_utf8_on_stdin_and_argv(tiny_model: Path) -> None:
    assert "stdin is not UTF-8" in one_line_error(run("chat", str(tiny_model), input=b"hi \xff there"))
    assert "not valid UTF-8" in one_line_error(run("chat", str(tiny_model), "-p", b"a\xffb"))


def test_system_prompt_from_a_device_is_refused(tiny_model: Path) -> None:
    assert "not a regular file" in one_line_error(run("chat", str(tiny_model), "-s", "/dev/urandom", "-p", "hi"))


def test_repl_survives_bad_load_files_and_bad_bytes(tiny_model: Path, tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}")
    surrogate = tmp_path / "surrogate.json"
    surrogate.write_text(json.dumps({"messages": [{"role": "user", "content": "hi \ud800 there"}]}))
    fifo = tmp_path / "chat.fifo"
    os.mkfifo(fifo)
    child = pexpect.spawn(sys.executable, ["-m", "ggufrun.cli.main", "chat", str(tiny_model), "--threads", "1",
                                           "--max-tokens", "3"], cwd=str(REPO), env=os.environ.copy(), timeout=60,
                          dimensions=(50, 220))
    child.expect_exact(">>> ")
    for path, words in ((deep, "nested too deeply"), (surrogate, "not valid UTF-8"), (fifo, "not a regular file")):
        child.sendline(f"/load {path}")
        child.expect_exact(words)
        child.expect_exact(">>> ")
    child.send(b"bad \xff byte\r")  # invalid UTF-8 typed at the prompt
    child.expect("not UTF-8|not valid UTF-8")
    child.expect_exact(">>> ")
    child.sendline("hello")  # the session still works
    child.expect(r"\d+ prompt tokens")
    child.expect_exact(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_synth_never_replaces_a_fifo_or_a_symlink(tmp_path: Path) -> None:
    fifo = tmp_path / "target.gguf"
    os.mkfifo(fifo)
    assert "not a regular file" in one_line_error(run("synth", "--out", str(fifo), "--force"))
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    real = tmp_path / "real.gguf"
    real.write_bytes(b"keep me")
    link = tmp_path / "link.gguf"
    link.symlink_to(real)
    assert "symbolic link" in one_line_error(run("synth", "--out", str(link), "--force"))
    assert link.is_symlink() and real.read_bytes() == b"keep me"


def test_bench_failures_say_why_on_stderr(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    proc = run("bench", str(junk), "--threads", "1")
    assert proc.returncode == 1 and proc.stdout  # the table is still printed
    err = proc.stderr.decode()
    assert any(line.startswith("Error: junk.gguf") and "is not a valid GGUF file: bad magic" in line
               for line in err.splitlines()), err
    with __import__("socket").socket() as s:  # a closed loopback port: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run("bench", "--url", f"http://127.0.0.1:{port}", "--model", "x", "--concurrency", "1", "--requests", "2")
    assert proc.returncode == 1
    assert "Error: concurrency 1: 2 of 2 requests failed; first: ConnectionRefusedError" in proc.stderr.decode()


@pytest.mark.parametrize("value", ["abc", "0", "-1", "1e9"])
def test_serve_refuses_a_bad_switch_interval_before_listening(value: str, tiny_model: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """On a port already taken: a serve that bound first would say so instead (and, in this process, keep
    the socket it had bound)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        proc = run_here(capsys, "serve", str(tiny_model), "--host", "127.0.0.1", "--port", port,
                        env={"GGUFRUN_SWITCH_INTERVAL_MS": value})
    assert "GGUFRUN_SWITCH_INTERVAL_MS" in one_line_error(proc)
