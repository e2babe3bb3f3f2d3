"""Multi-device settings and llama.cpp RPC workers, with real `ggufrun rpc-worker` processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ggufrun import distributed, settings
from ggufrun.errors import ConfigError

from cliutil import run_here
from serverutil import ROOT, ServerProcess, free_port

ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _rpc_supported() -> bool:
    code = "from ggufrun.llama import ggml; print(ggml.rpc_supported())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT)
    return out.stdout.strip() == "True"


RPC = _rpc_supported()
needs_rpc = pytest.mark.skipif(not RPC, reason=(
    "this llama-cpp-python was built without -DGGML_RPC=ON (installed before the README's commands: pip keeps it "
    'whatever CMAKE_ARGS say); rebuild it with CMAKE_ARGS="-DGGML_RPC=ON" pip install --force-reinstall '
    "--no-cache-dir --no-deps llama-cpp-python"))


# ---- settings: checked at merge time, wherever the value came from ---------------------------

@pytest.mark.parametrize("raw, expected", [
    ("127.0.0.1:50052", "127.0.0.1:50052"),
    (" 10.0.0.2:1 , worker-b.lan:65535", "10.0.0.2:1,worker-b.lan:65535"),
])
def test_rpc_setting_is_normalised(raw: str, expected: str) -> None:
    assert settings.Settings().updated({"rpc": raw}, "command line").rpc == expected


@pytest.mark.parametrize("raw, fragment", [
    ("127.0.0.1", "expected HOST:PORT"),
    ("127.0.0.1:0", "port must be 1-65535"),
    ("127.0.0.1:70000", "port must be 1-65535"),
    ("[::1]:50052", "IPv4 only"),
    ("bad host:1", "not a host name"),
    ("a:1,,b:2", "empty entry"),
    ("a:1,a:1", "listed twice"),
    (",".join(f"h{i}:1" for i in range(17)), "at most 16"),
])
def test_bad_rpc_setting_is_refused(raw: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        settings.Settings().updated({"rpc": raw}, "command line")


def test_tensor_split_and_split_mode_are_checked() -> None:
    assert distributed.parse_tensor_split("3,1") == [3.0, 1.0]
    assert settings.Settings().updated({"tensor_split": "3, 1"}, "x").tensor_split == "3,1"
    for bad, fragment in (("3,x", "not a number"), ("-1,2", ">= 0"), ("0,0", "at least one"), ("nan", ">= 0"), ("inf,1", "finite")):
        with pytest.raises(ConfigError, match=fragment):
            settings.Settings().updated({"tensor_split": bad}, "x")
    with pytest.raises(ConfigError, match="choose one of layer, row, none"):
        settings.Settings().updated({"split_mode": "columns"}, "x")


# The two refusals below run through the real entry point in the test's process (cliutil.run_here): they refuse
# before any model or worker is touched, and a process each added only its start (~0.5 s of CPU).
def test_bad_rpc_env_is_a_one_line_error(tiny_model_factory, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_model_factory("llama")
    proc = run_here(capsys, "chat", str(model), "-p", "hi", env={"GGUFRUN_RPC": "127.0.0.1:99999"}, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "Error: Invalid RPC worker '127.0.0.1:99999' in environment: port must be 1-65535."


def test_bench_load_mode_refuses_device_flags(capsys: pytest.CaptureFixture[str]) -> None:
    proc = run_here(capsys, "bench", "--url", "http://127.0.0.1:9", "--rpc", "127.0.0.1:50052", text=True)
    assert proc.returncode == 2 and "--rpc" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(RPC, reason="this llama-cpp-python has RPC; the refusal is tested where it lacks it")
def test_worker_without_rpc_build_says_how_to_fix() -> None:
    proc = subprocess.run([sys.executable, "-m", "ggufrun.cli.main", "rpc-worker", "--port", str(free_port())],
                          capture_output=True, text=True, env=ENV, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: This llama-cpp-python was built without RPC support")
    assert "-DGGML_RPC=ON" in proc.stderr


# ---- real workers -------------------------------------------------------------------------------

class Worker:
    def __init__(self, *extra: str) -> None:
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        # SIGINT at its default in the child, as in a terminal: a shell starts a background job (`pytest &`)
        # with SIGINT ignored, the worker would inherit that, and Python then leaves Ctrl-C ignored
        self.proc = subprocess.Popen([sys.executable, "-m", "ggufrun.cli.main", "rpc-worker", "--port", str(self.port),
                                      "--threads", "1", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=ENV, cwd=ROOT,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.communicate()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("rpc-worker did not start listening")

    def stop(self) -> tuple[str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                return self.proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.communicate()


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started = [Worker(), Worker()]
    yield started
    for w in started:
        w.stop()


def _chat(model: Path, *flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`ggufrun chat MODEL -p ...`, greedy."""
    return subprocess.run([sys.executable, "-m", "ggufrun.cli.main", "chat", str(model), "-p", "Tell me about rivers.",
                           "--temperature", "0", "--max-tokens", "24", "--threads", "1", *flags],
                          capture_output=True, text=True, env={**ENV, "GGUFRUN_HOME": os.environ["GGUFRUN_HOME"], **(env or {})},
                          timeout=120)


