"""Speculative decoding's speedup against its acceptance rate, and that it never slows a server down
(issue 24's GPU proof), on synthetic target/draft pairs whose agreement is set.

Random weights never agree with a draft, so `ggufrun synth --inert` writes models whose layers add
nothing: the next token follows from the last through the embedding and output matrices, which a
1-layer draft of the same shape and seed shares (--layers 1); --perturb P redraws that share of the
draft's output rows, so it disagrees on about P of the tokens. For each draft, a `ggufrun serve`
with --draft-model is measured against the same server without one, in this run: single-stream
generation rate and throughput at 16 and 64 clients (streamed completions, ignore_eos). Both servers
run side by side and take turns, --rounds times, and each draft's ratio is of its medians against the
base's turns that alternated with its own (the "none" row pools them all): a shared machine's speed
drifts more between minutes than 3%. The bars: at 0% acceptance single stream >= 0.97x, at 16
and 64 clients >= 0.97x.

    PYTHONPATH=. python bench/spec_synth.py --shape qwen2-7b --ngl -1        # GPU host, ~3 min with files made
    PYTHONPATH=. python bench/spec_synth.py                                  # CPU: a small shape, short runs
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from reference import GGUFRUN, free_port, server

from ggufrun.bench.load import run_load

SMALL = "qwen2:layers=8,dim=512,heads=8,kv_heads=2,ff=1536,vocab=8000,tied=0"
PROMPT = "one two three four five"


def synth(out: Path, shape: str, quant: str, *extra: str) -> Path:
    if not out.exists():
        subprocess.run([*GGUFRUN, "synth", "--shape", shape, "--quant", quant, "--inert", "--out", str(out), *extra],
                       check=True, stdout=subprocess.DEVNULL)
    return out


def single(url: str, n_gen: int) -> tuple[float, tuple[int, int]]:
    """(generation tokens/s, (draft tokens checked, accepted)) of one greedy completion, from the server's timings."""
    body = {"prompt": PROMPT, "max_tokens": n_gen, "temperature": 0, "ignore_eos": True}
    req = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        t = json.load(resp)["timings"]
    return float(t["predicted_per_second"]), (int(t.get("draft_n", 0)), int(t.get("draft_n_accepted", 0)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default=SMALL)
    ap.add_argument("--quant", default="q4_k_m")
    ap.add_argument("--dir", type=Path, default=None, help="where the pair files are made (kept; default: a temporary folder)")
    ap.add_argument("--perturb", default="0,0.3,0.7,1", help="draft disagreement shares to measure")
    ap.add_argument("--ngl", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--clients", default="16,64", help="concurrency levels (empty: single stream only)")
    ap.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    ap.add_argument("--draft-max", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="turns each server takes at each measurement (medians)")
    ap.add_argument("--best", action="store_true", help="the best turn, not the median: on a machine shared with other "
                    "work, which only ever slows a turn down")
    args = ap.parse_args()
    pick = max if args.best else statistics.median
    folder = args.dir or Path(tempfile.mkdtemp(prefix="spec-synth-"))
    if args.dir is None:  # a qwen2-7b pair is gigabytes: the default folder goes when the run does
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    target = synth(folder / "target.gguf", args.shape, args.quant)
    perturbs = [float(p) for p in args.perturb.split(",") if p]
    drafts = {p: synth(folder / f"draft-{p}.gguf", args.shape, args.quant, "--layers", "1", "--perturb", str(p)) for p in perturbs}
    levels = [int(c) for c in args.clients.split(",") if c]
    parallel = max(levels, default=1)
    base_argv = [*GGUFRUN, "serve", str(target), "--parallel", str(parallel), "--n-gpu-layers", str(args.ngl),
                 "--threads", str(args.threads), "--n-ctx", str(args.n_gen + 64), "--max-queue", "256"]
    def load(url: str, c: int) -> float:
        return run_load(url, "", c, c * args.requests, max_tokens=args.n_gen, prompt=PROMPT,
                        params={"temperature": 0, "ignore_eos": True}).tokens_per_second

    rows = []
    base_port = free_port()
    with server([*base_argv, "--port", str(base_port)], base_port) as base_url:
        single(base_url, 8)  # warm-up
        pooled: list[list[float]] = [[] for _ in range(1 + len(levels))]  # the base's turns beside every draft
        for p in perturbs:
            port = free_port()
            argv = [*base_argv, "--draft-model", str(drafts[p]), "--draft-max", str(args.draft_max), "--draft-p-min", "0"]
            with server([*argv, "--port", str(port)], port) as url:
                single(url, 8)
                mine: list[list[float]] = [[] for _ in range(1 + len(levels))]
                theirs: list[list[float]] = [[] for _ in range(1 + len(levels))]  # the base's turns beside these
                accepts = []
                for _ in range(args.rounds):  # the two servers take turns: drift hits both alike
                    for who, into in ((base_url, theirs), (url, mine)):
                        tps, accept = single(who, args.n_gen)
                        into[0].append(tps)
                        if who == url:
                            accepts.append(accept)
                        for k, c in enumerate(levels):
                            into[1 + k].append(load(who, c))
                for k, v in enumerate(theirs):
                    pooled[k] += v
            drafted = sum(a for a, _ in accepts)
            # each draft against the base's turns that alternated with its own: a shared machine's
            # pace drifts between one draft's phase and the next's
            rows.append((p, [pick(v) / pick(b) for v, b in zip(mine, theirs)],
                         sum(b for _, b in accepts) / drafted if drafted else float("nan"), [pick(v) for v in mine]))
            # as it goes: a run cut short by a time limit still says what it measured
            print(f"perturb {p:g}: " + ", ".join(f"{pick(v):.1f} vs {pick(b):.1f} tok/s ({pick(v) / pick(b):.2f}x)"
                                                 for v, b in zip(mine, theirs)), flush=True)
        base = (None, [1.0] * (1 + len(levels)), float("nan"), [pick(v) for v in pooled])
    rows.insert(0, base)
    print(f"target {args.shape} {args.quant} (inert), drafts: 1 layer, draft-max {args.draft_max}; ngl {args.ngl}; "
          f"{args.n_gen} tokens per reply; {'best' if args.best else 'medians'} of {args.rounds} turns, the servers alternating")
    head = "".join(f" {f'{c} clients':>16}" for c in levels)
    print(f"{'draft':>14} {'accept':>7} {'1 stream tok/s':>15} {'speedup':>8}{head}")
    for p, ratios, accept, rates in rows:
        name = "none" if p is None else f"perturb {p:g}"
        cells = "".join(f" {v:9.1f} {r:5.2f}x" for v, r in zip(rates[1:], ratios[1:]))
        acc = "-" if accept != accept else f"{accept:.0%}"
        print(f"{name:>14} {acc:>7} {rates[0]:15.1f} {ratios[0]:7.2f}x{cells}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
