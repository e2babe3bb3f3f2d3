"""The grammar's slow path, for tests that check the fast path picks the same tokens."""

from __future__ import annotations

import numpy as np

from ggufrun.generation import SeqSampler, _draw_rows


def old_redraw(row: np.ndarray, s: SeqSampler) -> int:
    """What sample_rows did before the fast path (llama-server's way): the grammar over the whole
    row, then the draw over it; -1 where the grammar allows nothing."""
    assert s.grammar is not None
    s.grammar.mask(row)
    if not np.isfinite(row).any():
        return -1
    if s.params.greedy:
        return int(row.argmax())
    return int(_draw_rows(row[None], [s], np.array([s.rng.random()]))[0])
