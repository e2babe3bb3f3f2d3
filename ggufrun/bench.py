"""The benchmark: configurations x repetitions -> raw rows, measured as llama-bench measures.

For each configuration (the cross product of the sweep lists) a fresh worker process
(``python -m ggufrun.bench JOB OUT``) loads the model, so that peak memory and load time belong to
that configuration alone, then mirrors llama-bench (tools/llama-bench/llama-bench.cpp):

* a warm-up: one prompt run and one generated token;
* ``reps`` prompt runs: ``n_prompt`` random token ids (BOS first) decoded in ``batch_size``
  chunks from an empty KV cache, synchronised before the clock stops;
* ``reps`` generation runs: ``n_gen`` single-token decodes from an empty KV cache, each
  synchronised (on a GPU decode is asynchronous; unsynchronised timings were off by 10x).

Only raw samples (test, repetition, tokens, seconds) are recorded; tokens/s, means and standard
deviations are derived by the report module. A configuration that fails is a row with its
reason and the run goes on; Ctrl-C keeps what was measured.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from . import paths
from .errors import BenchError, GgufrunError
from .settings import Settings, coerce

SWEEP_KEYS = ("n_gpu_layers", "flash_attn", "n_ctx", "threads", "batch_size")
DEFAULT_TEXT = Path(__file__).resolve().parent / "data" / "bench_text.txt"  # bench/text.txt links here
SYNTHETIC_NOTE = "n/a (synthetic)"

Report = Callable[[str], None]


@dataclass(frozen=True)
class Target:
    """One model file to measure, or the reason there is none."""

    label: str  # "gemma3-270m:q4_k_m", "synthetic qwen2-0.5b:q8_0", a file name
    quant: str
    path: Path | None = None
    synthetic: bool = False
    error: str = ""


@dataclass(frozen=True)
class Config:
    """One row of the sweep: a target and the settings that vary."""

    target: Target
    n_gpu_layers: int
    flash_attn: str
    n_ctx: int
    threads: int
    batch_size: int

    def settings(self, base: Settings) -> Settings:
        return replace(base, n_gpu_layers=self.n_gpu_layers, flash_attn=self.flash_attn, n_ctx=self.n_ctx,
                       threads=self.threads, batch_size=self.batch_size)

    def describe(self) -> str:
        return (f"{self.target.label} ngl={self.n_gpu_layers} fa={self.flash_attn} n_ctx={self.n_ctx} "
                f"threads={self.threads} batch={self.batch_size}")


@dataclass
class Sample:
    """One timed repetition: the raw row everything else is derived from."""

    test: str  # "pp" (prompt processing) or "tg" (text generation)
    rep: int
    n_tokens: int
    seconds: float


@dataclass
class Result:
    """What one configuration's worker reported (or why it failed)."""

    config: Config
    error: str = ""
    load_seconds: float | None = None
    file_bytes: int | None = None
    n_params: int | None = None
    description: str = ""
    peak_rss_bytes: int | None = None
    gpu_mem_bytes: int | None = None
    samples: list[Sample] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass
class Quality:
    """Next-token agreement of one file with the reference, over the same text."""

    reference: str
    tokens: int = 0  # scored positions
    kl_divergence: float | None = None
    top1_agreement: float | None = None
    perplexity: float | None = None
    note: str = ""  # "n/a (synthetic)", or why it could not be measured


@dataclass
class BenchRun:
    """A whole run: parameters, per-configuration results, quality per file, environment."""

    n_prompt: int
    n_gen: int
    reps: int
    results: list[Result] = field(default_factory=list)
    quality: dict[str, Quality] = field(default_factory=dict)  # by target label
    environment: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False


# ---- planning ------------------------------------------------------------------------------


