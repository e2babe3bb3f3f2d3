"""Names to files: a registry model's quants (fetched, else derived), a local file, or synthetic models."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import paths
from ..errors import BenchError, BenchUsageError, GgufrunError, UnknownQuantError
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

    Every requested quant is checked before any file is fetched or made, and every file is had
    before anything is measured. Raises UnknownModelError for an unknown name, UnknownQuantError
    for quants that do not exist (naming all of them), and the fetch's or quantiser's error (a
    BenchError naming the quant) for a file that cannot be had.
    """
    say = report or (lambda _msg: None)
    if synthetic:
        wanted = list(quants or ["q4_k_m"])
        _check_quants(wanted, _synthetic_quant_ok, "Synthetic models have no quant type {}.", None)
        return [_had(_synthetic_target(synthetic, q, say)) for q in wanted]
    if not name:
        raise BenchUsageError("Give a model name or file, or --synthetic SHAPE.", "Example: ggufrun bench gemma3-270m.")
    if registry is None:
        from .. import registry as registry_mod

        registry = registry_mod.load()
    spec = registry.resolve(name)
    if spec.path is not None:  # a local file: bench it, or the quants derived from it
        if not quants:
            return [_file_target(spec.path)]
        _check_quants(quants, _quantiser_knows, "llama.cpp's quantiser cannot make {}.", None)
        stem = spec.path.stem
        return [_had(_derive(spec.path, q, paths.home() / "derived" / "local" / f"{stem}-{q.lower()}.gguf",
                             f"{stem}:{q} (derived)", say, spec.path.name)) for q in quants]
    if spec.entry is None:  # hf:/ms: references name one file
        if quants:
            raise BenchUsageError(f"--quants takes registry models, files and --synthetic; {name} names one file.",
                                  "Put the quant in the reference: hf:OWNER/REPO:Q4_K_M.")
        return [_had(_fetch(spec, say))]
    entry = spec.entry
    wanted = list(quants or [spec.quant or ""])
    if derive_from is None:
        _check_quants(wanted, lambda q: entry.match_quant(q) is not None, f"{entry.name} has no quant {{}}.",
                      f"It has {', '.join(entry.quants)}; --derive-from QUANT makes others with llama.cpp's quantiser.")
    else:
        _check_quants(wanted, lambda q: entry.match_quant(q) is not None or _quantiser_knows(q),
                      f"{entry.name} has no quant {{}}, and llama.cpp's quantiser cannot make it.",
                      f"It has {', '.join(entry.quants)}.")
        if not Path(derive_from).expanduser().is_file() and entry.match_quant(derive_from) is None:
            raise UnknownQuantError(f"--derive-from {derive_from}: {entry.name} has no such quant, and no such file "
                                    "exists.", f"It has {', '.join(entry.quants)}.")
    source: list[Path] = []  # derive_from's file, resolved once

    def derive_source() -> Path:
        if not source:
            given = Path(str(derive_from)).expanduser()
            if given.is_file():
                source.append(given)
            else:
                from ..fetch import ensure_local

                source.append(ensure_local(registry.resolve(f"{entry.name}:{derive_from}"), report=say))
        return source[0]

    targets = []
    for q in wanted:
        label = f"{entry.name}:{q}"
        if entry.match_quant(q) is not None:
            target = _fetch(registry.resolve(label), say)
            if not target.error or derive_from is None:
                targets.append(_had(target))
                continue
            say(f"{label}: {target.error} Deriving it from {derive_from}.")
        dst = paths.home() / "derived" / entry.name / f"{entry.name}-{q.lower()}.gguf"
        src = derive_source()
        targets.append(_had(_derive(src, q, dst, f"{label} (derived)", say, str(derive_from))))
    return targets


def _check_quants(quants: Sequence[str], ok: Callable[[str], bool], message: str, hint: str | None) -> None:
    """Refuse every quant that cannot be had, in one error, before anything is fetched or measured."""
    bad = [q for q in quants if not ok(q)]
    if bad:
        raise UnknownQuantError(message.format(", ".join(bad)) + " Nothing was measured.", hint)


def _had(target: Target) -> Target:
    """The target, or its reason raised: a file that cannot be had stops the run before it measures."""
    if target.error or target.path is None:
        raise BenchError(f"{target.label}: {target.error or 'no file'}")
    return target


def _quantiser_knows(quant: str) -> bool:
    from ..quantize import quant_types

    return quant.lower().replace("fp16", "f16") in quant_types()


def _synthetic_quant_ok(quant: str) -> bool:
    from ..synthetic import writes

    return writes(quant) or _quantiser_knows(quant)


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


def _derive(src: Path, quant: str, dst: Path, label: str, say: Report, origin: str) -> Target:
    """``quant`` made from ``src`` (``origin``: what the user named) with llama.cpp's quantiser, reused when
    already made from the same source file (``derived_from`` says which: see :func:`derived_files`)."""
    stamp = {"source": str(src.resolve()), "size": src.stat().st_size, "mtime_ns": src.stat().st_mtime_ns,
             "origin": origin}
    if not (dst.exists() and _stamp(dst) == stamp):
        from ..quantize import quantize_file

        dst.parent.mkdir(parents=True, exist_ok=True)
        say(f"Quantising {src.name} to {quant} ...")
        try:
            quantize_file(src, dst, quant)
        except GgufrunError as exc:
            return Target(label=label, quant=quant, error=str(exc))
        _stamp_path(dst).write_text(json.dumps(stamp))
    return Target(label=label, quant=quant, path=dst, synthetic=_is_synthetic(dst), derived_from=origin, source=src)


def _stamp_path(dst: Path) -> Path:
    return dst.with_name(dst.name + ".source.json")


def _stamp(dst: Path) -> dict[str, Any] | None:
    try:
        found = json.loads(_stamp_path(dst).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


@dataclass(frozen=True)
class DerivedFile:
    """A file bench made with llama.cpp's quantiser (``--derive-from``, or a synthetic quant)."""

    path: Path
    size: int
    derived_from: str  # the source file, or "" when not recorded
    synthetic: bool  # random weights (bench --synthetic)


def derived_files() -> list[DerivedFile]:
    """Every file bench derived or wrote (under $GGUFRUN_HOME/derived and /synthetic), by path."""
    out = []
    for folder in (paths.home() / "derived", paths.home() / "synthetic"):
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*.gguf")):
            if path.is_file() and not path.name.startswith("."):
                stamp = _stamp(path) or {}
                out.append(DerivedFile(path, path.stat().st_size, str(stamp.get("source", "")), folder.name == "synthetic"))
    return out


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
    target = _derive(f16.path, quant, dst, label, say, f"synthetic {shape}:f16")
    return replace(target, synthetic=True)


def draft_file(base: Any, registry: Any, report: Report | None = None) -> Any:
    """``base`` with its ``draft_model`` name made a local file (fetched as a bench target is), so
    that each worker opens the file alone; settings without a draft model come back as they are."""
    if not base.draft_model:
        return base
    from ..fetch import ensure_local

    spec = registry.resolve(base.draft_model)
    path = spec.path if spec.path is not None else ensure_local(spec, report=report or (lambda _msg: None))
    return replace(base, draft_model=str(path))
