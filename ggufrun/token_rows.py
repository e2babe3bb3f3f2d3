"""Rows of a model's token-embedding table, read from its GGUF file exactly as llama.cpp's
``get_rows`` gives them to the first layer.

A token fed to llama_decode as its embedding row gives the model the same input as the token id,
so text that sits between two images (a vision projector's framing tokens: tile headers, row
ends) can go in the images' embedding batch: one decode for a whole picture instead of one per
text run and one per tile (a SmolVLM picture is 17 tiles, 36 decodes in llama.cpp's own helper).

Only where the rows are bit-exact: table types whose dequantisation is one conversion or one
multiply per value (F32, F16, BF16, Q8_0), and architectures whose graph uses an embedding input
as it uses a looked-up token (no scale on token input only, as gemma's and granite's apply).
Anything else returns None and the caller decodes the text as tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import GgufrunError

# llama.cpp builds these with build_inp_embd(tok_embd) and nothing applied to token input alone
# (src/models/*.cpp; granite's f_embedding_scale and gemma's sqrt(n_embd) are token-only)
SAME_INPUT_ARCHS = frozenset({"llama", "qwen2", "qwen3", "mistral3", "lfm2"})
_BLOCK = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34)}  # values, bytes per block


class TokenRows:
    """The token-embedding table of one GGUF file, read a row at a time (rows are cached)."""

    def __init__(self, path: Path, kind: str, offset: int, n_embd: int, n_vocab: int) -> None:
        self.path, self.kind, self.offset, self.n_embd, self.n_vocab = path, kind, offset, n_embd, n_vocab
        per, size = _BLOCK[kind]
        self.row_bytes = n_embd // per * size
        self._cache: dict[int, Any] = {}

    def rows(self, tokens: list[int]) -> Any:
        """float32 [len(tokens), n_embd]. Raises ValueError for a token outside the vocabulary."""
        import numpy as np

        out = np.empty((len(tokens), self.n_embd), dtype=np.float32)
        missing = sorted({t for t in tokens if t not in self._cache})
        if missing:
            with open(self.path, "rb") as f:
                for t in missing:
                    if not 0 <= t < self.n_vocab:
                        raise ValueError(f"token {t} is outside the vocabulary of {self.n_vocab}")
                    f.seek(self.offset + t * self.row_bytes)
                    self._cache[t] = _dequantize(self.kind, f.read(self.row_bytes), np)
        for i, t in enumerate(tokens):
            out[i] = self._cache[t]
        return out


def token_rows(path: str | Path) -> TokenRows | None:
    """The exact token rows of the model at ``path``; None where they cannot be exact (see the
    module's note) or the file holds no token table (a split model's later part)."""
    from .gguf_info import inspect

    try:
        info = inspect(path)
    except GgufrunError:
        return None
    if info.architecture not in SAME_INPUT_ARCHS or info.metadata.get(f"{info.architecture}.embedding_scale"):
        return None
    table = next((t for t in info.tensors if t.name == "token_embd.weight"), None)
    if table is None or table.type not in _BLOCK or len(table.shape) != 2:
        return None
    n_embd, n_vocab = table.shape
    if n_embd % _BLOCK[table.type][0] or n_embd != info.embedding_length:
        return None
    return TokenRows(Path(path), table.type, table.offset, n_embd, n_vocab)


def _dequantize(kind: str, raw: bytes, np: Any) -> Any:
    # as ggml's to_float for each type (ggml-quants.c): a conversion, or int8 * (float)f16 scale
    if kind == "F32":
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if kind == "F16":
        return np.frombuffer(raw, dtype="<f2").astype(np.float32)
    if kind == "BF16":
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 34)
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (q * d).reshape(-1)
