"""A vision projector (mmproj GGUF) over a loaded text model, through llama.cpp's libmtmd.

libmtmd's own ``mtmd_helper_eval_chunks`` decodes images on the text context itself and is not
thread-safe; here libmtmd only tokenizes (text + image markers -> chunks) and encodes (image ->
embeddings), each encode on a context no other thread is using, and the embeddings go to
:meth:`ggufrun.llama.model.Model.decode` like text: the engine decodes them in its own batches.

An image's positions in a token list are *image tokens*, negative ints that name the image (a
hash of its pixels) and the row (ggufrun.images.image_tokens): equal images give equal tokens, so
prefix reuse in the KV cache works for images as it does for text.

On an M-RoPE model (Qwen2.5-VL, Qwen3-VL) an image's rows take 2-D positions and fewer of them than rows:
each embedding carries its rows' positions relative to where it starts, and the model's
mrope.Positions maps indices to positions for every decode, cut and copy (llama/mrope.py).
"""

from __future__ import annotations

import ctypes
import queue
import threading
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from ..errors import ConfigError, ModelLoadError
from ..images import Picture, image_tokens
from ._lib import L, llama_reason, numpy


T = TypeVar("T")

_quiet = False


def _mtmd() -> Any:
    global _quiet
    import llama_cpp.mtmd_cpp as M

    if not _quiet:  # libmtmd logs every image it sees to stderr: errors only, as llama.cpp's (_lib.py)
        from .. import paths
        from ._lib import quiet_log

        if not paths.debug():
            M.mtmd_log_set(quiet_log, ctypes.c_void_p(0))
            M.mtmd_helper_log_set(quiet_log, ctypes.c_void_p(0))
        _quiet = True
    return M


RECENT_IMAGES = 16  # encoded pictures kept for reuse (a 1,088-token SmolVLM picture is ~2.5 MB of rows)


class ImageEmbedding:
    """One image's rows for the text model: float32 [n_tokens, n_embd], named by ``key``."""

    __slots__ = ("key", "rows", "pos", "shift", "n_pos", "__weakref__")

    def __init__(self, key: int, rows: Any, pos: Any = None, shift: Any = None, n_pos: int = 0) -> None:
        self.key = key
        self.rows = rows
        # M-RoPE only: int32 [4, n_tokens] positions (time, height, width, unused) of an image starting
        # at position 0, ``shift`` [4] which of them move with the start, and the positions it takes
        self.pos, self.shift = pos, shift
        self.n_pos = n_pos or int(rows.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.rows.shape[0])


