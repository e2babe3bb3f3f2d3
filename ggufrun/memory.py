"""Memory measurements for the bench: the process's peak resident set and GPU memory via NVML.

NVML is reached through ctypes (libnvidia-ml ships with the driver), so no Python package is
needed; where it is absent every GPU figure is None ("n/a" in reports).
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Any


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process so far (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        try:
            import psutil

            info = psutil.Process().memory_info()
            return int(getattr(info, "peak_wset", info.rss))
        except Exception:
            return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


@functools.lru_cache(maxsize=1)
def _nvml() -> Any:
    for name in ("libnvidia-ml.so.1", "libnvidia-ml.so", "nvml.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        init = getattr(lib, "nvmlInit_v2", None) or getattr(lib, "nvmlInit", None)
        if init is not None and init() == 0:
            return lib
    return None


def _handles(lib: Any) -> list[ctypes.c_void_p]:
    count = ctypes.c_uint(0)
    if lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
        return []
    out = []
    for i in range(count.value):
        handle = ctypes.c_void_p()
        if lib.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(handle)) == 0:
            out.append(handle)
    return out


def gpus() -> list[dict[str, Any]]:
    """Name, driver and memory of each NVIDIA GPU; empty without NVML."""
    lib = _nvml()
    if lib is None:
        return []
    driver = ctypes.create_string_buffer(96)
    lib.nvmlSystemGetDriverVersion(driver, 96)
    out = []
    for handle in _handles(lib):
        name = ctypes.create_string_buffer(96)
        lib.nvmlDeviceGetName(handle, name, 96)
        mem = _Memory()
        lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(mem))
        out.append({"name": name.value.decode(errors="replace"), "driver": driver.value.decode(errors="replace"),
                    "memory_total": int(mem.total), "memory_used": int(mem.used)})
    return out


def gpu_used_bytes() -> int | None:
    """Device memory in use, summed over all GPUs (None without NVML). The bench reports the
    growth of this figure across one configuration, so other processes' use cancels out unless
    it changes meanwhile."""
    lib = _nvml()
    if lib is None:
        return None
    total = 0
    handles = _handles(lib)
    if not handles:
        return None
    for handle in handles:
        mem = _Memory()
        if lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(mem)) != 0:
            return None
        total += int(mem.used)
    return total
