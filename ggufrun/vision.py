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
            try:
                (root / _NONE_MARK).touch()
            except OSError:  # a read-only cache: the repo is listed again next time, nothing worse
                pass
    if chosen is None:
        return None
    entry_meta = meta.get(chosen) if meta else None
    kind = spec.cache_key.split("/", 1)[0]
    return replace(spec, name=f"{kind}:{source.repo}/{chosen}", filename=chosen, sources=(replace(source, file=chosen),),
                   sha256=entry_meta.sha256 if entry_meta else None, size=entry_meta.size if entry_meta else None,
                   from_repo=False)


def load_projector(model: Any, spec: Any, settings: Any, *, offline: bool | None = None, progress: Any = None,
                   report: Any = None) -> Any:
    """A llama.vision.Projector over ``model``; TextOnly for a projector whose image positions
    ggufrun does not decode yet (reported); None when it has none. Raises InvalidGGUFError (a
    projector that does not fit this model), ConfigError, ModelLoadError."""
    path = projector_path(spec, settings, offline=offline, progress=progress, report=report)
    if path is None:
        return None
    from .images import UnsupportedProjectorError
    from .llama.vision import Projector

    gpu = model.on_gpu
    asked = settings.image_encoders
    encoders = encoder_count(asked, gpu=gpu, n_seq_max=model.n_seq_max,
                             projector_bytes=path.stat().st_size)
    note = encoders_note(asked, encoders)
    if note and report is not None:
        report(note)
    try:
        # auto's copies are a guess at what fits: as many as load serve; a count asked for is all or a refusal
        return Projector(model, path, n_threads=settings.effective_threads(), use_gpu=gpu, encoders=encoders,
                         best_effort=asked == "auto")
    except UnsupportedProjectorError as exc:
        if report is not None:
            report(f"{exc.message} Text only.")
        return TextOnly(path, exc.message)


GPU_ENCODERS = 4  # H200, SmolVLM-256M layout, 16 clients: 1 copy 242 tok/s, 2: 314, 3: 436, 4: 520, 6: 504 (bench/vision_load.py)


CPU_ENCODERS_NOTE = ("--image-encoders {asked}: on the CPU pictures are encoded one at a time, between the model's "
                     "decodes (both use every thread), so one encoder is loaded.")


def encoders_note(asked: int | str, loaded: int) -> str | None:
    """What to tell a user whose --image-encoders count was not loaded as asked (on a CPU); None where it was."""
    return CPU_ENCODERS_NOTE.format(asked=asked) if asked != "auto" and int(asked) > loaded else None


def encoder_count(setting: int | str, *, gpu: bool, n_seq_max: int, projector_bytes: int) -> int:
    """The ``image_encoders`` setting resolved: 1 on a CPU, where an encode waits for the decode in
    progress and uses every thread (more copies would only hold memory: CPU_ENCODERS_NOTE says so);
    a count is taken as given on a GPU; auto is 1 for one sequence, else GPU_ENCODERS as far as the
    copies fit in a quarter of the GPU memory the model left free."""
    if not gpu:
        return 1
    if setting != "auto":
        return int(setting)
    if n_seq_max <= 1:
        return 1
    from .llama.devices import gpus

    free = min((d.free for d in gpus()), default=0)
    return max(1, min(GPU_ENCODERS, n_seq_max, free // 4 // max(projector_bytes, 1)))


class TextOnly:
    """A projector this model cannot use yet: the model serves text, and an image is refused
    with the reason (rather than the model failing to load, or images being dropped)."""

    non_causal = False

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = path, reason

    def block(self, picture: Any) -> tuple[list[int], list[Any]]:
        from .images import ImageError

        raise ImageError(f"This model reads text only here: {self.reason}")

    def close(self) -> None:
        pass


def summary(spec: Any, settings_mmproj: str = "") -> dict[str, Any] | None:
    """What `show` says about a model's images, without a download (the cache, else the projector's
    header from its hub): None without a
    projector; else {"sees_images", "projector", "projector_type", "tokens_per_tile", "image_size",
    "memory_bytes"} (memory: the projector's weights, held beside the model's), or a "reason"."""
    from .errors import GgufrunError
    from .images import UnsupportedProjectorError
    from .projector_info import inspect_projector

    if settings_mmproj:
        path: Path | None = Path(settings_mmproj).expanduser()
    else:
        try:
            pspec = projector_spec(spec)  # a repo is listed once (as show reads an uncached model's header)
        except GgufrunError:
            return None
        if pspec is None:
            return None
        path = pspec.cache_path()
        if not path.is_file():  # its header from the hub (range requests), as show reads the model's
            from .fetch import read_header
            from .projector_info import check_projector

            name = Path(pspec.filename).name
            try:
                header = read_header(pspec, hubs_only=True)
                pi = check_projector(header.info)
            except UnsupportedProjectorError as exc:
                return {"sees_images": False, "projector": name, "memory_bytes": None, "reason": exc.message}
            except GgufrunError:
                return {"sees_images": True, "projector": name, "memory_bytes": None,
                        "reason": "the projector is fetched with the model (not cached, and its header could not be read)"}
            return {"sees_images": True, "projector": name, "projector_type": pi.projector_type,
                    "tokens_per_tile": pi.tokens_per_tile, "image_size": pi.image_size, "memory_bytes": pi.file_size}
    assert path is not None
    try:
        pi = inspect_projector(path)
    except UnsupportedProjectorError as exc:
        return {"sees_images": False, "projector": path.name, "memory_bytes": path.stat().st_size, "reason": exc.message}
    except GgufrunError as exc:
        return {"sees_images": False, "projector": path.name, "memory_bytes": None, "reason": exc.message}
    return {"sees_images": True, "projector": path.name, "projector_type": pi.projector_type,
            "tokens_per_tile": pi.tokens_per_tile, "image_size": pi.image_size, "memory_bytes": pi.file_size}
