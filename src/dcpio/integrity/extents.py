"""Stored chunks must tile the tensor they claim: every element held exactly once, nothing outside.

A chunk's offsets and sizes come from untrusted metadata (a DCP ``.metadata``, an HF shard's ``DCP_SHARDING_INFO``).
A tensor whose global size is made up from them can be far larger than the bytes stored (a 200-byte shard that says
it sits at row 2^26), and a region no chunk covers would be left as zeros or as whatever the destination held.
Checked before anything is allocated, so what a reader or a command produces is bounded by what is stored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from dcpio.errors import CorruptCheckpointError

__all__ = ["check_tiling", "uncovered_elements"]

_MAX_PAIRWISE = 4096  # chunks per tensor checked pairwise for overlap; beyond, a sort-based check on dim 0 is used


def _overlap(a_off: Sequence[int], a_len: Sequence[int], b_off: Sequence[int], b_len: Sequence[int]) -> bool:
    return all(ao < bo + bl and bo < ao + al for ao, al, bo, bl in zip(a_off, a_len, b_off, b_len))


def uncovered_elements(size: Sequence[int], chunks: Sequence[tuple[Sequence[int], Sequence[int]]]) -> int:
    """Elements of a tensor of ``size`` that no chunk ``(offsets, sizes)`` covers; raises on overlap or overreach."""
    boxes = [(tuple(o), tuple(s)) for o, s in chunks if math.prod(s) > 0]
    for offs, lens in boxes:
        if len(offs) != len(size) or any(o < 0 or o + n > d for o, n, d in zip(offs, lens, size)):
            raise ValueError(f"chunk at {list(offs)} of {list(lens)} reaches past the tensor's {list(size)}")
    boxes.sort()
    for i, (a_off, a_len) in enumerate(boxes):
        for b_off, b_len in boxes[i + 1 : i + 1 + _MAX_PAIRWISE]:
            if size and b_off[0] >= a_off[0] + a_len[0]:
                break  # sorted by first offset: nothing later can overlap in dim 0
            if _overlap(a_off, a_len, b_off, b_len):
                raise ValueError(f"chunks at {list(a_off)} and {list(b_off)} overlap")
    return math.prod(size) - sum(math.prod(s) for _, s in boxes)


def check_tiling(
    name: str, size: Sequence[int], chunks: Sequence[tuple[Sequence[int], Sequence[int]]], where: str, fix: str
) -> None:
    """Refuse a tensor whose chunks do not cover ``size`` exactly once (message names ``where``, ``name``, ``fix``)."""
    try:
        missing = uncovered_elements(size, chunks)
    except ValueError as err:
        raise CorruptCheckpointError(f"{where}: tensor {name!r}: {err}; {fix}") from err
    if missing:
        raise CorruptCheckpointError(
            f"{where}: tensor {name!r} of shape {list(size)}: {missing} of its elements are held by no stored chunk "
            f"({len(chunks)} chunks); {fix}"
        )
