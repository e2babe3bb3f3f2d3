"""GPU offload: these run only where llama.cpp was built with a GPU backend (skipped in CI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ggufrun.runtime import Model, Sampler, gpu_info
from ggufrun.settings import Settings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_info()["offload"], reason="llama.cpp was built without a GPU backend"),
]


@pytest.mark.parametrize("flash_attn", ["on", "off"])
def test_offloaded_model_computes_what_the_cpu_computes(tiny_model: Path, flash_attn: str) -> None:
    logits = []
    for ngl in (0, -1):
        with Model.load(tiny_model, Settings(n_ctx=256, n_gpu_layers=ngl, flash_attn=flash_attn, threads=1)) as m:
            tokens = m.tokenize("The GPU must agree with the CPU")
            logits.append(m.eval_logits(tokens))
            out = list(m.generate(tokens, Sampler(m, temperature=0), max_tokens=8))
            assert out and all(0 <= t < m.n_vocab for t in out)
    cpu, gpu = (x.ravel() for x in logits)
    assert np.isfinite(gpu).all()
    assert np.corrcoef(cpu, gpu)[0, 1] > 0.99  # the same numbers up to kernel rounding
