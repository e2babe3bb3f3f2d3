"""Cost of sampling one decode step over a logits matrix of ROWS x VOCAB: llama.cpp's C sampler
chain run row after row (what the engine did before), ggufrun's all-numpy vectorised draw, and
what the engine now does (numpy penalties/bias, then each row's llama.cpp chain on a thread pool,
fed only the top-k candidates), and the same chain fed the whole vocabulary (what it did before).

    python bench/sampling_speed.py [--vocab 151936] [--rows 16,64] [--steps 20] [--rows-per-worker N] [--busy]
    python bench/sampling_speed.py --grammar-half [--rows 16] [--model FILE.gguf]

With ``--grammar-half``, half of the rows are also constrained by a JSON schema (bench/serve_load.py's
``--json-schema-half``), each at a different point of the document, and every draw is one the
grammar rejects (random logits, as on a synthetic model): the step with llama-server's fallback
(the grammar over the whole vocabulary, then the chain) against ggufrun's (only the tokens that can
matter; generation._redraw), and the same rows unconstrained. The grammar needs a vocabulary:
``--model`` (default: a synthetic file with tiny weights and a ``--vocab`` vocabulary, written to a
temporary folder).

Both apply top-k 40, top-p 0.95, min-p 0.05, temperature 0.8 and a seeded draw. The logits are
random: "flat" (normal, sd 1: every token near the top, the worst case for candidate search)
and "peaked" (sd 4, closer to a trained model's). Prints milliseconds per step (the median).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

import ggufrun.runtime  # noqa: F401  (loads llama.cpp the way ggufrun does)
import llama_cpp as L
from ggufrun import generation
from ggufrun.generation import SamplingParams, SeqSampler, sample_rows

# llama-server's fallback (and ggufrun's before): the grammar over every token, then the draw. The
# tests' copy, so the baseline timed here is the one the tests prove the fast path picks the same tokens as.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from slowpath import old_redraw as whole_vocabulary_redraw  # noqa: E402

PARAMS = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)


def llama_chain(seed: int) -> ctypes.c_void_p:
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    for s in (L.llama_sampler_init_top_k(40), L.llama_sampler_init_top_p(0.95, 1), L.llama_sampler_init_min_p(0.05, 1),
              L.llama_sampler_init_temp(0.8), L.llama_sampler_init_dist(seed)):
        L.llama_sampler_chain_add(chain, s)
    return chain


def time_llama(logits: np.ndarray, steps: int) -> float:
    rows, vocab = logits.shape
    chains = [llama_chain(i) for i in range(rows)]
    data = np.zeros(vocab, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
    ids = np.arange(vocab, dtype=np.int32)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        for r in range(rows):  # as llama_sampler_sample does: fill the candidates, run the chain
            data["id"] = ids
            data["logit"] = logits[r]
            arr = L.llama_token_data_array(data=data.ctypes.data_as(ctypes.POINTER(L.llama_token_data)), size=vocab,
                                           selected=-1, sorted=False)
            L.llama_sampler_apply(chains[r], ctypes.byref(arr))
        times.append(time.perf_counter() - t)
    for c in chains:
        L.llama_sampler_free(c)
    return statistics.median(times) * 1e3


def time_numpy(logits: np.ndarray, steps: int, chained: bool = False, full: bool = False) -> float:
    """ggufrun's sample_rows; ``full``: every chain over the whole vocabulary (no top-k prefilter)."""
    from ggufrun.runtime import DrawChain

    params = [SamplingParams(seed=i, **PARAMS) for i in range(len(logits))]  # type: ignore[arg-type]
    seqs = [SeqSampler(p, draw=DrawChain(p, logits.shape[1]) if chained else None) for p in params]
    if full:
        for s in seqs:
            s.draw.top_k = 0  # type: ignore[union-attr]  (the chain keeps its top-k; only the prefilter is off)
    times = []
    for _ in range(steps):
        work = logits.copy()  # sampling edits the matrix in place; the copy is not timed
        t = time.perf_counter()
        sample_rows(work, seqs)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


SCHEMA = {"type": "object", "properties": {"numbers": {"type": "array", "items": {"type": "integer"}, "minItems": 64}},
          "required": ["numbers"]}
STATES = ['', '{', '{"numbers"', '{"numbers": [', '{"numbers": [1', '{"numbers": [1, 2', '{"numbers": [1, 23,', '{ "numbers": [4']


