"""Text tokens as the input rows llama.cpp would look them up as, read from the model file.

llama.cpp takes a batch of token ids or a batch of embedding rows, never both, so a prompt that
interleaves text and images (SmolVLM: a picture is 4 tiles and an overview with marker text
between) costs a llama_decode per run: 11 for one picture, each with a fixed cost (~45 ms on 2 CPU
threads, where the whole 149-token prompt in one batch takes ~275 ms). With the text's rows in
hand, the whole prompt is one embedding batch.

Only where the rows are exactly what the token path computes: ``build_inp_embd`` is a get_rows of
``token_embd.weight`` (on the CPU, whose dequantisation is ggml's ``to_float``), and the graphs in
ARCHES use it as it comes (no token-only scaling as gemma's or granite's, no LoRA in ggufrun);
Qwen3-VL's input is wider than a text row (deepstack), and the token path pads it with zeros.
On an M-RoPE model a text token's positions are (p, p, p, 0), as llm_graph_input_pos gives them.
F32, F16 and BF16 rows are converted here (exact in any order of operations); a quantized type's
(Q8_0, Q4_K, Q6_K...: token_embd in most published files) by ggml's own to_float for that type, the
function llama.cpp's get_rows dequantises them with.
"""

from __future__ import annotations

import ctypes
from typing import Any

from ._lib import numpy

# graphs checked to feed build_inp_embd's rows straight to the first layer (llama.cpp src/models/*.cpp)
ARCHES = ("llama", "qwen2vl", "qwen3vl", "qwen3vlmoe")
_PLAIN = {"F32": 4, "F16": 2, "BF16": 2}  # bytes an element: converted here (exact in any order)


class _Traits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]  # ggml.h's struct ggml_type_traits


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def _dequantizer(kind: str) -> tuple[int, int, Any] | None:
    """(elements a block, bytes a block, ggml's to_float) of a quantized type: the very function the CPU
    backend's get_rows dequantises token_embd with (ops.cpp; a GPU never takes get_rows, whose weights
    stay in host memory: the input layer is always on the CPU), so its rows are the token path's bit for bit."""
    import gguf

    from .libggml import load

    try:
        type_id = gguf.GGMLQuantizationType[kind].value
        fn = load().ggml_get_type_traits
    except (KeyError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.POINTER(_Traits), [ctypes.c_int]
    traits = fn(type_id)
    if not traits or not traits.contents.is_quantized or not traits.contents.to_float:
        return None
    t = traits.contents
    return int(t.blck_size), int(t.type_size), _TO_FLOAT(t.to_float)


class TextRows:
    """``token_embd.weight`` of one model file, mapped read-only; rows() dequantises some of it."""

    def __init__(self, path: Any, kind: str, offset: int, n_embd: int, n_vocab: int, block: tuple[int, int],
                 to_float: Any = None) -> None:
        np = numpy()
        per, size = block
        self.kind, self.n_embd, self.n_vocab = kind, n_embd, n_vocab
        self.row_bytes = n_embd // per * size
        self._to_float = to_float
        self._data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(n_vocab, self.row_bytes))

    def covers(self, tokens: list[int]) -> bool:
        """Whether every (text) token is a row of the matrix; llama.cpp refuses the others itself."""
        return all(0 <= t < self.n_vocab for t in tokens)

    def rows(self, tokens: list[int]) -> Any:
        """float32 [len(tokens), n_embd], bit for bit the token path's input rows."""
        np = numpy()
        raw = self._data[np.asarray(tokens, dtype=np.int64)]  # a contiguous copy: whole blocks, row after row
        if self.kind == "F32":
            return raw.view(np.float32)
        if self.kind == "F16":
            return raw.view(np.float16).astype(np.float32)
        if self.kind == "BF16":
            return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        out = np.empty((len(tokens), self.n_embd), dtype=np.float32)
        self._to_float(raw.ctypes.data, out.ctypes.data, out.size)
        return out


def text_rows(model: Any) -> TextRows | None:
    """The model's TextRows, or None where its token path is not a plain row lookup (made once)."""
    made = getattr(model, "_text_rows", False)
    if made is not False:
        return made if isinstance(made, TextRows) else None
    from ..errors import GgufrunError
    from ..gguf_info import inspect

    got: TextRows | None = None
    # the loaded metadata tells the architecture: no second header parse (tenths of a second, a big vocabulary)
    if (getattr(model, "metadata", None) or {}).get("general.architecture") not in ARCHES:
        model._text_rows = None
        return None
    try:
        info = getattr(model, "gguf_info", None) or inspect(model.path)  # the loader's parse, else one here
        embd = next((t for t in info.tensors if t.name == "token_embd.weight"), None)
        block: tuple[int, int] | None = None
        quant = None
        if embd is not None and embd.type in _PLAIN:
            block = (1, _PLAIN[embd.type])
        elif embd is not None:
            quant = _dequantizer(embd.type)
            block = (quant[0], quant[1]) if quant else None
        if (info.architecture in ARCHES and embd is not None and block is not None and len(embd.shape) == 2
                and embd.shape[0] % block[0] == 0):  # a split's other parts: not in this file, so None
            n_embd, n_vocab = embd.shape
            if embd.n_bytes == n_vocab * n_embd // block[0] * block[1]:
                got = TextRows(model.path, embd.type, embd.offset, n_embd, n_vocab, block, quant[2] if quant else None)
    except (OSError, ValueError, GgufrunError):  # unreadable now: the token path still works
        got = None
    model._text_rows = got
    return got