class Projector:
    """The mtmd contexts (one per picture encoded at once) for one Model; thread-safe."""

    def __init__(self, model: Any, path: Path, *, n_threads: int, use_gpu: bool, encoders: int = 1,
                 best_effort: bool = False) -> None:
        from ..projector_info import validate_projector

        info = validate_projector(path, model.n_embd)  # llama.cpp asserts (aborts) on some malformed projectors
        M = _mtmd()
        params = M.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads
        params.print_timings = False
        params.warmup = False
        self.path = path
        self.model = model
        self._lock = threading.Lock()  # guards _recent, _pending, encoded, _users, _closing and freeing
        self._extra: list[Any] = []
        self._users = 0  # threads in block(): close() leaves the contexts to the last of them
        self._closing = False
        llama_reason()
        self._ctx = M.mtmd_init_from_file(str(path).encode(), model._model, params)
        if not self._ctx:
            raise ModelLoadError(f"llama.cpp could not load the projector {path}{llama_reason()}.",
                                 "Check that it belongs to this model (--mmproj).")
        if not M.mtmd_support_vision(self._ctx):
            self.close()
            raise ConfigError(f"{path.name} is not a vision projector (it has no image encoder).")
        # M-RoPE models (Qwen2.5-VL, Qwen3-VL) give an image 2-D positions, fewer than its rows: the
        # model maps indices to positions from then on (llama/mrope.py). libmtmd decides this from the
        # text model's rope type, so a projector of another family on such a model gets them too.
        self.mrope = bool(M.mtmd_decode_use_mrope(self._ctx))
        if self.mrope and model.mrope is None:
            from .mrope import Positions

            model.mrope = Positions()
        self.marker = (M.mtmd_default_marker() or b"<__media__>").decode()
        self.info = info
        # gemma-3's images attend both ways (mtmd_decode_use_non_causal): each is decoded whole, in one batch
        self.non_causal: bool | None = info.projector_type == "gemma3"
        model.whole_images = self.non_causal
        # a prompt's text and images in one decode, not one each, where text rows are exactly token ids'
        # (M-RoPE models too: their text takes the positions the token path gives it)
        model.mixed_runs = not self.non_causal and _mixable(model)
        # recent pictures' blocks by content: a repeated image is neither preprocessed nor encoded again
        self._recent: OrderedDict[tuple[bytes, int, int], tuple[list[int], list[ImageEmbedding]]] = OrderedDict()
        self._pending: dict[tuple[bytes, int, int], threading.Event] = {}  # pictures being encoded now
        self.encoded = 0  # pictures encoded (the rest came from _recent)
        # An encode holds its context (the output buffer is the context's), so pictures are encoded at
        # once only by copies of it. On a GPU one encode is mostly kernel launches and graph building
        # that leave the device idle, so copies there multiply picture throughput.
        for _ in range(encoders - 1):
            ctx = M.mtmd_init_from_file(str(path).encode(), model._model, params)
            if not ctx:
                if best_effort:
                    llama_reason()  # the copies that fit serve (auto): the failure is not this load's
                    break
                self.close()
                raise ModelLoadError(f"llama.cpp could not load a copy of the projector {path}{llama_reason()}.",
                                     "Use fewer --image-encoders.")
            self._extra.append(ctx)
        if not use_gpu and model.serial_compute is None:  # on the CPU an encode waits for the decode in progress
            model.serial_compute = threading.Lock()
        self._serial = model.serial_compute if not use_gpu else None
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()  # contexts no thread is encoding with
        for ctx in [self._ctx, *self._extra]:
            self._idle.put(ctx)

    @property
    def encoders(self) -> int:
        """Pictures this projector encodes at once (its contexts)."""
        return 1 + len(self._extra)

    def close(self) -> None:
        """Free the contexts now, or when the last picture being cut or encoded is done."""
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            self._closing = True
            last = not self._users
        if last:
            self._free()

    def _free(self) -> None:
        # taken under the lock: two close() calls (or close() and the last user) must not free a context twice
        with self._lock:
            contexts = [c for c in (self._ctx, *self._extra) if c]
            self._ctx, self._extra = None, []
        for ctx in contexts:
            _mtmd().mtmd_free(ctx)

    @contextmanager
    def _in_use(self) -> Iterator[None]:
        with self._lock:
            if self._closing:
                raise ModelLoadError("The projector has been unloaded.", "Retry the request.")
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                last = self._closing and not self._users
            if last:
                self._free()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def block(self, pic: Picture) -> tuple[list[int], list[ImageEmbedding]]:
        """One picture as the text model reads it: the projector's framing text tokens with the
        picture's image tokens between them, and the embeddings those name. Runs libmtmd's
        preprocessing and the vision encoder: call it off the event loop and the engine thread.
        Raises ConfigError (an image libmtmd refuses), ModelLoadError (encoding failed)."""
        name = (pic.digest, pic.width, pic.height)
        with self._lock:
            hit = self._recent_hit(name)  # a repeated picture is not preprocessed again
        return hit if hit is not None else self._block(pic, name)

    def _recent_hit(self, name: tuple[bytes, int, int]) -> tuple[list[int], list[ImageEmbedding]] | None:
        """A copy of a recent picture's block (the caller holds :attr:`_lock`)."""
        hit = self._recent.get(name)
        if hit is None:
            return None
        self._recent.move_to_end(name)
        return list(hit[0]), list(hit[1])

    def _block(self, pic: Picture, name: tuple[bytes, int, int]) -> tuple[list[int], list[ImageEmbedding]]:
        """The picture's block, encoded here or by another thread meanwhile. libmtmd's preprocessing
        (resize and tiles: a quarter of a second for a SmolVLM picture on a CPU) needs no context of
        its own, as llama-server runs it in its HTTP threads; the encoder, whose output buffer the
        context holds, takes a context to itself."""
        M = _mtmd()
        with self.model.borrowed(), self._in_use():
            chunks = M.mtmd_input_chunks_init()
            buf = (ctypes.c_uint8 * len(pic.rgb)).from_buffer_copy(pic.rgb)
            bmp = M.mtmd_bitmap_init(pic.width, pic.height, buf)
            try:
                if not bmp:
                    raise ConfigError(f"libmtmd refused a {pic.width}x{pic.height} image.")
                data = self.marker.encode()
                inp = M.mtmd_input_text(data, len(data), False, True)
                arr = (M.mtmd_bitmap_p_ctypes * 1)(bmp)
                rc = M.mtmd_tokenize(self._ctx, chunks, ctypes.byref(inp), arr, 1)
                if rc != 0:
                    raise ConfigError(f"libmtmd could not tokenize a {pic.width}x{pic.height} image (code {rc}).")
                return self._encode_once(chunks, pic.digest, name)
            finally:
                M.mtmd_input_chunks_free(chunks)
                if bmp:
                    M.mtmd_bitmap_free(bmp)

    def _encode_once(self, chunks: Any, digest: bytes, name: tuple[bytes, int, int]) -> tuple[list[int], list[ImageEmbedding]]:
        """Encode on an idle context, unless another thread encoded (or is encoding) the same picture."""
        while True:
            with self._lock:
                hit = self._recent_hit(name)
                if hit is not None:
                    return hit
                busy = self._pending.get(name)
                if busy is None:
                    done = self._pending[name] = threading.Event()
                    break
            busy.wait()  # then it is in _recent, or that encode failed and this thread tries its own
        try:
            ctx = self._idle.get()
            try:
                with self._serial or nullcontext():
                    block = _in_own_thread(self._encode, ctx, chunks, digest)
            finally:
                self._idle.put(ctx)
            with self._lock:
                self.encoded += 1
                self._recent[name] = block
                while len(self._recent) > RECENT_IMAGES:
                    self._recent.popitem(last=False)
            return list(block[0]), list(block[1])
        finally:
            with self._lock:
                del self._pending[name]
            done.set()

    def _encode(self, ctx: Any, chunks: Any, digest: bytes) -> tuple[list[int], list[ImageEmbedding]]:
        M = _mtmd()
        np = numpy()
        tokens: list[int] = []
        embeds: list[ImageEmbedding] = []
        n_embd = _embd_width(self.model)
        for i in range(M.mtmd_input_chunks_size(chunks)):
            chunk = M.mtmd_input_chunks_get(chunks, i)
            kind = M.mtmd_input_chunk_get_type(chunk)
            if kind == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = M.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                tokens.extend(ptr[: n.value])
                continue
            if kind != M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                raise ConfigError("libmtmd returned a non-image media chunk.")
            n_tok = M.mtmd_input_chunk_get_n_tokens(chunk)
            n_pos = M.mtmd_input_chunk_get_n_pos(chunk)
            if not self.mrope and n_pos != n_tok:
                raise ConfigError("This projector gives an image fewer positions than tokens, which ggufrun "
                                  "does not decode yet.")
            pos = shift = None
            if self.mrope:
                pos, shift = _mrope_layout(M, chunk, n_tok)
            if bool(M.mtmd_decode_use_non_causal(ctx, chunk)) != self.non_causal:
                raise ConfigError("This projector's attention over images is not the one ggufrun expected.")
            if self.non_causal and n_tok > max(self.model.n_batch, 1):
                raise ConfigError(f"An image of {n_tok} tokens does not fit one batch of {self.model.n_batch}; "
                                  "this projector needs it whole.", f"Serve with --batch-size {n_tok} or more.")
            if M.mtmd_encode_chunk(ctx, chunk) != 0:
                raise ModelLoadError(f"libmtmd could not encode an image{llama_reason()}.")
            out = M.mtmd_get_output_embd(ctx)
            rows = np.ctypeslib.as_array(out, shape=(n_tok * n_embd,)).reshape(n_tok, n_embd).copy()
            # idefics3 cuts a picture into tiles and an overview, one chunk each: each gets its own key
            key, toks = image_tokens(digest + len(embeds).to_bytes(4, "little"), n_tok)
            embeds.append(ImageEmbedding(key, rows, pos, shift, n_pos))
            tokens.extend(toks)
        return tokens, embeds


