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

SETTINGS = Settings(n_ctx=128, threads=1, batch_size=64, ubatch_size=64)
EXACT = {"temperature": 0.0}


def make_engine(path: Path, *, parallel: int = 4, max_queue: int = 16, cells: int = 0, n_ctx_seq: int = 128) -> Engine:
    def load() -> Backend:
        model = Model.load(path, SETTINGS, n_seq_max=parallel, kv_cells=cells or n_ctx_seq * parallel)
        return Backend(model=model, settings=SETTINGS, template=select_template(model.chat_template, "chatml", "auto"),
                       n_ctx_seq=n_ctx_seq)

    engine = Engine("tiny", load, parallel=parallel, max_queue=max_queue, metrics=Metrics()).start()
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
        for job in jobs:
            e.submit(job)
        ends = await asyncio.gather(*(_collect(j) for j in jobs))
        assert all(end.kind == "error" and end.error is not None and end.error.http_status == 500 for _, _, end in ends)
        with pytest.raises(Exception) as err:
            e.submit(Job(request(e, **EXACT), loop))
        assert "failed" in str(err.value)

    asyncio.run(main())
    e.join(10)
    assert e.state == "crashed"
