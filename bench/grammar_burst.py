"""A burst of constrained requests, each with a schema of its own, prepared at once beside a busy
engine thread: how long the burst takes and how long the engine thread waits for the GIL.

What the server does per constrained request, off the event loop (core.Server.submit's prepare): the
schema to GBNF, the grammar check, the vocabulary index the grammar prefilter reads (built once per
model), llama.cpp's grammar and its first state's candidates. As many preparing threads as
asyncio's default pool has on this host (min(32, cores + 4)); the "engine" is a thread running short Python steps.
Two waves of fresh schemas: the first on a model no grammar has touched, the second after it.

    cd bench && PYTHONPATH=.. python grammar_burst.py --model /path/gemma-3-270m.gguf --requests 16
    cd bench && PYTHONPATH=/path/to/older/checkout python grammar_burst.py ...   # the same against another tree
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from structured_load import schema_for

from ggufrun.runtime import Model
from ggufrun.server.constraints import schema_grammar
from ggufrun.settings import Settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help=".gguf path")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    opts = ap.parse_args()
    model = Model.load(opts.model, Settings(n_gpu_layers=opts.n_gpu_layers, n_ctx=256))
    stop = False
    gaps: list[float] = []

    def engine() -> None:
        last = time.perf_counter()
        while not stop:
            sum(range(2000))  # ~20 us of Python, as an engine step's bookkeeping
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    def prepare(n: int) -> object:
        try:
            gbnf = schema_grammar(schema_for(n)[1], "schema")
            model.prepare_grammars()
            return model.grammar(gbnf)
        except Exception as exc:  # noqa: BLE001 (an older tree refuses some schemas: counted, not fatal)
            return exc

    thread = threading.Thread(target=engine, daemon=True)
    thread.start()
    print(f"model {opts.model}, {model.n_vocab} tokens, {opts.requests} requests a wave", file=sys.stderr)
    for wave in range(2):
        gaps.clear()
        start = time.perf_counter()
        with ThreadPoolExecutor(min(32, (os.cpu_count() or 1) + 4)) as pool:  # asyncio's default pool
            grammars = list(pool.map(prepare, range(wave * 1000, wave * 1000 + opts.requests)))
        took = time.perf_counter() - start
        stalled = sum(g for g in gaps if g > 0.005)
        refused = [g for g in grammars if isinstance(g, Exception)]
        print(f"wave {wave}: {took:.2f} s for {len(grammars)} fresh schemas ({len(refused)} refused); engine thread's "
              f"longest pause {max(gaps, default=0.0) * 1e3:.0f} ms, {stalled:.2f} s in pauses over 5 ms")
        for g in grammars:
            if not isinstance(g, Exception):
                g.close()  # type: ignore[attr-defined]
    stop = True
    thread.join()
    model.close()


if __name__ == "__main__":
    main()