def test_split_over_devices_that_do_not_exist_is_refused(tiny_model_factory) -> None:
    """A CPU-only build has no device to split over: llama.cpp would silently ignore these."""
    model = tiny_model_factory("llama")
    for flags in (["--tensor-split", "3,1"], ["--split-mode", "none", "--main-gpu", "1"]):
        proc = subprocess.run([sys.executable, "-m", "ggufrun.cli.main", "chat", str(model), "-p", "hi", "--n-gpu-layers", "-1", *flags],
                              capture_output=True, text=True, env={**ENV, "GGUFRUN_HOME": os.environ["GGUFRUN_HOME"]}, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "but llama.cpp can offload to 0 device(s): none (CPU only)" in proc.stderr and "Traceback" not in proc.stderr


@needs_rpc
def test_worker_refuses_a_busy_port_and_unknown_device() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "ggufrun.cli.main", "rpc-worker", "--port", str(port)],
                              capture_output=True, text=True, env=ENV, timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip().endswith("Choose another --port."), proc.stderr
    proc = subprocess.run([sys.executable, "-m", "ggufrun.cli.main", "rpc-worker", "--port", str(free_port()), "--device", "CUDA7"],
                          capture_output=True, text=True, env=ENV, timeout=60)
    assert proc.returncode == 2 and "Unknown device 'CUDA7'. Devices here: CPU" in proc.stderr, proc.stderr


@needs_rpc
def test_worker_announces_itself_keeps_a_cache_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    cache = tmp_path / "rpc-cache"
    worker = Worker("--cache", str(cache))
    worker.proc.send_signal(signal.SIGINT)
    out, err = worker.proc.communicate(timeout=10)
    assert worker.proc.returncode == 130, err
    assert "no authentication" in err and f"RPC worker on {worker.endpoint}, devices: CPU, tensor cache {cache}" in err
    assert cache.is_dir() and "Starting RPC server" in out


@needs_rpc
def test_unreachable_worker_is_a_clear_error(tiny_model_factory) -> None:
    port = free_port()
    proc = _chat(tiny_model_factory("llama"), "--rpc", f"127.0.0.1:{port}", "--n-gpu-layers", "-1")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"Error: RPC worker 127.0.0.1:{port} is not reachable")


_RUN = """
import json, sys
from ggufrun.runtime import Model, Sampler
from ggufrun.settings import Settings
settings = Settings(threads=1, n_ctx=256).updated(json.loads(sys.argv[2]), "test")
with Model.load(sys.argv[1], settings) as model:
    prompt = model.tokenize("The river runs past the old mill, and then")
    logits = model.eval_logits(prompt)
    model.reset()
    sampler = Sampler(model, temperature=0)
    greedy = list(model.generate(prompt, sampler, max_tokens=24))
    sampler.close()
print(json.dumps({"logits": logits.tolist(), "greedy": greedy}))
"""


def _run(model: Path, **settings: object) -> dict:
    proc = subprocess.run([sys.executable, "-c", _RUN, str(model), json.dumps(settings)], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_rpc
def test_model_split_over_two_workers_and_the_cpu_matches_a_local_run(tiny_model_factory, workers: list[Worker]) -> None:
    model = tiny_model_factory("llama", "f16")
    rpc = ",".join(w.endpoint for w in workers)
    local = _run(model)
    # tiny has 2 blocks + the output layer: -ngl 2 puts one block on each worker and keeps the output on the CPU
    split = _run(model, rpc=rpc, n_gpu_layers=2, tensor_split="1,1")
    import numpy as np

    ours, theirs = np.array(split["logits"]), np.array(local["logits"])
    assert ours.shape == theirs.shape and ours.shape[0] > 5
    # every prompt position's full distribution, which differs from position to position (the layers did work)
    assert np.abs(np.diff(theirs, axis=0)).max() > 0.1
    assert np.abs(ours - theirs).max() < 1e-3
    assert split["greedy"] == local["greedy"] and len(local["greedy"]) == 24

    # Through the CLI, as a user runs it: llama.cpp's load log shows where the weights went.
    spread = subprocess.run([sys.executable, "-m", "ggufrun.cli.main", "chat", str(model), "-p", "Tell me about rivers.",
                             "--temperature", "0", "--max-tokens", "16", "--threads", "1", "--rpc", rpc, "--n-gpu-layers", "2",
                             "--tensor-split", "1,1"], capture_output=True, text=True, timeout=120,
                            env={**ENV, "GGUFRUN_HOME": os.environ["GGUFRUN_HOME"], "GGUFRUN_DEBUG": "1"})
    assert spread.returncode == 0 and spread.stdout, spread.stderr[-3000:]
    for w in workers:  # "RPC0[127.0.0.1:PORT] model buffer size = ...": weights on each worker
        assert f"[{w.endpoint}] model buffer size" in spread.stderr, spread.stderr[-4000:]
    assert "CPU model buffer size" in spread.stderr or "CPU_Mapped model buffer size" in spread.stderr


@needs_rpc
def test_killed_worker_ends_the_server_with_a_clear_error(tiny_model_factory) -> None:
    """llama.cpp cannot continue after losing a worker (ggml-rpc aborts); the server must say so and
    exit, so its health check fails and the orchestrator restarts it, never hang."""
    worker = Worker()
    model = tiny_model_factory("llama")
    server = ServerProcess([str(model), "--served-model-name", "x", "--rpc", worker.endpoint, "--n-gpu-layers", "-1", "--threads", "1"])
    try:
        server.wait_ready(timeout=60)
        body = {"model": "x", "prompt": "hello", "max_tokens": 8, "temperature": 0}
        ok = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert ok.status_code == 200, ok.text
        started = time.monotonic()
        body["max_tokens"] = 100000
        body["stream"] = True
        body["ignore_eos"] = True
        with pytest.raises(httpx.HTTPError):
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as resp:
                for n, _line in enumerate(resp.iter_lines()):
                    if n == 3:
                        worker.proc.kill()
        server.proc.wait(timeout=30)
        assert time.monotonic() - started < 60
        assert server.proc.returncode == 1
        assert "Error: lost an RPC worker" in server.log(), server.log()[-3000:]
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{server.url}/health", timeout=5)
    finally:
        server.proc.kill()
        server.close()  # its log too
        worker.stop()
