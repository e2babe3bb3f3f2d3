"""llama-server's own routes on a real `ggufrun serve` over loopback: /completion (whole and
streamed), /infill and `suffix` on /v1/completions (the openai client), /props, /slots with save,
restore and erase, /embedding, and /rerank for a reranker.

The models are synthetic (ggufrun.synthetic): a template-free coder with Qwen2.5-Coder's six FIM
tokens, one with only prefix/suffix/middle (CodeLlama-style, and a BOS), a chat model without FIM,
and a Qwen3-Reranker-shaped reranker (rank pooling, cls.output over "yes"/"no"; random weights, so
its scores prove the plumbing, not relevance). Field sets are llama-server's README's; no
llama-server binary is on this machine to compare against live."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import requests
from serverutil import ServerProcess, serve

from ggufrun.server import fim, native, slots

openai = pytest.importorskip("openai")

GREEDY = {"temperature": 0.0, "top_k": 1}
# /completion's final object, as llama-server's README lists it (plus completion_probabilities with n_probs)
FINAL_FIELDS = {"index", "content", "tokens", "id_slot", "stop", "model", "tokens_predicted", "tokens_evaluated",
                "generation_settings", "prompt", "has_new_line", "truncated", "stop_type", "stopping_word", "tokens_cached",
                "timings"}
PARTIAL_FIELDS = {"index", "content", "tokens", "stop", "id_slot", "tokens_predicted", "tokens_evaluated"}
TIMINGS = {"cache_n", "prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second", "predicted_n", "predicted_ms",
           "predicted_per_token_ms", "predicted_per_second"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from ggufrun.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("llamacpp-models")
    return {
        "coder": write_synthetic(root / "coder.gguf", "tiny", quant="q8_0", chat_template=False, fim="qwen"),
        "coder-basic": write_synthetic(root / "coder-basic.gguf", "tiny-llama", quant="q8_0", chat_template=False, fim="basic"),
        "chat": write_synthetic(root / "chat.gguf", "tiny", quant="q8_0"),
        "reranker": write_synthetic(root / "reranker.gguf", "tiny-qwen3-reranker", quant="q8_0"),
    }


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, seed_amx_verdict: Callable[[Path], None]) -> Path:
    path = tmp_path_factory.mktemp("llamacpp-home")
    seed_amx_verdict(path)
    return path


@pytest.fixture(scope="module")
def server(models: dict[str, Path], home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = tmp_path_factory.mktemp("llamacpp-config") / "serve.toml"
    # n_ctx 1024 with a 256-token batch leaves llama-server's FIM rule room for the extra context
    # (the reranker's prompts, Qwen3-Reranker's long template in a tiny vocabulary, need a 512-token batch)
    batch = {name: 512 if name == "reranker" else 256 for name in models}
    entries = "".join(f'[[models]]\nmodel = "{path}"\nserved_model_name = "{name}"\nn_ctx = 1024\nbatch_size = {batch[name]}\n'
                      f'ubatch_size = {batch[name]}\nthreads = 1\n\n' for name, path in models.items())
    # two more names of the coder file whose slot folders once were one ("org_coder")
    entries += "".join(f'[[models]]\nmodel = "{models["coder"]}"\nserved_model_name = "{name}"\nn_ctx = 256\nthreads = 1\n\n'
                       for name in ("org/coder", "org_coder"))
    config.write_text(f"[server]\nparallel = 2\nmax_loaded = 6\n\n{entries}")
    env = {"GGUFRUN_HOME": str(home), "GGUFRUN_HF_ENDPOINT": "http://127.0.0.1:9", "GGUFRUN_MS_ENDPOINT": "http://127.0.0.1:9"}
    with serve("--config", str(config), env=env) as srv:
        yield srv


def post(server: ServerProcess, path: str, body: Any) -> requests.Response:
    return requests.post(f"{server.url}{path}", json=body, timeout=60)


def stream(server: ServerProcess, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """llama-server's native stream: `data: {json}` events, no [DONE]."""
    with requests.post(f"{server.url}{path}", json={**body, "stream": True}, timeout=60, stream=True) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") and line != "data: [DONE]" for line in lines)
    return [json.loads(line[6:]) for line in lines]


# ---- /completion ---------------------------------------------------------------------------------

