"""KV cache types side by side: `ggufrun bench --cache-types T` against llama-bench `-ctk T -ctv T` on the
same file, in the same run (issue 26: within 3%).

For each type, rounds alternate the two tools (A B, then B A) so that a busy neighbour slows both
alike; each tool's tokens/s is the mean over rounds of its own mean over -r repetitions. Memory: the
KV cache's bytes as llama.cpp logs allocating them (ggufrun bench's kv_bytes column), and each
process's peak RSS (ggufrun bench's worker; llama-bench's from wait4), plus ggufrun's GPU memory
growth where NVML is present. Flash attention is on for every type on both sides: llama.cpp needs it
for a quantized V cache, and one setting for all keeps the types comparable.

CPU (SmolLM2-135M from the registry, 2 threads, f16/q8_0/q4_0, ~1 minute):
    PYTHONPATH=. python bench/kv_cache_types.py --model smollm2 -p 128 -n 32 -r 3
GPU (after `source bench/gpu/setup.sh`):
    python3 bench/kv_cache_types.py --model .gpubuild/q7-q4_k_m.gguf --ngl 99 --threads 8 -p 512 -n 128 -r 5
Exit status 1 when a speed ratio is off by more than --tolerance (default 3%).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import fmean
from typing import Any

from reference import GGUFRUN, ROOT, find_tool, model_path


def run_llama_bench(exe: Path, path: Path, a: argparse.Namespace, kind: str) -> dict[str, Any]:
    """pp and tg tokens/s of one llama-bench run, and its peak RSS (wait4's rusage of that child alone)."""
    cmd = [str(exe), "-m", str(path), "-t", str(a.threads), "-p", str(a.p), "-n", str(a.n), "-r", str(a.r),
           "-ngl", str(a.ngl), "-fa", "1", "-ctk", kind, "-ctv", kind, "-b", str(a.batch), "-ub", str(a.batch), "-o", "json"]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            sys.exit(f"llama-bench failed (exit {proc.returncode}): {err.read().decode(errors='replace')[-800:]}")
        tests = json.loads(out.read())
    row: dict[str, Any] = {"rss": usage.ru_maxrss * 1024}
    for test in tests:
        row["pp" if test["n_gen"] == 0 else "tg"] = float(test["avg_ts"])
    return row


def run_ggufrun(path: Path, a: argparse.Namespace, kind: str) -> dict[str, Any]:
    """One `ggufrun bench FILE --cache-types KIND` configuration: speed, KV bytes, peak RSS, GPU memory."""
    ngl = -1 if a.ngl >= 99 else a.ngl
    cmd = [*GGUFRUN, "bench", str(path), "--cache-types", kind, "--flash-attn", "on", "--threads", str(a.threads),
           "-p", str(a.p), "-n", str(a.n), "-r", str(a.r), "--n-gpu-layers", str(ngl), "--batch-size", str(a.batch),
           "--no-quality", "--format", "json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    (row,) = json.loads(proc.stdout)["rows"]
    return {"pp": float(row["pp_tps"]), "tg": float(row["tg_tps"]), "kv": row["kv_bytes"], "rss": row["peak_rss_bytes"],
            "gpu": row["gpu_mem_bytes"]}


def mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / (1 << 20):.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="a .gguf path or registry name (default: smollm2)")
    ap.add_argument("--cache-types", default="f16,q8_0,q4_0")
    ap.add_argument("--llama-bench", help="llama-bench binary or its bin folder (default: $LLAMA_BIN, PATH, the reference build)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--batch", type=int, default=512, help="-b and -ub of llama-bench, --batch-size of ggufrun")
    ap.add_argument("--ngl", type=int, default=0, help="GPU layers (99 = all)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of both tools")
    ap.add_argument("--tolerance", type=float, default=0.03)
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    a = ap.parse_args(argv)

    exe = find_tool("llama-bench", a.llama_bench)
    path = model_path(a.model)
    print(f"llama-bench: {exe}\n{path.name}: threads={a.threads} p={a.p} n={a.n} r={a.r} batch={a.batch} ngl={a.ngl} "
          f"fa=on rounds={a.rounds}\n", flush=True)
    table = []
    for kind in a.cache_types.split(","):
        runs: dict[str, list[dict[str, Any]]] = {"llama-bench": [], "ggufrun": []}
        for rnd in range(a.rounds):
            for tool in (["llama-bench", "ggufrun"] if rnd % 2 == 0 else ["ggufrun", "llama-bench"]):
                row = run_llama_bench(exe, path, a, kind) if tool == "llama-bench" else run_ggufrun(path, a, kind)
                runs[tool].append(row)
                print(f"  {kind} round {rnd + 1} {tool}: pp {row['pp']:.1f} tg {row['tg']:.1f}", file=sys.stderr, flush=True)
        ours, ref = runs["ggufrun"], runs["llama-bench"]
        entry = {"cache_type": kind, "kv_bytes": ours[0]["kv"], "rss_ggufrun": max(r["rss"] for r in ours),
                 "rss_llama_bench": max(r["rss"] for r in ref), "gpu_ggufrun": ours[0]["gpu"]}
        for test in ("pp", "tg"):
            entry[f"{test}_llama_bench"] = fmean(r[test] for r in ref)
            entry[f"{test}_ggufrun"] = fmean(r[test] for r in ours)
            entry[f"{test}_ratio"] = entry[f"{test}_ggufrun"] / entry[f"{test}_llama_bench"]
        table.append(entry)
    base_kv = table[0]["kv_bytes"] or 1
    print(f"| ctk=ctv | KV MiB (vs {table[0]['cache_type']}) | RSS MiB ggufrun / llama-bench | GPU MiB ggufrun | "
          f"pp{a.p} t/s llama-bench | ggufrun | ratio | tg{a.n} t/s llama-bench | ggufrun | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for e in table:
        flags = {t: "" if abs(e[f"{t}_ratio"] - 1) <= a.tolerance else " (off)" for t in ("pp", "tg")}
        print(f"| {e['cache_type']} | {mib(e['kv_bytes'])} ({e['kv_bytes'] / base_kv:.2f}x) | {mib(e['rss_ggufrun'])} / "
              f"{mib(e['rss_llama_bench'])} | {mib(e['gpu_ggufrun'])} | {e['pp_llama_bench']:.1f} | {e['pp_ggufrun']:.1f} | "
              f"{e['pp_ratio']:.3f}{flags['pp']} | {e['tg_llama_bench']:.1f} | {e['tg_ggufrun']:.1f} | {e['tg_ratio']:.3f}{flags['tg']} |")
    if a.json:
        a.json.write_text(json.dumps({"settings": {**vars(a), "json": str(a.json)}, "rows": table}, indent=2))
    return 0 if all(abs(e[f"{t}_ratio"] - 1) <= a.tolerance for e in table for t in ("pp", "tg")) else 1


if __name__ == "__main__":
    sys.exit(main())
