"""Bench results as pandas DataFrames, and the CSV, JSON, Markdown and PNG made from them.

Everything here is derived from the raw rows that the worker and the load generator record:
tokens/s of a repetition is n_tokens / seconds, and a configuration shows the mean and sample
standard deviation of those per-repetition rates, as llama-bench reports them. No rich, no click;
matplotlib is imported only to draw plots.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .. import __version__
from .load import LoadResult
from .plan import BenchRun

if TYPE_CHECKING:
    import pandas as pd

FORMATS = ("md", "csv", "json")

SETTING_COLUMNS = ("n_gpu_layers", "flash_attn", "n_ctx", "threads", "batch_size", "cache_type_k", "cache_type_v")
COLUMNS = (
    "model", "quant", "file_bytes", "n_params", *SETTING_COLUMNS,
    "load_s", "pp_tokens", "pp_tps", "pp_tps_std", "tg_tokens", "tg_tps", "tg_tps_std", "peak_rss_bytes",
    "gpu_mem_bytes", "kv_bytes", "spec", "spec_acceptance", "sd_tps", "sd_speedup", "kl_divergence", "top1_agreement", "perplexity", "quality_reference", "quality_note", "error",
)
SAMPLE_COLUMNS = ("config", "model", "test", "rep", "n_tokens", "seconds")
LOAD_COLUMNS = (
    "concurrency", "requests", "errors", "tokens", "seconds", "tokens_per_s", "requests_per_s",
    "ttft_p50_s", "ttft_p99_s", "itl_p50_ms", "itl_p99_ms", "first_error",
)
_ROUND = {"load_s": 4, "pp_tps": 2, "pp_tps_std": 2, "tg_tps": 2, "tg_tps_std": 2, "kl_divergence": 6,
          "top1_agreement": 4, "perplexity": 4, "spec_acceptance": 4, "sd_tps": 2, "sd_speedup": 3}


# ---- frames ------------------------------------------------------------------------------------


def samples_frame(run: BenchRun) -> "pd.DataFrame":
    """The raw rows: one per timed repetition, tied to its configuration's index."""
    import pandas as pd

    data = [{"config": i, "model": r.config.target.label, "test": s.test, "rep": s.rep,
             "n_tokens": s.n_tokens, "seconds": s.seconds}
            for i, r in enumerate(run.results) for s in r.samples]
    return pd.DataFrame(data, columns=list(SAMPLE_COLUMNS))


def frame(run: BenchRun) -> "pd.DataFrame":
    """One row per configuration with every column of COLUMNS; missing values are <NA>."""
    import pandas as pd

    base = []
    for result in run.results:
        c = result.config
        q = run.quality.get(c.target.label)
        base.append({
            "model": c.target.label, "quant": c.target.quant, "file_bytes": result.file_bytes,
            "n_params": result.n_params, **{k: getattr(c, k) for k in SETTING_COLUMNS},
            "load_s": result.load_seconds, "pp_tokens": run.n_prompt, "tg_tokens": run.n_gen,
            "peak_rss_bytes": result.peak_rss_bytes, "gpu_mem_bytes": result.gpu_mem_bytes, "kv_bytes": result.kv_bytes,
            "spec": result.spec, "spec_acceptance": result.spec_acceptance,
            "kl_divergence": q.kl_divergence if q else None, "top1_agreement": q.top1_agreement if q else None,
            "perplexity": q.perplexity if q else None, "quality_reference": q.reference if q else "",
            "quality_note": q.note if q else "", "error": result.error,
        })
    df = pd.DataFrame(base, columns=[c for c in COLUMNS if not c.endswith(("_tps", "_tps_std", "sd_speedup"))])
    raw = samples_frame(run)
    raw = raw[raw["seconds"] > 0].assign(tps=lambda d: d["n_tokens"] / d["seconds"])
    stats = raw.groupby(["config", "test"])["tps"].agg(["mean", "std", "count"])
    stats.loc[stats["count"] == 1, "std"] = 0.0  # llama-bench shows ± 0 for one repetition
    for test in ("pp", "tg"):
        part = stats.xs(test, level="test") if test in stats.index.get_level_values("test") else stats.iloc[:0]
        df[f"{test}_tps"] = part["mean"].reindex(df.index)
        df[f"{test}_tps_std"] = part["std"].reindex(df.index)
    # Speculative generation against the same model without it, both measured in one worker.
    mean = stats["mean"].unstack("test") if not stats.empty else pd.DataFrame()
    sd, plain = (mean[t].reindex(df.index) if t in mean else pd.Series(float("nan"), index=df.index) for t in ("sd", "sd-base"))
    df["sd_tps"], df["sd_speedup"] = sd, sd / plain
    df = df[list(COLUMNS)].round(_ROUND)
    return df.convert_dtypes()


def rows(run: BenchRun) -> list[dict[str, Any]]:
    """frame(run) as plain dicts, None for missing values."""
    return _records(frame(run))


def _records(df: "pd.DataFrame") -> list[dict[str, Any]]:
    return [{str(k): _plain(v) for k, v in row.items()} for row in df.astype(object).to_dict("records")]


def _plain(x: Any) -> Any:
    import pandas as pd

    if x is None or (not isinstance(x, (str, list, dict)) and pd.isna(x)):
        return None
    return x.item() if hasattr(x, "item") else x


