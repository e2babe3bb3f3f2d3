"""The server's engine in-process on the tiny synthetic model: the generation contract (grammar,
logprobs, timings), seeded determinism alone and in a batch, admission with KV reservation,
cancellation and an engine that dies."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ggufrun.errors import GrammarError
from ggufrun.runtime import Model
from ggufrun.server.engine import Backend, Engine, Event, GenRequest, Job, QueueFullError
from ggufrun.server.metrics import Metrics
from ggufrun.settings import Settings
from ggufrun.templates import select_template

# Flash attention off: llama.cpp's CPU flash-attention kernel gives a sequence different logits
# alone than beside others (see test_logits_are_batch_invariant_without_flash_attention).
SETTINGS = Settings(n_ctx=128, threads=1, batch_size=64, ubatch_size=64, flash_attn="off")
EXACT = {"temperature": 0.0}


def make_engine(path: Path, *, parallel: int = 4, max_queue: int = 16, cells: int = 0, n_ctx_seq: int = 128,
                embeddings: bool = False) -> Engine:
    """An engine as the server makes one (with ``embeddings``: one more sequence for them, in the same cells)."""
    from ggufrun.server.models import _load_embedder

    def load() -> Backend:
        model = Model.load(path, SETTINGS, n_seq_max=parallel + embeddings, kv_cells=cells or n_ctx_seq * (parallel + embeddings))
        return Backend(model=model, settings=SETTINGS, template=select_template(model.chat_template, "chatml", "auto"),
                       n_ctx_seq=n_ctx_seq, embed_seq=parallel if embeddings else None)

    engine = Engine("tiny", load, parallel=parallel, max_queue=max_queue, metrics=Metrics(),
                    load_embedder=_load_embedder if embeddings else None).start()
    engine.loaded.result(timeout=60)
    return engine


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[Engine]:
    e = make_engine(tiny_model)
    yield e
    e.stop()
    e.join(10)


def request(engine: Engine, text: str = "The river flows", *, max_tokens: int = 8, ignore_eos: bool = True, stop: list[str] | None = None,
            **sampling: Any) -> GenRequest:
    assert engine.backend is not None
    return GenRequest(prompt=engine.backend.model.tokenize(text), max_tokens=max_tokens, sampling=sampling, stop=stop or [],
                      ignore_eos=ignore_eos)


async def _collect(job: Job) -> tuple[str, list[Event], Event]:
    texts, events = [], []
    while True:
        event = await asyncio.wait_for(job.events.get(), 60)
        if event.kind == "text":
            texts.append(event.text)
            events.append(event)
        else:
            return "".join(texts), events, event


def run(engine: Engine, *requests: GenRequest) -> list[tuple[str, list[Event], Event]]:
    async def main() -> list[tuple[str, list[Event], Event]]:
        loop = asyncio.get_running_loop()
        jobs = [Job(r, loop) for r in requests]
        for job in jobs:
            engine.submit(job)
        return list(await asyncio.gather(*(_collect(j) for j in jobs)))

    return asyncio.run(main())


def test_grammar_constrains_the_reply_and_logprobs_come_with_the_text(engine: Engine) -> None:
    grammar = 'root ::= ("yes" | "no") " " [0-9] [0-9]'
    for seed in range(4):
        text, events, done = run(engine, request(engine, max_tokens=20, ignore_eos=False, temperature=1.0, seed=seed,
                                                 grammar=grammar, logprobs=3))[0]
        assert done.kind == "done" and done.finish_reason == "stop", done
        assert text.split(" ")[0] in ("yes", "no") and len(text) in (6, 5) and text[-2:].isdigit(), text
        infos = [t for e in events for t in e.tokens]
        assert "".join(t.text for t in infos) == text
        for t in infos:
            assert t.logprob is not None and t.logprob <= 0.0 and len(t.top) == 3
            assert [v for _, v in t.top] == sorted((v for _, v in t.top), reverse=True)
    # Greedy: the sampled token is the most likely one, so its logprob is the top alternative's.
    _, events, done = run(engine, request(engine, logprobs=2, **EXACT))[0]
    infos = [t for e in events for t in e.tokens]
    assert len(infos) == done.completion_tokens == 8
    for t in infos:
        assert t.top[0][0] == t.text and math.isclose(t.top[0][1], t.logprob or 0.0, abs_tol=1e-6)
    assert done.timings["predicted_n"] == 8 and done.timings["prompt_n"] + done.cached_tokens == done.prompt_tokens


def test_a_grammar_llama_cpp_rejects_is_a_400_at_submit(engine: Engine) -> None:
    async def main() -> None:
        with pytest.raises(GrammarError) as err:
            engine.submit(Job(request(engine, grammar="root ::= (unclosed"), asyncio.get_running_loop()))
        assert err.value.http_status == 400

    asyncio.run(main())


def test_logit_bias_bans_and_forces_tokens(engine: Engine) -> None:
    assert engine.backend is not None
    free = run(engine, request(engine, **EXACT))[0][0]
    model = engine.backend.model
    first = model.tokenize(free, add_special=False)[0]
    banned = run(engine, request(engine, logit_bias={first: -math.inf}, **EXACT))[0][0]
    assert not banned.startswith(model.detokenize([first]))
    forced, _, _ = run(engine, request(engine, max_tokens=3, logit_bias={first: 100.0}, **EXACT))[0]
    assert forced == model.detokenize([first]) * 3


def test_a_seed_gives_the_same_text_alone_and_beside_others(engine: Engine) -> None:
    sampled = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    alone = [run(engine, request(engine, max_tokens=16, seed=s, **sampled))[0][0] for s in (1, 2)]
    assert alone[0] != alone[1]  # different seeds draw differently from a random model's flat distribution
    batch = run(engine, *(request(engine, f"Other prompt {i}", max_tokens=16, seed=100 + i, **sampled) for i in range(3)),
                request(engine, max_tokens=16, seed=1, **sampled), request(engine, max_tokens=16, seed=2, **sampled))
    assert [batch[3][0], batch[4][0]] == alone
    greedy_alone = run(engine, request(engine, max_tokens=16, **EXACT))[0][0]
    greedy_batch = run(engine, *(request(engine, f"x {i}", max_tokens=16, seed=i, **sampled) for i in range(3)),
                       request(engine, max_tokens=16, **EXACT))[3][0]
    assert greedy_alone == greedy_batch


def test_stop_strings_and_max_tokens_end_the_reply(engine: Engine) -> None:
    full = run(engine, request(engine, max_tokens=12, **EXACT))[0][0]
    cut = full[len(full) // 2 : len(full) // 2 + 2]
    text, _, done = run(engine, request(engine, max_tokens=12, stop=[cut], **EXACT))[0]
    assert done.finish_reason == "stop" and text == full[: full.index(cut)]
    text, _, done = run(engine, request(engine, max_tokens=5, **EXACT))[0]
    assert done.finish_reason == "length" and done.completion_tokens == 5


def test_admission_waits_for_kv_room_instead_of_cutting_replies(tiny_model: Path) -> None:
    # Two slots but KV cells for one full-length request: the second waits, and both get every token.
    e = make_engine(tiny_model, parallel=2, cells=128, n_ctx_seq=128)
    try:
        prompt_len = len(request(e).prompt)
        results = run(e, request(e, max_tokens=100, **EXACT), request(e, "Another one", max_tokens=100, **EXACT))
        for text, _, done in results:
            assert done.finish_reason == "length" and done.completion_tokens == 100, done
        assert prompt_len + 100 <= 128
    finally:
        e.stop()
        e.join(10)


def test_clients_that_leave_the_queue_stop_counting(tiny_model: Path) -> None:
    e = make_engine(tiny_model, parallel=1, max_queue=1)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        running = Job(request(e, max_tokens=100, **EXACT), loop)
        e.submit(running)
        waiting = Job(request(e, **EXACT), loop)
        e.submit(waiting)
        with pytest.raises(QueueFullError):
            e.submit(Job(request(e, **EXACT), loop))
        waiting.cancel()
        third = Job(request(e, max_tokens=3, **EXACT), loop)
        e.submit(third)  # the cancelled one no longer holds the queue's only place
        running.cancel()
        _, _, done = await _collect(third)
        assert done.finish_reason == "length" and done.completion_tokens == 3

    try:
        asyncio.run(main())
    finally:
        e.stop()
        e.join(10)


def test_an_engine_that_dies_fails_running_and_queued_requests_and_refuses_new_ones(tiny_model: Path) -> None:
    e = make_engine(tiny_model, parallel=1, max_queue=4)
    assert e.backend is not None
    model = e.backend.model
    real_decode = model.decode
    calls = 0

    def failing_decode(items: Any) -> Any:  # a fault injected into llama.cpp's side, not into the engine
        nonlocal calls
        calls += 1
        if calls > 3:
            raise RuntimeError("simulated llama.cpp failure")
        return real_decode(items)

    model.decode = failing_decode

    async def main() -> None:
        loop = asyncio.get_running_loop()
        jobs = [Job(request(e, max_tokens=50, **EXACT), loop) for _ in range(3)]
        late = request(e, **EXACT)  # tokenised now: the dead engine frees the model
        for job in jobs:
            e.submit(job)
        ends = await asyncio.gather(*(_collect(j) for j in jobs))
        assert all(end.kind == "error" and end.error is not None and end.error.http_status == 500 for _, _, end in ends)
        with pytest.raises(Exception) as err:
            e.submit(Job(late, loop))
        assert "failed" in str(err.value)

    asyncio.run(main())
    e.join(10)
    assert e.state == "crashed"


def test_a_fault_while_handing_out_one_reply_ends_only_that_reply(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault while one reply's token is handed out (detokenising, stop strings): that reply ends
    with a 500, the other finishes with every token, and the engine keeps serving."""
    from ggufrun import generation

    e = make_engine(tiny_model, parallel=2, max_queue=4)
    real_accept = generation.Generation.accept
    calls = 0

    def failing_accept(self: Any, token: int, info: Any = None) -> Any:  # a fault injected mid hand-out
        nonlocal calls
        calls += 1
        if calls == 4:
            raise RuntimeError("simulated fault in the hand-out")
        return real_accept(self, token, info)

    monkeypatch.setattr(generation.Generation, "accept", failing_accept)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        jobs = [Job(request(e, max_tokens=50, **EXACT), loop) for _ in range(2)]
        for job in jobs:
            e.submit(job)
        ends = await asyncio.wait_for(asyncio.gather(*(_collect(j) for j in jobs)), 20)
        kinds = sorted(end.kind for _, _, end in ends)
        assert kinds == ["done", "error"], kinds
        failed = next(end for _, _, end in ends if end.kind == "error")
        assert failed.error is not None and failed.error.http_status == 500 and "hand-out" in str(failed.error)
        done = next(end for _, _, end in ends if end.kind == "done")
        assert done.completion_tokens == 50 and done.finish_reason == "length"
        after = Job(request(e, max_tokens=4, **EXACT), loop)
        e.submit(after)
        assert (await asyncio.wait_for(_collect(after), 20))[2].completion_tokens == 4

    asyncio.run(main())
    assert e.state == "ready"
    e.stop()
    e.join(10)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_logits_are_batch_invariant_without_flash_attention(tiny_model_factory: Any, arch: str) -> None:
    """The README's promise: with --flash-attn off, a sequence's logits on the CPU are bit-identical
    whether it is decoded alone or in one batch with others (prompt and generation steps)."""
    import numpy as np

    settings = Settings(n_ctx=128, threads=1, batch_size=256, ubatch_size=256, flash_attn="off")
    with Model.load(tiny_model_factory(arch, "q8_0", True), settings, n_seq_max=8, kv_cells=1024) as m:
        prompt = m.tokenize("The quick brown fox jumps over the lazy dog and then")
        others = [m.tokenize(f"Some other prompt number {i} that differs") for i in range(6)]
        m.decode([(0, prompt, True)])
        alone = [m.logits_rows(1)[0].copy()]
        m.decode([(0, [int(alone[0].argmax())], True)])
        alone.append(m.logits_rows(1)[0].copy())
        m.reset()
        items = [(i + 1, o, True) for i, o in enumerate(others)] + [(0, prompt, True)]
        m.decode(items)
        batched = [m.logits_rows(len(items))[-1].copy()]
        m.decode([(i + 1, [5], True) for i in range(6)] + [(0, [int(batched[0].argmax())], True)])
        batched.append(m.logits_rows(7)[-1].copy())
    for a, b in zip(alone, batched):
        assert np.array_equal(a, b)


