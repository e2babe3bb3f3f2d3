"""Mixed work on one `ggufrun serve`: embeddings and long prompts beside streams (issue 22's bars).

One server (``--parallel`` slots, embeddings on its generation context) is started, warmed up,
and measured, in one run:

(a) embedding a text vs prefilling it: for each size in ``--sizes`` (tokens; best of three up to 500), a
    fresh slice of a long text is sent as a completion prompt (``max_tokens`` 1: its prefill) and once to
    /v1/embeddings, both as token ids, so both cost exactly that many tokens (no prefix-cache hit:
    every prompt is a different slice). Bar: embedding / prefill <= 1.5.
(b) streams alone vs beside an embeddings batch: ``--streams`` streamed completions (ignore_eos,
    ``--max-tokens``) alone, then again while /v1/embeddings requests of ``--embed-texts`` texts of
    ``--embed-tokens`` tokens run back to back. Bar: tok/s beside / alone >= 0.7.
(c) short streams alone vs beside long prompts: the same streams while ``--long-prompts`` clients
    send ``--long-tokens``-token prompts (max_tokens 1) back to back. Bars: tok/s beside / alone >=
    0.8, and the streams' token gap p99 < 3x a plain decode step (the median gap alone).

With ``--llama-server`` (its binary or bin folder; default $LLAMA_BIN, then PATH) llama-server runs the
same mix after, on the same token ids: (a) prefill on a server with the same slots and context, embedding on
a second one (``--embeddings --pooling mean``: a server started so serves only the embedding routes), so
(b) has no llama-server counterpart; (c) as above. Its ratios are against itself alone, and the last line
compares the two servers' streams.

A stream's tok/s counts from its first token (TTFT excluded); gaps are the times between its
chunks. CPU (SmolLM2-135M, about 70 s; on a 2-core box shared with other work, ``--threads 1``: two
llama.cpp threads wait on each other at every op when one is descheduled, which makes small decodes
cost seconds and measures the neighbours, not the server). GPU: any GGUF::

    PYTHONPATH=. python bench/mixed_load.py --threads 1          # SmolLM2 (the registry's default), CPU
    python3 bench/mixed_load.py --model .gpubuild/q7-q4_k_m.gguf --n-gpu-layers -1 --threads 8 --llama-server \\
        --sizes 10,100,500,2000 --streams 12 --max-tokens 128 --long-prompts 6 --long-tokens 11000 --n-ctx 12288 \\
        --embed-texts 48 --embed-tokens 400

``--step-tokens`` is passed to serve (the per-step budget: auto or N); ``--json FILE`` keeps the numbers.
With BENCH_SERVER_LOG=FILE and GGUFRUN_STEP_PROFILE=1 the server's step profile is kept too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from reference import GGUFRUN, find_tool, free_port, model_path, server
from ggufrun.server.limits import MAX_EMBED_TOKENS

TEXT = (Path(__file__).parent / "text.txt").read_text()
STREAM_PROMPT = "Count from 1 to 500, separated by commas: 1, 2, 3,"


def tokens_of(client: httpx.Client, need: int) -> list[int]:
    """At least ``need`` token ids of the bench text (repeated), from the server's own tokeniser."""
    text = TEXT
    while True:
        r = client.post("/tokenize", json={"content": text, "add_special": False})
        r.raise_for_status()
        ids = r.json()["tokens"]
        if len(ids) >= need:
            return ids
        text += "\n" + TEXT


def stream(client: httpx.Client, max_tokens: int, out: dict[str, Any]) -> None:
    """One streamed completion; records its chunk arrival times."""
    body = {"model": "bench", "prompt": STREAM_PROMPT, "max_tokens": max_tokens, "stream": True,
            "temperature": 0, "ignore_eos": True}
    times: list[float] = []
    with client.stream("POST", "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if event.get("choices") and event["choices"][0].get("text"):
                    times.append(time.perf_counter())
    out["times"] = times


def run_streams(client: httpx.Client, n: int, max_tokens: int) -> dict[str, float]:
    """``n`` streams at once: mean tok/s per stream (from the first token) and the token gaps."""
    outs: list[dict[str, Any]] = [{} for _ in range(n)]
    threads = [threading.Thread(target=stream, args=(client, max_tokens, o)) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rates, gaps = [], []
    for o in outs:
        times = o.get("times", [])
        if len(times) < 3:
            raise RuntimeError(f"a stream returned {len(times)} chunks")
        rates.append((len(times) - 1) / (times[-1] - times[0]))
        gaps += [b - a for a, b in zip(times, times[1:])]
    gaps.sort()
    return {"tok_s": statistics.mean(rates), "gap_median_ms": 1e3 * statistics.median(gaps),
            "gap_p99_ms": 1e3 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))], "gap_max_ms": 1e3 * gaps[-1]}