def quant_comparison(run: BenchRun) -> "pd.DataFrame":
    """Quants side by side (a pandas pivot): one row per file, smallest first, with its size and
    quality, and pp/tg tokens/s under each combination of the settings that were swept."""
    df = frame(run)
    ok = df[df["error"] == ""]
    if ok.empty:
        return ok
    vary = [k for k in SETTING_COLUMNS if ok[k].nunique() > 1]
    speed = ok.pivot_table(index=["model", "quant"], columns=vary or None, values=["pp_tps", "tg_tps"], aggfunc="mean")

    def label(col: Any) -> str:  # ("tg_tps", 2) -> "tg t/s threads=2"
        col = col if isinstance(col, tuple) else (col,)
        return " ".join([col[0].replace("_tps", " t/s"), *(f"{k}={v}" for k, v in zip(vary, col[1:]))])

    speed.columns = [label(col) for col in speed.columns]
    facts = ok.groupby(["model", "quant"])[["file_bytes", "kl_divergence", "top1_agreement", "perplexity"]].first()
    out = facts.join(speed).sort_values("file_bytes")
    return out.dropna(axis=1, how="all").reset_index()


# ---- what a person reads ---------------------------------------------------------------------


def _size(n: Any) -> str:
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
        ("ctk", lambda r: r["cache_type_k"]),
        ("ctv", lambda r: r["cache_type_v"]),
        ("load s", lambda r: _num(r["load_s"], ".2f")),
        (f"pp{run.n_prompt} t/s", lambda r: _pm(r["pp_tps"], r["pp_tps_std"])),
        (f"tg{run.n_gen} t/s", lambda r: _pm(r["tg_tps"], r["tg_tps_std"])),
        ("KV cache", lambda r: _size(r["kv_bytes"])),
        ("draft", lambda r: r["spec"] or ""),
        ("accept", lambda r: "" if not r["spec"] else "no drafts" if r["spec_acceptance"] is None
         else f"{r['spec_acceptance'] * 100:.1f}%"),
        (f"sd{run.n_gen} t/s", lambda r: _num(r["sd_tps"], ".2f")),
        ("sd speedup", lambda r: "" if r["sd_speedup"] is None else f"{r['sd_speedup']:.2f}x"),
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
    """A GitHub table through pandas (and tabulate); '|' in a cell is escaped."""
    import pandas as pd

    def esc(x: Any) -> str:
        return "" if x is None else str(x).replace("|", "\\|").replace("\n", " ")

    df = pd.DataFrame([[esc(x) for x in row] for row in cells], columns=[esc(h) for h in headers])
    return df.to_markdown(index=False, disable_numparse=True) + "\n"


# ---- bench formats ---------------------------------------------------------------------------


def to_markdown(run: BenchRun) -> str:
    headers, cells = display(run)
    note = f"\n{run.reps} repetitions after a warm-up; mean ± standard deviation of tokens/s.\n"
    if run.interrupted:
        note += "Interrupted: only the configurations above were measured.\n"
    note += "".join(f"{line}\n" for line in run.notes)
    text = markdown_table(headers, cells) + note
    quants = quant_comparison(run)
    if quants["quant"].nunique() > 1 if not quants.empty else False:
        text += "\nQuants side by side:\n\n" + quants.to_markdown(index=False, floatfmt=".4g") + "\n"
    return text


def to_csv(run: BenchRun) -> str:
    return frame(run).to_csv(index=False, lineterminator="\n")


def to_dict(run: BenchRun) -> dict[str, Any]:
    return {"ggufrun": __version__, "environment": run.environment or environment(build=next((r.build for r in run.results if r.build), None)),
            "parameters": {"n_prompt": run.n_prompt, "n_gen": run.n_gen, "reps": run.reps},
            "interrupted": run.interrupted, "notes": list(run.notes), "rows": rows(run),
            "samples": _records(samples_frame(run))}


def to_json(run: BenchRun) -> str:
    return json.dumps(to_dict(run), indent=2)


def render(run: BenchRun, fmt: str) -> str:
    """The run in one of FORMATS."""
    return {"md": to_markdown, "csv": to_csv, "json": to_json}[fmt](run)


def write(run: BenchRun, out_dir: Path) -> list[Path]:
    """bench.csv, bench.json, bench.md, samples.csv and the plots in ``out_dir``; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("bench.csv", to_csv(run)), ("bench.json", to_json(run)), ("bench.md", to_markdown(run)),
                       ("samples.csv", samples_frame(run).to_csv(index=False, lineterminator="\n"))):
        path = out_dir / name
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
    for key, tag in (("n_gpu_layers", "ngl"), ("flash_attn", "fa"), ("n_ctx", "ctx"), ("threads", "t"), ("batch_size", "b"),
                     ("cache_type_k", "ctk"), ("cache_type_v", "ctv")):
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


def load_frame(results: Sequence[LoadResult]) -> "pd.DataFrame":
    """One row per concurrency level, with every column of LOAD_COLUMNS."""
    import pandas as pd

    return pd.DataFrame([r.summary() for r in results], columns=list(LOAD_COLUMNS)).convert_dtypes()


def load_rows(results: Sequence[LoadResult]) -> list[dict[str, Any]]:
    return _records(load_frame(results))


def render_load(results: Sequence[LoadResult], fmt: str) -> str:
    if fmt == "csv":
        return load_frame(results).to_csv(index=False, lineterminator="\n")
    if fmt == "json":
        return json.dumps(load_dict(results), indent=2)
    data = load_rows(results)
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


def environment(load: bool = False, build: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where the numbers were measured: CPU, GPUs, llama.cpp build, versions, time.

    ``build`` is what a worker said about its llama.cpp. With ``load`` the local llama.cpp is left
    out (the server measured may be anything)."""
    from .. import memory
    from ..settings import physical_cores

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
    if not load:  # the worker reported its llama.cpp build; the parent never loads llama.cpp
        env.update(build or {"llama_cpp_system_info": "unavailable: no configuration was measured"})
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
