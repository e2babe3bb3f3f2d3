"""A grammar row whose draw does not fit is drawn again from only the tokens that can matter
(generation._redraw with grammar_filter's prefilter); the token must be the one llama-server's
method gives: the grammar over the whole vocabulary, then the chain over the masked row."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ggufrun import generation
from ggufrun.generation import (
    SamplingParams,
    SeqSampler,
    _redraw,
    sample_rows,
)
from ggufrun.llama.grammar import schema_to_gbnf
from ggufrun.llama.grammar_filter import analyse, llama_code_points
from ggufrun.runtime import DrawChain, Model
from ggufrun.settings import Settings
from slowpath import old_redraw

NUMBERS = {"type": "object", "properties": {"numbers": {"type": "array", "items": {"type": "integer"}, "minItems": 3}},
           "required": ["numbers"]}
PERSON = {"type": "object", "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"enum": ["a", "béta", "c"]}},
                         "home": {"type": "object", "properties": {"x": {"type": "number"}}}}}
GRAMMARS = {
    "numbers": schema_to_gbnf(NUMBERS),
    "person": schema_to_gbnf(PERSON),  # names a code point above 0x7F
    "any-json": schema_to_gbnf({"type": "object"}),  # strings: permissive states
    "greek": 'root ::= "«" [α-ω]+ "» " [0-9]{1,3} "\\n"',
    "token-ref": 'root ::= "a" <[300]> [a-z]+ "."',  # matched by token id: the prefilter stands aside
}
PARAMS = {
    "greedy": SamplingParams(temperature=0.0),
    "default-chain": SamplingParams(seed=3, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
    "no-top-k": SamplingParams(seed=4, temperature=1.0, top_k=0, top_p=0.9, min_p=0.0),
    "top-3-logprobs": SamplingParams(seed=5, temperature=0.7, top_k=3, logprobs=2),
}



@contextlib.contextmanager
def whole_vocabulary() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generation, "_redraw", old_redraw)
        yield


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Model]:
    """Tiny weights, a 32k synthetic vocabulary (words, byte tokens): big enough for every path of
    the fallback, small enough for the whole-vocabulary reference to be cheap (the slow test below
    walks gemma's 262k)."""
    from ggufrun.synthetic import write_synthetic

    path = write_synthetic(tmp_path_factory.mktemp("vocab") / "v32k.gguf", "tiny", vocab_size=32768)
    with Model.load(path, Settings(n_gpu_layers=0, n_ctx=256)) as m:
        yield m


def sampler(model: Model, grammar: str, params: SamplingParams, chain: bool = True) -> SeqSampler:
    draw = DrawChain(params, model.n_vocab) if chain and not params.greedy else None
    return SeqSampler(params, grammar=model.grammar(grammar), draw=draw)


def walk(model: Model, grammar: str, params: SamplingParams, steps: int, seed: int, chain: bool = True) -> list[int]:
    """Draw ``steps`` tokens under ``grammar`` from random rows, every one through the grammar
    fallback, by the fast path and by the whole-vocabulary pass in lockstep; both must agree."""
    rng = np.random.default_rng(seed)
    fast, slow = sampler(model, grammar, params, chain), sampler(model, grammar, params, chain)
    out = []
    try:
        for _ in range(steps):
            row = (rng.standard_normal(model.n_vocab) * rng.choice([1.0, 3.0, 8.0])).astype(np.float32)
            a, b = _redraw(row.copy(), fast), old_redraw(row.copy(), slow)
            assert a == b, (out, a, b)
            out.append(a)
            if a < 0 or model.is_eog(a):
                break
            fast.accept(a)
            slow.accept(a)
    finally:
        fast.close()
        slow.close()
    return out


@pytest.mark.parametrize("name", list(GRAMMARS))
def test_the_fast_redraw_picks_what_the_whole_vocabulary_pass_picks(model: Model, name: str) -> None:
    for pname, params in PARAMS.items():
        tokens = walk(model, GRAMMARS[name], params, steps=10, seed=len(pname))
        assert len(tokens) >= 3


def test_the_numpy_draw_and_a_utf8_split_across_byte_tokens_agree_too(model: Model) -> None:
    # The synthetic vocabulary spells "é" as two byte tokens: the grammar is mid-character between them.
    params = SamplingParams(seed=9, temperature=1.0, top_k=40)
    tokens = walk(model, GRAMMARS["greek"], params, steps=8, seed=1, chain=False)
    assert len(tokens) >= 3
    g = model.grammar(GRAMMARS["person"])
    for t in model.tokenize('{"name": "x", "age": 1, "tags": ["b', add_special=False) + [model.tokenize("é", add_special=False)[0]]:
        g.accept(t)
    assert g.candidates().count < 1000  # mid-character no probe passes: only the tokens always checked are left
    g.close()


def test_sample_rows_with_grammar_rows_in_a_batch_matches_the_whole_vocabulary_pass(model: Model) -> None:
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((6, model.n_vocab)) * 4).astype(np.float32)
    specs = [("numbers", "greedy"), (None, "default-chain"), ("person", "default-chain"), ("any-json", "top-3-logprobs"),
             ("numbers", "no-top-k"), (None, "greedy")]
    prefix = model.tokenize('{"numbers": [1', add_special=False)

    def run() -> tuple[list[int], list[object]]:
        seqs = []
        for grammar, pname in specs:
            p = PARAMS[pname]
            s = sampler(model, GRAMMARS[grammar], p) if grammar else SeqSampler(p, draw=DrawChain(p, model.n_vocab) if not p.greedy else None)
            if grammar == "numbers":
                for t in prefix:
                    s.accept(t)
            seqs.append(s)
        out = sample_rows(logits.copy(), seqs)
        for s in seqs:
            s.close()
        return out

    fast = run()
    with whole_vocabulary():
        slow = run()
    assert fast == slow


