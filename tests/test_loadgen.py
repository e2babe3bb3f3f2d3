"""The load generator against real HTTP servers on loopback."""

from __future__ import annotations

import pytest

from ggufrun.bench.load import percentile, run_load, sweep
from ggufrun.errors import BenchError
from sse_server import SSEServer


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_bounded_run_counts_tokens_and_latencies(endpoint: str) -> None:
    with SSEServer(delay=0.002) as server:
        result = run_load(server.url, "m", concurrency=4, requests=12, max_tokens=8, endpoint=endpoint)
    assert result.errors == 0
    assert len(result.samples) == 12
    assert result.total_tokens == 12 * 8
    row = result.summary()
    assert row["tokens_per_s"] > 0 and row["requests_per_s"] > 0
    assert 0 < row["ttft_p50_s"] <= row["ttft_p99_s"]
    assert 0 < row["itl_p50_ms"] <= row["itl_p99_ms"]


def test_failed_requests_are_counted_not_raised() -> None:
    with SSEServer(fail_every=3) as server:
        result = run_load(server.url + "/v1", "m", concurrency=2, requests=9, max_tokens=4)
    assert result.errors == 3
    assert result.summary()["first_error"].startswith("HTTP 500")
    assert result.total_tokens == 6 * 4


def test_refused_connection_is_an_error_row() -> None:
    result = run_load("http://127.0.0.1:9", "m", concurrency=1, requests=2)
    assert result.errors == 2
    assert "Connection" in result.samples[0].error or "refused" in result.samples[0].error.lower()


def test_sweep_gives_one_result_per_level() -> None:
    with SSEServer() as server:
        results = sweep(server.url, "m", [1, 2], requests=4, max_tokens=4)
    assert [r.concurrency for r in results] == [1, 2]
    assert all(r.errors == 0 for r in results)


def test_bad_arguments() -> None:
    with pytest.raises(BenchError):
        run_load("ftp://x", "m", 1, 1)
    with pytest.raises(BenchError):
        run_load("http://127.0.0.1:9", "m", 0, 1)
    with pytest.raises(BenchError):
        run_load("http://127.0.0.1:9", "m", 1, 1, endpoint="embeddings")


def test_percentile_interpolates() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_against_a_real_ggufrun_serve(tmp_path) -> None:
    """A bounded run against `ggufrun serve` on loopback (a tiny synthetic model): no errors."""
    import json
    import os
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    from ggufrun.synthetic import write_synthetic

    model = write_synthetic(tmp_path / "tiny.gguf", shape="tiny", quant="q8_0")
    port = _free_port()
    root = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ggufrun.cli.main", "serve", str(model), "--served-model-name", "tiny", "--port", str(port),
         "--n-ctx", "512", "--threads", "1", "--parallel", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": root})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    if json.load(resp).get("status") == "ready":
                        break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "serve exited"
            assert time.monotonic() < deadline, "ggufrun serve did not become ready in 60 s"
            time.sleep(0.2)
        for endpoint in ("completions", "chat"):
            result = run_load(f"http://127.0.0.1:{port}", "tiny", concurrency=2, requests=6, max_tokens=8, endpoint=endpoint)
            assert result.errors == 0, result.summary()["first_error"]
            assert result.total_tokens > 0 and result.ttft(50) is not None
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_params_and_per_client_variants_reach_the_server() -> None:
    """Every request carries the sampling params; client thread i adds variants[i % 2], so half of
    the clients send a response_format (serve_load.py --json-schema-half relies on this)."""
    fmt = {"response_format": {"type": "json_object"}}
    with SSEServer() as server:
        result = run_load(server.url, "m", concurrency=4, requests=8, max_tokens=4, endpoint="chat",
                          params={"temperature": 0.8, "top_p": 0.95}, variants=[fmt, {}], keep_text=True)
        bodies = list(server.bodies)
    assert result.errors == 0 and len(bodies) == 8
    assert all(b["temperature"] == 0.8 and b["top_p"] == 0.95 and b["stream"] is True for b in bodies)
    assert 1 <= sum("response_format" in b for b in bodies) <= 7
    assert all(s.text == " w0 w1 w2 w3" for s in result.samples)
    by_client = {s.client for s in result.samples}
    assert by_client == {0, 1, 2, 3}
    # greedy unless told otherwise
    with SSEServer() as server:
        plain = run_load(server.url, "m", concurrency=1, requests=1, max_tokens=2)
        assert server.bodies[0]["temperature"] == 0
    assert plain.samples[0].text == "" and plain.total_tokens == 2  # text is kept only when asked
    with pytest.raises(BenchError):
        run_load("http://127.0.0.1:9", "m", concurrency=1, requests=1, variants=[])
