"""Where ggufrun keeps things, and the environment variables that move them.

Everything is read lazily, when a function is called, so that tests (and users) can change
the environment at any time.

| variable         | meaning                                               | default                    |
|------------------|-------------------------------------------------------|----------------------------|
| GGUFRUN_HOME     | root of the cache, config.toml and the user registry  | platform cache dir/ggufrun |
| GGUFRUN_MODELS   | an extra models.toml overlaid on the shipped one      | $GGUFRUN_HOME/models.toml  |
| GGUFRUN_HF_ENDPOINT | Hugging Face mirror used when HF_ENDPOINT is unset | https://hf-mirror.com      |
| GGUFRUN_MS_ENDPOINT | ModelScope endpoint                               | https://www.modelscope.cn  |
| GGUFRUN_OFFLINE / HF_HUB_OFFLINE | use only the cache                       | off                        |
| GGUFRUN_DEBUG    | print tracebacks instead of one-line errors           | off                        |
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE_DATA = Path(__file__).resolve().parent / "data"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def home() -> Path:
    """The ggufrun home folder (created on demand by the writers, not here)."""
    env = os.environ.get("GGUFRUN_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    elif os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "ggufrun"


def models_dir() -> Path:
    """Root of the model cache: ``models/<source>/<repo>/<file>``."""
    return home() / "models"


def config_file() -> Path:
    return home() / "config.toml"


def builtin_registry() -> Path:
    return PACKAGE_DATA / "models.toml"


def user_registry() -> Path:
    env = os.environ.get("GGUFRUN_MODELS")
    return Path(env).expanduser() if env else home() / "models.toml"


def prompts_dirs() -> list[Path]:
    """Folders searched for ``--system @NAME``: the user's first, then the shipped ones."""
    return [home() / "prompts", PACKAGE_DATA / "prompts"]


def hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or os.environ.get("GGUFRUN_HF_ENDPOINT") or "https://hf-mirror.com").rstrip("/")


def ms_endpoint() -> str:
    return (os.environ.get("GGUFRUN_MS_ENDPOINT") or os.environ.get("MODELSCOPE_ENDPOINT") or "https://www.modelscope.cn").rstrip("/")


def offline() -> bool:
    return _truthy(os.environ.get("GGUFRUN_OFFLINE")) or _truthy(os.environ.get("HF_HUB_OFFLINE"))


def debug() -> bool:
    return _truthy(os.environ.get("GGUFRUN_DEBUG"))