def _in_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a thread made for it, which ends with it. ggml's CPU backend computes in
    OpenMP teams, and libgomp keeps a team for every thread that ran one, its workers spinning
    while they wait: a long-lived pool thread that encoded a picture once kept a core busy from
    then on, and the model's decodes on the engine thread took twice as long on a 2-core CPU
    (SmolLM2-135M: 16 ms a token before a picture, 33 after). A thread that ends takes its team
    along; on a GPU it costs ~0.1 ms an encode, and a model split with the CPU gains the same."""
    out: list[T] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            err.append(exc)

    worker = threading.Thread(target=run, name="ggufrun-encode", daemon=True)
    worker.start()
    worker.join()
    if err:
        raise err[0]
    return out[0]


def _mrope_layout(M: Any, chunk: Any, n_tok: int) -> tuple[Any, Any]:
    """An image chunk's rows' M-RoPE positions from libmtmd (mtmd_image_tokens_get_decoder_pos),
    in the order llama.cpp reads an embedding batch's sections (time, height, width, unused;
    mtmd-helper's set_position_mrope_2d): [4, n_tok] for a start at 0, and which move with the start."""
    np = numpy()
    image = M.mtmd_input_chunk_get_tokens_image(chunk)
    if not image:
        raise ConfigError("libmtmd returned an image chunk without its image tokens.")
    pos = np.empty((4, n_tok), dtype=np.int32)
    for i in range(n_tok):
        d = M.mtmd_image_tokens_get_decoder_pos(image, 0, i)
        pos[:, i] = (d.t, d.y, d.x, d.z)
    a, b = M.mtmd_image_tokens_get_decoder_pos(image, 0, 0), M.mtmd_image_tokens_get_decoder_pos(image, 1, 0)
    shift = np.array([b.t - a.t, b.y - a.y, b.x - a.x, b.z - a.z], dtype=np.int32)
    return pos, shift


