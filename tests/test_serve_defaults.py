"""What `ggufrun serve` gives a request that leaves things out, through real servers and clients:
`serve` with no name serves the registry's default model and says where it listens; a registry model's
system prompt and sampling defaults apply on every API unless the request has its own (as Ollama applies
a Modelfile's SYSTEM and PARAMETERs); and every reply has a finite default length (README, "Defaults a
request gets")."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from serverutil import ServerProcess, serve

from ggufrun import prompts

anthropic = pytest.importorskip("anthropic")
ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")

OWN = "Answer in one word."
QUESTION = "What is the capital of France?"
OFFLINE = {"GGUFRUN_OFFLINE": "1", "GGUFRUN_HF_ENDPOINT": "http://127.0.0.1:9", "GGUFRUN_MS_ENDPOINT": "http://127.0.0.1:9"}


def _place(file: Path, home: Path, entry: str, name: str | None = None) -> None:
    """``file`` in ``home``'s model cache as `ggufrun pull ENTRY` would leave it (a hard link)."""
    dest = home / "models" / entry / (name or file.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(file, dest)
    except OSError:
        shutil.copy2(file, dest)


@pytest.fixture(scope="module")
def default_server(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory, seed_amx_verdict: Any) -> Iterator[ServerProcess]:
    """`ggufrun serve --port 0` with no name, the default model already pulled, offline."""
    home = tmp_path_factory.mktemp("default-home")
    seed_amx_verdict(home)  # the session's AMX verdict and trial loads: no second check per server
    _place(smollm2_gguf, home, "smollm2-135m")
    with serve("--parallel", "2", "--n-ctx", "1024", "--threads", "1", env={"GGUFRUN_HOME": str(home), **OFFLINE},
               port=0) as server:
        yield server


def test_serve_without_a_name_serves_the_default_and_prints_where(default_server: ServerProcess) -> None:
    """The issue's first contact: `ggufrun serve`, then the question the page and curl got answered in
    rambling French; with the entry's system prompt and temperature it is answered in English."""
    log = default_server.log()
    port = default_server.port
    assert port != 0
    listening = re.findall(r"Listening on (http://127\.0\.0\.1:\d+) ", log)
    page = re.findall(r"Chat page: (\S+)", log)
    assert listening == [f"http://127.0.0.1:{port}"] and page == [f"http://127.0.0.1:{port}/"], log
    assert [m["id"] for m in requests.get(f"{default_server.url}/v1/models", timeout=10).json()["data"]] == ["default"]
    html = requests.get(page[0], timeout=10)
    assert html.status_code == 200 and 'id="stop"' in html.text and 'id="system"' in html.text
    oai = openai.OpenAI(base_url=f"{default_server.url}/v1", api_key="x", max_retries=0, timeout=120)
    reply = oai.chat.completions.create(model="default", messages=[{"role": "user", "content": QUESTION}], seed=1, max_tokens=12)
    assert "Paris" in (reply.choices[0].message.content or ""), reply
    assert reply.usage.prompt_tokens > 50  # type: ignore[union-attr]  # the @assistant prompt went first
    shown = requests.post(f"{default_server.url}/api/show", json={"model": "default"}, timeout=30).json()
    assert shown["system"] == prompts.resolve_system("@assistant")  # smollm2's `system` in models.toml
    params = dict(line.split(None, 1) for line in shown["parameters"].splitlines())
    assert params["temperature"] == "0.2" and params["num_predict"] == "2048", shown["parameters"]
    assert "Traceback" not in default_server.log()


def test_start_up_lines_give_an_address_a_browser_here_can_open() -> None:
    from ggufrun.server import address_lines

    assert address_lines(("127.0.0.1", 13003)) == [
        "Listening on http://127.0.0.1:13003 (OpenAI /v1, Anthropic /v1/messages, Ollama /api)", "Chat page: http://127.0.0.1:13003/"]
    assert address_lines(("0.0.0.0", 80))[1] == "Chat page: http://127.0.0.1:80/"
    assert address_lines(("::", 8080, 0, 0)) == [
        "Listening on http://[::]:8080 (OpenAI /v1, Anthropic /v1/messages, Ollama /api)", "Chat page: http://[::1]:8080/"]
    assert address_lines(("::1", 8080, 0, 0))[1] == "Chat page: http://[::1]:8080/"


# ---- the tiny synthetic model under registry entries and a serve config ---------------------------

TINY_SYSTEM = "You are a test model. Answer every question briefly, kindly and in plain words."


@pytest.fixture(scope="module")
def tiny_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, seed_amx_verdict: Any) -> Iterator[ServerProcess]:
    """Three models on the tiny synthetic GGUF: a registry entry with a system prompt and
    temperature and max_tokens defaults (as smollm2's), the file with serve's default max_tokens
    and a system prompt from the serve config, and the file with max_tokens = 0 (until the context
    is full)."""
    home = tmp_path_factory.mktemp("tiny-home")
    seed_amx_verdict(home)
    (home / "models.toml").write_text(
        '[tinychat]\nquants = ["q8_0"]\nfile = "tiny-{quant}.gguf"\nsources = [{ hub = "huggingface", repo = "test/tiny" }]\n'
        f'system = "{TINY_SYSTEM}"\n[tinychat.defaults]\nmax_tokens = 40\ntemperature = 0.3\n', encoding="utf-8")
    _place(tiny_model, home, "tinychat", "tiny-q8_0.gguf")
    config = home / "serve.toml"
    # n_ctx per model (the command line's would win over every table): "plain" needs more than serve's default
    # max_tokens (2048) to show that it stops there; "endless" fills its context, which need not be as long
    config.write_text(f'[[models]]\nmodel = "tinychat"\nn_ctx = 2100\n[[models]]\nmodel = "{tiny_model}"\nserved_model_name = "plain"\n'
                      f'system = "Be plain."\nn_ctx = 2100\n[[models]]\nmodel = "{tiny_model}"\nserved_model_name = "endless"\n'
                      f'max_tokens = 0\nn_ctx = 300\n', encoding="utf-8")
    with serve("--config", str(config), "--threads", "1", "--parallel", "1",
               env={"GGUFRUN_HOME": str(home), **OFFLINE}) as server:
        yield server


