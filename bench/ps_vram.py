"""Is /api/ps true to where the layers are? For each --n-gpu-layers value, start `ggufrun serve`, load the
model, read /api/ps (size: the memory estimate; size_vram: its GPU share) and measure what the server
really took: GPU memory growth (NVML, all GPUs) and the process's resident memory. Prints one row per
value with the ratios size_vram / GPU growth and size / (GPU growth + RSS).

On a CPU-only build size_vram must be 0 at every value (the script fails otherwise).

    python bench/ps_vram.py --model tiny.gguf                       # CPU: size_vram 0, size vs RSS
    python3 bench/ps_vram.py --model .gpubuild/q7-q4_k_m.gguf --ngl 0,14,-1 --n-ctx 4096   # H100
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())  # type: ignore[no-any-return]


def one(model: str, ngl: str, n_ctx: int, parallel: int, threads: int) -> dict:
    import psutil

    from ggufrun.memory import gpu_used_bytes

    before = gpu_used_bytes()
    port = free_port()
    cmd = [sys.executable, "-m", "ggufrun.cli.main", "serve", model, "--port", str(port), "--n-gpu-layers", ngl,
           "--n-ctx", str(n_ctx), "--parallel", str(parallel), "--threads", str(threads), "--served-model-name", "m"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if get(f"http://127.0.0.1:{port}/health").get("status") == "ready":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serve did not become ready (exit {proc.poll()})")
            time.sleep(0.2)
        time.sleep(0.5)
        entry = get(f"http://127.0.0.1:{port}/api/ps")["models"][0]
        after = gpu_used_bytes()
        rss = psutil.Process(proc.pid).memory_info().rss
    finally:
        proc.terminate()
        proc.wait(30)
    grown = after - before if after is not None and before is not None else None
    return {"ngl": ngl, "size": entry["size"], "size_vram": entry["size_vram"], "gpu_growth": grown, "rss": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--ngl", default="0,-1", help="comma-separated --n-gpu-layers values")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rows = [one(args.model, ngl, args.n_ctx, args.parallel, args.threads) for ngl in args.ngl.split(",")]
    mb = lambda n: "n/a" if n is None else f"{n / 1e6:.0f}"  # noqa: E731
    print(f"{'ngl':>4} {'size MB':>8} {'size_vram MB':>13} {'GPU growth MB':>14} {'RSS MB':>7} {'vram/growth':>12} {'size/used':>10}")
    for r in rows:
        ratio = f"{r['size_vram'] / r['gpu_growth']:.2f}" if r["gpu_growth"] else "n/a"
        used = (r["gpu_growth"] or 0) + r["rss"]
        print(f"{r['ngl']:>4} {mb(r['size']):>8} {mb(r['size_vram']):>13} {mb(r['gpu_growth']):>14} {mb(r['rss']):>7} "
              f"{ratio:>12} {r['size'] / used:>10.2f}")
    if all(r["gpu_growth"] is None for r in rows) and any(r["size_vram"] for r in rows):
        raise SystemExit("size_vram is not 0 on a machine without a GPU")


if __name__ == "__main__":
    main()
