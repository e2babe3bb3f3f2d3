"""ggufrun serve, end to end: a real server process on a free loopback port, a tiny synthetic model,
and real clients (the official openai package, curl, requests, raw sockets, headless Chromium)."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from serverutil import ServerProcess, free_port, serve

# The tiny random model rarely ends a turn, but can: ignore_eos makes reply lengths exact.
EXACT = {"ignore_eos": True}


@pytest.fixture(scope="module")
def server_env(tmp_path_factory: pytest.TempPathFactory, seed_amx_verdict: Callable[[Path], None]) -> dict[str, str]:
    """Module-scoped servers outlive the per-test GGUFRUN_HOME, so they get their own, and no hub."""
    home = tmp_path_factory.mktemp("serve-home")
    seed_amx_verdict(home)
    return {"GGUFRUN_HOME": str(home), "GGUFRUN_HF_ENDPOINT": "http://127.0.0.1:9", "GGUFRUN_MS_ENDPOINT": "http://127.0.0.1:9"}


@pytest.fixture(scope="module")
def srv(tiny_model: Path, server_env: dict[str, str]) -> Iterator[ServerProcess]:
    with serve(str(tiny_model), "--served-model-name", "tiny", "--parallel", "4", "--n-ctx", "512", "--threads", "1",
               env=server_env) as server:
        yield server


@pytest.fixture(scope="module")
def one_slot(tiny_model: Path, server_env: dict[str, str]) -> Iterator[ServerProcess]:
    """One slot and room for one waiting request: a third concurrent request gets 503 at once."""
    with serve(str(tiny_model), "--served-model-name", "tiny", "--parallel", "1", "--max-queue", "1", "--threads", "1",
               env=server_env) as server:
        yield server


def client(server: ServerProcess, api_key: str = "unused") -> Any:
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=60)


def post(server: ServerProcess, path: str, body: Any, **kwargs: Any) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(f"{server.url}{path}", data=data, headers={"Content-Type": "application/json"}, timeout=60, **kwargs)


def metrics(server: ServerProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return parse_prometheus(requests.get(f"{server.url}/metrics", timeout=10).text)


def parse_prometheus(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text format 0.0.4, strictly: every sample line is NAME{LABELS} VALUE of a declared family."""
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    line_re = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
    label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in {"counter", "gauge", "histogram", "summary", "untyped"}, line
            types[name] = kind
            continue
        if not line or line.startswith("#"):
            continue
        m = line_re.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels_text, value = m.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"sample {name} without a # TYPE line"
        labels = frozenset(label_re.findall(labels_text or ""))
        samples[(name, labels)] = float(value)
    return samples


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# ---- the API with the official clients ---------------------------------------------------------

def test_openai_client_lists_chats_completes_and_streams(srv: ServerProcess) -> None:
    c = client(srv)
    assert [m.id for m in c.models.list().data] == ["tiny"]

    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=8,
                                     temperature=0, extra_body=EXACT)
    assert chat.object == "chat.completion" and chat.model == "tiny"
    assert isinstance(chat.choices[0].message.content, str) and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 8
    assert chat.usage.prompt_tokens > 0 and chat.usage.total_tokens == chat.usage.prompt_tokens + 8

    text = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0.7, top_p=0.9, seed=3)
    assert text.object == "text_completion" and text.choices[0].finish_reason in ("stop", "length")
    assert text.usage.completion_tokens <= 5

    stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=12,
                                       stream=True, stream_options={"include_usage": True}, extra_body=EXACT)
    deltas, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            deltas.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert finish == "length" and usage is not None and usage.completion_tokens == 12
    assert len([d for d in deltas if d]) >= 2  # streamed as it was generated, not in one piece


def test_greedy_is_deterministic_and_seeded_sampling_repeats(srv: ServerProcess) -> None:
    c = client(srv)
    runs = [c.completions.create(model="tiny", prompt="abc", max_tokens=10, temperature=0, extra_body=EXACT).choices[0].text
            for _ in range(2)]
    assert runs[0] == runs[1]
    seeded = [c.completions.create(model="tiny", prompt="abc", max_tokens=10, temperature=1.0, seed=7, extra_body=EXACT).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_stop_sequences_cut_the_reply(srv: ServerProcess) -> None:
    c = client(srv)
    full = c.completions.create(model="tiny", prompt="hello", max_tokens=40, temperature=0, extra_body=EXACT).choices[0].text
    assert len(full) > 4
    stop = full[2:4]
    cut = c.completions.create(model="tiny", prompt="hello", max_tokens=40, temperature=0, stop=[stop], extra_body=EXACT)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.index(stop)]


