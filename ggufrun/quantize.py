"""Quantising GGUF files with llama.cpp's quantiser (``ggufrun quantize``, and bench's derived quants)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import ConfigError


def quant_types() -> list[str]:
    """The file types llama.cpp's quantiser can write, lower case (q4_k_m, q8_0, f16, ...)."""
    from .runtime import quant_types as types

    return types()


def quantize_file(src: Path, dst: Path, qtype: str, *, threads: int = 0) -> Path:
    """``src`` quantised to ``qtype`` at ``dst``; raises ModelLoadError when llama.cpp fails."""
    from .runtime import quantize
    from .trial import trial_load

    trial_load(src)  # llama.cpp's quantiser trusts the file as its loader does: a crash stays in a child
    return quantize(src, dst, qtype, threads=threads)


def quantize_many(source: str, qtypes: Sequence[str], *, out_dir: Path | None = None, registry: Any = None,
                  threads: int = 0, report: Callable[[str], None] | None = None) -> list[tuple[str, Path]]:
    """Quantise a file (or a registry model, fetched if needed) to each type; returns (type, path).

    Output names swap the source's type suffix for the new one (x-q4_k_m.gguf -> x-q4_0.gguf).
    Raises ConfigError for an unknown type (before any work), ModelLoadError when llama.cpp fails.
    """
    from .fetch import ensure_local

    known = set(quant_types())
    wanted = [q.lower().replace("fp16", "f16") for q in qtypes]
    bad = [q for q, w in zip(qtypes, wanted) if w not in known]
    if not wanted or bad:
        raise ConfigError(f"Unknown quant type(s): {', '.join(bad) or '(none given)'}.", f"Choose from: {', '.join(sorted(known))}.")
    if registry is None:
        from . import registry as registry_mod

        registry = registry_mod.load()
    src = ensure_local(registry.resolve(source))
    folder = out_dir or src.parent
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for q in wanted:
        dst = folder / quantized_name(src, q)
        if dst.resolve() == src.resolve():
            raise ConfigError(f"{src.name} is already {q}.", "Pick another type or --out-dir.")
        if report:
            report(f"Quantising {src.name} to {q} -> {dst}")
        made.append((q, quantize_file(src, dst, q, threads=threads)))
    return made


def quantized_name(src: Path, qtype: str) -> str:
    """``src``'s file name with its type suffix replaced by ``qtype`` (appended when it has none)."""
    match = re.search(r"(?i)[-_.]((?:q\d|iq\d)\w*|f16|fp16|bf16|f32)$", src.stem)
    base = src.stem[: match.start(1)] if match else f"{src.stem}-"
    return f"{base}{qtype}.gguf"
