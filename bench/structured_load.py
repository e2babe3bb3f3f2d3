"""Structured output beside plain streams: ggufrun serve and llama-server on the same schema mix.

For each client count C (``--levels``) each server is started fresh (as serve_load.py starts it) and
measured twice with C client threads and ``--requests-per-client`` x C chat requests:

* plain: every client streams ``--max-tokens`` tokens of free text (ignore_eos), for the prompts the
  constrained requests get (an extraction request each: no prompt is shared, as none is in the mix);
* mix:   every second client asks for ``response_format`` json_schema instead, and EVERY ONE of its
  requests carries a fresh variant of one of the schemas below (property names, lengths and bounds
  numbered by the request), so that nothing a server keeps per schema helps the next request:
  extraction workloads send a schema per document. Constrained requests end where the JSON does
  (no ignore_eos: a finished structure allows only end of generation), within ``--max-tokens`` x 2.

With ``--rounds`` N, both modes run N times, alternating which goes first, and are summed.
Printed: tokens/s of each server in each mode, mix / plain (the issue 22 target: >= 0.9 at 16 and 64
clients on the GPU), and for the constrained replies how many finished ("stop") and how many of
those validate against their own schema (jsonschema); a reply cut by max_tokens is counted apart.

    PYTHONPATH=. python bench/structured_load.py --model /path/smollm2.gguf --levels 4 --servers ggufrun
    PYTHONPATH=. python bench/structured_load.py --model q7.gguf --levels 16,64 --n-gpu-layers -1 --bin $LLAMA_BIN
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from reference import free_port, find_tool, model_path, server
from serve_load import server_argv

from ggufrun.bench.load import LoadResult, run_load

PLAIN_PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
TEXT = ("Maria Lopez (maria.lopez@example.com, +1 415 555 0134), 34, signed the order #A-1042 on 2024-03-18 at "
        "14:05 for 3 desk lamps at 19.99 each and one chair at 89.50, shipped to 12 Harbor Road, Portland 97201. "
        "She rated the service 4 of 5 and asked to check the weather in Lisbon in celsius.")

SchemaFn = Callable[[int], dict[str, Any]]


def _person(n: int) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": [f"name_{n}", "age", "email", "active"],
            "properties": {f"name_{n}": {"type": "string", "maxLength": 24 + n % 16},
                           "age": {"type": "integer", "minimum": 0, "maximum": 120 + n % 7},
                           "email": {"type": "string", "pattern": "^[a-z.]+@[a-z]+\\.[a-z]{2,3}$"},
                           "active": {"type": "boolean"}}}


def _sentiment(n: int) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["label", f"score_{n}", "reasons"],
            "properties": {"label": {"enum": ["positive", "negative", "neutral", f"mixed-{n}"]},
                           f"score_{n}": {"type": "integer", "minimum": 0, "maximum": 100},
                           "reasons": {"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 1,
                                       "maxItems": 2 + n % 3}}}


def _order(n: int) -> dict[str, Any]:
    item = {"type": "object", "additionalProperties": False, "required": ["description", "quantity", "price"],
            "properties": {"description": {"type": "string", "maxLength": 30}, "quantity": {"type": "integer", "minimum": 1,
                           "maximum": 99 + n % 10}, "price": {"type": "number"}}}
    return {"type": "object", "additionalProperties": False, "required": [f"order_{n}", "customer", "items"],
            "properties": {f"order_{n}": {"type": "string", "pattern": "^[A-Z]-[0-9]{4}$"},
                           "customer": {"type": "object", "required": ["name"], "additionalProperties": False,
                                        "properties": {"name": {"type": "string", "maxLength": 32}}},
                           "items": {"type": "array", "items": item, "minItems": 1, "maxItems": 3}}}


def _event(n: int) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["title", "date", "time", f"attendees_{n}"],
            "properties": {"title": {"type": "string", "maxLength": 20 + n % 20}, "date": {"type": "string", "format": "date"},
                           "time": {"type": "string", "format": "time"},
                           f"attendees_{n}": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 4}}}


def _weather_tool(n: int) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
            "properties": {"name": {"const": f"get_weather_{n}"},
                           "arguments": {"type": "object", "additionalProperties": False, "required": ["location", "unit"],
                                         "properties": {"location": {"type": "string", "maxLength": 40},
                                                        "unit": {"enum": ["celsius", "fahrenheit"]},
                                                        "days": {"type": "integer", "minimum": 1, "maximum": 7 + n % 5}}}}}


def _tool_choice(n: int) -> dict[str, Any]:
    def call(name: str, args: dict[str, Any]) -> dict[str, Any]:
        return {"type": "object", "additionalProperties": False, "required": ["tool", "arguments"],
                "properties": {"tool": {"const": name}, "arguments": {"type": "object", "additionalProperties": False,
                                                                      "required": list(args), "properties": args}}}
    return {"anyOf": [call(f"send_email_{n}", {"to": {"type": "string", "maxLength": 40}, "subject": {"type": "string", "maxLength": 40}}),
                      call(f"create_ticket_{n}", {"title": {"type": "string", "maxLength": 40},
                                                  "priority": {"enum": ["low", "medium", "high"]}})]}


def _address(n: int) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["street", "city", "zip", f"geo_{n}"],
            "properties": {"street": {"type": "string", "maxLength": 40}, "city": {"type": "string"},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                           f"geo_{n}": {"type": "object", "additionalProperties": False, "required": ["lat", "lon"],
                                        "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}}}}}


def _review(n: int) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["id", "rating", "summary", "tags"],
            "properties": {"id": {"type": "string", "format": "uuid"},
                           "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                           "summary": {"type": "string", "minLength": 5, "maxLength": 60 + n % 9},
                           "tags": {"type": "array", "items": {"enum": ["service", "price", "shipping", f"other{n}"]},
                                    "maxItems": 3},
                           "contact": {"anyOf": [{"type": "string", "maxLength": 30}, {"type": "null"}]}}}


SCHEMAS: dict[str, SchemaFn] = {"person": _person, "sentiment": _sentiment, "order": _order, "event": _event,
                                "weather-tool": _weather_tool, "tool-choice": _tool_choice, "address": _address,
                                "review": _review}


def schema_for(number: int) -> tuple[str, dict[str, Any]]:
    """The request's schema: the mix in turn, each a variant of its own (numbered by the request)."""
    names = list(SCHEMAS)
    name = names[number % len(names)]
    return name, SCHEMAS[name](number)


