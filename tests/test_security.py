"""A web page cannot drive a local server (issue 19), through real `ggufrun serve` processes: the
Host allow-list against DNS rebinding, cross-site POSTs refused by Origin while real clients
(openai, anthropic, ollama, curl -d) keep working, the Authorization scheme case-insensitive,
and no filesystem path in an API error."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import ollama
import openai
import pytest
import requests
from serverutil import ServerProcess, serve

from ggufrun.server.api_errors import scrub_paths
from ggufrun.server.security import HostPolicy

BODY = {"model": "tiny", "prompt": "x", "max_tokens": 2}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, seed_amx_verdict: Any) -> dict[str, str]:
    home = tmp_path_factory.mktemp("sec-home")
    seed_amx_verdict(home)  # the session's AMX verdict and trial loads: no second check per server
    return {"GGUFRUN_HOME": str(home)}


@pytest.fixture(scope="module")
def local(tiny_model: Path, env: dict[str, str]) -> Iterator[ServerProcess]:
    """A keyless loopback server, as `ggufrun serve NAME` starts one, with one page allowed by --cors."""
    with serve(str(tiny_model), "--served-model-name", "tiny", "--n-ctx", "256", "--threads", "1",
               "--cors", "http://app.example", env=env) as srv:
        yield srv


def get(srv: ServerProcess, path: str, **headers: str) -> requests.Response:
    return requests.get(f"{srv.url}{path}", headers=headers, timeout=30)


def test_only_loopback_host_names_are_served_by_default(local: ServerProcess) -> None:
    port = local.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"app.localhost:{port}", "LOCALHOST"):
        assert get(local, "/v1/models", Host=host).status_code == 200, host
    for path, shape in (("/v1/models", lambda b: b["error"]["message"]), ("/api/tags", lambda b: b["error"]),
                        ("/v1/messages", lambda b: b["error"]["message"])):
        r = get(local, path, Host=f"evil.example:{port}")  # a rebound name: same IP, foreign Host
        assert r.status_code == 403, path
        assert "evil.example" in shape(r.json()) and "--allowed-hosts" in shape(r.json())
    r = requests.post(f"{local.url}/v1/completions", json=BODY, headers={"Host": f"evil.example:{port}"}, timeout=30)
    assert r.status_code == 403


def test_allowed_hosts_widens_the_list_and_star_allows_any(tiny_model: Path, env: dict[str, str]) -> None:
    with serve(str(tiny_model), "--n-ctx", "256", "--threads", "1", "--allowed-hosts", "llm.lan,other.lan",
               "--allowed-hosts", "third.lan", env=env) as srv:
        assert all(get(srv, "/health", Host=h).status_code == 200 for h in ("llm.lan", "other.lan:80", "third.lan"))
        assert get(srv, "/health", Host="evil.example").status_code == 403
    policy = HostPolicy("127.0.0.1", ["*"])
    assert policy.allows("evil.example") and policy.allows("anything:1")
    wide = HostPolicy("0.0.0.0")  # every interface: any address is this server's, names still need listing
    assert wide.allows("192.168.1.20:13003") and wide.allows("[fe80::1]") and not wide.allows("evil.example")
    bound = HostPolicy("10.1.2.3")
    assert bound.allows("10.1.2.3:13003") and bound.allows("127.0.0.1") and not bound.allows("10.1.2.4")


def test_cross_site_posts_are_refused_and_real_clients_still_work(local: ServerProcess) -> None:
    url = f"{local.url}/v1/completions"
    # what a page's <form> or fetch(no-cors) sends: a simple request, no preflight
    for origin in ("http://evil.example", "null", "http://127.0.0.1:1"):
        r = requests.post(url, data=json.dumps(BODY), headers={"Content-Type": "text/plain", "Origin": origin}, timeout=30)
        assert r.status_code == 403 and "--cors" in r.json()["error"]["message"], origin
    r = requests.post(f"{local.url}/api/generate", data=json.dumps({"model": "tiny", "prompt": "x", "stream": False}),
                      headers={"Content-Type": "application/x-www-form-urlencoded", "Origin": "http://evil.example"}, timeout=30)
    assert r.status_code == 403 and "error" in r.json()
    # the chat page (same origin) and a page --cors allows
    for origin, host in ((local.url, f"127.0.0.1:{local.port}"), (f"http://localhost:{local.port}", f"localhost:{local.port}"),
                         ("http://app.example", f"127.0.0.1:{local.port}")):
        r = requests.post(url, json=BODY, headers={"Origin": origin, "Host": host}, timeout=60)
        assert r.status_code == 200, (origin, r.text)
    # real clients send no Origin: curl -d (a form content type), openai, anthropic, ollama
    out = subprocess.run(["curl", "-s", "-d", json.dumps(BODY), url], capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout)["usage"]["completion_tokens"] <= 2
    oa = openai.OpenAI(base_url=f"{local.url}/v1", api_key="none", max_retries=0)
    assert oa.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens <= 2
    an = anthropic.Anthropic(base_url=local.url, api_key="none", max_retries=0)
    assert an.messages.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": "x"}]).usage.output_tokens <= 2
    ol = ollama.Client(host=local.url)
    assert ol.generate(model="tiny", prompt="x", options={"num_predict": 2}).done


def test_bearer_scheme_is_case_insensitive(tiny_model: Path, env: dict[str, str]) -> None:
    with serve(str(tiny_model), "--n-ctx", "256", "--threads", "1", "--api-key", "s3cret", env=env) as srv:
        for value in ("Bearer s3cret", "bearer s3cret", "BEARER s3cret", "bearer  s3cret"):
            assert get(srv, "/v1/models", Authorization=value).status_code == 200, value
        for value in ("bearer nope", "Basic s3cret", "s3cret", "bearers3cret"):
            assert get(srv, "/v1/models", Authorization=value).status_code == 401, value


def test_a_model_that_fails_to_load_does_not_tell_its_path(tiny_model: Path, tmp_path: Path, env: dict[str, str]) -> None:
    bad = tmp_path / "models" / "broken.gguf"
    bad.parent.mkdir()
    bad.write_bytes(tiny_model.read_bytes()[:4096])  # a truncated file: it resolves, then fails to load
    config = tmp_path / "serve.toml"
    config.write_text(f'[[models]]\nmodel = "{tiny_model}"\nserved_model_name = "tiny"\nthreads = 1\nn_ctx = 256\n\n'
                      f'[[models]]\nmodel = "{bad}"\nserved_model_name = "broken"\nthreads = 1\n', encoding="utf-8")
    with serve("--config", str(config), env=env) as srv:
        for path, body in (("/v1/completions", {**BODY, "model": "broken"}),
                           ("/api/generate", {"model": "broken", "prompt": "x", "stream": False}),
                           ("/v1/messages", {"model": "broken", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]})):
            r = requests.post(f"{srv.url}{path}", json=body, timeout=60)
            assert r.status_code == 500, (path, r.text)
            assert "broken.gguf" in r.text and str(tmp_path) not in r.text and str(Path.home()) not in r.text, r.text
        assert str(tmp_path) in srv.log()  # the operator's log keeps it


def test_scrub_paths_keeps_routes_and_cuts_file_paths(tmp_path: Path) -> None:
    f = tmp_path / "deep" / "model.gguf"
    assert scrub_paths(f"llama.cpp could not load {f}.") == "llama.cpp could not load model.gguf."
    assert scrub_paths(f"'{f}' is truncated") == "'model.gguf' is truncated"
    assert scrub_paths("No route POST /v1/chat/completions/x.") == "No route POST /v1/chat/completions/x."