def parse_list(key: str, text: str | None) -> list[Any] | None:
    """A comma list of one setting, each value validated by settings.coerce; None when not given."""
    if text is None:
        return None
    items = [part.strip() for part in str(text).split(",") if part.strip()]
    if not items:
        raise BenchError(f"Empty list for --{key.replace('_', '-')}.")
    return [coerce(key, item, "command line") for item in items]


def plan(targets: Sequence[Target], sweeps: dict[str, list[Any] | None], base: Settings,
         n_prompt: int, n_gen: int) -> list[Config]:
    """The cross product of targets and sweep lists, targets outermost.

    A setting without a list takes its value from ``base``, except n_ctx, which defaults to
    n_prompt + n_gen as in llama-bench (a larger cache only costs memory, not speed).
    """
    unknown = set(sweeps) - set(SWEEP_KEYS)
    if unknown:
        raise BenchError(f"Cannot sweep {', '.join(sorted(unknown))}.", f"Sweepable: {', '.join(SWEEP_KEYS)}.")
    default_ctx = max(n_prompt + n_gen, 16)
    lists = [sweeps.get(key) or [default_ctx if key == "n_ctx" else getattr(base, key)] for key in SWEEP_KEYS]
    configs = []
    for target in targets:
        for ngl, fa, n_ctx, threads, batch in itertools.product(*lists):
            configs.append(Config(target, ngl, fa, n_ctx, threads or base.effective_threads(), batch))
    return configs


# ---- resolving names to files ---------------------------------------------------------------


def resolve_targets(name: str | None, quants: Sequence[str], *, registry: Any = None, derive_from: str | None = None,
                    synthetic: str | None = None, report: Report | None = None) -> list[Target]:
    """Files to bench: a registry entry's quants (fetched, else derived with ``derive_from``),
    a local file (or quants derived from it), or synthetic models of a shape.

    Raises UnknownModelError for an unknown name; a quant that cannot be had becomes a Target
    with ``error`` set, so the run shows it as a row.
    """
    say = report or (lambda _msg: None)
    if synthetic:
        return [_synthetic_target(synthetic, q, say) for q in (quants or ["q4_k_m"])]
    if not name:
        raise BenchError("Give a model name or file, or --synthetic SHAPE.", "Example: ggufrun bench gemma3-270m.")
    if registry is None:
        from . import registry as registry_mod

        registry = registry_mod.load()
    spec = registry.resolve(name)
    if spec.path is not None:  # a local file: bench it, or the quants derived from it
        if not quants:
            return [_file_target(spec.path)]
        stem = spec.path.stem
        return [_derive(spec.path, q, paths.home() / "derived" / "local" / f"{stem}-{q.lower()}.gguf",
                        f"{stem}:{q} (derived)", say) for q in quants]
    if spec.entry is None:  # hf:/ms: references name one file
        return [_fetch(spec, say)]
    entry = spec.entry
    source: list[Path] = []  # derive_from's file, resolved once

    def derive_source() -> Path:
        if not source:
            if derive_from is None:
                raise BenchError("no --derive-from given")
            given = Path(derive_from).expanduser()
            if given.is_file():
                source.append(given)
            else:
                from .fetch import ensure_local

                source.append(ensure_local(registry.resolve(f"{entry.name}:{derive_from}")))
        return source[0]

    targets = []
    for q in quants or [spec.quant or ""]:
        label = f"{entry.name}:{q}"
        try:
            target = _fetch(registry.resolve(label), say)
            if not target.error or derive_from is None:
                targets.append(target)
                continue
            failure = target.error
        except GgufrunError as exc:
            if derive_from is None:
                targets.append(Target(label=label, quant=q, error=str(exc)))
                continue
            failure = str(exc)
        say(f"{label}: {failure} Deriving it from {derive_from}.")
        try:
            src = derive_source()
        except GgufrunError as exc:
            targets.append(Target(label=label, quant=q, error=f"cannot derive: {exc}"))
            continue
        dst = paths.home() / "derived" / entry.name / f"{entry.name}-{q.lower()}.gguf"
        targets.append(_derive(src, q, dst, f"{label} (derived)", say))
    return targets


