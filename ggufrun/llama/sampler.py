"""Sampling pieces that live in llama.cpp: a request's grammar, and its truncate-and-draw chain."""

from __future__ import annotations

import codecs
import ctypes
import re
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from ..errors import GrammarError
from ..generation import SamplingParams, SeqSampler
from ..settings import Settings
from ._lib import L, init_backend, numpy
from .grammar_filter import Candidates, VocabIndex, analyse, candidates, everything
from .utf8_guard import Utf8Guard



class Model(Protocol):
    """What these pieces need of a loaded model (model.Model is one). Declared here, not imported:
    model.py builds its samplers from this module, so this one stands below it."""

    vocab: Any  # the llama_vocab pointer
    n_vocab: int
    grammar_index: VocabIndex | None  # vocab_index builds it on first use and keeps it here

    def is_eog(self, token: int) -> bool: ...

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]: ...

    def token_bytes(self, token: int, *, special: bool = False) -> bytes: ...


_TOKEN_DATA = [("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]  # llama_token_data


class _Owned:
    """Owns one llama.cpp sampler (``_ptr``), freed by :meth:`close` or at garbage collection."""

    _ptr: Any = None

    def close(self) -> None:
        if self._ptr:
            L.llama_sampler_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class Grammar(_Owned):
    """llama.cpp's grammar sampler for one sequence, over numpy rows of logits.

    Besides the whole-vocabulary :meth:`mask` (what llama-server runs when a draw does not fit),
    it answers for a few tokens at a time (:meth:`allowed`) and names the tokens it may allow
    now (:meth:`candidates`, see grammar_filter), so that a draw can look only at those.

    With ``triggers`` it is lazy, as llama.cpp's ``llama_sampler_init_grammar_lazy_patterns``: it
    allows everything until one of the patterns matches the text generated (``^...$``: the whole
    text, else anywhere), then applies from the match (its first group, where it has one). The
    laziness is ours, not llama.cpp's: llama.cpp feeds the grammar the text from the match on
    when the token that completes it is accepted, and throws (aborting the process) when that
    text breaks the grammar (a token "<tool_call>{" for a grammar that wants "<tool_call>\\n").
    Here that text is tried on a copy first; if the grammar rejects it, the reply stays free."""

    def __init__(self, model: Model, text: str, triggers: Sequence[str] = ()) -> None:
        init_backend()
        np = numpy()
        self._ptr = L.llama_sampler_init_grammar(model.vocab, text.encode("utf-8"), b"root")
        if not self._ptr:
            first = text.strip().splitlines()[0][:80] if text.strip() else "(empty)"
            raise GrammarError(f"llama.cpp rejected the grammar (starting '{first}').",
                               "Check the GBNF syntax; it needs a 'root' rule.")
        self._model = model
        self._n_vocab = model.n_vocab
        self._one = np.zeros(1, dtype=_TOKEN_DATA)
        self._all: Any = None
        self._text = analyse(text)
        # The vocabulary index: once per model (~0.2 s), here where a request starts, not in a decode step.
        self._utf8_ok = Utf8Guard(vocab_index(model))  # (llama.cpp lets invalid UTF-8 through: see utf8_guard)
        self._triggers = [re.compile(p) for p in triggers]
        self._awaiting = bool(triggers)
        self._reply = ""  # the text generated while awaiting a trigger
        self._spans: list[tuple[int, int, int]] = []  # (token, start, end) of each of its tokens in it
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._rejected_at = -1  # a match start whose text the grammar rejected: it stays rejected
        self._cand: Candidates | None = None  # candidates() of the current state, once found
        self._allowed_cand: Any = None  # allowed_candidates() of the current state, once found
        self._redrawn = False  # candidates() was asked for since the last accept
        if not self._awaiting:
            # The first state's candidates, and where few which it allows, here where the request is
            # prepared (off the engine's step): a reply's first draw mostly misses the grammar.
            self._cand = self._candidates()
            if self._cand.count <= _PRECHECK_MAX:
                self.allowed_candidates()

    def _apply(self, data: Any, ptr: Any = None) -> None:
        """The grammar over ``data`` (llama_token_data entries); the GIL is kept for a few entries
        (see _apply_keeping_gil) and released for many."""
        arr = L.llama_token_data_array(data=data.ctypes.data_as(ctypes.POINTER(L.llama_token_data)), size=len(data),
                                       selected=-1, sorted=False)
        apply = _apply_keeping_gil() if len(data) <= _KEEP_GIL_MAX else L.llama_sampler_apply
        apply(ptr or self._ptr, ctypes.byref(arr))

    def allows(self, token: int) -> bool:
        if self._awaiting:
            return True
        one = self._one
        one["id"], one["logit"], one["p"] = token, 0.0, 0.0
        self._apply(one)
        return bool(numpy().isfinite(one["logit"][0])) and self._utf8_ok.ok_one(token)

    def allowed(self, ids: Any) -> Any:
        """For each token of ``ids``, whether the grammar allows it now (a bool array)."""
        if self._awaiting:
            return numpy().ones(len(ids), dtype=bool)
        ok = self._verdict(ids, self._ptr)
        ok[ok] = self._utf8_ok.ok(numpy().asarray(ids)[ok])  # (only where the grammar allows: few decoded)
        return ok

    def _verdict(self, ids: Any, ptr: Any) -> Any:
        """For each token of ``ids``, whether the grammar sampler ``ptr`` (this one or a copy) allows it."""
        n = len(ids)
        if not n:
            return numpy().zeros(0, dtype=bool)
        data = _subset_buffer(n)
        data["id"] = ids
        data["logit"] = 0.0
        self._apply(data, ptr)
        return numpy().isfinite(data["logit"])

    @contextmanager
    def _advanced(self, token: int) -> Iterator[Callable[[Any], Any]]:
        """The verdict function of a copy of this grammar that accepted ``token`` (which it allows)."""
        clone = _keeping_gil("llama_sampler_clone", [ctypes.c_void_p], ctypes.c_void_p)(self._ptr)
        try:
            _accept_keeping_gil()(clone, token)
            yield lambda ids: self._verdict(ids, clone)
        finally:
            _keeping_gil("llama_sampler_free", [ctypes.c_void_p])(clone)

    def candidates(self) -> Candidates:
        """The tokens this grammar may allow now (every token where the prefilter cannot be used)."""
        self._redrawn = True
        if self._cand is None:
            self._cand = self._candidates()
        return self._cand

    def allowed_candidates(self) -> Any:
        """Every candidate the grammar allows now, ascending ids (checked once per state)."""
        if self._allowed_cand is None:
            ids = self.candidates().ids()
            self._allowed_cand = ids[self.allowed(ids)]
        return self._allowed_cand

    def _candidates(self) -> Candidates:
        index = vocab_index(self._model)
        if self._text.token_refs:
            return everything(index)
        return candidates(index, self._text, self.allowed, self._advanced)

    def mask(self, row: Any) -> None:
        """Set the logits of every token the grammar forbids now to -inf (in place)."""
        np = numpy()
        if self._awaiting:
            return
        if self._all is None:
            self._all = np.zeros(self._n_vocab, dtype=_TOKEN_DATA)
            self._all["id"] = np.arange(self._n_vocab)
        self._all["logit"] = row
        self._apply(self._all)
        row[:] = self._all["logit"]
        ids = np.flatnonzero(np.isfinite(row))
        row[ids[~self._utf8_ok.ok(ids)]] = -np.inf

    def accept(self, token: int) -> None:
        if self._awaiting:
            self._await(token)
        else:
            _accept_keeping_gil()(self._ptr, token)
            self._utf8_ok.accept(token)
        self._cand = self._allowed_cand = None
        if self._redrawn and not self._awaiting:
            # This step's draw missed, so the next one likely will too: find the next state's
            # candidates now, and where they are few enough to check them all (generation's
            # _CHECK_ALL), which of them it allows. Neither depends on the logits, and the engine
            # accepts tokens while the device computes the next step, so this part of a miss's work
            # is off the step's critical path (H100, 16 rows half constrained: ~0.2 ms a row was on it).
            self._cand = self._candidates()
            if self._cand.count <= _PRECHECK_MAX:
                self.allowed_candidates()
        self._redrawn = False

    def _await(self, token: int) -> None:
        """Add ``token`` to the text that may trigger the grammar; start it where a trigger matches."""
        if self._model.is_eog(token):
            return
        at = len(self._reply)
        self._reply += self._utf8.decode(self._model.token_bytes(token, special=True))  # (cached: no GIL hand-off)
        self._spans.append((token, at, len(self._reply)))
        start = self._trigger_start()
        if start < 0 or start == self._rejected_at:
            return
        clone = L.llama_sampler_clone(self._ptr)
        ok = True
        for t in self._replay(start):
            if not self._verdict([t], clone)[0]:
                ok = False
                break
            L.llama_sampler_accept(clone, t)
            self._utf8_ok.accept(t)
        if ok:
            L.llama_sampler_free(self._ptr)
            self._ptr, self._awaiting, self._reply, self._spans = clone, False, "", []
        else:
            L.llama_sampler_free(clone)
            self._rejected_at = start
            self._utf8_ok.pending = b""

    def _replay(self, start: int) -> list[int]:
        """Tokens that spell the reply from ``start`` on: its own tokens, and for the part of one
        that the start cuts, a token per character (the model's tokenizer could add a leading space)."""
        probe = vocab_index(self._model).probe
        out: list[int] = []
        for token, a, b in self._spans:
            if a >= start:
                out.append(token)
            elif b > start:
                for ch in self._reply[start:b]:
                    c = ord(ch)
                    t = int(probe[c]) if c < len(probe) - 1 else -1  # the last probe is the high code points'
                    out += [t] if t >= 0 else self._model.tokenize(ch, add_special=False, parse_special=False)
        return out

    def _trigger_start(self) -> int:
        """Where the grammar starts in the reply, as llama.cpp's trigger patterns say; -1: not yet."""
        for pattern in self._triggers:
            whole = pattern.pattern.startswith("^") and pattern.pattern.endswith("$")
            m = pattern.fullmatch(self._reply) if whole else pattern.search(self._reply)
            if m is not None:
                groups = [m.start(g) for g in range(1, (m.re.groups or 0) + 1) if m.start(g) >= 0 and m.end(g) > m.start(g)]
                return groups[0] if groups else m.start()
        return -1



_PRECHECK_MAX = 4096  # candidates checked at accept (as generation._CHECK_ALL at a redraw)
_KEEP_GIL_MAX = 4096  # ~0.25 ms of grammar: below it, giving the GIL away costs more than it frees
_subset_buffers = threading.local()


def _subset_buffer(size: int) -> Any:
    """This thread's llama_token_data buffer of ``size`` entries (a view of one that only grows)."""
    buf = getattr(_subset_buffers, "buf", None)
    if buf is None or len(buf) < size:
        buf = _subset_buffers.buf = numpy().zeros(max(size, 1024), dtype=_TOKEN_DATA)
    return buf[:size]


def _piece(model: Model, token: int, buf: Any = None) -> bytes:
    """The token's text as llama.cpp's grammar reads it (its piece cache renders special tokens)."""
    buf = buf or ctypes.create_string_buffer(64)
    to_piece = _to_piece_keeping_gil()
    n = to_piece(model.vocab, token, buf, len(buf), 0, True)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = to_piece(model.vocab, token, buf, -n, 0, True)
    return buf.raw[:n]


def _to_piece_keeping_gil() -> Any:
    """llama_token_to_piece keeping the GIL: it runs once per token of the vocabulary (see vocab_index)."""
    return _keeping_gil("llama_token_to_piece", [ctypes.c_void_p, ctypes.c_int32, ctypes.c_char_p, ctypes.c_int32,
                                                 ctypes.c_int32, ctypes.c_bool], ctypes.c_int32)


_index_lock = threading.Lock()


def vocab_index(model: Model) -> VocabIndex:
    """The model's VocabIndex, built on first use (~0.2 s for 152k tokens) and kept with it.

    Built once: the first grammar requests of a burst used to build it each (16 at once on
    gemma's 262k vocabulary: 14 s, the engine thread starved of the GIL for 13 of them; the
    H100's "first use of a schema" in issue 22). The others wait on the lock, GIL released. Its
    llama.cpp calls keep the GIL (a hand-off a token, 2 x 262k of them, each waiting for the
    engine thread's slice, was most of the time)."""
    index = model.grammar_index
    if index is None:
        with _index_lock:
            index = model.grammar_index
            if index is None:
                buf = ctypes.create_string_buffer(256)
                is_eog = _keeping_gil("llama_vocab_is_eog", [ctypes.c_void_p, ctypes.c_int32], ctypes.c_bool)
                vocab = model.vocab
                index = VocabIndex([_piece(model, t, buf) for t in range(model.n_vocab)], lambda t: bool(is_eog(vocab, t)))
                model.grammar_index = index
    return index


_draw_buffers = threading.local()
_kept: dict[str, Any] = {}


def _keeping_gil(name: str, argtypes: list[Any], restype: Any = None) -> Any:
    """llama.cpp's function ``name`` called without releasing the GIL (a PyDLL handle on the same
    library), for calls of a few microseconds on a decode step's path.

    Releasing the GIL around them costs more than they take: taking it back waits for any thread
    running Python, up to the switch interval (measured: 8-row tasks beside a busy Python thread,
    as the server's HTTP thread is, went from 0.2 ms to ~90 ms). Falls back to the ordinary
    binding when the library's path is not known."""
    fn = _kept.get(name)
    if fn is None:
        path = getattr(getattr(getattr(L, "llama_cpp", None), "_lib", None), "_name", None)
        if path:
            fn = getattr(ctypes.PyDLL(path), name)
            fn.argtypes, fn.restype = argtypes, restype
        else:
            fn = getattr(L, name)
        _kept[name] = fn
    return fn


_apply_addr: list[int | None] = []


def _apply_address() -> int | None:
    """llama_sampler_apply's address for the compiled helper, once its layout of llama.cpp's
    candidate structs is seen to match llama-cpp-python's ctypes definitions (else None)."""
    if not _apply_addr:
        from .. import native

        addr = None
        lib = getattr(getattr(L, "llama_cpp", None), "_lib", None)
        arr: Any = L.llama_token_data_array  # (the fields' offsets are class attributes)
        ours = (ctypes.sizeof(L.llama_token_data), ctypes.sizeof(arr), arr.size.offset, arr.selected.offset, arr.sorted.offset)
        if lib is not None and native.available() and native.token_data_layout() == ours:
            addr = ctypes.cast(lib.llama_sampler_apply, ctypes.c_void_p).value
        _apply_addr.append(addr)
    return _apply_addr[0]


def _apply_keeping_gil() -> Any:
    """llama_sampler_apply, the GIL kept (see _keeping_gil): for a few hundred candidates ~3 us."""
    return _keeping_gil("llama_sampler_apply", [ctypes.c_void_p, ctypes.POINTER(L.llama_token_data_array)])


def _accept_keeping_gil() -> Any:
    """llama_sampler_accept, the GIL kept (see _keeping_gil): a grammar's accept, once a token."""
    return _keeping_gil("llama_sampler_accept", [ctypes.c_void_p, ctypes.c_int32])


def _draw_parts(params: SamplingParams, n_vocab: int, vocab: Any = None) -> list[Any]:
    """llama.cpp's top-k, top-p, min-p, temperature and seeded draw for ``params``, as samplers,
    with its infill sampler at ``params.infill`` among them where asked (``vocab`` given)."""
    steps: list[Callable[[], Any] | None] = [
        (lambda: L.llama_sampler_init_top_k(params.top_k)) if 0 < params.top_k < n_vocab else None,
        (lambda: L.llama_sampler_init_top_p(params.top_p, 1)) if params.top_p < 1.0 else None,
        (lambda: L.llama_sampler_init_min_p(params.min_p, 1)) if params.min_p > 0.0 else None,
        lambda: L.llama_sampler_init_temp(params.temperature),
    ]
    if params.infill >= 0:
        if vocab is None:
            raise ValueError("the infill sampler needs the model's vocabulary")
        steps.insert(min(params.infill, len(steps)), lambda: L.llama_sampler_init_infill(vocab))
    parts = [make() for make in steps if make is not None]
    parts.append(L.llama_sampler_init_dist(L.LLAMA_DEFAULT_SEED if params.seed < 0 else params.seed))
    return parts


# llama.cpp's infill sampler renders candidates into 512-byte buffers and, for a longer piece,
# resizes them to the negative length it got back (an abort).
INFILL_PIECE_MAX = 512
_infill_checked: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


def infill_refusal(model: Any) -> str:
    """Why llama.cpp's infill sampler cannot run on this model's vocabulary ("" when it can): a
    token piece over 512 bytes, or no end-of-text/end-of-sequence token to end on. Checked once a model."""
    known = _infill_checked.get(model)
    if known is not None:
        return known
    why = ""
    if model.eot_id < 0 and model.eos_id < 0:
        why = "the model has no end-of-text or end-of-sequence token."
    else:
        with model.borrowed():
            buf = ctypes.create_string_buffer(INFILL_PIECE_MAX)
            to_piece = _to_piece_keeping_gil()  # (a GIL hand-off per token beside a busy engine: seconds, see vocab_index)
            for t in range(model.n_vocab):
                if to_piece(model.vocab, t, buf, INFILL_PIECE_MAX, 0, False) < 0:
                    why = f"token {t}'s text is longer than {INFILL_PIECE_MAX} bytes, which llama.cpp's infill sampler cannot take."
                    break
    _infill_checked[model] = why
    return why


def _chain(parts: list[Any]) -> Any:
    """A sampler chain that owns ``parts`` (freed with it)."""
    cp = L.llama_sampler_chain_default_params()
    cp.no_perf = True
    chain = L.llama_sampler_chain_init(cp)
    for s in parts:
        L.llama_sampler_chain_add(chain, s)
    return chain


class DrawChain(_Owned):
    """llama.cpp's top-k, top-p, min-p, temperature and seeded draw for one request, applied to a
    row of logits that generation.py has already penalised and biased."""

    def __init__(self, params: SamplingParams, n_vocab: int, model: Any = None) -> None:
        """``model`` (its vocabulary, end tokens) only for a chain with the infill sampler."""
        self._ptr = _chain(_draw_parts(params, n_vocab, model.vocab if model is not None else None))
        self._n_vocab = n_vocab
        # The chain's k (0: no top-k): with it, generation.py hands draw_among a row's top candidates
        # (not where the infill sampler runs before top-k: it reads every candidate).
        self.top_k = params.top_k if 0 < params.top_k < n_vocab and params.infill != 0 else 0
        # The infill sampler ends on the vocabulary's EOT token, which may be none (-1): then EOS.
        self._end = -1 if model is None else model.eot_id if model.eot_id >= 0 else model.eos_id

    def _buffer(self, size: int) -> tuple[Any, Any, Any]:
        """This thread's candidate buffer, at least ``size`` long, its llama_token_data_array and
        the token ids 0..len-1 (to refill a whole row).

        One per thread, shared by every request: 64 private 1.8 MB buffers (152k vocabulary)
        cost more in cache misses than the draw itself."""
        buf = getattr(_draw_buffers, "buf", None)
        if buf is None or len(buf[0]) < size:
            np = numpy()
            data = np.zeros(max(size, self._n_vocab), dtype=_TOKEN_DATA)
            arr = L.llama_token_data_array(data=data.ctypes.data_as(ctypes.POINTER(L.llama_token_data)),
                                           size=len(data), selected=-1, sorted=False)
            buf = _draw_buffers.buf = (data, arr, np.arange(len(data), dtype=np.int32))
        return buf

    def _apply(self, data: Any, arr: Any, n: int, apply: Any = None) -> int:
        arr.size, arr.selected, arr.sorted = n, -1, False
        (apply or L.llama_sampler_apply)(self._ptr, ctypes.byref(arr))  # the ordinary binding releases the GIL
        token = int(data["id"][arr.selected])
        return token if token >= 0 else self._end

    @staticmethod
    def draw_rows(chains: list["DrawChain"], ids: Any, vals: Any, counts: Any) -> Any:
        """Each chain's token from its row's candidates (native.topk_arrays), in one C call that
        runs llama_sampler_apply per row; -1 where a row has no candidates. None where the helper's
        idea of llama.cpp's candidate structs does not match this llama-cpp-python's."""
        from .. import native

        apply = _apply_address()
        if apply is None:
            return None
        return native.draw_rows(apply, [ctypes.cast(c._ptr, ctypes.c_void_p).value or 0 if c._ptr else 0 for c in chains],
                                ids, vals, counts)

    def draw(self, row: Any) -> int:
        """Draw from a whole row of logits (every token a candidate)."""
        n = self._n_vocab
        data, arr, all_ids = self._buffer(n)
        data["id"][:n] = all_ids[:n]  # the chain sorts the array in place: refill every draw
        data["logit"][:n] = row
        return self._apply(data, arr, n)

    def draw_among(self, ids: Any, logits: Any) -> int:
        """Draw from candidates ``ids`` (with their ``logits``) that hold the row's top k
        (generation._top_k_candidates): the same token as :meth:`draw` over the whole row, since
        the chain starts with top-k, but a few hundred entries to fill and sort, not 152k."""
        n = len(ids)
        data, arr, _ = self._buffer(n)
        data["id"][:n] = ids
        data["logit"][:n] = logits
        return self._apply(data, arr, n, _apply_keeping_gil())



class Sampler:
    """A request's sampling settings (see generation.SamplingParams); kept for callers of
    :meth:`Model.generate`. The sampling itself is generation.sample_rows."""

    def __init__(self, model: Model | None = None, **values: Any) -> None:
        self.params = SamplingParams.from_dict(values)
        self._n_vocab = model.n_vocab if model is not None else 0
        self._state: SeqSampler | None = None

    def state(self) -> SeqSampler:
        """The running state for :meth:`Model.sample` (one sequence's penalties and draws)."""
        if self._state is None:
            chain = DrawChain(self.params, self._n_vocab) if self._n_vocab and not self.params.greedy else None
            self._state = SeqSampler(self.params, draw=chain)
        return self._state

    @property
    def greedy(self) -> bool:
        return self.params.greedy

    @classmethod
    def from_settings(cls, model: Model, settings: Settings, **overrides: Any) -> "Sampler":
        values = {k: getattr(settings, k) for k in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed")}
        for k in ("presence_penalty", "frequency_penalty", "repeat_last_n"):
            if hasattr(settings, k):
                values[k] = getattr(settings, k)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(model, **values)

    def reset(self) -> None:
        self._state = None

    def close(self) -> None:
        self._state = None
