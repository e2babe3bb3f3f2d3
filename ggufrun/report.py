"""Bench results -> plain tables, CSV, JSON, Markdown and PNG plots.

Everything here is derived from the raw rows that bench.py and loadgen.py record: tokens/s of a
repetition is n_tokens / seconds, and a configuration shows the mean and sample standard
deviation of those per-repetition rates, as llama-bench reports them. No rich, no click;
pandas is not needed and matplotlib is imported only to draw plots.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__
from .bench import BenchRun, Result
from .loadgen import LoadResult

FORMATS = ("md", "csv", "json")

COLUMNS = (
    "model", "quant", "file_bytes", "n_params", "n_gpu_layers", "flash_attn", "n_ctx", "threads", "batch_size",
    "load_s", "pp_tokens", "pp_tps", "pp_tps_std", "tg_tokens", "tg_tps", "tg_tps_std", "peak_rss_bytes",
    "gpu_mem_bytes", "kl_divergence", "top1_agreement", "perplexity", "quality_reference", "quality_note", "error",
)
LOAD_COLUMNS = (
    "concurrency", "requests", "errors", "tokens", "seconds", "tokens_per_s", "requests_per_s",
    "ttft_p50_s", "ttft_p99_s", "itl_p50_ms", "itl_p99_ms", "first_error",
)


# ---- derived rows ------------------------------------------------------------------------------


def rates(result: Result, test: str) -> list[float]:
    """Tokens/s of each repetition of one test ("pp" or "tg")."""
    return [s.n_tokens / s.seconds for s in result.samples if s.test == test and s.seconds > 0]


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for one value), as llama-bench computes them."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def rows(run: BenchRun) -> list[dict[str, Any]]:
    """One flat dict per configuration, with every column of COLUMNS."""
    out = []
    for result in run.results:
        c = result.config
        pp, pp_std = mean_std(rates(result, "pp"))
        tg, tg_std = mean_std(rates(result, "tg"))
        q = run.quality.get(c.target.label)
        out.append({
            "model": c.target.label, "quant": c.target.quant, "file_bytes": result.file_bytes,
            "n_params": result.n_params, "n_gpu_layers": c.n_gpu_layers, "flash_attn": c.flash_attn,
            "n_ctx": c.n_ctx, "threads": c.threads, "batch_size": c.batch_size,
            "load_s": _r(result.load_seconds, 4), "pp_tokens": run.n_prompt, "pp_tps": _r(pp), "pp_tps_std": _r(pp_std),
            "tg_tokens": run.n_gen, "tg_tps": _r(tg), "tg_tps_std": _r(tg_std),
            "peak_rss_bytes": result.peak_rss_bytes, "gpu_mem_bytes": result.gpu_mem_bytes,
            "kl_divergence": _r(q.kl_divergence, 6) if q else None,
            "top1_agreement": _r(q.top1_agreement, 4) if q else None,
            "perplexity": _r(q.perplexity, 4) if q else None,
            "quality_reference": q.reference if q else "", "quality_note": q.note if q else "",
            "error": result.error,
        })
    return out


def samples(run: BenchRun) -> list[dict[str, Any]]:
    """The raw rows: one per timed repetition, tied to its configuration's index."""
    return [{"config": i, "model": r.config.target.label, "test": s.test, "rep": s.rep,
             "n_tokens": s.n_tokens, "seconds": s.seconds}
            for i, r in enumerate(run.results) for s in r.samples]


def _r(x: float | None, digits: int = 2) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, digits)


# ---- what a person reads ---------------------------------------------------------------------


def _size(n: int | None) -> str:
    if n is None:
        return ""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _pm(mean: float | None, std: float | None) -> str:
    return "" if mean is None else f"{mean:.2f} ± {std or 0:.2f}"


