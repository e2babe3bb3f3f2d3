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
The types read are those whose conversion to float32 is exact in any order of operations: F32,
F16, BF16, and Q8_0 (an fp16 scale times an int8: 19 significant bits, exact in float32).
"""

from __future__ import annotations

from typing import Any

from ._lib import numpy

# graphs checked to feed build_inp_embd's rows straight to the first layer (llama.cpp src/models/*.cpp)
ARCHES = ("llama", "qwen2vl", "qwen3vl", "qwen3vlmoe")
_BLOCK = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34)}  # elements, bytes a block


class TextRows:
    """``token_embd.weight`` of one model file, mapped read-only; rows() dequantises some of it."""

    def __init__(self, path: Any, kind: str, offset: int, n_embd: int, n_vocab: int) -> None:
        np = numpy()
        per, size = _BLOCK[kind]
        self.kind, self.n_embd, self.n_vocab = kind, n_embd, n_vocab
        self.row_bytes = n_embd // per * size
        self._data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(n_vocab, self.row_bytes))

    def covers(self, tokens: list[int]) -> bool:
        """Whether every (text) token is a row of the matrix; llama.cpp refuses the others itself."""
        return all(0 <= t < self.n_vocab for t in tokens)

    def rows(self, tokens: list[int]) -> Any:
        """float32 [len(tokens), n_embd], bit for bit the token path's input rows."""
        np = numpy()
        raw = self._data[np.asarray(tokens, dtype=np.int64)]
        if self.kind == "F32":
            return raw.view(np.float32)
        if self.kind == "F16":
            return raw.view(np.float16).astype(np.float32)
        if self.kind == "BF16":
            return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        blocks = raw.reshape(len(tokens), -1, 34)  # Q8_0: fp16 d, then 32 int8
        d = blocks[:, :, :2].copy().view(np.float16).astype(np.float32)
        q = blocks[:, :, 2:].view(np.int8).astype(np.float32)
        return (q * d).reshape(len(tokens), self.n_embd)


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
        if (info.architecture in ARCHES and embd is not None and embd.type in _BLOCK and len(embd.shape) == 2
                and embd.shape[0] % _BLOCK[embd.type][0] == 0):  # a split's other parts: not in this file, so None
            per, size = _BLOCK[embd.type]
            n_embd, n_vocab = embd.shape
            if embd.n_bytes == n_vocab * n_embd // per * size:
                got = TextRows(model.path, embd.type, embd.offset, n_embd, n_vocab)
    except (OSError, ValueError, GgufrunError):  # unreadable now: the token path still works
        got = None
    model._text_rows = got
    return got
