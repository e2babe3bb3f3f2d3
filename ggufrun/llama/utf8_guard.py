"""Keeps a grammar row's bytes valid UTF-8, which llama.cpp's grammar sampler does not.

llama.cpp decodes a token's bytes leniently (``decode_utf8`` in llama-grammar.cpp): a lead byte
F8..FF starts a "4-byte character", and overlong forms (F0 82 9B 93), surrogates (ED B0 8A) and
values past U+10FFFF decode to a code point like any other. A JSON string's ``[^"\\\\]`` takes
each as one character, so a schema's reply could hold bytes no client can decode (the H100's
``"...satubuvoro\\ufffd\\ufffd\\ufffd\\ufffd"``: one grammar character, four replacement
characters, past maxLength once decoded). JSON text is UTF-8 (RFC 8259), so every grammar row
also keeps its bytes a valid UTF-8 prefix: a token is allowed only if the grammar allows it
and the bytes so far plus its own still are one. GBNF cannot say this (an overlong form decodes
to an ordinary code point), hence a check beside the grammar.

Most tokens are whole valid UTF-8 (``VocabIndex.raw`` holds the few that are not: byte tokens,
cut characters): from a clean state they are fine as they are, and inside a character none is
(its first byte is not a continuation byte). Only the others are decoded, a few at a time.
"""

from __future__ import annotations

import codecs

import numpy as np

from .grammar_filter import VocabIndex


def _rest(data: bytes) -> bytes | None:
    """The unfinished character at the end of ``data`` (b"": none); None if ``data`` is not valid UTF-8 so far."""
    try:
        _, used = codecs.utf_8_decode(data, "strict", False)
    except UnicodeDecodeError:
        return None
    rest = data[used:]
    if len(rest) >= 2:
        # Python's incremental decoder takes ED A0..BF (a surrogate's first two bytes) as a prefix and
        # refuses it only once the character is whole: a dead end for the row (no continuation is
        # valid). The complete character's check decides: pad with continuation bytes and decode.
        try:
            codecs.utf_8_decode(rest + b"\x80" * ((4 if rest[0] >= 0xF0 else 3) - len(rest)), "strict", True)
        except UnicodeDecodeError:
            return None
    return rest


class Utf8Guard:
    """The bytes a grammar row has accepted, as far as UTF-8 validity goes: the unfinished character."""

    def __init__(self, index: VocabIndex) -> None:
        self._index = index
        self.pending = b""

    def ok(self, ids: np.ndarray) -> np.ndarray:
        """For each of ``ids``, whether accepting it keeps the bytes valid UTF-8 (and, inside a
        character, is not end of generation)."""
        ix = self._index
        ids = np.asarray(ids)
        odd = ix.odd[ids]
        out = odd.copy() if self.pending else ~odd
        out[ix.eog[ids]] = not self.pending
        for j in np.flatnonzero(odd & ~ix.eog[ids]).tolist():
            out[j] = _rest(self.pending + ix.raw[int(ids[j])]) is not None
        return out

    def ok_one(self, token: int) -> bool:
        """:meth:`ok` for one token, without numpy's per-call cost (a grammar row's every draw)."""
        ix = self._index
        if ix.eog[token] or not ix.odd[token]:
            return not self.pending
        return _rest(self.pending + ix.raw[token]) is not None

    def accept(self, token: int) -> None:
        ix = self._index
        if ix.eog[token]:
            return
        piece = ix.raw.get(token)
        if piece is None:
            self.pending = b""  # (whole valid UTF-8: only allowed from a clean state)
            return
        self.pending = _rest(self.pending + piece) or b""  # (an invalid one could only be forced: start over)
