"""Speculative decoding (issue 24): the verification rule is exact (seeded identity, and a chi-square
test of the kept distribution), the drafters and the pace, and end to end on SmolLM2 in chat's
stream and the server's engine: greedy and seeded replies identical token for token with and without
a draft, a draft of another vocabulary refused in one line."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ggufrun import speculative as S
from ggufrun.errors import ConfigError
from ggufrun.generation import GenStats, SamplingParams, SeqSampler, sample_rows

# Flash attention off and contexts under 256 cells: llama.cpp's CPU decode then gives a position
# the same logits whether it is decoded alone or with a draft (its flash-attention kernel, and the
# attention's padding past 256 cells, change the sums with the batch's shape).
SMALL = dict(n_ctx=256, threads=1, flash_attn="off")


class _Gen:
    """What verify needs of a Generation: its sampler, and accept feeding it."""

    def __init__(self, params: SamplingParams) -> None:
        self.sampler = SeqSampler(params)
        self.stats = GenStats()
        self.taken: list[int] = []

    def accept(self, tok: int, info: Any) -> bool:
        self.sampler.accept(tok)
        self.taken.append(tok)
        return False


def _rows(rng: np.random.Generator, n: int, vocab: int = 8) -> np.ndarray:
    return rng.normal(0, 1.5, size=(n, vocab)).astype(np.float32)


def test_verify_takes_what_plain_sampling_would_with_the_same_seed() -> None:
    """One draw per generated token: with drafts right, wrong or mixed, the tokens kept are the ones
    the request's seeded sampler picks row by row without speculation."""
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=42, repeat_penalty=1.3)
    for trial in range(50):
        rows = _rows(rng, 5)
        plain = _Gen(params)
        expect = []
        for i in range(5):
            (tok,), _ = sample_rows(rows[i : i + 1].copy(), [plain.sampler])
            plain.sampler.accept(tok)
            expect.append(tok)
        draft = [t if rng.random() < 0.7 else (t + 1) % 8 for t in expect[:4]]
        spec = _Gen(params)
        out = S.verify(rows.copy(), draft, spec, spec.accept)
        assert out == expect[: len(out)]
        k = next((i for i, (a, b) in enumerate(zip(draft, expect)) if a != b), 4)
        assert len(out) == k + 1  # the agreeing prefix, then the target's own token


def test_kept_distribution_is_the_targets() -> None:
    """Chi-square over 4,000 seeds: the first token kept after a draft token ``x`` follows the
    target's distribution (accept x with p(x), else the residual), not the draft's."""
    logits = np.array([[2.0, 1.0, 0.5, 0.0, -1.0]], dtype=np.float32)
    p = np.exp(logits[0] - logits[0].max())
    p /= p.sum()
    counts = np.zeros(5)
    n = 4000
    for seed in range(n):
        gen = _Gen(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed))
        out = S.verify(np.repeat(logits, 2, axis=0), [3], gen, gen.accept)  # the draft says token 3 (p ~ 0.07)
        counts[out[0]] += 1
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 18.47  # 4 degrees of freedom, p = 0.001


def test_ngram_drafter_continues_an_earlier_occurrence() -> None:
    d = S.NgramDrafter()
    text = [1, 2, 3, 4, 5, 6, 7, 9, 9, 2, 3, 4]
    assert d.draft([(0, text, 3)]) == [[5, 6, 7]]
    assert d.draft([(0, text + [5, 6], 2)]) == [[7, 9]]  # the index grows with the text
    assert d.draft([(0, [8, 8, 1], 4)]) == [[]]  # a new text: rebuilt, nothing to continue
    assert d.draft([(1, text, 0)]) == [[]]


def test_draft_confidence_cut_agrees_with_the_full_softmax() -> None:
    """p_min's check sums the softmax over the logits near the top only: the verdicts are the full
    float64 softmax's on rows from flat to peaked (a guess cut only where its probability is under p_min)."""
    rng = np.random.default_rng(1)
    for scale in (0.5, 2.0, 5.0, 10.0):
        rows = rng.normal(0, scale, size=(64, 4000)).astype(np.float32)
        wide = rows.astype(np.float64)
        p = 1.0 / np.exp(wide - wide.max(axis=1, keepdims=True)).sum(axis=1)
        for p_min in (0.3, 0.75):
            assert S._greedy(rows, p_min) == [int(r.argmax()) if q >= p_min else -1 for r, q in zip(rows, p)]


