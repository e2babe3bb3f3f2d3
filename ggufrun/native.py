"""ggufrun's own compiled helper (_topk.c), loaded through ctypes so that its calls run without the
GIL; absent (no C compiler at install), callers use their numpy path."""

from __future__ import annotations

import ctypes
import importlib.util
from typing import Any

import numpy as np

_lib: Any = None
_tried = False


def _load() -> Any:
    global _lib, _tried
    if not _tried:
        _tried = True
        try:
            spec = importlib.util.find_spec("ggufrun._topk")
            if spec is not None and spec.origin:
                lib = ctypes.CDLL(spec.origin)
                f = lib.ggufrun_topk_candidates
                f.restype = None
                f.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                              ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
                _lib = lib
        except (OSError, AttributeError, ImportError):
            _lib = None
    return _lib


def available() -> bool:
    """Whether the compiled top-k helper is there."""
    return _load() is not None


def topk_candidates(logits: np.ndarray, ks: np.ndarray) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Per row of float32 ``logits`` (rows contiguous), every token at or above the row's
    ``ks[row]``-th largest logit, in token order, as (ids, logits); None for a row with a NaN or a
    flat row (more such tokens than fit). Requires :func:`available`."""
    lib = _load()
    n, v = logits.shape
    assert logits.dtype == np.float32 and logits.strides[1] == 4
    ks = np.ascontiguousarray(ks, dtype=np.int64)
    k = int(ks.max())
    cap = max(16 * k, 1024)  # room for the blocks' tokens near the top, before the exact top k is kept
    ids = np.empty((n, cap), dtype=np.int32)
    vals = np.empty((n, cap), dtype=np.float32)
    counts = np.empty(n, dtype=np.int64)
    scratch = np.empty(k + v // 64 + 1, dtype=np.float32)
    lib.ggufrun_topk_candidates(logits.ctypes.data, n, v, logits.strides[0] // 4, ks.ctypes.data, cap,
                                ids.ctypes.data, vals.ctypes.data, counts.ctypes.data, scratch.ctypes.data)
    return [None if c < 0 else (ids[r, :c], vals[r, :c]) for r, c in enumerate(counts.tolist())]
