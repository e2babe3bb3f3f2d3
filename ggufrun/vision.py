"""Which projector a model loads with: ``--mmproj FILE`` (the ``mmproj`` setting), else the one
its registry entry or hub repo names (fetched beside the model), else none: the model reads text
only and requests with images are refused by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ConfigError


def projector_path(spec: Any, settings: Any, *, offline: bool | None = None, progress: Any = None,
                   report: Any = None) -> Path | None:
    """The projector file for ``spec`` under ``settings``, fetched when needed; None without one.
    Raises ConfigError (no such --mmproj file), fetch errors."""
    if settings.mmproj:
        path = Path(settings.mmproj).expanduser()
        if not path.is_file():
            raise ConfigError(f"No projector file at {path} (--mmproj).", "Give the path of an mmproj .gguf file.")
        return path
    pspec = projector_spec(spec, offline=offline, report=report)
    if pspec is None:
        return None
    from .fetch import pull

    return pull(pspec, offline=offline, progress=progress, report=report, fit=False).path


# preference among a repo's projectors: full precision first (what llama-server -hf takes), then smaller
_PREFER = ("f16", "bf16", "f32", "q8_0")


def choose_mmproj(paths: list[str]) -> str | None:
    """The projector among a repo's file paths (``mmproj`` in the name), or None."""
    found = sorted(p for p in paths if p.lower().endswith(".gguf") and "mmproj" in Path(p).name.lower())
    for want in _PREFER:
        for p in found:
            if want in Path(p).name.lower().replace("-", "_").split("."):
                return p
        for p in found:
            if want in Path(p).name.lower().replace("-", "_"):
                return p
    return found[0] if found else None


_NONE_MARK = ".no-mmproj"  # in a repo's cache folder: its listing was read and holds no projector


def projector_spec(spec: Any, *, offline: bool | None = None, report: Any = None) -> Any:
    """A ModelSpec for ``spec``'s projector file in the same repo(s), or None: the registry entry's
    ``mmproj``, or for ``hf:``/``ms:OWNER/REPO[:QUANT]`` the repo's mmproj file. The cache answers
    first; a repo is listed once (a text-only one is marked so, and loads without the network
    after), and a listing that fails is reported and the model loads reading text only."""
    from dataclasses import replace

    from . import paths

    entry = getattr(spec, "entry", None)
    if entry is not None and entry.mmproj:
        sources = tuple(replace(s, file=entry.mmproj) for s in spec.sources if s.hub != "pypi")
        if not sources:
            return None
        return replace(spec, name=f"{entry.name} projector", filename=entry.mmproj, sources=sources, sha256=None,
                       size=None, from_repo=False)
    if not getattr(spec, "from_repo", False):
        return None
    source = spec.sources[0]
    root = paths.models_dir() / spec.cache_key
    cached = [p.relative_to(root).as_posix() for p in root.rglob("*.gguf")] if root.is_dir() else []
    chosen, meta = choose_mmproj(cached), None
    is_offline = paths.offline() if offline is None else offline
    if chosen is None and not is_offline and not (root / _NONE_MARK).exists():
        from .errors import GgufrunError
        from .sources import list_repo

        try:
            meta = {e.path: e for e in list_repo(source)}
        except GgufrunError as exc:
            if report is not None:
                report(f"could not list {source.repo} for a vision projector ({exc.message}): text only")
            return None
        chosen = choose_mmproj(list(meta))
        if chosen is None and root.is_dir():
            (root / _NONE_MARK).touch()
    if chosen is None:
        return None
    entry_meta = meta.get(chosen) if meta else None
    kind = spec.cache_key.split("/", 1)[0]
    return replace(spec, name=f"{kind}:{source.repo}/{chosen}", filename=chosen, sources=(replace(source, file=chosen),),
                   sha256=entry_meta.sha256 if entry_meta else None, size=entry_meta.size if entry_meta else None,
                   from_repo=False)


def load_projector(model: Any, spec: Any, settings: Any, **fetch: Any) -> Any:
    """A llama.vision.Projector over ``model``, or None when it has no projector. Raises
    InvalidGGUFError (a projector that does not fit this model), ConfigError, ModelLoadError."""
    path = projector_path(spec, settings, **fetch)
    if path is None:
        return None
    from .llama.vision import Projector

    gpu = settings.n_gpu_layers != 0
    return Projector(model, path, n_threads=settings.effective_threads(), use_gpu=gpu)