def beside(client: httpx.Client, n: int, max_tokens: int, load: Any, clients: int) -> tuple[dict[str, float], int]:
    """The streams while ``clients`` threads call ``load(i)`` back to back; returns their numbers and
    how many load requests finished."""
    stop = threading.Event()
    done = [0]
    started = threading.Event()

    def worker(i: int) -> None:
        k = 0
        while not stop.is_set():
            started.set()
            load(i, k)
            done[0] += 1
            k += 1

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for w in workers:
        w.start()
    started.wait()
    time.sleep(0.2)  # the load is in the engine before the streams start
    try:
        result = run_streams(client, n, max_tokens)
    finally:
        stop.set()
        for w in workers:
            w.join()
    return result, done[0]


def embed_vs_prefill(client: httpx.Client, embedder: httpx.Client, ids: list[int], sizes: list[int]) -> list[dict[str, float]]:
    """(a): each size as a completion prompt (``max_tokens`` 1: its prefill) on ``client`` and as an
    embeddings input on ``embedder``, both as token ids; every prompt a new slice (no cached prefix)."""
    rows = []
    for i, n in enumerate(sizes):
        prefill = embed = float("inf")
        for k in range(3 if n <= 500 else 1):  # the best of three where a run is short (noise)
            slice_ = ids[i * 7 + k * 5 + n : i * 7 + k * 5 + 2 * n]
            t = time.perf_counter()
            r = client.post("/v1/completions", json={"model": "bench", "prompt": slice_, "max_tokens": 1, "temperature": 0})
            r.raise_for_status()
            prefill = min(prefill, time.perf_counter() - t)
            t = time.perf_counter()
            r = embedder.post("/v1/embeddings", json={"model": "bench", "input": [slice_]})
            r.raise_for_status()
            embed = min(embed, time.perf_counter() - t)
        rows.append({"tokens": n, "prefill_s": prefill, "embed_s": embed, "ratio": embed / prefill})
    return rows