def _embd_width(model: Any) -> int:
    """An image row's width: the text model's input width (Qwen3-VL's deepstack rows are wider than n_embd)."""
    return int(L.llama_model_n_embd_inp(model._model))


def _mrope_pos(model: Any) -> Any:
    """A buffer of 4 positions per row of the embedding batch (llama.cpp reads n_tokens x 4 for M-RoPE)."""
    buf = getattr(model, "_mrope_pos_buf", None)
    if buf is None:
        buf = model._mrope_pos_buf = (ctypes.c_int32 * (4 * max(model.n_batch, 1)))()
    return buf


def _embd_batch(model: Any) -> Any:
    """The model's embedding batch (n_batch rows of n_embd floats), made on first use and freed
    with the model object."""
    batch = getattr(model, "_embd_batch", None)
    if batch is None:
        import weakref

        size = max(model.n_batch, 1)
        batch = L.llama_batch_init(size, _embd_width(model), max(model.n_seq_max, 1))
        for i in range(size):
            batch.n_seq_id[i] = 1
        model._embd_batch = batch
        weakref.finalize(model, L.llama_batch_free, batch)
    return batch


def _decode_embeddings(model: Any, items: list[tuple[int, list[int]]], text: Any = None,
                       wants: list[bool] | None = None) -> list[int]:
    """One llama_decode of image tokens (their embedding rows) for one or more sequences; with
    ``text`` (llama/text_rows.py), text tokens too, as their rows. ``wants``: per item, its last
    row's logits, whose batch index is returned (else -1)."""
    from ..errors import ContextOverflowError
    from ..images import image_row

    np = numpy()
    batch = _embd_batch(model)
    size, n_embd = max(model.n_batch, 1), _embd_width(model)
    embd = np.ctypeslib.as_array(batch.embd, shape=(size, n_embd))
    pos = np.ctypeslib.as_array(batch.pos, shape=(size,))
    logits = np.ctypeslib.as_array(ctypes.cast(batch.logits, ctypes.POINTER(ctypes.c_int8)), shape=(size,))
    mrope = model.mrope
    sections: list[Any] = []  # M-RoPE: each run's [4, k] positions
    try:
        n = 0
        out: list[int] = []
        for index, (seq_id, tokens) in enumerate(items):
            start = len(model._seq.setdefault(seq_id, []))
            i = 0
            while i < len(tokens):  # one slice copy per run of consecutive rows of one image
                if tokens[i] >= 0:  # text (only with ``text``: the caller checked its model takes rows as tokens)
                    k = 1
                    while i + k < len(tokens) and tokens[i + k] >= 0:
                        k += 1
                    embd[n : n + k, : text.n_embd] = text.rows(tokens[i : i + k])
                    if text.n_embd < n_embd:  # deepstack's wider input: the token path pads text rows with zeros
                        embd[n : n + k, text.n_embd :] = 0
                    if mrope is None:
                        pos[n : n + k] = range(start + i, start + i + k)
                    else:  # the token path's M-RoPE text positions: p in the first three sections, 0 in the fourth
                        p = mrope.at(seq_id, start + i) + np.arange(k, dtype=np.int32)
                        sections.append(np.stack([p, p, p, np.zeros_like(p)]))
                    logits[n : n + k] = 0
                    for j in range(n, n + k):
                        batch.seq_id[j][0] = seq_id
                    n += k
                    i += k
                    continue
                key, row = image_row(tokens[i])
                image = model.images.get(key)
                k = 1
                while i + k < len(tokens) and tokens[i + k] == tokens[i] - k:
                    k += 1
                if image is None or row + k > image.n_tokens:
                    raise ModelLoadError("An image's embeddings are no longer held (its request ended).", "Retry the request.")
                embd[n : n + k] = image.rows[row : row + k]
                if mrope is None:
                    pos[n : n + k] = range(start + i, start + i + k)
                else:
                    if image.pos is None:
                        raise ModelLoadError("An image without M-RoPE positions reached an M-RoPE model.")
                    p0 = mrope.at(seq_id, start + i)  # row 0: where the image starts; a later row: its image's start
                    if row == 0:
                        mrope.add_image(seq_id, start + i, image.n_tokens, image.n_pos)
                    sections.append(image.pos[:, row : row + k] + p0 * image.shift[:, None])
                logits[n : n + k] = 0
                for j in range(n, n + k):
                    batch.seq_id[j][0] = seq_id
                n += k
                i += k
            if wants and wants[index] and tokens:
                logits[n - 1] = 1
                out.append(n - 1)
            else:
                out.append(-1)
        batch.n_tokens = n
        # the batch's own array, by address: a pointer read from the struct is a view of the field itself
        own_pos = ctypes.cast(batch.pos, ctypes.c_void_p).value or 0
        pos_type = type(batch.pos)
        if mrope is not None:  # section-major: n times, n heights, n widths, n unused (llama-batch.cpp)
            buf = _mrope_pos(model)
            np.ctypeslib.as_array(buf)[: 4 * n] = np.concatenate(sections, axis=1).ravel()
            batch.pos = ctypes.cast(buf, pos_type)
        # gemma-3 attends both ways within an image (mtmd_decode_use_non_causal): the whole image is in this batch
        whole = model.whole_images
        if whole:
            L.llama_set_causal_attn(model._ctx, False)
        try:
            rc = model.llama_decode(batch)
        finally:
            if mrope is not None:
                batch.pos = ctypes.cast(own_pos, pos_type)  # llama_batch_free frees the batch's own array
            if whole:
                L.llama_set_causal_attn(model._ctx, True)
        if rc != 0:
            raise ContextOverflowError(f"llama_decode failed (code {rc}): the KV cache is full.") if rc == 1 else \
                ModelLoadError(f"llama_decode of image embeddings failed (code {rc}).")
    except BaseException:
        # the images this call began are not in the cache: a span left for one would give the text
        # decoded there next its rows' position (and cuts a boundary inside it)
        if mrope is not None:
            for seq_id, _ in items:
                mrope.cut(seq_id, len(model._seq.get(seq_id, ())))
        raise
    for seq_id, tokens in items:
        model._seq[seq_id].extend(tokens)
    return out


