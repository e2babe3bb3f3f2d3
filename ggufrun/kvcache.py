"""KV cache types (llama.cpp's -ctk/-ctv): the checks llama.cpp makes when it creates a context, made
first so that a refusal names the setting to change (their sizes are settings.KV_CACHE_BYTES).

llama.cpp 0.3.36 (llama_init_from_model), seen in child processes: a quantized V cache with flash
attention off returns no context ("quantized V cache requires flash_attn"); with flash attention
auto it turns flash attention on itself; with flash attention on or auto, a quantized K or V type
whose block (32) does not divide the head size returns no context. Neither aborts the process, but
both failed with a generic message; the checks here say which flag to change.
"""

from __future__ import annotations

from .errors import ConfigError
from .settings import Settings

BLOCK = 32  # elements per block of every quantized type llama.cpp takes for the KV cache


def is_quantized(kind: str) -> bool:
    return kind not in ("f32", "f16", "bf16")


def check(settings: Settings, head_dim_k: int, head_dim_v: int, model: str) -> None:
    """Refuse cache types llama.cpp would refuse for this model (ConfigError naming the fix)."""
    k, v = settings.cache_type_k, settings.cache_type_v
    if is_quantized(v) and settings.flash_attn == "off":
        raise ConfigError(f"cache_type_v={v} needs flash attention, and flash_attn is off.",
                          "Use --flash-attn auto (or on), or --cache-type-v f16.")
    if settings.flash_attn == "off":
        return  # without flash attention llama.cpp reads a quantized K cache through views of whole rows
    for name, kind, dim in (("cache_type_k", k, head_dim_k), ("cache_type_v", v, head_dim_v)):
        if is_quantized(kind) and dim % BLOCK:
            raise ConfigError(f"{name}={kind} stores blocks of {BLOCK} elements, which do not divide the head size "
                              f"({dim}) of {model}.", f"Use --{name.replace('_', '-')} f16 (or bf16, f32).")
