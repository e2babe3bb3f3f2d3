"""Is `ggufrun bench` as accurate as llama-bench? Runs both on the same files and settings, prints the ratios.

llama-bench comes from the llama.cpp that llama-cpp-python vendors (built by
../shared/tools/build-reference-llama-cpp, or given with --llama-bench). Both tools run in turn
in alternating order (A B, then B A, ...) so that drift in machine load falls on both alike;
each tool's tokens/s is the mean over rounds of its own mean over -r repetitions.
ggufrun bench is run as a user runs it: `ggufrun bench FILE ... --format json` in a subprocess.

CPU (the defaults: gemma3-270m and a synthetic Qwen2-0.5B-shaped Q4_K_M, 2 threads):
    PYTHONPATH=. python bench/accuracy.py
GPU (synthetic Qwen2-7B shape, all layers offloaded, flash attention on and off):
    PYTHONPATH=. python bench/accuracy.py --llama-bench /path/to/llama-bench --model synthetic:qwen2-7b:q4_k_m \\
        --model synthetic:qwen2-7b:q5_k_m --ngl 99 --fa on,off --threads 8
Exit status 1 when a ratio is off by more than --tolerance (default 3%).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import fmean

from reference import GGUFRUN, bench_row, model_path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("GGUFRUN_ACCURACY_CACHE", Path.home() / ".cache" / "ggufrun-accuracy"))
BUILD_SCRIPT = ROOT.parent / "shared" / "tools" / "build-reference-llama-cpp"
DEFAULT_MODELS = ["gemma3-270m", "synthetic:qwen2-0.5b:q4_k_m"]


def model_file(spec: str) -> Path:
    """A file for: a path, a registry name (fetched as `ggufrun pull` does) or synthetic:SHAPE:QUANT
    (written once by `ggufrun synth`)."""
    if spec.startswith("synthetic:"):
        _, shape, quant = spec.split(":")
        CACHE.mkdir(parents=True, exist_ok=True)
        path = CACHE / f"synthetic-{shape}-{quant}.gguf"
        if not path.exists():
            subprocess.run([*GGUFRUN, "synth", "--shape", shape, "--quant", quant, "--out", str(path)], check=True)
        return path
    return model_path(spec)


def find_llama_bench(given: str | None) -> Path:
    if given:
        return Path(given)
    if os.environ.get("LLAMA_BENCH"):
        return Path(os.environ["LLAMA_BENCH"])
    out = subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True).stdout
    return Path(out.strip().splitlines()[-1]) / "llama-bench"


def run_llama_bench(exe: Path, path: Path, a: argparse.Namespace, fa: str) -> dict[str, float]:
    cmd = [str(exe), "-m", str(path), "-t", str(a.threads), "-p", str(a.p), "-n", str(a.n), "-r", str(a.r),
           "-ngl", str(a.ngl), "-fa", fa, "-b", str(a.batch), "-ub", str(a.batch), "-o", "json"]
    proc = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for test in json.loads(proc.stdout):
        out["pp" if test["n_gen"] == 0 else "tg"] = float(test["avg_ts"])
    return out


def run_ggufrun(path: Path, a: argparse.Namespace, fa: str) -> dict[str, float]:
    ngl = -1 if a.ngl >= 99 else a.ngl
    return bench_row([str(path), "--threads", str(a.threads), "-p", str(a.p), "-n", str(a.n), "-r", str(a.r),
                      "--n-gpu-layers", str(ngl), "--flash-attn", fa, "--batch-size", str(a.batch)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", help="path, gemma3-270m or synthetic:SHAPE:QUANT (repeatable)")
    ap.add_argument("--llama-bench", help="llama-bench binary (default: $LLAMA_BENCH, else the reference build)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=5)
    ap.add_argument("--batch", type=int, default=512, help="-b and -ub of llama-bench, --batch-size of ggufrun")
    ap.add_argument("--ngl", type=int, default=0, help="GPU layers (99 = all)")
    ap.add_argument("--fa", default="auto", help="comma list of on/off/auto")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of both tools")
    ap.add_argument("--tolerance", type=float, default=0.03)
    ap.add_argument("--json", type=Path, help="also write the table as JSON here")
    a = ap.parse_args(argv)

    exe = find_llama_bench(a.llama_bench)
    print(f"llama-bench: {exe}\nthreads={a.threads} p={a.p} n={a.n} r={a.r} batch={a.batch} ngl={a.ngl} "
          f"rounds={a.rounds}\n", flush=True)
    table = []
    for spec in a.model or DEFAULT_MODELS:
        path = model_file(spec)
        for fa in a.fa.split(","):
            runs: dict[str, list[dict[str, float]]] = {"llama-bench": [], "ggufrun": []}
            for rnd in range(a.rounds):
                order = ["llama-bench", "ggufrun"] if rnd % 2 == 0 else ["ggufrun", "llama-bench"]
                for tool in order:
                    result = run_llama_bench(exe, path, a, fa) if tool == "llama-bench" else run_ggufrun(path, a, fa)
                    runs[tool].append(result)
                    print(f"  {spec} fa={fa} round {rnd + 1} {tool}: pp {result['pp']:.1f} tg {result['tg']:.1f}",
                          file=sys.stderr, flush=True)
            for test, n in (("pp", a.p), ("tg", a.n)):
                ref = fmean(r[test] for r in runs["llama-bench"])
                ours = fmean(r[test] for r in runs["ggufrun"])
                table.append({"model": spec, "file": path.name, "fa": fa, "test": f"{test}{n}", "llama_bench": ref,
                              "ggufrun": ours, "ratio": ours / ref})
    print("| model | fa | test | llama-bench t/s | ggufrun bench t/s | ratio |")
    print("|---|---|---|---|---|---|")
    for row in table:
        flag = "" if abs(row["ratio"] - 1) <= a.tolerance else " (off)"
        print(f"| {row['model']} | {row['fa']} | {row['test']} | {row['llama_bench']:.2f} | {row['ggufrun']:.2f} | "
              f"{row['ratio']:.3f}{flag} |")
    if a.json:
        a.json.write_text(json.dumps({"settings": vars(a) | {"json": str(a.json)}, "rows": table}, indent=2))
    return 0 if all(abs(r["ratio"] - 1) <= a.tolerance for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())