def test_the_models_system_prompt_applies_on_every_api_unless_the_request_has_its_own(tiny_server: ServerProcess) -> None:
    url = tiny_server.url
    shown = requests.post(f"{url}/api/show", json={"model": "tinychat"}, timeout=30).json()
    assert shown["system"] == TINY_SYSTEM
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    claude = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=60)
    llama = ollama.Client(host=url, timeout=60)
    user = [{"role": "user", "content": QUESTION}]
    model = "tinychat"

    def openai_prompt(messages: list[dict[str, str]]) -> int:
        reply = oai.chat.completions.create(model=model, messages=messages, max_tokens=1)  # type: ignore[arg-type]
        return reply.usage.prompt_tokens  # type: ignore[union-attr]

    with_default = openai_prompt([{"role": "system", "content": TINY_SYSTEM}, *user])
    with_own = openai_prompt([{"role": "system", "content": OWN}, *user])
    assert with_default > with_own  # the counts tell the two prompts apart
    # Each API without a system field gets the default; with its own field, only its own.
    cases = [
        ("openai chat", openai_prompt(user), openai_prompt([{"role": "developer", "content": OWN}, *user])),
        ("responses", oai.responses.create(model=model, input=QUESTION, max_output_tokens=1).usage.input_tokens,  # type: ignore[union-attr]
         oai.responses.create(model=model, input=QUESTION, instructions=OWN, max_output_tokens=1).usage.input_tokens),  # type: ignore[union-attr]
        ("anthropic", claude.messages.create(model=model, max_tokens=1, messages=user).usage.input_tokens,  # type: ignore[arg-type]
         claude.messages.create(model=model, max_tokens=1, messages=user, system=OWN).usage.input_tokens),  # type: ignore[arg-type]
        ("anthropic count_tokens", claude.messages.count_tokens(model=model, messages=user).input_tokens,  # type: ignore[arg-type]
         claude.messages.count_tokens(model=model, messages=user, system=OWN).input_tokens),  # type: ignore[arg-type]
        ("ollama chat", llama.chat(model=model, messages=user, options={"num_predict": 1}).prompt_eval_count,
         llama.chat(model=model, messages=[{"role": "system", "content": OWN}, *user], options={"num_predict": 1}).prompt_eval_count),
        ("ollama generate", llama.generate(model=model, prompt=QUESTION, options={"num_predict": 1}).prompt_eval_count,
         llama.generate(model=model, prompt=QUESTION, system=OWN, options={"num_predict": 1}).prompt_eval_count),
    ]
    for api, without, own in cases:
        assert (without, own) == (with_default, with_own), api
    template = requests.post(f"{url}/apply-template", json={"model": model, "messages": user}, timeout=30).json()["prompt"]
    assert TINY_SYSTEM in template
    # The serve config's system prompt for a file with none of its own.
    assert requests.post(f"{url}/api/show", json={"model": "plain"}, timeout=30).json()["system"] == "Be plain."
    assert "Be plain." in requests.post(f"{url}/apply-template", json={"model": "plain", "messages": user}, timeout=30).json()["prompt"]
    assert "system" not in requests.post(f"{url}/api/show", json={"model": "endless"}, timeout=30).json()


