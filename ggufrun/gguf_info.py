"""GGUF header reading, validation and a memory estimate, without llama.cpp.

llama.cpp can crash (not just fail) on a truncated or corrupt file, so every file passes through
:func:`validate` before the runtime opens it. The header is parsed here rather than with
``gguf.GGUFReader``, which builds a numpy view per vocabulary entry (10 s for a 262k-token
vocabulary) and raises assorted numpy/struct errors on bad input. Parsing stops at the tensor
infos: tensor data is never read, only checked to lie inside the file, so a 5 GB file takes
as long as a 5 MB one.

The checks mirror llama.cpp's gguf.c: magic, version 2 or 3, well-formed key/values, known
tensor types, at most 4 dimensions, rows a whole number of quantisation blocks, offsets aligned
and consecutive, and every tensor's data inside the file.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import InvalidGGUFError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
# array metadata longer than this is summarised as "[TYPE x N]" instead of listed
_ARRAY_LIST_LIMIT = 16
# Parsing limits, so a crafted header costs milliseconds and a one-line error: real files hold
# strings of at most a few hundred KB (a chat template), never nest arrays (llama.cpp's gguf.c
# refuses arrays of arrays), and have tens of keys.
MAX_STRING_BYTES = 1 << 20
MAX_ARRAY_DEPTH = 4
MAX_METADATA_KEYS = 1 << 16

# GGUF value type id -> (name, struct format or None for string/array)
_VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("uint8", "<B"), 1: ("int8", "<b"), 2: ("uint16", "<H"), 3: ("int16", "<h"),
    4: ("uint32", "<I"), 5: ("int32", "<i"), 6: ("float32", "<f"), 7: ("bool", "<?"),
    8: ("string", None), 9: ("array", None), 10: ("uint64", "<Q"), 11: ("int64", "<q"),
    12: ("float64", "<d"),
}

# a chat template's tell-tale marker -> ggufrun chat family (ggufrun.registry.FAMILIES)
_TEMPLATE_MARKERS = (
    ("<|im_start|>", "chatml"),
    ("<start_of_turn>", "gemma"),
    ("<|start_header_id|>", "llama3"),
)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    type: str  # ggml type name, e.g. "Q4_K"
    offset: int  # absolute offset of the data in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def layer(self) -> int | None:
        """The block index for ``blk.N.*`` tensors, else None."""
        parts = self.name.split(".")
        return int(parts[1]) if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit() else None


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes needed to run a model with a given context, split between GPU and CPU."""

    n_ctx: int
    n_gpu_layers: int  # layers offloaded, after resolving -1
    weights_gpu: int
    weights_cpu: int
    kv_gpu: int
    kv_cpu: int
    compute: int  # rough allowance for llama.cpp's compute buffers
    note: str = ""

    @property
    def weights(self) -> int:
        return self.weights_gpu + self.weights_cpu

    @property
    def kv_cache(self) -> int:
        return self.kv_gpu + self.kv_cpu

    @property
    def gpu(self) -> int:
        return self.weights_gpu + self.kv_gpu + (self.compute if self.n_gpu_layers else 0)

    @property
    def cpu(self) -> int:
        return self.weights_cpu + self.kv_cpu + (0 if self.n_gpu_layers else self.compute)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "weights": self.weights, "kv_cache": self.kv_cache, "gpu": self.gpu, "cpu": self.cpu,
                "total": self.total}