def _fetch(spec: Any, say: Report) -> Target:
    from .fetch import ensure_local

    try:
        path = ensure_local(spec, report=say)
    except GgufrunError as exc:
        return Target(label=spec.name, quant=spec.quant or "", error=str(exc))
    return Target(label=spec.name, quant=spec.quant or _file_type(path), path=path)


def _file_target(path: Path) -> Target:
    return Target(label=path.name, quant=_file_type(path), path=path, synthetic=_is_synthetic(path))


def _file_type(path: Path) -> str:
    from .gguf_info import inspect

    try:
        return inspect(path).file_type.lower()
    except GgufrunError:
        return "?"


def _is_synthetic(path: Path) -> bool:
    """Files written by ggufrun.synthetic say so in general.name / general.description."""
    from .gguf_info import inspect

    try:
        meta = inspect(path).metadata
    except GgufrunError:
        return False
    return any("synthetic" in str(meta.get(k, "")).lower() for k in ("general.name", "general.description", "general.source.url"))


def _derive(src: Path, quant: str, dst: Path, label: str, say: Report) -> Target:
    """``quant`` made from ``src`` with llama.cpp's quantiser, reused when already made."""
    if not dst.exists():
        from .runtime import quantize

        dst.parent.mkdir(parents=True, exist_ok=True)
        say(f"Quantising {src.name} to {quant} ...")
        try:
            quantize(src, dst, quant)
        except GgufrunError as exc:
            return Target(label=label, quant=quant, error=str(exc))
    return Target(label=label, quant=quant, path=dst, synthetic=_is_synthetic(dst))


def _synthetic_target(shape: str, quant: str, say: Report) -> Target:
    """A random-weight model of ``shape`` in ``quant``: written directly where the writer supports
    the type, else quantised from the synthetic f16 file."""
    from . import synthetic

    folder = paths.home() / "synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    label = f"synthetic {shape}:{quant.lower()}"
    dst = folder / f"{shape}-{quant.lower()}.gguf"
    if dst.exists():
        return Target(label=label, quant=quant.lower(), path=dst, synthetic=True)
    say(f"Writing a synthetic {shape} model in {quant} ...")
    try:
        synthetic.write_synthetic(dst, shape=shape, quant=quant.lower())  # written atomically
        return Target(label=label, quant=quant.lower(), path=dst, synthetic=True)
    except GgufrunError as exc:
        from .runtime import quant_types

        if quant.lower() == "f16" or quant.lower() not in quant_types():
            return Target(label=label, quant=quant.lower(), error=str(exc))
        direct_error = exc
    f16 = _synthetic_target(shape, "f16", say)
    if f16.error or f16.path is None:
        return Target(label=label, quant=quant.lower(), error=str(direct_error))
    target = _derive(f16.path, quant, dst, label, say)
    return replace(target, synthetic=True)


def quantize_many(source: str, qtypes: Sequence[str], *, out_dir: Path | None = None, registry: Any = None,
                  threads: int = 0, report: Report | None = None) -> list[tuple[str, Path]]:
    """Quantise a file (or a registry model, fetched if needed) to each type; returns (type, path).

    Output names swap the source's type suffix for the new one (x-q4_k_m.gguf -> x-q4_0.gguf).
    Raises ConfigError for an unknown type (before any work), ModelLoadError when llama.cpp fails.
    """
    from .errors import ConfigError
    from .fetch import ensure_local
    from .runtime import quant_types, quantize

    known = set(quant_types())
    wanted = [q.lower().replace("fp16", "f16") for q in qtypes]
    bad = [q for q, w in zip(qtypes, wanted) if w not in known]
    if not wanted or bad:
        raise ConfigError(f"Unknown quant type(s): {', '.join(bad) or '(none given)'}.", f"Choose from: {', '.join(sorted(known))}.")
    if registry is None:
        from . import registry as registry_mod

        registry = registry_mod.load()
    src = ensure_local(registry.resolve(source))
    folder = out_dir or src.parent
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for q in wanted:
        dst = folder / quantized_name(src, q)
        if dst.resolve() == src.resolve():
            raise ConfigError(f"{src.name} is already {q}.", "Pick another type or --out-dir.")
        if report:
            report(f"Quantising {src.name} to {q} -> {dst}")
        made.append((q, quantize(src, dst, q, threads=threads)))
    return made


