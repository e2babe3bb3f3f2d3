"""``--n-gpu-layers auto``: how many layers fit on this machine's GPUs, decided before loading.

The estimate is gguf_info's (weights, KV cache and compute, split by layer as llama.cpp places
them), so ``ggufrun show`` and the loader agree. Each GPU keeps a margin free (other processes,
the CUDA context, buffers the estimate does not see). A CPU-only build gives 0 without a word.
If the part left on the CPU does not fit in RAM, the load is refused with the numbers.

| variable               | meaning                                                         |
|------------------------|-----------------------------------------------------------------|
| GGUFRUN_SIMULATE_GPU   | ``name=FakeGPU,total=8GiB,free=6GiB``: decide as if this GPU were there (``;`` between several) |
| GGUFRUN_SIMULATE_RAM   | ``16GiB``: decide as if this much RAM were available            |
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, GgufrunError

if TYPE_CHECKING:
    from .gguf_info import GGUFInfo, MemoryEstimate
    from .llama.devices import Device

RAM_ENV = "GGUFRUN_SIMULATE_RAM"
# Kept free on each GPU: a CUDA context and allocator slack take a few hundred MB. A fixed amount,
# not a share of the card: 5% of an 80 GB H100 (4 GB) put 0 of 29 layers on a card with 3.5 GB free.
_MARGIN = 1024**3


class DoesNotFitError(GgufrunError):
    """The model, at this context, needs more memory than this machine has."""


@dataclass(frozen=True)
class Plan:
    n_gpu_layers: int  # what llama.cpp gets: 0 .. n_layers (the output layer counts as one)
    n_layers: int  # repeating blocks + the output layer
    estimate: MemoryEstimate
    devices: tuple[Device, ...] = ()
    ram_available: int = 0
    notes: tuple[str, ...] = field(default=())

    @property
    def gpu_total(self) -> int:
        return sum(d.total for d in self.devices)

    def describe(self) -> str:
        """One line: "28/29 layers on NVIDIA H100 80GB HBM3, 5.7 of 79.1 GB"."""
        from .cache import human_size

        if not self.devices:
            return f"0/{self.n_layers} layers on a GPU (this llama.cpp build has none); {human_size(self.estimate.cpu)} in RAM"
        where = self.devices[0].description or self.devices[0].name if len(self.devices) == 1 else \
            f"{len(self.devices)} GPUs ({', '.join(d.name for d in self.devices)})"
        gb = lambda n: f"{n / 1e9:.1f}"  # noqa: E731
        line = f"{self.n_gpu_layers}/{self.n_layers} layers on {where}, {gb(self.estimate.gpu)} of {gb(self.gpu_total)} GB"
        if self.n_gpu_layers < self.n_layers:
            line += f"; {human_size(self.estimate.cpu)} in RAM"
        return line

    def to_dict(self) -> dict[str, Any]:
        return {"n_gpu_layers": self.n_gpu_layers, "n_layers": self.n_layers, "gpu_bytes": self.estimate.gpu,
                "cpu_bytes": self.estimate.cpu, "devices": [d.to_dict() for d in self.devices],
                "ram_available": self.ram_available, "summary": self.describe()}


def ram_available() -> int:
    """Bytes of RAM the model may use (psutil's ``available``, or GGUFRUN_SIMULATE_RAM)."""
    from .llama.devices import parse_size

    sim = os.environ.get(RAM_ENV)
    if sim is not None:
        return parse_size(sim, RAM_ENV)
    import psutil

    return int(psutil.virtual_memory().available)


def gpu_budget(device: Device) -> int:
    return max(0, device.free - _MARGIN)


def plan(info: GGUFInfo, n_ctx: int, *, devices: Sequence[Device] | None = None, ram: int | None = None,
         n_ubatch: int = 512, cache_types: tuple[str, str] = ("f16", "f16"), kv_cells: int | None = None) -> Plan:
    """The most layers whose GPU share fits the GPUs' free memory less a margin.

    ``devices`` defaults to llama.cpp's GPUs (or the simulated ones). llama.cpp splits layers
    across several GPUs by their free memory, so their budgets are summed. Raises ConfigError
    for a malformed simulation variable.
    """
    if devices is None:
        from .llama.devices import gpus

        devices = gpus()
    ram = ram_available() if ram is None else ram
    n_layers = (info.block_count or 0) + 1
    budget = sum(gpu_budget(d) for d in devices)
    lo, hi = 0, n_layers if devices else 0
    while lo < hi:  # memory grows with every layer offloaded: the largest that fits
        mid = (lo + hi + 1) // 2
        if info.memory_estimate(n_ctx, n_gpu_layers=mid, n_ubatch=n_ubatch, cache_types=cache_types, kv_cells=kv_cells).gpu <= budget:
            lo = mid
        else:
            hi = mid - 1
    estimate = info.memory_estimate(n_ctx, n_gpu_layers=lo, n_ubatch=n_ubatch, cache_types=cache_types, kv_cells=kv_cells)
    return Plan(n_gpu_layers=lo, n_layers=n_layers, estimate=estimate,
                devices=tuple(devices), ram_available=ram)


def check_ram(p: Plan, what: str) -> None:
    """Raise DoesNotFitError when the share left on the CPU is more than the RAM available."""
    from .cache import human_size

    est = p.estimate
    if est.cpu <= p.ram_available:
        return
    gpu = f" with {p.n_gpu_layers}/{p.n_layers} layers on the GPU" if p.devices else ""
    raise DoesNotFitError(
        f"{what} needs {human_size(est.cpu)} of RAM at n_ctx {est.n_ctx}{gpu} (weights {human_size(est.weights_cpu)}"
        f" + KV cache {human_size(est.kv_cpu)}{' + compute ' + human_size(est.compute) if not est.n_gpu_layers else ''}),"
        f" but {human_size(p.ram_available)} is available.",
        "Use a smaller --n-ctx, a smaller quant, or free some memory.",
    )


def decide(info: GGUFInfo, n_ctx: int, what: str, *, n_ubatch: int = 512, cache_types: tuple[str, str] = ("f16", "f16"),
           kv_cells: int | None = None) -> Plan:
    """plan() for a model about to load, refused (DoesNotFitError) when the CPU share does not fit."""
    trained = info.context_length
    if trained and n_ctx > trained:  # the same refusal llama.cpp's loading would give, before any estimate
        raise ConfigError(f"n_ctx={n_ctx} is larger than the model's trained context ({trained}).", f"Use --n-ctx {trained} or less.")
    p = plan(info, n_ctx, n_ubatch=n_ubatch, cache_types=cache_types, kv_cells=kv_cells)
    check_ram(p, what)
    return p