def test_completion_whole_and_streamed_agree(server: ServerProcess) -> None:
    body = {"model": "coder", "prompt": "hello world", "n_predict": 6, "return_tokens": True, "n_probs": 2,
            "cache_prompt": True, "seed": 7, "repeat_penalty": 1.0, **GREEDY}
    whole = post(server, "/completion", body).json()
    assert FINAL_FIELDS | {"completion_probabilities"} <= set(whole) and set(whole["timings"]) >= TIMINGS
    assert whole["stop"] is True and whole["tokens_predicted"] == len(whole["tokens"]) <= 6
    assert whole["stop_type"] in ("eos", "limit") and whole["stopping_word"] == ""
    assert whole["prompt"] == "hello world" and whole["tokens_evaluated"] > 0
    gs = whole["generation_settings"]
    assert gs["n_predict"] == 6 and gs["top_k"] == 1 and gs["temperature"] == 0.0 and gs["n_probs"] == 2 and gs["seed"] == 7
    probs = whole["completion_probabilities"]
    assert [p["id"] for p in probs] == whole["tokens"]
    assert all({"id", "token", "bytes", "logprob", "top_logprobs"} <= set(p) and len(p["top_logprobs"]) == 2 for p in probs)
    assert all(p["top_logprobs"][0]["id"] == p["id"] for p in probs)  # greedy: the sampled token is the likeliest
    events = stream(server, "/completion", body)
    partials, final = events[:-1], events[-1]
    assert all(set(e) >= PARTIAL_FIELDS and e["stop"] is False for e in partials)
    assert "".join(e["content"] for e in partials) == whole["content"]
    assert [t for e in partials for t in e["tokens"]] == whole["tokens"]
    assert final["stop"] is True and final["content"] == "" and FINAL_FIELDS <= set(final)
    assert final["stop_type"] == whole["stop_type"] and final["tokens_predicted"] == whole["tokens_predicted"]


def test_completion_prompt_shapes_and_stop_word(server: ServerProcess) -> None:
    ids = post(server, "/tokenize", {"model": "coder", "content": "hello world"}).json()["tokens"]
    text = post(server, "/completion", {"model": "coder", "prompt": "hello world", "n_predict": 12, "ignore_eos": True,
                                        **GREEDY}).json()
    by_ids = post(server, "/completion", {"model": "coder", "prompt": ids, "n_predict": 12, "ignore_eos": True, **GREEDY}).json()
    assert by_ids["content"] == text["content"] and by_ids["tokens_evaluated"] == len(ids)
    mixed = post(server, "/completion", {"model": "coder", "prompt": [ids[0], "ello world"], "n_predict": 2, **GREEDY}).json()
    assert mixed["prompt"].endswith("ello world")
    several = post(server, "/completion", {"model": "coder", "prompt": ["hello", [ids[0]]], "n_predict": 2, **GREEDY}).json()
    assert isinstance(several, list) and [r["index"] for r in several] == [0, 1]
    n_cmpl = post(server, "/completion", {"model": "coder", "prompt": "hello", "n_cmpl": 2, "n_predict": 2, **GREEDY}).json()
    assert len(n_cmpl) == 2 and n_cmpl[0]["content"] == n_cmpl[1]["content"]
    # a stop word the greedy reply is known to contain ends it there, not included
    content = text["content"]
    word = content[5:8]
    cut = post(server, "/completion", {"model": "coder", "prompt": "hello world", "n_predict": 12, "ignore_eos": True,
                                       "stop": [word], **GREEDY}).json()
    assert cut["stop_type"] == "word" and cut["stopping_word"] == word and cut["stopped_word"] is True
    assert cut["content"] == content[: content.index(word)]
    fields = post(server, "/completion", {"model": "coder", "prompt": "hi", "n_predict": 1,
                                          "response_fields": ["content", "generation_settings/n_predict", "nothing"]}).json()
    assert set(fields) == {"content", "generation_settings/n_predict"} and fields["generation_settings/n_predict"] == 1
    evaluated = post(server, "/completion", {"model": "coder", "prompt": "hello world", "n_predict": 0}).json()
    assert evaluated["content"] == "" and evaluated["tokens_predicted"] == 0
    assert evaluated["generation_settings"]["n_predict"] == 0  # (it reported the server's default before)


def test_completion_id_slot_and_samplers(server: ServerProcess) -> None:
    pinned = post(server, "/completion", {"model": "coder", "prompt": "hi", "n_predict": 1, "id_slot": 1}).json()
    assert pinned["id_slot"] == 1
    assert post(server, "/completion", {"model": "coder", "prompt": "hi", "id_slot": 2}).json()["error"]["param"] == "id_slot"
    chained = post(server, "/completion", {"model": "coder", "prompt": "hi", "n_predict": 1, "samplers": ["top_k", "temperature"],
                                           "top_k": 1}).json()
    assert chained["generation_settings"]["samplers"] == ["top_k", "temperature"]
    assert chained["generation_settings"]["top_p"] == 1.0 and chained["generation_settings"]["min_p"] == 0.0


@pytest.mark.parametrize("body, param", [
    ({"mirostat": 2}, "mirostat"), ({"dry_multiplier": 0.8}, "dry_multiplier"), ({"typical_p": 0.5}, "typical_p"),
    ({"samplers": ["infill", "top_k"]}, "samplers"), ({"samplers": ["top_k", "infill", "penalties"]}, "samplers"),
    ({"samplers": ["top_k", "infill"], "top_k": 1000}, "top_k"), ({"samplers": ["temperature", "top_k"]}, "samplers"),
    ({"t_max_prompt_ms": "soon"}, "t_max_prompt_ms"),
    ({"samplers": ["top_k"], "top_p": 0.5}, "samplers"), ({"cache_prompt": False}, "cache_prompt"),
    ({"lora": [{"id": 0, "scale": 1}]}, "lora"), ({"timings_per_token": True}, "timings_per_token"),
    ({"post_sampling_probs": True}, "post_sampling_probs"), ({"n_probs": 21}, "n_probs"), ({"bogus": 1}, "bogus"),
    ({"prompt": {"prompt_string": "x", "multimodal_data": ["aGk="]}}, "prompt.multimodal_data"),
    ({"logit_bias": [[1, "x"]]}, "logit_bias"), ({"n_predict": -2}, "n_predict"),
])
def test_completion_refuses_what_it_cannot_honour(server: ServerProcess, body: dict[str, Any], param: str) -> None:
    resp = post(server, "/completion", {"model": "coder", "prompt": "hi", **body})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param


