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
    # one Python, two ggufrun settings (AMX guard's default, AMX forced on) against llama-bench
    python bench/cpu_kernels.py --llama-bench ... --variant default: --variant amx-on:GGUFRUN_AMX_BUFFERS=1

A run that fails (a crash) is reported and left out; the others are still measured.
Exit status 1 when any ratio is further from 1 than --tolerance (default 3%), or a run failed.
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


def ggufrun_bench(python: str, env: dict[str, str], path: Path, a: argparse.Namespace) -> dict[str, float]:
    return bench_row([str(path), "--threads", str(a.threads), "-p", str(a.p), "-n", str(a.n), "-r", str(a.r),
                      "--n-gpu-layers", "0", "--flash-attn", a.fa, "--batch-size", str(a.batch)], python, env)


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``LABEL:KEY=VALUE,KEY=VALUE`` (the part after ':' may be empty) -> (label, environment)."""
    label, _, rest = text.partition(":")
    env = dict(item.split("=", 1) for item in rest.split(",") if item.strip())
    return label or "default", env


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
    ap.add_argument("--variant", action="append", help="LABEL:KEY=VALUE,... environment for ggufrun's runs "
                    "(repeatable; default: one run as the environment is)")
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
    ap.add_argument("--llama-bench-args", default="", help="extra llama-bench flags, e.g. '--repack 0' (all extra "
                    "weight buffer types off: AMX and CPU_REPACK)")
    a = ap.parse_args(argv)
    if not a.llama_bench.is_file():
        sys.exit(f"llama-bench not found at {a.llama_bench}.")
    pythons = a.python or [sys.executable]
    variants = [parse_variant(v) for v in (a.variant or [":"])]
    models = [model_file(m) for m in (a.model or ["gemma3-270m"])]
    sides: dict[str, tuple[str, dict[str, str]]] = {}  # one ggufrun side per (Python, variant)
    for py in pythons:
        for label, env in variants:
            parts = ([py] if len(pythons) > 1 else []) + ([f"[{label}]"] if len(variants) > 1 or env else [])
            sides[" ".join(parts) or py] = (py, env)

    print(f"llama-bench {a.llama_bench}: {llama_bench_features(a.llama_bench)}")
    for name, (py, env) in sides.items():
        feats = subprocess.run([py, "-c", _FEATURES], capture_output=True, text=True, env={**ENV, **env})
        print(f"ggufrun {name}: {feats.stdout.strip() or feats.stderr.strip()[-300:]}")
    print(f"threads={a.threads} p={a.p} n={a.n} r={a.r} fa={a.fa} rounds={a.rounds}\n", flush=True)

    rows: list[dict[str, object]] = []
    failed: dict[str, str] = {}
    for path in models:
        runs: dict[str, list[dict[str, float]]] = {"llama-bench": [], **{name: [] for name in sides}}
        tools = list(runs)
        for rnd in range(a.rounds):
            for tool in (tools if rnd % 2 == 0 else tools[::-1]):
                if tool in failed:
                    continue
                try:
                    res = llama_bench(a.llama_bench, path, a) if tool == "llama-bench" else ggufrun_bench(*sides[tool], path, a)
                except (SystemExit, subprocess.CalledProcessError) as exc:
                    why = (f"exit {exc.returncode}: {(exc.stderr or '').strip()[-300:]}"
                           if isinstance(exc, subprocess.CalledProcessError) else str(exc.code)[-400:])
                    failed[tool] = why
                    print(f"  {path.name} round {rnd + 1} {tool}: FAILED ({why})", file=sys.stderr, flush=True)
                    continue
                runs[tool].append(res)
                print(f"  {path.name} round {rnd + 1} {tool}: pp {res['pp']:.1f} tg {res['tg']:.1f}", file=sys.stderr, flush=True)
        if "llama-bench" in failed:
            continue
        for test, n in (("pp", a.p), ("tg", a.n)):
            ref = fmean(r[test] for r in runs["llama-bench"])
            for name in sides:
                if name in failed:
                    continue
                ours = fmean(r[test] for r in runs[name])
                rows.append({"model": path.name, "test": f"{test}{n}", "ggufrun": name, "llama_bench_tps": ref,
                             "ggufrun_tps": ours, "ratio": ours / ref,
                             "runs": [round(r[test], 2) for r in runs[name]], "llama_bench_runs": [round(r[test], 2) for r in runs["llama-bench"]]})
    print("| model | test | ggufrun | native llama-bench t/s | ggufrun bench t/s | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = float(str(r["ratio"]))
        flag = "" if abs(ratio - 1) <= a.tolerance else " (off)"
        print(f"| {r['model']} | {r['test']} | {r['ggufrun']} | {r['llama_bench_tps']:.2f} | {r['ggufrun_tps']:.2f} | {ratio:.3f}{flag} |")
    for tool, why in failed.items():
        print(f"| {tool} | FAILED | {why} |")
    if a.json:
        a.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(a).items()}, "rows": rows, "failed": failed}, indent=2))
    ok = all(abs(float(str(r["ratio"])) - 1) <= a.tolerance for r in rows) and not failed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
