"""Every --flag that an error or a hint names exists (the Ollama keep_alive error once sent users
to --max-models; the flag is --max-loaded), and secrets need not be on the command line."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

import ggufrun

ROOT = Path(ggufrun.__file__).resolve().parent
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]")
# Flags of other programs that ggufrun's messages quote (pip's, for a reinstall hint)
FOREIGN = {"--force-reinstall", "--no-cache-dir", "--no-deps"}


def _cli_flags() -> set[str]:
    from ggufrun.cli.main import COMMANDS, cli

    flags = {"--help", "--version"}
    ctx = click.Context(cli)
    for cmd in (cli, *(cli.get_command(ctx, name) for name in COMMANDS)):
        for p in cmd.params:
            if isinstance(p, click.Option):
                flags.update(o for o in (*p.opts, *p.secondary_opts) if o.startswith("--"))
    return flags


def _message_calls(tree: ast.AST):
    """Calls that build an error or a user-facing refusal: SomethingError(...), Refused(...), UsageError(...)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name.endswith(("Error", "Exception", "Refused")) or name in ("_fail", "echo", "report", "warn"):
                yield node


def test_every_flag_an_error_names_exists() -> None:
    flags = _cli_flags() | FOREIGN
    wrong = []
    for path in ROOT.rglob("*.py"):
        for call in _message_calls(ast.parse(path.read_text(encoding="utf-8"))):
            for node in ast.walk(call):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    wrong += [f"{path.relative_to(ROOT)}:{node.lineno}: {m}" for m in FLAG.findall(node.value)
                              if m not in flags]
    assert not wrong, wrong


def test_the_scan_sees_error_strings() -> None:
    """The guard is real: it finds the flags the pool's eviction, the num_ctx refusal and the serve
    usage error name."""
    seen = set()
    for path in (ROOT / "server" / "models.py", ROOT / "server" / "lifecycle.py", ROOT / "cli" / "serve_cmd.py"):
        for call in _message_calls(ast.parse(path.read_text(encoding="utf-8"))):
            seen |= {m for node in ast.walk(call) if isinstance(node, ast.Constant) and isinstance(node.value, str)
                     for m in FLAG.findall(node.value)}
    assert {"--max-loaded", "--n-ctx", "--api-key-file"} <= seen


def _serve_check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`serve` with a model name that does not resolve: the key handling runs, then it stops in a moment."""
    return subprocess.run([sys.executable, "-m", "ggufrun.cli.main", "serve", "no-such-model-xyz", *args],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT.parent), **(env or {})})


def test_api_key_file_is_read_and_checked(tmp_path: Path) -> None:
    from ggufrun.cli.serve_cmd import read_api_key
    from ggufrun.errors import ConfigError

    key = tmp_path / "key"
    key.write_text("s3cret\n")
    assert read_api_key(key) == "s3cret"
    key.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_api_key(key)
    with pytest.raises(ConfigError, match="Cannot read"):
        read_api_key(tmp_path / "absent")
    both = _serve_check("--api-key", "x", "--api-key-file", str(key))
    assert both.returncode == 2 and "Give the API key once" in both.stderr
    via_env = _serve_check("--api-key-file", str(key), env={"GGUFRUN_API_KEY": "y"})
    assert via_env.returncode == 2 and "Give the API key once" in via_env.stderr


def test_a_key_from_a_file_guards_the_server(tmp_path: Path, tiny_model: Path) -> None:
    import urllib.error
    import urllib.request

    from serverutil import serve

    key = tmp_path / "key"
    key.write_text("from-file\n")
    with serve(str(tiny_model), "--threads", "1", "--api-key-file", str(key)) as srv:
        assert "from-file" not in " ".join(srv.proc.args)  # nothing secret on the command line
        for token, status in (("wrong", 401), ("from-file", 200)):
            req = urllib.request.Request(f"{srv.url}/v1/models", headers={"Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    got = resp.status
            except urllib.error.HTTPError as err:
                got = err.code
            assert got == status


def test_a_tiny_n_ctx_is_honoured(tiny_model: Path) -> None:
    """llama.cpp rounds a context up to 256 cells; `chat --n-ctx 1` used to run a 43-token prompt anyway."""
    from ggufrun.errors import ContextOverflowError
    from ggufrun.generation import SamplingParams
    from ggufrun.runtime import Model
    from ggufrun.settings import Settings

    with Model.load(tiny_model, Settings(n_ctx=1, threads=1)) as model:
        assert model.n_ctx == 1
        with pytest.raises(ContextOverflowError, match="the context holds 1"):
            model.start(model.tokenize("hello there"), SamplingParams())
