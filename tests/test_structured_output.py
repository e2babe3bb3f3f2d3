"""Structured output as extraction workloads send it (issue 22): a fresh schema per request, from
bench/structured_load.py's mix (extraction objects, enums, nested arrays, patterns, formats, anyOf,
tool calls). Each one converts, llama.cpp parses it, the fast redraw picks what the slow path (the
grammar over the whole vocabulary) picks, and a real model's finished replies validate."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from ggufrun import generation
from ggufrun.generation import SamplingParams, SeqSampler, _redraw
from ggufrun.llama import model as model_mod
from ggufrun.llama import sampler as sampler_mod
from ggufrun.llama.grammar import schema_to_gbnf
from ggufrun.runtime import DrawChain, Model
from ggufrun.server.constraints import schema_grammar
from ggufrun.settings import Settings
from slowpath import old_redraw

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _bench_module():
    sys.path.insert(0, str(BENCH))  # (it imports its neighbours reference.py and serve_load.py)
    try:
        spec = importlib.util.spec_from_file_location("structured_load", BENCH / "structured_load.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


S = _bench_module()
MIX = [S.schema_for(n) for n in range(len(S.SCHEMAS))]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Model]:
    """A 32k synthetic vocabulary (words and byte tokens: any text tokenises)."""
    from ggufrun.synthetic import write_synthetic

    path = write_synthetic(tmp_path_factory.mktemp("vocab") / "v32k.gguf", "tiny", vocab_size=32768)
    with Model.load(path, Settings(n_gpu_layers=0, n_ctx=256)) as m:
        yield m



def accepts(model: Model, gbnf: str, text: str) -> bool:
    """Whether the grammar takes ``text`` whole (every token, then end of generation)."""
    g = model.grammar(gbnf)
    try:
        for t in model.tokenize(text, add_special=False, parse_special=False):
            if not g.allows(t):
                return False
            g.accept(t)
        return g.allows(model.eos_id)
    finally:
        g.close()


def test_every_request_gets_a_schema_of_its_own_and_each_converts_and_parses(model: Model) -> None:
    seen = set()
    for n in range(3 * len(S.SCHEMAS)):
        name, schema = S.schema_for(n)
        gbnf = schema_grammar(schema, "response_format.json_schema.schema")
        assert gbnf not in seen, name  # nothing a server keeps per schema helps the next request
        seen.add(gbnf)
        model.grammar(gbnf).close()  # llama.cpp parses it (the person schema's '\\.' once made it refuse)


@pytest.mark.parametrize("pattern,good,bad", [
    ("^[a-z.]+@[a-z]+\\.[a-z]{2,3}$", "maria.lopez@example.com", "maria@examplecom"),
    ("^\\d{3}-\\d{4}$", "555-0134", "55a-0134"),
    ("^[\\w.\\-]+$", "file_name-2.txt", "file name"),
    ("^\\(\\d+\\)\\S*$", "(12)ab", "(12) ab"),
    ("^[A-Z]\\/[0-9]$", "A/1", "A-1"),
])
def test_regex_escapes_in_patterns_are_enforced_as_the_regex_means_them(model: Model, pattern: str, good: str, bad: str) -> None:
    gbnf = schema_to_gbnf({"type": "string", "pattern": pattern})
    assert accepts(model, gbnf, json.dumps(good))
    assert not accepts(model, gbnf, json.dumps(bad))


@pytest.mark.parametrize("pattern, escape", [("^[\\S]+$", "\\S inside a character class"),
                                             ("^[a\\D]$", "\\D inside a character class"), ("^\\bword$", "\\b")])
def test_escapes_the_grammar_cannot_express_are_refused_by_name(pattern: str, escape: str) -> None:
    # llama.cpp refused these with "unknown escape" and a message about the grammar's root rule
    from ggufrun.llama.grammar import SchemaError

    with pytest.raises(SchemaError, match=re.escape(f"uses {escape}")):
        schema_to_gbnf({"type": "string", "pattern": pattern})


def test_the_vocabulary_index_is_built_once_when_a_burst_of_first_grammars_arrives(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ggufrun.synthetic import write_synthetic

    built = []

    class Counted(sampler_mod.VocabIndex):  # type: ignore[misc,valid-type]
        def __init__(self, *a, **k):  # type: ignore[no-untyped-def]
            built.append(1)
            super().__init__(*a, **k)

    monkeypatch.setattr(sampler_mod, "VocabIndex", Counted)
    path = write_synthetic(tmp_path / "v.gguf", "tiny", vocab_size=8192)
    with Model.load(path, Settings(n_gpu_layers=0, n_ctx=128)) as m:
        start = threading.Barrier(8)
        got = []

        def first_request() -> None:
            start.wait()
            got.append(sampler_mod.vocab_index(m))

        threads = [threading.Thread(target=first_request) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(built) == 1 and all(g is got[0] for g in got)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_the_fast_path_picks_the_slow_paths_tokens_through_the_schema_mix(model: Model, sampled: bool) -> None:
    for i, (name, schema) in enumerate(MIX):
        gbnf = schema_to_gbnf(schema)
        params = SamplingParams(seed=11 + i, temperature=0.9, top_k=40, top_p=0.95, min_p=0.05) if sampled \
            else SamplingParams(temperature=0.0)
        rng = np.random.default_rng(i)

        def seq() -> SeqSampler:
            draw = DrawChain(params, model.n_vocab) if sampled else None
            return SeqSampler(params, grammar=model.grammar(gbnf), draw=draw)

        fast, slow = seq(), seq()
        try:
            for step in range(12):
                row = (rng.standard_normal(model.n_vocab) * 4).astype(np.float32)
                a, b = _redraw(row.copy(), fast), old_redraw(row.copy(), slow)
                assert a == b, (name, step, a, b)
                if a < 0 or model.is_eog(a):
                    break
                fast.accept(a)
                slow.accept(a)
        finally:
            fast.close()
            slow.close()


@pytest.mark.slow
@pytest.mark.timeout(900)  # ~200 s a mode on a loaded 2-core box (the whole-row grammar at every miss)
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_smollm2_replies_to_the_mix_are_valid_and_the_slow_path_picks_the_same(smollm2_gguf: Path, sampled: bool) -> None:
    """A real model's logits: every finished reply validates against its own schema, and at every
    step the slow path (a shadow sampler, the grammar over the whole row) picks the same token
    from the same logits."""
    with Model.load(smollm2_gguf, Settings(n_gpu_layers=0, n_ctx=512)) as m:
        finished = 0
        for n, (name, schema) in enumerate(MIX):
            prompt = m.tokenize(f"Extract the {name} from this text as JSON.\n\n{S.TEXT}\nJSON: ")
            kw = {"seed": 5 + n, "temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05} if sampled else {"temperature": 0.0}
            params = SamplingParams(grammar=schema_grammar(schema, "schema"), **kw)
            shadow = SeqSampler(params, grammar=m.grammar(params.grammar), draw=m.draw_chain(params) if sampled else None)
            gen = m.start(prompt, params, max_tokens=120)
            fast_rows = model_mod.sample_rows

            def both(rows: np.ndarray, seqs: list[SeqSampler]) -> tuple[list[int], list[object]]:
                row = rows.copy()  # before sampling edits it
                tokens, infos = fast_rows(rows, seqs)
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr(generation, "_redraw", old_redraw)
                    slow = fast_rows(row, [shadow])[0][0]
                assert slow == tokens[0], (name, slow, tokens[0])
                if slow >= 0:
                    shadow.accept(slow)
                return tokens, infos  # type: ignore[return-value]

            try:
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr(model_mod, "sample_rows", both)
                    tokens = [t for t, _ in m.stream(gen, prompt)]
            finally:
                shadow.close()
            if gen.finish_reason == "stop":
                finished += 1
                jsonschema.validate(json.loads(m.detokenize([t for t in tokens if t >= 0])), schema)
        assert finished >= len(MIX) // 2


def test_a_string_of_byte_tokens_stays_valid_utf8_within_max_length_and_the_fast_path_agrees(model: Model) -> None:
    """llama.cpp's grammar decodes leniently: an overlong form, a surrogate or a lead byte F8..FF
    is one character of ``[^"\\\\]`` to it, and an H100 reply's string ended in four U+FFFD, past
    its maxLength once decoded. Logits pushed toward byte tokens (and the closing quote) make
    those likely at every step: each finished reply is valid UTF-8 that validates, and the fast
    redraw still picks what the grammar over the whole row picks."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 8}}, "required": ["s"],
              "additionalProperties": False}
    gbnf = schema_to_gbnf(schema)
    pieces = [model.token_bytes(t, special=True) for t in range(model.n_vocab)]
    high = [t for t, p in enumerate(pieces) if len(p) == 1 and p[0] >= 0x80]
    quote = [t for t, p in enumerate(pieces) if p == b'"']
    assert len(high) == 128 and quote
    finished = 0
    for trial in range(12):
        rng = np.random.default_rng(trial)
        params = SamplingParams(temperature=0.0)
        fast = SeqSampler(params, grammar=model.grammar(gbnf))
        slow = SeqSampler(params, grammar=model.grammar(gbnf))
        out: list[int] = []
        try:
            for step in range(40):
                row = rng.standard_normal(model.n_vocab).astype(np.float32)
                row[high] += 6 + rng.standard_normal(len(high)).astype(np.float32) * 3
                row[quote] += 8
                a, b = _redraw(row.copy(), fast), old_redraw(row.copy(), slow)
                assert a == b, (trial, step, a, b)
                if a < 0 or model.is_eog(a):
                    break
                out.append(a)
                fast.accept(a)
                slow.accept(a)
        finally:
            fast.close()
            slow.close()
        if a >= 0 and model.is_eog(a):
            finished += 1
            reply = json.loads(b"".join(pieces[t] for t in out).decode("utf-8"))  # strict: no U+FFFD
            jsonschema.validate(reply, schema)
            assert any(ord(c) >= 0x80 for c in reply["s"]), reply  # the bias did reach the string
    assert finished >= 8


