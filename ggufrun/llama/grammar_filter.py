"""Which tokens a llama.cpp grammar might allow now, found without running it over the vocabulary.

llama.cpp's grammar sampler decides each token by walking its code points through the grammar's
stacks: a token is allowed only if its first code point matches the top of some stack, and then
only if its second code point matches what follows that one. So a step can first ask the grammar
about one token per character (a "probe", a token that is that character alone; ~130 of them),
then, for the few big groups of tokens whose first character passed (" word" tokens where JSON
allows a space), about the second character on a copy of the grammar advanced by the first. Every
token whose first two characters passed is then checked by the grammar itself; the rest are
rejected without being looked at. On a 152k vocabulary in a JSON structure state this leaves a
few hundred tokens to check, against 9 ms for the whole vocabulary (2-core dev box).

It is exact where its premises hold, and switched off where they do not:

* the grammar has no token references (``<[id]>``, ``<think>``): those match by token id, not by text;
* code points of 0x80 and above are one class (one probe speaks for all) except those the grammar
  names (JSON schema grammars name none: ``[^"\\\\]`` treats them all alike; an enum value "béta"
  names é): tokens with a named one as their first or second character are always checked.

Code points are decoded as llama.cpp decodes them (``decode_utf8`` in llama-grammar.cpp: lenient,
stopping at a NUL byte); tokens whose bytes it would not decode cleanly are always checked. That
covers a grammar left inside a character by the last token: llama.cpp then rejects every token
but end of generation and those that go on with continuation bytes, which are always checked,
and every probe, so only those are.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

N_ASCII = 128
HIGH = 128  # any code point from 0x80 up: one class when the grammar cannot tell them apart
N_FIRST = 129  # first-character classes: 0..127 and HIGH
END = 129  # second-character class of a token that is one character
PART = 130  # second-character class that cannot be probed (a partial or unusual second character)
N_SECOND = 131
MAX_CP = 0x10FFFF

# A first-character group this big, once allowed, is split by its second character (a copy of the
# grammar and ~130 probes, ~20 us); with more than _MAX_SPLIT such groups allowed the state is
# permissive (inside a string) and scanning the best logits finds allowed tokens sooner.
SPLIT_MIN = 512
MAX_SPLIT = 4

_UTF8_LEN = (1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 2, 2, 3, 4)  # by the first byte's high nibble


def llama_code_points(piece: bytes) -> tuple[list[int], int] | None:
    """(code points, n_remain) as llama.cpp's grammar decodes ``piece`` from a clean state:
    n_remain > 0 when it ends inside a character. None where llama.cpp gives up on it (an invalid
    lead byte clears the token's code points)."""
    cps: list[int] = []
    pos, n = 0, len(piece)
    n_remain = 0
    while pos < n and piece[pos] != 0:
        first = piece[pos]
        n_remain = _UTF8_LEN[first >> 4] - 1
        if n_remain < 0:
            return None
        value = first & ((1 << (7 - n_remain)) - 1)
        pos += 1
        while pos < n and piece[pos] != 0 and n_remain > 0:
            value = (value << 6) + (piece[pos] & 0x3F)
            pos += 1
            n_remain -= 1
        if n_remain == 0:
            cps.append(value)
    return cps, n_remain


def _first_class(cp: int) -> int:
    return cp if cp < N_ASCII else HIGH


@dataclass(frozen=True)
class GrammarText:
    """What the prefilter needs to know about a GBNF text."""

    token_refs: bool  # it references tokens (<[id]>, <name>): matched by id, so no text probe speaks for them
    # Code points from 0x80 up that the grammar names, as (first, last) intervals: every other one
    # is matched alike by each of its character classes (``[^"]``, ``[ -\U0010FFFF]``).
    high: tuple[tuple[int, int], ...] = ()


_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", re.DOTALL)


def _literal_values(body: str, ranges: bool) -> list[tuple[int, int]]:
    """The code points a string literal or character class body names, as (first, last)
    intervals: one character, or a range ``a-b`` in a class."""
    out: list[tuple[int, int]] = []
    i, upper = 0, False
    while i < len(body):
        m = _ESCAPE.match(body, i)
        if m:
            esc = m.group(1)
            value = int(esc[1:], 16) if esc[0] in "xuU" and len(esc) > 1 else ord(esc[0])
            i = m.end()
        else:
            value = ord(body[i])
            i += 1
        out.append((out.pop()[0], value) if upper else (value, value))
        upper = ranges and i < len(body) and body[i] == "-" and i + 1 < len(body)
        if upper:
            i += 1
    return out


def analyse(text: str) -> GrammarText:
    """Scan GBNF ``text`` (comments, strings and character classes as llama.cpp's parser reads them)."""
    token_refs = False
    high: set[tuple[int, int]] = set()
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "#":
            while i < n and text[i] not in "\r\n":
                i += 1
        elif c in "\"[":
            close = "\"" if c == "\"" else "]"
            j = i + 1
            while j < n and text[j] != close:
                j += 2 if text[j] == "\\" else 1
            body = text[i + 1 : j]
            if c == "[" and body.startswith("^"):
                body = body[1:]
            for lo, hi in _literal_values(body, c == "["):
                if hi >= N_ASCII and not (lo < N_ASCII and hi >= MAX_CP):  # that range holds every high one alike
                    high.add((max(lo, N_ASCII), hi))
            i = j + 1
            continue
        elif c == "<":
            token_refs = True
        elif ord(c) >= N_ASCII:  # not GBNF: llama.cpp will reject it; name them all to be safe
            high.add((N_ASCII, MAX_CP))
        i += 1
    return GrammarText(token_refs, tuple(sorted(high)))


class VocabIndex:
    """Every token's first two character classes, the probe token of each class, and the tokens
    sorted by (first, second) class so that a set of allowed classes is a set of slices."""

    def __init__(self, pieces: Sequence[bytes], is_eog: Callable[[int], bool]) -> None:
        n = len(pieces)
        first = np.zeros(n, dtype=np.int16)
        second = np.full(n, PART, dtype=np.int16)
        check = np.zeros(n, dtype=bool)  # tokens no class speaks for: always given to the grammar
        probe = np.full(N_FIRST, -1, dtype=np.int64)
        cp1 = np.full(n, -1, dtype=np.int32)  # the first two code points themselves, -1 for none
        cp2 = np.full(n, -1, dtype=np.int32)
        high_probes: dict[int, int] = {}  # code point from 0x80 up -> a token that is that character alone
        eog = np.zeros(n, dtype=bool)
        raw: dict[int, bytes] = {}  # tokens that are not whole valid UTF-8 -> their bytes (utf8_guard)
        for t, piece in enumerate(pieces):
            if not piece.isascii():
                try:
                    piece.decode("utf-8")
                except UnicodeDecodeError:
                    raw[t] = piece
            if is_eog(t):
                eog[t] = True
            if eog[t] or not piece or piece[0] == 0:
                check[t] = True  # end of generation is allowed by the stacks' state, not by text
                continue
            if piece.isascii() and 0 not in piece:  # most tokens: a byte is a code point
                c, whole = piece[0], len(piece) == 1
                first[t] = cp1[t] = c
                if whole:
                    second[t] = END
                    if probe[c] < 0:
                        probe[c] = t
                else:
                    second[t] = cp2[t] = piece[1]
                continue
            try:  # valid UTF-8 without NUL decodes the same in Python as in llama.cpp
                if 0 in piece:
                    raise ValueError
                text = piece.decode("utf-8")
                cps: list[int] = [ord(text[0]), ord(text[1])] if len(text) > 1 else [ord(text[0])]
                whole = len(text) == 1
            except ValueError:
                decoded = llama_code_points(piece)
                if decoded is None or not decoded[0]:
                    check[t] = True
                    continue
                cps = decoded[0]
                whole = len(cps) == 1 and decoded[1] == 0
            if cps[0] > MAX_CP:
                check[t] = True
                continue
            first[t] = _first_class(cps[0])
            cp1[t] = cps[0]
            if whole:
                second[t] = END
                if probe[first[t]] < 0:
                    probe[first[t]] = t
                if cps[0] >= N_ASCII and len(high_probes) < 256:
                    high_probes.setdefault(cps[0], t)
            elif len(cps) > 1 and cps[1] <= MAX_CP:
                second[t] = _first_class(cps[1])
                cp2[t] = cps[1]
        self.n_vocab = n
        self.eog, self.raw = eog, raw
        self.odd = np.zeros(n, dtype=bool)  # whether a token is in raw
        self.odd[list(raw)] = True
        self.cp1, self.cp2 = cp1, cp2
        self.high_probes = high_probes
        self._named: dict[tuple[tuple[int, int], ...], tuple[np.ndarray, np.ndarray]] = {}
        self.first, self.second, self.check = first, second, check
        self.probe = probe
        self.check_ids = np.flatnonzero(check).astype(np.int32)
        key = first.astype(np.int64) * N_SECOND + second
        key[check] = N_FIRST * N_SECOND  # sorted last, outside every cell
        self.order = np.argsort(key, kind="stable").astype(np.int32)  # token ids within a cell ascending
        counts = np.bincount(key, minlength=N_FIRST * N_SECOND + 1)[: N_FIRST * N_SECOND]
        self.counts = counts.reshape(N_FIRST, N_SECOND)
        self.starts = np.concatenate(([0], np.cumsum(counts)))
        self.group_sizes = self.counts.sum(axis=1)

    def high_probe(self, named: tuple[tuple[int, int], ...]) -> int:
        """A token that is one high code point the grammar does not name (-1: none in the vocabulary)."""
        for cp, t in self.high_probes.items():
            if not any(lo <= cp <= hi for lo, hi in named):
                return t
        return -1

    def named(self, named: tuple[tuple[int, int], ...]) -> tuple[np.ndarray, np.ndarray]:
        """(bool mask, ids) of the tokens whose first or second code point is one of ``named``."""
        got = self._named.get(named)
        if got is None:
            mask = np.zeros(self.n_vocab, dtype=bool)
            for lo, hi in named:
                mask |= ((self.cp1 >= lo) & (self.cp1 <= hi)) | ((self.cp2 >= lo) & (self.cp2 <= hi))
            got = self._named[named] = (mask, np.flatnonzero(mask).astype(np.int32))
        return got


@dataclass
class Candidates:
    """This step's tokens that the grammar may allow: ``table[first, second]`` over the classes,
    plus the tokens always checked; ``count`` of them in all."""

    index: VocabIndex
    table: np.ndarray  # bool [N_FIRST, N_SECOND]
    count: int
    extra: tuple[np.ndarray, np.ndarray] | None = None  # (bool mask, ids) of more tokens, always candidates

    def ids(self) -> np.ndarray:
        """Every candidate token id, ascending."""
        ix = self.index
        if self.count >= ix.n_vocab:
            return np.arange(ix.n_vocab, dtype=np.int32)
        cells = np.flatnonzero(self.table.ravel() & (ix.counts.ravel() > 0))
        if len(cells) > 64:  # a dense table: one pass over the vocabulary beats many slices
            return np.flatnonzero(self.may(np.arange(ix.n_vocab))).astype(np.int32)
        parts = [ix.order[ix.starts[c] : ix.starts[c + 1]] for c in cells]
        if self.extra is not None:
            return np.unique(np.concatenate([*parts, ix.check_ids, self.extra[1]]))
        return np.sort(np.concatenate([*parts, ix.check_ids]))

    def may(self, ids: np.ndarray) -> np.ndarray:
        """For each of ``ids``, whether it is a candidate."""
        ix = self.index
        if self.count >= ix.n_vocab:
            return np.ones(len(ids), dtype=bool)
        ok = self.table[ix.first[ids], ix.second[ids]] | ix.check[ids]
        return ok | self.extra[0][ids] if self.extra is not None else ok


def candidates(index: VocabIndex, text: GrammarText, allowed: Callable[[np.ndarray], np.ndarray],
               advanced: Callable[[int], Any]) -> Candidates:
    """Probe the grammar: ``allowed(ids)`` is its verdict on tokens now; ``advanced(token)`` a
    context manager giving the verdict function of a copy of it that accepted ``token``."""
    probes = index.probe.copy()
    extra = None
    if text.high:  # the probe for the others must be one of them; tokens with a named one stay candidates
        probes[HIGH] = index.high_probe(text.high)
        extra = index.named(text.high)
    have = probes >= 0
    ok1 = np.ones(N_FIRST, dtype=bool)  # a class without a probe cannot be ruled out
    ok1[have] = allowed(probes[have].astype(np.int32))
    table = np.repeat(ok1[:, None], N_SECOND, axis=1)
    split = np.flatnonzero(ok1 & have & (index.group_sizes >= SPLIT_MIN))
    if 0 < len(split) <= MAX_SPLIT:
        for c in split:
            with advanced(int(probes[c])) as after:
                ok2 = np.ones(N_SECOND, dtype=bool)  # END: the probe itself, allowed; PART: unknown
                ok2[:N_FIRST][have] = after(probes[have].astype(np.int32))
            table[c] &= ok2
    count = int(index.counts[table].sum()) + len(index.check_ids) + (len(extra[1]) if extra is not None else 0)
    return Candidates(index, table, count, extra=extra)


def everything(index: VocabIndex) -> Candidates:
    """Every token a candidate: where the prefilter's premises do not hold."""
    return Candidates(index, np.ones((N_FIRST, N_SECOND), dtype=bool), index.n_vocab)