def unconstrained(number: int) -> dict[str, Any]:
    """The body fields of request ``number`` without a schema: the same prompt as its constrained
    twin, so that both modes prefill alike (a prompt every request shares would be cached)."""
    name, _ = schema_for(number)
    return {"messages": [{"role": "user", "content": f"Extract the {name} from this text as JSON.\n\n{TEXT}"}]}


def constrained(number: int, max_tokens: int) -> dict[str, Any]:
    """The body fields of constrained request ``number``."""
    name, schema = schema_for(number)
    return {**unconstrained(number), "max_tokens": max_tokens,
            "response_format": {"type": "json_schema", "json_schema": {"name": f"{name}_{number}", "schema": schema, "strict": True}}}


def check(result: LoadResult, constrained_client: Callable[[int], bool], offset: int) -> dict[str, Any]:
    """Counts over the constrained replies: finished, finished and valid against their schema
    (request ``number + offset``'s), cut."""
    import jsonschema

    done = valid = cut = 0
    bad: list[str] = []
    for s in result.samples:
        if not (s.ok and constrained_client(s.client)):
            continue
        if s.finish_reason != "stop":
            cut += 1
            continue
        done += 1
        try:
            jsonschema.validate(json.loads(s.text), schema_for(s.number + offset)[1])
            valid += 1
        except (ValueError, jsonschema.ValidationError) as exc:
            bad.append(f"{schema_for(s.number + offset)[0]}: {str(exc)[:100]} in {s.text[:120]!r}")
    return {"finished": done, "valid": valid, "cut": cut, "invalid_examples": bad[:3]}


