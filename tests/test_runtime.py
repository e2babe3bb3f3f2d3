"""The llama.cpp runtime on real (tiny synthetic) GGUF files: the token loop, KV reuse, batching."""

from __future__ import annotations

from pathlib import Path

import pytest

from ggufrun.errors import ConfigError, ContextOverflowError, InvalidGGUFError
from ggufrun.runtime import GenStats, Model, Sampler, TokenDecoder, quantize
from ggufrun.settings import Settings

SETTINGS = Settings(n_ctx=256, threads=1, batch_size=64, ubatch_size=64)


@pytest.fixture(scope="module")
def model(tiny_model: Path):
    with Model.load(tiny_model, SETTINGS, n_seq_max=2) as m:
        yield m


def greedy(model: Model, prompt: list[int], n: int, seq_id: int = 0, stats: GenStats | None = None) -> list[int]:
    return list(model.generate(prompt, Sampler(model, temperature=0), max_tokens=n, seq_id=seq_id, stats=stats))


def test_load_reports_model_facts(model: Model) -> None:
    assert model.n_ctx == 256 and model.n_vocab > 256
    assert model.chat_template and "im_start" in model.chat_template
    assert model.load_seconds > 0
    # "ARCH SIZE FTYPE" with the size counted, not llama.cpp's guess from the layer count
    assert model.description == f"qwen2 {model.n_params / 1e3:.0f}K Q8_0"


def test_the_description_counts_the_parameters() -> None:
    from ggufrun.llama.model import describe

    # llama.cpp's llama_model_desc for SmolLM2-135M (30 layers: its table says 256M) and for gemma3-270m
    assert describe("llama 256M Q4_1", 134_515_008) == "llama 135M Q4_1"
    assert describe("gemma3 270M Q4_K - Medium", 268_098_176) == "gemma3 268M Q4_K - Medium"
    assert describe("qwen2 ?B Q4_K - Medium", 7_615_616_512) == "qwen2 7.6B Q4_K - Medium"
    assert describe("odd", 5) == "odd"


def test_greedy_generation_is_deterministic_and_respects_max_tokens(model: Model) -> None:
    prompt = model.tokenize("The river flows")
    model.reset()
    first = greedy(model, prompt, 12)
    model.reset()
    stats = GenStats()
    second = greedy(model, prompt, 12, stats=stats)
    assert first == second
    assert len(first) <= 12
    if len(first) == 12:
        assert stats.finish_reason == "length"
    assert stats.prompt_tokens == len(prompt) and stats.cached_tokens == 0


def test_kv_cache_prefix_is_reused(model: Model) -> None:
    model.reset()
    prompt = model.tokenize("one two three four five")
    reply = greedy(model, prompt, 4)
    follow = prompt + reply + model.tokenize(" six", add_special=False)
    stats = GenStats()
    greedy(model, follow, 2, stats=stats)
    # Everything but the last reply token (sampled, never decoded) and the new text is reused.
    assert stats.cached_tokens >= len(prompt) + len(reply) - 1


def test_batched_decode_matches_single_sequence(model: Model) -> None:
    prompt = model.tokenize("Batching must not change results")
    model.reset()
    alone = greedy(model, prompt, 6, seq_id=0)
    model.reset()
    samplers = [Sampler(model, temperature=0), Sampler(model, temperature=0)]
    idx = model.decode([(0, prompt, True), (1, prompt, True)])
    outs: list[list[int]] = [[], []]
    for _ in range(len(alone)):
        toks = [model.sample(samplers[i], idx[i]) for i in range(2)]
        for i in range(2):
            outs[i].append(toks[i])
        idx = model.decode([(0, [toks[0]], True), (1, [toks[1]], True)])
    assert outs[0] == outs[1] == alone


def test_token_decoder_never_splits_utf8(model: Model) -> None:
    text = "naïve café 水"
    dec = TokenDecoder(model)
    assert "".join(dec.feed(t) for t in model.tokenize(text, add_special=False)) + dec.flush() == text


def test_prompt_longer_than_context_is_a_clear_error(model: Model) -> None:
    with pytest.raises(ContextOverflowError) as err:
        greedy(model, [model.bos_id] * 300, 1)
    assert err.value.n_tokens == 300 and err.value.n_ctx == 256


