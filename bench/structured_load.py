"""Does structured output cost throughput? 16 clients, half of them constrained by a JSON schema,
against 16 unconstrained clients, on `ggufrun serve` and llama-server from the same llama.cpp.

Issue 9's bar: with half the requests constrained (response_format json_schema, a grammar
sampler per sequence), aggregate completion tokens/s stays >= 0.9x the unconstrained run. Both
phases run on the same warm server, alternating order per round so drift hits both alike;
llama-server is measured the same way in the same run. Raw per-request rows go to --json.

    python bench/structured_load.py --model M.gguf                                    # CPU, ggufrun only
    python bench/structured_load.py --model M.gguf --n-gpu-layers -1 \\
        --llama-server $LLAMA_BIN/llama-server --json results/structured_load.json     # the H100 run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from serverutil import ServerProcess

# A schema whose documents can be long, so constrained replies run to max_tokens like free ones.
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string"},
    "steps": {"type": "array", "items": {"type": "object", "properties": {"n": {"type": "integer"}, "text": {"type": "string"}},
                                         "required": ["n", "text"], "additionalProperties": False}, "maxItems": 64}},
    "required": ["title", "steps"], "additionalProperties": False}
PROMPT = "Write a detailed recipe for bread, as numbered steps."


def one(url: str, model: str, constrained: bool, max_tokens: int) -> dict[str, Any]:
    import requests

    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
                            "temperature": 0.7, "top_p": 0.95}
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "recipe", "strict": True, "schema": SCHEMA}}
    started = time.perf_counter()
    r = requests.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    elapsed = time.perf_counter() - started
    ok = r.status_code == 200
    usage = r.json().get("usage", {}) if ok else {}
    return {"constrained": constrained, "ok": ok, "status": r.status_code, "seconds": elapsed,
            "completion_tokens": usage.get("completion_tokens", 0), "error": None if ok else r.text[:300]}


def phase(url: str, model: str, clients: int, per_client: int, half: bool, max_tokens: int) -> dict[str, Any]:
    """``clients`` threads, each sending ``per_client`` requests back to back; with ``half``,
    every other client's requests carry the schema."""
    def client(i: int) -> list[dict[str, Any]]:
        return [one(url, model, half and i % 2 == 1, max_tokens) for _ in range(per_client)]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        rows = [row for rows in pool.map(client, range(clients)) for row in rows]
    wall = time.perf_counter() - started
    tokens = sum(r["completion_tokens"] for r in rows if r["ok"])
    return {"half_constrained": half, "wall_s": wall, "tokens": tokens, "tps": tokens / wall,
            "errors": sum(not r["ok"] for r in rows), "rows": rows}


def measure(name: str, server: ServerProcess, model: str, args: argparse.Namespace) -> dict[str, Any]:
    server.wait_ready(600)
    one(server.url, model, True, 8)  # warm-up, the grammar path included
    one(server.url, model, False, 8)
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for k in range(args.rounds):
        for half in ((False, True) if k % 2 == 0 else (True, False)):
            result = phase(server.url, model, args.clients, args.per_client, half, args.max_tokens)
            runs[half].append(result)
            print(f"{name}: round {k} {'half constrained' if half else 'free'}: {result['tps']:.1f} tok/s, "
                  f"{result['errors']} errors", file=sys.stderr)
    free = sum(r["tps"] for r in runs[False]) / len(runs[False])
    mixed = sum(r["tps"] for r in runs[True]) / len(runs[True])
    return {"server": name, "free_tps": free, "half_constrained_tps": mixed, "ratio": mixed / free if free else 0.0,
            "runs": {"free": runs[False], "half_constrained": runs[True]}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="GGUF file (the same file for both servers)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-client", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--n-ctx", type=int, default=2048, help="per request")
    parser.add_argument("--n-gpu-layers", default="0")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--llama-server", help="llama-server binary to measure the same way")
    parser.add_argument("--json", type=Path, help="write the summary and every request's row here")
    args = parser.parse_args()

    results = []
    served = "bench"
    ours = ServerProcess([args.model, "--served-model-name", served, "--parallel", str(args.clients), "--n-ctx", str(args.n_ctx),
                          "--n-gpu-layers", str(args.n_gpu_layers), "--threads", str(args.threads),
                          "--max-queue", str(args.clients * 2)])
    try:
        results.append(measure("ggufrun", ours, served, args))
    finally:
        ours.close()
    if args.llama_server:
        ref = ServerProcess(["-m", args.model, "-np", str(args.clients), "-c", str(args.n_ctx * args.clients),
                             "-ngl", str(args.n_gpu_layers).replace("-1", "99"), "--jinja", "--host", "127.0.0.1"]
                            + (["-t", str(args.threads)] if args.threads else []), command=[args.llama_server])
        try:
            results.append(measure("llama-server", ref, served, args))
        finally:
            ref.close()
    print("server        free tok/s   half-constrained tok/s   ratio (bar >= 0.90)")
    for r in results:
        print(f"{r['server']:<13} {r['free_tps']:>10.1f}   {r['half_constrained_tps']:>22.1f}   {r['ratio']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if all(r["ratio"] >= 0.9 for r in results if r["server"] == "ggufrun") else 1


if __name__ == "__main__":
    sys.exit(main())
