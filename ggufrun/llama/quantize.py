"""llama.cpp's quantiser."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from ..errors import ConfigError, ModelLoadError
from ._lib import L, init_backend


_QTYPES = {
    name[len("LLAMA_FTYPE_MOSTLY_"):].lower(): getattr(L, name)
    for name in dir(L) if name.startswith("LLAMA_FTYPE_MOSTLY_")
}
_QTYPES["f32"] = L.LLAMA_FTYPE_ALL_F32


def quant_types() -> list[str]:
    """Quantisation types llama.cpp's quantiser can write."""
    return sorted(_QTYPES)


def quantize(src: Path | str, dst: Path | str, qtype: str, *, threads: int = 0) -> Path:
    """Quantise ``src`` into ``dst`` with llama.cpp's quantiser (written to a temp name, then renamed)."""
    key = qtype.lower().replace("fp16", "f16")
    if key not in _QTYPES:
        raise ConfigError(f"Unknown quant type '{qtype}'.", f"Choose from: {', '.join(quant_types())}.")
    src, dst = Path(src), Path(dst)
    from ..gguf_info import validate as validate_gguf

    validate_gguf(src)
    init_backend()
    params = L.llama_model_quantize_default_params()
    params.ftype = _QTYPES[key]
    params.nthread = threads or os.cpu_count() or 1
    params.allow_requantize = True
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.incomplete")
    try:
        rc = L.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise ModelLoadError(f"llama.cpp could not quantise {src.name} to {qtype} (code {rc}).")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
