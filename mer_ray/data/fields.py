"""Receptive fields: windows of several sizes over a dialogue's positions (Lantern).

Positions are ``0..n-1`` in turn order (MELD turns have gaps, so a position is
not a turn; :func:`positions` maps one to the other). A field covers positions
``start..end-1``. For every requested size, every position is covered by at
least one field of that size: windows start every ``stride`` positions (at most
``size``), and a last window aligned to the dialogue's end is added when the
strides would leave a tail uncovered. A size at least the dialogue's length, or ``None``, gives one
field over the whole dialogue.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import pyarrow as pa


@dataclass(frozen=True)
class Field:
    """One receptive field over a dialogue.

    Attributes:
        size: the requested window size (``None``: the whole dialogue). A field near a
            short dialogue may span fewer positions than ``size``; ``end - start`` is its span.
        start: first position covered.
        end: one past the last position covered (exclusive).
        merged: other requested sizes whose window was this very span, folded into this field
            by ``receptive_fields(..., dedupe=True)`` (e.g. ``(None,)`` for a whole-dialogue window).
    """

    size: int | None
    start: int
    end: int
    merged: tuple[int | None, ...] = ()

    def __len__(self) -> int:
        return self.end - self.start

    def covers(self, pos: int) -> bool:
        return self.start <= pos < self.end

    def has_size(self, size: int | None) -> bool:
        """Whether this field stands for requested size ``size`` (its own or a merged one)."""
        return size == self.size or size in self.merged


def _windows(n: int, size: int, stride: int) -> list[tuple[int, int]]:
    if size >= n:
        return [(0, n)]
    stride = min(stride, size)  # a larger stride would leave positions between windows uncovered
    spans = [(s, s + size) for s in range(0, n - size + 1, stride)]
    if spans[-1][1] < n:  # align a last window to the end so the tail is covered
        spans.append((n - size, n))
    return spans


def receptive_fields(n_turns: int, sizes: Sequence[int | None], stride: int | Sequence[int] = 1,
                     dedupe: bool = True) -> list[Field]:
    """Slice a dialogue of ``n_turns`` utterances into receptive fields.

    Args:
        n_turns: number of utterances (positions ``0..n_turns-1``); 0 gives no fields.
        sizes: window sizes, each a positive int or ``None`` (the whole dialogue).
        stride: one stride for all sizes, or one per size (positive ints; ignored for ``None``).
            A stride larger than its size is clamped to the size, so no position is skipped.
        dedupe: fold a field whose ``(start, end)`` span equals an earlier field's (e.g. sizes 8
            and ``None`` on a 5-turn dialogue: the same span gives the same LLM prompt) into that
            field: it keeps the first size as ``size`` and lists the others in ``merged``, so
            ``[f for f in fields if f.has_size(s)]`` still covers every position for every size.
            With ``dedupe=False`` every size keeps its own fields. A repeated size is always
            folded: no two fields are identical.

    Returns:
        Fields ordered by the order of ``sizes``, then by ``start``: deterministic.
    """
    if isinstance(n_turns, bool) or not isinstance(n_turns, int) or n_turns < 0:
        raise ValueError(f"n_turns must be a non-negative int, got {n_turns!r}")
    sizes = list(sizes)
    if not sizes:
        raise ValueError("sizes must name at least one window size")
    strides = [stride] * len(sizes) if isinstance(stride, int) else list(stride)
    if len(strides) != len(sizes):
        raise ValueError(f"got {len(strides)} strides for {len(sizes)} sizes")
    for size, st in zip(sizes, strides):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"a window size must be a positive int or None, got {size!r}")
        if isinstance(st, bool) or not isinstance(st, int) or st < 1:
            raise ValueError(f"a stride must be a positive int, got {st!r}")
    if n_turns == 0:
        return []
    out: list[Field] = []
    seen: dict[tuple, int] = {}  # span (or size and span) -> index in out
    for size, st in zip(sizes, strides):
        for start, end in _windows(n_turns, n_turns if size is None else size, st):
            key = (start, end) if dedupe else (size, start, end)
            if key not in seen:
                seen[key] = len(out)
                out.append(Field(size, start, end))
            elif not out[seen[key]].has_size(size):
                f = out[seen[key]]
                out[seen[key]] = replace(f, merged=(*f.merged, size))
    return out


def fields_covering(fields: Iterable[Field], pos: int) -> list[Field]:
    """The fields that cover position ``pos``, in their given order."""
    return [f for f in fields if f.start <= pos < f.end]


def dialogue_rows(table: pa.Table) -> dict[str, list[int]]:
    """Row indices of each dialogue, in turn order (dialogues in first-seen order)."""
    groups: dict[str, list[tuple[int, int]]] = {}
    for i, (d, t) in enumerate(zip(table["dialogue_id"].to_pylist(), table["turn"].to_pylist())):
        groups.setdefault(d, []).append((t, i))
    return {d: [i for _, i in sorted(rows)] for d, rows in groups.items()}


def positions(table: pa.Table) -> dict[tuple[str, int], int]:
    """Map each ``(dialogue_id, turn)`` to its position ``0..n-1`` in its dialogue's turn order."""
    turn = table["turn"].to_pylist()
    return {(d, turn[i]): p for d, rows in dialogue_rows(table).items() for p, i in enumerate(rows)}


def with_positions(table: pa.Table) -> pa.Table:
    """Append ``position`` (0..n-1 in turn order) and ``dialogue_len`` columns to ``table``."""
    pos = [0] * table.num_rows
    length = [0] * table.num_rows
    for rows in dialogue_rows(table).values():
        for p, i in enumerate(rows):
            pos[i], length[i] = p, len(rows)
    return table.append_column("position", pa.array(pos, pa.int64())).append_column(
        "dialogue_len", pa.array(length, pa.int64()))
