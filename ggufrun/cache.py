"""The local model store: ``$GGUFRUN_HOME/models/<cache_key>/<file>``, one layout for every source.

Downloads are staged under ``$GGUFRUN_HOME/tmp`` (same filesystem, so the final move is a
rename), a file only reaches its final name after it was verified, and a lock file serialises
two pulls of the same file (the second finds the first one's result).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import paths
from .errors import ConfigError, DiskSpaceError, IntegrityError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the atomic rename still keeps files whole
    fcntl = None  # type: ignore[assignment]


@dataclass(frozen=True)
class CachedFile:
    path: Path
    size: int
    cache_key: str  # folder under paths.models_dir(), e.g. "qwen2-7b-instruct" or "hf/Owner--Repo"
    filename: str


def inside_cache(target: Path, root: Path | None = None) -> Path:
    """``target`` with every symlink resolved, checked to lie strictly inside ``root`` (the model
    cache, itself resolved: a cache moved to another disk by a symlink still works). A registry
    name such as "../../victim", a file name with a "/", or a symlinked folder inside the cache
    could otherwise make rm or pull delete or write anywhere; raise ConfigError instead."""
    base = (root or paths.models_dir()).resolve()
    real = Path(os.path.realpath(target))
    if real == base or base not in real.parents:
        raise ConfigError(f"{target} resolves to {real}, outside the model cache {base}; refusing to touch it.",
                          "Check the name in models.toml, and symlinks under the cache folder.")
    return real


def _slug(target: Path) -> str:
    """A flat, unique name for a cache path, for its lock and staging folder."""
    try:
        rel = target.resolve().relative_to(paths.models_dir().resolve())
    except ValueError:
        rel = Path(target.name)
    return "--".join(rel.parts)


def staging_dir(target: Path, source: str) -> Path:
    """Where ``source`` stages ``target``; kept across processes so ModelScope can resume."""
    return inside_cache(paths.home() / "tmp" / _slug(inside_cache(target)) / source, paths.home() / "tmp")


@contextmanager
def locked(target: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the lock for ``target``; ``on_wait`` is called once if another process holds it."""
    lock_path = inside_cache(paths.home() / "tmp" / f"{_slug(inside_cache(target))}.lock", paths.home() / "tmp")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as fh:
        if fcntl is not None:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(fh, fcntl.LOCK_EX)
        yield  # the lock goes with the file descriptor


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Raise DiskSpaceError when the filesystem holding ``folder`` has less than ``needed`` bytes free."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise DiskSpaceError(
            f"Not enough disk space for {what}: it needs {human_size(needed)}, {human_size(free)} free in {probe}.",
            "Free some space, or set GGUFRUN_HOME to a larger disk.",
        )


def sha256_of(path: Path, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * 1024 * 1024):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done)
    return digest.hexdigest()


def verify(path: Path, size: int | None, sha256: str | None, progress: Callable[[int], None] | None = None) -> None:
    """Raise IntegrityError when ``path``'s size or sha256 differs from the expected."""
    actual_size = path.stat().st_size
    problem = None
    if size is not None and actual_size != size:
        problem = f"size {actual_size} bytes, expected {size}"
    elif sha256 is not None:
        actual = sha256_of(path, progress)
        if actual != sha256.lower():
            problem = f"sha256 {actual[:12]}..., expected {sha256[:12]}..."
    if problem is not None:
        raise IntegrityError(f"checksum mismatch ({problem}); the download was discarded")


def place(staged: Path, target: Path) -> Path:
    """Move a verified file to its final name atomically (a reader sees the old file or the new one)."""
    inside_cache(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    target = inside_cache(target)  # again: a folder on the way may have become a symlink
    try:
        os.replace(staged, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        # models/ on another filesystem than tmp/: copy beside the target, then rename
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.incomplete")
        try:
            shutil.copyfile(staged, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        staged.unlink()
    return target


def discard_staging(target: Path, source: str | None = None) -> None:
    """Remove ``source``'s staging folder for ``target``, or every source's."""
    folder = inside_cache(paths.home() / "tmp" / _slug(inside_cache(target)), paths.home() / "tmp")
    shutil.rmtree(folder / source if source else folder, ignore_errors=True)


def list_files() -> list[CachedFile]:
    """Every .gguf file in the cache, sorted by path."""
    root = paths.models_dir()
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.rglob("*.gguf")):
        if path.is_file() and not path.name.startswith("."):
            out.append(CachedFile(path=path, size=path.stat().st_size,
                                  cache_key=path.parent.relative_to(root).as_posix(), filename=path.name))
    return out


def remove(target: Path) -> list[Path]:
    """Delete a cached file and its staging leftovers; returns what was removed. Only what lies
    inside the cache once symlinks are resolved (ConfigError otherwise)."""
    removed = []
    root = paths.models_dir().resolve()
    target = inside_cache(target)
    if target.is_file():
        target.unlink()
        removed.append(target)
    staging = paths.home() / "tmp" / _slug(target)
    if staging.exists():
        shutil.rmtree(inside_cache(staging, paths.home() / "tmp"), ignore_errors=True)
        removed.append(staging)
    parent = target.parent
    if parent != root and root in parent.parents and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()  # leave no empty per-model folders behind
    return removed


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
