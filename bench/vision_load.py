"""Images under load: `ggufrun serve --mmproj` against `llama-server --mmproj` on the same files, in one run.

Two measurements per server, each started fresh with the same flags (threads, context per
sequence, GPU layers):

* ttft:  one client, ``--repeats`` streamed chat requests in a row, each with an image it has not
  sent before (no cache helps), ``--max-tokens`` tokens: the median time to the first streamed
  token (image preprocessing, encoding and prefill included);
* load:  ``--clients`` client threads, each sending ``--requests-per-client`` requests, each with
  its own image: completion tokens per second over the wall time, and the median time to first token.

Every request is greedy with ignore_eos, so replies are exactly ``--max-tokens`` long on both (a
streamed chunk is one token on both servers). Raw rows are kept (``--json``); the ratios printed are
ggufrun / llama-server (goals on a GPU: ttft <= 1.1x, 16-client throughput >= 1.5x).

Models: ``--model``/``--mmproj``, or ``--synth SHAPE`` writes a random-weight pair with ggufrun synth:
``tiny`` (a 64-wide llama and a SmolVLM-layout projector: HTTP and Python overhead only),
``small`` (SmolLM2-135M's text shape and a 2-layer SmolVLM-layout projector at 256 px: 2x2 tiles
plus the overview, 80 image tokens; a CPU encodes a picture in a fraction of a second) or
``qwen25vl-tiny``, ``qwen25vl-small`` (Qwen2-0.5B's text shape with M-RoPE, a 2-layer Qwen2.5-VL
projector; 448 px pictures: 256 tokens), ``qwen2.5-vl-3b`` or ``qwen3-vl-2b`` (the published text and vision
shapes, for a GPU), or
``smolvlm-256m`` (SmolLM2-135M's text shape and SmolVLM-256M's SigLIP-B/16 at 512 px: 64 tokens
per tile; every picture is resized to 2048 px on its longer side, so a square one is 4x4 tiles
plus the overview, 1,088 image tokens, as in llama-server). smolvlm-256m is for a GPU: a CPU
spends a minute or more on each of its pictures (17 passes of an 86M-parameter ViT over 1,024
patches; 70 s on 2 threads here), the same in both servers, so a CPU run of the default sizes
takes the better part of an hour. The warm-up prints what one picture costs and a rough total.

On a CPU with AMX, llama-server uses llama.cpp's AMX weight buffers where ggufrun's guard may have
turned them off (`ggufrun bench` says why): the two then run different matrix kernels.

    PYTHONPATH=. python bench/vision_load.py --synth small --clients 16 --requests-per-client 1 \\
        --threads 2 --bin $LLAMA_BIN                                              # CPU, about 2 minutes
    PYTHONPATH=. python bench/vision_load.py --synth smolvlm-256m --n-gpu-layers -1 --clients 16 \\
        --bin $LLAMA_BIN --json results/vision_load-h100.json
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from reference import GGUFRUN, find_tool, free_port, server

SHAPES = {  # --synth: (text shape, projector, image side in px)
    "tiny": ("llama:layers=2,dim=64,heads=4,kv_heads=2,ff=256,vocab=512", "smolvlm-tiny", 48),
    "small": ("llama:layers=30,dim=576,heads=9,kv_heads=3,ff=1536,vocab=49152", "smolvlm-small", 512),
    "smolvlm-256m": ("llama:layers=30,dim=576,heads=9,kv_heads=3,ff=1536,vocab=49152", "smolvlm", 512),
    # Qwen2.5-VL (M-RoPE positions): any picture size, a token per 2x2 patches
    "qwen25vl-tiny": ("tiny-qwen2vl", "qwen25vl-tiny", 64),  # 64 px: 16 tokens
    "qwen25vl-small": ("qwen2vl:layers=24,dim=896,heads=14,kv_heads=2,ff=4864,vocab=151936,tied=0", "qwen25vl-small", 448),
    "qwen2.5-vl-3b": ("qwen2.5-vl-3b", "qwen25vl", 448),  # Qwen2.5-VL-3B's shapes; 448 px: 256 tokens
    "qwen3-vl-2b": ("qwen3-vl-2b", "qwen3vl", 512),  # Qwen3-VL-2B's shapes (deepstack rows 4x wide); 512 px: 256 tokens
}


def synth(shape: str, folder: Path, quant: str = "q8_0") -> tuple[Path, Path, int]:
    text, projector, side = SHAPES[shape]
    model, mmproj = folder / f"vlm-{shape}-{quant}.gguf", folder / f"mmproj-vlm-{shape}.gguf"
    if not (model.is_file() and mmproj.is_file()):
        done = subprocess.run([*GGUFRUN, "synth", "--shape", text, "--quant", quant, "--projector", projector, "--out",
                               str(model), "--mmproj-out", str(mmproj), "--force"], stdout=subprocess.DEVNULL)
        if done.returncode:  # (ggufrun synth said why on stderr, e.g. an unknown --quant)
            sys.exit(f"ggufrun synth failed for --synth {shape} --quant {quant}.")
    return model, mmproj, side


def picture(i: int, side: int) -> str:
    """A distinct PNG as a data: URL (noise seeded by ``i``: no two requests share an image)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(i).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def one_request(url: str, image: str, max_tokens: int) -> dict[str, float]:
    """A streamed chat request with one image: seconds to the first token, total, tokens received."""
    host, port = url.removeprefix("http://").split(":")
    body = {"model": "bench", "stream": True, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Describe this picture in detail."},
                                                      {"type": "image_url", "image_url": {"url": image}}]}]}
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    started = time.perf_counter()
    first, n = 0.0, 0
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {resp.read()[:300]!r}")
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("error"):  # a stream that failed is no reply of max_tokens tokens: not counted as one
                raise RuntimeError(f"{url}: the stream failed: {json.dumps(chunk['error'])[:300]}")
            delta = (chunk.get("choices") or [{}])[0].get("delta", {})
            if delta.get("content") or delta.get("reasoning_content"):
                n += 1
                if not first:
                    first = time.perf_counter() - started
    finally:
        conn.close()
    return {"ttft": first, "seconds": time.perf_counter() - started, "chunks": n}