def test_seed_curl_and_requests_calls(srv: ServerProcess) -> None:
    curl = shutil.which("curl")
    if curl:
        out = subprocess.run([curl, "-s", "-X", "POST", srv.url, "-H", "Content-Type: application/json", "-d", '{"prompt": "你好"}'],
                             capture_output=True, timeout=60, check=True)
        answer = json.loads(out.stdout)
        assert answer["status"] == 200 and isinstance(answer["response"], str)
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", answer["time"])
        seed_chat = json.dumps({"model": "tiny", "messages": [{"role": "system", "content": "假设你是一个文本格式化机器人"},
                                                              {"role": "user", "content": "输入内容：今天天气不错，"}],
                                "max_tokens": 700, "temperature": 0})
        out = subprocess.run([curl, "-s", f"{srv.url}/v1/chat/completions", "-H", "Content-Type: application/json", "-d", seed_chat],
                             capture_output=True, timeout=120, check=True)
        assert json.loads(out.stdout)["choices"][0]["finish_reason"] in ("stop", "length")

    # the seed's requests client, verbatim apart from the URL
    headers = {"Content-Type": "application/json"}
    response = requests.post(url=srv.url, headers=headers, data=json.dumps({"prompt": "你好"}), timeout=60)
    assert isinstance(response.json()["response"], str) and response.json()["status"] == 200


def test_eight_concurrent_streams_all_complete(srv: ServerProcess) -> None:
    c = client(srv)
    results: list[tuple[int, str | None, int]] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            stream = c.completions.create(model="tiny", prompt=f"story number {i}", max_tokens=48, stream=True,
                                          stream_options={"include_usage": True}, extra_body=EXACT)
            pieces, finish, tokens = 0, None, -1
            for chunk in stream:
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    pieces += bool(choice.text)
                    finish = choice.finish_reason or finish
            results.append((tokens, finish, pieces))
        except BaseException as exc:  # noqa: BLE001 -- reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == 8
    assert all(tokens == 48 and finish == "length" and pieces >= 1 for tokens, finish, pieces in results), results


