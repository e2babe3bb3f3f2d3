"""`ggufrun serve` against llama-server and llama-batched-bench, on the same file, in one run.

For each client count C (``--levels``): ggufrun serve --parallel C and llama-server -np C are each
started fresh with the same flags (threads, context per sequence, GPU layers, flash attention), warmed
up with one request, then sent ``--requests-per-client`` x C streamed ``--max-tokens``-token requests
from C client threads (ggufrun.bench.load), once per mode:

* greedy:  temperature 0;
* sampled: temperature 0.8, top_p 0.95 (top_k 40, min_p 0.05 sent explicitly, so both servers run
  the same sampler chain);
* with ``--json-schema-half``, each of those again with half of the clients (every second client
  thread) asking for ``response_format`` json_schema (issue 9's benchmark; chat endpoint for all).

Every request sets ignore_eos, so every stream is exactly ``--max-tokens`` long on both servers.
The two servers alternate which goes first at each level, so that a busy neighbour slows both
alike. llama-batched-bench (``-npp 128 -ntg MAX_TOKENS -npl LEVELS``) gives the kernel ceiling:
its generation tokens/s with C sequences decoded together, no HTTP, no sampling.

Printed (pandas tables, Markdown): aggregate tokens/s per server, ggufrun / llama-server, each
against the batched-bench ceiling, sampled / greedy per server, and json-half / unconstrained.

    PYTHONPATH=. python bench/serve_load.py --levels 1,4                 # gemma3-270m, CPU
    PYTHONPATH=. python bench/serve_load.py --model q7.gguf --levels 16,64 --n-gpu-layers -1 \\
        --bin $LLAMA_BIN --json-schema-half --json results/serve_load.json
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from reference import GGUFRUN, find_tool, free_port, model_path, server

from ggufrun.bench.load import LoadResult, run_load

COMPLETION_PROMPT = "Count from 1 to 300, separated by commas: 1, 2, 3,"  # a base model keeps going
CHAT_PROMPT = 'Count from 1 to 300. Answer in JSON, as {"numbers": [1, 2, 3, ...]}.'
N_CTX = 1024  # per sequence, on both servers: prompt + 64 generated tokens with room to spare
GREEDY = {"temperature": 0.0}
SAMPLED = {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05}
SCHEMA = {  # at least 64 integers: a constrained stream cannot end before --max-tokens
    "type": "object",
    "properties": {"numbers": {"type": "array", "items": {"type": "integer"}, "minItems": 64}},
    "required": ["numbers"],
}
JSON_START = re.compile(r'\s*\{\s*"numbers"\s*:\s*\[\s*-?\d')  # the start of what SCHEMA allows
JSON_FORMAT = {"response_format": {"type": "json_schema", "json_schema": {"name": "numbers", "schema": SCHEMA}}}


def server_argv(kind: str, opts: argparse.Namespace, path: Path, clients: int, port: int, bin_path: Path) -> list[str]:
    """The same settings, in each server's flags."""
    ngl = opts.n_gpu_layers
    if kind == "ggufrun":
        argv = [*GGUFRUN, "serve", str(path), "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "bench",
                "--threads", str(opts.threads), "--parallel", str(clients), "--n-ctx", str(N_CTX),
                "--max-queue", str(opts.requests_per_client * clients), "--n-gpu-layers", str(ngl)]
        return argv + (["--flash-attn", opts.flash_attn] if opts.flash_attn else []) + shlex.split(opts.ggufrun_args)
    argv = [str(bin_path), "-m", str(path), "--host", "127.0.0.1", "--port", str(port), "-a", "bench", "--no-webui",
            "-t", str(opts.threads), "-tb", str(opts.threads), "-np", str(clients), "-c", str(N_CTX * clients),
            "-ngl", str(999 if ngl < 0 else ngl)]
    return argv + (["-fa", opts.flash_attn] if opts.flash_attn else []) + shlex.split(opts.llama_server_args)


