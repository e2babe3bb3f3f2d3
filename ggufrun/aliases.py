"""A copy of a cached model under a new name (Ollama's ``/api/copy``): a registry entry in the
user's models.toml that points at the same sources, and a hard link to the cached file under
the new name's cache folder, so that no bytes are copied and removing either name leaves the
other whole. Nothing outside the cache is written but the user's models.toml, which is written
atomically and only after the new text has loaded strictly. :func:`forget_copy` takes such an
entry out again (Ollama's delete of a copy), and only an entry this module wrote.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from typing import Any

from . import cache, paths
from .errors import ConfigError, NotCachedError, UnknownModelError
from .refs import parse
from .registry import Entry, ModelSpec, Registry, load_file

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MARK = "copy of "  # how a copy's description starts: forget_copy removes no entry without it
_WRITING = threading.Lock()  # two copies at once must not each rewrite models.toml from the same old text


def _toml(value: Any) -> str:
    """A TOML value for the scalars, lists and inline tables an entry holds."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes (\", \\, \n, \uXXXX) are TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml(v)}" for k, v in value.items()) + " }"
    raise ConfigError(f"Cannot write {value!r} to models.toml.")


def _braces(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")  # file names are format templates in an entry


def copy_model(registry: Registry, source: str, destination: str) -> Entry:
    """Make ``destination`` name the cached model ``source`` names; return the new entry.

    Raises UnknownModelError (source unknown or not a cached model), NotCachedError (not
    downloaded), ConfigError (a bad or taken destination name, or a models.toml that cannot be
    written)."""
    if parse(source).kind == "path":
        raise UnknownModelError(f"'{os.path.basename(source)}' is a file; only models in the cache can be copied.")
    if destination.endswith(":latest"):
        destination = destination[: -len(":latest")]
    if not NAME.fullmatch(destination):
        raise ConfigError(f"Invalid model name '{destination}'.", "Use letters, digits, '.', '_' and '-' (64 at most).")
    with _WRITING:
        return _copy(registry, source, destination)


def _copy(registry: Registry, source: str, destination: str) -> Entry:
    registry_file = paths.user_registry()
    taken = registry.get(destination) is not None or (registry_file.exists() and destination in load_file(registry_file))
    if taken:
        raise ConfigError(f"'{destination}' already names a model.", "Pick another name, or delete that one first.")
    spec = registry.resolve(source)
    if spec.from_repo:
        from .fetch import expand

        parts = expand(spec, offline=True)
        if len(parts) != 1:
            raise ConfigError(f"'{source}' is split into {len(parts)} files; only single-file models can be copied.")
        spec = parts[0]
    target = spec.cache_path()
    if spec.path is not None or not target.is_file():
        raise NotCachedError(f"'{source}' is not in the cache.", f"Pull it first: `ggufrun pull {source}`.")
    cache.inside_cache(target)
    link = cache.inside_cache(paths.models_dir() / destination / spec.filename)
    if link.exists() and not os.path.samefile(link, target):
        raise ConfigError(f"The cache already holds a file for '{destination}'.", f"Remove it first: `ggufrun rm {destination}`.")
    entry_text = _entry_text(spec, destination, target.stat().st_size)
    old = registry_file.read_text(encoding="utf-8") if registry_file.exists() else ""
    new = old + ("" if not old or old.endswith("\n") else "\n") + entry_text
    staged = registry_file.with_name(f".{registry_file.name}.{os.getpid()}.tmp")
    registry_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        staged.write_text(new, encoding="utf-8")
        load_file(staged)  # strictly, as every later load will: a bad entry never lands
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            try:
                os.link(target, link)
            except OSError:  # a file system without hard links: a copy, after the free-space check
                cache.check_free_space(link.parent, target.stat().st_size, destination)
                shutil.copy2(target, link)
        os.replace(staged, registry_file)
    finally:
        staged.unlink(missing_ok=True)
    return load_file(registry_file)[destination]


def _entry_text(spec: ModelSpec, name: str, size: int) -> str:
    quant = spec.quant or "default"
    sources = []
    for s in spec.sources:
        item: dict[str, Any] = {"hub": s.hub}
        if s.hub == "pypi":
            item["package"] = s.repo
            for key in ("version", "member"):
                if getattr(s, key):
                    item[key] = getattr(s, key)
        else:
            item.update(repo=s.repo, file=_braces(s.file), revision=s.revision)
        sources.append(item)
    if not sources:  # (a cached file always came from a source; an entry needs one)
        raise ConfigError(f"'{spec.name}' has no source to record.")
    lines = [f"\n[{json.dumps(name)}]", f"description = {_toml(MARK + spec.name)}", f"quants = {_toml([quant])}",
             f"file = {_toml(_braces(spec.filename))}", f"sources = {_toml(sources)}"]
    if spec.family:
        lines.append(f"family = {_toml(spec.family)}")
    if spec.system is not None:
        lines.append(f"system = {_toml(spec.system)}")
    meta = {"size": size, **({"sha256": spec.sha256} if spec.sha256 else {})}
    lines.append(f"files = {_toml({quant: meta})}")
    if spec.defaults:
        lines.append(f"defaults = {_toml(spec.defaults)}")
    return "\n".join(lines) + "\n"


def with_entry(registry: Registry, entry: Entry) -> Registry:
    """``registry`` with ``entry`` added (a running server learns a copy without re-reading files)."""
    return Registry({**registry.entries, entry.name: entry})


def forget_copy(registry: Registry, name: str) -> Registry | None:
    """Remove the user-registry entry ``name`` if copy_model wrote it; the registry without it, or
    None when ``name`` is no such copy (a shipped or hand-written entry is never touched)."""
    with _WRITING:
        entry = registry.get(name)
        registry_file = paths.user_registry()
        if entry is None or not entry.description.startswith(MARK) or not registry_file.exists():
            return None
        lines = registry_file.read_text(encoding="utf-8").splitlines(keepends=True)
        header = f"[{json.dumps(entry.name)}]"
        start = next((i for i, line in enumerate(lines) if line.strip() == header), None)
        marked = f"description = {json.dumps(MARK)[:-1]}"
        if start is None or start + 1 >= len(lines) or not lines[start + 1].startswith(marked):
            return None  # not the shape copy_model writes: leave the user's file alone
        end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
        while start > 0 and not lines[start - 1].strip():  # the blank line copy_model put before it
            start -= 1
        staged = registry_file.with_name(f".{registry_file.name}.{os.getpid()}.tmp")
        try:
            staged.write_text("".join(lines[:start] + lines[end:]), encoding="utf-8")
            load_file(staged)
            os.replace(staged, registry_file)
        finally:
            staged.unlink(missing_ok=True)
    return Registry({k: v for k, v in registry.entries.items() if k != entry.name})
