"""`ggufrun bench` (speed, memory and quality per quant; or load against a server) and `ggufrun quantize`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import click

from ..bench import SWEEP_KEYS
from ..errors import ExitStatus
from ..settings import FIELDS
from .common import cli_settings, load_registry, settings_options

DEVICE_SETTINGS = ("rpc", "split_mode", "tensor_split", "main_gpu")
SPEC_SETTINGS = ("spec", "draft_model", "draft_max", "draft_min", "draft_p_min")  # sd columns: against no speculation


def sweep_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--n-gpu-layers, --flash-attn, --n-ctx, --threads, --batch-size, --cache-type-k/-v as comma lists;
    each value is validated by settings.coerce (in bench.parse_list), like the single-value flags elsewhere."""
    fn = click.option("--cache-types", "cache_types", default=None, metavar="LIST",
                      help="KV cache types to sweep with K and V alike, e.g. f16,q8_0,q4_0 (a quantized V turns "
                           "flash attention on unless --flash-attn off).")(fn)
    for name in reversed(SWEEP_KEYS):
        field = FIELDS[name]
        extra = " Default: -p + -n, as llama-bench." if name == "n_ctx" else ""
        flags = [f"--{name.replace('_', '-')}", *([field.short] if field.short else [])]
        fn = click.option(*flags, name, default=None, metavar="LIST",
                          help=f"{field.help} Comma list to sweep.{extra}")(fn)
    return fn