def test_n_choices_share_the_prompt_kv_and_reserve_their_own_room(engine: Engine) -> None:
    """n > 1 is n jobs with one prompt: the first evaluates it, the others copy its KV cells."""
    long = "A shared system prompt, long enough to be worth sharing between choices."
    reqs = [request(engine, long, max_tokens=6, **EXACT) for _ in range(3)]
    assert 40 < len(reqs[0].prompt) < 100
    results = run(engine, *reqs)
    texts = [text for text, _, _ in results]
    dones = [done for _, _, done in results]
    assert texts[0] == texts[1] == texts[2] and all(d.completion_tokens == 6 for d in dones)
    shared = sorted(d.cached_tokens for d in dones)
    assert shared[-1] >= len(reqs[0].prompt) - 1 and shared[-2] >= len(reqs[0].prompt) - 1, shared


def test_a_burst_of_requests_with_one_prompt_fills_the_batch_at_once(tiny_model: Path) -> None:
    """Four clients send the same prompt together: the first evaluates it, and the next step all
    three others enter, copying its cells (they used to wait on one another and enter one a step)."""
    e = make_engine(tiny_model, parallel=4)
    try:
        assert e.backend is not None
        model = e.backend.model
        rows: list[int] = []
        decode = model.decode

        def spy(items: Any) -> Any:  # the real decode; only the sequences of each call are noted
            rows.append(len({seq for seq, _, _ in items}))
            return decode(items)

        model.decode = spy  # type: ignore[method-assign]
        long = "A shared system prompt, long enough to be worth sharing between the clients."
        results = run(e, *(request(e, long, max_tokens=6, **EXACT) for _ in range(4)))
        assert all(done.completion_tokens == 6 for _, _, done in results)
        assert sorted(done.cached_tokens for _, _, done in results)[1] >= len(e.backend.model.tokenize(long)) - 1
        assert rows[:2] == [1, 4], rows
    finally:
        e.stop()
        e.join(10)