def modes(opts: argparse.Namespace) -> list[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """(name, sampling params, per-client variants) for each measured mode."""
    out = []
    for sampling in opts.sampling.split(","):
        params = {**(GREEDY if sampling == "greedy" else SAMPLED), "ignore_eos": True}
        out.append((sampling, params, [{}]))
        if opts.json_schema_half:
            out.append((f"{sampling}+json-half", params, [JSON_FORMAT, {}]))
    return out


def measure_server(kind: str, opts: argparse.Namespace, path: Path, clients: int, bin_path: Path) -> list[dict[str, Any]]:
    """Start one server for ``clients`` and measure every mode on it: one row per mode."""
    port = free_port()
    endpoint = "chat" if opts.json_schema_half else "completions"
    prompt = CHAT_PROMPT if endpoint == "chat" else COMPLETION_PROMPT
    rows = []
    with server(server_argv(kind, opts, path, clients, port, bin_path), port) as url:
        run_load(url, "bench", 1, 1, max_tokens=8, prompt=prompt, endpoint=endpoint)  # warm-up: page faults, caches
        if opts.json_schema_half:  # and what a server does once for its first grammar (ggufrun indexes the vocabulary)
            run_load(url, "bench", 1, 1, max_tokens=8, prompt=prompt, endpoint=endpoint, variants=[JSON_FORMAT])
        for name, params, variants in modes(opts):
            result = run_load(url, "bench", clients, opts.requests_per_client * clients, max_tokens=opts.max_tokens,
                              prompt=prompt, endpoint=endpoint, params=params, variants=variants,
                              keep_text=len(variants) > 1)
            rows.append(row(kind, name, result))
            print(f"  {kind:12s} clients={clients:3d} {name:18s} {rows[-1]['tokens_per_s']:8.1f} tok/s  "
                  f"ttft p50 {rows[-1]['ttft_p50_s']}s  errors {rows[-1]['errors']} {rows[-1]['first_error'][:120]}"
                  + (f"  constrained replies that are the schema's JSON: {rows[-1]['json_valid']}" if rows[-1]["json_valid"] else ""),
                  file=sys.stderr)
    return rows


def row(kind: str, mode: str, result: LoadResult) -> dict[str, Any]:
    """One measured mode; for json-half, how many constrained replies really are the schema's JSON
    (a server that ignored response_format would look fast here and fail this count)."""
    constrained = [s for s in result.samples if s.ok and s.client % 2 == 0] if "json-half" in mode else []
    valid = sum(bool(JSON_START.match(s.text)) for s in constrained)
    return {"server": kind, "mode": mode, "clients": result.concurrency, **result.summary(),
            "json_valid": f"{valid}/{len(constrained)}" if constrained else "",
            "samples": [s.__dict__ for s in result.samples]}


def batched_bench(tool: Path, opts: argparse.Namespace, path: Path, levels: list[int]) -> list[dict[str, Any]]:
    """llama-batched-bench's rows (jsonl), one per level; generation tokens/s is ``speed_tg``."""
    n_pp = 128
    argv = [str(tool), "-m", str(path), "-c", str(max(levels) * (n_pp + opts.max_tokens) + 64), "-b", "2048",
            "-ub", "512", "-npp", str(n_pp), "-ntg", str(opts.max_tokens), "-npl", ",".join(map(str, levels)),
            "-t", str(opts.threads), "-tb", str(opts.threads), "-ngl", str(999 if opts.n_gpu_layers < 0 else opts.n_gpu_layers),
            "--output-format", "jsonl"]
    if opts.flash_attn:
        argv += ["-fa", opts.flash_attn]
    print("  " + " ".join(argv), file=sys.stderr)
    done = subprocess.run(argv, capture_output=True, text=True)
    found = [json.loads(line) for line in (done.stdout + "\n" + done.stderr).splitlines() if line.startswith("{")]
    if done.returncode != 0 or not found:
        print(f"  llama-batched-bench failed ({done.returncode}): {done.stderr.strip()[-400:]}", file=sys.stderr)
    return found


def tables(rows: list[dict[str, Any]], ceiling: dict[int, float]) -> dict[str, Any]:
    """The side-by-side tables, as pandas DataFrames."""
    import pandas as pd

    df = pd.DataFrame([{k: v for k, v in r.items() if k != "samples"} for r in rows])
    wide = df.pivot_table(index=["clients", "mode"], columns="server", values="tokens_per_s", aggfunc="first")
    out: dict[str, Any] = {}
    main = pd.DataFrame(index=wide.index)
    for kind in ("ggufrun", "llama-server"):
        main[f"{kind} tok/s"] = wide[kind] if kind in wide else float("nan")
    main["ggufrun / llama-server"] = main["ggufrun tok/s"] / main["llama-server tok/s"]
    if ceiling:
        main["batched-bench tg tok/s"] = [ceiling.get(c) for c, _ in main.index]
        for kind in ("ggufrun", "llama-server"):
            main[f"{kind} / ceiling"] = main[f"{kind} tok/s"] / main["batched-bench tg tok/s"]
    errors = df.pivot_table(index=["clients", "mode"], columns="server", values="errors", aggfunc="first")
    main["failed (ggufrun / llama-server)"] = [f"{errors.loc[i].get('ggufrun', '')} / {errors.loc[i].get('llama-server', '')}"
                                               for i in main.index]
    if df["json_valid"].astype(bool).any():
        valid = df.pivot_table(index=["clients", "mode"], columns="server", values="json_valid", aggfunc="first")
        main["valid JSON (ggufrun / llama-server)"] = [f"{valid.loc[i].get('ggufrun', '')} / {valid.loc[i].get('llama-server', '')}"
                                                       for i in main.index]
    out["throughput"] = main
    by_mode = wide.unstack("mode")
    if {"greedy", "sampled"} <= set(df["mode"]):
        out["sampled / greedy"] = pd.DataFrame({k: by_mode[(k, "sampled")] / by_mode[(k, "greedy")]
                                                for k in ("ggufrun", "llama-server") if k in wide})
    half = sorted({m for m in df["mode"] if m.endswith("+json-half")})
    if half:  # a ratio counts only where every constrained reply was the schema's JSON
        valid = df.set_index(["server", "clients", "mode"])["json_valid"]

        def ratio(kind: str, mode: str) -> list[Any]:
            free = mode.split("+")[0]
            return [f"n/a ({valid[(kind, c, mode)]} valid JSON)" if not _all_valid(valid[(kind, c, mode)])
                    else by_mode.loc[c, (kind, mode)] / by_mode.loc[c, (kind, free)] for c in by_mode.index]

        out["json-half / unconstrained"] = pd.DataFrame(
            {f"{k} {m.split('+')[0]}": ratio(k, m) for m in half for k in ("ggufrun", "llama-server") if k in wide},
            index=by_mode.index)
    return out


def _all_valid(count: str) -> bool:
    """'4/4' -> True; '0/4', or '' (no constrained request got through) -> False."""
    done, _, total = count.partition("/")
    return bool(total) and done == total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m", help="registry name or .gguf path (default: gemma3-270m)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--levels", default="1,4", help="client counts, comma list (default 1,4; on a GPU 1,16,64)")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--sampling", default="greedy,sampled", help="greedy, sampled or both (default both)")
    ap.add_argument("--json-schema-half", action="store_true",
                    help="also measure each sampling with half of the clients sending response_format json_schema")
    ap.add_argument("--n-gpu-layers", type=int, default=0, help="-1 = all (GPU builds), on every tool")
    ap.add_argument("--flash-attn", choices=["on", "off", "auto"], default=None, help="on every tool (default: each one's own)")
    ap.add_argument("--bin", default=None, help="llama.cpp bin folder with llama-server and llama-batched-bench")
    ap.add_argument("--ggufrun-args", default="", help="extra serve flags, e.g. '--split-mode layer --tensor-split 1,1'")
    ap.add_argument("--llama-server-args", default="", help="the same for llama-server, e.g. '-sm layer -ts 1,1'")
    ap.add_argument("--no-batched-bench", action="store_true", help="skip the llama-batched-bench ceiling")
    ap.add_argument("--servers", default="ggufrun,llama-server", help="which servers to measure (default both)")
    ap.add_argument("--json", default=None, help="write every row (and every request) to this file")
    opts = ap.parse_args()
    if any(s not in ("greedy", "sampled") for s in opts.sampling.split(",")):
        ap.error(f"--sampling takes greedy and/or sampled, not {opts.sampling!r}")
    try:
        levels = [int(x) for x in opts.levels.split(",")]
    except ValueError:
        ap.error(f"--levels takes a comma list of integers, not {opts.levels!r}")

    server_bin = find_tool("llama-server", opts.bin)
    path = model_path(opts.model)
    print(f"model {path.name}, {opts.threads} threads, {opts.max_tokens}-token streams, levels {levels}; "
          f"llama-server: {server_bin}", file=sys.stderr)
    ceiling_rows = [] if opts.no_batched_bench else batched_bench(find_tool("llama-batched-bench", opts.bin), opts, path, levels)
    ceiling = {int(r["pl"]): float(r["speed_tg"]) for r in ceiling_rows}

    rows: list[dict[str, Any]] = []
    for i, clients in enumerate(levels):
        for kind in ("ggufrun", "llama-server") if i % 2 == 0 else ("llama-server", "ggufrun"):
            if kind in opts.servers.split(","):
                rows += measure_server(kind, opts, path, clients, server_bin)

    import pandas as pd

    with pd.option_context("display.width", 200):
        for title, table in tables(rows, ceiling).items():
            print(f"\n{title}:\n")
            flat = table.reset_index()
            flat["clients"] = flat["clients"].astype(int).astype(str)  # not "16.00"
            print(flat.to_markdown(index=False, floatfmt=".2f"))
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        doc = {"model": str(path), "threads": opts.threads, "levels": levels, "max_tokens": opts.max_tokens,
               "n_gpu_layers": opts.n_gpu_layers, "batched_bench": ceiling_rows, "rows": rows}
        Path(opts.json).write_text(json.dumps(doc, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