def reply(url: str, image: str, max_tokens: int = 1) -> tuple[int, str, float]:
    """(prompt tokens, reply text, seconds) of a non-streamed greedy request with ``image``: its
    usage says what one picture costs (the same on both servers: libmtmd cuts it)."""
    host, port = url.removeprefix("http://").split(":")
    body = {"model": "bench", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Describe this picture in detail."},
                                                      {"type": "image_url", "image_url": {"url": image}}]}]}
    conn = http.client.HTTPConnection(host, int(port), timeout=1800)
    started = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {data[:300]!r}")
    finally:
        conn.close()
    got = json.loads(data)
    return int(got["usage"]["prompt_tokens"]), got["choices"][0]["message"]["content"], time.perf_counter() - started


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def measure(url: str, kind: str, opts: argparse.Namespace, side: int, seed: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    n_prompt, _, warm = reply(url, picture(seed, side))  # warm-up (graph allocation, first encode)
    # a picture is encoded whole before its first token: a long warm-up (smolvlm-256m on a CPU: 17
    # tiles of a 86M-parameter ViT, a minute or more a picture) means a long run, not a stuck one
    pictures = opts.repeats + opts.clients * opts.requests_per_client
    say(f"{kind}: {n_prompt} prompt tokens a picture; warm-up {warm:.1f} s; {pictures} more pictures "
        f"(roughly {warm * pictures / 60:.1f} min if encoding bounds them)")
    for i in range(opts.check):  # the same pictures on both servers: greedy replies should match
        rows.append({"server": kind, "step": "reply", "picture": i, "text": reply(url, picture(7 + i, side), 16)[1]})
    images = [picture(seed + 1 + i, side) for i in range(opts.repeats)]
    for i in range(opts.repeats):
        r = one_request(url, images[i], opts.max_tokens)
        rows.append({"server": kind, "step": "ttft", "clients": 1, "prompt_tokens": n_prompt, **r})
    say(f"{kind}: 1-client first tokens " + ", ".join(f"{r['ttft'] * 1e3:.0f}" for r in rows if r['step'] == 'ttft') + " ms")
    n = opts.clients * opts.requests_per_client
    images = [picture(seed + 1000 + i, side) for i in range(n)]  # made before the clock starts
    done: list[dict[str, float]] = []

    def client(c: int) -> None:
        for k in range(opts.requests_per_client):
            done.append(one_request(url, images[c * opts.requests_per_client + k], opts.max_tokens))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(opts.clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    say(f"{kind}: {len(done)} requests from {opts.clients} clients in {wall:.1f} s")
    rows.append({"server": kind, "step": "load", "clients": opts.clients, "requests": len(done), "wall": wall,
                 "tokens": opts.max_tokens * len(done), "ttft_median": statistics.median(r["ttft"] for r in done)})
    return rows


def argv(kind: str, opts: argparse.Namespace, model: Path, mmproj: Path, port: int, binary: Path | None) -> list[str]:
    clients, ngl = opts.clients, opts.n_gpu_layers
    if kind == "ggufrun":
        return [*GGUFRUN, "serve", str(model), "--mmproj", str(mmproj), "--host", "127.0.0.1", "--port", str(port),
                "--served-model-name", "bench", "--threads", str(opts.threads), "--parallel", str(clients),
                "--n-ctx", str(opts.n_ctx), "--max-queue", str(clients * opts.requests_per_client),
                "--n-gpu-layers", str(ngl), "--batch-size", str(opts.batch_size), *opts.ggufrun_args.split()]
    assert binary is not None
    return [str(binary), "-m", str(model), "--mmproj", str(mmproj), "--host", "127.0.0.1", "--port", str(port),
            "-a", "bench", "--no-webui", "-t", str(opts.threads), "-tb", str(opts.threads), "-np", str(clients),
            "-c", str(opts.n_ctx * clients), "-ngl", str(999 if ngl < 0 else ngl), "-b", str(opts.batch_size)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model"), ap.add_argument("--mmproj")
    ap.add_argument("--synth", choices=sorted(SHAPES), default=None, help="write and use a synthetic pair")
    ap.add_argument("--quant", default="q8_0", help="--synth's text weights (q4_k_m: published VLMs' usual quant, "
                    "whose token_embd rows are dequantised by ggml's own to_float)")
    ap.add_argument("--image-side", type=int, default=0, help="picture side in px (default: the shape's)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--check", type=int, default=2, help="pictures both servers answer (16 greedy tokens), compared")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--n-ctx", type=int, default=2048, help="per sequence")
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--bin", default=None, help="llama-server or its bin folder (default: $LLAMA_BIN, PATH)")
    ap.add_argument("--ggufrun-args", default="", help="more flags for ggufrun serve, e.g. '--image-encoders 1'")
    ap.add_argument("--no-reference", action="store_true", help="measure ggufrun alone")
    ap.add_argument("--json", default=None, help="write the raw rows here")
    opts = ap.parse_args()
    folder = Path(tempfile.gettempdir()) / "ggufrun-vision-bench"
    folder.mkdir(exist_ok=True)
    if opts.synth:
        model, mmproj, side = synth(opts.synth, folder, opts.quant)
    elif opts.model and opts.mmproj:
        model, mmproj, side = Path(opts.model), Path(opts.mmproj), 512
    else:
        sys.exit("Give --synth SHAPE, or --model and --mmproj.")
    side = opts.image_side or side
    binary = None if opts.no_reference else find_tool("llama-server", opts.bin)
    kinds = ["ggufrun"] + ([] if binary is None else ["llama-server"])
    rows: list[dict[str, Any]] = []
    for i, kind in enumerate(kinds):
        port = free_port()
        with server(argv(kind, opts, model, mmproj, port, binary), port) as url:
            rows += measure(url, kind, opts, side, seed=1_000_000 * (i + 1))
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps({"args": vars(opts), "rows": rows}, indent=1))
    report(rows, opts)


def report(rows: list[dict[str, Any]], opts: argparse.Namespace) -> None:
    by: dict[str, dict[str, float]] = {}
    for kind in sorted({r["server"] for r in rows}):
        ttft = statistics.median(r["ttft"] for r in rows if r["server"] == kind and r["step"] == "ttft")
        load = next(r for r in rows if r["server"] == kind and r["step"] == "load")
        by[kind] = {"ttft_s": ttft, "tok_s": load["tokens"] / load["wall"], "load_ttft_s": load["ttft_median"]}
        print(f"{kind:>12}: 1-client time to first token {ttft * 1e3:8.1f} ms | {opts.clients} clients: "
              f"{by[kind]['tok_s']:8.1f} tok/s, median first token {load['ttft_median'] * 1e3:8.1f} ms")
    if "llama-server" in by:
        texts = {k: [r["text"] for r in rows if r["server"] == k and r["step"] == "reply"] for k in by}
        same = sum(a == b for a, b in zip(texts["ggufrun"], texts["llama-server"]))
        print(f"greedy replies to the same pictures: {same} of {len(texts['ggufrun'])} equal")
        g, s = by["ggufrun"], by["llama-server"]
        print(f"ggufrun / llama-server: ttft {g['ttft_s'] / s['ttft_s']:.2f}x (goal <= 1.10), "
              f"{opts.clients}-client throughput {g['tok_s'] / s['tok_s']:.2f}x (goal >= 1.50)")


if __name__ == "__main__":
    main()
