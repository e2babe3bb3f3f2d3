"""libggml through ctypes, typed once, and the CPU backend's features and extra weight buffer types.

The floor under ggml.py (devices, RPC workers, the CPU report) and amx.py (which decides whether
llama.cpp may place weights in AMX buffers): both need these, so neither imports the other for them.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, Callable

_lib: Any = None
_lock = threading.Lock()  # drop_extra_buffer_type edits one process-wide array


def load() -> Any:
    """libggml (the registry; dlsym also finds libggml-base's symbols through it), typed once."""
    global _lib
    if _lib is not None:
        return _lib
    from ._lib import L  # loads libllama with the system libstdc++ first (see _lib.py)

    from llama_cpp._ggml import libggml as lib

    del L
    vp, sz, cs, i32 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_int
    sigs: dict[str, tuple[Any, list[Any]]] = {
        "ggml_backend_reg_by_name": (vp, [cs]),
        "ggml_backend_reg_name": (cs, [vp]),
        "ggml_backend_reg_get_proc_address": (vp, [vp, cs]),
        "ggml_backend_reg_dev_count": (sz, [vp]),
        "ggml_backend_reg_dev_get": (vp, [vp, sz]),
        "ggml_backend_register": (None, [vp]),
        "ggml_backend_dev_count": (sz, []),
        "ggml_backend_dev_get": (vp, [sz]),
        "ggml_backend_dev_by_name": (vp, [cs]),
        "ggml_backend_dev_name": (cs, [vp]),
        "ggml_backend_dev_description": (cs, [vp]),
        "ggml_backend_dev_type": (i32, [vp]),
        "ggml_backend_dev_memory": (None, [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)]),
        "ggml_backend_dev_backend_reg": (vp, [vp]),
        "ggml_set_abort_callback": (vp, [vp]),
        "ggml_backend_buft_name": (cs, [vp]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    _lib = lib
    return lib


def text(raw: bytes | None) -> str:
    """A C string from ggml as text (None as "")."""
    return raw.decode("utf-8", "replace") if raw else ""


def cpu_features() -> dict[str, str]:
    """The CPU backend's compiled-and-detected features (ggml_backend_get_features), e.g. AVX512=1.

    With GGML_CPU_ALL_VARIANTS this names the variant loaded at run time; with a native build, the
    instruction sets this build uses on this CPU.
    """
    lib = load()
    reg = lib.ggml_backend_reg_by_name(b"CPU")
    if not reg:
        return {}
    addr = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_get_features")
    if not addr:
        return {}

    class Feature(ctypes.Structure):
        _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]

    get = ctypes.CFUNCTYPE(ctypes.POINTER(Feature), ctypes.c_void_p)(addr)
    out: dict[str, str] = {}
    feats = get(reg)
    i = 0
    while feats and feats[i].name:
        out[text(feats[i].name)] = text(feats[i].value)
        i += 1
    return out


def _cpu_extra_bufts() -> Any:
    """The CPU device's extra weight buffer types (AMX, CPU_REPACK, ...): the NULL-terminated array that
    llama.cpp reads at every model load (make_cpu_buft_list, through the CPU backend's public
    ``ggml_backend_dev_get_extra_bufts`` proc address), or None. ggml returns the same static
    array each call, so an edit here holds for every later load in this process."""
    lib = load()
    reg = lib.ggml_backend_reg_by_name(b"CPU")
    if not reg:
        return None
    addr = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if not addr:
        return None
    get = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(addr)
    arr = get(lib.ggml_backend_reg_dev_get(reg, 0))
    return arr if arr else None


def extra_buffer_types() -> list[str]:
    """Names of the extra CPU weight buffer types llama.cpp will use at the next load, in its order of preference."""
    arr = _cpu_extra_bufts()
    lib = load()
    names: list[str] = []
    i = 0
    while arr is not None and arr[i]:
        names.append(text(lib.ggml_backend_buft_name(arr[i])))
        i += 1
    return names


def remove_from_null_terminated(arr: Any, drop: Callable[[int], bool]) -> int:
    """Remove the entries ``drop`` selects from a NULL-terminated ``c_void_p`` array, in place and in
    order (the array only shrinks, so its storage suffices); return how many were removed."""
    read = write = 0
    while arr[read]:
        ptr = arr[read]
        if not drop(ptr):
            arr[write] = ptr
            write += 1
        read += 1
    for i in range(write, read + 1):
        arr[i] = None
    return read - write


def drop_extra_buffer_type(name: str) -> bool:
    """Stop llama.cpp from placing weights in the extra buffer type ``name`` (e.g. "AMX") at later
    loads in this process, keeping the others (CPU_REPACK's interleaved kernels); True if it was listed.
    The llama_model_params switch use_extra_bufts would drop them all."""
    arr = _cpu_extra_bufts()
    if arr is None:
        return False
    lib = load()
    with _lock:
        return remove_from_null_terminated(arr, lambda p: text(lib.ggml_backend_buft_name(p)) == name) > 0
