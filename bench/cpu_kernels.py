"""Do CPU installs get this CPU's fastest kernels? `ggufrun bench` against a natively built llama-bench.

Builds nothing. Give it llama-bench built with -march=native from the same llama.cpp that
llama-cpp-python vendors (../shared/tools/build-reference-llama-cpp VERSION PREFIX, with no
GGML_NATIVE=OFF in CMAKE_ARGS), and one or more Pythons whose llama-cpp-python builds are compared
(default: this one). Each Python's `ggufrun bench FILE --format json` and llama-bench run in
alternating rounds (A B, then B A, ...) so drift in machine load falls on both alike; the ratio
is ggufrun's mean tokens/s over llama-bench's, for pp512 and tg128. It also prints which CPU
features each side's build uses (ggml's CPU backend features), so a portable build is visible.

    python bench/cpu_kernels.py --llama-bench ~/ref-native/build/bin/llama-bench \\
        --python /usr/bin/python3 --python /work/venv-native/bin/python
Exit status 1 when any ratio is further from 1 than --tolerance (default 3%).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from statistics import fmean

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import bench_row  # noqa: E402
from accuracy import model_file  # noqa: E402  (gemma3-270m from its PyPI package, or synthetic:SHAPE:QUANT)

ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
_FEATURES = "from ggufrun.llama import ggml; import json; print(json.dumps(ggml.cpu_backend()))"


def llama_bench(exe: Path, path: Path, a: argparse.Namespace) -> dict[str, float]:
    cmd = [str(exe), "-m", str(path), "-t", str(a.threads), "-p", str(a.p), "-n", str(a.n), "-r", str(a.r),
           "-ngl", "0", "-fa", a.fa, "-b", str(a.batch), "-ub", str(a.batch), "-o", "json", *shlex.split(a.llama_bench_args)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return {"pp" if t["n_gen"] == 0 else "tg": float(t["avg_ts"]) for t in json.loads(out)}


def ggufrun_bench(python: str, path: Path, a: argparse.Namespace) -> dict[str, float]:
    return bench_row([str(path), "--threads", str(a.threads), "-p", str(a.p), "-n", str(a.n), "-r", str(a.r),
                      "--n-gpu-layers", "0", "--flash-attn", a.fa, "--batch-size", str(a.batch)], python)


_LIB_FEATURES = r"""
import ctypes, sys
d = sys.argv[1]
base = ctypes.CDLL(d + "/libggml-base.so", mode=ctypes.RTLD_GLOBAL)
cpu = ctypes.CDLL(d + "/libggml-cpu.so", mode=ctypes.RTLD_GLOBAL)
cpu.ggml_backend_cpu_reg.restype = ctypes.c_void_p
base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
reg = cpu.ggml_backend_cpu_reg()
class F(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]
get = ctypes.CFUNCTYPE(ctypes.POINTER(F), ctypes.c_void_p)(base.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_get_features"))
f, i, out = get(reg), 0, []
while f[i].name:
    out.append(f[i].name.decode())
    i += 1
print(" ".join(out))
"""


def llama_bench_features(exe: Path) -> str:
    """The CPU features of the ggml beside llama-bench (a shared-library build keeps it in bin/)."""
    proc = subprocess.run([sys.executable, "-c", _LIB_FEATURES, str(exe.resolve().parent)], capture_output=True, text=True)
    return proc.stdout.strip() or f"unknown ({proc.stderr.strip()[-200:]})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-bench", required=True, type=Path, help="a natively built llama-bench (same llama.cpp)")
    ap.add_argument("--python", action="append", help="a Python whose llama-cpp-python build to measure (repeatable)")
    ap.add_argument("--model", action="append", help="path, gemma3-270m or synthetic:SHAPE:QUANT (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=5)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--fa", default="off")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tolerance", type=float, default=0.03)
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--llama-bench-args", default="", help="extra llama-bench flags, e.g. '--repack 0' on an AMX CPU, "
                    "where ggufrun keeps the AMX weight buffers off")
    a = ap.parse_args(argv)
    if not a.llama_bench.is_file():
        sys.exit(f"llama-bench not found at {a.llama_bench}.")
    pythons = a.python or [sys.executable]
    models = [model_file(m) for m in (a.model or ["gemma3-270m"])]

    print(f"llama-bench {a.llama_bench}: {llama_bench_features(a.llama_bench)}")
    for py in pythons:
        feats = subprocess.run([py, "-c", _FEATURES], capture_output=True, text=True, env=ENV)
        print(f"ggufrun with {py}: {feats.stdout.strip() or feats.stderr.strip()[-300:]}")
    print(f"threads={a.threads} p={a.p} n={a.n} r={a.r} fa={a.fa} rounds={a.rounds}\n", flush=True)

    rows = []
    for path in models:
        runs: dict[str, list[dict[str, float]]] = {"llama-bench": [], **{py: [] for py in pythons}}
        tools = list(runs)
        for rnd in range(a.rounds):
            for tool in (tools if rnd % 2 == 0 else tools[::-1]):
                res = llama_bench(a.llama_bench, path, a) if tool == "llama-bench" else ggufrun_bench(tool, path, a)
                runs[tool].append(res)
                print(f"  {path.name} round {rnd + 1} {tool}: pp {res['pp']:.1f} tg {res['tg']:.1f}", file=sys.stderr, flush=True)
        for test, n in (("pp", a.p), ("tg", a.n)):
            ref = fmean(r[test] for r in runs["llama-bench"])
            for py in pythons:
                ours = fmean(r[test] for r in runs[py])
                rows.append({"model": path.name, "test": f"{test}{n}", "python": py, "llama_bench": ref, "ggufrun": ours,
                             "ratio": ours / ref})
    print("| model | test | ggufrun's Python | native llama-bench t/s | ggufrun bench t/s | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        flag = "" if abs(r["ratio"] - 1) <= a.tolerance else " (off)"
        print(f"| {r['model']} | {r['test']} | {r['python']} | {r['llama_bench']:.2f} | {r['ggufrun']:.2f} | {r['ratio']:.3f}{flag} |")
    if a.json:
        a.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(a).items()}, "rows": rows}, indent=2))
    return 0 if all(abs(r["ratio"] - 1) <= a.tolerance for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