def measure(kind: str, opts: argparse.Namespace, path: Path, clients: int, bin_path: Path | None) -> list[dict[str, Any]]:
    port = free_port()
    sopts = argparse.Namespace(**{**vars(opts), "json_schema_half": True})
    rows = []
    plain = {"temperature": 0.0, "ignore_eos": True} if opts.sampling == "greedy" else \
        {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "ignore_eos": True}
    cmax = opts.max_tokens * 2

    with server(server_argv(kind, sopts, path, clients, port, bin_path or Path("llama-server")), port) as url:
        # warm-up: page faults, and what a server builds once per model (ggufrun's vocabulary index)
        run_load(url, "bench", 1, 1, max_tokens=8, prompt=PLAIN_PROMPT, endpoint="chat")
        run_load(url, "bench", 1, 1, max_tokens=8, endpoint="chat", variants=[lambda n: constrained(n + 99_999, 8)])
        totals: dict[str, dict[str, Any]] = {m: {"tokens": 0, "seconds": 0.0, "errors": 0, "first_error": "", "finished": 0,
                                                 "valid": 0, "cut": 0, "invalid_examples": []} for m in ("plain", "mix")}
        for rnd in range(opts.rounds):  # alternating which mode goes first: a busy neighbour slows both alike
            offset = 10_000 * clients + 1_000 * rnd  # no variant repeats across rounds or levels

            def fresh(number: int, offset: int = offset) -> dict[str, Any]:
                return {**constrained(number + offset, cmax), "ignore_eos": False}

            def free(number: int, offset: int = offset) -> dict[str, Any]:
                return unconstrained(number + offset)

            for mode in ("plain", "mix") if rnd % 2 == 0 else ("mix", "plain"):
                variants = [free] if mode == "plain" else [fresh, free]
                result = run_load(url, "bench", clients, opts.requests_per_client * clients, max_tokens=opts.max_tokens,
                                  prompt=PLAIN_PROMPT, endpoint="chat", params=plain, variants=variants, keep_text=True)
                t = totals[mode]
                t["tokens"] += result.total_tokens
                t["seconds"] += result.seconds
                t["errors"] += result.errors
                t["first_error"] = t["first_error"] or result.summary()["first_error"]
                if mode == "mix":
                    for key, value in check(result, lambda c: c % 2 == 0, offset).items():
                        t[key] += value
        for mode, t in totals.items():
            r = {"server": kind, "clients": clients, "mode": mode, "tokens_per_s": t["tokens"] / t["seconds"], **t}
            rows.append(r)
            print(f"  {kind:12s} clients={clients:3d} {mode:5s} {r['tokens_per_s']:8.1f} tok/s  errors {r['errors']} "
                  f"{r['first_error'][:120]}" + (f"  constrained: {r['valid']}/{r['finished']} finished valid, "
                                                 f"{r['cut']} cut {r['invalid_examples'][:3]}" if mode == "mix" else ""),
                  file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m", help="registry name or .gguf path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--levels", default="4", help="client counts, comma list (on a GPU 16,64)")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="plain and mix this many times each, alternating")
    ap.add_argument("--max-tokens", type=int, default=64, help="plain streams' length; constrained ones get twice it")
    ap.add_argument("--sampling", choices=["greedy", "sampled"], default="greedy")
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--flash-attn", choices=["on", "off", "auto"], default=None)
    ap.add_argument("--bin", default=None, help="llama.cpp bin folder with llama-server")
    ap.add_argument("--ggufrun-args", default="")
    ap.add_argument("--llama-server-args", default="")
    ap.add_argument("--servers", default="ggufrun,llama-server")
    ap.add_argument("--json", default=None, help="write every row to this file")
    opts = ap.parse_args()
    levels = [int(x) for x in opts.levels.split(",")]
    kinds = opts.servers.split(",")
    bin_path = find_tool("llama-server", opts.bin) if "llama-server" in kinds else None
    path = model_path(opts.model)
    print(f"model {path.name}, {opts.threads} threads, levels {levels}, schemas: {', '.join(SCHEMAS)}", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    for i, clients in enumerate(levels):
        for kind in kinds if i % 2 == 0 else kinds[::-1]:
            rows += measure(kind, opts, path, clients, bin_path)
    print("\n| server | clients | plain tok/s | mix tok/s | mix / plain | constrained finished valid | cut |")
    print("|---|---|---|---|---|---|---|")
    for kind in kinds:
        for clients in levels:
            p = next(r for r in rows if (r["server"], r["clients"], r["mode"]) == (kind, clients, "plain"))
            m = next(r for r in rows if (r["server"], r["clients"], r["mode"]) == (kind, clients, "mix"))
            ratio = m["tokens_per_s"] / p["tokens_per_s"] if p["tokens_per_s"] else float("nan")
            print(f"| {kind} | {clients} | {p['tokens_per_s']:.1f} | {m['tokens_per_s']:.1f} | {ratio:.2f} | "
                  f"{m['valid']}/{m['finished']} | {m['cut']} |")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"model": str(path), "levels": levels, "rows": rows}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