def time_grammar(model: object, logits: np.ndarray, steps: int, greedy: bool, mode: str) -> tuple[float, float]:
    """sample_rows with every second row under SCHEMA's grammar (mode: "off", "whole" or "ggufrun"),
    then each row's token accepted (the grammar moves on, as in a reply): median ms of the sampling,
    and of the accepting (where ggufrun already finds the next state's candidates after a miss; the
    engine accepts while the device computes the next step, so that part is off the step's path)."""
    from ggufrun.llama.grammar import schema_to_gbnf
    from ggufrun.runtime import DrawChain

    gbnf = schema_to_gbnf(SCHEMA)
    seqs = []
    for i in range(len(logits)):
        p = SamplingParams(temperature=0.0) if greedy else SamplingParams(seed=i, **PARAMS)  # type: ignore[arg-type]
        g = None
        if mode != "off" and i % 2 == 0:
            g = model.grammar(gbnf)  # type: ignore[attr-defined]
            for t in model.tokenize(STATES[(i // 2) % len(STATES)], add_special=False):  # type: ignore[attr-defined]
                g.accept(t)
        seqs.append(SeqSampler(p, grammar=g, draw=None if greedy else DrawChain(p, logits.shape[1])))
    saved = generation._redraw
    if mode == "whole":
        generation._redraw = whole_vocabulary_redraw
    times, accepts = [], []
    try:
        for _ in range(steps):
            work = logits.copy()
            t = time.perf_counter()
            tokens, _ = sample_rows(work, seqs)
            times.append(time.perf_counter() - t)
            t = time.perf_counter()
            for s, tok in zip(seqs, tokens):
                if tok >= 0:
                    s.accept(tok)
            accepts.append(time.perf_counter() - t)
    finally:
        generation._redraw = saved
        for s in seqs:
            s.close()
    return statistics.median(times) * 1e3, statistics.median(accepts) * 1e3


def grammar_table(args: argparse.Namespace) -> None:
    import tempfile
    from pathlib import Path

    from ggufrun.runtime import Model
    from ggufrun.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            from ggufrun.synthetic import write_synthetic

            path = write_synthetic(Path(tmp) / "vocab.gguf", "tiny", vocab_size=args.vocab)
        with Model.load(path, Settings(n_gpu_layers=0, n_ctx=256)) as model:
            from ggufrun.llama.sampler import vocab_index

            vocab_index(model)  # built once per model on the first fallback: not a step's cost
            rng = np.random.default_rng(0)
            print(f"{'sampling':9} {'rows':>5} {'unconstrained ms':>17} {'whole-vocabulary fallback ms':>29} "
                  f"{'ggufrun fallback ms':>20} {'(then accepting ms)':>20}")
            for greedy in (False, True):
                for rows in (int(r) for r in args.rows.split(",")):
                    logits = (rng.standard_normal((rows, model.n_vocab)) * 2).astype(np.float32)
                    cells = [time_grammar(model, logits, args.steps, greedy, m) for m in ("off", "whole", "ggufrun")]
                    print(f"{'greedy' if greedy else 'sampled':9} {rows:5d} {cells[0][0]:17.2f} {cells[1][0]:29.2f} "
                          f"{cells[2][0]:20.2f} {cells[2][1]:20.2f}")


def spin() -> None:
    x = 0
    while True:
        x += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--rows", default="16,64")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows-per-worker", type=int, default=0, help="override the thread pool's rows per task")
    ap.add_argument("--grammar-half", action="store_true",
                    help="half of the rows under a JSON schema grammar that rejects every draw: the fallback's cost")
    ap.add_argument("--model", default=None, help="with --grammar-half: the GGUF whose vocabulary the grammar uses")
    ap.add_argument("--busy", action="store_true",
                    help="run a pure-Python thread meanwhile (as the server's HTTP side): every GIL release can wait for it")
    args = ap.parse_args()
    if args.busy:
        threading.Thread(target=spin, daemon=True).start()
    if args.rows_per_worker:
        generation._ROWS_PER_WORKER = args.rows_per_worker
    if args.grammar_half:
        grammar_table(args)
        return
    rng = np.random.default_rng(0)
    print(f"{'logits':8} {'rows':>5} {'llama.cpp serial ms':>20} {'numpy ms':>9} {'chain full vocab ms':>20}"
          f" {'ggufrun (chain top-k prefilter, threads) ms':>44}")
    for shape, sd in (("flat", 1.0), ("peaked", 4.0)):
        for rows in (int(r) for r in args.rows.split(",")):
            logits = (rng.standard_normal((rows, args.vocab)) * sd).astype(np.float32)
            a, b = time_llama(logits, args.steps), time_numpy(logits, args.steps)
            c, d = time_numpy(logits, args.steps, True, full=True), time_numpy(logits, args.steps, True)
            print(f"{shape:8} {rows:5d} {a:20.2f} {b:9.2f} {c:20.2f} {d:44.2f}")


if __name__ == "__main__":
    main()
