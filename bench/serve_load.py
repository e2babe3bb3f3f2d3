"""`ggufrun serve` under concurrent load against llama-server from the same llama.cpp, side by side.

Two measurements, in one run:

1. One client: the server's generation speed (tokens after the first, over the time between the
   first and the last streamed token) against the same model generating in this process through
   runtime.Model.generate. The issue's bar: server >= 0.95x in-process.
2. For each client count C (1, 2, 4, 8, 16): ggufrun serve --parallel C and llama-server -np C,
   each started fresh, warmed up with one request, then 4 x C streamed 64-token completions from C
   client threads (ggufrun.loadgen). Total tokens/s, time to first token p50/p99 and
   inter-token latency per server. The two servers alternate which goes first at each level, so
   a busy neighbour slows both alike.

    python bench/serve_load.py                                  # gemma3-270m, 2 threads
    python bench/serve_load.py --levels 1,4 --llama-server ~/llama.cpp/build/bin/llama-server
    python bench/serve_load.py --json results/serve_load.json  # the raw per-request rows too
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # serverutil: the same server launcher the tests use
from reference import find_tool, model_path  # noqa: E402  (bench/reference.py)

PROMPT = "Count from 1 to 300, separated by commas: 1, 2, 3,"  # a base model keeps going: few early stops
N_CTX = 4096  # per request, on both servers


def in_process_tps(path: Path, threads: int, n_gen: int, rounds: int, ngl: int = 0) -> float:
    """Generation tokens/s of runtime.Model.generate (the median of ``rounds`` fresh replies)."""
    import statistics

    from ggufrun.runtime import GenStats, Model, Sampler
    from ggufrun.settings import Settings

    with Model.load(path, Settings(threads=threads, n_ctx=N_CTX, n_gpu_layers=ngl)) as model:
        sampler = Sampler(model, temperature=0)
        prompt = model.tokenize(PROMPT)
        rates = []
        for _ in range(rounds + 1):  # the first round warms up
            model.reset()
            stats = GenStats()
            for _tok in model.generate(prompt, sampler, max_tokens=n_gen, stats=stats):
                pass
            rates.append(stats.gen_tps)
        sampler.close()
    return statistics.median(rates[1:])


def stream_gen_tps(result: Any) -> float:
    """Generation tokens/s as a client sees it: tokens after the first over the gaps between them."""
    gaps = [g for s in result.samples if s.ok for g in s.gaps]
    return len(gaps) / sum(gaps) if gaps else 0.0


def measure(kind: str, path: Path, threads: int, clients: int, requests: int, n_gen: int, llama_server: Path, ngl: int = 0,
            extra: tuple[str, ...] = ()) -> Any:
    from serverutil import serve

    from ggufrun.loadgen import run_load

    total_ctx = N_CTX * clients
    if kind == "ggufrun":
        args = [str(path), "--served-model-name", "bench", "--threads", str(threads), "--parallel", str(clients),
                "--n-ctx", str(N_CTX), "--max-queue", str(4 * requests), "--n-gpu-layers", str(ngl)]
        launch: dict[str, Any] = {}
    else:
        args = ["-m", str(path), "-t", str(threads), "-tb", str(threads), "-np", str(clients), "-c", str(total_ctx),
                "-ngl", str(99 if ngl < 0 else ngl), "--host", "127.0.0.1", "-a", "bench"]
        launch = {"command": [str(llama_server)]}
    with serve(*args, *extra, ready_timeout=180, **launch) as server:
        run_load(server.url, "bench", 1, 1, max_tokens=8, prompt=PROMPT)  # warm-up: first-touch page faults, caches
        return run_load(server.url, "bench", clients, requests, max_tokens=n_gen, prompt=PROMPT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m", help="registry name or .gguf path (default: gemma3-270m)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--levels", default="1,2,4,8,16", help="client counts (default 1,2,4,8,16)")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--llama-server", default=None, help="path to llama-server (or its bin folder)")
    ap.add_argument("--n-gpu-layers", type=int, default=0, help="-1 = all (GPU builds), on both servers")
    ap.add_argument("--json", default=None, help="write the raw rows (every request) to this file")
    ap.add_argument("--ggufrun-args", default="", help="extra serve flags, e.g. '--split-mode layer --tensor-split 1,1'")
    ap.add_argument("--llama-server-args", default="", help="the same for llama-server, e.g. '-sm layer -ts 1,1'")
    opts = ap.parse_args()

    server_bin = find_tool("llama-server", opts.llama_server)
    path = model_path(opts.model)
    levels = [int(x) for x in opts.levels.split(",")]
    print(f"model {path.name}, {opts.threads} threads, {opts.max_tokens}-token streamed completions; llama-server: {server_bin}",
          file=sys.stderr)

    rows: list[dict[str, Any]] = []
    for i, clients in enumerate(levels):
        order = ("ggufrun", "llama-server") if i % 2 == 0 else ("llama-server", "ggufrun")
        for kind in order:
            extra = tuple(shlex.split(opts.ggufrun_args if kind == "ggufrun" else opts.llama_server_args))
            result = measure(kind, path, opts.threads, clients, opts.requests_per_client * clients, opts.max_tokens, server_bin,
                             opts.n_gpu_layers, extra)
            row = {"server": kind, **result.summary(), "gen_tps_per_stream": round(stream_gen_tps(result), 2), "raw": result.as_dict()}
            rows.append(row)
            print(f"  {kind:12s} clients={clients:2d} total {row['tokens_per_s']:7.1f} tok/s  ttft p50 {row['ttft_p50_s']}s "
                  f"p99 {row['ttft_p99_s']}s  itl p50 {row['itl_p50_ms']}ms  errors {row['errors']}", file=sys.stderr)

    one = next((r for r in rows if r["server"] == "ggufrun" and r["concurrency"] == 1), None)
    if one is not None:
        local = in_process_tps(path, opts.threads, opts.max_tokens, rounds=3, ngl=opts.n_gpu_layers)
        served = one["gen_tps_per_stream"]
        print(f"\nOne client, generation: ggufrun serve {served:.1f} tok/s, in process {local:.1f} tok/s "
              f"-> {served / local:.2f}x (bar: 0.95x)\n")
        rows.append({"server": "in-process", "concurrency": 1, "gen_tps_per_stream": round(local, 2)})

    print("| clients | ggufrun tok/s | llama-server tok/s | ratio | ggufrun TTFT p50 / p99 (s) | llama-server TTFT p50 / p99 (s) "
          "| ggufrun ITL p50 / p99 (ms) | llama-server ITL p50 / p99 (ms) | failed (ours / theirs) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for clients in levels:
        ours = next(r for r in rows if r["server"] == "ggufrun" and r["concurrency"] == clients)
        theirs = next(r for r in rows if r["server"] == "llama-server" and r["concurrency"] == clients)
        ratio = ours["tokens_per_s"] / theirs["tokens_per_s"] if theirs["tokens_per_s"] else float("nan")
        print(f"| {clients} | {ours['tokens_per_s']:.1f} | {theirs['tokens_per_s']:.1f} | {ratio:.2f}x "
              f"| {ours['ttft_p50_s']} / {ours['ttft_p99_s']} | {theirs['ttft_p50_s']} / {theirs['ttft_p99_s']} "
              f"| {ours['itl_p50_ms']} / {ours['itl_p99_ms']} | {theirs['itl_p50_ms']} / {theirs['itl_p99_ms']} "
              f"| {ours['errors']} / {theirs['errors']} |")
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