def test_completion_logit_bias_forms(server: ServerProcess) -> None:
    base = post(server, "/completion", {"model": "coder", "prompt": "hello", "n_predict": 1, "return_tokens": True, **GREEDY}).json()
    first = base["tokens"][0]
    for bias in ([[first, False]], {str(first): False}, [[first, -1000]]):
        other = post(server, "/completion", {"model": "coder", "prompt": "hello", "n_predict": 1, "return_tokens": True,
                                             "logit_bias": bias, **GREEDY}).json()
        assert other["tokens"][0] != first


def test_completion_to_the_context_end_is_truncated(server: ServerProcess) -> None:
    """n_predict -1 runs until the context is full: llama-server's "truncated" (against the slot's n_ctx)."""
    ids = post(server, "/tokenize", {"model": "coder", "content": "fox " * 400}).json()["tokens"]
    reply = post(server, "/completion", {"model": "coder", "prompt": ids[:1000], "n_predict": -1, "ignore_eos": True,
                                         **GREEDY}).json()
    n_ctx = reply["generation_settings"]["n_ctx"]
    assert reply["stop_type"] == "limit" and reply["truncated"] is True, reply
    assert reply["tokens_evaluated"] + reply["tokens_predicted"] + 1 >= n_ctx


def test_non_ascii_and_huge_digit_ids_are_4xx_never_500(server: ServerProcess) -> None:
    """str.isdigit() passes "²" and a 5000-digit string, which int() refuses: a 500 before the fix."""
    for key in ("\u00b2", "9" * 5000):
        resp = post(server, "/completion", {"model": "coder", "prompt": "hi", "n_predict": 1, "logit_bias": {key: 1}})
        assert resp.status_code < 500 and (resp.status_code == 200 or resp.json()["error"]["param"] == "logit_bias"), resp.text
        slot = requests.post(f"{server.url}/slots/{key}", params={"action": "erase", "model": "coder"}, timeout=60)
        assert slot.status_code == 400 and slot.json()["error"]["param"] == "id_slot", slot.text


def test_completion_cuts_at_indent_and_time_limit(server: ServerProcess) -> None:
    """n_indent and t_max_predict_ms end a reply as llama-server does (a grammar makes the lines)."""
    body = {"model": "coder", "prompt": "hi", "n_predict": 64, "grammar": 'root ::= "x\\n  y\\nzz" [a-z]*', **GREEDY}
    cut = post(server, "/completion", {**body, "n_indent": 2}).json()
    assert cut["content"] == "x\n  y\n" and cut["stop_type"] == "limit"
    streamed = stream(server, "/completion", {**body, "n_indent": 2})
    assert "".join(e["content"] for e in streamed[:-1]) == "x\n  y\n" and streamed[-1]["stop_type"] == "limit"
    lines = {"model": "coder", "prompt": "hi", "n_predict": 400, "grammar": 'root ::= "ab\\n" root', "t_max_predict_ms": 1,
             **GREEDY}  # (a grammar with no end: the reply can only be cut)
    timed = post(server, "/completion", lines).json()
    assert timed["stop_type"] == "limit" and timed["content"].endswith("\n") and timed["tokens_predicted"] < 400


def test_indent_cut_is_llama_servers() -> None:
    assert native.indent_cut("x = 1\n    y = 2\n", 4) is None
    assert native.indent_cut("x = 1\n    y = 2\n  z", 4) == len("x = 1\n    y = 2\n  ")
    assert native.indent_cut("a\n\tb\nc", 1) == len("a\n\tb\n")


# ---- fill in the middle ----------------------------------------------------------------------------

def _loaded(path: Path) -> Any:
    from ggufrun.llama.model import Model
    from ggufrun.settings import Settings

    return Model.load(path, Settings(n_ctx=1024, batch_size=256, ubatch_size=256, threads=1))