@click.command("bench")
@click.argument("name", required=False)
@click.option("--quants", metavar="LIST", help="Quants of the model to compare, e.g. q4_k_m,q5_k_m.")
@sweep_options
@click.option("-p", "--n-prompt", type=int, default=512, show_default=True, help="Prompt tokens per prompt run (pp).")
@click.option("-n", "--n-gen", type=int, default=128, show_default=True, help="Tokens per generation run (tg).")
@click.option("-r", "--repetitions", "reps", type=int, default=5, show_default=True, help="Repetitions after a warm-up.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), help="Write CSV, JSON, Markdown and PNG plots here.")
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "json"]), help="Print this format to stdout instead of a table.")
@click.option("--synthetic", metavar="SHAPE", help="Bench random-weight models of this shape (e.g. qwen2-7b), no download.")
@click.option("--reference", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Quality reference file (default: the largest file not derived from another).")
@click.option("--text", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Text for quality (default: bench/text.txt).")
@click.option("--quality/--no-quality", default=True, show_default=True, help="Measure KL divergence, top-1 agreement, perplexity.")
@click.option("--derive-from", metavar="QUANT|FILE", help="Make quants that cannot be fetched from this quant or file.")
@click.option("--url", help="Load mode: an OpenAI-compatible server to load, e.g. http://127.0.0.1:13003.")
@click.option("--model", "served_model", help="Load mode: the model name to request.")
@click.option("--concurrency", default="1,2,4,8,16", show_default=True, metavar="LIST", help="Load mode: concurrent clients per level.")
@click.option("--requests", type=int, default=64, show_default=True, help="Load mode: requests per level.")
@click.option("--max-tokens", type=int, default=64, show_default=True, help="Load mode: tokens per request.")
@click.option("--endpoint", type=click.Choice(["completions", "chat"]), default="completions", show_default=True, help="Load mode: /v1/completions or /v1/chat/completions.")
@click.option("--api-key", envvar="GGUFRUN_API_KEY", help="Load mode: bearer token (or GGUFRUN_API_KEY).")
@settings_options(*DEVICE_SETTINGS, *SPEC_SETTINGS)
@click.pass_context
def bench_command(ctx: click.Context, name: str | None, quants: str | None, **kw: Any) -> None:
    """Benchmark speed, memory and quality per quant, or load a running server.

    A registry model's [defaults] apply, as in chat and serve; the flags override them.
    Prompt processing (pp) and generation (tg) are measured as llama-bench does: warm-up, then
    -r repetitions of -p random tokens and of -n single-token decodes from an empty cache.
    Each configuration of the sweep runs in a fresh process. Ctrl-C keeps the rows measured.

    \b
    Examples:
      ggufrun bench gemma3-270m --threads 1,2 --format md
      ggufrun bench qwen2-7b --quants q4_k_m,q5_k_m --n-gpu-layers -1 --flash-attn on,off -o results/
      ggufrun bench --synthetic qwen2-7b --quants q4_k_m,q5_k_m,q8_0 --n-gpu-layers -1
      ggufrun bench gemma3-270m --cache-types f16,q8_0,q4_0 --n-ctx 8192 --no-quality
      ggufrun bench qwen2-7b --draft-model qwen2-0.5b --draft-max 8 --no-quality
      ggufrun bench --url http://127.0.0.1:13003 --model qwen2:7b --concurrency 1,2,4,8,16 --requests 64
    """
    if kw["url"]:
        given = [f"--{k.replace('_', '-')}" for k in (*DEVICE_SETTINGS, *SPEC_SETTINGS, *SWEEP_KEYS, "cache_types") if kw.get(k) is not None]
        if given:
            raise click.UsageError(f"{', '.join(given)} set(s) how a model loads here; with --url the server's own flags decide.")
        for k in (*DEVICE_SETTINGS, *SPEC_SETTINGS):
            kw.pop(k, None)
        return _load_mode(kw)
    from .. import bench, settings
    from ..bench import report

    sweeps = {key: bench.parse_list(key, kw[key]) for key in SWEEP_KEYS}
    sweeps["cache_types"] = bench.parse_list("cache_type_k", kw["cache_types"])  # each a valid K (and V) type
    bench.check_counts(kw["n_prompt"], kw["n_gen"], kw["reps"])  # before any file is fetched or made
    quant_list = [q.strip() for q in (quants or "").split(",") if q.strip()]
    err = _console(stderr=True)
    registry = None if kw["synthetic"] else load_registry(ctx)
    # The registry entry's [defaults] apply as they do in chat and serve; the sweep lists override them.
    flags = cli_settings(kw, *DEVICE_SETTINGS, *SPEC_SETTINGS)
    entry = bench.entry_defaults(name, registry)
    base = settings.resolve(entry, cli=flags)
    from ..speculative import check_tuning

    check_tuning(base, [(f"models.toml entry '{name}'", entry), ("command line", flags)])  # no sd columns would use them
    if base.draft_model:  # (--synthetic reads no models.toml otherwise)
        base = bench.draft_file(base, registry or load_registry(ctx), report=lambda msg: err.print(msg, markup=False, highlight=False))
    targets = bench.resolve_targets(name, quant_list, registry=registry, derive_from=kw["derive_from"],
                                    synthetic=kw["synthetic"], report=lambda msg: err.print(msg, markup=False, highlight=False))
    configs = bench.plan(targets, sweeps, base, kw["n_prompt"], kw["n_gen"])
    with _progress(err) as bar:
        task = bar.add_task("bench", total=len(configs) + (1 if kw["quality"] else 0))
        run = bench.run_bench(configs, base=base, n_prompt=kw["n_prompt"], n_gen=kw["n_gen"], reps=kw["reps"],
                        quality=kw["quality"], reference=kw["reference"], text=kw["text"],
                        progress=lambda done, total, what: bar.update(task, completed=done, total=total, description=what))
    _emit(kw["fmt"], lambda fmt: report.render(run, fmt), lambda: report.display(run), kw["output"],
          lambda out: report.write(run, out))
    for note in run.notes:
        err.print(note, markup=False, highlight=False, soft_wrap=True)
    for r in run.results:  # the table squeezes the reason; say it in full where a user reads errors
        if not r.ok:
            err.print(f"Error: {r.config.describe()}: {r.error}", markup=False, highlight=False, soft_wrap=True)
    if run.interrupted:
        err.print(f"Interrupted: kept {len(run.results)} of {len(configs)} configurations.")
        sys.exit(ExitStatus.INTERRUPTED)
    if any(not r.ok for r in run.results):
        sys.exit(ExitStatus.ERROR)  # the rows that were measured are shown; scripts must still see the failure


def _load_mode(kw: dict[str, Any]) -> None:
    from ..bench import load, report
    from ..errors import BenchUsageError

    if not kw["served_model"]:
        raise BenchUsageError("--url needs --model NAME (the model name the server knows).")
    try:
        levels = [int(x) for x in kw["concurrency"].split(",") if x.strip()]
    except ValueError:
        raise BenchUsageError(f"Invalid --concurrency '{kw['concurrency']}': expected a comma list of integers.") from None
    err = _console(stderr=True)
    with _progress(err) as bar:
        task = bar.add_task(f"load {kw['url']}", total=len(levels))
        results = load.sweep(kw["url"], kw["served_model"], levels, kw["requests"], max_tokens=kw["max_tokens"],
                                endpoint=kw["endpoint"], api_key=kw["api_key"],
                                on_level=lambda r: bar.advance(task))
    cols = list(report.LOAD_COLUMNS)
    _emit(kw["fmt"], lambda fmt: report.render_load(results, fmt),
          lambda: (cols, [[("" if row[c] is None else str(row[c])) for c in cols] for row in report.load_rows(results)]),
          kw["output"], lambda out: report.write_load(results, out))
    for r in results:
        failed = [s.error for s in r.samples if not s.ok]
        if failed:
            err.print(f"Error: concurrency {r.concurrency}: {len(failed)} of {len(r.samples)} requests failed; "
                      f"first: {failed[0]}", markup=False, highlight=False, soft_wrap=True)
    if len(results) < len(levels):
        err.print(f"Interrupted: kept {len(results)} of {len(levels)} levels.")
        sys.exit(ExitStatus.INTERRUPTED)
    if all(r.errors == r.requests for r in results):
        sys.exit(ExitStatus.ERROR)  # nothing got through: say so to scripts too


def _emit(fmt: str | None, render: Callable[[str], str], table: Callable[[], tuple[list[str], list[list[str]]]],
          output: Path | None, write: Callable[[Path], list[Path]]) -> None:
    """Results to stdout (a format, else a rich table); files to --output; notes to stderr."""
    if fmt:
        click.echo(render(fmt), nl=False)
    else:
        from rich.table import Table

        headers, cells = table()
        t = Table(*headers)
        for row in cells:
            t.add_row(*row)
        _console().print(t)
    if output:
        for path in write(output):
            _console(stderr=True).print(f"wrote {path}", markup=False, highlight=False)


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _progress(console: Any) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # Off when stderr is not a terminal: its refresh thread would only steal CPU from the measurement.
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


@click.command("quantize")
@click.argument("source")
@click.option("--to", "types", required=True, metavar="LIST", help="Target types, e.g. q4_0,q8_0,q4_k_m.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), help="Where to write (default: next to the source).")
@click.option("--threads", type=int, default=0, help="Quantiser threads (0 = all cores).")
@click.pass_context
def quantize_command(ctx: click.Context, source: str, types: str, out_dir: Path | None, threads: int) -> None:
    """Quantise a GGUF file (or a cached model) to other types with llama.cpp's quantiser.

    \b
    Examples:
      ggufrun quantize gemma3-270m.gguf --to q4_0,q8_0
      ggufrun quantize model-f16.gguf --to q4_k_m --out-dir quants/
    """
    from ..quantize import quantize_many

    err = _console(stderr=True)
    made = quantize_many(source, [t.strip() for t in types.split(",") if t.strip()], out_dir=out_dir,
                               registry=load_registry(ctx), threads=threads,
                               report=lambda msg: err.print(msg, markup=False, highlight=False))
    for qtype, path in made:
        click.echo(f"{qtype}\t{path.stat().st_size}\t{path}")