def _num(x: float | None, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def display(run: BenchRun) -> tuple[list[str], list[list[str]]]:
    """Headers and string cells for the terminal table and Markdown; columns that are empty in
    every row (GPU memory on a CPU, quality when not measured, errors) are left out."""
    spec: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("model", lambda r: r["model"]),
        ("quant", lambda r: r["quant"]),
        ("size", lambda r: _size(r["file_bytes"])),
        ("ngl", lambda r: str(r["n_gpu_layers"])),
        ("fa", lambda r: r["flash_attn"]),
        ("n_ctx", lambda r: str(r["n_ctx"])),
        ("threads", lambda r: str(r["threads"])),
        ("batch", lambda r: str(r["batch_size"])),
        ("load s", lambda r: _num(r["load_s"], ".2f")),
        (f"pp{run.n_prompt} t/s", lambda r: _pm(r["pp_tps"], r["pp_tps_std"])),
        (f"tg{run.n_gen} t/s", lambda r: _pm(r["tg_tps"], r["tg_tps_std"])),
        ("peak RSS", lambda r: _size(r["peak_rss_bytes"])),
        ("GPU mem", lambda r: _size(r["gpu_mem_bytes"])),
        ("KL div", lambda r: _num(r["kl_divergence"], ".5f") or r["quality_note"]),
        ("top-1", lambda r: "" if r["top1_agreement"] is None else f"{r['top1_agreement'] * 100:.1f}%"),
        ("PPL", lambda r: _num(r["perplexity"], ".3f")),
        ("error", lambda r: r["error"]),
    ]
    data = rows(run)
    cells = [[fn(row) for _, fn in spec] for row in data]
    keep = [i for i, (name, _) in enumerate(spec)
            if name in ("model", f"pp{run.n_prompt} t/s", f"tg{run.n_gen} t/s") or any(c[i] for c in cells)]
    return [spec[i][0] for i in keep], [[c[i] for i in keep] for c in cells]