def test_the_models_temperature_applies_unless_the_request_sets_one(tiny_server: ServerProcess) -> None:
    """The sampled tokens' logprobs are taken after temperature: the entry's default (0.3) gives the
    same ones as asking for 0.3, and asking for 1.0 gives others; on OpenAI's API and Ollama's."""
    oai = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="x", max_retries=0, timeout=60)
    llama = ollama.Client(host=tiny_server.url, timeout=60)
    user = [{"role": "user", "content": QUESTION}]

    def openai_lp(**extra: Any) -> list[float]:
        reply = oai.chat.completions.create(model="tinychat", messages=user, max_tokens=4, seed=5, logprobs=True, **extra)  # type: ignore[arg-type]
        return [t.logprob for t in reply.choices[0].logprobs.content]  # type: ignore[union-attr]

    def ollama_lp(**options: Any) -> list[float]:
        reply = llama.chat(model="tinychat", messages=user, logprobs=True, options={"num_predict": 4, "seed": 5, **options})
        return [t.logprob for t in reply.logprobs]  # type: ignore[union-attr]

    for lp in (openai_lp, ollama_lp):
        default, same, hotter = lp(), lp(temperature=0.3), lp(temperature=1.0)
        assert max(abs(a - b) for a, b in zip(default, same)) < 0.02, (lp.__name__, default, same)
        assert max(abs(a - b) for a, b in zip(default, hotter)) > 0.1, (lp.__name__, default, hotter)
    params = dict(line.split(None, 1) for line in
                  requests.post(f"{tiny_server.url}/api/show", json={"model": "tinychat"}, timeout=30).json()["parameters"].splitlines())
    assert (params["temperature"], params["num_predict"]) == ("0.3", "40")


def _generated(server: ServerProcess, model: str, **fields: Any) -> tuple[int, int, str]:
    """(prompt tokens, generated tokens, finish_reason) of a chat request that ignores end of turn."""
    body = {"model": model, "messages": [{"role": "user", "content": "Go on."}], "ignore_eos": True, **fields}
    reply = requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).json()
    return reply["usage"]["prompt_tokens"], reply["usage"]["completion_tokens"], reply["choices"][0]["finish_reason"]


def test_a_request_without_max_tokens_stops_at_the_default_and_may_ask_for_up_to_its_context(tiny_server: ServerProcess) -> None:
    assert _generated(tiny_server, "plain")[1:] == (2048, "length")  # serve's own default
    assert _generated(tiny_server, "tinychat")[1:] == (40, "length")  # the models.toml entry's
    assert _generated(tiny_server, "tinychat", max_tokens=100)[1:] == (100, "length")  # the request's own, above the default
    prompt, n, reason = _generated(tiny_server, "plain", max_tokens=1_000_000)  # more than fits: up to the context
    assert prompt + n == 2100 and reason == "length"
    prompt, n, reason = _generated(tiny_server, "endless")  # max_tokens = 0: until the context is full
    assert prompt + n == 300 and reason == "length"


def test_ollama_num_predict_minus_one_runs_until_the_context_is_full() -> None:
    from ggufrun.server.ollama import UNTIL_CONTEXT_FULL, chat_to_openai

    for value in (-1, -2):
        body = chat_to_openai({"model": "m", "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": value}})
        assert body["max_tokens"] == UNTIL_CONTEXT_FULL > 1 << 24


def test_a_bad_system_prompt_fails_before_the_server_starts(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A refusal, so through the real entry point in this process (cliutil.run_here)."""
    from cliutil import run_here

    proc = run_here(capsys, "serve", str(tiny_model), "--system", "@no-such-prompt", "--port", "0", text=True)
    assert proc.returncode == 2 and "Unknown system prompt '@no-such-prompt'" in proc.stderr and "Traceback" not in proc.stderr