def test_embeddings(srv: ServerProcess) -> None:
    r = post(srv, "/v1/embeddings", {"model": "tiny", "input": ["one sentence", "another one"]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1]
    assert len(data[0]["embedding"]) == len(data[1]["embedding"]) > 0
    assert abs(sum(x * x for x in data[0]["embedding"]) - 1.0) < 1e-3
    assert data[0]["embedding"] != data[1]["embedding"]  # different text, different vector
    assert r.json()["usage"]["prompt_tokens"] >= 4
    assert client(srv).embeddings.create(model="tiny", input="hi").data[0].embedding
    r = post(srv, "/v1/embeddings", {"model": "tiny", "input": ["fine", " "]})
    assert r.status_code == 400 and "input[1]" in r.json()["error"]["message"]


# ---- bad input: the right status, and the server keeps serving ----------------------------------

def test_bad_input_statuses(srv: ServerProcess) -> None:
    r = post(srv, "/v1/chat/completions", b"{not json")
    assert r.status_code == 400 and "Malformed JSON" in r.json()["error"]["message"]

    r = post(srv, "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and "tiny" in r.json()["error"]["message"]

    r = post(srv, "/v1/completions", {"model": "tiny", "prompt": "word " * 2000})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["n_prompt_tokens"] > error["n_ctx"] == 512 and str(error["n_ctx"]) in error["message"]

    for field, bad in (("temperature", -1), ("max_tokens", 0), ("max_tokens", -5), ("top_p", 2), ("temperature", "hot")):
        r = post(srv, "/v1/completions", {"model": "tiny", "prompt": "x", field: bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, bad, r.text)
    r = post(srv, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"
    r = post(srv, "/v1/chat/completions", {"model": "tiny"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = post(srv, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [1, 2]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0]"
    r = post(srv, "/v1/completions", {"model": "tiny", "prompt": "x", "seed": 2**64})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"

    r = post(srv, "/v1/completions", b'{"prompt": "' + b"a" * (9 * 1024 * 1024) + b'"}')
    assert r.status_code == 413

    ok = post(srv, "/v1/completions", {"model": "tiny", "prompt": "still alive", "max_tokens": 3, **EXACT})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_max_tokens_is_capped_by_the_context(srv: ServerProcess) -> None:
    r = post(srv, "/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": 100000, **EXACT})
    assert r.status_code == 200
    usage = r.json()["usage"]
    assert r.json()["choices"][0]["finish_reason"] == "length" and usage["total_tokens"] <= 512


def open_stream(server: ServerProcess, max_tokens: int) -> http.client.HTTPConnection:
    body = json.dumps({"model": "tiny", "prompt": "long", "max_tokens": max_tokens, "stream": True, **EXACT})
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    return conn


def hang_up(conn: http.client.HTTPConnection) -> None:
    if conn.sock:
        conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


def test_queue_full_is_503_and_disconnects_free_slot_and_queue(one_slot: ServerProcess) -> None:
    running = open_stream(one_slot, 4000)
    resp = running.getresponse()
    assert resp.status == 200
    for _ in range(3):  # mid-stream
        assert resp.readline()
    waiting = open_stream(one_slot, 4000)  # takes the one queue place
    deadline = time.monotonic() + 10
    while not value(metrics(one_slot), "ggufrun_queue_depth", model="tiny") and time.monotonic() < deadline:
        time.sleep(0.02)

    busy = post(one_slot, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert busy.status_code == 503 and busy.headers.get("Retry-After")

    hang_up(waiting)  # gone while queued
    hang_up(running)  # gone mid-stream
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        samples = metrics(one_slot)
        if not value(samples, "ggufrun_active_requests", model="tiny") and not value(samples, "ggufrun_queue_depth", model="tiny"):
            break
        time.sleep(0.05)
    assert value(samples, "ggufrun_active_requests", model="tiny") == 0
    assert value(samples, "ggufrun_queue_depth", model="tiny") == 0
    assert value(samples, "ggufrun_completions_total", model="tiny", reason="cancelled") >= 1
    again = post(one_slot, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2, **EXACT})
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 2


def test_metrics_parse_and_count(srv: ServerProcess) -> None:
    post(srv, "/v1/completions", {"model": "tiny", "prompt": "count me", "max_tokens": 4, **EXACT})
    samples = metrics(srv)
    assert value(samples, "ggufrun_requests_total", route="/v1/completions", status="200") >= 1
    assert value(samples, "ggufrun_generated_tokens_total", model="tiny") >= 4
    assert value(samples, "ggufrun_prompt_tokens_total", model="tiny") > 0
    assert ("ggufrun_queue_depth", frozenset({("model", "tiny")})) in samples
    assert ("ggufrun_tokens_per_second", frozenset()) in samples
    buckets = sorted((float("inf") if dict(labels)["le"] == "+Inf" else float(dict(labels)["le"]), v)
                     for (name, labels), v in samples.items() if name == "ggufrun_time_to_first_token_seconds_bucket")
    assert buckets and all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))
    assert buckets[-1][1] == value(samples, "ggufrun_time_to_first_token_seconds_count", model="tiny") >= 1


def test_health_and_page(srv: ServerProcess) -> None:
    health = requests.get(f"{srv.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ready"
    page = requests.get(srv.url, timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/chat/completions" in page.text and "http://" not in page.text and "https://" not in page.text
    assert "access-control-allow-origin" not in {k.lower() for k in page.headers}  # CORS is off by default


# ---- security, configuration, shutdown ----------------------------------------------------------

def test_api_key_and_cors(tiny_model: Path, server_env: dict[str, str]) -> None:
    with serve(str(tiny_model), "--served-model-name", "tiny", "--api-key", "s3cret", "--cors", "http://app.example",
               "--threads", "1", env=server_env) as s:
        assert requests.get(f"{s.url}/health", timeout=10).status_code == 200
        for path in ("/v1/models", "/metrics"):
            assert requests.get(f"{s.url}{path}", timeout=10).status_code == 401, path
        page = requests.get(s.url, timeout=10)  # the page is public; it asks for the key and sends it
        assert page.status_code == 200 and "Authorization" in page.text
        wrong = requests.get(f"{s.url}/v1/models", headers={"Authorization": "Bearer nope"}, timeout=10)
        assert wrong.status_code == 401 and wrong.headers.get("WWW-Authenticate") == "Bearer"
        assert post(s, "/", {"prompt": "hi"}).status_code == 401
        ok = requests.get(f"{s.url}/v1/models", headers={"Authorization": "Bearer s3cret"}, timeout=10)
        assert ok.status_code == 200
        assert client(s, "s3cret").completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens <= 2
        preflight = requests.options(f"{s.url}/v1/chat/completions", timeout=10, headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os,x-stainless-retry-count"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        assert "x-stainless-os" in preflight.headers["access-control-allow-headers"].lower()  # openai-node in a browser
        evil = requests.options(f"{s.url}/v1/chat/completions", timeout=10, headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert evil.status_code == 400
        assert "sessionStorage" in page.text


def test_config_file_models_load_on_demand_with_lru(tiny_model_factory: Any, tmp_path: Path, server_env: dict[str, str]) -> None:
    qwen, llama = tiny_model_factory("qwen2", "q8_0", True), tiny_model_factory("llama", "q8_0", True)
    config = tmp_path / "serve.toml"
    config.write_text(
        "[server]\nmax_loaded = 1\nparallel = 2\n\n"
        f'[[models]]\nmodel = "{qwen}"\nserved_model_name = ["qwen:tiny", "q"]\nthreads = 1\nn_ctx = 256\n\n'
        f'[[models]]\nmodel = "{llama}"\nserved_model_name = "llama:tiny"\nthreads = 1\nembeddings = false\n',
        encoding="utf-8")
    with serve("--config", str(config), env=server_env) as s:
        assert requests.get(f"{s.url}/health", timeout=10).json()["models"] == {}  # nothing loads before it is asked for
        c = client(s)
        assert [m.id for m in c.models.list().data] == ["qwen:tiny", "llama:tiny"]
        assert c.completions.create(model="q", prompt="x", max_tokens=2, extra_body=EXACT).usage.completion_tokens == 2
        assert requests.get(f"{s.url}/health", timeout=10).json()["models"] == {"qwen:tiny": "ready"}
        assert c.completions.create(model="llama:tiny", prompt="x", max_tokens=2, extra_body=EXACT).model == "llama:tiny"
        assert requests.get(f"{s.url}/health", timeout=10).json()["models"] == {"llama:tiny": "ready"}  # qwen evicted
        assert c.completions.create(model=str(qwen), prompt="x", max_tokens=2, extra_body=EXACT).usage.completion_tokens == 2
        r = post(s, "/v1/embeddings", {"model": "llama:tiny", "input": "x"})
        assert r.status_code == 400 and "embeddings" in r.json()["error"]["message"]
        long = post(s, "/v1/completions", {"model": "q", "prompt": "word " * 400})
        assert long.status_code == 400 and long.json()["error"]["n_ctx"] == 256


def test_a_model_that_fails_to_load_on_demand_is_a_500_and_the_rest_keeps_serving(
        tiny_model: Path, tmp_path: Path, server_env: dict[str, str]) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_model.read_bytes()[:5000])  # truncated mid-tensor-data
    config = tmp_path / "serve.toml"
    config.write_text(f'[[models]]\nmodel = "{tiny_model}"\nserved_model_name = "good"\nthreads = 1\n\n'
                      f'[[models]]\nmodel = "{broken}"\nserved_model_name = "broken"\n', encoding="utf-8")
    with serve("--config", str(config), env=server_env) as s:
        r = post(s, "/v1/completions", {"model": "broken", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 500 and "broken" in r.json()["error"]["message"]
        ok = post(s, "/v1/completions", {"model": "good", "prompt": "x", "max_tokens": 2, **EXACT})
        assert ok.status_code == 200


def test_bad_config_fails_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A refusal, so through the real entry point in this process (cliutil.run_here)."""
    from cliutil import run_here

    config = tmp_path / "serve.toml"
    config.write_text('[[models]]\nmodel = "x.gguf"\nn_ctxx = 5\n', encoding="utf-8")
    out = run_here(capsys, "serve", "--config", str(config), text=True)
    assert out.returncode != 0 and "n_ctxx" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["no-such-model", "corrupt"])
def test_a_model_that_cannot_load_stops_serve_with_one_line(name: str, tmp_path: Path) -> None:
    if name == "corrupt":
        bad = tmp_path / "corrupt.gguf"
        bad.write_bytes(b"GGUF" + b"\x00" * 60)
        name = str(bad)
    out = subprocess.run([sys.executable, "-m", "ggufrun.cli.main", "serve", name, "--port", str(free_port())], capture_output=True, check=False,
                         text=True, timeout=60)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("Error: ")


@pytest.mark.slow  # seconds of real waiting; the default suite stays under 90 s
def test_sigterm_exits_within_ten_seconds_during_a_stream(tiny_model: Path, server_env: dict[str, str]) -> None:
    with serve(str(tiny_model), "--threads", "1", "--served-model-name", "tiny", env=server_env) as s:
        got: list[bytes] = []

        def stream() -> None:
            try:
                with requests.post(f"{s.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 4000,
                                                                     "stream": True, **EXACT}, stream=True, timeout=30) as r:
                    for line in r.iter_lines():
                        got.append(line)
            except requests.RequestException:
                pass

        t = threading.Thread(target=stream)
        t.start()
        while not got:
            time.sleep(0.01)
        seconds = s.stop(signal.SIGTERM, timeout=15)
        t.join(15)
        assert seconds < 10, s.log()[-2000:]
        assert s.proc.returncode in (0, -signal.SIGTERM), s.log()[-2000:]  # uvicorn re-raises the signal it caught
        assert "Traceback" not in s.log()


def test_loopback_detection() -> None:
    from ggufrun.server import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.com")


# ---- the web page in headless Chromium ----------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"


class DevTools:
    """Chrome DevTools protocol over --remote-debugging-pipe (fd 3 in, fd 4 out, NUL-separated JSON)."""

    def __init__(self, profile: Path) -> None:
        """A browser with its profile in ``profile`` and a TMPDIR of its own, which ``close`` removes:
        killed, it leaves a folder there (for its singleton's socket, whose path must stay short:
        a pytest tmp_path is too long for it)."""
        self.tmp = tempfile.mkdtemp(prefix="ggufrun-chromium-")
        to_r, self._to = os.pipe()
        self._from, from_w = os.pipe()

        def wire() -> None:
            # Copies above 4 first: a pipe end that is already fd 3 or 4 would be clobbered, or kept
            # close-on-exec (dup2 onto itself changes nothing), by a direct dup2.
            read_end, write_end = os.dup(to_r), os.dup(from_w)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        try:
            self.proc = subprocess.Popen(
                [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
                # close_fds would run after preexec_fn and close 3 and 4 again; our other fds are O_CLOEXEC anyway
                preexec_fn=wire, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={**os.environ, "TMPDIR": self.tmp}, start_new_session=True)  # its own group: close kills its helpers
        except BaseException:
            shutil.rmtree(self.tmp)
            raise
        os.close(to_r)
        os.close(from_w)
        self._buf = b""
        self._id = 0
        self.session: str | None = None

    def call(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._to, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    assert "error" not in reply, reply
                    return reply["result"]
            import select

            ready, _, _ = select.select([self._from], [], [], 0.5)
            if ready:
                chunk = os.read(self._from, 65536)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk
        raise TimeoutError(method)

    def open(self, url: str) -> None:
        """A new tab on ``url``, this client attached to it."""
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Runtime.enable")

    def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        """The first truthy value of ``expression`` in the page, polled; AssertionError past ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.evaluate(expression)
            if result:
                return result
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expression}")

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the browser and the renderers it started
        except ProcessLookupError:
            pass
        self.proc.wait()
        os.close(self._to)
        os.close(self._from)
        shutil.rmtree(self.tmp)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt-get install chromium)")
def test_web_page_streams_a_reply_in_headless_chromium(tiny_model: Path, server_env: dict[str, str], tmp_path: Path) -> None:
    # Greedy decoding makes the random model's reply the same every run; max-tokens bounds it.
    with serve(str(tiny_model), "--served-model-name", "tiny", "--threads", "1", "--temperature", "0", "--max-tokens", "12",
               env=server_env) as s:
        browser = DevTools(tmp_path / "chromium-profile")
        try:
            browser.open(s.url)
            wait_for = browser.wait_for

            assert wait_for("document.querySelector('#model option') && document.querySelector('#model').value") == "tiny"
            browser.evaluate("document.getElementById('input').value = 'Hello there'; document.getElementById('form').requestSubmit(); true")
            wait_for("document.querySelector('.msg.assistant.done') !== null")
            assert browser.evaluate("document.querySelector('.msg.assistant').classList.contains('error')") is False
            assert browser.evaluate("document.querySelector('.msg.user .text').textContent") == "Hello there"
            stats = browser.evaluate("document.getElementById('stats').textContent")
            assert re.match(r"(\d+) chunks", stats) and int(stats.split()[0]) > 1, stats  # streamed, chunk by chunk
        finally:
            browser.close()


def _metric(server: ServerProcess, name: str, label: str = "") -> float:
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name) and label in line)


# Records what the page sends and makes the reply unable to end by itself (ignore_eos), so that
# Stop, not the model, ends it; the page itself is unchanged.
_RECORD_FETCH = """
window.sent = [];
const realFetch = window.fetch;
window.fetch = (url, options) => {
  if (url === "/v1/chat/completions") {
    const body = JSON.parse(options.body);
    window.sent.push(body);
    options = {...options, body: JSON.stringify({...body, ignore_eos: true})};
  }
  return realFetch(url, options);
};
true
"""


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt-get install chromium)")
def test_web_page_sends_its_settings_and_stop_cancels_the_generation(smollm2_gguf: Path, server_env: dict[str, str],
                                                                      tmp_path: Path) -> None:
    """`ggufrun serve` (the default model) and its page: the settings are filled in with the model's
    system prompt and defaults and go with the request; Stop aborts the stream and the server
    cancels the job and frees its slot."""
    from ggufrun import prompts

    home = Path(server_env["GGUFRUN_HOME"])
    dest = home / "models" / "smollm2-135m" / smollm2_gguf.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        try:
            os.link(smollm2_gguf, dest)
        except OSError:
            shutil.copy2(smollm2_gguf, dest)
    with serve("--threads", "1", "--n-ctx", "2048", env={**server_env, "GGUFRUN_OFFLINE": "1"}) as s:
        browser = DevTools(tmp_path / "chromium-profile")
        try:
            browser.open(s.url)
            wait_for = browser.wait_for

            value = "document.getElementById('{}').value".format
            wait_for("document.body.dataset.defaults === 'loaded'")
            assert browser.evaluate(value("system")) == prompts.resolve_system("@assistant")
            assert (browser.evaluate(value("temperature")), browser.evaluate(value("max-tokens"))) == ("0.2", "2048")
            assert browser.evaluate("document.getElementById('stop').disabled") is True
            browser.evaluate(_RECORD_FETCH)
            browser.evaluate("document.getElementById('toggle-settings').click(); document.getElementById('temperature').value = '0.7';"
                             "document.getElementById('input').value = 'Tell me a story.'; document.getElementById('send').click(); true")
            wait_for("document.querySelector('.msg.assistant .text').textContent.length > 0")
            assert _metric(s, "ggufrun_active_requests") == 1
            browser.evaluate("document.getElementById('stop').click(); true")
            wait_for("document.querySelector('.msg.assistant.done') !== null")
            assert browser.evaluate("document.querySelector('.msg.assistant').className") == "msg assistant stopped done"
            assert "(stopped)" in browser.evaluate("document.getElementById('stats').textContent")
            assert browser.evaluate("[document.getElementById('send').disabled, document.getElementById('stop').disabled]") == [False, True]
            deadline = time.monotonic() + 30
            while (_metric(s, "ggufrun_active_requests") or not _metric(s, "ggufrun_completions_total", 'reason="cancelled"')) \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _metric(s, "ggufrun_completions_total", 'reason="cancelled"') == 1, "the server went on generating"
            assert _metric(s, "ggufrun_active_requests") == 0
            sent = browser.evaluate("window.sent")
        finally:
            browser.close()
        assert sent == [{"model": "default", "stream": True, "temperature": 0.7, "max_tokens": 2048,
                         "messages": [{"role": "system", "content": prompts.resolve_system("@assistant")},
                                      {"role": "user", "content": "Tell me a story."}]}]
        assert "Traceback" not in s.log()


# ---- pieces without a server ---------------------------------------------------------------------

def test_stop_string_helpers() -> None:
    from ggufrun.generation import split_stop

    assert split_stop("abc<|im_end|>x", ["<|im_end|>"]) == ("abc", "", "<|im_end|>")
    assert split_stop("abc", ["zz"]) == ("abc", "", None)
    assert split_stop("one END two STOP", ["STOP", "END"]) == ("one ", "", "END")  # the earliest wins
    assert split_stop("hello <|im", ["<|im_end|>"]) == ("hello ", "<|im", None)  # may become the stop
    assert split_stop("aXY", ["XYZ", "YZW"]) == ("a", "XY", None)


def test_request_validation_names_the_field() -> None:
    from ggufrun.server.protocol import ApiError, parse_gen, parse_messages, parse_prompts

    ok = parse_gen({"model": "m", "max_tokens": 5, "stop": "x", "temperature": 0, "seed": 3, "stream": True,
                    "stream_options": {"include_usage": True}}, chat=False)
    assert (ok.max_tokens, ok.stop, ok.sampling, ok.stream, ok.include_usage) == (5, ["x"], {"temperature": 0.0, "seed": 3}, True, True)
    assert parse_gen({"max_completion_tokens": 7}, chat=True).max_tokens == 7
    for body, param in (({"temperature": -0.1}, "temperature"), ({"temperature": True}, "temperature"), ({"top_k": 1.5}, "top_k"),
                        ({"max_tokens": 0}, "max_tokens"), ({"stop": [""]}, "stop"), ({"n": 0}, "n"), ({"n": 17}, "n"), ({"stream": "yes"}, "stream")):
        with pytest.raises(ApiError) as err:
            parse_gen(body, chat=False)
        assert err.value.status == 400 and err.value.param == param, body
    assert parse_messages({"messages": [{"role": "developer", "content": "be brief"}]})[0]["role"] == "system"
    assert parse_prompts({"prompt": ["only one"]}) == ["only one"] and parse_prompts({"prompt": [1, 2]}) == [[1, 2]]
    assert parse_prompts({"prompt": ["two", "prompts"]}) == ["two", "prompts"]
    with pytest.raises(ApiError):
        parse_prompts({"prompt": ["text", 3]})


def test_serve_config_is_strict(tmp_path: Path) -> None:
    from ggufrun.errors import ConfigError
    from ggufrun.server.models import read_serve_config

    good = tmp_path / "good.toml"
    good.write_text('[server]\nport = 14000\ncors = "http://a"\n[[models]]\nmodel = "m.gguf"\nserved_model_name = "m"\n'
                    'temperature = 0.2\nparallel = 2\n', encoding="utf-8")
    config = read_serve_config(good)
    assert (config.port, config.cors, config.models[0].id, config.models[0].settings, config.models[0].parallel) == (
        14000, ("http://a",), "m", {"temperature": 0.2}, 2)
    for text, word in (('[[models]]\nmodel = "a"\n[[models]]\nmodel = "b"\nserved_model_name = "a"\n', "'a'"),
                       ('[server]\nprot = 1\n[[models]]\nmodel = "a"\n', "prot"),
                       ('[[models]]\nmodel = "a"\ntemperature = -1\n', "temperature"),
                       ('[server]\nport = 1\n', "no models"),
                       ('[server]\ncors = 5\n[[models]]\nmodel = "a"\n', "cors"),
                       ('[server]\nport = 70000\n[[models]]\nmodel = "a"\n', "port must be 0-65535"),
                       # unnamed files of one base name would share an engine and a slots folder
                       ('[[models]]\nmodel = "/x/m.gguf"\n[[models]]\nmodel = "/y/m.gguf"\n', "'m.gguf' is used by two")):
        bad = tmp_path / "bad.toml"
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match=word):
            read_serve_config(bad)
