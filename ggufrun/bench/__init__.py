"""Benchmarks: speed, memory and quality per quant (``ggufrun bench``), and load against a server.

* ``plan``     the types and the sweep (configurations from lists of settings);
* ``targets``  names to files: fetched, derived with the quantiser, or synthetic;
* ``run``      the parent side: one worker process per configuration;
* ``worker``   the subprocess side, the only bench module that loads llama.cpp;
* ``quality``  KL divergence, top-1 agreement and perplexity from logits;
* ``load``     a bounded load generator for OpenAI-compatible servers;
* ``report``   pandas DataFrames from the raw rows, and CSV/JSON/Markdown/PNG from those.

Importing this package is cheap (no pandas, numpy or llama.cpp), so the CLI's --help stays instant.
"""

from __future__ import annotations

from .plan import (DEFAULT_TEXT, NO_REFERENCE_NOTE, SWEEP_KEYS, SYNTHETIC_NOTE, BenchRun, Config, Quality, Result,
                   Sample, Target, parse_list, plan)
from .run import check_counts, measure, noise_notes, run_bench
from .targets import DerivedFile, derived_files, draft_file, entry_defaults, resolve_targets

__all__ = [
    "DEFAULT_TEXT", "NO_REFERENCE_NOTE", "SWEEP_KEYS", "SYNTHETIC_NOTE", "BenchRun", "Config", "DerivedFile", "Quality",
    "Result", "Sample", "Target", "check_counts", "derived_files", "draft_file", "entry_defaults", "measure", "noise_notes",
    "parse_list", "plan", "resolve_targets", "run_bench",
]
