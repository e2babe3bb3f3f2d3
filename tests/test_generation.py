"""The per-sequence pipeline and the batched sampler, against a plain one-row reference."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from ggufrun.generation import REACH, Generation, SamplingParams, SeqSampler, _draw, _penalise, classify_stops, sample_rows


def reference_draw(row: np.ndarray, p: SamplingParams, u: float) -> int:
    """llama.cpp's chain written out for one row with a full sort: top-k, top-p over the top-k
    distribution, min-p relative to the top, temperature, inverse-CDF draw with ``u``."""
    order = sorted(range(len(row)), key=lambda i: (-row[i], i))
    top = float(row[order[0]])
    if not (p.top_k > 0 or p.top_p < 1 or p.min_p > 0):
        order = list(range(len(row)))  # the whole distribution is drawn in token-id order
    cand = [i for i in order if row[i] >= top - REACH]
    if 0 < p.top_k < len(row):
        cand = cand[: p.top_k]
    e = [math.exp(float(row[i]) - top) for i in cand]
    if p.top_p < 1.0:
        # top-p's mass is over the top-k tokens, or over the whole vocabulary without top-k
        z = sum(e) if 0 < p.top_k < len(row) else sum(math.exp(float(x) - top) for x in row)
        acc, keep = 0.0, 0
        for x in e:
            if acc / z >= p.top_p:
                break
            acc += x
            keep += 1
        cand, e = cand[: max(keep, 1)], e[: max(keep, 1)]
    if p.min_p > 0:
        kept = [k for k, x in enumerate(e) if x >= p.min_p] or [0]
        cand = [cand[k] for k in kept]
    w = np.cumsum([math.exp((float(row[i]) - top) / p.temperature) for i in cand])
    return cand[min(int((w < u * w[-1]).sum()), len(cand) - 1)]


@pytest.mark.parametrize("params", [
    dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
    dict(temperature=1.0, top_k=0, top_p=0.9, min_p=0.0),
    dict(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0),
    dict(temperature=0.5, top_k=5, top_p=1.0, min_p=0.0),
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2),
])
@pytest.mark.parametrize("scale", [1.0, 3.0, 12.0])  # flat to peaked: different candidate reaches
def test_batched_draw_matches_the_one_row_reference(params: dict[str, float], scale: float) -> None:
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((24, 3000)) * scale).astype(np.float32)
    p = SamplingParams(**params)  # type: ignore[arg-type]
    seqs = [SeqSampler(p) for _ in rows]
    u = rng.random(len(rows))
    got = _draw(rows.copy(), seqs, u)
    want = [reference_draw(r, p, float(x)) for r, x in zip(rows, u)]
    assert list(got) == want
    assert len(set(want)) > 1  # the draws really vary with u


def test_rows_with_different_settings_in_one_batch_each_get_their_own() -> None:
    rng = np.random.default_rng(1)
    rows = (rng.standard_normal((3, 500)) * 2).astype(np.float32)
    ps = [SamplingParams(temperature=0.7, top_k=3), SamplingParams(temperature=1.2, top_k=0, top_p=0.5, min_p=0.0),
          SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.3)]
    u = rng.random(3)
    got = _draw(rows.copy(), [SeqSampler(p) for p in ps], u)
    assert list(got) == [reference_draw(r, p, float(x)) for r, p, x in zip(rows, ps, u)]


def test_penalties_see_the_prompt_and_follow_llama_cpp() -> None:
    p = SamplingParams(repeat_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25, repeat_last_n=4)
    s = SeqSampler(p, prompt=[9, 1, 2, 2, 3])  # only the last 4 count: 1, 2, 2, 3
    s.accept(3)  # window now 2, 2, 3, 3
    row = np.array([[1.0, 1.0, 4.0, -4.0, 1.0]], dtype=np.float32)
    _penalise(row, [s])
    assert row[0].tolist() == pytest.approx([1.0, 1.0, 4.0 / 2 - 2 * 0.25 - 0.5, -4.0 * 2 - 2 * 0.25 - 0.5, 1.0])


@pytest.mark.parametrize("compiled", [True, False])
def test_pool_passes_give_what_one_pass_gives(compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Split over threads (the compiled helper's, or without it the pool's numpy tasks), a step
    gives each row what it gives alone."""
    from ggufrun import generation, native
    from ggufrun.generation import _argmax_rows, _top_k_candidates

    if not compiled:
        monkeypatch.setattr(native, "available", lambda: False)
        tasks = 0
        start = generation._start_pool

        def counted() -> Any:
            nonlocal tasks
            tasks += 1
            return start()

        monkeypatch.setattr(generation, "_start_pool", counted)

    rng = np.random.default_rng(3)
    rows = (rng.standard_normal((64, 20000)) * 3).astype(np.float32)  # 64 rows: big enough for the pool
    assert _argmax_rows(rows).tolist() == rows.argmax(axis=1).tolist()
    ks = np.full(64, 40)
    together = _top_k_candidates(rows, ks)
    for i in range(64):
        alone = _top_k_candidates(rows[i : i + 1], ks[i : i + 1])[0]
        assert alone is not None and together[i] is not None
        assert together[i][0].tolist() == alone[0].tolist() and together[i][1].tolist() == alone[1].tolist()
    mixed = _top_k_candidates(rows, np.array([5, 40, 100, 1] * 16))
    for i, k in enumerate([5, 40, 100, 1] * 16):  # a superset of the row's top k, whatever the others' k
        found = mixed[i]
        assert found is not None
        assert np.sort(found[1])[::-1][:k].tolist() == np.sort(rows[i])[::-1][:k].tolist()
    if not compiled:
        assert tasks > 0  # the numpy path really went through the pool


