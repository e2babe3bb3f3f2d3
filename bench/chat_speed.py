"""Generation speed of `ggufrun chat` against llama-bench's tg128, side by side in one run.

The chat side is the public CLI, a fresh process per round: `ggufrun chat MODEL -p PROMPT -v`
(greedy, no repeat penalty), whose --verbose stats line on stderr gives the reply's generation
tokens/s (model load and prompt excluded). Runs alternate (llama-bench, chat, llama-bench, chat, ...)
so that a busy neighbour slows both sides alike. The issue's bar: chat >= 0.97x llama-bench.

    PYTHONPATH=. python bench/chat_speed.py                      # gemma3-270m, 2 threads, 5 rounds
    PYTHONPATH=. python bench/chat_speed.py --model ./x.gguf --threads 4 --llama-bench ~/llama.cpp/build/bin
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

from reference import GGUFRUN, find_tool, model_path

PROMPT = "Count from 1 to 300, separated by commas: 1, 2, 3,"
STATS = re.compile(r"(\d+) generated .* ([\d.]+) tok/s")  # chat.format_stats: "... · 128 generated · ... · 95.1 tok/s"


def llama_bench_tg(bench: Path, model: Path, threads: int, n_gen: int, flash_attn: bool, ngl: int = 0) -> float:
    """One llama-bench run of tg{n_gen} (one repetition): tokens per second."""
    cmd = [str(bench), "-m", str(model), "-t", str(threads), "-p", "0", "-n", str(n_gen), "-r", "1", "-ngl", str(99 if ngl < 0 else ngl), "-fa", str(int(flash_attn)), "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"llama-bench failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    return float(json.loads(out.stdout)[0]["avg_ts"])


def chat_tg(model: Path, threads: int, n_gen: int, flash_attn: str, ngl: int) -> tuple[float, int]:
    """One `ggufrun chat -p` reply of up to n_gen tokens: (tokens/s, tokens generated), from its stats line."""
    # the smallest context that holds the prompt and the reply: llama-bench's tg runs in n_gen cells
    cmd = [*GGUFRUN, "chat", str(model), "-p", PROMPT, "-v", "--temperature", "0", "--repeat-penalty", "1",
           "--max-tokens", str(n_gen), "--threads", str(threads), "--n-ctx", str(n_gen + 128),
           "--flash-attn", flash_attn, "--n-gpu-layers", str(ngl)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = STATS.findall(out.stderr)
    if out.returncode != 0 or not found:
        sys.exit(f"ggufrun chat failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    generated, tps = found[-1]
    return float(tps), int(generated)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m", help="registry name or .gguf path (default: gemma3-270m)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--flash-attn", choices=("on", "off"), default="on", help="the same on both sides (default: on)")
    ap.add_argument("--llama-bench", default=None, help="path to llama-bench (or its bin folder)")
    ap.add_argument("--n-gpu-layers", type=int, default=0, help="-1 = all (GPU builds)")
    ap.add_argument("--json", action="store_true", help="print the raw rows as JSON lines too")
    args = ap.parse_args()

    bench = find_tool("llama-bench", args.llama_bench)
    path = model_path(args.model)
    rows = []
    chat_tg(path, args.threads, args.n_gen, args.flash_attn, args.n_gpu_layers)  # warm-up: page cache, as llama-bench does its own
    for round_ in range(args.rounds):
        measured = {
            "llama-bench": (llama_bench_tg(bench, path, args.threads, args.n_gen, args.flash_attn == "on", args.n_gpu_layers), args.n_gen),
            "ggufrun chat": chat_tg(path, args.threads, args.n_gen, args.flash_attn, args.n_gpu_layers),
        }
        rows += [{"round": round_, "path": k, "tps": tps, "tokens": n} for k, (tps, n) in measured.items()]
        print(f"round {round_}: " + ", ".join(f"{k} {tps:.1f}" for k, (tps, _) in measured.items()) + " tok/s", flush=True)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    by_path = {k: [r["tps"] for r in rows if r["path"] == k] for k in ("llama-bench", "ggufrun chat")}
    produced = min(r["tokens"] for r in rows if r["path"] != "llama-bench")
    if produced < args.n_gen:
        print(f"note: a reply stopped at an end-of-turn after {produced} tokens; its rate is over what was produced")
    ref = statistics.median(by_path["llama-bench"])
    print(f"model {path.name}, {args.threads} threads, flash-attn {args.flash_attn}, tg{args.n_gen}, {args.rounds} rounds (median ± stdev, ratio to llama-bench)")
    for k, values in by_path.items():
        print(f"{k:15} {statistics.median(values):7.1f} ± {statistics.pstdev(values):4.1f} tok/s  {statistics.median(values) / ref:.3f}x")
    # per-round ratios cancel most of a busy neighbour's effect, which hits both sides of a round
    per_round = [c / b for c, b in zip(by_path["ggufrun chat"], by_path["llama-bench"])]
    print(f"chat / llama-bench, median of per-round ratios: {statistics.median(per_round):.3f}x  (target >= 0.97x)")


if __name__ == "__main__":
    main()
