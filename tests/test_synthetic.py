"""Synthetic models: the tensor layout llama.cpp expects, valid quantised blocks, real-model file
sizes, a working tokenizer, and files that llama-cpp-python loads and generates from.

llama.cpp runs in a subprocess so that a native crash fails a test instead of the whole suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ggufrun.errors import ConfigError
from ggufrun.gguf_info import inspect
from ggufrun.synthetic import CHAT_TOKENS, SHAPES, build_vocab, parse_shape, plan, write_synthetic

REPO = Path(__file__).resolve().parents[1]

CHAT_TEXT = "<|im_start|>user\nHello world, the model<|im_end|>\n<start_of_turn>model\nnaïve café ✓ 42<end_of_turn>"

LOAD_AND_GENERATE = r"""
import json, sys
import numpy as np
import llama_cpp
from ggufrun.llama import amx

amx.ensure()  # the guard every model load in ggufrun goes through: AMX weight buffers off where they crash
text = sys.argv[1]
report = []
for path in sys.argv[2:]:
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False, logits_all=True, seed=0)
    tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
    llm.eval(llm.tokenize(b"hello the world of people, and more words to fill a batch", add_bos=False))
    logits = np.array(llm.scores[: llm.n_tokens])
    llm.reset()
    completion = llm.create_completion("The world", max_tokens=8, temperature=0)
    chat = llm.create_chat_completion(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], max_tokens=4)
    report.append({
        "tokens": tokens, "roundtrip": llm.detokenize(tokens, special=True).decode(),
        "finite": bool(np.isfinite(logits).all()), "std": float(logits.std()),
        "generated": completion["usage"]["completion_tokens"], "chat_tokens": chat["usage"]["completion_tokens"],
        "eos": llm.token_eos(), "eos_is_eog": bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, llm.token_eos())),
        "n_vocab": llm.n_vocab(),
    })