def measure(client: httpx.Client, embedder: httpx.Client | None, ids: list[int], sizes: list[int],
            opts: argparse.Namespace) -> dict[str, Any]:
    """(a), the streams alone, (b) where ``client`` also embeds (``embedder is client``), (c)."""
    results: dict[str, Any] = {}
    if embedder is not None:
        results["embed_vs_prefill"] = embed_vs_prefill(client, embedder, ids, sizes)
    results["alone"] = run_streams(client, opts.streams, opts.max_tokens)
    base = opts.embed_tokens * opts.embed_texts

    def embed_load(i: int, k: int) -> None:
        off = (k % 3) * opts.embed_tokens
        texts = [ids[off + j * opts.embed_tokens // 2 : off + j * opts.embed_tokens // 2 + opts.embed_tokens]
                 for j in range(opts.embed_texts)]
        per = max(1, MAX_EMBED_TOKENS // opts.embed_tokens)  # what one request may carry (48 x 400 tokens was a 400)
        for start in range(0, len(texts), per):
            client.post("/v1/embeddings", json={"model": "bench", "input": texts[start : start + per]}).raise_for_status()

    if embedder is client:
        results["beside_embeddings"], results["embeddings_done"] = beside(client, opts.streams, opts.max_tokens, embed_load, 1)

    def long_load(i: int, k: int) -> None:
        off = base + 1 + (i * 97 + k * 13) % max(len(ids) - base - opts.long_tokens - 1, 1)
        prompt = ids[off : off + opts.long_tokens]
        client.post("/v1/completions", json={"model": "bench", "prompt": prompt, "max_tokens": 1,
                                             "temperature": 0}).raise_for_status()

    results["beside_long_prompts"], results["long_prompts_done"] = beside(client, opts.streams, opts.max_tokens,
                                                                           long_load, opts.long_prompts)
    return results


def report(name: str, results: dict[str, Any]) -> None:
    """Print one server's numbers against the bars."""
    print(f"\n== {name}")
    if "embed_vs_prefill" in results:
        print("(a) embedding vs prefill (bar: <= 1.5x)")
        for row in results["embed_vs_prefill"]:
            ok = "ok" if row["ratio"] <= 1.5 else "MISS"
            print(f"  {row['tokens']:>6} tokens: prefill {row['prefill_s']:7.3f} s, embed {row['embed_s']:7.3f} s, "
                  f"ratio {row['ratio']:5.2f}  {ok}")
    alone = results["alone"]
    step = alone["gap_median_ms"]

    def line(title: str, r: dict[str, float], bar: float, gap_bar: float | None) -> None:
        ratio = r["tok_s"] / alone["tok_s"]
        verdict = "ok" if ratio >= bar else "MISS"
        gap = r["gap_p99_ms"] / step
        extra = f", gap p99 {r['gap_p99_ms']:.0f} ms = {gap:.2f}x a plain step" if gap_bar else ""
        if gap_bar:
            verdict += " / ok" if gap < gap_bar else " / MISS"
        print(f"  {title}: {r['tok_s']:.1f} tok/s = {ratio:.2f}x alone (bar >= {bar}){extra}"
              f"{f' (bar < {gap_bar}x)' if gap_bar else ''}  {verdict}")

    print(f"streams alone: {alone['tok_s']:.1f} tok/s each, plain decode step (median gap) {step:.1f} ms, "
          f"gap p99 {alone['gap_p99_ms']:.0f} ms")
    if "beside_embeddings" in results:
        if results["embeddings_done"]:
            line(f"(b) beside embeddings ({results['embeddings_done']} requests)", results["beside_embeddings"], 0.7, None)
        else:  # the load failed (its thread printed why): the streams ran beside nothing
            print("  (b) beside embeddings: NOT MEASURED, no embeddings request finished")
    else:
        print("  (b) beside embeddings: n/a (llama-server serves completions or embeddings, not both: --embeddings "
              "restricts it to the embedding routes)")
    line(f"(c) beside long prompts ({results['long_prompts_done']} prompts)", results["beside_long_prompts"], 0.8, 3.0)


def llama_server_argv(binary: Path, path: Path, port: int, opts: argparse.Namespace, parallel: int,
                      embed_tokens: int = 0) -> list[str]:
    """llama-server with the same model, slots and context per slot; ``embed_tokens``: an embedding
    server instead (``--embeddings --pooling mean``, one slot, a micro-batch that holds the longest text)."""
    argv = [str(binary), "-m", str(path), "--host", "127.0.0.1", "--port", str(port), "-a", "bench", "--no-webui",
            "-ngl", str(999 if int(opts.n_gpu_layers) < 0 else opts.n_gpu_layers)]
    if opts.threads:
        argv += ["-t", str(opts.threads), "-tb", str(opts.threads)]
    if embed_tokens:
        batch = max(2048, embed_tokens)
        return argv + ["--embeddings", "--pooling", "mean", "-np", "1", "-c", str(batch), "-b", str(batch), "-ub", str(batch)]
    return argv + ["-np", str(parallel), "-c", str(opts.n_ctx * parallel)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="a .gguf path or registry name (default smollm2)")
    ap.add_argument("--n-gpu-layers", default="0")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--n-ctx", type=int, default=2304, help="context per sequence")
    ap.add_argument("--sizes", default="10,100,500,2000", help="(a): text sizes in tokens")
    ap.add_argument("--streams", type=int, default=2, help="(b), (c): streams at once")
    ap.add_argument("--max-tokens", type=int, default=48, help="(b), (c): tokens per stream")
    ap.add_argument("--embed-texts", type=int, default=2, help="(b): texts per embeddings request")
    ap.add_argument("--embed-tokens", type=int, default=200, help="(b): tokens per text")
    ap.add_argument("--long-prompts", type=int, default=1, help="(c): clients sending long prompts")
    ap.add_argument("--long-tokens", type=int, default=1000, help="(c): tokens per long prompt")
    ap.add_argument("--step-tokens", default=None, help="serve's --step-tokens (default: serve's own, auto)")
    ap.add_argument("--llama-server", nargs="?", const="", default=None, metavar="BIN",
                    help="also measure llama-server on the same mix (its binary or bin folder; default $LLAMA_BIN, PATH)")
    ap.add_argument("--json", type=Path, default=None)
    opts = ap.parse_args()
    sizes = [int(x) for x in opts.sizes.split(",")]
    path = model_path(opts.model)
    reference_bin = find_tool("llama-server", opts.llama_server or None) if opts.llama_server is not None else None
    port = free_port()
    parallel = opts.streams + opts.long_prompts
    argv = [*GGUFRUN, "serve", str(path), "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "bench",
            "--parallel", str(parallel), "--n-ctx", str(opts.n_ctx), "--n-gpu-layers", str(opts.n_gpu_layers),
            "--max-tokens", "0"]
    if opts.threads:
        argv += ["--threads", str(opts.threads)]
    if opts.step_tokens:
        argv += ["--step-tokens", opts.step_tokens]
    results: dict[str, Any] = {"argv": argv[2:]}
    began = time.perf_counter()
    with server(argv, port) as url, httpx.Client(base_url=url, timeout=600) as client:
        ids = tokens_of(client, max(sizes) * 4 + opts.long_tokens * 4 + opts.embed_tokens * opts.embed_texts + 64)
        client.post("/v1/completions", json={"model": "bench", "prompt": "Hello", "max_tokens": 4}).raise_for_status()
        client.post("/v1/embeddings", json={"model": "bench", "input": "Hello"}).raise_for_status()
        results["ggufrun"] = measure(client, client, ids, sizes, opts)
    print(f"serve {' '.join(argv[4:])}")
    report("ggufrun", results["ggufrun"])
    if reference_bin is not None:
        # The same token ids (same file, same vocabulary); embeddings from a server of their own.
        try:
            ref: dict[str, Any] = {}
            eport = free_port()
            eargv = llama_server_argv(reference_bin, path, eport, opts, parallel, embed_tokens=max(sizes))
            gport = free_port()
            gargv = llama_server_argv(reference_bin, path, gport, opts, parallel)
            with server(gargv, gport) as gurl, server(eargv, eport) as eurl, \
                    httpx.Client(base_url=gurl, timeout=600) as gen, httpx.Client(base_url=eurl, timeout=600) as emb:
                gen.post("/v1/completions", json={"model": "bench", "prompt": "Hello", "max_tokens": 4}).raise_for_status()
                emb.post("/v1/embeddings", json={"model": "bench", "input": "Hello"}).raise_for_status()
                ref = measure(gen, emb, ids, sizes, opts)
            results["llama-server"] = ref | {"argv": gargv[1:], "embed_argv": eargv[1:]}
            print(f"\nllama-server {' '.join(gargv[1:])}\nembeddings: llama-server {' '.join(eargv[1:])}")
            report("llama-server", ref)
            mine, theirs = results["ggufrun"], ref
            print("\nggufrun / llama-server: streams alone "
                  f"{mine['alone']['tok_s'] / theirs['alone']['tok_s']:.2f}x, beside long prompts "
                  f"{mine['beside_long_prompts']['tok_s'] / theirs['beside_long_prompts']['tok_s']:.2f}x "
                  f"(gap p99 {mine['beside_long_prompts']['gap_p99_ms']:.0f} vs {theirs['beside_long_prompts']['gap_p99_ms']:.0f} ms)")
        except Exception as exc:  # noqa: BLE001 -- the reference failing must not lose ggufrun's numbers
            print(f"\nllama-server: not measured ({type(exc).__name__}: {exc})")
            results["llama-server"] = {"error": str(exc)}
    results["seconds"] = time.perf_counter() - began
    print(f"\n{results['seconds']:.0f} s in all")
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
