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

from ..errors import BenchError
from ..settings import Settings
from .plan import DEFAULT_TEXT, SYNTHETIC_NOTE, BenchRun, Config, Quality, Result, Sample, Target

WORKER = "ggufrun.bench.worker"


def run_bench(configs: Sequence[Config], *, base: Settings, n_prompt: int, n_gen: int, reps: int,
              quality: bool = True, reference: Path | None = None, text: Path | None = None, quality_ctx: int = 512,
              progress: Callable[[int, int, str], None] | None = None,
              on_result: Callable[[Result], None] | None = None) -> BenchRun:
    """Measure each configuration in its own worker process, then quality per file.

    ``progress(done, total, what)`` is called before each step. Ctrl-C stops the run and returns
    what was measured, with ``interrupted`` set. Raises BenchError for bad arguments.
    """
    if n_prompt < 0 or n_gen < 0 or (n_prompt == 0 and n_gen == 0):
        raise BenchError(f"Nothing to measure with -p {n_prompt} -n {n_gen}.", "Give -p and/or -n > 0.")
    if reps < 1:
        raise BenchError(f"-r must be >= 1 (got {reps}).")
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
        bench.quality = _quality(configs, quality_files, reference, text, base, quality_ctx) if quality else {}
        if progress:
            progress(total, total, "done")
    except KeyboardInterrupt:
        bench.interrupted = True
    return bench


def measure(config: Config, base: Settings, n_prompt: int, n_gen: int, reps: int) -> Result:
    """One configuration in a fresh worker process; a failure becomes Result.error."""
    target = config.target
    if target.error or target.path is None:
        return Result(config, error=target.error or "no file")
    job = {"kind": "speed", "path": str(target.path), "settings": config.settings(base).as_dict(),
           "n_prompt": n_prompt, "n_gen": n_gen, "reps": reps}
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
             base: Settings, n_ctx: int) -> dict[str, Quality]:
    """Quality of each real file against the reference: the given one, else the largest file
    (the highest precision of one model's quants)."""
    out = {t.label: Quality(reference="", note=SYNTHETIC_NOTE) for t in targets if t.synthetic}
    real = [t for t in targets if not t.synthetic]
    if not real:
        return out
    ref_path = reference or max((t.path for t in real if t.path), key=lambda p: p.stat().st_size)
    ref_label = next((t.label for t in real if t.path == ref_path), ref_path.name)
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
        import signal

        name = signal.Signals(-proc.returncode).name
        why = " (out of memory?)" if name == "SIGKILL" else ""
        raise BenchError(f"worker killed by {name}{why} {tail[0]}".strip())
    raise BenchError(f"worker exited with code {proc.returncode}: {tail[0]}".strip())


def _worker_env() -> dict[str, str]:
    # The worker must import this very ggufrun, also when it runs from a source tree.
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
