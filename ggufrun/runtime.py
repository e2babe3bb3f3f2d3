"""The only module that imports llama_cpp: loading, the token loop, batched decoding, quantising.

We drive llama.cpp's low-level API (llama_decode + a C sampler chain) rather than
``llama_cpp.Llama``: measured on gemma3-270m with 2 threads, the high-level streaming path loses
8-23% of generation speed, the low-level loop none (shared/reference/baseline.md).
"""

from __future__ import annotations

import codecs
import ctypes
from array import array
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator


def _prefer_system_libstdcxx() -> None:
    """Put the system libstdc++ first in the global symbol scope before llama.cpp loads.

    Some CUDA builds of libggml-cuda link libstdc++ statically and export its symbols; libllama's
    std::ostream calls then bind to that copy, whose locale is never initialised, and loading a
    model segfaulted in llama_model::print_info (seen on an H100 machine, depending on import order).
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
        except OSError:
            pass


_prefer_system_libstdcxx()
import llama_cpp as L  # noqa: E402

from . import paths
from .errors import ConfigError, ContextOverflowError, ModelLoadError
from .settings import Settings

_FLASH_ATTN = {"on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED, "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED, "auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO}
_ALL_LAYERS = 0x7FFFFFFF  # llama.cpp clamps this to the model's layer count
_backend_ready = False
_GGML_LOG_ERROR = 4  # ggml.h: NONE, DEBUG, INFO, WARN, ERROR, CONT


@L.llama_log_callback
def _quiet_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level == _GGML_LOG_ERROR:
        os.write(2, text)


def _init_backend() -> None:
    global _backend_ready
    if _backend_ready:
        return
    # llama.cpp prints pages of load logs to stderr by default; keep errors only unless debugging.
    if not paths.debug():
        L.llama_log_set(_quiet_log, ctypes.c_void_p(0))
    L.llama_backend_init()
    _backend_ready = True


def _np() -> Any:
    import numpy

    return numpy


def _has_amx() -> bool:
    return "AMX_INT8 = 1" in L.llama_print_system_info().decode("utf-8", "replace")


@dataclass
class GenStats:
    """Counts and timings of one generate() call, as `ollama run --verbose` reports them."""

    prompt_tokens: int = 0  # tokens in the prompt
    cached_tokens: int = 0  # of those, reused from the KV cache
    prompt_seconds: float = 0.0  # time to evaluate the uncached prompt tokens
    gen_tokens: int = 0
    gen_seconds: float = 0.0  # from the first generated token to the last
    ttft_seconds: float = 0.0  # from the call to the first generated token
    finish_reason: str = ""  # "stop" (end of turn), "length" (max_tokens or context full)

    @property
    def prompt_tps(self) -> float:
        evaluated = self.prompt_tokens - self.cached_tokens
        return evaluated / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def gen_tps(self) -> float:
        # The first token comes from the prompt's logits; rate over the decodes that followed it.
        return (self.gen_tokens - 1) / self.gen_seconds if self.gen_tokens > 1 and self.gen_seconds > 0 else 0.0


class Model:
    """A loaded GGUF model with one llama.cpp context (one or more sequences in its KV cache)."""

    def __init__(self, path: Path, settings: Settings, model_ptr: Any, ctx: Any, n_seq_max: int, load_seconds: float, embeddings: bool) -> None:
        self.path = path
        self.settings = settings
        self._model = model_ptr
        self._ctx = ctx
        self._vocab = L.llama_model_get_vocab(model_ptr)
        self._mem = L.llama_get_memory(ctx)
        self.n_seq_max = n_seq_max
        self.embeddings = embeddings
        self.load_seconds = load_seconds
        self.n_ctx = L.llama_n_ctx(ctx)
        self.n_batch = L.llama_n_batch(ctx)
        self.n_ctx_train = L.llama_model_n_ctx_train(model_ptr)
        self.n_vocab = L.llama_vocab_n_tokens(self._vocab)
        self.n_embd = L.llama_model_n_embd(model_ptr)
        self.bos_id = L.llama_vocab_bos(self._vocab)
        self.eos_id = L.llama_vocab_eos(self._vocab)
        self.eot_id = L.llama_vocab_eot(self._vocab)
        self.size_bytes = L.llama_model_size(model_ptr)
        self.n_params = L.llama_model_n_params(model_ptr)
        buf = ctypes.create_string_buffer(256)
        L.llama_model_desc(model_ptr, buf, 256)
        self.description = buf.value.decode("utf-8", "replace")
        self.metadata = self._read_metadata()
        tmpl = L.llama_model_chat_template(model_ptr, None)
        self.chat_template: str | None = tmpl.decode("utf-8", "replace") if tmpl else None
        self._batch = L.llama_batch_init(max(self.n_batch, 1), 0, max(n_seq_max, 1))
        for i in range(max(self.n_batch, 1)):  # every token belongs to exactly one sequence
            self._batch.n_seq_id[i] = 1
            self._batch.seq_id[i][0] = 0
        self._slot_seq = [0] * max(self.n_batch, 1)
        self._seq: dict[int, list[int]] = {}  # tokens whose KV entries are in the cache, per sequence
        self._piece_cache: dict[tuple[int, bool], bytes] = {}
        self._closed = False

    # ---- loading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path | str, settings: Settings, *, n_seq_max: int = 1, embeddings: bool = False, validate: bool = True) -> "Model":
        """Load a GGUF file; raise InvalidGGUFError, ConfigError (n_ctx too large) or ModelLoadError."""
        path = Path(path)
        info = None
        if validate:
            from .gguf_info import validate as validate_gguf

            info = validate_gguf(path)  # llama.cpp can crash on truncated or corrupt files: reject them first
        if settings.n_gpu_layers == "auto":
            from dataclasses import replace

            from .gguf_info import inspect
            from .offload import decide

            info = info or inspect(path)
            plan = decide(info, settings.n_ctx or info.context_length or 4096, path.name, n_ubatch=settings.ubatch_size)
            settings = replace(settings, n_gpu_layers=plan.n_gpu_layers)
        ngl = int(settings.n_gpu_layers)
        _init_backend()
        started = time.perf_counter()
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = _ALL_LAYERS if ngl < 0 else ngl
        if _has_amx():
            # llama.cpp's AMX weight buffers segfault in ggml_backend_amx_mul_mat on the AMX machines we
            # tested (a -march=native build); the plain CPU buffers are correct and nearly as fast.
            mparams.use_extra_bufts = False
        model_ptr = L.llama_model_load_from_file(str(path).encode(), mparams)
        if not model_ptr:
            raise ModelLoadError(f"llama.cpp could not load {path}.", "Run with GGUFRUN_DEBUG=1 to see llama.cpp's log.")
        n_ctx_train = L.llama_model_n_ctx_train(model_ptr)
        n_ctx = settings.n_ctx or n_ctx_train
        if n_ctx > n_ctx_train:
            L.llama_model_free(model_ptr)
            raise ConfigError(f"n_ctx={n_ctx} is larger than the model's trained context ({n_ctx_train}).", f"Use --n-ctx {n_ctx_train} or less.")
        cparams = L.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = min(settings.batch_size, n_ctx)
        cparams.n_ubatch = min(settings.ubatch_size, cparams.n_batch)
        cparams.n_seq_max = n_seq_max
        threads = settings.effective_threads()
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.flash_attn_type = _FLASH_ATTN[settings.flash_attn]
        cparams.embeddings = embeddings
        cparams.no_perf = True
        # Several sequences share one KV cache of n_ctx cells, so each can grow to the full context.
        cparams.kv_unified = n_seq_max > 1
        ctx = L.llama_init_from_model(model_ptr, cparams)
        if not ctx:
            L.llama_model_free(model_ptr)
            raise ModelLoadError(
                f"llama.cpp could not create a context for {path.name} (n_ctx={n_ctx}, n_gpu_layers={settings.n_gpu_layers}).",
                "Try a smaller --n-ctx or fewer --n-gpu-layers.",
            )
        return cls(path, settings, model_ptr, ctx, n_seq_max, time.perf_counter() - started, embeddings)

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

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        L.llama_batch_free(self._batch)
        L.llama_free(self._ctx)
        L.llama_model_free(self._model)

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
        return bool(L.llama_vocab_is_eog(self._vocab, token))

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        arr = (L.llama_token * n_max)()
        n = L.llama_tokenize(self._vocab, data, len(data), arr, n_max, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            n_max = -n
            arr = (L.llama_token * n_max)()
            n = L.llama_tokenize(self._vocab, data, len(data), arr, n_max, add_special, parse_special)
        return list(arr[:n])

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        key = (token, special)
        piece = self._piece_cache.get(key)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = L.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = L.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
            piece = buf.raw[:n]
            self._piece_cache[key] = piece
        return piece

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special=special) for t in tokens).decode("utf-8", "replace")

    # ---- KV cache bookkeeping ---------------------------------------------------------------

    def cached_tokens(self, seq_id: int = 0) -> list[int]:
        return list(self._seq.get(seq_id, ()))

    def common_prefix(self, seq_id: int, tokens: list[int]) -> int:
        """How many leading ``tokens`` are already in the sequence's KV cache (reusable)."""
        n = 0
        for a, b in zip(self._seq.get(seq_id, ()), tokens):
            if a != b:
                break
            n += 1
        return n

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

    def truncate(self, seq_id: int, keep: int) -> int:
        """Keep at most the first ``keep`` cached tokens of a sequence (the server's prefix reuse
        per slot); return how many remain (0 where the cache cannot drop a tail)."""
        self._truncate(seq_id, keep)
        return self.seq_len(seq_id)

    def _truncate(self, seq_id: int, keep: int) -> None:
        """Keep the first ``keep`` cached tokens of a sequence; fall back to a full clear where the
        cache cannot drop a tail (recurrent and some sliding-window caches)."""
        cached = self._seq.get(seq_id, [])
        if keep >= len(cached):
            return
        if keep > 0 and L.llama_memory_seq_rm(self._mem, seq_id, keep, -1):
            del cached[keep:]
        else:
            self.reset(seq_id)

    def synchronize(self) -> None:
        """Wait for queued GPU work; call before stopping a clock (llama_decode is asynchronous)."""
        L.llama_synchronize(self._ctx)

    # ---- decoding ---------------------------------------------------------------------------

    def _fill(self, items: list[tuple[int, list[int], bool]], all_logits: bool = False) -> list[int]:
        # Bulk copies instead of per-token ctypes stores: at 9,000 prompt tokens/s on a GPU a
        # per-token Python loop alone cost 2% of prompt speed.
        b = self._batch
        n = 0
        out: list[int] = []
        for seq_id, tokens, want in items:
            k = len(tokens)
            if not k:
                out.append(-1)
                continue
            pos = len(self._seq.setdefault(seq_id, []))
            src_tok, src_pos = array("i", tokens), array("i", range(pos, pos + k))  # alive until copied
            ctypes.memmove(ctypes.byref(b.token.contents, 4 * n), src_tok.buffer_info()[0], 4 * k)
            ctypes.memmove(ctypes.byref(b.pos.contents, 4 * n), src_pos.buffer_info()[0], 4 * k)
            slots = self._slot_seq
            for i in range(n, n + k):
                if slots[i] != seq_id:  # each slot keeps its last seq id; rewrite only on change
                    b.seq_id[i][0] = seq_id
                    slots[i] = seq_id
            ctypes.memset(ctypes.byref(b.logits.contents, n), 1 if all_logits else 0, k)
            if want:
                b.logits[n + k - 1] = 1
            n += k
            out.append(n - 1 if want else -1)
        b.n_tokens = n
        return out

    def _decode_batch(self, items: list[tuple[int, list[int], bool]], all_logits: bool = False) -> list[int]:
        for seq_id, tokens, _ in items:
            if self.seq_len(seq_id) + len(tokens) > self.n_ctx:
                raise ContextOverflowError(
                    f"Sequence of {self.seq_len(seq_id) + len(tokens)} tokens does not fit the context of {self.n_ctx}.",
                    n_tokens=self.seq_len(seq_id) + len(tokens), n_ctx=self.n_ctx,
                )
        out = self._fill(items, all_logits)
        rc = L.llama_decode(self._ctx, self._batch)
        if rc != 0:
            # 1 = no KV slot; <0 = error. The cache is unchanged for this batch in both cases.
            raise ContextOverflowError(f"llama_decode failed (code {rc}): the KV cache is full.") if rc == 1 else ModelLoadError(f"llama_decode failed (code {rc}).")
        for seq_id, tokens, _ in items:
            self._seq[seq_id].extend(tokens)
        return out

    def decode(self, items: list[tuple[int, list[int], bool]]) -> list[int]:
        """Evaluate tokens for several sequences in one llama_decode; return, per item, the output
        index to sample from (-1 where no logits were asked). The tokens of all items together must
        fit in n_batch, except for a single item, which is split into n_batch chunks."""
        if len(items) == 1 and len(items[0][1]) > self.n_batch:
            seq_id, tokens, want = items[0]
            for start in range(0, len(tokens), self.n_batch):
                chunk = tokens[start : start + self.n_batch]
                out = self._decode_batch([(seq_id, chunk, want and start + self.n_batch >= len(tokens))])
            return out
        if sum(len(t) for _, t, _ in items) > self.n_batch:
            raise ValueError(f"decode() got more than n_batch={self.n_batch} tokens across sequences")
        return self._decode_batch(items)

    def sample(self, sampler: "Sampler", output_index: int) -> int:
        """Sample (and accept) the next token from the logits at ``output_index``."""
        if sampler.greedy:
            return self._argmax(output_index)
        return L.llama_sampler_sample(sampler._chain, self._ctx, output_index)

    def _argmax(self, output_index: int) -> int:
        logits = L.llama_get_logits_ith(self._ctx, output_index)
        return int(_np().ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def generate(self, tokens: list[int], sampler: "Sampler", *, max_tokens: int = 0, seq_id: int = 0, stats: GenStats | None = None) -> Iterator[int]:
        """Yield sampled tokens after ``tokens``, reusing the KV cache's common prefix.

        Stops at an end-of-generation token (not yielded), after ``max_tokens`` (0 = no limit) or
        when the context is full. Closing the generator early is safe.
        """
        st = stats if stats is not None else GenStats()
        started = time.perf_counter()
        if not tokens:
            raise ContextOverflowError("Empty prompt.")
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"The prompt has {len(tokens)} tokens; the context holds {self.n_ctx}.",
                "Shorten it or raise --n-ctx.", n_tokens=len(tokens), n_ctx=self.n_ctx,
            )
        common = min(self.common_prefix(seq_id, tokens), len(tokens) - 1)  # the last prompt token is re-evaluated for its logits
        self._truncate(seq_id, common)
        common = self.seq_len(seq_id)
        st.prompt_tokens, st.cached_tokens = len(tokens), common
        idx = self.decode([(seq_id, tokens[common:], True)])[0]
        seq = self._seq[seq_id]
        n_ctx = self.n_ctx
        sample = (lambda _chain, _ctx, i: self._argmax(i)) if sampler.greedy else L.llama_sampler_sample
        is_eog = L.llama_vocab_is_eog
        chain, ctx, vocab = sampler._chain, self._ctx, self._vocab
        batch, slots = self._batch, self._slot_seq
        first_at = 0.0
        n = 0
        try:
            while True:
                tok = sample(chain, ctx, idx)  # reads the logits, so it also waits for the decode
                now = time.perf_counter()
                if n == 0:
                    first_at = now
                    st.prompt_seconds = now - started
                    st.ttft_seconds = st.prompt_seconds
                else:
                    st.gen_seconds = now - first_at
                if is_eog(vocab, tok):
                    st.finish_reason = "stop"
                    return
                n += 1
                st.gen_tokens = n
                yield tok
                if (max_tokens and n >= max_tokens) or len(seq) >= n_ctx:
                    st.finish_reason = "length"
                    return
                # Single-token step, written straight into the preallocated batch (hot path).
                batch.token[0] = tok
                batch.pos[0] = len(seq)
                if slots[0] != seq_id:
                    batch.seq_id[0][0] = seq_id
                    slots[0] = seq_id
                batch.logits[0] = True
                batch.n_tokens = 1
                rc = L.llama_decode(ctx, batch)
                if rc == 1:  # no KV cell left: the context is full
                    st.finish_reason = "length"
                    return
                if rc != 0:
                    raise ModelLoadError(f"llama_decode failed (code {rc}).")
                seq.append(tok)
                idx = 0
        finally:
            if not st.finish_reason:
                st.finish_reason = "cancelled"

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

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """One L2-normalised embedding per text (mean-pooled where the model has no pooling), and
        the number of tokens embedded (each text is cut to n_batch tokens)."""
        import numpy as np

        if not self.embeddings:
            raise ModelLoadError("This model was loaded without embeddings.")
        pooled = L.llama_pooling_type(self._ctx) != L.LLAMA_POOLING_TYPE_NONE
        result = []
        n_tokens = 0
        for text in texts:
            tokens = self.tokenize(text)[: self.n_batch]
            n_tokens += len(tokens)
            self.reset(0)
            self._decode_batch([(0, tokens, True)], all_logits=True)
            if pooled:
                vec = np.ctypeslib.as_array(L.llama_get_embeddings_seq(self._ctx, 0), shape=(self.n_embd,)).copy()
            else:
                rows = np.ctypeslib.as_array(L.llama_get_embeddings(self._ctx), shape=(len(tokens), self.n_embd))
                vec = rows.mean(axis=0)
            norm = float(np.linalg.norm(vec)) or 1.0
            result.append((vec / norm).astype(float).tolist())
        self.reset(0)
        return result, n_tokens