def test_infill_exact_tokens(models: dict[str, Path]) -> None:
    """llama-server's format_infill, token by token, on both FIM token sets."""
    with _loaded(models["coder"]) as m:
        sp = m.vocab_specials()
        assert (sp["fim_pre"], sp["fim_suf"], sp["fim_mid"]) != (-1, -1, -1) and sp["fim_rep"] >= 0 and sp["fim_sep"] >= 0
        plain = lambda t: m.tokenize(t, add_special=False, parse_special=False)  # noqa: E731
        got = fim.infill_tokens(m, sp, "def f(x):\n", "\n  return y", [{"text": "import os", "filename": "a.py"}],
                                plain("y ="), n_batch=256, n_predict=-1, n_ctx=1024)
        assert got == [sp["fim_rep"], *plain("myproject\n"), sp["fim_sep"], *plain("a.py\n"), *plain("import os"),
                       sp["fim_sep"], *plain("filename\n"), sp["fim_pre"], *plain("def f(x):\n"), *plain("y ="),
                       sp["fim_suf"], *plain("\n  return y"), sp["fim_mid"]]
        # the prefix keeps its last 3/4 batch, the suffix the rest of the last quarter; no room, no extra
        long = fim.infill_tokens(m, sp, "a" * 400, "b" * 400, [{"text": "x", "filename": "f"}], [], n_batch=64,
                                 n_predict=512, n_ctx=1024)
        assert long[0] == sp["fim_pre"] and long.count(sp["fim_sep"]) == 0 and len(long) == 1 + 48 + 1 + 14 + 1
    with _loaded(models["coder-basic"]) as m:
        sp = m.vocab_specials()
        assert sp["fim_rep"] == sp["fim_sep"] == -1 and sp["add_bos"] == 1
        plain = lambda t: m.tokenize(t, add_special=False, parse_special=False)  # noqa: E731
        got = fim.infill_tokens(m, sp, "p", "s", [{"text": "import os", "filename": "a.py"}], [], n_batch=256,
                                n_predict=-1, n_ctx=1024)
        assert got == [*plain("\n\n--- snippet ---\n\n"), *plain("import os"), m.bos_id, sp["fim_pre"], *plain("p"),
                       sp["fim_suf"], *plain("s"), sp["fim_mid"]]


def test_infill_route_sends_those_tokens(server: ServerProcess, models: dict[str, Path]) -> None:
    body = {"input_prefix": "def f(x):\n", "input_suffix": "\n  return y", "prompt": "y =",
            "input_extra": [{"filename": "a.py", "text": "import os"}], "n_predict": 2, **GREEDY}
    reply = post(server, "/infill", {"model": "coder", **body}).json()
    assert FINAL_FIELDS <= set(reply)
    assert reply["prompt"] == ("<|repo_name|>myproject\n<|file_sep|>a.py\nimport os<|file_sep|>filename\n"
                               "<|fim_prefix|>def f(x):\ny =<|fim_suffix|>\n  return y<|fim_middle|>")
    with _loaded(models["coder"]) as m:
        sp = m.vocab_specials()
        expected = fim.infill_tokens(m, sp, body["input_prefix"], body["input_suffix"], body["input_extra"],
                                     m.tokenize("y =", add_special=False, parse_special=True), n_batch=256, n_predict=2,
                                     n_ctx=1024)
    assert reply["tokens_evaluated"] == len(expected)
    streamed = stream(server, "/infill", {"model": "coder", **body})
    assert streamed[-1]["stop"] is True and "".join(e["content"] for e in streamed[:-1]) == reply["content"]
    basic = post(server, "/infill", {"model": "coder-basic", "input_prefix": "p", "input_suffix": "s"}).json()
    assert basic["prompt"] == "<s><PRE>p<SUF>s<MID>"
    refused = post(server, "/infill", {"model": "chat", "input_prefix": "p", "input_suffix": "s"})
    assert refused.status_code == 400 and "Infill is not supported by model 'chat'" in refused.json()["error"]["message"]
    for bad, param in (({"input_suffix": "s"}, "input_prefix"), ({"input_prefix": "p", "input_suffix": "s", "prompt": 3}, "prompt"),
                       ({"input_prefix": "p", "input_suffix": "s", "input_extra": [{"filename": "x"}]}, "input_extra[0]"),
                       ({"input_prefix": "p", "input_suffix": "s", "input_extra": [{"text": "x", "time": "now"}]},
                        "input_extra[0].time")):
        resp = post(server, "/infill", {"model": "coder", **bad})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param