def test_embeddings_share_the_context_interleave_with_streams_and_stop_when_cancelled(tiny_model: Path) -> None:
    e = make_engine(tiny_model, parallel=2, max_queue=4, cells=256, embeddings=True)
    assert e.backend is not None
    model = e.backend.model
    started = 0
    tokenize = model.tokenize

    def counted(*args: Any, **kwargs: Any) -> Any:  # the real tokeniser; only the texts begun are counted
        nonlocal started
        started += 1
        return tokenize(*args, **kwargs)

    model.tokenize = counted  # type: ignore[method-assign]
    try:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            stream = Job(request(e, max_tokens=60, **EXACT), loop)
            e.submit(stream)
            texts = [f"text number {i}" for i in range(6)]
            vectors, n_tokens = await asyncio.wait_for(asyncio.wrap_future(e.embed(texts)), 60)
            assert len(vectors) == 6 and n_tokens > 6
            assert all(abs(sum(x * x for x in v) - 1.0) < 1e-3 for v in vectors)  # L2-normalised
            assert vectors[0] != vectors[1]
            _, events, done = await _collect(stream)
            assert done.finish_reason == "length" and done.completion_tokens == 60
            cancelled = e.embed(["one more"] * 200)
            assert cancelled.cancel()  # the client left: the engine drops the rest of the work
            after = await asyncio.wait_for(asyncio.wrap_future(e.embed(["after"])), 60)
            assert len(after[0]) == 1
            assert 7 <= started < 6 + 200, started  # the cancelled batch's texts were not all embedded

        asyncio.run(main())
        assert e._embedder is not None and e.backend is not None
        assert e._embedder.model is e.backend.model  # the generation context itself: no second copy of anything
        assert not e._embeds
    finally:
        e.stop()
        e.join(10)