class Sampler:
    """A llama.cpp C sampler chain: penalties, top-k, top-p, min-p, temperature, then a draw
    (or greedy at temperature 0). All of it runs in C, once per token."""

    def __init__(self, model: Model, *, temperature: float = 0.8, top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
                 repeat_penalty: float = 1.0, seed: int = -1) -> None:
        params = L.llama_sampler_chain_default_params()
        params.no_perf = True
        self._chain = L.llama_sampler_chain_init(params)
        add = lambda s: L.llama_sampler_chain_add(self._chain, s)  # noqa: E731
        if repeat_penalty != 1.0:
            add(L.llama_sampler_init_penalties(model.n_vocab, 64, repeat_penalty, 0.0, 0.0))
        # Greedy without penalties needs no chain: an argmax over the logits in numpy costs 20 us
        # where llama_sampler_sample, which first copies all n_vocab candidates, costs 300 us
        # (gemma3's 262k vocabulary; 3% of its generation speed on 2 CPU threads).
        self.greedy = temperature <= 0 and repeat_penalty == 1.0
        if temperature <= 0:
            add(L.llama_sampler_init_greedy())
            return
        if top_k > 0:
            add(L.llama_sampler_init_top_k(top_k))
        if top_p < 1.0:
            add(L.llama_sampler_init_top_p(top_p, 1))
        if min_p > 0.0:
            add(L.llama_sampler_init_min_p(min_p, 1))
        add(L.llama_sampler_init_temp(temperature))
        add(L.llama_sampler_init_dist(L.LLAMA_DEFAULT_SEED if seed < 0 else seed))

    @classmethod
    def from_settings(cls, model: Model, settings: Settings, **overrides: Any) -> "Sampler":
        values = {k: getattr(settings, k) for k in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(model, **values)

    def reset(self) -> None:
        L.llama_sampler_reset(self._chain)

    def close(self) -> None:
        if self._chain:
            L.llama_sampler_free(self._chain)
            self._chain = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


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


_QTYPES = {
    name[len("LLAMA_FTYPE_MOSTLY_"):].lower(): getattr(L, name)
    for name in dir(L) if name.startswith("LLAMA_FTYPE_MOSTLY_")
}
_QTYPES["f32"] = L.LLAMA_FTYPE_ALL_F32


def quant_types() -> list[str]:
    """Quantisation types llama.cpp's quantiser can write."""
    return sorted(_QTYPES)


def quantize(src: Path | str, dst: Path | str, qtype: str, *, threads: int = 0) -> Path:
    """Quantise ``src`` into ``dst`` with llama.cpp's quantiser (written to a temp name, then renamed)."""
    key = qtype.lower().replace("fp16", "f16")
    if key not in _QTYPES:
        raise ConfigError(f"Unknown quant type '{qtype}'.", f"Choose from: {', '.join(quant_types())}.")
    src, dst = Path(src), Path(dst)
    from .gguf_info import validate as validate_gguf

    validate_gguf(src)
    _init_backend()
    params = L.llama_model_quantize_default_params()
    params.ftype = _QTYPES[key]
    params.nthread = threads or os.cpu_count() or 1
    params.allow_requantize = True
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.incomplete")
    try:
        rc = L.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise ModelLoadError(f"llama.cpp could not quantise {src.name} to {qtype} (code {rc}).")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def gpu_info() -> dict[str, Any]:
    """Whether this llama.cpp build can offload, and its devices (empty on a CPU build)."""
    from .llama.devices import real_devices

    _init_backend()
    return {"offload": bool(L.llama_supports_gpu_offload()), "devices": [d.to_dict() for d in real_devices()]}


def system_info() -> str:
    """llama.cpp's build and CPU feature line."""
    _init_backend()
    return L.llama_print_system_info().decode("utf-8", "replace").strip()