@dataclass(frozen=True)
class GGUFInfo:
    """Facts read from a GGUF header."""

    path: Path
    file_size: int
    version: int
    architecture: str | None
    name: str | None
    parameter_count: int
    file_type: str  # e.g. "Q4_K_M"
    context_length: int | None
    block_count: int | None
    embedding_length: int | None
    feed_forward_length: int | None
    head_count: int | None
    head_count_kv: int | None
    key_length: int | None
    value_length: int | None
    vocab_size: int | None
    chat_template: str | None
    template_family: str | None  # chatml | gemma | llama3 | custom; None without a template
    tensor_bytes: int
    n_tensors: int
    tensor_types: dict[str, int]
    bos_token_id: int | None
    eos_token_id: int | None
    sliding_window: int | None
    metadata: dict[str, Any] = field(repr=False)
    tensors: tuple[TensorInfo, ...] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The facts as plain JSON-able values (tensors left out; metadata included)."""
        return {f.name: getattr(self, f.name) if f.name != "path" else str(self.path)
                for f in fields(self) if f.name != "tensors"}

    def memory_estimate(self, n_ctx: int, n_gpu_layers: int = -1, kv_bytes_per_elem: float = 2.0,
                        n_ubatch: int = 512, *, cache_types: tuple[str, str] | None = None,
                        kv_cells: int | None = None) -> MemoryEstimate:
        """Estimate memory for ``n_ctx`` tokens with ``n_gpu_layers`` offloaded (-1: all).

        ``cache_types`` (K, V: "f16", "q8_0"...) replaces ``kv_bytes_per_elem`` with each type's
        size; ``kv_cells`` is the whole cache where it holds more than one sequence (a server's slots).

        Follows llama.cpp's placement: the last ``n_gpu_layers`` blocks go to the GPU, the
        output layer too once ``n_gpu_layers`` exceeds the block count, the token embedding
        stays on the CPU (a tied output layer gets its own GPU copy). The KV cache is
        ``n_ctx * n_head_kv * (key_length + value_length)`` elements per layer, kept with its
        layer. Sliding-window layers (gemma2/3) are counted at full context: an upper bound.
        """
        n_layer = self.block_count or 0
        ngl = n_layer + 1 if n_gpu_layers < 0 else min(n_gpu_layers, n_layer + 1)
        first_gpu = max(n_layer - ngl, 0)
        output_on_gpu = ngl > n_layer
        weights_gpu = weights_cpu = 0
        has_output = any(t.name == "output.weight" for t in self.tensors)
        for t in self.tensors:
            layer = t.layer
            on_gpu = (layer >= first_gpu and ngl > 0) if layer is not None else (
                output_on_gpu and t.name != "token_embd.weight")
            if on_gpu:
                weights_gpu += t.n_bytes
            else:
                weights_cpu += t.n_bytes
            if t.name == "token_embd.weight" and not has_output and output_on_gpu:
                weights_gpu += t.n_bytes  # llama.cpp duplicates a tied embedding as the output layer
        head_dim = self.key_length or ((self.embedding_length or 0) // (self.head_count or 1))
        v_dim = self.value_length or head_dim
        if cache_types is None:
            bytes_k = bytes_v = kv_bytes_per_elem
        else:
            from .settings import KV_CACHE_BYTES

            bytes_k, bytes_v = KV_CACHE_BYTES[cache_types[0]], KV_CACHE_BYTES[cache_types[1]]
        per_layer = int((kv_cells or n_ctx) * (self.head_count_kv or self.head_count or 0) * (head_dim * bytes_k + v_dim * bytes_v))
        n_gpu_blocks = min(ngl, n_layer)
        ubatch = min(n_ubatch, n_ctx)
        # The graph allocator reuses memory, so the biggest buffers dominate: the logits of a
        # micro-batch, the attention scores over the context, and the FFN activations.
        compute = 4 * ubatch * ((self.vocab_size or 0) + (self.head_count or 0) * n_ctx
                                + 4 * (self.embedding_length or 0) + 2 * (self.feed_forward_length or 0))
        note = ""
        if self.sliding_window and self.architecture in ("gemma2", "gemma3"):
            note = (f"sliding-window layers ({self.sliding_window} tokens) counted at full context, "
                    "as llama-cpp-python allocates them")
        return MemoryEstimate(
            n_ctx=n_ctx, n_gpu_layers=ngl, weights_gpu=weights_gpu, weights_cpu=weights_cpu,
            kv_gpu=per_layer * n_gpu_blocks, kv_cpu=per_layer * (n_layer - n_gpu_blocks),
            compute=compute, note=note,
        )


class _Truncated(Exception):
    """The header runs past the end of the file."""


class _Corrupt(Exception):
    """The header is malformed; the message says how."""


class _NeedMore(Exception):
    """The header goes on past the bytes read so far (a range-read header): fetch more."""


class _Header:
    """A cursor over the file's bytes that raises _Truncated instead of reading past the end,
    and _NeedMore past the bytes at hand when only the start of the file was read."""

    def __init__(self, buf: Any, size: int) -> None:
        self.buf = buf
        self.size = size
        self.avail = min(len(buf), size)
        self.pos = 0
        self.where = "the header"  # what is being read, for the errors raised here

    def need(self, end: int) -> None:
        if end > self.size:
            raise _Truncated
        if end > self.avail:
            raise _NeedMore

    def take(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(self.pos + n)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if n > MAX_STRING_BYTES:
            raise _Corrupt(f"{self.where} holds a {n:,}-byte string (at most {MAX_STRING_BYTES:,})")
        self.need(self.pos + n)
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        return bytes(data).decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            n = self.take("<Q")
            if n > MAX_STRING_BYTES:
                raise _Corrupt(f"{self.where} holds a {n:,}-byte string (at most {MAX_STRING_BYTES:,})")
            self.need(self.pos + n)
            self.pos += n

    def strings_problem(self, start: int, count: int) -> str | None:
        """Why the ``count`` strings from ``start`` cannot be a vocabulary: llama.cpp aborts on an
        empty or a repeated token (llama-vocab.cpp asserts one id per token text)."""
        seen: set[bytes] = set()
        pos = start
        for i in range(count):
            (n,) = struct.unpack_from("<Q", self.buf, pos)
            text = bytes(self.buf[pos + 8 : pos + 8 + n])
            pos += 8 + n
            if not text:
                return f"token {i} is an empty string"
            if text in seen:
                return f"token {i} ({text[:40].decode('utf-8', 'replace')!r}) appears twice"
            seen.add(text)
        return None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype not in _VALUE_TYPES:
            raise _Corrupt(f"{what} has unknown value type {vtype}")
        name, fmt = _VALUE_TYPES[vtype]
        if fmt is not None:
            return self.take(fmt)
        if name == "string":
            return self.string()
        etype, count = self.take("<I"), self.take("<Q")
        if etype not in _VALUE_TYPES:
            raise _Corrupt(f"{what} is an array of unknown type {etype}")
        if etype == 9 and depth + 1 >= MAX_ARRAY_DEPTH:
            raise _Corrupt(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        ename, efmt = _VALUE_TYPES[etype]
        if efmt is not None:
            width = struct.calcsize(efmt)
            if count > (self.size - self.pos) // width:
                raise _Truncated
            if count <= _ARRAY_LIST_LIMIT:
                return [self.take(efmt) for _ in range(count)]
            self.pos += count * width
        elif count <= _ARRAY_LIST_LIMIT:
            return [self.value(etype, what, depth + 1) for _ in range(count)]
        elif ename == "string":
            if count > (self.size - self.pos) // 8:
                raise _Truncated
            self.skip_strings(count)
        else:
            if count > (self.size - self.pos) // 12:  # an array header takes 12 bytes
                raise _Truncated
            for _ in range(count):
                self.value(etype, what, depth + 1)
        return _ArraySummary(ename, count)


@dataclass(frozen=True)
class _ArraySummary:
    type: str
    count: int

    def __str__(self) -> str:
        return f"[{self.type} x {self.count}]"


def _fail(path: Path, what: str) -> InvalidGGUFError:
    from . import paths

    # Only a file in our cache can be fetched again; for anyone else's file, naming it is enough.
    in_cache = paths.models_dir().resolve() in Path(path).resolve().parents
    hint = "It can be fetched again: `ggufrun rm NAME && ggufrun pull NAME`." if in_cache else None
    return InvalidGGUFError(f"{path} is not a valid GGUF file: {what}.", hint)


def inspect(path: str | Path) -> GGUFInfo:
    """Read a GGUF file's header and check its structure; raise InvalidGGUFError with one line
    naming the file and what is wrong (missing, empty, not GGUF, unsupported version,
    truncated or corrupt header, tensor data outside the file, misaligned offsets)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise InvalidGGUFError(f"{p} is not a file.", "Give the path of a .gguf file.")
        if size == 0:
            raise _fail(p, "the file is empty")
        with open(p, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(p, buf, size)
    except FileNotFoundError:
        raise InvalidGGUFError(f"No such file: {p}.") from None
    except PermissionError:
        raise InvalidGGUFError(f"Cannot read {p}: permission denied.") from None
    except _Truncated:
        raise _fail(p, f"truncated ({size} bytes)") from None
    except _Corrupt as exc:
        raise _fail(p, str(exc)) from None


def validate(path: str | Path) -> GGUFInfo:
    """The header parse of :func:`inspect` plus :func:`check_model`: what must pass before
    llama.cpp opens a file. Raises InvalidGGUFError."""
    info = inspect(path)
    check_model(info)
    return info


# llama.cpp aborts the whole process (GGML_ASSERT, not an error return) past these limits
# (src/llama-hparams.h, src/llama-model.cpp), so they are checked here first.
LLAMA_MAX_LAYERS = 512
LLAMA_MAX_EXPERTS = 512
_MAX_WIDTH = 1 << 20  # far above any real hidden size, head count or head dimension
_MAX_CONTEXT = 1 << 30
# Architectures whose attention tensors we check against the hyperparameters. Their llama.cpp
# graphs assert (abort) that head sizes agree, e.g. qwen2.cpp: n_embd_head == n_embd_head_k == n_rot.
_DENSE_ARCHES = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "mistral3")
_ROPE_IS_HEAD = ("llama", "qwen2", "qwen3")


def check_model(info: GGUFInfo) -> None:
    """Check the architecture's metadata against the tensors, as far as Python can, so that a
    crafted file gets a one-line InvalidGGUFError instead of aborting llama.cpp: the architecture
    is one llama.cpp knows, block/expert counts are within llama.cpp's limits and match the
    tensors, sizes are positive and bounded, and (for common dense architectures) the attention
    and embedding tensors have the shapes the hyperparameters promise."""
    import gguf

    p, meta, arch = info.path, info.metadata, info.architecture
    if arch is None:
        raise _fail(p, "general.architecture is missing")
    known = set(gguf.MODEL_ARCH_NAMES.values())
    if arch not in known:
        raise _fail(p, f"unknown architecture {arch[:64]!r} (llama.cpp knows {len(known)}, e.g. llama, qwen2, gemma3)")

    def raw(key: str) -> Any:
        return meta.get(f"{arch}.{key}")

    _check_floats(p, meta, arch)
    _check_tensor_types(p, info.tensors)

    def count(key: str, lo: int, hi: int, required: bool = False) -> list[int]:
        """The value(s) of an integer hyperparameter (scalar or per-layer list), each in [lo, hi]."""
        value = raw(key)
        if value is None:
            if required:
                raise _fail(p, f"{arch}.{key} is missing")
            return []
        if isinstance(value, str) and value.startswith("["):
            return []  # a long per-layer array, summarised by the parser: nothing to bound here
        values = value if isinstance(value, list) else [value]
        for v in values:
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise _fail(p, f"{arch}.{key} is {value!r}; it must be an integer from {lo} to {hi}")
        return values

    n_layer = count("block_count", 1, LLAMA_MAX_LAYERS, required=True)[0]
    count("context_length", 1, _MAX_CONTEXT, required=True)
    n_embd = count("embedding_length", 1, _MAX_WIDTH, required=True)[0]
    heads = count("attention.head_count", 0, _MAX_WIDTH)
    heads_kv = count("attention.head_count_kv", 0, _MAX_WIDTH)
    count("feed_forward_length", 0, 1 << 24)
    key_len = (count("attention.key_length", 1, _MAX_WIDTH) or [0])[0]
    value_len = (count("attention.value_length", 1, _MAX_WIDTH) or [0])[0]
    rope = (count("rope.dimension_count", 1, _MAX_WIDTH) or [0])[0]
    n_expert = (count("expert_count", 0, LLAMA_MAX_EXPERTS) or [0])[0]
    n_used = (count("expert_used_count", 0, LLAMA_MAX_EXPERTS) or [0])[0]
    if n_expert and not 0 < n_used <= n_expert:
        raise _fail(p, f"{arch}.expert_used_count is {n_used}; with {n_expert} experts it must be from 1 to {n_expert}")

    layers = {t.layer for t in info.tensors if t.layer is not None}
    beyond = sorted(i for i in layers if i >= n_layer)
    if beyond:
        raise _fail(p, f"{arch}.block_count is {n_layer} but the file has tensors for block {beyond[-1]}")
    missing = sorted(set(range(n_layer)) - layers)
    if missing:
        raise _fail(p, f"{arch}.block_count is {n_layer} but block {missing[0]} has no tensors "
                       f"(the file has {len(layers)} blocks)")
    if arch not in _DENSE_ARCHES or any(isinstance(raw(k), str) for k in ("attention.head_count",
                                                                           "attention.head_count_kv")):
        return  # other layouts, or per-layer head counts too long to have been kept: llama.cpp checks those
    by_name = {t.name: t for t in info.tensors}
    embd = by_name.get("token_embd.weight")
    if embd is None:
        raise _fail(p, "tensor 'token_embd.weight' is missing")
    n_vocab = info.vocab_size or 0
    if embd.shape[:2] != (n_embd, n_vocab):
        raise _fail(p, f"tensor 'token_embd.weight' has shape {list(embd.shape)}; "
                       f"embedding_length {n_embd} and a {n_vocab}-token vocabulary need [{n_embd}, {n_vocab}]")
    for i in range(n_layer):
        n_head = heads[i] if len(heads) == n_layer else heads[0] if heads else 0
        n_head_kv = heads_kv[i] if len(heads_kv) == n_layer else heads_kv[0] if heads_kv else n_head
        if not n_head:
            raise _fail(p, f"{arch}.attention.head_count is missing or 0")
        if not key_len and n_embd % n_head:
            raise _fail(p, f"{arch}.embedding_length {n_embd} is not a multiple of attention.head_count {n_head}")
        k = key_len or n_embd // n_head
        v = value_len or k
        if arch in _ROPE_IS_HEAD and (k != v or (rope and rope != k)):
            raise _fail(p, f"{arch} needs equal key, value and rope head sizes, got {k}, {v} and {rope or k}")
        if rope > k:
            raise _fail(p, f"{arch}.rope.dimension_count {rope} exceeds the head size {k}")
        want = {"attn_q": (n_embd, n_head * k), "attn_k": (n_embd, n_head_kv * k),
                "attn_v": (n_embd, n_head_kv * v), "attn_output": (n_head * v, n_embd)}
        for part, shape in want.items():
            t = by_name.get(f"blk.{i}.{part}.weight")
            if t is None:
                raise _fail(p, f"tensor 'blk.{i}.{part}.weight' is missing")
            if t.shape[:2] != shape:
                raise _fail(p, f"tensor '{t.name}' has shape {list(t.shape)} but the hyperparameters "
                               f"(heads {n_head}/{n_head_kv}, head size {k}) need {list(shape)}")


# llama.cpp's rope scaling names (llama-model.cpp LLAMA_ROPE_SCALING_TYPES): any other string
# fails a GGML_ASSERT while the hyperparameters load.
_ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
# Tensor types llama.cpp's kernels cannot multiply or normalise with: a weight patched to one of
# these (F16 -> I16, F32 -> I32: same size, so the file stays well-formed) loads, then aborts the
# process in its first matrix multiplication.
_NOT_WEIGHT_TYPES = ("I8", "I16", "I32", "I64", "F64")
# One-dimensional tensors (norms, biases) are added or multiplied element-wise, which ggml's CPU
# kernels do for float types only: a quantised norm aborts on the first token.
_VECTOR_TYPES = ("F32", "F16", "BF16")


def _check_floats(p: Path, meta: dict[str, Any], arch: str) -> None:
    """Every number in the architecture's metadata finite, every epsilon and the rope base
    positive, the rope scaling type one llama.cpp knows: a NaN or negative norm epsilon (or an
    unknown scaling name) loads, then aborts llama.cpp in the first forward step."""
    import math

    for key, value in meta.items():
        if not key.startswith(f"{arch}."):
            continue
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise _fail(p, f"{key} is {v}; it must be a finite number")
        if key.endswith("epsilon") or key.endswith(".rope.freq_base"):
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values) or not values:
                raise _fail(p, f"{key} is {value!r}; it must be a positive number")
        if key.endswith(".rope.scaling.type") and value not in _ROPE_SCALING_TYPES:
            shown = value[:40] if isinstance(value, str) else value
            raise _fail(p, f"{key} is {shown!r}; llama.cpp knows {', '.join(_ROPE_SCALING_TYPES)}")
        if key.endswith((".rope.scaling.factor", ".rope.scale_linear")):
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in values):
                raise _fail(p, f"{key} is {value!r}; it must be a number >= 0")


