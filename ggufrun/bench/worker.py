"""The subprocess side of bench: ``python -m ggufrun.bench.worker JOB OUT``.

A fresh process per configuration, so that peak memory and load time belong to that
configuration alone. Speed mirrors llama-bench (tools/llama-bench/llama-bench.cpp):

* a warm-up: one prompt run and one generated token;
* ``reps`` prompt runs: ``n_prompt`` random token ids (BOS first) decoded in ``batch_size``
  chunks from an empty KV cache, synchronised before the clock stops;
* ``reps`` generation runs: ``n_gen`` single-token decodes from an empty KV cache, each
  synchronised (on a GPU decode is asynchronous; unsynchronised timings were off by 10x).

This is the only bench module that touches the llama boundary, and only through ``_Llama``.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import BenchError, GgufrunError
from ..settings import Settings
from . import quality
from .plan import Sample


class _Llama:
    """Every call bench makes into the loaded model, in one place (the llama boundary may change)."""

    def __init__(self, path: str, settings: Settings) -> None:
        from ..runtime import Model
        from ..trial import trial_load

        trial_load(path)  # a file that makes llama.cpp abort fails here with one line, not a crash
        started = time.perf_counter()
        self._model = Model.load(path, settings)
        self.load_seconds = time.perf_counter() - started
        m = self._model
        self.n_vocab, self.bos_id, self.n_batch, self.n_ctx = m.n_vocab, m.bos_id, m.n_batch, m.n_ctx
        self.n_params, self.description, self.kv_bytes = m.n_params, m.description, m.kv_bytes
        self._spec: Any = None

    @staticmethod
    def build() -> dict[str, Any]:
        """llama.cpp's version, compiled features and devices, for the report's environment."""
        from importlib.metadata import version

        from .. import native, runtime
        from ..llama import ggml

        try:
            lcp = version("llama_cpp_python")
        except Exception:  # a source tree on PYTHONPATH (the GPU builds) has no installed metadata
            lcp = "unknown (no package metadata)"
        return {"llama_cpp_python": lcp, "llama_cpp_system_info": runtime.system_info(),
                "llama_cpp_devices": runtime.gpu_info().get("devices", []),
                "cpu_backend": ggml.cpu_backend(),  # which kernels this build runs on this CPU
                "top_k_search": "compiled (ggufrun/_topk.c)" if native.available() else "numpy (the install had no C compiler)"}

    def reset(self) -> None:
        self._model.reset()

    def decode_last(self, tokens: list[int]) -> None:
        """Append ``tokens`` to sequence 0, computing logits for the last one only."""
        self._model.decode([(0, tokens, True)])

    def synchronize(self) -> None:
        self._model.synchronize()

    def tokenize(self, text: str) -> list[int]:
        return self._model.tokenize(text)

    def logits(self, tokens: list[int]) -> Any:
        """A (len(tokens), n_vocab) float32 array of logits from an empty cache."""
        return self._model.eval_logits(tokens)

    def speculate(self, settings: Settings) -> str:
        """Attach the speculator ``settings`` ask for (``draft_model`` a path here); its label."""
        from dataclasses import replace

        from .. import speculative
        from ..runtime import Model
        from ..trial import trial_load

        def load_draft(path: str) -> Any:
            trial_load(path)
            return Model.load(path, replace(settings, spec="off", draft_model=""))

        self._spec = speculative.build(self._model, settings, "the target", load_draft)
        return self._spec.label if self._spec is not None else ""

    def generate(self, prompt: list[int], n: int, speculate: bool) -> tuple[float, int]:
        """(seconds, tokens) for ``n`` greedy tokens after ``prompt`` in a fresh cache, with the
        speculator attached or without it."""
        from ..generation import SamplingParams

        m = self._model
        m.reset()
        m.speculator = self._spec if speculate else None
        gen = m.start(prompt, SamplingParams(temperature=0.0), max_tokens=n, ignore_eos=True)
        started = time.perf_counter()
        count = sum(1 for tok, _ in m.stream(gen, prompt) if tok >= 0)
        seconds = time.perf_counter() - started
        m.speculator = None
        return seconds, count

    def spec_stats(self) -> tuple[int, int]:
        """(draft tokens checked, accepted) over the speculator's life."""
        return (self._spec.stats.drafted, self._spec.stats.accepted) if self._spec is not None else (0, 0)

    def close(self) -> None:
        self._model.speculator = self._spec
        self._model.close()