def test_infill_sampler_is_llama_cpps(models: dict[str, Path]) -> None:
    """The chain a request with samplers [top_k, top_p, infill] gets draws, seed for seed, the token
    a chain built here straight from llama_sampler_init_infill draws, on crafted logits where the
    infill sampler matters: " u" and " use" merge into the likelier " us", and an end token with
    a small but not negligible share ends the middle."""
    import ctypes

    import llama_cpp as L
    import numpy as np

    from ggufrun.generation import SamplingParams

    with _loaded(models["coder"]) as m:
        v = m.n_vocab
        u, us, use = (m.tokenize(t, add_special=False, parse_special=False)[0] for t in (" u", " us", " use"))
        assert [m.token_bytes(t) for t in (u, us, use)] == [b" u", b" us", b" use"]

        def direct(row: Any, seed: int) -> int:
            chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
            for part in (L.llama_sampler_init_top_k(40), L.llama_sampler_init_top_p(0.9, 1), L.llama_sampler_init_infill(m.vocab),
                         L.llama_sampler_init_temp(1.0), L.llama_sampler_init_dist(seed)):
                L.llama_sampler_chain_add(chain, part)
            data = (L.llama_token_data * v)(*(L.llama_token_data(i, float(row[i]), 0.0) for i in range(v)))
            arr = L.llama_token_data_array(data=data, size=v, selected=-1, sorted=False)
            L.llama_sampler_apply(chain, ctypes.byref(arr))
            token = data[arr.selected].id
            L.llama_sampler_free(chain)
            return int(token)

        def drawn(row: Any, infill: int, seeds: range, temperature: float = 1.0) -> list[int]:
            out = []
            for seed in seeds:
                chain = m.draw_chain(SamplingParams(top_k=40, top_p=0.9, min_p=0.0, temperature=temperature, seed=seed,
                                                    infill=infill))
                out.append(chain.draw(row.copy()))
                chain.close()
            return out

        row = np.random.default_rng(0).normal(0, 1, v).astype(np.float32)
        row[[u, us, use]] = 6.0, 6.2, 5.5
        row[m.eos_id] = -5.0
        plain, infill = drawn(row, -1, range(60)), drawn(row, 2, range(60))
        assert {u, us, use} <= set(plain) and set(infill) == {us}
        assert infill == [direct(row, seed) for seed in range(60)]
        row[m.eos_id] = 4.5  # ~7% of the mass: inside top_p, enough for the infill sampler to end here
        assert set(drawn(row, 2, range(20))) == {m.eos_id} != set(drawn(row, -1, range(20)))
        assert drawn(row, 2, range(20)) == [direct(row, seed) for seed in range(20)]
        # temperature 0 after it: not the engine's argmax fast path, the chain's pick among what it left
        assert not SamplingParams(temperature=0.0, infill=2).greedy
        assert drawn(row, 2, range(3), 0.0) == [m.eos_id] * 3 and drawn(row, -1, range(3), 0.0) == [us] * 3


# llama.vim's FIM request (autoload/llama.vim, llama#fim, ggml-org/llama.vim a1c8e6e) with its default
# config (n_predict 128, stop_strings [], t_max_prompt_ms 500; t_max_predict_ms 250 on a first request),
# a ring chunk as s:ring_get_extra sends it (vim's reltime() for "time"), and "model": "" (its
# model_fim default: the `exists()` test always passes)
LLAMA_VIM_FIM = {
    "id_slot": 0, "input_prefix": "def add(a, b):\n", "input_suffix": "\n\nprint(add(1, 2))\n",
    "input_extra": [{"text": "import os\nimport sys\n", "time": [1764971000, 123456], "filename": "util.py"}],
    "prompt": "    return", "n_predict": 128, "stop": [], "n_indent": 4, "top_k": 40, "top_p": 0.90,
    "samplers": ["top_k", "top_p", "infill"], "stream": False, "cache_prompt": True, "t_max_prompt_ms": 500,
    "t_max_predict_ms": 250,
    "response_fields": ["content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms",
                        "timings/prompt_per_second", "timings/predicted_n", "timings/predicted_ms",
                        "timings/predicted_per_token_ms", "timings/predicted_per_second", "truncated", "tokens_cached"],
    "model": "",
}
# llama.vim's ring update (s:ring_update): the extra context into the slot's cache, nothing predicted
LLAMA_VIM_RING = {
    "id_slot": 0, "input_prefix": "", "input_suffix": "", "input_extra": LLAMA_VIM_FIM["input_extra"], "prompt": "",
    "n_predict": 0, "temperature": 0.0, "samplers": [], "stream": False, "cache_prompt": True, "t_max_prompt_ms": 1,
    "t_max_predict_ms": 1, "response_fields": [""], "model": "",
}
# llama.vscode's createRequestPayload (src/llama-server.ts, ggml-org/llama.vscode 3938fb3) with its defaults
# (n_predict 128, max_parallel_completions 3, t_max_prompt_ms 500, t_max_predict_ms 2500; chunks from
# extra-context.ts with Date.now() as "time"), and its noPredict form that warms the cache
LLAMA_VSCODE_FIM = {
    "id_slot": 0, "input_prefix": "def add(a, b):\n", "input_suffix": "\n\nprint(add(1, 2))\n",
    "input_extra": [{"text": "import os\n", "time": 1764971000123, "filename": "/home/u/util.py"}], "prompt": "    return",
    "n_predict": 128, "n_cmpl": 3, "top_k": 40, "top_p": 0.99, "stream": False, "samplers": ["top_k", "top_p", "infill"],
    "cache_prompt": True, "n_indent": 4, "t_max_prompt_ms": 500, "t_max_predict_ms": 2500,
}
LLAMA_VSCODE_PREP = {
    "id_slot": 0, "input_prefix": "", "input_suffix": "", "input_extra": LLAMA_VSCODE_FIM["input_extra"], "prompt": "",
    "n_predict": 0, "samplers": [], "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 1,
}


