"""Loaded weights and the llama.cpp contexts over them: tokenising, KV bookkeeping, batched decoding,
the single-stream token loop, embeddings. A second context on the same weights is ``new_context``."""

from __future__ import annotations

import codecs
import ctypes
import threading
import time
import weakref
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ContextOverflowError, ModelClosedError, ModelLoadError
from ..generation import GenStats, Generation, SamplingParams, SeqSampler, sample_rows
from ..settings import Settings
from . import amx
from ._lib import ALL_LAYERS, FLASH_ATTN, KV_TYPES, L, init_backend, kv_buffer_bytes, llama_reason, numpy
from .grammar_filter import VocabIndex
from .sampler import DrawChain, Grammar, Sampler, vocab_index


def _new_context(model_ptr: Any, settings: Settings, n_ctx: int, n_seq_max: int, embeddings: bool, path: Path,
                 unified: bool = False) -> Any:
    from ..kvcache import check

    check(settings, *_head_dims(model_ptr), path.name)
    cparams = L.llama_context_default_params()
    cparams.n_ctx = n_ctx
    cparams.n_batch = min(settings.batch_size, n_ctx)
    cparams.n_ubatch = min(settings.ubatch_size, cparams.n_batch)
    cparams.n_seq_max = n_seq_max
    threads = settings.effective_threads()
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    cparams.flash_attn_type = FLASH_ATTN[settings.flash_attn]
    cparams.type_k, cparams.type_v = KV_TYPES[settings.cache_type_k], KV_TYPES[settings.cache_type_v]
    cparams.embeddings = embeddings
    cparams.no_perf = True
    # unified: the sequences share one pool of n_ctx cells (a server with fewer cells than its slots
    # times their context); else each has its own n_ctx / n_seq_max, llama.cpp's default.
    cparams.kv_unified = unified and n_seq_max > 1
    kv_buffer_bytes()  # forget older contexts' lines
    ctx = L.llama_init_from_model(model_ptr, cparams)
    if not ctx:
        raise ModelLoadError(
            f"llama.cpp could not create a context for {path.name} (n_ctx={n_ctx}, n_gpu_layers={settings.n_gpu_layers})"
            f"{llama_reason()}.",
            "Try a smaller --n-ctx or fewer --n-gpu-layers.",
        )
    return ctx