def test_an_embedding_reserves_kv_cells_as_a_request_does(tiny_model: Path) -> None:
    """Embeddings share the requests' KV cells: a text holds its cells while it is embedded (a
    chunk a step), so a request that would not fit beside it waits for it, and every reply still
    reaches its max_tokens."""
    e = make_engine(tiny_model, parallel=2, max_queue=4, cells=256, n_ctx_seq=120, embeddings=True)
    try:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            long_text = " ".join(["river"] * 12)  # ~70 tokens (this vocabulary spells it out), as many cells
            assert e.backend is not None
            n_text = len(e.backend.model.tokenize(long_text))
            assert 31 < n_text <= 120
            embedding = asyncio.wrap_future(e.embed([long_text]))
            streams = [Job(request(e, max_tokens=100, **EXACT), loop) for _ in range(2)]  # 113 cells each
            for job in streams:
                e.submit(job)
            first = await asyncio.wait_for(streams[1].events.get(), 60)  # n_text + 113 + 113 > 256: it waits
            assert first.kind == "text" and embedding.done()
            vectors, n_tokens = embedding.result()
            assert len(vectors) == 1 and n_tokens == n_text
            for job in streams:
                _, _, done = await _collect(job)
                assert done.kind == "done" and done.finish_reason == "length"
                assert done.completion_tokens == 100

        asyncio.run(main())
    finally:
        e.stop()
        e.join(10)