def test_the_utf8_guards_one_token_check_agrees_with_its_row_check() -> None:
    """Grammar.allows (every draw of a grammar row) uses ok_one; it must say what ok says."""
    from types import SimpleNamespace

    from ggufrun.llama.utf8_guard import Utf8Guard

    raw = {3: b"\xe2", 4: b"\x82", 5: b"\xac", 6: b"\xf8", 7: b"\xed\xb0", 8: b"\xe2\x82"}
    odd = np.zeros(10, dtype=bool)
    odd[list(raw)] = True
    eog = np.zeros(10, dtype=bool)
    eog[9] = True
    guard = Utf8Guard(SimpleNamespace(odd=odd, eog=eog, raw=raw))  # type: ignore[arg-type]
    seen = set()
    for pending in (b"", b"\xe2", b"\xe2\x82"):
        guard.pending = pending
        row = guard.ok(np.arange(10))
        assert [guard.ok_one(t) for t in range(10)] == row.tolist()
        seen.add(tuple(row.tolist()))
    assert len(seen) == 2 and guard.ok_one(4) and not guard.ok_one(0)  # (the states differ: not vacuous)


@pytest.mark.parametrize("cut, ok", [(b"\xed\xb0", False), (b"\xe0\x80", False), (b"\xf0\x80", False), (b"\xf4\x90", False),
                                     (b"\xf0\x9f\x98", True), (b"\xed\x9f", True), (b"\xe0\xa0", True), (b"\xf4\x8f", True)])
def test_the_utf8_guard_refuses_a_cut_character_no_byte_can_finish(cut: bytes, ok: bool) -> None:
    """A surrogate's, an overlong form's or a too-high lead pair is no UTF-8 prefix: allowing it left
    the row no valid next token (Python's incremental decoder only judges it once complete)."""
    from types import SimpleNamespace

    from ggufrun.llama.utf8_guard import Utf8Guard

    odd = np.array([False, True])
    guard = Utf8Guard(SimpleNamespace(odd=odd, eog=np.zeros(2, dtype=bool), raw={1: cut}))  # type: ignore[arg-type]
    assert guard.ok_one(1) is ok and bool(guard.ok(np.array([1]))[0]) is ok
    guard.pending = b"a"[:0]
    guard.accept(1)
    assert guard.pending == (cut if ok else b"")
