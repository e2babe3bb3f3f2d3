"""System prompts for ``--system``: ``@NAME`` from the prompts folders, a file, or literal text.

``@NAME`` looks for ``NAME.txt`` in the user's ``$GGUFRUN_HOME/prompts`` first, then in the ones
shipped with ggufrun (assistant, translator, json).
"""

from __future__ import annotations

import os
from pathlib import Path

from . import paths
from .errors import ConfigError

_SUFFIXES = (".txt", ".md", ".prompt")


def available() -> list[str]:
    """Names usable as ``@NAME``, the user's and the shipped ones, sorted."""
    names: set[str] = set()
    for folder in paths.prompts_dirs():
        if folder.is_dir():
            names.update(p.stem for p in folder.iterdir() if p.suffix == ".txt" and p.is_file())
    return sorted(names)


def resolve_system(value: str | None) -> str | None:
    """The system prompt text for a ``--system`` value; raise ConfigError naming what failed."""
    if value is None:
        return None
    if value.startswith("@"):
        name = value[1:].strip()
        for folder in paths.prompts_dirs():
            candidate = folder / f"{name}.txt"
            if name and "/" not in name and candidate.is_file():
                return _read(candidate)
        listed = ", ".join(f"@{n}" for n in available()) or "none"
        raise ConfigError(f"Unknown system prompt '{value}'.", f"Available: {listed}; or pass a file or the text itself.")
    if _looks_like_path(value):
        path = Path(value).expanduser()
        if not path.exists():
            raise ConfigError(f"System prompt file not found: {value}.", "Pass an existing file, @NAME, or the text itself.")
        return _read(path)
    return value


def _looks_like_path(value: str) -> bool:
    # Literal text usually has spaces; a single word that names a file, or has a path's shape, is a path.
    if "\n" in value or " " in value.strip():
        return Path(value).expanduser().is_file()
    return Path(value).expanduser().exists() or os.sep in value or value.lower().endswith(_SUFFIXES)


def _read(path: Path) -> str:
    from .textfile import read_text

    if path.is_dir():
        raise ConfigError(f"System prompt file {path} is a folder.")
    return read_text(path, "system prompt file").strip()  # FIFOs, devices, binary: one-line ConfigError