def test_a_request_that_fails_in_the_engine_fails_alone(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19: a logit_bias id past the vocabulary raised inside the step and ended every stream.
    Now a job that fails at admission (that id) or in the batched sampling (the documented
    GGUFRUN_TEST_FAULT_SEED hook) ends alone with an error; its neighbours give the text they give alone."""
    from ggufrun.server import engine as engine_mod

    e = make_engine(tiny_model, parallel=4)
    try:
        assert e.backend is not None
        n_vocab = e.backend.model.n_vocab
        seeded = {"temperature": 0.9, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
        good = [request(e, f"Prompt number {i} goes", max_tokens=12, seed=100 + i, **seeded) for i in range(3)]
        alone = [run(e, r)[0][0] for r in good]
        bad_bias = request(e, "A bad bias", max_tokens=12, seed=7, logit_bias={n_vocab + 5: 1.0}, **seeded)
        results = run(e, good[0], bad_bias, good[1], good[2])
        assert results[1][2].kind == "error" and "logit_bias" in str(results[1][2].error)
        assert [r[0] for i, r in enumerate(results) if i != 1] == alone
        assert all(r[2].kind == "done" and r[2].completion_tokens == 12 for i, r in enumerate(results) if i != 1)

        monkeypatch.setattr(engine_mod, "FAULT_SEED", "4242")
        faulty = request(e, "This one breaks", max_tokens=12, seed=4242, **seeded)
        results = run(e, good[0], good[1], faulty, good[2])
        assert results[2][2].kind == "error" and results[2][2].error is not None
        assert results[2][2].error.http_status == 500 and "injected sampling fault" in str(results[2][2].error)
        assert [r[0] for i, r in enumerate(results) if i != 2] == alone
        assert e.state == "ready"
    finally:
        e.stop()
        e.join(10)


def test_a_crashed_engine_never_frees_the_model_under_a_thread_using_it(tiny_model: Path) -> None:
    """Issue 19: the engine died while a request tokenised on another thread, freed the model under
    it and the process segfaulted. A borrower keeps the model alive; it is freed when it is done,
    and a new borrower is refused (ModelClosedError, a 503) rather than handed a freed model."""
    import threading

    from ggufrun.errors import ModelClosedError

    e = make_engine(tiny_model, parallel=1)
    assert e.backend is not None
    model = e.backend.model
    text = "The river flows past the mill and on to the sea. " * 200
    expected = model.tokenize(text)
    crashed, done = threading.Event(), threading.Event()
    seen: list[Any] = []

    def tokenising_request() -> None:  # what a handler's to_thread does, borrowing the model
        with model.borrowed():
            crashed.wait(30)
            seen.append(model._closed)
            seen.extend(model.tokenize(text) == expected for _ in range(20))
        done.set()

    worker = threading.Thread(target=tokenising_request)
    worker.start()

    def failing_decode(items: Any) -> Any:
        raise RuntimeError("simulated llama.cpp failure")

    model.decode = failing_decode  # type: ignore[method-assign]

    async def main() -> None:
        job = Job(request(e, **EXACT), asyncio.get_running_loop())
        e.submit(job)
        assert (await _collect(job))[2].kind == "error"

    asyncio.run(main())
    assert e.join(10) and e.state == "crashed"
    assert not model._freed  # the engine is gone, the borrower still holds the model
    crashed.set()
    assert done.wait(30)
    worker.join()
    assert seen == [True] + [True] * 20
    assert model._freed
    with pytest.raises(ModelClosedError):
        model.tokenize("more")


def test_a_paused_reply_resumes_unchanged_and_one_cancelled_while_paused_is_freed(tiny_model: Path) -> None:
    """A request holding both slots gives one up to a request holding none (fair admission): the
    paused choice resumes with the text it gives alone; a paused choice whose client leaves is
    dropped from the queue (its sampler freed, counted as cancelled) and the engine serves on."""
    e = make_engine(tiny_model, parallel=2, max_queue=8)
    try:
        seeded = {"temperature": 0.9, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
        choices = [request(e, "Choices of one request", max_tokens=60, seed=10 + k, **seeded) for k in range(2)]
        alone = [run(e, r)[0][0] for r in choices]

        async def main(cancel_paused: bool) -> list[tuple[str, list[Event], Event]]:
            loop = asyncio.get_running_loop()
            group = [Job(r, loop) for r in choices]
            e.submit_all(group)
            while not all(j.first_token_at for j in group):
                await asyncio.sleep(0.001)
            other = Job(request(e, "Another client", max_tokens=50 if cancel_paused else 3, **EXACT), loop)
            e.submit(other)
            if cancel_paused:  # (the other request's 50 tokens keep it paused meanwhile)
                while not any(j.paused is not None for j in group):
                    await asyncio.sleep(0.001)
                paused = next(j for j in group if j.paused is not None)
                paused.cancel()
                while paused in e._queue:  # the engine drops it from the queue at its next step
                    await asyncio.sleep(0.001)
                assert paused.paused is None and not other.finished
            return list(await asyncio.gather(*(_collect(j) for j in [*group, other])))

        before = e._preempted
        results = asyncio.run(main(False))
        assert e._preempted == before + 1
        assert [r[0] for r in results[:2]] == alone and results[2][2].completion_tokens == 3
        results = asyncio.run(main(True))
        assert sorted(r[2].finish_reason for r in results[:2]) == ["cancelled", "length"]
        assert results[2][2].completion_tokens == 50
        assert run(e, choices[0])[0][0] == alone[0] and e.counts() == (0, 0)
    finally:
        e.stop()
        e.join(10)


def test_rows_of_scattered_slots_decode_in_one_run_and_idle_slots_keep_their_cache(smollm2_gguf: Path) -> None:
    """Rows of slots 0, 2 and 4 beside idle slots 1 and 3: filler tokens make them one micro-batch
    (Model._gaps), the rows' logits are those of each row decoded alone, and the idle slots' caches
    come back as they were (their next token's logits unchanged)."""
    import numpy as np

    settings = Settings(n_ctx=64, threads=1, batch_size=64, ubatch_size=64)
    with Model.load(smollm2_gguf, settings, n_seq_max=5, kv_cells=5 * 64) as a, \
            Model.load(smollm2_gguf, settings, n_seq_max=5, kv_cells=5 * 64) as b:
        prompts = {s: a.tokenize(f"Sequence number {s} says that the sky") for s in range(5)}
        for m in (a, b):
            for s, p in prompts.items():
                m.decode([(s, p, False)])
        tok = a.tokenize(" is")[-1]
        rows = [(0, [tok], True), (2, [tok], True), (4, [tok], True)]
        assert a._gaps(rows) == [1, 3]
        a.decode(rows)
        together = np.array(a.logits_rows(3))
        alone = []
        for row in rows:
            b.decode([row])
            alone.append(np.array(b.logits_rows(1))[0])
        assert [a.seq_len(s) for s in range(5)] == [b.seq_len(s) for s in range(5)] == [len(prompts[s]) + (s % 2 == 0) for s in range(5)]
        # each row's logits are its own sequence's (batch shapes round differently on other CPUs: nearest, not equal)
        apart = np.array([[np.abs(t - solo).max() for solo in alone] for t in together])
        assert list(apart.argmin(1)) == [0, 1, 2] and apart.diagonal().max() < 0.25  # here 0; other rows 1.3-3.6 away
        for s in (1, 3):  # the fillers are gone: the idle slots continue as if never touched
            a.decode([(s, [tok], True)])
            b.decode([(s, [tok], True)])
            assert np.allclose(np.array(a.logits_rows(1)), np.array(b.logits_rows(1)), atol=2e-2)
        # rows out of slot order (or after a longer item) are left as they are: outputs are read in batch order
        assert a._gaps([(4, [tok], True), (0, [tok], True)]) == [] and a._gaps([(0, [1, 2], True), (2, [tok], True)]) == []


def test_no_fillers_where_a_cell_might_not_come_out_cleanly(tiny_model_factory: Any) -> None:
    """A sliding-window cache (gemma-3) may not drop a tail: no filler goes there, nor into an
    embedding context."""
    settings = Settings(n_ctx=64, threads=1, batch_size=64, ubatch_size=64)
    rows = [(0, [5], True), (2, [5], True)]
    with Model.load(tiny_model_factory("gemma3"), settings, n_seq_max=3, kv_cells=3 * 64) as swa:
        assert swa._gaps(rows) == []
    with Model.load(tiny_model_factory("qwen2"), settings, n_seq_max=3, kv_cells=3 * 64) as plain, \
            Model.load(tiny_model_factory("qwen2"), settings, n_seq_max=3, kv_cells=3 * 64, embeddings=True) as embedder:
        assert plain._gaps(rows) == [1] and embedder._gaps(rows) == []
