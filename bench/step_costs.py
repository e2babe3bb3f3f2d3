"""What one batched decode step costs, split into the GPU's decode and the sampling after it, with
the sampling done on the CPU (ggufrun's sample_rows over the logits matrix) or inside llama.cpp's
decode graph (its backend samplers, llama_set_sampler): the measurement behind which one serve uses.

For each batch size, every sequence gets a short random prompt, then each mode runs the same number
of steps (one token per sequence per step, fed back), timed from before llama_decode to the tokens
in hand (so the GPU's asynchronous work is inside the clock). Also times the first step after one
sequence's sampler changes (llama.cpp re-plans its graph then).

    PYTHONPATH=. python3 bench/step_costs.py --model .gpubuild/q7.gguf --n-gpu-layers -1 --rows 16,64
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import llama_cpp as L

from ggufrun.generation import SamplingParams, SeqSampler, sample_rows
from ggufrun.llama.model import Model
from ggufrun.llama.sampler import _chain, _draw_parts
from ggufrun.settings import Settings

SAMPLED = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)


class InGraph:
    """One sequence's chain (argmax, or top-k/top-p/min-p/temperature/seeded draw) run by llama.cpp
    inside the decode graph (llama_set_sampler); the step reads its token, not the logits."""

    def __init__(self, model: Model, seq_id: int, params: SamplingParams) -> None:
        self.model, self.seq_id = model, seq_id
        self.ptr = _chain([L.llama_sampler_init_greedy()] if params.greedy else _draw_parts(params, model.n_vocab))
        assert L.llama_set_sampler(model._ctx, seq_id, self.ptr), "llama.cpp refused the in-graph sampler"

    def token(self, output_index: int) -> int:
        tok = int(L.llama_get_sampled_token_ith(self.model._ctx, output_index))
        L.llama_sampler_accept(self.ptr, tok)
        return tok

    def close(self) -> None:
        L.llama_set_sampler(self.model._ctx, self.seq_id, None)
        L.llama_sampler_free(self.ptr)


def run(model: Model, rows: int, mode: str, steps: int, prompt_len: int) -> tuple[float, float]:
    """Median ms per step, and the ms of the first step after one sequence's sampler changed."""
    rng = random.Random(0)
    model.reset()
    params = SamplingParams(**SAMPLED) if "sampled" in mode else SamplingParams(temperature=0.0)
    chains: list[InGraph] = []
    if mode.startswith("gpu"):
        chains = [InGraph(model, s, SamplingParams(**{**vars(params), "seed": s})) for s in range(rows)]
    seqs = [SeqSampler(SamplingParams(**{**vars(params), "seed": s}),
                       draw=model.draw_chain(params) if not params.greedy else None) for s in range(rows)]
    per = max(1, model.n_batch // rows)
    items = [(s, [rng.randrange(model.n_vocab) for _ in range(min(prompt_len, per))], True) for s in range(rows)]
    outs = model.decode(items)
    last = [0] * rows

    def sample(outs: list[int]) -> list[int]:
        if mode == "decode":
            model.synchronize()
            return [rng.randrange(model.n_vocab) for _ in range(rows)]
        if mode.startswith("gpu"):
            return [c.token(i) for c, i in zip(chains, outs)]
        toks, _ = sample_rows(model.logits_rows(rows), seqs)
        for s, t in zip(seqs, toks):
            s.accept(t)
        return toks

    last = sample(outs)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        outs = model.decode([(s, [last[s]], True) for s in range(rows)])
        last = sample(outs)
        times.append(time.perf_counter() - t0)
    change = float("nan")
    if mode.startswith("gpu"):
        chains[0].close()
        chains[0] = InGraph(model, 0, SamplingParams(**{**vars(params), "seed": 99}))
        t0 = time.perf_counter()
        last = sample(model.decode([(s, [last[s]], True) for s in range(rows)]))
        change = (time.perf_counter() - t0) * 1e3
    for c in chains:
        c.close()
    for q in seqs:
        q.close()
    return statistics.median(times[3:]) * 1e3, change


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n-gpu-layers", default="-1")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--rows", default="16,64")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--modes", default="decode,cpu-greedy,gpu-greedy,cpu-sampled,gpu-sampled")
    ap.add_argument("--kv-split", action="store_true",
                    help="one KV stream per sequence (llama-batched-bench's default) instead of one unified cache")
    a = ap.parse_args()
    if a.kv_split:
        init = L.llama_init_from_model

        def split_init(model_ptr, cparams):  # type: ignore[no-untyped-def]
            cparams.kv_unified = False
            return init(model_ptr, cparams)

        L.llama_init_from_model = split_init
    levels = [int(x) for x in a.rows.split(",")]
    st = Settings(n_gpu_layers=a.n_gpu_layers if a.n_gpu_layers == "auto" else int(a.n_gpu_layers), threads=a.threads,
                  n_ctx=1024, batch_size=2048, ubatch_size=512)
    model = Model.load(a.model, st, n_seq_max=max(levels), kv_cells=1024 * max(levels))
    print(f"{model.description}, KV {'split per sequence' if a.kv_split else 'unified'}: ms per step (median of {a.steps - 3}); 'change' = the step after one sampler changed")
    print(f"{'rows':>5} {'mode':<12} {'ms/step':>8} {'tok/s':>8} {'change':>8}")
    for rows in levels:
        for mode in a.modes.split(","):
            ms, change = run(model, rows, mode, a.steps, a.prompt_len)
            print(f"{rows:>5} {mode:<12} {ms:8.2f} {rows / ms * 1e3:8.0f} {change:8.2f}", flush=True)
    model.close()


if __name__ == "__main__":
    main()