def common_length(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of two token lists. Slices compare in C, in runs
    that double, so the cost follows where the lists part, not their length: the server asks this
    of every slot for every request it admits (64 slots, prompts of thousands of tokens), where a
    Python loop cost milliseconds a request on the engine thread."""
    n = min(len(a), len(b))
    lo, step = 0, 8
    while lo < n:
        hi = min(lo + step, n)
        if a[lo:hi] != b[lo:hi]:
            break
        lo, step = hi, step * 2
    else:
        return n
    while hi - lo > 1:  # a[:lo] == b[:lo]; they part within [lo, hi)
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _head_dims(model_ptr: Any) -> tuple[int, int]:
    """The K and V head sizes as llama.cpp reads them: ARCH.attention.key_length/value_length, else n_embd / n_head."""
    def meta(key: str) -> str:
        buf = ctypes.create_string_buffer(128)
        n = L.llama_model_meta_val_str(model_ptr, key.encode(), buf, 128)
        return buf.value.decode("utf-8", "replace") if n >= 0 else ""

    arch = meta("general.architecture")
    default = L.llama_model_n_embd(model_ptr) // max(L.llama_model_n_head(model_ptr), 1)
    k = meta(f"{arch}.attention.key_length")
    v = meta(f"{arch}.attention.value_length")
    dim_k = int(k) if k.isdigit() else default
    return dim_k, int(v) if v.isdigit() else dim_k


_SPLIT_MODES = {"none": L.LLAMA_SPLIT_MODE_NONE, "layer": L.LLAMA_SPLIT_MODE_LAYER, "row": L.LLAMA_SPLIT_MODE_ROW}


def _multi_device_params(mparams: Any, settings: Settings) -> tuple[Any, Any]:
    """Set split mode, main device, tensor split and RPC workers' devices on llama_model_params."""
    from ..distributed import parse_tensor_split
    from . import ggml

    endpoints = settings.rpc.split(",") if settings.rpc else []
    mparams.split_mode = _SPLIT_MODES[settings.split_mode]
    mparams.main_gpu = settings.main_gpu
    split = None
    if settings.tensor_split or settings.main_gpu:
        # llama.cpp ignores shares beyond its devices and fails a bad main_gpu with a log line only
        names = [f"{d.name} ({d.description})" for d in ggml.offload_devices(endpoints)]
        shares = parse_tensor_split(settings.tensor_split) if settings.tensor_split else []
        if len(shares) > len(names) or settings.main_gpu >= max(len(names), 1):
            what = f"tensor_split has {len(shares)} shares" if len(shares) > len(names) else f"main_gpu={settings.main_gpu}"
            raise ConfigError(f"{what}, but llama.cpp can offload to {len(names)} device(s): {', '.join(names) or 'none (CPU only)'}.",
                              "Give one share per device, in this order.")
        if shares:
            split = (ctypes.c_float * L.llama_max_devices())(*shares)
            mparams.tensor_split = split
    devices = ggml.model_devices(endpoints)
    if devices is not None:
        mparams.devices = ctypes.cast(devices, ctypes.c_void_p)
    return split, devices


# The logits one decode's outputs may take (see Model.output_rows). 64 MiB made a text's chunks 110
# tokens on qwen2's 152k vocabulary: four times the decodes of its prefill, each with a fixed cost.
OUTPUT_BYTES = 256 << 20


def describe(llama_desc: str, n_params: int) -> str:
    """llama.cpp's "ARCH SIZE FTYPE" with SIZE from the real parameter count: llama.cpp names the size
    from a table of known layer counts, which calls SmolLM2-135M (30 layers) "256M"."""
    arch, _, rest = llama_desc.partition(" ")
    _, _, ftype = rest.partition(" ")
    if not ftype or n_params <= 0:
        return llama_desc
    size = f"{n_params / 1e9:.1f}B" if n_params >= 1e9 else f"{n_params / 1e6:.0f}M" if n_params >= 1e6 else \
        f"{n_params / 1e3:.0f}K"
    return f"{arch} {size} {ftype}"


_CPU_HOLE = 3  # the widest hole between rows a filler closes on a CPU (Model._gaps)


class Model:
    """A loaded GGUF model with one llama.cpp context (one or more sequences in its KV cache)."""

    def __init__(self, path: Path, settings: Settings, model_ptr: Any, ctx: Any, n_seq_max: int, load_seconds: float, embeddings: bool,
                 n_ctx: int = 0) -> None:
        self.path = path
        self.settings = settings
        self.on_gpu = settings.n_gpu_layers != 0 and bool(L.llama_supports_gpu_offload())  # some layers on a GPU
        # the widest hole between a step's rows that filler tokens close (_gaps): all on a GPU, few on a CPU;
        # none where a filler's cell might not come out cleanly (a recurrent state, a sliding window) or a
        # decode's every sequence is pooled (an embedding context)
        plain_cache = not (L.llama_model_is_recurrent(model_ptr) or L.llama_model_is_hybrid(model_ptr)
                           or L.llama_model_n_swa(model_ptr) > 0)
        self._widest_hole = (n_seq_max if self.on_gpu else _CPU_HOLE) if plain_cache and not embeddings else 0
        self.kv_bytes = kv_buffer_bytes()  # the KV cache as llama.cpp logged allocating it, just before
        self._model = model_ptr
        self._ctx = ctx
        self.vocab = L.llama_model_get_vocab(model_ptr)
        self.grammar_index: VocabIndex | None = None  # sampler.vocab_index builds it on first use
        self._mem = L.llama_get_memory(ctx)
        self.n_seq_max = n_seq_max
        self.embeddings = embeddings
        self.load_seconds = load_seconds
        # llama.cpp rounds a small context up (to 256 cells): the context asked for is the limit kept,
        # so --n-ctx 1 refuses a longer prompt instead of being silently raised.
        self.n_ctx = min(L.llama_n_ctx(ctx), n_ctx) if n_ctx > 0 else L.llama_n_ctx(ctx)
        self._eog: dict[int, bool] = {}
        self.seq_cells = min(L.llama_n_ctx_seq(ctx), self.n_ctx)  # the most one sequence can hold (all n_ctx when unified)
        # Read from llama.cpp's own sizes, not the clamped ones: a small context is rounded up per part, so
        # the clamped seq_cells can equal n_ctx with a part per sequence (range copies across parts abort).
        self.unified = n_seq_max > 1 and L.llama_n_ctx_seq(ctx) >= L.llama_n_ctx(ctx)
        self.n_batch = L.llama_n_batch(ctx)
        self.n_ctx_train = L.llama_model_n_ctx_train(model_ptr)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_embd = L.llama_model_n_embd(model_ptr)
        self.bos_id = L.llama_vocab_bos(self.vocab)
        self.eos_id = L.llama_vocab_eos(self.vocab)
        self.eot_id = L.llama_vocab_eot(self.vocab)
        self.size_bytes = L.llama_model_size(model_ptr)
        self.n_params = L.llama_model_n_params(model_ptr)
        buf = ctypes.create_string_buffer(256)
        L.llama_model_desc(model_ptr, buf, 256)
        self.description = describe(buf.value.decode("utf-8", "replace"), self.n_params)
        self.metadata = self._read_metadata()
        tmpl = L.llama_model_chat_template(model_ptr, None)
        self.chat_template: str | None = tmpl.decode("utf-8", "replace") if tmpl else None
        self._batch = L.llama_batch_init(max(self.n_batch, 1), 0, max(n_seq_max, 1))
        for i in range(max(self.n_batch, 1)):  # every token belongs to exactly one sequence
            self._batch.n_seq_id[i] = 1
            self._batch.seq_id[i][0] = 0
        self._slot_seq = [0] * max(self.n_batch, 1)
        np = numpy()
        size = max(self.n_batch, 1)  # numpy views of the batch's arrays: element stores without ctypes calls
        self._views = (np.ctypeslib.as_array(self._batch.token, shape=(size,)),
                       np.ctypeslib.as_array(self._batch.pos, shape=(size,)),
                       np.ctypeslib.as_array(ctypes.cast(self._batch.logits, ctypes.POINTER(ctypes.c_int8)), shape=(size,)))
        self._seq: dict[int, list[int]] = {}  # tokens whose KV entries are in the cache, per sequence
        # image embeddings by key (llama/vision.py), held by the requests that use them
        self.images: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self.whole_images = False  # its projector decodes each image in one batch, attending both ways (gemma-3)
        self.mixed_runs = False  # text and image tokens share an embedding batch (llama/vision.py, text_rows.py)
        self.gguf_info: Any = None  # the file's parsed header where the loader kept it (gguf_info.GGUFInfo)
        # A projector encoding on the CPU takes this around each encode, as every decode does: llama.cpp's CPU
        # threads spin at their barriers, so an encode beside a decode on the same cores slowed both (2 cores,
        # 16 clients' pictures: 0.62x llama-server's throughput, which runs the two one after the other).
        self.serial_compute: threading.Lock | None = None
        self.mrope: Any = None  # mrope.Positions where images take M-RoPE positions (position != index): vision.py sets it
        self._piece_cache: dict[tuple[int, bool], bytes] = {}
        self._closed = False  # no new borrower; freed once the last one is done
        self._freed = False
        self._users = 0  # threads inside borrowed(): the model is not freed under them
        self._borrowers: dict[int, int] = {}  # thread id -> nesting depth
        self._use_lock = threading.Lock()
        self._owns_weights = True
        self.speculator: Any = None  # speculative.Speculator: drafts for stream() and the server's engine

    # ---- loading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path | str, settings: Settings, *, n_seq_max: int = 1, embeddings: bool = False, validate: bool = True,
             kv_cells: int = 0) -> "Model":
        """Load a GGUF file; raise InvalidGGUFError, ConfigError (n_ctx too large) or ModelLoadError.

        ``settings.n_ctx`` is one sequence's context (0 = the trained length); ``kv_cells`` (default:
        that) is the whole KV cache. Where it holds every sequence at full length, each sequence gets
        its own part of it (llama.cpp's KV streams); where it is smaller, the sequences share it as
        one pool (a unified cache) and the caller keeps their total within it.

        Own parts are the faster layout: in a unified cache every sequence's attention runs over
        all the cells in use, the other sequences' masked out, so a step grows with the total of
        all contexts (H100, qwen2-7b, 64 sequences of ~150 tokens: 15.4 ms a step unified, 13.3
        split; bench/step_costs.py --kv-split)."""
        path = Path(path)
        info = None
        if validate:
            from ..gguf_info import validate as validate_gguf

            info = validate_gguf(path)  # llama.cpp can crash on truncated or corrupt files: reject them first
        if settings.n_gpu_layers == "auto":
            from ..gguf_info import inspect
            from ..offload import decide

            info = info or inspect(path)
            n_ctx = settings.n_ctx or info.context_length or 4096
            plan = decide(info, n_ctx, path.name, n_ubatch=settings.ubatch_size, kv_cells=max(kv_cells, n_ctx),
                          cache_types=(settings.cache_type_k, settings.cache_type_v))
            settings = replace(settings, n_gpu_layers=plan.n_gpu_layers)
        ngl = int(settings.n_gpu_layers)
        init_backend()
        started = time.perf_counter()
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = ALL_LAYERS if ngl < 0 else ngl
        # AMX weight buffers crash (or miscompute) where libggml-cpu was built by a GCC that drops the
        # tile configuration's stores (llama.cpp#20824; amx.py says why): a child process runs the AMX
        # kernel once per library and CPU, and only where it fails is the AMX buffer type dropped,
        # keeping CPU_REPACK's interleaved kernels (use_extra_bufts=False would drop those too).
        mparams.use_extra_bufts = amx.ensure().use_extra_bufts
        keep = _multi_device_params(mparams, settings)  # arrays llama.cpp reads during the load
        llama_reason()  # forget older lines
        model_ptr = L.llama_model_load_from_file(str(path).encode(), mparams)
        del keep
        if not model_ptr:
            raise ModelLoadError(f"llama.cpp could not load {path}{llama_reason()}.",
                                 "Run with GGUFRUN_DEBUG=1 to see llama.cpp's log.")
        n_ctx_train = L.llama_model_n_ctx_train(model_ptr)
        n_ctx = settings.n_ctx or n_ctx_train
        if n_ctx > n_ctx_train:
            L.llama_model_free(model_ptr)
            raise ConfigError(f"n_ctx={n_ctx} is larger than the model's trained context ({n_ctx_train}).", f"Use --n-ctx {n_ctx_train} or less.")
        try:
            unified = kv_cells < n_ctx * n_seq_max
            ctx = _new_context(model_ptr, settings, max(kv_cells, n_ctx), n_seq_max, embeddings, path, unified)
        except BaseException:
            L.llama_model_free(model_ptr)
            raise
        return cls(path, settings, model_ptr, ctx, n_seq_max, time.perf_counter() - started, embeddings,
                   n_ctx=max(kv_cells, n_ctx))

    def new_context(self, *, n_ctx: int, n_seq_max: int = 1, embeddings: bool = False) -> "Model":
        """A second context over these same weights (no second load): the embedder of a pooling model.
        Closing it frees only the context; the weights stay with this Model, which must outlive it."""
        settings = replace(self.settings, n_ctx=n_ctx)
        ctx = _new_context(self._model, settings, n_ctx, n_seq_max, embeddings, self.path)
        other = Model(self.path, settings, self._model, ctx, n_seq_max, 0.0, embeddings, n_ctx=n_ctx)
        other._owns_weights = False
        return other

    def _read_metadata(self) -> dict[str, str]:
        out: dict[str, str] = {}
        buf = ctypes.create_string_buffer(1024)
        for i in range(L.llama_model_meta_count(self._model)):
            L.llama_model_meta_key_by_index(self._model, i, buf, 1024)
            key = buf.value.decode("utf-8", "replace")
            n = L.llama_model_meta_val_str_by_index(self._model, i, buf, 1024)
            if n >= 0:
                out[key] = buf.value.decode("utf-8", "replace")
        return out

    def llama_decode(self, batch: Any) -> int:
        """llama_decode on this model's context, after any CPU encode in progress (serial_compute)."""
        lock = self.serial_compute
        if lock is None:
            return int(L.llama_decode(self._ctx, batch))
        with lock:
            return int(L.llama_decode(self._ctx, batch))

    @contextmanager
    def borrowed(self) -> Iterator["Model"]:
        """Use the model from a thread other than its owner's (tokenising for a server request):
        :meth:`close` then defers freeing it until the block ends, rather than free the vocabulary
        under it. Raises ModelClosedError once the model is closed."""
        me = threading.get_ident()
        with self._use_lock:
            if self._closed and not self._borrowers.get(me):  # a borrower may go on (nested calls)
                raise ModelClosedError(f"The model {self.path.name} has been unloaded.", "Retry the request.")
            self._users += 1
            self._borrowers[me] = self._borrowers.get(me, 0) + 1
        try:
            yield self
        finally:
            with self._use_lock:
                self._users -= 1
                self._borrowers[me] -= 1
                if not self._borrowers[me]:
                    del self._borrowers[me]
                last = self._closed and not self._users
            if last:
                self._free()

    def close(self) -> None:
        """Free the context (and the weights it owns) now, or when the last borrower is done."""
        with self._use_lock:
            if self._closed:
                return
            self._closed = True
            busy = self._users > 0
        if not busy:
            self._free()

    def _free(self) -> None:
        with self._use_lock:
            if self._freed:
                return
            self._freed = True
        L.llama_batch_free(self._batch)
        L.llama_free(self._ctx)
        if self._owns_weights:
            L.llama_model_free(self._model)
        if self.speculator is not None:
            self.speculator.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ---- vocabulary ------------------------------------------------------------------------

    def is_eog(self, token: int) -> bool:
        # Asked twice a token a stream (the engine's ends_at, then accept): a dict hit, not a
        # llama.cpp call that gives the GIL away and may wait to get it back.
        hit = self._eog.get(token)
        if hit is None:
            hit = self._eog[token] = bool(L.llama_vocab_is_eog(self.vocab, token))
        return hit

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        with self.borrowed():  # servers tokenise on request threads: never under a freed vocabulary
            return self._tokenize(text, add_special, parse_special)

    def _tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        arr = (L.llama_token * n_max)()
        n = L.llama_tokenize(self.vocab, data, len(data), arr, n_max, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            n_max = -n
            arr = (L.llama_token * n_max)()
            n = L.llama_tokenize(self.vocab, data, len(data), arr, n_max, add_special, parse_special)
        return list(arr[:n])

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        key = (token, special)
        piece = self._piece_cache.get(key)
        if piece is None and token < 0:  # an image token (images.py) has no text; llama.cpp would index out of range
            return b""
        if piece is None:
            with self.borrowed():
                buf = ctypes.create_string_buffer(64)
                n = L.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
                if n < 0:
                    buf = ctypes.create_string_buffer(-n)
                    n = L.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
            piece = buf.raw[:n]
            self._piece_cache[key] = piece
        return piece

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special=special) for t in tokens).decode("utf-8", "replace")

    # ---- KV cache bookkeeping ---------------------------------------------------------------

    def cached_tokens(self, seq_id: int = 0) -> list[int]:
        return list(self._seq.get(seq_id, ()))

    def history(self, seq_id: int = 0) -> list[int]:
        """The sequence's cached tokens in place, not copied (speculative drafting reads them every
        step): read only, and valid until the next decode or truncate of the sequence."""
        return self._seq.get(seq_id, [])

    def common_prefix(self, seq_id: int, tokens: list[int]) -> int:
        """How many leading ``tokens`` are already in the sequence's KV cache (reusable)."""
        return common_length(self._seq.get(seq_id, []), tokens)

    def seq_len(self, seq_id: int) -> int:
        return len(self._seq.get(seq_id, ()))

    def reset(self, seq_id: int | None = None) -> None:
        """Forget one sequence (or all) from the KV cache."""
        if seq_id is None:
            L.llama_memory_clear(self._mem, True)
            self._seq.clear()
        else:
            L.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
            self._seq.pop(seq_id, None)
        if self.mrope is not None:
            self.mrope.reset(seq_id)

    def truncate(self, seq_id: int, keep: int) -> int:
        """Keep at most the first ``keep`` cached tokens of a sequence (the server's prefix reuse
        per slot); return how many remain (0 where the cache cannot drop a tail)."""
        self._truncate(seq_id, keep)
        return self.seq_len(seq_id)

    def _truncate(self, seq_id: int, keep: int) -> None:
        """Keep the first ``keep`` cached tokens of a sequence (fewer where ``keep`` falls inside an
        M-RoPE image: its rows share one position, so it goes whole); fall back to a full clear where
        the cache cannot drop a tail (recurrent and some sliding-window caches)."""
        cached = self._seq.get(seq_id, [])
        if keep >= len(cached):
            return
        pos = keep
        if self.mrope is not None:  # the KV cells hold positions: a cut is an image's start or a text token's position
            keep = self.mrope.boundary(seq_id, keep)
            pos = self.mrope.at(seq_id, keep)
        if keep > 0 and L.llama_memory_seq_rm(self._mem, seq_id, pos, -1):
            del cached[keep:]
            if self.mrope is not None:
                self.mrope.cut(seq_id, keep)
        else:
            self.reset(seq_id)

    def copy_prefix(self, src: int, dst: int, n: int) -> int:
        """Make sequence ``dst`` start with the first ``n`` cached tokens of ``src`` without
        evaluating them again; return how many it now holds. A unified cache shares the cells
        (llama_memory_seq_cp of the range); with a part each, llama.cpp copies only a whole part
        (any other range aborts the process), queued for the next decode, and the tail is dropped."""
        self.reset(dst)
        n = min(n, self.seq_len(src))
        if self.mrope is not None:
            n = self.mrope.boundary(src, n)
        if n <= 0:
            return 0
        if self.unified:
            L.llama_memory_seq_cp(self._mem, src, dst, 0, n if self.mrope is None else self.mrope.at(src, n))
            self._seq[dst] = self._seq[src][:n]
            if self.mrope is not None:
                self.mrope.copy(src, dst, n)
        else:
            L.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
            self._seq[dst] = list(self._seq[src])
            if self.mrope is not None:
                self.mrope.copy(src, dst, len(self._seq[dst]))
            self._truncate(dst, n)
        return self.seq_len(dst)

    def synchronize(self) -> None:
        """Wait for queued GPU work; call before stopping a clock (llama_decode is asynchronous)."""
        L.llama_synchronize(self._ctx)

    # ---- decoding ---------------------------------------------------------------------------

    def _fill(self, items: list[tuple[int, list[int], bool]], all_logits: bool = False, all_from: int | None = None) -> list[int]:
        # Stores through numpy views: a server step is mostly 64 one-token items, where per-item
        # ctypes copies cost ~1 ms of the engine thread; a prompt chunk is one slice assignment.
        # Items from ``all_from`` on output every token (an embedding chunk), the others as ``all_logits`` says.
        tok, pos_v, logit = self._views
        slots = self._slot_seq
        b = self._batch
        n = 0
        out: list[int] = []
        every = all_logits
        for index, (seq_id, tokens, want) in enumerate(items):
            all_logits = every or (all_from is not None and index >= all_from)
            k = len(tokens)
            if not k:
                out.append(-1)
                continue
            pos = len(self._seq.setdefault(seq_id, []))
            if self.mrope is not None:
                pos = self.mrope.at(seq_id, pos)
            if k == 1:
                tok[n], pos_v[n], logit[n] = tokens[0], pos, 1 if want or all_logits else 0
            else:
                tok[n : n + k] = tokens
                pos_v[n : n + k] = range(pos, pos + k)
                logit[n : n + k] = 1 if all_logits else 0
                if want:  # True, or how many trailing positions want logits (a speculative draft's)
                    logit[n + k - int(want) : n + k] = 1
            for i in range(n, n + k):
                if slots[i] != seq_id:  # each slot keeps its last seq id; rewrite only on change
                    b.seq_id[i][0] = seq_id
                    slots[i] = seq_id
            n += k
            out.append(n - 1 if want else -1)
        b.n_tokens = n
        return out

    def _decode_batch(self, items: list[tuple[int, list[int], bool]], all_logits: bool = False, all_from: int | None = None) -> list[int]:
        for seq_id, tokens, _ in items:
            if self.seq_len(seq_id) + len(tokens) > self.n_ctx:
                raise ContextOverflowError(
                    f"Sequence of {self.seq_len(seq_id) + len(tokens)} tokens does not fit the context of {self.n_ctx}.",
                    n_tokens=self.seq_len(seq_id) + len(tokens), n_ctx=self.n_ctx,
                )
        if any(t and (t[0] < 0 or (len(t) > 1 and min(t) < 0)) for _, t, _ in items):  # image tokens (images.py)
            from .vision import decode_with_images

            return decode_with_images(self, items, all_logits)
        gaps = self._gaps(items) if not all_logits and all_from is None else []
        if gaps:
            ordered, order = self._in_runs(items, gaps)
            out = [o for _, o in sorted(zip(order, self._fill(ordered)))][: len(items)]
        else:
            out = self._fill(items, all_logits, all_from)
        # Embeddings on for this decode only: llama.cpp reads the flag while it queues the decode (which
        # rows to copy out), and the rows stay readable until the next decode.
        switch = all_from is not None and all_from < len(items) and not self.embeddings
        if switch:
            L.llama_set_embeddings(self._ctx, True)
        try:
            rc = self.llama_decode(self._batch)
        finally:
            if switch:
                L.llama_set_embeddings(self._ctx, False)
        if rc != 0:
            # 1 = no KV slot; <0 = error. The cache is unchanged for this batch in both cases.
            raise ContextOverflowError(f"llama_decode failed (code {rc}): the KV cache is full.") if rc == 1 else ModelLoadError(f"llama_decode failed (code {rc}).")
        for seq_id in gaps:
            self._drop_filler(seq_id)
        for seq_id, tokens, _ in items:
            self._seq[seq_id].extend(tokens)
        return out

    def _gaps(self, items: list[tuple[int, list[int], bool]]) -> list[int]:
        """Idle sequences between the ids of this decode's one-token items (the rows of a server
        step) that a filler token each joins into one run. With a KV stream per sequence llama.cpp
        puts only sequences of consecutive ids in one micro-batch (llama_batch_allocr::split_equal),
        and each micro-batch is another pass over the weights: rows of slots 0, 2, 4 .. 14 took 132 ms
        where all 16 slots took 83 (SmolLM2-135M shape, 2-core CPU). A hole is filled where its rows
        cost less than a pass: on a GPU a row is next to nothing; on a CPU one costs ~1/3 of a pass
        there (slots 0 and 15: 32 ms apart, 80 filled), so only holes of up to 3."""
        if self.unified or self.n_seq_max < 2 or not self._widest_hole or self.mrope is not None:
            return []  # (M-RoPE: a prompt read up to inside an image ends on its start's position, which a drop would cut)
        ones = [seq for seq, toks, _ in items if len(toks) == 1]
        if len(ones) < 2 or ones[-1] - ones[0] + 1 == len(ones):
            return []
        if ones != sorted(set(ones)) or any(len(t) != 1 for _, t, _ in items[: len(ones)]):
            return []  # outputs are read in batch order: the fillers go only where no item moves
        busy = {seq for seq, _, _ in items}
        gaps: list[int] = []
        for a, b in zip(ones, ones[1:]):
            hole = [seq for seq in range(a + 1, b) if seq not in busy and len(self._seq.get(seq, ())) < self.seq_cells - 1]
            if hole and len(hole) == b - a - 1 and len(hole) <= self._widest_hole:  # (a prompt chunk's sequence or a full one stays a hole)
                gaps += hole
        room = self.n_batch - sum(len(t) for _, t, _ in items)
        return gaps if len(gaps) <= room else []

    def _in_runs(self, items: list[tuple[int, list[int], bool]], gaps: list[int]) -> tuple[list[tuple[int, list[int], bool]], list[int]]:
        """The items with a filler for each gap, one-token items and fillers first in id order, then
        the rest; and each entry's place in the caller's order (fillers last)."""
        fillers = [(seq, [0], False) for seq in gaps]  # any id of the vocabulary: its cell is dropped after
        tagged = [(item, k) for k, item in enumerate(items)] + [(f, len(items) + k) for k, f in enumerate(fillers)]
        ones = sorted((t for t in tagged if len(t[0][1]) == 1), key=lambda t: t[0][0])
        rest = [t for t in tagged if len(t[0][1]) != 1]
        ordered = ones + rest
        return [item for item, _ in ordered], [k for _, k in ordered]

    def _drop_filler(self, seq_id: int) -> None:
        """Remove the filler token just decoded into an idle sequence, or clear the sequence where
        its cache cannot drop a tail."""
        if not L.llama_memory_seq_rm(self._mem, seq_id, len(self._seq.get(seq_id, ())), -1):
            self.reset(seq_id)

    def decode(self, items: list[tuple[int, list[int], bool]], embed: tuple[int, list[int]] | None = None) -> list[int]:
        """Evaluate tokens for several sequences in one llama_decode; return, per item, the output
        index to sample from (-1 where no logits were asked; an int ``want`` > 1 asks for that many
        trailing positions, the last one's index returned). The tokens of all items together must
        fit in n_batch, except for a single item, which is split into n_batch chunks.

        ``embed`` (seq_id, tokens): a chunk of a text being embedded, in the same decode, last, every
        token an output: :meth:`embedding_rows` then reads its hidden states (``len(items)``'s
        outputs come first), until the next decode."""
        if embed is not None:
            if sum(len(t) for _, t, _ in items) + len(embed[1]) > self.n_batch:
                raise ValueError(f"decode() got more than n_batch={self.n_batch} tokens across sequences")
            return self._decode_batch([*items, (embed[0], embed[1], True)], all_from=len(items))[:-1]
        if len(items) == 1 and len(items[0][1]) > self.n_batch and min(items[0][1]) < 0:
            return self._decode_batch(items)  # image tokens: llama/vision.py cuts batches where images start and end
        if len(items) == 1 and len(items[0][1]) > self.n_batch:
            seq_id, tokens, want = items[0]
            for start in range(0, len(tokens), self.n_batch):
                chunk = tokens[start : start + self.n_batch]
                out = self._decode_batch([(seq_id, chunk, want and start + self.n_batch >= len(tokens))])
            return out
        if sum(len(t) for _, t, _ in items) > self.n_batch:
            raise ValueError(f"decode() got more than n_batch={self.n_batch} tokens across sequences")
        return self._decode_batch(items)

    def decode_one(self, seq_id: int, token: int) -> bool:
        """Queue one token of one sequence with its logits (output index 0), straight into the
        preallocated batch (the token loop's hot path: stream() and speculative.stream's steps
        without a draft). False when the context (or the KV cache) has no cell left."""
        seq = self._seq.setdefault(seq_id, [])
        if len(seq) >= self.n_ctx:
            return False
        batch, slots = self._batch, self._slot_seq
        batch.token[0], batch.logits[0] = token, True
        batch.pos[0] = len(seq) if self.mrope is None else self.mrope.at(seq_id, len(seq))
        if slots[0] != seq_id:
            batch.seq_id[0][0] = seq_id
            slots[0] = seq_id
        batch.n_tokens = 1
        rc = self.llama_decode(batch)
        if rc not in (0, 1):
            raise ModelLoadError(f"llama_decode failed (code {rc}).")
        if rc == 0:
            seq.append(token)
        return rc == 0

    def embedding_rows(self, first: int, n: int) -> Any:
        """Rows ``first .. first + n`` of the last decode's output hidden states (the final norm's
        output, what a mean-pooled embedding averages): a float32 [n, n_embd] view, valid until the
        next decode. Waits for the device."""
        ptr = L.llama_get_embeddings(self._ctx)
        if not ptr:
            raise ModelLoadError("llama.cpp returned no embeddings for the last decode.")
        return numpy().ctypeslib.as_array(ptr, shape=(first + n, self.n_embd))[first:]

    @property
    def output_rows(self) -> int:
        """The most outputs (tokens whose logits or hidden states are read) one decode should ask:
        llama.cpp keeps a vocabulary row of logits per output for good (output_reserve: logits are
        reserved and copied out even when only embeddings are read: llama_context::decode, pooled
        or not), so the rows are capped at 256 MiB of logits (441 on qwen2's 152k vocabulary, 256 on
        gemma3's 262k, all of a 512-token batch on SmolLM2's 49k), at least n_seq_max."""
        return min(self.n_batch, max(self.n_seq_max, OUTPUT_BYTES // (4 * max(self.n_vocab, 1))))

    def logits_rows(self, n: int) -> Any:
        """The logits of the last decode's ``n`` outputs, in batch order: a float32 [n, n_vocab]
        view of llama.cpp's buffer (valid until the next decode; sampling edits it in place)."""
        return numpy().ctypeslib.as_array(L.llama_get_logits(self._ctx), shape=(n, self.n_vocab))

    def sample_one(self, seq: SeqSampler, output_index: int) -> tuple[int, Any]:
        """Sample the next token of one sequence from the logits at ``output_index``; return
        (token, logprob info or None). The caller accepts it (Generation.accept)."""
        p = seq.params
        if p.greedy and seq.grammar is None and p.logprobs is None and not p.penalised and not len(seq.bias_ids) and not seq.forced:
            return self._argmax(output_index), None
        row = numpy().ctypeslib.as_array(L.llama_get_logits_ith(self._ctx, output_index), shape=(1, self.n_vocab))
        tokens, infos = sample_rows(row, [seq])
        return tokens[0], infos[0]

    def sample(self, sampler: "Sampler", output_index: int) -> int:
        """Sample and accept the next token from the logits at ``output_index`` (one Sampler per sequence)."""
        seq = sampler.state()
        tok, _ = self.sample_one(seq, output_index)
        seq.accept(tok)
        return tok

    def _argmax(self, output_index: int) -> int:
        logits = L.llama_get_logits_ith(self._ctx, output_index)
        return int(numpy().ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def draw_chain(self, params: SamplingParams) -> "DrawChain":
        """llama.cpp's truncate-and-draw chain for one request (see DrawChain)."""
        return DrawChain(params, self.n_vocab, self)

    def prepare_grammars(self) -> None:
        """Build what every grammar of this model reads (the vocabulary index, ~0.2 s for 152k
        tokens, once): for callers that can do it off an event loop before the first grammar."""
        with self.borrowed():
            vocab_index(self)

    def grammar(self, text: str, triggers: Sequence[str] = ()) -> "Grammar":
        """A llama.cpp grammar sampler for GBNF ``text``, lazy with ``triggers`` (regex patterns: it
        applies from where one matches the text generated); raise GrammarError when llama.cpp rejects it."""
        with self.borrowed():
            return Grammar(self, text, triggers)

    def start(self, tokens: list[int], params: SamplingParams, *, max_tokens: int = 0, stop: list[str] | tuple[str, ...] = (),
              stop_ids: frozenset[int] | None = None, seq_id: int = 0, ignore_eos: bool = False,
              think: Any = None) -> Generation:
        """A Generation for ``tokens`` in sequence ``seq_id`` (the prompt checked against the context);
        ``think``: a reasoning.ThinkBudget, for a reasoning model's thinking to be counted and budgeted."""
        if not tokens:
            raise ContextOverflowError("Empty prompt.")
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"The prompt has {len(tokens)} tokens; the context holds {self.n_ctx}.",
                "Shorten it or raise --n-ctx.", n_tokens=len(tokens), n_ctx=self.n_ctx,
            )
        return Generation(self, tokens, params, max_tokens=max_tokens, n_ctx=self.n_ctx, stop=stop, stop_ids=stop_ids,
                          ignore_eos=ignore_eos, grammar_factory=self.grammar, draw_factory=self.draw_chain, think=think)

    def stream(self, gen: Generation, tokens: list[int], *, seq_id: int = 0) -> Generator[tuple[int, str], None, None]:
        """Drive ``gen`` over ``tokens`` in one sequence, reusing the KV cache's common prefix:
        yield (token, text now safe to show) per generated token, then (-1, held-back text) when it
        ends. Closing the iterator early is safe (the generation ends as "cancelled")."""
        if self.speculator is not None:
            from ..speculative import stream

            yield from stream(self, self.speculator, gen, tokens, seq_id)
            return
        st = gen.stats
        gen.started = time.perf_counter()
        common = min(self.common_prefix(seq_id, tokens), len(tokens) - 1)  # the last prompt token is re-evaluated for its logits
        self._truncate(seq_id, common)
        st.cached_tokens = self.seq_len(seq_id)
        idx = self.decode([(seq_id, tokens[st.cached_tokens:], True)])[0]
        sample, accept, decode_one = self.sample_one, gen.accept, self.decode_one
        sampler = gen.sampler
        try:
            while True:
                tok, info = sample(sampler, idx)  # reads the logits, so it also waits for the decode
                # The next decode is queued before this token is handed out: the caller's printing
                # (or streaming) then overlaps the device's work, as in the server's engine.
                go = not gen.ends_at(tok) and decode_one(seq_id, tok)  # False: the context is full
                text, reason = accept(tok, info)
                if reason is not None:
                    yield from gen.ending(tok, text, reason)
                    return
                yield tok, text
                if not go:  # the context is full
                    yield from gen.context_full()
                    return
                idx = 0
        finally:
            gen.close()

    def generate(self, tokens: list[int], sampler: "Sampler", *, max_tokens: int = 0, seq_id: int = 0, stats: GenStats | None = None) -> Iterator[int]:
        """Yield sampled tokens after ``tokens``, reusing the KV cache's common prefix.

        Stops at an end-of-generation token (not yielded), after ``max_tokens`` (0 = no limit) or
        when the context is full. Closing the generator early is safe.
        """
        gen = self.start(tokens, sampler.params, max_tokens=max_tokens, seq_id=seq_id)
        if stats is not None:
            gen.stats = stats
            stats.prompt_tokens = len(tokens)
        for tok, _ in self.stream(gen, tokens, seq_id=seq_id):
            if tok >= 0:
                yield tok

    # ---- bench and quality ----------------------------------------------------------------

    def eval_logits(self, tokens: list[int], seq_id: int = 0) -> Any:
        """Logits for every position of ``tokens`` in a fresh sequence: float32 [len, n_vocab]."""
        import numpy as np

        self.reset(seq_id)
        out = np.empty((len(tokens), self.n_vocab), dtype=np.float32)
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            self._decode_batch([(seq_id, chunk, True)], all_logits=True)
            ptr = L.llama_get_logits(self._ctx)
            out[start : start + len(chunk)] = np.ctypeslib.as_array(ptr, shape=(len(chunk), self.n_vocab))
        self.reset(seq_id)
        return out

    @property
    def pools_embeddings(self) -> bool:
        """Whether the model pools its own embeddings (an embedding model: mean, CLS, last...)."""
        return bool(L.llama_pooling_type(self._ctx) != L.LLAMA_POOLING_TYPE_NONE)

    # ---- llama-server's extras: fill-in-the-middle tokens, rank pooling, slot files ----------

    def vocab_specials(self) -> dict[str, int]:
        """The tokens llama-server's /infill and /rerank build prompts with: ``fim_pre``, ``fim_suf``,
        ``fim_mid``, ``fim_rep``, ``fim_sep``, ``fim_pad``, ``sep`` (-1 where the vocabulary has none;
        llama.cpp also finds FIM tokens by their text where the metadata names none), and
        ``add_bos``/``add_eos``/``add_sep`` (1 where tokenising a text adds that token)."""
        v = self.vocab
        out = {name: int(getattr(L, f"llama_vocab_{name}")(v)) for name in
               ("fim_pre", "fim_suf", "fim_mid", "fim_rep", "fim_sep", "fim_pad", "sep")}
        for name in ("bos", "eos", "sep"):
            out[f"add_{name}"] = int(bool(getattr(L, f"llama_vocab_get_add_{name}")(v)))
        return out

    @property
    def ranks(self) -> bool:
        """Whether the model is a reranker (rank pooling: its classification head scores a text)."""
        return bool(L.llama_pooling_type(self._ctx) == L.LLAMA_POOLING_TYPE_RANK)

    def named_template(self, name: str) -> str | None:
        """A named template of the GGUF (``tokenizer.chat_template.NAME``: "rerank" for Qwen3-Reranker)."""
        raw = L.llama_model_chat_template(self._model, name.encode())
        return raw.decode("utf-8", "replace") if raw else None

    def save_seq(self, seq_id: int, path: Path) -> tuple[int, int]:
        """Write a sequence's KV cells and tokens to ``path`` (llama_state_seq_save_file): (tokens, bytes)."""
        tokens = self._seq.get(seq_id, [])
        arr = (L.llama_token * max(len(tokens), 1))(*tokens)
        self.synchronize()
        written = L.llama_state_seq_save_file(self._ctx, str(path).encode(), seq_id, arr, len(tokens))
        if not written:
            raise ModelLoadError(f"llama.cpp could not save sequence {seq_id} to {path.name}{llama_reason()}.")
        return len(tokens), int(written)

    def load_seq(self, seq_id: int, path: Path) -> tuple[int, int]:
        """Replace a sequence's KV cells with those saved in ``path``: (tokens, bytes read). A file
        llama.cpp rejects (another model, too many cells) or one with tokens outside the vocabulary
        leaves the sequence empty and raises ModelLoadError."""
        self.reset(seq_id)
        arr = (L.llama_token * self.seq_cells)()
        count = ctypes.c_size_t(0)
        self.synchronize()
        read = L.llama_state_seq_load_file(self._ctx, str(path).encode(), seq_id, arr, self.seq_cells, ctypes.byref(count))
        tokens = list(arr[: min(count.value, self.seq_cells)])
        if read and any(t < 0 for t in tokens):  # image tokens: what names their rows and positions is not in the file
            self.reset(seq_id)
            raise ModelLoadError(f"{path.name} holds a picture, which a slot file does not restore.",
                                 "Send the request with its picture again.")
        if not read or any(not 0 <= t < self.n_vocab for t in tokens):
            self.reset(seq_id)
            raise ModelLoadError(f"{path.name} is not a saved sequence of this model and context{llama_reason()}.")
        self._seq[seq_id] = tokens
        return len(tokens), int(read)

    def embed_steps(self, text: str | list[int], *, seq_id: int = 0) -> Generator[None, None, tuple[list[float], int]]:
        """Embed one text (or its tokens; cut to n_batch) in sequence ``seq_id``, one llama_decode per
        ``next()``; the generator's value is the L2-normalised vector (mean-pooled where the model
        has no pooling) and the token count. Close it to abandon the text.

        A generation context (loaded without embeddings) serves too: embeddings are switched on
        around each decode and the text goes through in chunks of :attr:`output_rows` tokens (every
        token is an output, for the mean, and llama.cpp keeps a logits row per output). It used to
        be 8 tokens a chunk: the decodes' fixed cost made a 401-token text 50 decodes, 116 s on a
        loaded 2-core CPU against 4.5 s as one prompt. A pooling model (an embedding model) gets the
        whole text in one decode, as pooling needs."""
        np = numpy()
        pooled = self.pools_embeddings
        if pooled and not self.embeddings:
            raise ModelLoadError("This model pools its embeddings; it needs a context loaded with embeddings.")
        chunk = self.n_batch if pooled else self.output_rows
        tokens = (self.tokenize(text) if isinstance(text, str) else text)[: self.n_batch]
        rank = pooled and self.ranks  # a reranker pools to its classification head's scores, not a vector
        width = max(L.llama_model_n_cls_out(self._model), 1) if rank else self.n_embd
        total = np.zeros(width, dtype=np.float64)
        self.reset(seq_id)
        try:
            for start in range(0, len(tokens), chunk):
                if start:
                    yield
                part = tokens[start : start + chunk]
                if not self.embeddings:
                    L.llama_set_embeddings(self._ctx, True)
                try:
                    self._decode_batch([(seq_id, part, True)], all_logits=True)
                    if pooled:
                        total += np.ctypeslib.as_array(L.llama_get_embeddings_seq(self._ctx, seq_id), shape=(width,))
                    else:
                        total += np.ctypeslib.as_array(L.llama_get_embeddings(self._ctx), shape=(len(part), self.n_embd)).sum(axis=0)
                finally:
                    if not self.embeddings:
                        L.llama_set_embeddings(self._ctx, False)
        finally:
            self.reset(seq_id)
        if rank:  # the scores as the head gives them (llama-server's relevance_score is the first)
            return total.tolist(), len(tokens)
        norm = float(np.linalg.norm(total)) or 1.0  # the mean's direction: no need to divide by the count
        return (total / norm).tolist(), len(tokens)


class SeqEmbedder:
    """The server's embedder on the generation context itself, in a sequence of its own: the
    weights, KV cache and compute buffers serve both (no second context, no extra device memory)."""

    shares_context = True  # its texts take cells of the requests' KV cache (the engine reserves them)

    def __init__(self, model: Model, seq_id: int) -> None:
        self.model = model
        self.seq_id = seq_id

    def embed_steps(self, text: str | list[int]) -> Generator[None, None, tuple[list[float], int]]:
        return self.model.embed_steps(text, seq_id=self.seq_id)

    def close(self) -> None:
        """Nothing of its own to free: the model belongs to the engine."""


class TokenDecoder:
    """Turns tokens into text as they arrive without ever splitting a UTF-8 character."""

    def __init__(self, model: Model, *, special: bool = False) -> None:
        self._model = model
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._utf8.decode(self._model.token_bytes(token, special=self._special))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