@pytest.mark.parametrize("compiled", [True, False])
def test_top_k_candidates_hold_each_rows_top_k_in_token_order(compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled helper (built by the install) and the numpy path both return, per row, tokens
    in token order that include every token at or above the row's k-th largest logit; the compiled
    one exactly those, and None for a NaN row or a flat one (the caller draws from the whole row)."""
    from ggufrun import native
    from ggufrun.generation import _top_k_candidates

    assert native.available(), "the install builds ggufrun/_topk.c"
    if not compiled:
        monkeypatch.setattr(native, "available", lambda: False)
    rng = np.random.default_rng(4)
    rows = (rng.standard_normal((16, 50000)) * 3).astype(np.float32)
    rows[5, 777] = np.nan
    rows[6] = 1.0  # flat: every token ties
    rows[7, 100:140] = rows[7].max() + 1  # 40 tokens tied at the top
    ks = np.array([40, 1, 5, 100] * 4)
    found = _top_k_candidates(rows, ks)
    huge = _top_k_candidates(rows[:2], np.array([40000, 40]))  # more than one per block: no search, no big buffers
    alone = _top_k_candidates(rows[1:2], np.array([40]))[0]  # ... and only that row goes without candidates
    assert huge[0] is None and huge[1] is not None and alone is not None and huge[1][0].tolist() == alone[0].tolist()
    if compiled:
        assert found[5] is None and found[6] is None
    for i in (0, 1, 2, 3, 4, 7, 8, 15):
        ids, vals = found[i]
        kth = np.sort(rows[i])[::-1][ks[i] - 1]
        must = np.flatnonzero(rows[i] >= kth)
        assert np.all(np.diff(ids) > 0) and vals.tolist() == rows[i][ids].tolist()
        assert set(must.tolist()) <= set(ids.tolist())
        if compiled:
            assert ids.tolist() == must.tolist()


@pytest.mark.parametrize("vocab", [50, 64 * 300 + 17])
def test_argmax_rows_is_numpys_argmax_with_nans_ties_and_tails(vocab: int) -> None:
    """The compiled argmax (threads started in C) returns numpy's answer: the first NaN, else the
    first of equal maxima, also when it lies in the tail past the last whole block."""
    from ggufrun import native
    from ggufrun.generation import _argmax_rows

    assert native.available()
    rng = np.random.default_rng(6)
    rows = rng.standard_normal((40, vocab)).astype(np.float32)
    rows[1, [7, 30]] = 50.0  # a tie: the first
    rows[2, [20, vocab - 1]] = np.nan  # NaNs: the first
    rows[3] = -np.inf
    rows[4, vocab - 1] = 60.0  # in the tail
    rows[5, 3] = np.inf
    rows[6, :] = 1.0  # all equal
    for threads in (1, 3, 40):
        assert native.argmax_rows(rows, threads).tolist() == rows.argmax(axis=1).tolist()
    assert _argmax_rows(rows).tolist() == rows.argmax(axis=1).tolist()


def test_chains_drawn_in_one_c_call_draw_what_each_draws_alone() -> None:
    """The compiled helper runs each row's llama.cpp chain over its candidates in one call (its
    layout of llama.cpp's candidate structs checked against llama-cpp-python's): the tokens are
    those of the same chains called one row at a time, step after step."""
    from ggufrun import native
    from ggufrun.generation import _draw_compiled, _top_k_candidates
    from ggufrun.runtime import DrawChain

    rng = np.random.default_rng(8)
    vocab = 30000
    params = [SamplingParams(seed=i, temperature=0.9, top_p=0.9, min_p=0.02, top_k=(40, 7)[i % 2]) for i in range(16)]
    together = [DrawChain(p, vocab) for p in params]
    alone = [DrawChain(p, vocab) for p in params]
    ks = np.array([c.top_k for c in together])
    for _ in range(5):
        logits = (rng.standard_normal((16, vocab)) * 3).astype(np.float32)
        drawn, _ = _draw_compiled(logits, ks, together, 3)
        assert native.available() and drawn is not None
        cands = _top_k_candidates(logits, ks)
        assert drawn.tolist() == [c.draw_among(*cand) for c, cand in zip(alone, cands)]  # type: ignore[misc]


def test_seeded_draws_do_not_depend_on_the_batch() -> None:
    rng = np.random.default_rng(2)
    row = (rng.standard_normal(800) * 2).astype(np.float32)
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    alone = SeqSampler(p)
    together = SeqSampler(p)
    others = [SeqSampler(SamplingParams(temperature=1.0, seed=i)) for i in range(5)]
    a = [sample_rows(row[None].copy(), [alone])[0][0] for _ in range(20)]
    b = [sample_rows(np.stack([row] * 6), [*others[:3], together, *others[3:]])[0][3] for _ in range(20)]
    assert a == b and len(set(a)) > 5


@pytest.mark.parametrize("vocab", [151936, 50257, 1000])
def test_top_k_chains_draw_the_same_from_candidates_as_from_the_whole_row(vocab: int) -> None:
    """sample_rows hands a top-k chain only its row's top candidates; the tokens must be those
    of the chain over the whole vocabulary (flat, peaked, mostly -inf, NaN and all-tied rows)."""
    from ggufrun.runtime import DrawChain

    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((12, vocab)) * np.linspace(1, 10, 12)[:, None]).astype(np.float32)
    logits[3] = -np.inf
    logits[3, :50] = 0.5 * np.arange(50)
    logits[5, ::7] = np.nan
    logits[6] = 0.0

    def draws(whole_row: bool) -> list[list[int]]:
        params = [SamplingParams(seed=i, top_k=(40, 1, 100, 0)[i % 4]) for i in range(12)]
        seqs = [SeqSampler(p, draw=DrawChain(p, vocab)) for p in params]
        if whole_row:
            for s in seqs:
                s.draw.top_k = 0  # type: ignore[union-attr]  (the chain keeps its top-k; no prefilter)
        return [sample_rows(logits.copy(), seqs)[0] for _ in range(4)]

    assert draws(False) == draws(True)


@pytest.mark.parametrize("compiled", [True, False])
def test_a_big_step_drawn_in_pool_chunks_gives_each_row_what_it_gets_alone(compiled: bool,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """64 chained rows split over threads (the compiled helper's; without it, pool tasks that each
    draw a chunk whole): every seeded row still draws what it draws alone, whatever chunk it is in."""
    from ggufrun import native
    from ggufrun.runtime import DrawChain

    if not compiled:
        monkeypatch.setattr(native, "available", lambda: False)

    rng = np.random.default_rng(5)
    vocab = 30000
    logits = (rng.standard_normal((64, vocab)) * 3).astype(np.float32)

    def seqs() -> list[SeqSampler]:
        params = [SamplingParams(seed=i, temperature=0.8, top_p=0.95, top_k=(40, 5)[i % 2]) for i in range(64)]
        return [SeqSampler(p, draw=DrawChain(p, vocab)) for p in params]

    batch = seqs()
    together = [sample_rows(logits.copy(), batch)[0] for _ in range(3)]
    single = seqs()
    alone = [[sample_rows(logits[i : i + 1].copy(), [single[i]])[0][0] for i in range(64)] for _ in range(3)]
    assert together == alone and len({t for step in together for t in step}) > 64


class FakeVocab:
    """A byte-level vocabulary: token i is byte i, 256 is an end-of-generation control token."""

    n_vocab = 257

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        return b"" if token == 256 else bytes([token])

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return [256] if text == "<eot>" else list(text.encode())

    def is_eog(self, token: int) -> bool:
        return token == 256


def feed(gen: Generation, data: bytes) -> tuple[str, str | None]:
    out = ""
    for b in data:
        text, reason = gen.accept(b)
        out += text
        if reason:
            return out, reason
    return out + gen.finish(), None


def test_utf8_split_across_tokens_and_stop_strings() -> None:
    gen = Generation(FakeVocab(), [1, 2], SamplingParams(), stop=["STOP", "<eot>"])
    assert gen.stop_ids == frozenset({256})
    text, reason = feed(gen, "héllo ☃ wSTOPorld".encode())
    assert (text, reason) == ("héllo ☃ w", "stop")
    gen = Generation(FakeVocab(), [1], SamplingParams(), stop=["STOP"])
    assert feed(gen, b"ST no") == ("ST no", None)  # a held-back prefix comes out once it is not a stop
    gen = Generation(FakeVocab(), [1], SamplingParams(), max_tokens=3)
    assert feed(gen, b"abcdef") == ("abc", "length") and gen.stats.gen_tokens == 3
    gen = Generation(FakeVocab(), [1], SamplingParams())
    assert gen.accept(256) == ("", "stop")
    gen = Generation(FakeVocab(), [1], SamplingParams(), ignore_eos=True, n_ctx=4)
    assert gen.accept(256) == ("", None) and gen.accept(65) == ("A", None) and gen.accept(66) == ("B", "length")


def test_classify_stops_matches_control_tokens_by_id_and_the_rest_by_text() -> None:
    ids, texts = classify_stops(FakeVocab(), ["<eot>", "x", "ab"])
    assert ids == frozenset({256, ord("x")}) and texts == ("x", "ab")
