"""The devices llama.cpp would run on, with free and total memory, from ggml's backend device API.

llama-cpp-python 0.3.x does not export ``ggml_backend_dev_*``; ``ggml.py`` binds them from the libggml
that llama_cpp loaded (the registry llama.cpp uses, so a device listed here is one a model can be
offloaded to).

``GGUFRUN_SIMULATE_GPU`` replaces the GPU list, so that the offload decision can be tested on a
CPU-only machine: ``name=FakeGPU,total=8GiB,free=6GiB`` (several devices separated by ``;``).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ConfigError

SIMULATE_ENV = "GGUFRUN_SIMULATE_GPU"
# ggml-backend.h: enum ggml_backend_dev_type
_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}
_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


@dataclass(frozen=True)
class Device:
    name: str  # llama.cpp's name, e.g. "CUDA0"
    description: str  # e.g. "NVIDIA H100 80GB HBM3"
    type: str  # cpu | gpu | igpu | accel
    free: int  # bytes
    total: int  # bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def real_devices() -> list[Device]:
    """Every device llama.cpp's ggml registry lists (the CPU, GPUs and registered RPC workers' devices)."""
    from . import ggml

    return [Device(d.name, d.description, d.type, d.free, d.total) for d in ggml.devices()]


def parse_size(text: str, what: str) -> int:
    """``8GiB``, ``6 GB``, ``512MiB`` or a byte count; raise ConfigError naming ``what``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ConfigError(f"Invalid size {text!r} in {what}.", "Use a number with B, KB, MB, GB, KiB, MiB or GiB (e.g. 8GiB).")
    return int(float(m.group(1)) * _UNITS[unit])


def simulated_gpus(spec: str) -> list[Device]:
    """Devices described by GGUFRUN_SIMULATE_GPU; raise ConfigError for a malformed value."""
    out = []
    for i, part in enumerate(p for p in spec.split(";") if p.strip()):
        fields: dict[str, str] = {}
        for item in part.split(","):
            key, sep, value = item.partition("=")
            if not sep or key.strip() not in ("name", "total", "free"):
                raise ConfigError(f"Invalid {SIMULATE_ENV} entry {item.strip()!r}.",
                                  'Use "name=FakeGPU,total=8GiB,free=6GiB" (devices separated by ";").')
            fields[key.strip()] = value.strip()
        total = parse_size(fields.get("total", ""), SIMULATE_ENV)
        free = parse_size(fields["free"], SIMULATE_ENV) if "free" in fields else total
        if free > total:
            raise ConfigError(f"{SIMULATE_ENV}: free ({fields['free']}) is more than total ({fields['total']}).")
        name = fields.get("name") or f"SimGPU{i}"
        out.append(Device(name=name, description=name, type="gpu", free=free, total=total))
    return out


def gpus() -> list[Device]:
    """The devices layers can be offloaded to (simulated ones when GGUFRUN_SIMULATE_GPU is set)."""
    spec = os.environ.get(SIMULATE_ENV)
    if spec is not None:
        return simulated_gpus(spec)
    return [d for d in real_devices() if d.type in ("gpu", "igpu")]
