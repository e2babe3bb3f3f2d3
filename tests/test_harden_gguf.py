"""Crafted GGUFs: architecture metadata that lies about the tensors gets a one-line error before
llama.cpp sees the file (several of these made llama.cpp abort the whole process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ggufrun.errors import InvalidGGUFError
from ggufrun.gguf_info import validate

from crafted import craft, insert_kv, kv_bytes, nested_array_payload, patch_tensor, string_payload

REPO = Path(__file__).resolve().parent.parent

# name -> (craft() keyword arguments, words the one-line error must contain)
CASES = {
    "block_count_0": ({"kv": {"qwen2.block_count": 0}}, "block_count is 0"),
    "block_count_1000": ({"kv": {"qwen2.block_count": 1000}}, "block_count is 1000"),
    "block_count_513": ({"kv": {"qwen2.block_count": 513}}, "from 1 to 512"),
    "block_count_3": ({"kv": {"qwen2.block_count": 3}}, "block 2 has no tensors"),
    "block_count_1": ({"kv": {"qwen2.block_count": 1}}, "tensors for block 1"),
    "context_length_0": ({"kv": {"qwen2.context_length": 0}}, "context_length is 0"),
    "no_embedding_length": ({"kv": {"qwen2.embedding_length": None}}, "embedding_length is missing"),
    "embedding_huge": ({"kv": {"qwen2.embedding_length": 1 << 30}}, "embedding_length is 1073741824"),
    "head_count_0": ({"kv": {"qwen2.attention.head_count": 0}}, "head_count is missing or 0"),
    "head_count_huge": ({"kv": {"qwen2.attention.head_count": 1 << 31}}, "head_count is 2147483648"),
    "head_count_kv_wrong": ({"kv": {"qwen2.attention.head_count_kv": 3}}, "need [64, 48]"),
    "key_length_huge": ({"kv": {"qwen2.attention.key_length": 1 << 20}}, "head size 1048576"),
    "rope_dims_wrong": ({"kv": {"qwen2.rope.dimension_count": 100000}}, "rope head sizes"),
    "experts_1000": ({"kv": {"qwen2.expert_count": 1000}}, "expert_count is 1000"),
    "experts_unused": ({"kv": {"qwen2.expert_count": 8}}, "expert_used_count is 0"),
    "unknown_arch": ({"arch": "frobnicator"}, "unknown architecture 'frobnicator'"),
    "missing_attn_q": ({"drop_tensors": ("blk.1.attn_q.weight",)}, "'blk.1.attn_q.weight' is missing"),
    "missing_token_embd": ({"drop_tensors": ("token_embd.weight",)}, "'token_embd.weight' is missing"),
    "misshaped_attn_q": ({"reshape": {"blk.0.attn_q.weight": (32, 64)}}, "has shape [64, 32]"),
    "misshaped_vocab": ({"reshape": {"token_embd.weight": (100, 64)}}, "512-token vocabulary"),
}

# Files that loaded, then crashed llama.cpp on the first token (or at load, past the old checks):
# name -> (builder(src, dest), words the one-line error must contain)
RAW_CASES = {
    "rms_eps_nan": (lambda s, d: craft(s, d, kv={"qwen2.attention.layer_norm_rms_epsilon": float("nan")}),
                    "layer_norm_rms_epsilon is nan"),
    "rms_eps_negative": (lambda s, d: craft(s, d, kv={"qwen2.attention.layer_norm_rms_epsilon": -1.0}),
                         "layer_norm_rms_epsilon is -1.0; it must be a positive number"),
    "rms_eps_inf": (lambda s, d: craft(s, d, kv={"qwen2.attention.layer_norm_rms_epsilon": float("inf")}), "finite"),
    "rope_base_zero": (lambda s, d: craft(s, d, kv={"qwen2.rope.freq_base": 0.0}), "freq_base is 0.0"),
    "rope_scaling_garbage": (lambda s, d: craft(s, d, kv={"qwen2.rope.scaling.type": "garbage"}),
                             "rope.scaling.type is 'garbage'"),
    "rope_scaling_factor_nan": (lambda s, d: craft(s, d, kv={"qwen2.rope.scaling.factor": float("nan")}), "finite"),
    "tokens_empty": (lambda s, d: craft(s, d, kv={"tokenizer.ggml.tokens": [""] * 512}), "token 0 is an empty string"),
    "tokens_duplicate": (lambda s, d: craft(s, d, kv={"tokenizer.ggml.tokens": [f"t{i % 500}" for i in range(512)]}),
                         "token 500 ('t0') appears twice"),
    "tokens_not_strings": (lambda s, d: craft(s, d, kv={"tokenizer.ggml.tokens": list(range(512))}),
                           "not an array of strings"),
    "f16_patched_to_i16": (lambda s, d: patch_tensor(s, d, "blk.0.attn_q.weight", type_id=25),
                           "'blk.0.attn_q.weight' has type I16"),
    "f32_patched_to_i32": (lambda s, d: patch_tensor(s, d, "blk.0.attn_norm.weight", type_id=26),
                           "'blk.0.attn_norm.weight' has type I32"),
    "nested_3000": (lambda s, d: insert_kv(s, d, kv_bytes("x.deep", 9, nested_array_payload(3000))),
                    "nests arrays more than"),
    "name_50mb": (lambda s, d: insert_kv(s, d, kv_bytes("general.name", 8, string_payload(b"n" * 50_000_000))),
                  "holds a 50,000,000-byte string"),
}


@pytest.fixture(scope="module")
def f16_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ggufrun.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("crafted") / "tiny-f16.gguf", "tiny", quant="f16")


@pytest.mark.parametrize("case", sorted(CASES))
def test_crafted_metadata_is_refused_with_one_line(case: str, f16_tiny: Path, tmp_path: Path) -> None:
    kwargs, words = CASES[case]
    bad = craft(f16_tiny, tmp_path / f"{case}.gguf", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidGGUFError) as err:
        validate(bad)
    message = str(err.value)
    assert words in message and "\n" not in message and str(bad) in message


@pytest.mark.parametrize("case", sorted(RAW_CASES))
def test_files_that_crashed_llama_cpp_later_are_refused_fast(case: str, f16_tiny: Path, tmp_path: Path) -> None:
    import time

    build, words = RAW_CASES[case]
    bad = build(f16_tiny, tmp_path / f"{case}.gguf")
    started = time.monotonic()
    with pytest.raises(InvalidGGUFError) as err:
        validate(bad)
    message = str(err.value)
    assert words in message and "\n" not in message and str(bad) in message
    assert time.monotonic() - started < 10.0  # milliseconds here; the bound catches a parse that walks the whole value


def test_unaltered_copy_and_real_shapes_pass(f16_tiny: Path, tmp_path: Path, tiny_model_factory) -> None:
    validate(craft(f16_tiny, tmp_path / "copy.gguf"))  # the crafting itself breaks nothing
    for arch in ("qwen2", "llama", "gemma2", "gemma3"):
        validate(tiny_model_factory(arch, "q8_0", True))


def test_real_models_pass(gemma_path: Path) -> None:
    info = validate(gemma_path)
    assert info.architecture == "gemma3"


@pytest.mark.parametrize("case", ["block_count_0", "block_count_1000", "key_length_huge", "experts_unused"])
def test_chat_on_a_crafted_file_exits_1_not_sigabrt(case: str, f16_tiny: Path, tmp_path: Path) -> None:
    """These four made llama.cpp abort (SIGABRT, exit 134) before the check existed."""
    kwargs, words = CASES[case]
    bad = craft(f16_tiny, tmp_path / f"{case}.gguf", **kwargs)  # type: ignore[arg-type]
    proc = subprocess.run([sys.executable, "-m", "ggufrun.cli.main", "chat", str(bad), "-p", "hi"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=os.environ.copy(), check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and words in lines[0], proc.stderr


@pytest.mark.parametrize("case, kwargs, words", [
    ("unknown_tokenizer", {"kv": {"tokenizer.ggml.model": "nonsense"}}, "unknown tokenizer: 'nonsense'"),
    ("no_vocab", {"kv": {"tokenizer.ggml.tokens": None}}, "cannot find tokenizer vocab"),
    ("unknown_arch", {"arch": "frobnicator"}, "unknown architecture"),
    ("context_length_0", {"kv": {"qwen2.context_length": 0}}, "context_length is 0"),
])
def test_llama_cpp_log_lines_never_leak_into_the_error(case: str, kwargs: dict, words: str, f16_tiny: Path,
                                                       tmp_path: Path) -> None:
    """What llama.cpp itself rejects comes out as one line with its reason, not its log."""
    bad = craft(f16_tiny, tmp_path / f"{case}.gguf", **kwargs)
    proc = subprocess.run([sys.executable, "-m", "ggufrun.cli.main", "chat", str(bad), "-p", "hi"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=os.environ.copy(), check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("Error: ") and words in proc.stderr, proc.stderr
    assert "llama_model_load" not in proc.stderr


def test_show_names_what_chat_and_serve_would_refuse(f16_tiny: Path, tmp_path: Path) -> None:
    """show reads any parseable header, and says when the file would not be given to llama.cpp."""
    import json

    bad = patch_tensor(f16_tiny, tmp_path / "i16.gguf", "blk.0.attn_q.weight", type_id=25)
    runs = {}
    for path in (bad, f16_tiny):
        proc = subprocess.run([sys.executable, "-m", "ggufrun.cli.main", "show", str(path), "--json"], cwd=REPO,
                              capture_output=True, text=True, timeout=60, env=os.environ.copy(), check=False)
        assert proc.returncode == 0, proc.stderr
        runs[path] = json.loads(proc.stdout)["refused"]
    assert "'blk.0.attn_q.weight' has type I16" in runs[bad] and runs[f16_tiny] is None
