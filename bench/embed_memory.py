"""Memory of `ggufrun serve` with embeddings on and off: the embedder must not load the weights again.

For each setting a fresh server (one model, from a serve config) gets one chat request; then the
server's RSS (psutil) and, where `nvidia-smi` exists, the GPU memory it holds are read; with embeddings
on, again after one embedding batch (the memory that serving such a request leaves behind). Embeddings run on the generation context itself, in one extra sequence
(chunks of a few dozen tokens, so its buffers do not grow): the difference should be only that
sequence's KV cells (--batch-size of them), not a second context or a second copy of the model.

    PYTHONPATH=. python bench/embed_memory.py --model gemma3-270m
    PYTHONPATH=. python3 bench/embed_memory.py --model .gpubuild/q7.gguf --n-gpu-layers -1     # on a GPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from reference import GGUFRUN, free_port, model_path


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def _gpu_mib(pid: int) -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    used = [float(m) for p, m in (line.split(",") for line in out.splitlines() if "," in line) if int(p) == pid]
    return sum(used) if used else 0.0


def measure(path: Path, embeddings: bool, opts: argparse.Namespace) -> dict:
    import psutil

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "serve.toml"
        config.write_text(f'[[models]]\nmodel = "{path}"\nserved_model_name = ["m"]\nembeddings = {str(embeddings).lower()}\n'
                          f'n_gpu_layers = {opts.n_gpu_layers}\nthreads = {opts.threads}\nn_ctx = 2048\n')
        proc = subprocess.Popen([*GGUFRUN, "serve", "--config", str(config), "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    urllib.request.urlopen(f"{url}/health", timeout=2)
                    break
                except OSError:
                    time.sleep(0.5)
            _post(f"{url}/v1/chat/completions", {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})
            time.sleep(1)
            out = {"embeddings": embeddings, "rss_mb": round(psutil.Process(proc.pid).memory_info().rss / 2**20, 1),
                   "gpu_mib": _gpu_mib(proc.pid)}
            if embeddings:  # and after a batch: what serving one request of 48 texts leaves behind
                texts = [f"sentence number {i} about rivers and mountains" for i in range(48)]
                _post(f"{url}/v1/embeddings", {"model": "m", "input": texts})
                time.sleep(1)
                out["rss_mb_after_batch"] = round(psutil.Process(proc.pid).memory_info().rss / 2**20, 1)
                out["gpu_mib_after_batch"] = _gpu_mib(proc.pid)
            return out
        finally:
            proc.terminate()
            proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--n-gpu-layers", default="0")
    ap.add_argument("--threads", type=int, default=2)
    opts = ap.parse_args()
    path = model_path(opts.model)
    rows = [measure(path, False, opts), measure(path, True, opts)]
    for r in rows:
        print(r)
    off, on = rows
    gpu = on["gpu_mib"] is not None and off["gpu_mib"] is not None
    print(f"embeddings on / off, same chat request: RSS {on['rss_mb'] / off['rss_mb']:.3f}x (+{on['rss_mb'] - off['rss_mb']:.1f} MB)"
          + (f", GPU +{on['gpu_mib'] - off['gpu_mib']:.0f} MiB" if gpu else ""))
    print(f"then a 48-text embedding batch: RSS +{on['rss_mb_after_batch'] - on['rss_mb']:.1f} MB"
          + (f", GPU +{on['gpu_mib_after_batch'] - on['gpu_mib']:.0f} MiB" if gpu else ""))


if __name__ == "__main__":
    main()