print(json.dumps(report))
"""


def load_and_generate(paths: list[Path], text: str = CHAT_TEXT) -> list[dict]:
    result = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, text, *map(str, paths)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"llama.cpp failed (rc {result.returncode}):\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ggufrun.cli.main", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))


ARCHES = ("qwen2", "llama", "gemma2", "gemma3")
QUANTS = ("f16", "q8_0", "q4_k_m")


def test_tiny_models_load_and_generate_in_llama_cpp(tiny_model_factory) -> None:
    paths = [tiny_model_factory(arch, quant, True) for arch in ARCHES for quant in QUANTS]
    for path, row in zip(paths, load_and_generate(paths)):
        assert row["finite"] and 0 < row["std"] < 100, (path.name, row)
        assert row["generated"] > 0 and row["chat_tokens"] > 0, path.name
        assert row["n_vocab"] == 512 and row["eos_is_eog"], path.name
        assert row["roundtrip"] == CHAT_TEXT, path.name


def test_tokenizer_special_tokens_and_byte_fallback(tiny_model_factory) -> None:
    chatml, gemma = tiny_model_factory("qwen2", "q8_0", True), tiny_model_factory("gemma2", "q8_0", True)
    rows = load_and_generate([chatml, gemma])
    tokens = rows[0]["tokens"]
    # each chat marker is one control token; "▁the"-style pieces exist; bytes cover "ï", "é", "✓"
    for marker in CHAT_TOKENS:
        assert CHAT_TOKENS.index(marker) + 3 in tokens
    assert len(tokens) < len(CHAT_TEXT.encode())
    # generation stops at the end of a turn: EOS is the family's end-of-turn token
    assert rows[0]["eos"] == 3 + CHAT_TOKENS.index("<|im_end|>")
    assert rows[1]["eos"] == 3 + CHAT_TOKENS.index("<end_of_turn>")


def test_vocab_builder() -> None:
    tokens, scores, types, ids = build_vocab(151936, "chatml")
    assert len(tokens) == len(set(tokens)) == len(scores) == len(types) == 151936
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and "<0x0A>" in tokens and "▁the" in tokens
    assert tokens[ids["eos"]] == "<|im_end|>" == tokens[ids["eot"]]
    assert build_vocab(300, "gemma")[0][build_vocab(300, "gemma")[3]["eos"]] == "<end_of_turn>"


@pytest.mark.parametrize("arch", ARCHES)
def test_layout_uses_only_the_arch_tensor_names(arch: str) -> None:
    import gguf

    model_arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[model_arch]}
    names = [t.name for t in plan("tiny", arch=arch)]
    for name in names:
        parts = name.rsplit(".", 1)[0].split(".")  # "blk.1.attn_q.bias" -> "blk.{bid}.attn_q"
        if parts[0] == "blk":
            parts[1] = "{bid}"
        assert ".".join(parts) in allowed, name
    assert ("blk.0.attn_q.bias" in names) == (arch == "qwen2")
    assert ("blk.0.post_ffw_norm.weight" in names) == arch.startswith("gemma")
    assert ("blk.0.attn_q_norm.weight" in names) == (arch == "gemma3")


@pytest.mark.parametrize("quant", ["q4_k_m", "q5_k_m", "q6_k", "q4_0", "q5_0", "q8_0", "f16", "f32"])
def test_weights_are_valid_small_and_finite(tmp_path: Path, quant: str) -> None:
    import gguf
    import numpy as np

    # dim 256 so that every matrix holds real K-quant blocks, not the fallback types
    path = write_synthetic(tmp_path / "m.gguf", "llama:dim=256,heads=4,kv_heads=2,ff=512,vocab=300", quant=quant)
    reader = gguf.GGUFReader(path)
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.isfinite(values).all(), t.name
        assert 0 < np.abs(values).max() < 0.1 or t.name.endswith("norm.weight"), (t.name, np.abs(values).max())
    assert inspect(path).file_type == quant.upper()


def test_real_model_sizes_and_mixtures() -> None:
    def size(shape: str, quant: str) -> float:
        return sum(t.n_bytes for t in plan(shape, quant=quant)) / 1e9

    # the published files: qwen2-7b-instruct-q4_k_m.gguf 4.68 GB, -q5_k_m 5.44 GB, -q8_0 8.10 GB;
    # gemma-2-9b-it-Q4_K_M.gguf 5.76 GB, -Q5_K_M 6.65 GB
    assert size("qwen2-7b", "q4_k_m") == pytest.approx(4.68, abs=0.02)
    assert size("qwen2-7b", "q5_k_m") == pytest.approx(5.44, abs=0.02)
    assert size("qwen2-7b", "q8_0") == pytest.approx(8.10, abs=0.03)
    assert size("gemma-2-9b", "q4_k_m") == pytest.approx(5.76, abs=0.02)
    assert size("gemma-2-9b", "q5_k_m") == pytest.approx(6.65, abs=0.02)
    types: dict[str, int] = {}
    for t in plan("qwen2-7b", quant="q4_k_m"):
        types[t.type] = types.get(t.type, 0) + 1
    assert types == {"F32": 141, "Q4_K": 169, "Q6_K": 29}  # as llama.cpp reports for the real file
    q6 = {t.name for t in plan("qwen2-7b", quant="q4_k_m") if t.type == "Q6_K"}
    assert "output.weight" in q6 and "blk.0.ffn_down.weight" in q6 and "blk.3.ffn_down.weight" not in q6


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = write_synthetic(tmp_path / "a.gguf", "tiny-llama", quant="q4_k_m", seed=7).read_bytes()
    b = write_synthetic(tmp_path / "b.gguf", "tiny-llama", quant="q4_k_m", seed=7).read_bytes()
    c = write_synthetic(tmp_path / "c.gguf", "tiny-llama", quant="q4_k_m", seed=8).read_bytes()
    assert a == b and a != c and len(a) == len(c)
    assert not list(tmp_path.glob(".*partial"))


def test_shapes_and_options(tmp_path: Path) -> None:
    spec = parse_shape("llama:layers=3,dim=128,heads=4,kv_heads=1,ff=256,vocab=1000")
    assert (spec.arch, spec.n_layer, spec.n_embd, spec.n_head_kv, spec.n_vocab) == ("llama", 3, 128, 1, 1000)
    assert parse_shape("tiny", arch="gemma").arch == "gemma2"
    assert SHAPES["qwen2-0.5b"].tied and not SHAPES["qwen2-7b"].tied
    path = write_synthetic(tmp_path / "x.gguf", spec, quant="q8_0", chat_template="{{ messages }}", vocab_size=777)
    info = inspect(path)
    assert (info.block_count, info.vocab_size, info.chat_template, info.template_family) == (3, 777, "{{ messages }}", "custom")
    for bad, message in [("huge", "Unknown shape 'huge'.*tiny, tiny-llama"), ("mamba:layers=2", "Unknown architecture"),
                         ("qwen2:layers=0", "must be positive"), ("qwen2:dim=65", "not a multiple of heads"),
                         ("qwen2:heads=4,kv_heads=3", "kv_heads"), ("qwen2:vocab=100", "too small"),
                         ("qwen2:bogus=1", "Bad shape item")]:
        with pytest.raises(ConfigError, match=message):
            parse_shape(bad)
    with pytest.raises(ConfigError, match="Unknown quant 'q3_k'.*q4_k_m"):
        write_synthetic(tmp_path / "y.gguf", quant="q3_k")
    with pytest.raises(ConfigError, match="already exists"):
        write_synthetic(path, overwrite=False)
    assert inspect(path).vocab_size == 777  # untouched


def test_cli_synth_writes_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    first = run_cli("synth", "--shape", "tiny-gemma", "--quant", "q4_k_m", "--out", str(out))
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"Wrote {out}: gemma2 tiny-gemma, Q4_K_M")
    before = out.read_bytes()
    again = run_cli("synth", "--shape", "tiny-gemma", "--seed", "1", "--out", str(out))
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"Error: {out} already exists. Choose another path, or allow replacing it (--force)."]
    assert out.read_bytes() == before
    forced = run_cli("synth", "--shape", "tiny", "--no-template", "--seed", "1", "--force", "--out", str(out))
    assert forced.returncode == 0, forced.stderr
    assert inspect(out).chat_template is None and inspect(out).architecture == "qwen2"
    for args, message in [(["--shape", "qwen3-8b"], "Unknown shape"), (["--quant", "iq2"], "Unknown quant")]:
        bad = run_cli("synth", *args, "--out", str(tmp_path / "bad.gguf"))
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad.gguf").exists()


@pytest.mark.slow
def test_qwen2_0_5b_shape_loads_and_generates(tmp_path: Path) -> None:
    path = write_synthetic(tmp_path / "q05.gguf", "qwen2-0.5b", quant="q4_k_m")
    info = inspect(path)
    assert (info.block_count, info.embedding_length, info.head_count, info.head_count_kv) == (24, 896, 14, 2)
    assert (info.feed_forward_length, info.vocab_size) == (4864, 151936)
    assert "output.weight" not in {t.name for t in info.tensors}  # tied, like the real model
    row = load_and_generate([path], text="<|im_start|>user\nhi<|im_end|>")[0]
    assert row["finite"] and row["generated"] > 0 and row["n_vocab"] == 151936


@pytest.mark.slow
def test_qwen2_7b_q4_k_m_writes_at_full_size(tmp_path: Path) -> None:
    path = write_synthetic(tmp_path / "q7.gguf", "qwen2-7b", quant="q4_k_m")
    info = inspect(path)
    assert info.file_size == pytest.approx(4.68e9, rel=0.005) and info.file_type == "Q4_K_M"
    assert info.tensor_types == {"F32": 141, "Q4_K": 169, "Q6_K": 29}