def test_pace_backs_off_exponentially_and_recovers() -> None:
    spec = S.Speculator(S.NgramDrafter(), n_max=8)
    spec.begin(0)
    pace = spec.paces[0]
    assert pace.want() == 4  # a first draft is short
    pace.record(4, 4)
    assert pace.want() == 8  # and doubles while whole drafts are accepted
    waits = []
    for _ in range(10):
        spec.record(0, 4, 0)
        waits.append(pace.wait)
        while pace.want() == 0:
            pass
    assert waits == [1, 2, 4, 8, 16, 32, 64, 128, 256, 256]
    spec.begin(1)  # a new reply starts where the failures left off: no relearning per reply
    assert spec.want(1) == 0 and spec.paces[1].wait == 255
    spec.record(0, 2, 2)
    assert pace.misses == 0 and pace.want() >= 1
    spec.begin(1)  # a draft that paid: the next reply drafts at once
    assert spec.want(1) == 4
    spec.begin(0, n_max=0)  # a request's speculative.n_max 0: no drafts
    assert spec.drafts([(0, [1, 2, 3, 1, 2], 8)]) == [[]]


@pytest.fixture(scope="module")
def smol_pair(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """SmolLM2-135M Q4_1 as target and the same weights requantised to Q4_0 as draft (asked for only
    where a draft model is used: the n-gram drafter needs none, and requantising costs seconds)."""
    from ggufrun.quantize import quantize_file

    draft = tmp_path_factory.mktemp("draft") / "smol-q4_0.gguf"
    return smollm2_gguf, quantize_file(smollm2_gguf, draft, "q4_0")


PROMPT = ("<|im_start|>user\nCopy this list: apples, pears, plums, apples, pears, plums, apples, pears.<|im_end|>\n"
          "<|im_start|>assistant\n")


def _reply(model: Any, params: SamplingParams, n: int = 24) -> list[int]:
    prompt = model.tokenize(PROMPT)
    gen = model.start(prompt, params, max_tokens=n)
    out = [t for t, _ in model.stream(gen, prompt) if t >= 0]
    model.reset()
    return out


@pytest.mark.parametrize("how", ["ngram", pytest.param("draft", marks=pytest.mark.slow)])
def test_stream_is_identical_with_speculation(smollm2_gguf: Path, request: pytest.FixtureRequest, how: str) -> None:
    """Chat's path (Model.stream): greedy and seeded-sampled replies token for token the same."""
    from ggufrun.runtime import Model
    from ggufrun.settings import Settings

    settings = Settings(**SMALL)  # type: ignore[arg-type]
    with Model.load(smollm2_gguf, settings) as target:
        greedy = SamplingParams(temperature=0.0)
        sampled = SamplingParams(temperature=0.8, seed=3, repeat_penalty=1.1)
        base = [_reply(target, greedy), _reply(target, sampled)]
        if how == "ngram":
            drafter: Any = S.NgramDrafter()
        else:
            _, draft_path = request.getfixturevalue("smol_pair")
            drafter = S.ModelDrafter(Model.load(draft_path, settings), "q4_0")
        target.speculator = S.Speculator(drafter, n_max=6)
        assert [_reply(target, greedy), _reply(target, sampled)] == base
        stats = target.speculator.stats
        assert stats.drafted > 0 and stats.accepted > 0


def test_draft_of_another_vocabulary_is_refused(smollm2_gguf: Path, tiny_model: Path) -> None:
    from ggufrun.runtime import Model
    from ggufrun.settings import Settings

    settings = Settings(**SMALL)  # type: ignore[arg-type]
    with Model.load(smollm2_gguf, settings) as target, Model.load(tiny_model, Settings(n_ctx=64, threads=1)) as other:
        with pytest.raises(ConfigError, match="does not share the vocabulary of 'smol'"):
            S.check_vocab(target, other, "smol", "tiny")
        S.check_vocab(target, target, "smol", "smol")  # the same file passes


@pytest.mark.slow
def test_engine_speculates_per_sequence_inside_the_batch(smol_pair: tuple[Path, Path]) -> None:
    """The serving engine: three requests at once (greedy, seeded, greedy with the request's own
    speculative.n_max 0) give the replies they give without speculation, while drafts are checked
    in the same decodes as the other sequences' tokens."""
    from ggufrun.runtime import Model
    from ggufrun.server.engine import Backend, Engine, GenRequest, Job
    from ggufrun.server.metrics import Metrics
    from ggufrun.settings import Settings
    from ggufrun.templates import select_template

    target_path, draft_path = smol_pair
    settings = Settings(**SMALL)  # type: ignore[arg-type]

    def serve(spec: bool) -> tuple[list[str], Any]:
        def load() -> Backend:
            model = Model.load(target_path, settings, n_seq_max=3, kv_cells=3 * 256)
            if spec:
                model.speculator = S.Speculator(S.ModelDrafter(Model.load(draft_path, settings, n_seq_max=3, kv_cells=3 * 256), "q4_0"), n_max=6)
            return Backend(model=model, settings=settings, template=select_template(model.chat_template, "chatml", "auto"), n_ctx_seq=256)

        engine = Engine("smol", load, parallel=3, max_queue=4, metrics=Metrics()).start()
        backend = engine.loaded.result(timeout=120)
        prompt = backend.model.tokenize(PROMPT)
        reqs = [GenRequest(prompt=prompt, max_tokens=20, sampling={"temperature": 0.0}),
                GenRequest(prompt=prompt, max_tokens=20, sampling={"temperature": 0.7, "seed": 11}),
                GenRequest(prompt=prompt, max_tokens=20, sampling={"temperature": 0.0}, draft=(0, None))]

        async def main() -> list[str]:
            loop = asyncio.get_running_loop()
            jobs = [Job(r, loop) for r in reqs]
            engine.submit_all(jobs)
            texts = []
            for job in jobs:
                parts = []
                while (ev := await asyncio.wait_for(job.events.get(), 120)).kind == "text":
                    parts.append(ev.text)
                assert ev.kind == "done" and ev.completion_tokens == 20, ev
                texts.append("".join(parts))
            return texts

        try:
            out = asyncio.run(main())
            stats = backend.model.speculator.stats if spec else None
        finally:
            engine.stop()
            engine.join(10)
        return out, stats

    plain, _ = serve(False)
    spec, stats = serve(True)
    assert spec == plain
    assert stats.drafted > 0 and stats.accepted > 0


@pytest.mark.slow
def test_synthetic_inert_pairs_control_the_acceptance(tmp_path: Path) -> None:
    """`ggufrun synth --inert`: a 1-layer draft of a 3-layer target's shape and seed agrees with it
    on every token; --perturb 1 makes a draft that is (nearly) never right. Replies stay the target's."""
    from ggufrun.runtime import Model
    from ggufrun.settings import Settings
    from ggufrun.synthetic import write_synthetic

    shape = "qwen2:layers=3,dim=256,heads=4,kv_heads=2,ff=512,vocab=2000,tied=0"
    target_path = write_synthetic(tmp_path / "t.gguf", shape, inert=True)
    with pytest.raises(ConfigError, match="quantized type"):  # float matrices are not drawn as shared blocks
        write_synthetic(tmp_path / "f16.gguf", shape, inert=True, quant="f16")
    settings = Settings(**SMALL)  # type: ignore[arg-type]
    rates = []
    with Model.load(target_path, settings) as target:
        prompt = target.tokenize("one two three")
        greedy = SamplingParams(temperature=0.0)

        def reply() -> list[int]:
            gen = target.start(prompt, greedy, max_tokens=40, ignore_eos=True)
            out = [t for t, _ in target.stream(gen, prompt) if t >= 0]
            target.reset()
            return out

        base = reply()
        for perturb in (0.0, 1.0):
            draft = write_synthetic(tmp_path / f"d{perturb}.gguf", shape, inert=True, layers=1, perturb=perturb)
            target.speculator = S.Speculator(S.ModelDrafter(Model.load(draft, settings), "d", p_min=0.0), n_max=4)
            assert reply() == base
            rates.append(target.speculator.stats.acceptance)
            target.speculator.close()
            target.speculator = None
    assert rates[0] == 1.0 and rates[1] < 0.1
    with pytest.raises(ConfigError, match="needs its own output matrix"):
        write_synthetic(tmp_path / "x.gguf", "tiny", inert=True)


def test_request_draft_bounds_are_checked() -> None:
    """llama-server's speculative.n_max / n_min on the OpenAI routes: honoured as given, refused (400) when out of range."""
    from ggufrun.server.protocol import ApiError, parse_gen

    assert parse_gen({"prompt": "x", "speculative.n_max": 4, "speculative.n_min": 2}, chat=False).draft == (4, 2)
    for bad in ({"speculative.n_max": 65}, {"speculative.n_max": "4"}, {"speculative.n_max": 2, "speculative.n_min": 3}):
        with pytest.raises(ApiError):
            parse_gen({"prompt": "x", **bad}, chat=False)


def test_draft_tuning_without_a_drafter_is_refused_in_one_line(tiny_model: Path, tmp_path: Path, ggufrun_home: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """--draft-max/--draft-min/--draft-p-min (and models.toml or serve-config draft_*) with nothing
    drafting would change nothing: `serve` refuses them in one line before a model loads, naming
    the missing flag; --draft-p-min beside --spec ngram too (a lookup has no probabilities). Refusals,
    so through the real entry point in this process (cliutil.run_here): a process each added only its start."""
    import subprocess

    from cliutil import run_here

    from ggufrun.settings import Settings

    def serve(*argv: str) -> subprocess.CompletedProcess[str]:
        return run_here(capsys, "serve", *argv, "--port", "1", text=True)

    config = tmp_path / "serve.toml"
    config.write_text(f'[[models]]\nmodel = "{tiny_model}"\ndraft_min = 2\n', encoding="utf-8")
    for argv, said in (((str(tiny_model), "--draft-max", "4"), "--draft-max tune(s) speculative decoding: give --spec ngram or --draft-model too."),
                       ((str(tiny_model), "--spec", "ngram", "--draft-p-min", "0.5"), "--draft-p-min bounds a draft model's confidence"),
                       (("--config", str(config)), f"draft_min in {config} [[models]] #1 tune(s) speculative decoding: add spec = \"ngram\"")):
        out = serve(*argv)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and said in out.stderr, out.stderr
    # the layers: a models.toml entry's tuning needs a drafter; a later layer's explicit off overrides it knowingly
    entry = ("models.toml entry 'm'", {"draft_max": 8})
    with pytest.raises(ConfigError, match="draft_max in models.toml entry 'm' tune"):
        S.check_tuning(Settings(), [entry, ("command line", {})])
    S.check_tuning(Settings(spec="ngram"), [entry, ("command line", {"spec": "ngram"})])
    S.check_tuning(Settings(), [(entry[0], {**entry[1], "spec": "ngram"}), ("command line", {"spec": "off"})])
    S.check_tuning(Settings(draft_model="d"), [("command line", {"draft_model": "d", "draft_p_min": 0.5})])
    with pytest.raises(ConfigError, match="--draft-min tune"):  # the command line's own off is no excuse for its own tuning
        S.check_tuning(Settings(), [("command line", {"spec": "off", "draft_min": 1})])


def test_drafters_read_the_text_in_place_and_only_what_is_new() -> None:
    """Text views a sequence's cached tokens and its last one without a copy; the n-gram index
    and the draft model's shared prefix grow from what is new (a text that did not grow is
    re-read whole, so a caller's mistake costs speed, never a wrong index)."""
    hist = [1, 2, 3, 4, 5]
    t = S.Text(hist, 9)
    assert len(t) == 6 and list(t) == [1, 2, 3, 4, 5, 9] and t[-1] == 9 and t[5] == 9 and t[0] == 1
    assert t[3:] == [4, 5, 9] and t[-3:] == [4, 5, 9] and t[1:3] == [2, 3] and t[6:] == [] and t[::2] == [1, 3, 5]
    with pytest.raises(IndexError):
        t[6]
    d = S.NgramDrafter()
    text = [1, 2, 3, 4, 5, 6, 7, 9, 9, 2, 3]
    assert d.draft([(0, S.Text(text, 4), 3)]) == [[5, 6, 7]]
    text += [4, 5, 6]  # the last and two accepted tokens join the cache
    assert d.draft([(0, S.Text(text, 7), 2)]) == [[9, 9]]
    assert len(d._seqs[0][0]) == len(text) + 1  # extended, not rebuilt
    assert d.draft([(0, [1, 2, 3, 4, 8, 8, 2, 3, 4, 5, 6, 7, 8, 9, 9], 2)]) == [[]]  # another text of the same seq: rebuilt


def test_guard_backs_off_drafting_that_is_slower_by_the_clock() -> None:
    """The time guard on a clock the test drives: drafted steps (and the steps after them) slower
    per token than plain ones pause drafting for 16, 32 ... steps; faster ones keep it going."""
    now = [0.0]
    guard = S.Guard(clock=lambda: now[0])

    def run(steps: int, draft_s: float, draft_tokens: int) -> int:
        """Drive ``steps`` decode steps of one sequence; returns how many drafted."""
        drafted = 0
        for _ in range(steps):
            if guard.tick(1):
                guard.drafted()
                drafted += 1
                now[0] += draft_s
                guard.accepted(draft_tokens - 1)
            else:
                now[0] += 0.010  # a plain step: 10 ms a token
        return drafted

    assert run(S.GUARD_PLAIN, 1.0, 1) == 0  # plain steps first (the first untimed): the baseline
    assert run(2000, 0.030, 2) < 20  # 15 ms a token: backed off, exponentially
    assert guard.slow >= 5 and guard.paid == 0
    guard.wait = guard.slow = 0
    assert run(400, 0.020, 4) > 300  # 5 ms a token: it pays, drafting goes on (but for fresh baselines)
    assert guard.slow == 0 and guard.paid > 50


def test_guard_charges_a_try_its_catch_up_and_stops_a_draft_slower_than_a_step() -> None:
    """A catch-up decode is a one-off: it does not fail a drafting that pays, but a try that does
    not pay is charged it, and waits as long as makes such tries GUARD_SHARE of the time. A draft
    decode that takes as long as a plain step is a verdict at once, before any step is timed."""
    now = [0.0]
    guard = S.Guard(clock=lambda: now[0])
    for _ in range(S.GUARD_PLAIN):  # plain steps of 10 ms (the first untimed)
        assert not guard.tick(1)
        now[0] += 0.010
    assert guard.tick(1)
    guard.drafted(catchup_s=0.5)  # a 0.5 s catch-up, then drafting at 5 ms a token: it pays
    guard.accepted(3)
    now[0] += 0.5 + 0.020
    for _ in range(S.GUARD_EPISODE - 1):
        assert guard.tick(1)
        guard.drafted()
        guard.accepted(3)
        now[0] += 0.020
    guard.tick(1)
    # paid: 16 tokens in 80 ms, not 160: the 80 ms saved go to paying back the catch-up
    assert guard.paid == 1 and guard.slow == 0 and guard.debt == pytest.approx(0.5 - 0.08)
    guard.drafted(catchup_s=0.5)  # the same catch-up before drafting at 15 ms a token: charged to the try
    guard.accepted(1)
    now[0] += 0.5 + 0.030
    for _ in range(S.GUARD_AFTER + 1):
        guard.tick(1)
        now[0] += 0.010
    assert guard.slow == 1 and guard.paid == 1 and guard.debt == 0
    # lost: both catch-ups less what was paid back, and 10 ms more than 10 tokens at 10 ms; such tries GUARD_SHARE of the time
    lost = 0.42 + 0.5 + 0.010
    assert guard.wait == pytest.approx(min(lost / (S.GUARD_SHARE * 0.010), S.GUARD_LONGEST), abs=2)
    guard.wait = 0
    while not guard.tick(1):
        now[0] += 0.010
    guard.drafted(decode_s=0.012)  # a draft decode slower than a 10 ms step: no acceptance pays that
    assert guard.slow == 2 and guard.wait >= S.GUARD_FIRST * 2
    assert not guard.tick(1)


def test_guard_judges_a_stretch_cut_short_by_a_new_width_or_a_new_reply() -> None:
    """A drafting stretch that a request joining (the width changes) or a new reply (restart) cuts
    short is judged as it stands, not dropped: a server whose batch changes every few steps would
    otherwise never judge its drafting at all."""
    now = [0.0]

    def plain(guard: S.Guard) -> None:  # GUARD_PLAIN plain steps of 10 ms a token at width 1
        for _ in range(S.GUARD_PLAIN):
            assert not guard.tick(1)
            now[0] += 0.010
        assert guard.tick(1)

    joined = S.Guard(clock=lambda: now[0])
    plain(joined)
    joined.drafted()  # 4 tokens in 20 ms: it pays
    now[0] += 0.020
    joined.accepted(3)
    assert joined.tick(1)
    joined.drafted()
    now[0] += 0.020
    joined.accepted(3)
    joined.tick(2)  # a request joined: the stretch so far (one timed step) is judged at width 1
    assert (joined.episodes, joined.paid, joined.slow) == (1, 1, 0)

    ended = S.Guard(clock=lambda: now[0])
    plain(ended)
    ended.drafted()  # 1 token in 30 ms, timed to its verification: it did not pay
    now[0] += 0.030
    ended.accepted(0)
    ended.restart()
    assert (ended.episodes, ended.paid, ended.slow) == (1, 0, 1)
    # lost 20 ms against 10 ms plain steps: paused until such tries are GUARD_SHARE of the time
    assert ended.wait == int(max(S.GUARD_FIRST, 0.020 / (S.GUARD_SHARE * 0.010)))
    assert not ended.tick(1)


def test_draft_model_catches_up_on_a_long_backlog_through_a_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a long pause the draft model is fed the text's first SINK tokens and its last
    CATCHUP_WINDOW, not the whole backlog; it drafts on from there (an inert pair: the same
    guesses), and a text that goes on from the window is fed only what is new."""
    from ggufrun.runtime import Model
    from ggufrun.settings import Settings
    from ggufrun.synthetic import write_synthetic

    monkeypatch.setattr(S, "CATCHUP_WINDOW", 16)
    shape = "qwen2:layers=1,dim=64,heads=2,kv_heads=1,ff=128,vocab=300,tied=0"
    path = write_synthetic(tmp_path / "d.gguf", shape, inert=True)
    with Model.load(path, Settings(**SMALL)) as m:  # type: ignore[arg-type]
        d = S.ModelDrafter(m, "d", p_min=0.0)
        text = [int(t) for t in np.random.default_rng(0).integers(1, 300, 120)]
        (guess,) = d.draft([(0, text, 3)])
        assert m.seq_len(0) == S.SINK + 16 + 2  # the start, the window, two drafted tokens
        assert m.history(0)[: S.SINK + 16] == text[: S.SINK] + text[-16:]
        fed = []
        real = m.decode
        monkeypatch.setattr(m, "decode", lambda items, **kw: fed.append(sum(len(t) for _, t, _ in items)) or real(items, **kw))
        (again,) = d.draft([(0, text + guess[:2], 3)])  # two of its guesses taken, the third not
        assert fed[0] == 1  # the last token alone: the guesses it made were already in its cache
        assert again[0] == guess[2] and len(again) == 3  # an inert draft: its next guess follows from the last token alone
        d.forget(0)  # a new reply: a windowed cache is not the new text's
        assert m.seq_len(0) == 0
        rng = np.random.default_rng(2)
        text = []
        for _ in range(60):  # texts that grow by a little (its guesses mostly wrong) or a lot, or start afresh
            roll = rng.random()
            if roll < 0.1 or len(text) > 180:
                d.forget(0)
                text = []
            text += [int(t) for t in rng.integers(1, 300, int(rng.integers(1, 3) if roll < 0.7 else rng.integers(10, 60)))]
            calls = len(fed)
            d.draft([(0, list(text), 3)])
            assert fed[calls] <= S.SINK + 16  # the catch-up: never more than the start and the window
            head, skip = d._gap.get(0, (0, 0))
            cells = d._fed[0]
            assert m.history(0)[:cells] == [text[i if i < head else i + skip] for i in range(cells)]
            assert cells + skip == len(text)  # every token in, by the gap's map


def test_a_draft_cache_that_cannot_drop_a_tail_still_catches_up_through_the_window(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A recurrent or sliding-window draft cache clears where a tail should go (every missed guess):
    the draft is planned again from nothing, so it reads the start and the window, not the whole text,
    and its cache still holds the text by the gap's map."""
    from ggufrun.runtime import Model
    from ggufrun.settings import Settings
    from ggufrun.synthetic import write_synthetic

    monkeypatch.setattr(S, "CATCHUP_WINDOW", 16)
    shape = "qwen2:layers=1,dim=64,heads=2,kv_heads=1,ff=128,vocab=300,tied=0"
    path = write_synthetic(tmp_path / "d.gguf", shape, inert=True)
    with Model.load(path, Settings(**SMALL)) as m:  # type: ignore[arg-type]
        cleared = []

        def clearing(seq_id: int, keep: int) -> int:  # what Model.truncate does where a tail cannot go
            if keep < m.seq_len(seq_id):
                cleared.append(m.seq_len(seq_id))
                m.reset(seq_id)
            return m.seq_len(seq_id)

        monkeypatch.setattr(m, "truncate", clearing)
        fed: list[int] = []
        real = m.decode
        monkeypatch.setattr(m, "decode", lambda items, **kw: fed.append(sum(len(t) for _, t, _ in items)) or real(items, **kw))
        d = S.ModelDrafter(m, "d", p_min=0.0)
        rng = np.random.default_rng(3)
        text: list[int] = []
        for _ in range(100):  # texts that grow by a step's tokens (past the window without a long backlog), now and then by more
            text += [int(t) for t in rng.integers(1, 300, int(rng.integers(1, 3) if rng.random() < 0.95 else rng.integers(10, 40)))]
            if len(text) > 180:
                d.forget(0)
                text = text[-5:]
            calls = len(fed)
            (guess,) = d.draft([(0, list(text), 3)])
            assert fed[calls] <= S.SINK + 16  # the catch-up: the start and the window at most
            head, skip = d._gap.get(0, (0, 0))
            cells = d._fed[0]
            assert m.history(0)[:cells] == [text[i if i < head else i + skip] for i in range(cells)]
            assert cells + skip == len(text)
            text += guess[: int(rng.integers(0, 3))]  # some of its guesses taken, the rest missed
        assert len(cleared) > 10 and max(cleared) > S.SINK + 16  # the clearing path was taken, on long caches too


def test_stream_backs_off_a_draft_that_is_right_but_too_slow(tmp_path: Path) -> None:
    """A draft that agrees on every token but costs ~10 target decodes a token (24 inert layers
    against the target's 1): chat's stream stops drafting by the clock, and the reply is the same."""
    from ggufrun.runtime import Model
    from ggufrun.settings import Settings
    from ggufrun.synthetic import write_synthetic

    shape = "qwen2:layers=1,dim=256,heads=4,kv_heads=2,ff=512,vocab=2000,tied=0"
    target_path = write_synthetic(tmp_path / "t.gguf", shape, inert=True)
    draft_path = write_synthetic(tmp_path / "d.gguf", shape, inert=True, layers=24)
    settings = Settings(**SMALL)  # type: ignore[arg-type]
    with Model.load(target_path, settings) as target:
        prompt = target.tokenize("one two three")

        def reply() -> list[int]:
            gen = target.start(prompt, SamplingParams(temperature=0.0), max_tokens=200, ignore_eos=True)
            out = [t for t, _ in target.stream(gen, prompt) if t >= 0]
            target.reset()
            return out

        base = reply()
        spec = target.speculator = S.Speculator(S.ModelDrafter(Model.load(draft_path, settings), "d", p_min=0.0), n_max=4)
        assert reply() == base
        assert spec.stats.acceptance == 1.0  # right every time, and still not worth it
        assert spec.guard.slow >= 1 and spec.guard.paid == 0
        # A draft decode as slow as a target step is a verdict at once, and the pause after it is
        # as long as that try's cost asks: one try in ~200 steps, not one per 16, 32 ...
        assert spec.stats.drafts <= 2


def test_a_draft_minimum_above_the_maximum_is_bounded_and_short_asks_cost_no_drafting() -> None:
    """A request's speculative.n_min above the n_max it drafts with is bounded by it (llama-server's
    rule): before, every draft was dropped after it was made, and the request silently got none.
    An ask shorter than the minimum never reaches the drafter (a model draft costs decodes)."""
    calls: list[list[int]] = []
    lookup = S.NgramDrafter()

    class Counting:
        label, costly, catchup_s, decode_s = "counting", True, 0.0, None

        def draft(self, items: Any) -> list[list[int]]:
            calls.append([n for _, _, n in items])
            return lookup.draft(items)

        def forget(self, seq_id: int) -> None:
            lookup.forget(seq_id)

        def close(self) -> None:
            pass

    spec = S.Speculator(Counting(), n_max=4)
    spec.guard.tick = lambda n: True  # type: ignore[method-assign]  # the clock is another test's
    text = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4]
    spec.begin(0, n_min=32)
    spec.step(1)
    assert spec.paces[0].n_min == 4
    assert spec.make([(0, text, 4)]) == [[5, 6, 7, 8]]
    spec.begin(1, n_min=3)
    spec.step(1)
    assert spec.make([(1, text, 2)]) == [[]] and calls == [[4]]  # the 2-token ask went nowhere