def quantized_name(src: Path, qtype: str) -> str:
    """``src``'s file name with its type suffix replaced by ``qtype`` (appended when it has none)."""
    import re

    match = re.search(r"(?i)[-_.]((?:q\d|iq\d)\w*|f16|fp16|bf16|f32)$", src.stem)
    base = src.stem[: match.start(1)] if match else f"{src.stem}-"
    return f"{base}{qtype}.gguf"


# ---- running ---------------------------------------------------------------------------------


def run(configs: Sequence[Config], *, base: Settings, n_prompt: int, n_gen: int, reps: int,
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
    except OSError as exc:  # the speed rows are measured already: keep them, say why quality is missing
        note = f"cannot read {text_path} ({exc.strerror}); give --text FILE"
        return {**out, **{t.label: Quality(reference=ref_label, note=note) for t in real}}
    first = configs[0]
    settings = replace(first.settings(base), n_ctx=n_ctx)
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
    """Run one job in ``python -m ggufrun.bench``; raise BenchError with the reason it failed."""
    with tempfile.TemporaryDirectory(prefix="ggufrun-bench-") as tmp:
        job_file, out_file = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_file.write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-m", "ggufrun.bench", str(job_file), str(out_file)],
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
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# ---- the worker ------------------------------------------------------------------------------


def _speed(job: dict[str, Any]) -> dict[str, Any]:
    from . import memory
    from .runtime import Model

    settings = Settings(**job["settings"])
    n_prompt, n_gen, reps = job["n_prompt"], job["n_gen"], job["reps"]
    gpu_before = memory.gpu_used_bytes()
    started = time.perf_counter()
    model = Model.load(job["path"], settings)
    load_seconds = time.perf_counter() - started
    rng = random.Random(0)
    samples: list[dict[str, Any]] = []
    # warm-up, as llama-bench: one prompt run and one generated token
    if n_prompt:
        _prompt_run(model, n_prompt, rng)
    if n_gen:
        _gen_run(model, 1, rng)
    for test, n, fn in (("pp", n_prompt, _prompt_run), ("tg", n_gen, _gen_run)):
        for rep in range(reps if n else 0):
            model.reset()
            seconds = fn(model, n, rng)
            samples.append(asdict(Sample(test=test, rep=rep, n_tokens=n, seconds=seconds)))
    gpu_after = memory.gpu_used_bytes()
    out = {"load_seconds": load_seconds, "file_bytes": Path(job["path"]).stat().st_size, "n_params": model.n_params,
           "description": model.description, "peak_rss_bytes": memory.peak_rss_bytes(),
           "gpu_mem_bytes": gpu_after - gpu_before if gpu_before is not None and gpu_after is not None else None,
           "samples": samples}
    model.close()
    return out


def _random_tokens(model: Any, n: int, rng: random.Random) -> list[int]:
    tokens = [rng.randrange(model.n_vocab) for _ in range(n)]
    if tokens and model.bos_id >= 0:
        tokens[0] = model.bos_id
    return tokens


def _prompt_run(model: Any, n: int, rng: random.Random) -> float:
    """Seconds to decode ``n`` random tokens in n_batch chunks (llama-bench's test_prompt)."""
    tokens = _random_tokens(model, n, rng)
    batch = model.n_batch
    started = time.perf_counter()
    for start in range(0, n, batch):
        model.decode([(0, tokens[start : start + batch], True)])  # logits for the last token only
    model.synchronize()
    return time.perf_counter() - started


def _gen_run(model: Any, n: int, rng: random.Random) -> float:
    """Seconds for ``n`` single-token decodes, each synchronised (llama-bench's test_gen)."""
    tokens = _random_tokens(model, n, rng)
    decode, sync = model.decode, model.synchronize
    started = time.perf_counter()
    for token in tokens:
        decode([(0, [token], True)])
        sync()
    return time.perf_counter() - started


QUALITY_CACHE_BYTES = 3 << 29  # reference log-probs kept in memory: 1.5 GiB bounds the text scored


def _quality_job(job: dict[str, Any]) -> dict[str, Any]:
    """KL divergence, top-1 agreement and perplexity of each file against the reference, over
    chunks of n_ctx tokens, scoring the second half of each chunk (as llama-perplexity does, so
    every scored token has at least n_ctx/2 tokens of context). The reference's log-probs are
    computed once and kept, so only one model is in memory at a time."""
    import numpy as np

    from .runtime import Model

    settings = Settings(**job["settings"])
    ref = Model.load(job["reference"], settings)
    tokens = ref.tokenize(job["text"])
    n_ctx, n_vocab = ref.n_ctx, ref.n_vocab
    chunks = [tokens[i : i + n_ctx] for i in range(0, len(tokens) - n_ctx + 1, n_ctx)] or [tokens]
    if len(chunks[0]) < 8:
        ref.close()
        raise BenchError(f"The quality text has only {len(tokens)} tokens.", "Give a longer one with --text FILE.")
    per_chunk = (len(chunks[0]) - len(chunks[0]) // 2) * n_vocab * 4
    chunks = chunks[: max(1, QUALITY_CACHE_BYTES // per_chunk)]
    scored = [(len(c) // 2, np.asarray(c[len(c) // 2 + 1 :])) for c in chunks]
    ref_lp = [_log_softmax(ref.eval_logits(c)[first:-1]) for c, (first, _) in zip(chunks, scored)]
    ref.close()
    out: dict[str, Any] = {}
    for path in job["paths"]:
        if Path(path) == Path(job["reference"]):
            out[path] = _compare(ref_lp, ref_lp, scored)
            continue
        with Model.load(path, settings) as model:
            if model.n_vocab != n_vocab:
                out[path] = {"note": f"different vocabulary ({model.n_vocab} vs {n_vocab} tokens)"}
                continue
            lps = (_log_softmax(model.eval_logits(c)[first:-1]) for c, (first, _) in zip(chunks, scored))
            out[path] = _compare(ref_lp, lps, scored)
    return out


def _compare(ref_lp: list[Any], lps: Any, scored: list[tuple[int, Any]]) -> dict[str, Any]:
    import numpy as np

    kl_sum = nll_sum = 0.0
    agree = count = 0
    for lp_ref, lp, (_, targets) in zip(ref_lp, lps, scored):
        kl_sum += float((np.exp(lp_ref) * (lp_ref - lp)).sum())
        agree += int((lp_ref.argmax(axis=1) == lp.argmax(axis=1)).sum())
        nll_sum -= float(lp[np.arange(len(targets)), targets].sum())
        count += len(targets)
    return {"tokens": count, "kl_divergence": kl_sum / count, "top1_agreement": agree / count,
            "perplexity": float(np.exp(nll_sum / count))}


def _log_softmax(logits: Any) -> Any:
    import numpy as np

    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _worker(argv: list[str]) -> int:
    job_file, out_file = Path(argv[0]), Path(argv[1])
    job = json.loads(job_file.read_text())
    try:
        out = _speed(job) if job["kind"] == "speed" else _quality_job(job)
    except GgufrunError as exc:
        out = {"error": str(exc)}
    except MemoryError:
        out = {"error": "out of memory"}
    out_file.write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