def markdown_table(headers: Sequence[str], cells: Sequence[Sequence[Any]]) -> str:
    def esc(x: Any) -> str:
        return "" if x is None else str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(esc(x) for x in row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def csv_table(columns: Sequence[str], data: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in data:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return buf.getvalue()


# ---- bench formats ---------------------------------------------------------------------------


def to_markdown(run: BenchRun) -> str:
    headers, cells = display(run)
    note = f"\n{run.reps} repetitions after a warm-up; mean ± standard deviation of tokens/s.\n"
    if run.interrupted:
        note += "Interrupted: only the configurations above were measured.\n"
    return markdown_table(headers, cells) + note


def to_csv(run: BenchRun) -> str:
    return csv_table(COLUMNS, rows(run))


def to_dict(run: BenchRun) -> dict[str, Any]:
    return {"ggufrun": __version__, "environment": run.environment or environment(),
            "parameters": {"n_prompt": run.n_prompt, "n_gen": run.n_gen, "reps": run.reps},
            "interrupted": run.interrupted, "rows": rows(run), "samples": samples(run)}


def to_json(run: BenchRun) -> str:
    return json.dumps(to_dict(run), indent=2)


def render(run: BenchRun, fmt: str) -> str:
    """The run in one of FORMATS."""
    return {"md": to_markdown, "csv": to_csv, "json": to_json}[fmt](run)


def write(run: BenchRun, out_dir: Path) -> list[Path]:
    """bench.csv, bench.json, bench.md and the plots in ``out_dir``; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt, text in (("csv", to_csv(run)), ("json", to_json(run)), ("md", to_markdown(run))):
        path = out_dir / f"bench.{fmt}"
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written + plot(run, out_dir)


def plot(run: BenchRun, out_dir: Path) -> list[Path]:
    """tokens_per_s.png, memory.png and (with quality numbers) quality.png."""
    data = [r for r in rows(run) if not r["error"]]
    if not data:
        return []
    plt = _pyplot()
    labels = [_short_label(r, data) for r in data]
    written = []

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(data)), 4))
    x = range(len(data))
    w = 0.4
    ax.bar([i - w / 2 for i in x], [r["pp_tps"] or 0 for r in data], w, yerr=[r["pp_tps_std"] or 0 for r in data],
           label=f"pp{run.n_prompt}")
    ax.bar([i + w / 2 for i in x], [r["tg_tps"] or 0 for r in data], w, yerr=[r["tg_tps_std"] or 0 for r in data],
           label=f"tg{run.n_gen}")
    ax.set_yscale("log")
    _finish(ax, labels, "tokens/s", "Speed per configuration")
    written.append(_save(fig, plt, out_dir / "tokens_per_s.png"))

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(data)), 4))
    ax.bar([i - w / 2 for i in x], [(r["peak_rss_bytes"] or 0) / 2**20 for r in data], w, label="peak RSS")
    ax.bar([i + w / 2 for i in x], [(r["gpu_mem_bytes"] or 0) / 2**20 for r in data], w, label="GPU memory")
    _finish(ax, labels, "MiB", "Memory per configuration")
    written.append(_save(fig, plt, out_dir / "memory.png"))

    measured = {r["model"]: r for r in data if r["kl_divergence"] is not None and r["file_bytes"]}
    if measured:
        fig, ax1 = plt.subplots(figsize=(6, 4))
        pts = sorted(measured.values(), key=lambda r: r["file_bytes"])
        sizes = [r["file_bytes"] / 2**20 for r in pts]
        ax1.plot(sizes, [r["kl_divergence"] for r in pts], "o-", label="KL divergence")
        for r, s in zip(pts, sizes):
            ax1.annotate(r["quant"], (s, r["kl_divergence"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax1.set_xlabel("file size (MiB)")
        ax1.set_ylabel("mean KL divergence vs reference")
        ax2 = ax1.twinx()
        ax2.plot(sizes, [r["perplexity"] for r in pts], "s--", color="tab:orange", label="perplexity")
        ax2.set_ylabel("perplexity")
        ax1.set_title("Quality against file size")
        fig.legend(loc="upper right")
        written.append(_save(fig, plt, out_dir / "quality.png"))
    return written


def _short_label(row: dict[str, Any], data: list[dict[str, Any]]) -> str:
    """The model, plus only the settings that differ between rows."""
    parts = [str(row["quant"] or row["model"])]
    for key, tag in (("n_gpu_layers", "ngl"), ("flash_attn", "fa"), ("n_ctx", "ctx"), ("threads", "t"), ("batch_size", "b")):
        if len({r[key] for r in data}) > 1:
            parts.append(f"{tag}={row[key]}")
    if len({r["model"] for r in data}) > len({r["quant"] for r in data}):
        parts[0] = str(row["model"])
    return "\n".join(parts)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window, also without a display
    import matplotlib.pyplot as plt

    return plt


def _finish(ax: Any, labels: list[str], ylabel: str, title: str) -> None:
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()


def _save(fig: Any, plt: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- load formats ----------------------------------------------------------------------------


def load_rows(results: Sequence[LoadResult]) -> list[dict[str, Any]]:
    return [r.summary() for r in results]


def render_load(results: Sequence[LoadResult], fmt: str) -> str:
    data = load_rows(results)
    if fmt == "csv":
        return csv_table(LOAD_COLUMNS, data)
    if fmt == "json":
        return json.dumps(load_dict(results), indent=2)
    return markdown_table(LOAD_COLUMNS, [[row[k] for k in LOAD_COLUMNS] for row in data])


def load_dict(results: Sequence[LoadResult]) -> dict[str, Any]:
    first = results[0] if results else None
    return {"ggufrun": __version__, "environment": environment(load=True),
            "target": {"url": first.url, "model": first.model, "endpoint": first.endpoint} if first else {},
            "levels": [r.as_dict() for r in results]}


def write_load(results: Sequence[LoadResult], out_dir: Path) -> list[Path]:
    """load.csv, load.json, load.md and load.png (total tokens/s and TTFT against concurrency)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in FORMATS:
        path = out_dir / f"load.{fmt}"
        path.write_text(render_load(results, fmt), encoding="utf-8")
        written.append(path)
    if results:
        plt = _pyplot()
        fig, ax1 = plt.subplots(figsize=(6, 4))
        levels = [r.concurrency for r in results]
        ax1.plot(levels, [r.tokens_per_second for r in results], "o-", label="total tokens/s")
        ax1.set_xlabel("concurrent clients")
        ax1.set_ylabel("tokens/s")
        ax2 = ax1.twinx()
        ax2.plot(levels, [r.ttft(50) or 0 for r in results], "s--", color="tab:orange", label="TTFT p50 (s)")
        ax2.set_ylabel("seconds")
        ax1.set_title(f"Load against {results[0].url}")
        fig.legend(loc="upper left")
        written.append(_save(fig, plt, out_dir / "load.png"))
    return written


# ---- environment -----------------------------------------------------------------------------


def environment(load: bool = False) -> dict[str, Any]:
    """Where the numbers were measured: CPU, GPUs, llama.cpp build, versions, time.

    With ``load`` the local llama.cpp is left out (the server measured may be anything)."""
    from . import memory
    from .settings import physical_cores

    env: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ggufrun": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_cores_physical": physical_cores(),
        "cpu_cores_logical": os.cpu_count(),
        "memory_bytes": _total_memory(),
        "gpus": [{k: g[k] for k in ("name", "driver", "memory_total")} for g in memory.gpus()],
    }
    if not load:
        try:
            from importlib.metadata import version

            from . import runtime

            env["llama_cpp_python"] = version("llama_cpp_python")
            env["llama_cpp_system_info"] = runtime.system_info()
            env["llama_cpp_devices"] = runtime.gpu_info().get("devices", [])
            from .llama import ggml

            env["cpu_backend"] = ggml.cpu_backend()  # which kernels this build runs on this CPU
        except Exception as exc:  # the report still has value without the build line
            env["llama_cpp_system_info"] = f"unavailable: {exc}"
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_memory() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:
        return None