def _check_tensor_types(p: Path, tensors: tuple[TensorInfo, ...]) -> None:
    for t in tensors:
        if t.type in _NOT_WEIGHT_TYPES:
            raise _fail(p, f"tensor '{t.name}' has type {t.type}, which llama.cpp cannot compute with")
        if len([d for d in t.shape if d != 1]) <= 1 and t.type not in _VECTOR_TYPES and t.name.endswith(("norm.weight", ".bias")):
            raise _fail(p, f"tensor '{t.name}' is a vector of type {t.type}; norms and biases must be "
                           f"{', '.join(_VECTOR_TYPES)}")


# A range-read header starts with this many bytes and grows 4x at a time up to the limit: a
# 262k-token vocabulary (gemma3) takes about 5 MB, most models far less.
REMOTE_FIRST_READ = 1024 * 1024
REMOTE_HEADER_LIMIT = 256 * 1024 * 1024


def inspect_remote(read: Any, size: int, name: str) -> GGUFInfo:
    """Parse the header of a remote GGUF of ``size`` bytes, reading only its start.

    ``read(start, end)`` returns bytes ``start..end`` inclusive (an HTTP range request). Raises
    InvalidGGUFError as :func:`inspect` does, and for a header over REMOTE_HEADER_LIMIT.
    """
    p = Path(name)
    buf = b""
    want = min(REMOTE_FIRST_READ, size)
    while True:
        if want > len(buf):
            chunk = read(len(buf), want - 1)
            if not chunk:
                raise _fail(p, f"the server sent no data at byte {len(buf)}")
            buf += chunk
        try:
            return _parse(p, buf, size)
        except _NeedMore:
            if len(buf) >= min(size, REMOTE_HEADER_LIMIT):
                raise _fail(p, f"the header is larger than {REMOTE_HEADER_LIMIT // 2**20} MiB") from None
            want = min(max(len(buf), want) * 4, size, REMOTE_HEADER_LIMIT)
        except _Truncated:
            raise _fail(p, f"truncated ({size} bytes)") from None
        except _Corrupt as exc:
            raise _fail(p, str(exc)) from None