def test_llama_vim_and_llama_vscode_requests(server: ServerProcess) -> None:
    """Their exact bodies, answered with the fields they read (a template-free coder named by ""
    or by nothing: the first model served)."""
    import re

    ring = post(server, "/infill", LLAMA_VIM_RING)
    assert ring.status_code == 200 and ring.json() == {}
    resp = post(server, "/infill", LLAMA_VIM_FIM)
    assert resp.status_code == 200 and re.search(r'"content"\s*:"', resp.text)  # llama.vim's own test of the reply
    reply = resp.json()
    assert set(reply) == set(LLAMA_VIM_FIM["response_fields"]) and isinstance(reply["content"], str)
    # the ring update put the extra context in slot 0's cache: only the local context is new
    assert 0 < reply["timings/prompt_n"] < reply["tokens_cached"] and reply["truncated"] is False
    # A random model gives its six end tokens ~1% of the mass, above the 1/(3 x 40 candidates) at
    # which the infill sampler ends the middle: with it, nothing; the same request without it writes.
    assert reply["timings/predicted_n"] == 0 and reply["content"] == ""
    plain = [post(server, "/infill", {**LLAMA_VIM_FIM, "samplers": ["top_k", "top_p"], "seed": seed}).json() for seed in (1, 2, 3)]
    assert max(r["timings/predicted_n"] for r in plain) > 0 and any(r["content"] for r in plain)
    assert post(server, "/infill", LLAMA_VSCODE_PREP).status_code == 200  # no model: the first served (coder)
    replies = post(server, "/infill", LLAMA_VSCODE_FIM).json()
    assert isinstance(replies, list) and len(replies) == 3
    for r in replies:  # src/completion.ts getComplFromContent, src/statusbar.ts showInfo
        assert r["content"] == "" and r["stop_type"] == "eos" and r["tokens_cached"] > 0
        assert r["generation_settings"]["n_ctx"] == 1024 and r["generation_settings"]["samplers"] == ["top_k", "top_p", "infill"]
        assert {"prompt_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms", "predicted_per_second"} <= set(r["timings"])