def _runs(tokens: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for t in tokens:
        if out and (out[-1][0] < 0) == (t < 0):
            out[-1].append(t)
        else:
            out.append([t])
    return out


def _mixable(model: Any) -> bool:
    """Whether the model's text tokens have exact embedding rows (text_rows.py); where the input is wider
    (Qwen3-VL's deepstack rows), the token path pads them with zeros, as _decode_embeddings does."""
    from .text_rows import text_rows

    rows = text_rows(model)
    return rows is not None and rows.n_embd <= _embd_width(model)


def _rows_for(model: Any, items: list[tuple[int, list[int], Any]], all_logits: bool) -> Any:
    """The model's text rows where these items may go as embedding rows throughout (model.mixed_runs:
    positions in a line, images causal like the text), each with one output at most."""
    if all_logits or not model.mixed_runs or any(w not in (True, False) for _, _, w in items):
        return None  # a speculative draft's several outputs, or every position's: the runs' own decodes
    from .text_rows import text_rows

    rows = text_rows(model)
    if rows is None or not all(rows.covers([t for t in toks if t >= 0]) for _, toks, _ in items):
        return None  # an id outside the vocabulary: llama.cpp's token path refuses it
    return rows


def decode_with_images(model: Any, items: list[tuple[int, list[int], bool]], all_logits: bool = False) -> list[int]:
    """Model.decode for items holding image tokens. One item may mix text and images (its runs are
    decoded in order); several items must be one run each (the engine cuts prompt chunks where
    text and images meet, ggufrun.images.run_end): their images go in one embedding batch first,
    then their text in one token batch, whose logits the caller samples. With model.mixed_runs
    (text rows exact, llama/text_rows.py) every item's text and images go in one embedding batch."""
    if len(items) == 1:
        seq_id, tokens, want = items[0]
        runs = _runs(tokens)
        out = [-1]
        size = max(model.n_batch, 1)
        rows = _rows_for(model, items, all_logits)
        if rows is not None:  # the runs as one embedding batch (or one per n_batch), not a decode each
            if runs[-1][0] < 0 and want:
                raise ConfigError("A prompt cannot end with an image: the model answers after text.")
            for start in range(0, len(tokens), size):
                out = _decode_embeddings(model, [(seq_id, tokens[start : start + size])], rows,
                                         [bool(want) and start + size >= len(tokens)])
            return out
        for k, run in enumerate(runs):
            last = k == len(runs) - 1
            if run[0] < 0:
                if last and want:
                    raise ConfigError("A prompt cannot end with an image: the model answers after text.")
                if model.whole_images and len(run) > size:
                    raise ConfigError(f"An image of {len(run)} tokens does not fit one batch of {size}; this projector "
                                      "needs it whole.", f"Use --batch-size {len(run)} or more.")
                for start in range(0, len(run), size):
                    _decode_embeddings(model, [(seq_id, run[start : start + size])])
            else:
                for start in range(0, len(run), size):
                    end = start + size >= len(run)
                    out = model._decode_batch([(seq_id, run[start : start + size], want and last and end)], all_logits)
        return out
    rows = _rows_for(model, items, all_logits)
    if rows is not None:  # every item's text and images in one decode
        if any(w and t and t[-1] < 0 for _, t, w in items):
            raise ConfigError("A prompt cannot end with an image: the model answers after text.")
        return _decode_embeddings(model, [(s, t) for s, t, _ in items], rows, [bool(w) for _, _, w in items])
    images = [(s, t) for s, t, _ in items if t and t[0] < 0]
    if any(min(t) < 0 <= max(t) for _, t, _ in items if t):
        raise ValueError("decode() got an item mixing text and image tokens beside other items")
    if any(w for _, t, w in items if t and t[0] < 0):
        raise ConfigError("A prompt cannot end with an image: the model answers after text.")
    if images:
        _decode_embeddings(model, images)
    texts = [(k, it) for k, it in enumerate(items) if not (it[1] and it[1][0] < 0)]
    out = [-1] * len(items)
    if texts:
        for (k, _), index in zip(texts, model._decode_batch([it for _, it in texts], all_logits)):
            out[k] = index
    return out
