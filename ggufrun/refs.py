"""ModelRef: a model name as a user types it, parsed once at the edge.

Grammar (first match wins):

| form                         | kind   | example                               |
|------------------------------|--------|---------------------------------------|
| a path ending in .gguf, or an existing file | path | ./q7.gguf, /models/x.gguf         |
| hf:OWNER/REPO/PATH.gguf[@REV] | hf    | hf:Qwen/Qwen2-7B-Instruct-GGUF/qwen2-7b-instruct-q4_0.gguf |
| hf:OWNER/REPO[:QUANT][@REV]  | hf     | hf:bartowski/gemma-2-9b-it-GGUF:q5_k_m, hf:Org/Repo@v1.0 (the file is picked from the repo's listing; Q4_K_M by default) |
| ms:... (the same two forms)  | ms     | ms:qwen/Qwen2-7B-Instruct-GGUF:Q8_0 |
| NAME:QUANT                   | alias  | qwen2-7b-instruct:q4_k_m, gemma-2-9b-it:Q5_K_M |
| NAME                         | alias  | qwen2-7b, qwen2-7b-q5 (the quant suffix is split off by the registry) |

An alias that itself contains ':' (``qwen2:7b``) is tried whole by the registry first.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UnknownModelError


@dataclass(frozen=True)
class ModelRef:
    kind: str  # "alias" | "path" | "hf" | "ms"
    name: str  # alias, path, or OWNER/REPO
    quant: str | None = None
    file: str | None = None  # for hf/ms: the path in the repo; None = pick it by quant from the listing
    raw: str = ""
    revision: str | None = None  # for hf/ms: branch, tag or commit; None = the hub's default branch

    def __str__(self) -> str:
        return self.raw or self.name


_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_QUANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")


def parse(text: str) -> ModelRef:
    """Parse a model reference; raise UnknownModelError for an empty or malformed one."""
    raw = text.strip()
    if not raw:
        raise UnknownModelError("Empty model name.", "See `ggufrun list`.")
    lower = raw.lower()
    if lower.startswith(("hf:", "ms:")):
        return _parse_hub(lower[:2], raw)
    if lower.endswith(".gguf") or os.sep in raw or raw.startswith(".") or Path(raw).is_file():
        return ModelRef(kind="path", name=str(Path(raw).expanduser()), raw=raw)
    if ":" in raw:
        name, _, quant = raw.rpartition(":")
        return ModelRef(kind="alias", name=name, quant=quant or None, raw=raw)
    return ModelRef(kind="alias", name=raw, raw=raw)


def _parse_hub(kind: str, raw: str) -> ModelRef:
    """``hf:OWNER/REPO/PATH.gguf[@REV]`` or ``hf:OWNER/REPO[:QUANT][@REV]`` (the same for ms:)."""
    usage = f"Use {kind}:OWNER/REPO[:QUANT][@REVISION] or {kind}:OWNER/REPO/FILE.gguf."
    rest = raw[3:]
    if any(c.isspace() for c in rest) or "\x00" in rest:
        raise UnknownModelError(f"Malformed reference '{raw}': it contains spaces.", usage)
    rest, at, revision = rest.partition("@")
    if at and not (_REVISION.fullmatch(revision) and ".." not in revision):
        raise UnknownModelError(f"Malformed revision '{revision}' in '{raw}'.", "A revision is a branch, tag or commit id.")
    parts = rest.split("/")
    if not all(parts):
        raise UnknownModelError(f"Malformed reference '{raw}': empty path part.", usage)
    quant = None
    if len(parts) == 2 and ":" in parts[1]:
        parts[1], _, quant = parts[1].partition(":")
        if not _QUANT.fullmatch(quant):
            raise UnknownModelError(f"Malformed quant '{quant}' in '{raw}'.", usage)
    if len(parts) < 2 or not all(_REPO_PART.fullmatch(p) and ".." not in p for p in parts[:2]):
        raise UnknownModelError(f"Malformed reference '{raw}'.", usage)
    file = None
    if len(parts) > 2:
        file = check_remote_filename("/".join(parts[2:]))
    return ModelRef(kind=kind, name="/".join(parts[:2]), quant=quant, file=file, raw=raw, revision=revision or None)


def check_remote_filename(name: str) -> str:
    """Reject a remote file name that could escape the cache folder."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\x00" in name:
        raise UnknownModelError(f"Unsafe remote file name '{name}'.", "A file name may not contain '..', empty parts or a leading '/'.")
    return name
