"""serve test-loads each model file in a child process: a file that makes llama.cpp abort in a way
gguf_info.check_model does not foresee gives a 500 for that model, and the server keeps serving."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from crafted import craft
from serverutil import serve

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


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_a_file_that_aborts_llama_cpp_is_a_500_and_the_server_lives(tiny_model_factory, tmp_path: Path,
                                                                    unchecked_env: dict[str, str]) -> None:
    good = tiny_model_factory("qwen2", "q8_0", True)
    bad = craft(tiny_model_factory("qwen2", "f16", True), tmp_path / "abort.gguf", kv={"qwen2.block_count": 0})
    config = tmp_path / "serve.toml"
    config.write_text(f'[[models]]\nmodel = "{good}"\nserved_model_name = "good"\nthreads = 1\n\n'
                      f'[[models]]\nmodel = "{bad}"\nserved_model_name = "bad"\nthreads = 1\n', encoding="utf-8")
    with serve("--config", str(config), env=unchecked_env) as srv:
        status, body = _post(f"{srv.url}/v1/completions", {"model": "bad", "prompt": "x", "max_tokens": 2})
        assert status == 500 and "crashed (SIGABRT)" in body["error"]["message"], body
        assert srv.proc.poll() is None
        status, body = _post(f"{srv.url}/v1/completions", {"model": "good", "prompt": "x", "max_tokens": 2})
        assert status == 200 and body["usage"]["completion_tokens"] >= 1
