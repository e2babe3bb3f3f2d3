"""Positions of a sequence on an M-RoPE model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) with images.

Everywhere else ggufrun gives the token at index i of a sequence position i. An M-RoPE model's
image of ``n`` embedding rows (nx x ny after the 2x2 merge) takes fewer positions: every row has
the time position ``p0`` where the image starts (its height and width positions are p0 + row and
p0 + column), and the text after it goes on at ``p0 + max(nx, ny)`` (libmtmd's
mtmd_input_chunk_get_n_pos). So a position is a function of the tokens before it, and equal token
prefixes give equal positions: prefix reuse stays valid. :class:`Positions` keeps, per sequence,
the images in it (index, rows, positions), from which any index's position follows; text-only
sequences hold nothing and cost one dict lookup.

llama.cpp's KV cells carry positions, not indices: dropping a tail (llama_memory_seq_rm) or
sharing a prefix (llama_memory_seq_cp) takes the position where it starts. All rows of an image
share one time position, so a cut never falls inside an image: it moves back to the image's start.
"""

from __future__ import annotations


class Positions:
    """Image spans per sequence: (index of the image's first row, its rows, the positions it takes)."""

    __slots__ = ("_spans",)

    def __init__(self) -> None:
        self._spans: dict[int, list[tuple[int, int, int]]] = {}

    def at(self, seq_id: int, index: int) -> int:
        """The (time) position of the token at ``index`` of the sequence; at its length, the next one's."""
        shift = 0
        for start, n, n_pos in self._spans.get(seq_id, ()):
            if index < start:
                break
            if index < start + n:
                return start - shift
            shift += n - n_pos
        return index - shift

    def add_image(self, seq_id: int, start: int, n: int, n_pos: int) -> None:
        """Row 0 of an image of ``n`` rows taking ``n_pos`` positions is decoded at ``start``."""
        spans = self._spans.setdefault(seq_id, [])
        while spans and spans[-1][0] >= start:  # a partly decoded image taken up again at row 0: replaced
            spans.pop()
        spans.append((start, n, n_pos))

    def boundary(self, seq_id: int, keep: int) -> int:
        """``keep`` moved back to the start of the image it falls inside (an image is cut whole)."""
        for start, n, _ in self._spans.get(seq_id, ()):
            if start < keep < start + n:
                return start
        return keep

    def cut(self, seq_id: int, keep: int) -> None:
        """Forget the images from index ``keep`` on (``keep`` is a boundary)."""
        spans = self._spans.get(seq_id)
        if spans:
            while spans and spans[-1][0] >= keep:
                spans.pop()
            if not spans:
                del self._spans[seq_id]

    def copy(self, src: int, dst: int, n: int) -> None:
        """``dst`` holds the first ``n`` tokens of ``src`` (``n`` a boundary)."""
        spans = [s for s in self._spans.get(src, ()) if s[0] < n]
        if spans:
            self._spans[dst] = spans
        else:
            self._spans.pop(dst, None)

    def reset(self, seq_id: int | None = None) -> None:
        if seq_id is None:
            self._spans.clear()
        else:
            self._spans.pop(seq_id, None)
