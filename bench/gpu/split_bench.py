"""A model split over several devices: `ggufrun bench` against llama-bench with the same split.

Both tools get the same -ngl, split mode, tensor split and RPC workers, and run in alternating
rounds; the ratio is ggufrun's mean tokens/s over llama-bench's (the issue's bar: >= 0.97x).
Builds nothing: give it llama-bench from the same llama.cpp build that ggufrun runs on.

    # two GPUs in one host, layers split 1:1
    python3 bench/gpu/split_bench.py --llama-bench $LLAMA_BIN/llama-bench --model .gpubuild/q7.gguf \\
        --split-mode layer --tensor-split 1,1
    # through two RPC workers on loopback (ggufrun rpc-worker --port 50052 --device CUDA0 etc.)
    python3 bench/gpu/split_bench.py --llama-bench $LLAMA_BIN/llama-bench --model .gpubuild/q7.gguf \\
        --rpc 127.0.0.1:50052,127.0.0.1:50053 --tensor-split 1,1
Exit status 1 when a ratio is below --min-ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from statistics import fmean

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from reference import bench_row  # noqa: E402  (bench/reference.py)



def llama_bench(a: argparse.Namespace) -> dict[str, float]:
    cmd = [str(a.llama_bench), "-m", str(a.model), "-ngl", "99", "-sm", a.split_mode, "-fa", a.fa, "-p", str(a.p),
           "-n", str(a.n), "-r", str(a.r), "-t", str(a.threads), "-o", "json"]
    cmd += ["-ts", a.tensor_split.replace(",", "/")] if a.tensor_split else []
    cmd += ["--rpc", a.rpc] if a.rpc else []
    cmd += ["-mg", str(a.main_gpu)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return {"pp" if t["n_gen"] == 0 else "tg": float(t["avg_ts"]) for t in json.loads(out)}


def ggufrun_bench(a: argparse.Namespace) -> dict[str, float]:
    args = [str(a.model), "--n-gpu-layers", "-1", "--split-mode", a.split_mode, "--flash-attn", a.fa, "-p", str(a.p),
            "-n", str(a.n), "-r", str(a.r), "--threads", str(a.threads), "--main-gpu", str(a.main_gpu)]
    args += ["--tensor-split", a.tensor_split] if a.tensor_split else []
    args += ["--rpc", a.rpc] if a.rpc else []
    return bench_row(args)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", required=True, type=Path)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--split-mode", default="layer", choices=("layer", "row", "none"))
    ap.add_argument("--tensor-split", default="")
    ap.add_argument("--main-gpu", type=int, default=0)
    ap.add_argument("--rpc", default="")
    ap.add_argument("--fa", default="on")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--min-ratio", type=float, default=0.97)
    a = ap.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"llama-bench": [], "ggufrun": []}
    for rnd in range(a.rounds):
        for tool in (("llama-bench", "ggufrun") if rnd % 2 == 0 else ("ggufrun", "llama-bench")):
            res = llama_bench(a) if tool == "llama-bench" else ggufrun_bench(a)
            runs[tool].append(res)
            print(f"round {rnd + 1} {tool}: pp {res['pp']:.1f} tg {res['tg']:.1f}", file=sys.stderr, flush=True)
    print(f"{a.model.name} -sm {a.split_mode} -ts {a.tensor_split or 'auto'} rpc {a.rpc or '-'} fa {a.fa}")
    print("| test | llama-bench t/s | ggufrun bench t/s | ratio |\n|---|---|---|---|")
    ok = True
    for test, n in (("pp", a.p), ("tg", a.n)):
        ref, ours = fmean(r[test] for r in runs["llama-bench"]), fmean(r[test] for r in runs["ggufrun"])
        ok &= ours / ref >= a.min_ratio
        print(f"| {test}{n} | {ref:.2f} | {ours:.2f} | {ours / ref:.3f} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
