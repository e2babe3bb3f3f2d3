"""Names to files: a registry model's quants (fetched, else derived), a local file, or synthetic models."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import paths
from ..errors import BenchError, GgufrunError
from .plan import Target

Report = Callable[[str], None]


def entry_defaults(name: str | None, registry: Any) -> dict[str, Any]:
    """The ``[defaults]`` of the registry entry ``name`` names ({} for files, hub references, synthetic
    models), so that bench measures a model with the settings chat and serve would use."""
    if not name or registry is None:
        return {}
    return dict(registry.resolve(name).defaults)


def resolve_targets(name: str | None, quants: Sequence[str], *, registry: Any = None, derive_from: str | None = None,
                    synthetic: str | None = None, report: Report | None = None) -> list[Target]:
    """Files to bench: a registry entry's quants (fetched, else derived with ``derive_from``),
    a local file (or quants derived from it), or synthetic models of a shape.

    Raises UnknownModelError for an unknown name; a quant that cannot be had becomes a Target
    with ``error`` set, so the run shows it as a row.
    """
    say = report or (lambda _msg: None)
    if synthetic:
        return [_synthetic_target(synthetic, q, say) for q in (quants or ["q4_k_m"])]
    if not name:
        raise BenchError("Give a model name or file, or --synthetic SHAPE.", "Example: ggufrun bench gemma3-270m.")
    if registry is None:
        from .. import registry as registry_mod

        registry = registry_mod.load()
    spec = registry.resolve(name)
    if spec.path is not None:  # a local file: bench it, or the quants derived from it
        if not quants:
            return [_file_target(spec.path)]
        stem = spec.path.stem
        return [_derive(spec.path, q, paths.home() / "derived" / "local" / f"{stem}-{q.lower()}.gguf",
                        f"{stem}:{q} (derived)", say) for q in quants]
    if spec.entry is None:  # hf:/ms: references name one file
        return [_fetch(spec, say)]
    entry = spec.entry
    source: list[Path] = []  # derive_from's file, resolved once

    def derive_source() -> Path:
        if not source:
            if derive_from is None:
                raise BenchError("no --derive-from given")
            given = Path(derive_from).expanduser()
            if given.is_file():
                source.append(given)
            else:
                from ..fetch import ensure_local

                source.append(ensure_local(registry.resolve(f"{entry.name}:{derive_from}")))
        return source[0]

    targets = []
    for q in quants or [spec.quant or ""]:
        label = f"{entry.name}:{q}"
        try:
            target = _fetch(registry.resolve(label), say)
            if not target.error or derive_from is None:
                targets.append(target)
                continue
            failure = target.error
        except GgufrunError as exc:
            if derive_from is None:
                targets.append(Target(label=label, quant=q, error=str(exc)))
                continue
            failure = str(exc)
        say(f"{label}: {failure} Deriving it from {derive_from}.")
        try:
            src = derive_source()
        except GgufrunError as exc:
            targets.append(Target(label=label, quant=q, error=f"cannot derive: {exc}"))
            continue
        dst = paths.home() / "derived" / entry.name / f"{entry.name}-{q.lower()}.gguf"
        targets.append(_derive(src, q, dst, f"{label} (derived)", say))
    return targets


def _fetch(spec: Any, say: Report) -> Target:
    from ..fetch import ensure_local

    try:
        path = ensure_local(spec, report=say)
    except GgufrunError as exc:
        return Target(label=spec.name, quant=spec.quant or "", error=str(exc))
    return Target(label=spec.name, quant=spec.quant or _file_type(path), path=path)


def _file_target(path: Path) -> Target:
    return Target(label=path.name, quant=_file_type(path), path=path, synthetic=_is_synthetic(path))


def _file_type(path: Path) -> str:
    from ..gguf_info import inspect

    try:
        return inspect(path).file_type.lower()
    except GgufrunError:
        return "?"


def _is_synthetic(path: Path) -> bool:
    """Files written by ggufrun.synthetic say so in general.name / general.description."""
    from ..gguf_info import inspect

    try:
        meta = inspect(path).metadata
    except GgufrunError:
        return False
    return any("synthetic" in str(meta.get(k, "")).lower() for k in ("general.name", "general.description", "general.source.url"))


def _derive(src: Path, quant: str, dst: Path, label: str, say: Report) -> Target:
    """``quant`` made from ``src`` with llama.cpp's quantiser, reused when already made."""
    if not dst.exists():
        from ..quantize import quantize_file

        dst.parent.mkdir(parents=True, exist_ok=True)
        say(f"Quantising {src.name} to {quant} ...")
        try:
            quantize_file(src, dst, quant)
        except GgufrunError as exc:
            return Target(label=label, quant=quant, error=str(exc))
    return Target(label=label, quant=quant, path=dst, synthetic=_is_synthetic(dst))


def _synthetic_target(shape: str, quant: str, say: Report) -> Target:
    """A random-weight model of ``shape`` in ``quant``: written directly where the writer supports
    the type, else quantised from the synthetic f16 file."""
    from .. import synthetic
    from ..quantize import quant_types

    folder = paths.home() / "synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    label = f"synthetic {shape}:{quant.lower()}"
    dst = folder / f"{shape}-{quant.lower()}.gguf"
    if dst.exists():
        return Target(label=label, quant=quant.lower(), path=dst, synthetic=True)
    say(f"Writing a synthetic {shape} model in {quant} ...")
    try:
        synthetic.write_synthetic(dst, shape=shape, quant=quant.lower())  # written atomically
        return Target(label=label, quant=quant.lower(), path=dst, synthetic=True)
    except GgufrunError as exc:
        if quant.lower() == "f16" or quant.lower() not in quant_types():
            return Target(label=label, quant=quant.lower(), error=str(exc))
        direct_error = exc
    f16 = _synthetic_target(shape, "f16", say)
    if f16.error or f16.path is None:
        return Target(label=label, quant=quant.lower(), error=str(direct_error))
    target = _derive(f16.path, quant, dst, label, say)
    return replace(target, synthetic=True)
