"""Shared by the bench scripts: find llama.cpp's reference tools and the model files to measure."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# A workplace checkout has shared/ beside it; elsewhere pass the tool's path.
REFERENCE_TOOL = ROOT.parent / "shared" / "tools" / "build-reference-llama-cpp"


def find_tool(name: str, given: str | None) -> Path:
    """``given`` (a binary or its bin folder), else PATH, else the reference build under
    ~/.cache/ggufrun-reference (built from llama-cpp-python's vendored llama.cpp)."""
    if given:
        path = Path(given).expanduser()
        path = path / name if path.is_dir() else path
        if not path.is_file():
            sys.exit(f"{name} not found at {path}.")
        return path
    found = shutil.which(name)
    if found:
        return Path(found)
    for candidate in sorted(Path.home().glob(f".cache/ggufrun-reference/*/build/bin/{name}"), reverse=True):
        return candidate
    sys.exit(f"{name} not found: pass --{name} PATH, or build it with `bash {REFERENCE_TOOL}` "
             "(it prints the bin folder; about 8 minutes on 2 cores).")


def model_path(name: str) -> Path:
    """A .gguf path as given, or a registry name fetched into the cache as `ggufrun pull` would."""
    from ggufrun import fetch, registry

    return fetch.ensure_local(registry.load().resolve(name))