def test_code_points_decode_as_llama_cpp_decodes_them() -> None:
    assert llama_code_points("aé".encode()) == ([97, 0xE9], 0)
    assert llama_code_points(b"a\xc3") == ([97], 1)  # ends inside a character
    assert llama_code_points(b"\x80a") is None  # a continuation byte cannot start one
    assert llama_code_points(b"ab\x00c") == ([97, 98], 0)  # a C string ends at NUL


def test_grammar_text_analysis() -> None:
    plain = analyse(GRAMMARS["numbers"])
    assert not plain.token_refs and plain.high == ()
    assert analyse('root ::= [^"\\\\] [\\x00-\\U0010FFFF]') == analyse("root ::= \"<x>\"  # <[1]> é") == plain
    assert analyse(GRAMMARS["person"]).high == analyse("root ::= [\\u00e9]").high == ((0xE9, 0xE9),)
    assert analyse(GRAMMARS["greek"]).high == ((0xAB, 0xAB), (0xBB, 0xBB), (0x3B1, 0x3C9))
    assert analyse(GRAMMARS["token-ref"]).token_refs


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GRAMMARS))
def test_the_fast_redraw_agrees_on_a_real_multilingual_vocabulary(gemma_path: Path, name: str) -> None:
    """gemma3-270m's 262k tokens: many scripts, single-character tokens beyond ASCII, byte tokens."""
    grammar = GRAMMARS[name].replace("<[300]>", "<[1234]>")
    with Model.load(gemma_path, Settings(n_gpu_layers=0, n_ctx=256)) as m:
        for pname, params in PARAMS.items():
            walk(m, grammar, params, steps=25, seed=len(pname) + 10)


def test_a_lazy_grammar_is_free_until_triggered_and_survives_a_trigger_it_cannot_take(model: Model) -> None:
    def feed(g: object, text: str) -> None:
        for t in model.tokenize(text, add_special=False):
            g.accept(t)  # type: ignore[attr-defined]

    x, y = (model.tokenize(c, add_special=False)[0] for c in "xy")
    g = model.grammar('root ::= "<t" [x]+', triggers=["<t"])
    feed(g, "Hello ")
    assert g.allows(y) and g.allows(x)  # nothing is constrained before the trigger
    feed(g, "<t")
    assert g.allows(x) and not g.allows(y)
    g.close()
    # "<to" matches the trigger, but the grammar wants "x" after "<t": llama.cpp's own lazy grammar
    # throws there (and the process aborts); this one stays free, and later text does not revive the match
    g = model.grammar('root ::= "<t" [x]+', triggers=["<t"])
    feed(g, "<to")
    assert g.allows(y)
    feed(g, " and x")
    assert g.allows(y)
    g.close()
    g = model.grammar('root ::= "{" [x]+', triggers=[r'^\s*(\{[\s\S]*)$'])  # the grammar starts at the group
    feed(g, "  {x")
    assert g.allows(x) and not g.allows(y)
    g.close()
    g = model.grammar('root ::= "o" [x]+', triggers=["o"])  # the match starts inside the token "to"
    assert model.tokenize("to", add_special=False) != model.tokenize("t", add_special=False) + model.tokenize("o", add_special=False)
    feed(g, "to")
    assert g.allows(x) and not g.allows(y)
    g.close()
