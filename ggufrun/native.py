"""ggufrun's own compiled helper (_topk.c), loaded through ctypes; absent (no C compiler at
install), callers use their numpy path."""

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
                # PyDLL: the GIL stays held during a call. Every call is on a decode step's critical
                # path and short (<1 ms, its threads started in C); released, taking the GIL back
                # waited for the server's HTTP thread, up to the whole switch interval per call.
                lib = ctypes.PyDLL(spec.origin)
                i64, ptr = ctypes.c_int64, ctypes.c_void_p
                f = lib.ggufrun_topk_candidates
                f.restype, f.argtypes = None, [ptr, i64, i64, i64, ptr, i64, ptr, ptr, ptr, i64]
                g = lib.ggufrun_argmax_rows
                g.restype, g.argtypes = None, [ptr, i64, i64, i64, ptr, i64]
                d = lib.ggufrun_draw_rows
                d.restype, d.argtypes = None, [ptr, ptr, ptr, ptr, ptr, i64, i64, ptr]
                lay = lib.ggufrun_token_data_layout
                lay.restype, lay.argtypes = None, [ptr]
                _lib = lib
        except (OSError, AttributeError, ImportError):
            _lib = None
    return _lib


def available() -> bool:
    """Whether the compiled top-k helper is there."""
    return _load() is not None


def topk_candidates(logits: np.ndarray, ks: np.ndarray, threads: int = 1) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Per row of float32 ``logits`` (rows contiguous), every token at or above the row's
    ``ks[row]``-th largest logit, in token order, as (ids, logits); None for a row with a NaN or a
    flat row (more such tokens than fit). Rows split over ``threads`` threads started in C.
    Requires :func:`available`."""
    return candidates_of(*topk_arrays(logits, ks, threads))


def candidates_of(ids: np.ndarray, vals: np.ndarray, counts: np.ndarray) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """:func:`topk_arrays`'s result as :func:`topk_candidates` gives it, a row at a time."""
    return [None if c < 0 else (ids[r, :c], vals[r, :c]) for r, c in enumerate(counts.tolist())]


def topk_arrays(logits: np.ndarray, ks: np.ndarray, threads: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`topk_candidates` as the C side writes it: ids and logits [rows, cap], counts (-1: None)."""
    lib = _load()
    n, v = logits.shape
    _check(logits)
    # A k beyond one per block of 64 has no threshold to find this way: those rows come back None
    # (the C side says so too), and a request's top_k of 100,000 must not size the buffers.
    ks = np.where(ks > v // 64, 0, ks).astype(np.int64)
    k = int(ks.max(initial=0))
    cap = max(16 * k, 1024)  # room for the blocks' tokens near the top, before the exact top k is kept
    ids = np.empty((n, cap), dtype=np.int32)
    vals = np.empty((n, cap), dtype=np.float32)
    counts = np.empty(n, dtype=np.int64)
    lib.ggufrun_topk_candidates(logits.ctypes.data, n, v, logits.strides[0] // 4, ks.ctypes.data, cap,
                                ids.ctypes.data, vals.ctypes.data, counts.ctypes.data, threads)
    return ids, vals, counts


def token_data_layout() -> tuple[int, ...]:
    """sizeof(llama_token_data), sizeof(llama_token_data_array) and the offsets of its size,
    selected and sorted fields, as compiled into the helper."""
    out = np.zeros(5, dtype=np.int64)
    _load().ggufrun_token_data_layout(out.ctypes.data)
    return tuple(int(x) for x in out)


def draw_rows(apply_address: int, chains: list[int], ids: np.ndarray, vals: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per row, the token llama.cpp's sampler chain ``chains[row]`` (an address; 0: none) selects
    from the row's candidates (:func:`topk_arrays`), through llama_sampler_apply at
    ``apply_address``; -1 where the row has no chain or no candidates."""
    rows, cap = ids.shape
    ptrs = (ctypes.c_void_p * max(rows, 1))(*chains)
    out = np.empty(rows, dtype=np.int64)
    _load().ggufrun_draw_rows(apply_address, ptrs, ids.ctypes.data, vals.ctypes.data, counts.ctypes.data, rows, cap,
                              out.ctypes.data)
    return out


def argmax_rows(logits: np.ndarray, threads: int = 1) -> np.ndarray:
    """``logits.argmax(axis=1)`` (the first NaN, else the first maximum), rows split over
    ``threads`` threads started in C. Requires :func:`available`."""
    _check(logits)
    out = np.empty(logits.shape[0], dtype=np.int64)
    _load().ggufrun_argmax_rows(logits.ctypes.data, logits.shape[0], logits.shape[1], logits.strides[0] // 4,
                                out.ctypes.data, threads)
    return out


def _check(logits: np.ndarray) -> None:
    if logits.dtype != np.float32 or logits.ndim != 2 or logits.strides[1] != 4:
        raise ValueError("logits must be a float32 matrix with contiguous rows")
