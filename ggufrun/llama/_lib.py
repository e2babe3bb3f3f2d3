"""The one place llama_cpp is imported: the libstdc++ preload, llama.cpp's log filter and backend start-up.

We drive llama.cpp's low-level API (llama_decode + our own sampling) rather than
``llama_cpp.Llama``: measured on gemma3-270m with 2 threads, the high-level streaming path loses
8-23% of generation speed, the low-level loop none.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any


def _prefer_system_libstdcxx() -> None:
    """Put the system libstdc++ first in the global symbol scope before llama.cpp loads.

    Some CUDA builds of libggml-cuda link libstdc++ statically and export its symbols; libllama's
    std::ostream calls then bind to that copy, whose locale is never initialised, and loading a
    model segfaulted in llama_model::print_info (seen on an H100 machine, depending on import order).
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
        except OSError:
            pass


_prefer_system_libstdcxx()
# On a GGML_ASSERT, ggml's backtrace printer forks and runs gdb on this process; gdb inherited the
# server's socket and hung with it. ggml reads this variable when it aborts (ggml.c,
# ggml_print_backtrace): set, the abort is a plain abort. Children (the trial load) inherit it.
os.environ["GGML_NO_BACKTRACE"] = "1"
import llama_cpp as L  # noqa: E402

from .. import paths

FLASH_ATTN = {"on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED, "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED, "auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO}
# settings.KV_CACHE_TYPES as ggml_type values; llama_cpp names no GGML_TYPE_BF16, ggml.h gives it 30.
KV_TYPES = {"f32": L.GGML_TYPE_F32, "f16": L.GGML_TYPE_F16, "bf16": 30, "q8_0": L.GGML_TYPE_Q8_0, "q4_0": L.GGML_TYPE_Q4_0,
            "q4_1": L.GGML_TYPE_Q4_1, "iq4_nl": L.GGML_TYPE_IQ4_NL, "q5_0": L.GGML_TYPE_Q5_0, "q5_1": L.GGML_TYPE_Q5_1}
ALL_LAYERS = 0x7FFFFFFF  # llama.cpp clamps this to the model's layer count
_backend_ready = False
_GGML_LOG_ERROR = 4  # ggml.h: NONE, DEBUG, INFO, WARN, ERROR, CONT


_log_errors: list[str] = []  # llama.cpp's recent error lines, for the one-line error that follows them


_kv_buffers: list[int] = []  # bytes of each "KV buffer size" line since kv_buffer_bytes() last read them
_debug = False


@L.llama_log_callback
def quiet_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # Never printed: a failure becomes one line naming llama.cpp's reason (GGUFRUN_DEBUG=1 shows the log).
    if _debug:
        sys.stderr.write(text.decode("utf-8", "replace"))
    if b"KV buffer size" in text:  # "llama_kv_cache:        CPU KV buffer size =     2.29 MiB", per device and cache
        try:
            _kv_buffers.append(int(float(text.split(b"=")[-1].split()[0]) * (1 << 20)))
        except (ValueError, IndexError):
            pass
    if level == _GGML_LOG_ERROR:
        line = text.decode("utf-8", "replace").strip()
        if line:
            _log_errors[:] = [*_log_errors[-7:], line]


def llama_reason() -> str:
    """llama.cpp's last "error ..." line since the previous call, as a clause for a message; clears them."""
    lines, _log_errors[:] = list(_log_errors), []
    for line in reversed(lines):
        if "error" in line.lower() and ":" in line:
            reason = line.split("error loading model:", 1)[-1].split(": ", 1)[-1] if "error loading model" in line \
                else line.split(": ", 1)[-1]
            return ": " + " ".join(reason.split())[:300]
    return ""


def kv_buffer_bytes() -> int:
    """The KV cache bytes llama.cpp has logged allocating since the last call (MiB to 2 decimals); clears them."""
    total, _kv_buffers[:] = sum(_kv_buffers), []
    return total


def init_backend() -> None:
    global _backend_ready, _debug
    if _backend_ready:
        return
    # llama.cpp prints pages of load logs to stderr by default; keep errors only unless debugging
    # (then the callback prints them: it always runs, to read the KV cache's size).
    _debug = paths.debug()
    L.llama_log_set(quiet_log, ctypes.c_void_p(0))
    L.llama_backend_init()
    _backend_ready = True


def numpy() -> Any:
    import numpy

    return numpy
