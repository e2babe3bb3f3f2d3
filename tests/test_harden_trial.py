"""serve test-loads each model file in a child process: a file that makes llama.cpp abort in a way
gguf_info.check_model does not foresee gives a 500 for that model, and the server keeps serving."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from crafted import craft, patch_tensor
from serverutil import post_json, serve

# Switches off ggufrun's own metadata checks in every Python process that starts with this folder
# on its path: the server and its trial child then meet llama.cpp's abort as an unforeseen file would.
SITECUSTOMIZE = "import ggufrun.gguf_info as g\ng.check_model = lambda info: None\n"


@pytest.fixture
def unchecked_env(tmp_path: Path, seed_amx_verdict: Callable[[Path], None]) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    home = tmp_path / "home"
    seed_amx_verdict(home)
    return {"PYTHONPATH": f"{Path(__file__).resolve().parents[1]}{os.pathsep}{site}", "GGUFRUN_HOME": str(home),
            "GGUFRUN_HF_ENDPOINT": "http://127.0.0.1:9", "GGUFRUN_MS_ENDPOINT": "http://127.0.0.1:9"}


# Files that crash llama.cpp at load, or load cleanly and crash on the first token (the NaN epsilon
# once sent llama.cpp into gdb, which inherited the port). With ggufrun's own checks switched off,
# only the trial (a load and a forward step) stands between them and the process: it catches each.
FIRST_TOKEN_CRASHES = {
    "block_count_0": lambda s, d: craft(s, d, kv={"qwen2.block_count": 0}),  # aborts at load, not at the step
    "rms_eps_nan": lambda s, d: craft(s, d, kv={"qwen2.attention.layer_norm_rms_epsilon": float("nan")}),
    "f16_patched_to_i16": lambda s, d: patch_tensor(s, d, "blk.0.attn_q.weight", type_id=25),
}


def test_a_file_that_crashes_llama_cpp_is_a_500_and_the_server_lives(tiny_model_factory, tmp_path: Path,
                                                                      unchecked_env: dict[str, str]) -> None:
    good = tiny_model_factory("qwen2", "q8_0", True)
    src = tiny_model_factory("qwen2", "f16", True)
    bad = {name: build(src, tmp_path / f"{name}.gguf") for name, build in FIRST_TOKEN_CRASHES.items()}
    config = tmp_path / "serve.toml"
    config.write_text(f'[[models]]\nmodel = "{good}"\nserved_model_name = "good"\nthreads = 1\n\n' + "".join(
        f'[[models]]\nmodel = "{path}"\nserved_model_name = "{name}"\nthreads = 1\n\n' for name, path in bad.items()),
        encoding="utf-8")
    srv_port = None
    with serve("--config", str(config), env=unchecked_env) as srv:
        srv_port = srv.port
        for name in bad:
            status, body = post_json(f"{srv.url}/v1/completions", {"model": name, "prompt": "x", "max_tokens": 2})
            assert status == 500 and "crashed (SIG" in body["error"]["message"], body
            assert srv.proc.poll() is None
            status, body = post_json(f"{srv.url}/v1/completions", {"model": "good", "prompt": "x", "max_tokens": 2})
            assert status == 200 and body["usage"]["completion_tokens"] >= 1
        assert "gdb" not in srv.log()
    # nothing the server started still holds its port: a restart binds it at once (SO_REUSEADDR, as
    # serve's own bind, passes connections in TIME_WAIT but not a socket still listening elsewhere)
    import socket

    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", srv_port))


@pytest.mark.parametrize("case", ["rms_eps_nan"])
def test_chat_on_a_first_token_crash_is_one_line_not_a_signal(case: str, tiny_model_factory, tmp_path: Path,
                                                              unchecked_env: dict[str, str]) -> None:
    bad = FIRST_TOKEN_CRASHES[case](tiny_model_factory("qwen2", "f16", True), tmp_path / f"{case}.gguf")
    proc = subprocess.run([sys.executable, "-m", "ggufrun.cli.main", "chat", str(bad), "-p", "hi", "--threads", "1"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **unchecked_env}, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "crashed (SIG" in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_the_listening_socket_is_not_inherited() -> None:
    from ggufrun.server import bind

    with bind("127.0.0.1", 0) as sock:
        assert not sock.get_inheritable()


def test_a_passed_trial_is_remembered_per_file(tiny_model_factory, tmp_path: Path, monkeypatch) -> None:
    import shutil

    from ggufrun import trial

    monkeypatch.setenv("GGUFRUN_HOME", str(tmp_path / "home"))
    model = shutil.copy(tiny_model_factory("qwen2", "q8_0", True), tmp_path / "m.gguf")
    trial.trial_load(model)
    assert len(list((tmp_path / "home" / "trials").iterdir())) == 1
    trial._passed.clear()
    calls: list[object] = []

    def counting_run(*args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(args)
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(trial.subprocess, "run", counting_run)
    trial.trial_load(model)  # remembered on disk: no child
    assert calls == []
    os.utime(model, ns=(1, 1))  # the file changed: tried again
    trial.trial_load(model)
    assert len(calls) == 1
