"""What a bench run measures: its types, and the sweep that turns lists of settings into configurations.

Only raw samples (test, repetition, tokens, seconds) are recorded; tokens/s, means and standard
deviations are derived by the report module.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from ..errors import BenchUsageError
from ..settings import Settings, coerce

SWEEP_KEYS = ("n_gpu_layers", "flash_attn", "n_ctx", "threads", "batch_size", "cache_type_k", "cache_type_v")
PAIRED_CACHE_TYPES = "cache_types"  # --cache-types f16,q8_0: K and V of one type each, swept together
DEFAULT_TEXT = Path(__file__).resolve().parent.parent / "data" / "bench_text.txt"  # bench/text.txt links here
SYNTHETIC_NOTE = "n/a (synthetic)"
NO_REFERENCE_NOTE = "n/a (nothing to compare against)"
NOISY_SPREAD = 0.05  # a relative standard deviation above this flags the configuration: the machine was not quiet


@dataclass(frozen=True)
class Target:
    """One model file to measure, or the reason there is none."""

    label: str  # "gemma3-270m:q4_k_m", "synthetic qwen2-0.5b:q8_0", a file name
    quant: str
    path: Path | None = None
    synthetic: bool = False
    error: str = ""
    derived_from: str = ""  # made by llama.cpp's quantiser from this quant or file: it holds no more than that
    source: Path | None = None  # the file it was made from


@dataclass(frozen=True)
class Config:
    """One row of the sweep: a target and the settings that vary."""

    target: Target
    n_gpu_layers: int
    flash_attn: str
    n_ctx: int
    threads: int
    batch_size: int
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"

    def settings(self, base: Settings) -> Settings:
        return replace(base, n_gpu_layers=self.n_gpu_layers, flash_attn=self.flash_attn, n_ctx=self.n_ctx,
                       threads=self.threads, batch_size=self.batch_size, cache_type_k=self.cache_type_k,
                       cache_type_v=self.cache_type_v)

    def describe(self) -> str:
        kv = "" if (self.cache_type_k, self.cache_type_v) == ("f16", "f16") else f" ctk={self.cache_type_k} ctv={self.cache_type_v}"
        return (f"{self.target.label} ngl={self.n_gpu_layers} fa={self.flash_attn} n_ctx={self.n_ctx} "
                f"threads={self.threads} batch={self.batch_size}{kv}")


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
    kv_bytes: int | None = None  # the KV cache as llama.cpp reported allocating it
    spec: str = ""  # the drafter with --spec/--draft-model ("ngram", the draft file); samples "sd" and "sd-base"
    spec_acceptance: float | None = None  # share of draft tokens the target kept
    build: dict[str, Any] = field(default_factory=dict)  # the worker's llama.cpp: version, system info, devices
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
    notes: list[str] = field(default_factory=list)  # for the person reading: the quality reference, noise, skips


def parse_list(key: str, text: str | None) -> list[Any] | None:
    """A comma list of one setting, each value validated by settings.coerce; None when not given."""
    if text is None:
        return None
    items = [part.strip() for part in str(text).split(",") if part.strip()]
    if not items:
        raise BenchUsageError(f"Empty list for --{key.replace('_', '-')}.")
    return [coerce(key, item, "command line") for item in items]


def plan(targets: Sequence[Target], sweeps: dict[str, list[Any] | None], base: Settings,
         n_prompt: int, n_gen: int) -> list[Config]:
    """The cross product of targets and sweep lists, targets outermost.

    A setting without a list takes its value from ``base``, except n_ctx, which defaults to
    n_prompt + n_gen as in llama-bench (a larger cache only costs memory, not speed).
    ``sweeps["cache_types"]`` pairs K and V (f16/f16, q8_0/q8_0...) instead of crossing two lists.
    """
    unknown = set(sweeps) - set(SWEEP_KEYS) - {PAIRED_CACHE_TYPES}
    if unknown:
        raise BenchUsageError(f"Cannot sweep {', '.join(sorted(unknown))}.", f"Sweepable: {', '.join(SWEEP_KEYS)}.")
    paired = sweeps.get(PAIRED_CACHE_TYPES)
    if paired and (sweeps.get("cache_type_k") or sweeps.get("cache_type_v")):
        raise BenchUsageError("--cache-types sets K and V together: give it, or --cache-type-k/--cache-type-v lists, not both.")
    default_ctx = max(n_prompt + n_gen, 16)
    keys = SWEEP_KEYS[:5]
    lists = [sweeps.get(key) or [default_ctx if key == "n_ctx" else getattr(base, key)] for key in keys]
    kv = [(t, t) for t in paired] if paired else list(itertools.product(
        sweeps.get("cache_type_k") or [base.cache_type_k], sweeps.get("cache_type_v") or [base.cache_type_v]))
    configs = []
    for target in targets:
        for (ngl, fa, n_ctx, threads, batch), (k, v) in itertools.product(itertools.product(*lists), kv):
            configs.append(Config(target, ngl, fa, n_ctx, threads or base.effective_threads(), batch, k, v))
    return configs
