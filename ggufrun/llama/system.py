"""What this llama.cpp build can do: devices and CPU features."""

from __future__ import annotations

from typing import Any

from ._lib import L, init_backend


def gpu_info() -> dict[str, Any]:
    """Whether this llama.cpp build can offload, and its devices (empty on a CPU build)."""
    from .devices import real_devices

    init_backend()
    return {"offload": bool(L.llama_supports_gpu_offload()), "devices": [d.to_dict() for d in real_devices()]}


def system_info() -> str:
    """llama.cpp's build and CPU feature line."""
    init_backend()
    return L.llama_print_system_info().decode("utf-8", "replace").strip()
