"""What this llama.cpp build can do: devices and CPU features."""

from __future__ import annotations

from typing import Any

from ._lib import L, init_backend


def gpu_info() -> dict[str, Any]:
    """Whether this llama.cpp build can offload, and its devices (empty on a CPU build)."""
    init_backend()
    devices = []
    for i in range(L.ggml_backend_dev_count()) if hasattr(L, "ggml_backend_dev_count") else ():
        dev = L.ggml_backend_dev_get(i)
        devices.append({"name": L.ggml_backend_dev_name(dev).decode(), "description": L.ggml_backend_dev_description(dev).decode()})
    return {"offload": bool(L.llama_supports_gpu_offload()), "devices": devices}


def system_info() -> str:
    """llama.cpp's build and CPU feature line."""
    init_backend()
    return L.llama_print_system_info().decode("utf-8", "replace").strip()