def speed(job: dict[str, Any]) -> dict[str, Any]:
    """pp and tg samples of one configuration, plus load time and memory."""
    from .. import memory

    n_prompt, n_gen, reps = job["n_prompt"], job["n_gen"], job["reps"]
    gpu_before = memory.gpu_used_bytes()
    model = _Llama(job["path"], Settings(**job["settings"]))
    rng = random.Random(0)
    samples: list[dict[str, Any]] = []
    if n_prompt:  # warm-up, as llama-bench: one prompt run and one generated token
        _prompt_run(model, n_prompt, rng)
    if n_gen:
        _gen_run(model, 1, rng)
    for test, n, fn in (("pp", n_prompt, _prompt_run), ("tg", n_gen, _gen_run)):
        for rep in range(reps if n else 0):
            model.reset()
            seconds = fn(model, n, rng)
            samples.append(asdict(Sample(test=test, rep=rep, n_tokens=n, seconds=seconds)))
    spec = _speculation(model, job, samples) if job.get("speculate") else {}
    gpu_after = memory.gpu_used_bytes()
    out = {"load_seconds": model.load_seconds, "file_bytes": Path(job["path"]).stat().st_size,
           "n_params": model.n_params, "description": model.description, "peak_rss_bytes": memory.peak_rss_bytes(),
           "gpu_mem_bytes": gpu_after - gpu_before if gpu_before is not None and gpu_after is not None else None,
           "kv_bytes": model.kv_bytes,
           "build": model.build(), "samples": samples, **spec}
    model.close()
    return out


def _speculation(model: _Llama, job: dict[str, Any], samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Speculative decoding against the same model without it, in this process: ``reps`` greedy
    generations of ``n_gen`` tokens after the bench text's first tokens, each way (samples "sd"
    and "sd-base"), and the drafts' acceptance rate: over the warm-up's drafts too, since the time
    guard may stop a draft that agrees but costs too much before the timed runs draft at all."""
    label = model.speculate(Settings(**job["settings"]))
    n = job["n_gen"] or 64
    text = model.tokenize(Path(job["text"]).read_text(encoding="utf-8"))
    prompt = text[: max(min(job["n_prompt"] or 256, model.n_ctx - n - 1), 1)]
    if len(prompt) + n > model.n_ctx:
        raise BenchError(f"Speculative decoding needs {len(prompt) + n} context cells; n_ctx is {model.n_ctx}.",
                         "Raise --n-ctx.")
    model.generate(prompt, 8, True)  # warm-up: the draft model's first decodes
    model.generate(prompt, 8, False)
    for rep in range(job["reps"]):
        for test, on in (("sd-base", False), ("sd", True)):
            seconds, count = model.generate(prompt, n, on)
            samples.append(asdict(Sample(test=test, rep=rep, n_tokens=count, seconds=seconds)))
    drafted, accepted = model.spec_stats()
    return {"spec": Path(label).name, "spec_acceptance": accepted / drafted if drafted else None}


def _random_tokens(model: _Llama, n: int, rng: random.Random) -> list[int]:
    tokens = [rng.randrange(model.n_vocab) for _ in range(n)]
    if tokens and model.bos_id >= 0:
        tokens[0] = model.bos_id
    return tokens


def _prompt_run(model: _Llama, n: int, rng: random.Random) -> float:
    """Seconds to decode ``n`` random tokens in n_batch chunks (llama-bench's test_prompt)."""
    tokens = _random_tokens(model, n, rng)
    batch = model.n_batch
    started = time.perf_counter()
    for start in range(0, n, batch):
        model.decode_last(tokens[start : start + batch])
    model.synchronize()
    return time.perf_counter() - started


def _gen_run(model: _Llama, n: int, rng: random.Random) -> float:
    """Seconds for ``n`` single-token decodes, each synchronised (llama-bench's test_gen)."""
    tokens = _random_tokens(model, n, rng)
    decode, sync = model.decode_last, model.synchronize
    started = time.perf_counter()
    for token in tokens:
        decode([token])
        sync()
    return time.perf_counter() - started


def quality_job(job: dict[str, Any]) -> dict[str, Any]:
    """KL divergence, top-1 agreement and perplexity of each file against the reference.

    The reference's log-probs are computed once and kept, so only one model is in memory at a time."""
    settings = Settings(**job["settings"])
    ref = _Llama(job["reference"], settings)
    tokens = ref.tokenize(job["text"])
    n_vocab = ref.n_vocab
    chunks = quality.chunks(tokens, ref.n_ctx, n_vocab)
    if len(chunks[0]) < 8:
        ref.close()
        raise BenchError(f"The quality text has only {len(tokens)} tokens.", "Give a longer one with --text FILE.")
    scored = [quality.scored_half(c) for c in chunks]
    targets = [want for _, want in scored]
    ref_lp = [quality.log_softmax(ref.logits(c)[first:-1]) for c, (first, _) in zip(chunks, scored)]
    ref.close()
    out: dict[str, Any] = {}
    for path in job["paths"]:
        if Path(path) == Path(job["reference"]):
            out[path] = quality.compare(ref_lp, ref_lp, targets)
            continue
        model = _Llama(path, settings)
        try:
            if model.n_vocab != n_vocab:
                out[path] = {"note": f"different vocabulary ({model.n_vocab} vs {n_vocab} tokens)"}
                continue
            lps = (quality.log_softmax(model.logits(c)[first:-1]) for c, (first, _) in zip(chunks, scored))
            out[path] = quality.compare(ref_lp, lps, targets)
        finally:
            model.close()
    return out


def main(argv: list[str]) -> int:
    job_file, out_file = Path(argv[0]), Path(argv[1])
    job = json.loads(job_file.read_text())
    try:
        out = speed(job) if job["kind"] == "speed" else quality_job(job)
    except GgufrunError as exc:
        out = {"error": str(exc)}
    except MemoryError:
        out = {"error": "out of memory"}
    out_file.write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