def merge_parts(parts: list[GGUFInfo]) -> GGUFInfo:
    """One GGUFInfo for a split model: the first part's metadata with every part's tensors."""
    from dataclasses import replace

    first = parts[0]
    if len(parts) == 1:
        return first
    tensors = tuple(t for part in parts for t in part.tensors)
    types: dict[str, int] = {}
    for t in tensors:
        types[t.type] = types.get(t.type, 0) + 1
    return replace(first, tensors=tensors, n_tensors=len(tensors), tensor_types=types,
                   tensor_bytes=sum(t.n_bytes for t in tensors), file_size=sum(x.file_size for x in parts),
                   parameter_count=sum(t.n_elements for t in tensors))


def _parse(p: Path, buf: Any, size: int) -> GGUFInfo:
    import gguf  # lazy: numpy-heavy, and only its type tables are needed

    h = _Header(buf, size)
    section = "the file header"
    try:
        if size < 4 or buf[:4] != GGUF_MAGIC:
            raise _Corrupt(f"bad magic {bytes(buf[:4])!r} (expected b'GGUF')")
        h.pos = len(GGUF_MAGIC)
        version = h.take("<I")
        if version not in SUPPORTED_VERSIONS:
            hint = " (a big-endian file?)" if version > 0xFFFF else ""
            raise _Corrupt(f"unsupported GGUF version {version}{hint}; llama.cpp reads versions 2 and 3")
        n_tensors, n_kv = h.take("<Q"), h.take("<Q")
        # every key/value needs >= 13 bytes and every tensor info >= 24: reject absurd counts
        if n_kv * 13 + n_tensors * 24 > size:
            raise _Corrupt(f"header claims {n_tensors} tensors and {n_kv} metadata keys, more than the file can hold")
        if n_kv > MAX_METADATA_KEYS:
            raise _Corrupt(f"header claims {n_kv:,} metadata keys (at most {MAX_METADATA_KEYS:,})")
        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            section = h.where = f"metadata entry {i + 1} of {n_kv}"
            key = h.string()
            section = h.where = f"metadata key '{key}'"
            if key in metadata:
                raise _Corrupt(f"duplicate metadata key '{key}'")
            vtype = h.take("<I")
            start = h.pos
            metadata[key] = h.value(vtype, f"metadata key '{key}'")
            if key == "tokenizer.ggml.tokens" and vtype == 9:
                etype, count = struct.unpack_from("<IQ", h.buf, start)
                problem = h.strings_problem(start + 12, count) if etype == 8 else "it is not an array of strings"
                if problem or not count:
                    raise _Corrupt(f"tokenizer.ggml.tokens: {problem or 'the vocabulary is empty'}")
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise _Corrupt(f"general.alignment {alignment!r} is not a power of two")
        raw: list[tuple[str, tuple[int, ...], int, int]] = []
        names: set[str] = set()
        for i in range(n_tensors):
            section = h.where = f"tensor info {i + 1} of {n_tensors}"
            name = h.string()
            n_dims = h.take("<I")
            if n_dims > MAX_DIMS:
                raise _Corrupt(f"tensor '{name}' has {n_dims} dimensions (at most {MAX_DIMS})")
            shape = tuple(h.take("<Q") for _ in range(n_dims))
            ttype, offset = h.take("<I"), h.take("<Q")
            if name in names:
                raise _Corrupt(f"duplicate tensor '{name}'")
            names.add(name)
            raw.append((name, shape, ttype, offset))
    except _Truncated:
        raise _Corrupt(f"truncated in {section} ({size} bytes)") from None
    data_start = -(-h.pos // alignment) * alignment
    tensors = _check_tensors(p, raw, data_start, alignment, size, gguf)
    return _info(p, size, version, metadata, tensors, gguf)


def _check_tensors(p: Path, raw: list[tuple[str, tuple[int, ...], int, int]], data_start: int,
                   alignment: int, size: int, gguf: Any) -> tuple[TensorInfo, ...]:
    out = []
    expected = 0
    for name, shape, ttype, offset in raw:
        try:
            qtype = gguf.GGMLQuantizationType(ttype)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise _Corrupt(f"tensor '{name}' has unknown type {ttype}") from None
        if shape and shape[0] % block:
            raise _Corrupt(f"tensor '{name}' row length {shape[0]} is not a multiple of {qtype.name}'s block size {block}")
        n_elements = 1
        for d in shape:
            n_elements *= d
        if n_elements >= 1 << 63:
            raise _Corrupt(f"tensor '{name}' has an impossible shape {list(shape)}")
        n_bytes = n_elements // block * type_size
        if offset % alignment:
            raise _Corrupt(f"tensor '{name}' data offset {offset} is not aligned to {alignment} bytes")
        if offset != expected:
            raise _Corrupt(f"tensor '{name}' data offset {offset} should be {expected} (corrupt tensor info)")
        start = data_start + offset
        if start + n_bytes > size:
            raise _Corrupt(f"tensor '{name}' data ends at byte {start + n_bytes} but the file has {size} "
                           f"(truncated download?)")
        out.append(TensorInfo(name=name, shape=shape, type=qtype.name, offset=start, n_bytes=n_bytes))
        expected += -(-n_bytes // alignment) * alignment
    return tuple(out)


def _info(p: Path, size: int, version: int, metadata: dict[str, Any], tensors: tuple[TensorInfo, ...],
          gguf: Any) -> GGUFInfo:
    arch = metadata.get("general.architecture")
    arch = arch if isinstance(arch, str) else None

    def hp(key: str) -> int | None:
        value = metadata.get(f"{arch}.{key}")
        if isinstance(value, list):  # per-layer values (e.g. head_count_kv): report the first
            value = value[0] if value else None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    types: dict[str, int] = {}
    bytes_by_type: dict[str, int] = {}
    for t in tensors:
        types[t.type] = types.get(t.type, 0) + 1
        bytes_by_type[t.type] = bytes_by_type.get(t.type, 0) + t.n_bytes
    template = metadata.get("tokenizer.chat_template")
    template = template if isinstance(template, str) and template.strip() else None
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = tokens.count if isinstance(tokens, _ArraySummary) else len(tokens) if isinstance(tokens, list) else None
    if vocab is None:
        vocab = hp("vocab_size") or next((t.shape[1] for t in tensors if t.name == "token_embd.weight" and len(t.shape) > 1), None)
    head_count = hp("attention.head_count")
    embd = hp("embedding_length")
    key_length = hp("attention.key_length") or (embd // head_count if embd and head_count else None)
    bos, eos = metadata.get("tokenizer.ggml.bos_token_id"), metadata.get("tokenizer.ggml.eos_token_id")
    name = metadata.get("general.name")
    return GGUFInfo(
        path=p, file_size=size, version=version, architecture=arch,
        name=name if isinstance(name, str) else None,
        parameter_count=sum(t.n_elements for t in tensors),
        file_type=_file_type(metadata.get("general.file_type"), bytes_by_type, gguf),
        context_length=hp("context_length"), block_count=hp("block_count"), embedding_length=embd,
        feed_forward_length=hp("feed_forward_length"), head_count=head_count,
        head_count_kv=hp("attention.head_count_kv") or head_count, key_length=key_length,
        value_length=hp("attention.value_length") or key_length, vocab_size=vocab,
        chat_template=template, template_family=template_family(template),
        tensor_bytes=sum(t.n_bytes for t in tensors), n_tensors=len(tensors), tensor_types=types,
        bos_token_id=bos if isinstance(bos, int) else None, eos_token_id=eos if isinstance(eos, int) else None,
        sliding_window=hp("attention.sliding_window"),
        metadata={k: (str(v) if isinstance(v, _ArraySummary) else v) for k, v in metadata.items()},
        tensors=tensors,
    )


def _file_type(value: Any, bytes_by_type: dict[str, int], gguf: Any) -> str:
    if isinstance(value, int):
        try:
            return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    # no (or an unknown) general.file_type: name the type holding the most bytes
    return max(bytes_by_type, key=lambda k: bytes_by_type[k]) if bytes_by_type else "unknown"


def template_family(template: str | None) -> str | None:
    """Guess the chat family from a Jinja template's markers; "custom" when none matches."""
    if not template or not template.strip():
        return None
    for marker, family in _TEMPLATE_MARKERS:
        if marker in template:
            return family
    return "custom"
