"""Single-stream speed of speculative decoding (issue 24): ggufrun and llama-server on the same files,
each with a draft model, with n-gram lookup and without speculation, in one run.

Each configuration is a server process (`ggufrun serve ... --parallel 1`, `llama-server ... -np 1`)
sent the same greedy chat requests one at a time: an editing task (repeat a given text with a few
changes: n-gram lookup's case) and a free one (write new text: a draft model's). The generation
rate is the server's own ``timings.predicted_per_second`` (prompt excluded); acceptance is
``timings.draft_n_accepted / draft_n``, which both servers report. Speedups are against the same
server without speculation, measured in this run; rounds alternate the configurations so that a busy
neighbour slows all of them alike.

    PYTHONPATH=. python bench/spec_speed.py --target T.gguf --draft D.gguf          # CPU, 2 threads
    PYTHONPATH=. python bench/spec_speed.py --target T.gguf --draft D.gguf --ngl -1 --threads 8   # GPU host
    PYTHONPATH=. python bench/spec_speed.py --target T.gguf --no-reference          # no llama-server here

llama-server comes from $LLAMA_BIN (bench/gpu/setup.sh sets it), PATH or the reference build
(bench/reference.py), with the flags its build knows: ``-md D --spec-type draft-simple --spec-draft-n-max N
--spec-draft-p-min P`` and ``--spec-type ngram-simple`` (its own 12-token lookup, drafts of up to N) where
``--draft-max`` is gone, ``--draft-max``/``-md`` before; a build without n-gram lookup says so in its row.
``--best`` takes each configuration's best round instead of the median: on a CPU shared with other work,
which only ever slows a round down.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import urllib.request
from pathlib import Path

from reference import GGUFRUN, find_tool, free_port, model_path, server

TEXT = ("The committee met on Tuesday to review the budget for the coming year. After a long discussion, "
        "the members agreed to increase funding for the library by ten percent and to reduce spending on "
        "office supplies. The new parking rules will take effect in March, and the annual picnic will be "
        "held in the park on the first Saturday of June. Questions should be sent to the secretary by email.")
TASKS = {
    "edit": "Repeat the following text exactly, word for word, but write 'Wednesday' instead of 'Tuesday' and "
            f"'July' instead of 'June':\n\n{TEXT}",
    "free": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def ask(url: str, prompt: str, n_gen: int) -> dict[str, float]:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": n_gen, "temperature": 0,
            "seed": 1, "repeat_penalty": 1.0, "top_k": 1}
    req = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        out = json.load(resp)
    t = out.get("timings") or {}
    return {"tps": float(t.get("predicted_per_second", 0.0)), "n": float(t.get("predicted_n", 0)),
            "drafted": float(t.get("draft_n", 0)), "accepted": float(t.get("draft_n_accepted", 0))}


def configs(args: argparse.Namespace, target: Path, draft: Path | None) -> list[tuple[str, str, list[str]]]:
    """(server, mode, argv without the port) for each configuration."""
    common = ["--threads", str(args.threads), "--n-ctx", str(args.n_ctx), "--n-gpu-layers", str(args.ngl)]
    g = [*GGUFRUN, "serve", str(target), "--parallel", "1", *common]
    out = [("ggufrun", "none", g)]  # (draft tuning without a drafter, or a p-min beside n-grams, is refused)
    if draft is not None:
        out.append(("ggufrun", "draft", [*g, "--draft-model", str(draft), "--draft-max", str(args.draft_max),
                                         "--draft-p-min", str(args.draft_p_min)]))
    out.append(("ggufrun", "ngram", [*g, "--spec", "ngram", "--draft-max", str(args.draft_max)]))
    if args.llama_server is not None:
        ngl = str(99 if args.ngl < 0 else args.ngl)
        ls = [str(args.llama_server), "-m", str(target), "-np", "1", "-t", str(args.threads), "-c", str(args.n_ctx), "-ngl", ngl]
        if _new_spec_flags(args.llama_server):  # (builds since early 2026 refuse --draft-max and pick the type by flag)
            out.append(("llama-server", "none", ls))
            if draft is not None:
                out.append(("llama-server", "draft", [*ls, "-md", str(draft), "-ngld", ngl, "--spec-type", "draft-simple",
                                                      "--spec-draft-n-max", str(args.draft_max), "--spec-draft-p-min", str(args.draft_p_min)]))
            # its own lookup length (12 tokens by default), drafts as long as ours
            out.append(("llama-server", "ngram", [*ls, "--spec-type", "ngram-simple", "--spec-ngram-simple-size-m", str(args.draft_max)]))
        else:
            ls += ["--draft-max", str(args.draft_max), "--draft-p-min", str(args.draft_p_min)]
            out.append(("llama-server", "none", ls))
            if draft is not None:
                out.append(("llama-server", "draft", [*ls, "-md", str(draft), "-ngld", ngl]))
            out.append(("llama-server", "ngram", [*ls, "--spec-type", "ngram-simple"]))
    modes = {"none", *args.modes.split(",")}
    out = [c for c in out if c[1] in modes]
    return out


def _new_spec_flags(binary: Path) -> bool:
    """Whether this llama-server takes --spec-draft-n-max (and has dropped --draft-max)."""
    import subprocess

    try:
        text = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "--spec-draft-n-max" in text


def port_args(server_name: str, port: int) -> list[str]:
    return ["--port", str(port)] if server_name == "ggufrun" else ["--host", "127.0.0.1", "--port", str(port)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2", help="target model: a .gguf or a registry name")
    ap.add_argument("--draft", default=None, help="draft model (same vocabulary); omitted: n-gram rows only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ngl", type=int, default=0, help="layers offloaded, both models (-1 = all)")
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--draft-max", type=int, default=16)
    ap.add_argument("--draft-p-min", type=float, default=0.75, help="0 for random-weight pairs (ggufrun synth --inert)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--best", action="store_true", help="the best round, not the median: on a machine shared with other "
                    "work, which only ever slows a round down")
    ap.add_argument("--tasks", default="edit,free")
    ap.add_argument("--modes", default="draft,ngram", help="speculation modes beside none: draft, ngram")
    ap.add_argument("--llama-server", default=None, help="llama-server binary or bin folder")
    ap.add_argument("--no-reference", action="store_true", help="measure ggufrun only (no llama-server on this machine)")
    args = ap.parse_args()
    target = model_path(args.target)
    draft = model_path(args.draft) if args.draft else None
    args.llama_server = None if args.no_reference else find_tool("llama-server", args.llama_server)
    tasks = [t for t in args.tasks.split(",") if t]
    rows: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    failed: dict[tuple[str, str], str] = {}
    for _ in range(args.rounds):
        for name, mode, argv in configs(args, target, draft):
            if (name, mode) in failed:
                continue
            port = free_port()
            try:
                with server([*argv, *port_args(name, port)], port) as url:
                    ask(url, "Hello", 8)  # warm-up
                    for task in tasks:
                        rows.setdefault((name, mode, task), []).append(ask(url, TASKS[task], args.n_gen))
            except RuntimeError as exc:
                failed[(name, mode)] = str(exc).splitlines()[0]
    pick = max if args.best else statistics.median
    print(f"target {target.name}, draft {draft.name if draft else '-'}, threads {args.threads}, ngl {args.ngl}, "
          f"{args.n_gen} tokens, {args.rounds} rounds ({'best' if args.best else 'median'})")
    print(f"{'server':13} {'mode':6} {'task':5} {'tok/s':>8} {'speedup':>8} {'accept':>7} {'tokens':>6}")
    for (name, mode, task), samples in rows.items():
        tps = pick(s["tps"] for s in samples)
        base = rows.get((name, "none", task))
        speed = tps / pick(s["tps"] for s in base) if base else float("nan")
        drafted = sum(s["drafted"] for s in samples)
        accept = f"{sum(s['accepted'] for s in samples) / drafted:.0%}" if drafted else "-"
        print(f"{name:13} {mode:6} {task:5} {tps:8.1f} {speed:7.2f}x {accept:>7} {int(samples[-1]['n']):6d}")
    for (name, mode), why in failed.items():
        print(f"{name} {mode}: not measured ({why})")
    if args.llama_server is None:
        print("llama-server: not measured (--no-reference)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