def test_v1_completions_suffix_with_openai(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    done = client.completions.create(model="coder", prompt="def f(x):\n", suffix="\n  return y", max_tokens=3,
                                     temperature=0, extra_body={"top_k": 1})
    infill = post(server, "/infill", {"model": "coder", "input_prefix": "def f(x):\n", "input_suffix": "\n  return y",
                                      "n_predict": 3, **GREEDY}).json()
    assert done.choices[0].text == infill["content"] and done.usage.prompt_tokens == infill["tokens_evaluated"]
    with pytest.raises(openai.BadRequestError, match="Infill is not supported"):
        client.completions.create(model="chat", prompt="a", suffix="b", max_tokens=2)


# ---- /props, /slots --------------------------------------------------------------------------------

def test_props(server: ServerProcess) -> None:
    props = requests.get(f"{server.url}/props", params={"model": "chat"}, timeout=60).json()
    assert {"default_generation_settings", "total_slots", "model_path", "chat_template", "modalities", "build_info",
            "is_sleeping"} <= set(props)
    assert props["total_slots"] == 2 and props["model_path"] == "chat.gguf" and "im_start" in props["chat_template"]
    assert props["default_generation_settings"]["n_ctx"] == 1024 and props["infill"] is False
    assert requests.post(f"{server.url}/props", json={}, timeout=60).status_code == 501


def test_slots_save_restore_erase(server: ServerProcess, home: Path) -> None:
    prompt = "the quick brown fox jumps over the lazy dog " * 3
    post(server, "/completion", {"model": "coder", "prompt": prompt, "n_predict": 1, "id_slot": 0})
    listed = requests.get(f"{server.url}/slots", params={"model": "coder"}, timeout=60).json()
    assert [s["id"] for s in listed] == [0, 1] and all({"id", "n_ctx", "is_processing", "params"} <= set(s) for s in listed)
    url = f"{server.url}/slots/0"
    saved = requests.post(url, params={"action": "save", "model": "coder"}, json={"filename": "fox.bin"}, timeout=60).json()
    assert saved["id_slot"] == 0 and saved["filename"] == "fox.bin" and saved["n_saved"] > 20 and saved["n_written"] > 0
    assert (home / "slots" / "coder" / "fox.bin").stat().st_size == saved["n_written"]
    erased = requests.post(url, params={"action": "erase", "model": "coder"}, timeout=60).json()
    assert erased == {"id_slot": 0, "n_erased": saved["n_saved"]}
    restored = requests.post(url, params={"action": "restore", "model": "coder"}, json={"filename": "fox.bin"}, timeout=60).json()
    assert restored["n_restored"] == saved["n_saved"] and restored["n_read"] == saved["n_written"]
    again = post(server, "/completion", {"model": "coder", "prompt": prompt, "n_predict": 1, "id_slot": 0}).json()
    assert again["timings"]["cache_n"] >= saved["n_saved"] - 2  # the restored cells were reused, not evaluated again
    for params, body, status in (({"action": "save"}, {"filename": "../x"}, 400), ({"action": "save"}, {"filename": "a/b"}, 400),
                                 ({"action": "save"}, {"filename": ".hidden"}, 400), ({"action": "dance"}, {}, 400),
                                 ({"action": "restore"}, {"filename": "none.bin"}, 404)):
        resp = requests.post(url, params={**params, "model": "coder"}, json=body, timeout=60)
        assert resp.status_code == status, (params, body, resp.text)
    assert requests.post(f"{server.url}/slots/5", params={"action": "erase", "model": "coder"}, timeout=60).status_code == 400
    assert not list((home / "slots").rglob("x")) and sorted(p.name for p in (home / "slots" / "coder").iterdir()) == ["fox.bin"]


def test_slot_folders_are_one_per_model(server: ServerProcess, home: Path) -> None:
    """A file saved by "org/coder" is not another model's to restore, though "org_coder" once read it."""
    url = f"{server.url}/slots/0"
    post(server, "/completion", {"model": "org/coder", "prompt": "one model's cells", "n_predict": 1, "id_slot": 0})
    saved = requests.post(url, params={"action": "save"}, json={"model": "org/coder", "filename": "mine.bin"}, timeout=60)
    assert saved.status_code == 200, saved.text
    for other in ("org_coder", "coder"):
        resp = requests.post(url, params={"action": "restore"}, json={"model": other, "filename": "mine.bin"}, timeout=60)
        assert resp.status_code == 404 and "mine.bin" in resp.json()["error"]["message"], (other, resp.text)
    restored = requests.post(url, params={"action": "restore"}, json={"model": "org/coder", "filename": "mine.bin"}, timeout=60)
    assert restored.json()["n_restored"] == saved.json()["n_saved"]
    [path] = (home / "slots").glob("*/mine.bin")
    assert path.parent.parent == home / "slots" and path.parent.name == slots.folder_name("org/coder")


def test_slot_folder_names_are_distinct_and_plain() -> None:
    ids = ["coder", "a/b", "a_b", "a:b", "a\\b", "A_b", "a_B", "Qwen", "qwen", ".", "..", "../..", ".hidden", "hidden",
           "", "%", "a%b", "x" * 64, "x" * 65, "x" * 300, "x" * 299 + "y", "modèle", "mode\u0300le", "nul\x00", "a b", "a\udcff"]
    names = [slots.folder_name(i) for i in ids]
    # distinct even where the disk ignores case
    assert len({n.lower() for n in names}) == len(ids), dict(zip(ids, names))
    for name in names:
        assert name not in ("", ".", "..") and not name.startswith(".") and len(name) <= 80
        assert re.fullmatch(r"[a-z0-9_.%-]+", name), name
    # a plain lower-case id keeps its own folder (and the saves already there)
    assert [slots.folder_name(i) for i in ("coder", "gemma3-270m", "qwen2.5_0.5b")] == ["coder", "gemma3-270m", "qwen2.5_0.5b"]


def test_a_slot_operation_waits_for_no_request_and_refuses_a_busy_slot(models: dict[str, Path]) -> None:
    """On the engine itself: a save/erase runs between steps, on an idle slot only (409 otherwise).
    Each decode is slowed by 20 ms so that the reply surely still runs when the call comes."""
    import asyncio
    import time

    from ggufrun.server.engine import Backend, Engine, GenRequest, Job, SlotBusyError
    from ggufrun.server.metrics import Metrics
    from ggufrun.settings import Settings
    from ggufrun.templates import select_template

    def load() -> Backend:
        from ggufrun.llama.model import Model

        settings = Settings(n_ctx=128, threads=1, batch_size=64, ubatch_size=64)
        model = Model.load(models["chat"], settings, n_seq_max=2, kv_cells=256)
        decode = model.decode
        model.decode = lambda items: (time.sleep(0.02), decode(items))[1]  # type: ignore[method-assign]
        return Backend(model=model, settings=settings, template=select_template(model.chat_template, "chatml", "auto"),
                       n_ctx_seq=128)

    engine = Engine("chat", load, parallel=2, max_queue=4, metrics=Metrics()).start()
    engine.loaded.result(timeout=60)

    async def main() -> None:
        assert engine.backend is not None
        prompt = engine.backend.model.tokenize("hello world")
        job = Job(GenRequest(prompt=prompt, max_tokens=100, sampling={"temperature": 0.0}, ignore_eos=True, slot=1),
                  asyncio.get_running_loop())
        engine.submit(job)
        assert (await asyncio.wait_for(job.events.get(), 60)).kind == "text"
        assert job.slot == 1 and [busy for _, busy, _ in engine.slot_states()] == [False, True]
        with pytest.raises(SlotBusyError, match="Slot 1 .* is processing"):
            await asyncio.wrap_future(engine.call_on_slot(1, lambda model, seq: seq))
        assert await asyncio.wrap_future(engine.call_on_slot(0, lambda model, seq: (seq, model.seq_len(seq)))) == (0, 0)
        job.cancel()

    try:
        asyncio.run(main())
    finally:
        engine.stop()
        engine.join(10)


# ---- /embedding, /rerank ---------------------------------------------------------------------------

def test_native_embedding(server: ServerProcess) -> None:
    import math

    reply = post(server, "/embedding", {"model": "chat", "content": "hello world"}).json()
    assert len(reply) == 1 and reply[0]["index"] == 0 and len(reply[0]["embedding"]) == 1
    vector = reply[0]["embedding"][0]
    assert abs(math.fsum(v * v for v in vector) - 1.0) < 1e-5
    openai_vec = post(server, "/v1/embeddings", {"model": "chat", "input": "hello world"}).json()["data"][0]["embedding"]
    assert max(abs(a - b) for a, b in zip(vector, openai_vec)) < 1e-6
    taxicab = post(server, "/embeddings", {"model": "chat", "input": ["hello world", "hi"], "embd_normalize": 1}).json()
    assert len(taxicab) == 2 and abs(math.fsum(abs(v) for v in taxicab[0]["embedding"][0]) - 1.0) < 1e-5
    assert post(server, "/embedding", {"model": "chat", "content": "x", "embd_normalize": -1}).status_code == 400
    # a large p is near the max norm (it underflowed to the plain L2 vector before); a huge one is a 400, not a 500
    p_large = post(server, "/embedding", {"model": "chat", "content": "hello world", "embd_normalize": 5000}).json()
    assert abs(max(abs(v) for v in p_large[0]["embedding"][0]) - 1.0) < 1e-3
    assert post(server, "/embedding", {"model": "chat", "content": "x", "embd_normalize": 10**400}).status_code == 400
    assert post(server, "/embedding", {"model": "reranker", "content": "x"}).status_code == 400


def test_rerank(server: ServerProcess, models: dict[str, Path]) -> None:
    docs = ["hi", "it is a bear", "The giant panda is a bear species endemic to China."]
    reply = post(server, "/v1/rerank", {"model": "reranker", "query": "What is panda?", "top_n": 2, "documents": docs}).json()
    assert reply["object"] == "list" and reply["model"] == "reranker" and reply["usage"]["prompt_tokens"] > 0
    results = reply["results"]
    assert len(results) == 2 and all(set(r) == {"index", "relevance_score"} for r in results)
    assert results[0]["relevance_score"] >= results[1]["relevance_score"]
    whole = post(server, "/rerank", {"model": "reranker", "query": "What is panda?", "documents": docs}).json()["results"]
    assert sorted(r["index"] for r in whole) == [0, 1, 2] and whole[:2] == results
    # the score is the model's own: P("yes") of Qwen3-Reranker's head over its rerank prompt
    from ggufrun.server.rerank import prompt_tokens

    with _loaded(models["reranker"]) as m, m.new_context(n_ctx=1024, embeddings=True) as ctx:
        steps = ctx.embed_steps(prompt_tokens(m, "What is panda?", [docs[1]])[0])
        with pytest.raises(StopIteration) as done:
            while True:
                next(steps)
        scores, _ = done.value.value
    assert abs(scores[0] - next(r["relevance_score"] for r in whole if r["index"] == 1)) < 1e-5
    assert 0 < scores[0] < 1 and abs(sum(scores) - 1) < 1e-5
    tei = post(server, "/reranking", {"model": "reranker", "query": "q", "texts": ["a", "b"], "return_text": True}).json()
    assert isinstance(tei, list) and all(set(r) == {"index", "score", "text"} for r in tei)
    assert [r["text"] for r in tei] == [["a", "b"][r["index"]] for r in tei] and sorted(r["index"] for r in tei) == [0, 1]
    assert [r["score"] for r in tei] == sorted((r["score"] for r in tei), reverse=True)
    assert [r["relevance_score"] for r in whole] == sorted((r["relevance_score"] for r in whole), reverse=True)
    not_ranker = post(server, "/v1/rerank", {"model": "chat", "query": "q", "documents": ["a"]})
    assert not_ranker.status_code == 400 and "not a reranker" in not_ranker.json()["error"]["message"]
    for bad, param in (({"documents": []}, "documents"), ({"documents": ["a"], "top_n": -1}, "top_n"),
                       ({"documents": ["a", "word " * 400]}, "documents[1]"),
                       ({"documents": ["a"], "return_documents": True}, "return_documents")):
        resp = post(server, "/v1/rerank", {"model": "reranker", "query": "q", **bad})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param


HOSTILE: list[Any] = [None, True, -1, 1e308, "", "x" * 300_000, [], [None], [[]], [-5], [10**12], [True], {"a": {}}, [["x", 1]],
                      [{"filename": 3}], {"prompt_string": 5}]


@pytest.mark.parametrize("path, fields", [
    ("/completion", ["prompt", "n_predict", "logit_bias", "samplers", "stop", "n_probs", "id_slot", "grammar", "response_fields",
                     "json_schema", "n_indent", "t_max_predict_ms", "t_max_prompt_ms"]),
    ("/infill", ["input_prefix", "input_suffix", "input_extra", "prompt"]),
    ("/embedding", ["content", "embd_normalize"]),
    ("/v1/rerank", ["query", "documents", "top_n"]),
    ("/slots/0?action=save", ["filename"]),
])
def test_hostile_fields_are_4xx_never_500(server: ServerProcess, path: str, fields: list[str]) -> None:
    base = {"/completion": {"prompt": "hi", "n_predict": 1}, "/infill": {"input_prefix": "a", "input_suffix": "b", "n_predict": 1},
            "/embedding": {"content": "hi"}, "/v1/rerank": {"query": "q", "documents": ["a"]},
            "/slots/0?action=save": {"filename": "h.bin"}}[path]
    model = "reranker" if "rerank" in path else "chat" if "embedding" in path else "coder"
    for field in fields:
        for value in HOSTILE:
            resp = post(server, path, {**base, "model": model, field: value})
            assert resp.status_code < 500, (field, value, resp.text[:300])
            assert resp.status_code == 200 or "error" in resp.json()
