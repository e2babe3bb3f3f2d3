"""ModelRef: a model name as a user types it, parsed once at the edge.

Grammar (first match wins):

| form                         | kind   | example                               |
|------------------------------|--------|---------------------------------------|
| a path ending in .gguf, or an existing file | path | ./q7.gguf, /models/x.gguf         |
| hf:OWNER/REPO/FILE           | hf     | hf:Qwen/Qwen2-7B-Instruct-GGUF/qwen2-7b-instruct-q4_0.gguf |
| ms:OWNER/REPO/FILE           | ms     | ms:qwen/Qwen2-7B-Instruct-GGUF/qwen2-7b-instruct-q4_0.gguf |
| NAME:QUANT                   | alias  | qwen2-7b-instruct:q4_k_m, gemma-2-9b-it:Q5_K_M |
| NAME                         | alias  | qwen2-7b, qwen2-7b-q5 (the quant suffix is split off by the registry) |

An alias that itself contains ':' (``qwen2:7b``) is tried whole by the registry first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UnknownModelError


@dataclass(frozen=True)
class ModelRef:
    kind: str  # "alias" | "path" | "hf" | "ms"
    name: str  # alias, path, or OWNER/REPO
    quant: str | None = None
    file: str | None = None  # for hf/ms
    raw: str = ""

    def __str__(self) -> str:
        return self.raw or self.name


def parse(text: str) -> ModelRef:
    """Parse a model reference; raise UnknownModelError for an empty or malformed one."""
    raw = text.strip()
    if not raw:
        raise UnknownModelError("Empty model name.", "See `ggufrun list`.")
    lower = raw.lower()
    if lower.startswith(("hf:", "ms:")):
        kind, rest = lower[:2], raw[3:].strip("/")
        parts = rest.split("/")
        if len(parts) < 3 or not all(parts):
            raise UnknownModelError(
                f"Malformed reference '{raw}'.", f"Use {kind}:OWNER/REPO/FILE.gguf."
            )
        file = "/".join(parts[2:])
        check_remote_filename(file)
        return ModelRef(kind=kind, name="/".join(parts[:2]), file=file, raw=raw)
    if lower.endswith(".gguf") or os.sep in raw or raw.startswith(".") or Path(raw).is_file():
        return ModelRef(kind="path", name=str(Path(raw).expanduser()), raw=raw)
    if ":" in raw:
        name, _, quant = raw.rpartition(":")
        return ModelRef(kind="alias", name=name, quant=quant or None, raw=raw)
    return ModelRef(kind="alias", name=raw, raw=raw)


def check_remote_filename(name: str) -> str:
    """Reject a remote file name that could escape the cache folder."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\x00" in name:
        raise UnknownModelError(f"Unsafe remote file name '{name}'.", "A file name may not contain '..', empty parts or a leading '/'.")
    return name
