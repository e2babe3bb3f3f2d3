"""The parent side of bench: each configuration in a fresh worker process, then quality per file.

A configuration that fails is a row with its reason and the run goes on; Ctrl-C keeps what was
measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import BenchError, BenchUsageError
from ..exits import signal_name
from ..settings import Settings
from .plan import (DEFAULT_TEXT, NO_REFERENCE_NOTE, NOISY_SPREAD, SYNTHETIC_NOTE, BenchRun, Config, Quality, Result,
                   Sample, Target)

WORKER = "ggufrun.bench.worker"


def run_bench(configs: Sequence[Config], *, base: Settings, n_prompt: int, n_gen: int, reps: int,
              quality: bool = True, reference: Path | None = None, text: Path | None = None, quality_ctx: int = 512,
              progress: Callable[[int, int, str], None] | None = None,
              on_result: Callable[[Result], None] | None = None) -> BenchRun:
    """Measure each configuration in its own worker process, then quality per file.

    ``progress(done, total, what)`` is called before each step. Ctrl-C stops the run and returns
    what was measured, with ``interrupted`` set. Raises BenchError for bad arguments.
    """
    check_counts(n_prompt, n_gen, reps)
    bench = BenchRun(n_prompt=n_prompt, n_gen=n_gen, reps=reps)
    quality_files = _quality_files(configs) if quality else []
    total = len(configs) + (1 if quality_files else 0)
    try:
        for i, config in enumerate(configs):
            if progress:
                progress(i, total, config.describe())
            result = measure(config, base, n_prompt, n_gen, reps)
            bench.results.append(result)
            if on_result:
                on_result(result)
        if progress and quality_files:
            progress(len(configs), total, "quality")
        bench.quality = _quality(configs, quality_files, reference, text, base, quality_ctx, bench.notes) if quality else {}
        if progress:
            progress(total, total, "done")
    except KeyboardInterrupt:
        bench.interrupted = True
    bench.notes.extend(noise_notes(bench.results))
    return bench


def check_counts(n_prompt: int, n_gen: int, reps: int) -> None:
    """Refuse -p, -n and -r values that measure nothing (BenchUsageError), before any file is fetched."""
    if n_prompt < 0 or n_gen < 0 or (n_prompt == 0 and n_gen == 0):
        raise BenchUsageError(f"Nothing to measure with -p {n_prompt} -n {n_gen}.", "Give -p and/or -n > 0.")
    if reps < 1:
        raise BenchUsageError(f"-r must be >= 1 (got {reps}).")


def measure(config: Config, base: Settings, n_prompt: int, n_gen: int, reps: int) -> Result:
    """One configuration in a fresh worker process; a failure becomes Result.error."""
    target = config.target
    if target.error or target.path is None:
        return Result(config, error=target.error or "no file")
    settings = config.settings(base)
    job = {"kind": "speed", "path": str(target.path), "settings": settings.as_dict(),
           "n_prompt": n_prompt, "n_gen": n_gen, "reps": reps}
    if settings.spec != "off" or settings.draft_model:  # speculation against the same model without it
        job.update(speculate=True, text=str(DEFAULT_TEXT))
    try:
        out = _spawn(job)
    except BenchError as exc:
        return Result(config, error=exc.message, file_bytes=_size(target.path))
    samples = [Sample(**s) for s in out.pop("samples", [])]
    return Result(config, samples=samples, **out)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _quality_files(configs: Sequence[Config]) -> list[Target]:
    seen: dict[str, Target] = {}
    for c in configs:
        if c.target.path is not None and not c.target.error:
            seen.setdefault(c.target.label, c.target)
    return list(seen.values())


def _quality(configs: Sequence[Config], targets: list[Target], reference: Path | None, text: Path | None,
             base: Settings, n_ctx: int, notes: list[str]) -> dict[str, Quality]:
    """Quality of each real file against the reference: the given one, else the highest-precision
    (largest) file that is not itself derived, counting the files derived ones were made from.
    Where nothing is left to compare against the reference, quality is skipped with a note."""
    out = {t.label: Quality(reference="", note=SYNTHETIC_NOTE) for t in targets if t.synthetic}
    real = [t for t in targets if not t.synthetic and t.path is not None]
    if not real:
        return out
    if reference is not None:
        ref_path = reference
    else:
        files = [t.path for t in real if t.path is not None]
        candidates = [t.path for t in real if t.path is not None and not t.derived_from] + \
            [t.source for t in real if t.source is not None]
        ref_path = max(candidates or files, key=lambda p: p.stat().st_size)
    same = {t.label for t in real if _same_file(t.path, ref_path)}
    ref_target = next((t for t in real if t.label in same), None)
    ref_label = ref_target.label if ref_target else ref_path.name
    if len(same) == len(real):
        notes.append(f"Quality not measured: {ref_label} is the only file, so there is nothing to compare it with "
                     "(bench two quants, or give --reference FILE).")
        return {**out, **{t.label: Quality(reference="", note=NO_REFERENCE_NOTE) for t in real}}
    derived = next((t for t in real if t.path is not None and _same_file(t.path, ref_path) and t.derived_from), None)
    how = (f", derived from {derived.derived_from} by llama.cpp's quantiser: it holds no more than that file does"
           if derived else "" if reference is not None else ", the largest file not derived from another")
    notes.append(f"Quality reference: {ref_label} ({ref_path}){how}.")
    text_path = text or DEFAULT_TEXT
    try:
        body = text_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:  # the speed rows are measured already: keep them
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        note = f"cannot read {text_path} ({why}); give --text FILE"
        return {**out, **{t.label: Quality(reference=ref_label, note=note) for t in real}}
    settings = replace(configs[0].settings(base), n_ctx=n_ctx)
    job = {"kind": "quality", "reference": str(ref_path), "paths": [str(t.path) for t in real],
           "text": body, "settings": settings.as_dict()}
    try:
        report = _spawn(job)
    except BenchError as exc:
        return {**out, **{t.label: Quality(reference=ref_label, note=exc.message) for t in real}}
    for t in real:
        row = report.get(str(t.path), {})
        out[t.label] = Quality(reference=ref_label, **row) if "note" in row or "tokens" in row else \
            Quality(reference=ref_label, note="not measured")
    return out


def _same_file(a: Path | None, b: Path) -> bool:
    try:
        return a is not None and a.resolve() == b.resolve()
    except OSError:
        return False


def noise_notes(results: Sequence[Result], limit: float = NOISY_SPREAD) -> list[str]:
    """One note naming the configurations whose repetitions spread more than ``limit`` (relative
    standard deviation of tokens/s): numbers from a machine that was not quiet. None when all held."""
    import statistics

    noisy = []
    for r in results:
        spreads = []
        for test in ("pp", "tg"):
            rates = [s.n_tokens / s.seconds for s in r.samples if s.test == test and s.seconds > 0]
            if len(rates) >= 2 and (spread := statistics.stdev(rates) / statistics.fmean(rates)) > limit:
                spreads.append(f"{test} ±{spread:.0%}")
        if spreads:
            noisy.append(f"{r.config.describe()}: {', '.join(spreads)}")
    if not noisy:
        return []
    return [f"Noisy machine: {len(noisy)} of {len(results)} configurations varied by more than {limit:.0%} between "
            f"repetitions ({'; '.join(noisy)}); another process may have had the CPU: rerun when it is quiet."]


def _spawn(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job in ``python -m ggufrun.bench.worker``; raise BenchError with the reason it failed."""
    with tempfile.TemporaryDirectory(prefix="ggufrun-bench-") as tmp:
        job_file, out_file = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_file.write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-m", WORKER, str(job_file), str(out_file)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_worker_env())
        if out_file.exists():
            out = json.loads(out_file.read_text())
            if "error" in out:
                raise BenchError(out["error"])
            return out
    tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
    if proc.returncode < 0:
        name = signal_name(proc.returncode)
        why = " (out of memory?)" if name == "SIGKILL" else ""
        raise BenchError(f"worker killed by {name}{why} {tail[0]}".strip())
    raise BenchError(f"worker exited with code {proc.returncode}: {tail[0]}".strip())


def _worker_env() -> dict[str, str]:
    # The worker must import this very ggufrun, also when it runs from a source tree.
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