def test_eval_logits_shape(model: Model) -> None:
    tokens = model.tokenize("a b c d")
    logits = model.eval_logits(tokens)
    assert logits.shape == (len(tokens), model.n_vocab)


def test_n_ctx_beyond_training_is_rejected(tiny_model: Path) -> None:
    with pytest.raises(ConfigError, match="trained context"):
        Model.load(tiny_model, Settings(n_ctx=10_000_000, threads=1))


def test_invalid_file_never_reaches_llama_cpp(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(InvalidGGUFError):
        Model.load(bad, SETTINGS)


def test_quantize_makes_a_smaller_loadable_file(tiny_model_factory, tmp_path: Path) -> None:
    src = tiny_model_factory("qwen2", "f16", True)
    dst = quantize(src, tmp_path / "q4.gguf", "q4_0", threads=1)
    assert dst.stat().st_size < src.stat().st_size
    with Model.load(dst, SETTINGS) as m:
        assert len(greedy(m, m.tokenize("hello"), 2)) >= 1
    with pytest.raises(ConfigError, match="Unknown quant type"):
        quantize(src, tmp_path / "x.gguf", "q9_z")


@pytest.mark.parametrize("params", [
    {"temperature": 0.0, "repeat_penalty": 1.3},
    {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "min_p": 0.05, "repeat_penalty": 1.1, "seed": 7},
])
def test_every_sampler_chain_generates(model: Model, params: dict) -> None:
    model.reset()
    sampler = Sampler(model, **params)
    out = list(model.generate(model.tokenize("Sampling works"), sampler, max_tokens=5))
    assert all(0 <= t < model.n_vocab for t in out)


def test_seeded_sampling_repeats(model: Model) -> None:
    prompt = model.tokenize("Same seed, same text")
    runs = []
    for _ in range(2):
        model.reset()
        runs.append(list(model.generate(prompt, Sampler(model, temperature=1.0, seed=42), max_tokens=8)))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("kv_cells", [256 * 3, 256], ids=["a part each", "one shared pool"])
def test_a_copied_prefix_continues_as_if_evaluated(tiny_model: Path, kv_cells: int) -> None:
    """copy_prefix in both KV layouts (a whole part copied then cut, or shared cells): the copied
    sequence's next logits are those of evaluating its whole prompt itself, and the source is untouched."""
    import numpy as np

    settings = Settings(n_ctx=256, threads=1, batch_size=64, ubatch_size=64, flash_attn="off")
    with Model.load(tiny_model, settings, n_seq_max=3, kv_cells=kv_cells) as m:
        assert m.unified == (kv_cells < 256 * 3)
        prompt = m.tokenize("A shared system prompt that two requests begin with, and then")
        m.decode([(2, prompt, True)])
        fresh = m.logits_rows(1)[0].copy()
        m.reset()
        m.decode([(0, prompt + m.tokenize(" something else entirely"), True)])
        assert m.copy_prefix(0, 1, len(prompt) - 1) == len(prompt) - 1
        m.decode([(1, prompt[-1:], True)])
        assert np.array_equal(m.logits_rows(1)[0], fresh)
        assert m.seq_len(0) > len(prompt) and m.seq_len(1) == len(prompt)


def test_common_length_is_the_shared_prefix_wherever_the_lists_part() -> None:
    """The server's prefix match (every slot, every admitted request) compares slices in doubling
    runs: the same answer as a token-by-token walk, at every parting point and length."""
    import random

    from ggufrun.llama.model import common_length

    def walk(a: list[int], b: list[int]) -> int:
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n

    rng = random.Random(7)
    for _ in range(3000):
        a = [rng.randrange(3) for _ in range(rng.randrange(80))]
        b = a[:rng.randrange(len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(80))]
        assert common_length(a, b) == common_length(b, a) == walk(a, b)
    long = list(range(5000))
    for cut in (0, 1, 7, 8, 9, 4095, 4999):
        assert common_length(long, long[:cut] + [-1] + long[cut + 1:]) == cut
    assert common_length(long, long) == 5000 and common_length(long, []) == 0
