"""Tile checksums: XXH3-64 over column segments of row groups, so a column slice is verified from its own bytes.

Block checksums (:mod:`dcpio.integrity.checksum`) cut an item's bytes in file order. A resharding load that turns
``Shard(0)`` into ``Shard(1)`` wants half of every row, and every row-major block holds both halves, so verifying
it would mean reading twice the bytes it needs. Tiles fix that for tensor records dcpio writes:

* the record's data is seen as a byte matrix of ``rows`` (dimension 0) by ``row_bytes`` (all other dimensions);
* each row is cut into ``segments`` equal column segments on a dimension-1 boundary, and the rows into groups of
  ``group_rows`` (about one checksum block of full rows);
* one digest per (group, segment): XXH3-64 of that tile's bytes, gathered row by row.

A column slice then reads and hashes only the segments it overlaps. Tiles are recorded *in addition* to the block
checksums (which a full or row-range load verifies at no extra cost), as a second extra attribute ``dcpio_tiles``
on torch's ``_StorageInfo`` (torch's reader and older dcpio ignore it). The record is the plain tuple
``("xxh3-64-tiles", data_start, rows, row_bytes, segments, group_rows, digests)`` with ``data_start`` the absolute
file offset of the tensor's first byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from dcpio.errors import CorruptCheckpointError
from dcpio.tensor_bytes import byte_view, thread_scratch

__all__ = [
    "TILE_ALGORITHM",
    "TILE_ATTRIBUTE",
    "TileChecksums",
    "choose_tiling",
    "data_rows",
    "hash_tile_group",
    "hash_tiles",
]

TILE_ALGORITHM = "xxh3-64-tiles"
TILE_ATTRIBUTE = "dcpio_tiles"
_MAX_INT = 1 << 62  # untrusted integers: far beyond any file, far below what breaks int -> str
_DIGEST = 8
_MAX_SEGMENTS = 8
# a segment shorter than this costs more in per-tile work than a wider read would
_MIN_SEGMENT_BYTES = 512


def choose_tiling(shape: tuple[int, ...], itemsize: int, block_size: int) -> tuple[int, int] | None:
    """``(segments, group_rows)`` for a C-contiguous tensor of ``shape``, or None when tiles would not help.

    Segments: the largest power of two up to 8 that divides dimension 1 (so every segment boundary is an index
    boundary of dimension 1, where ``Shard(1)`` over 2, 4 or 8 ranks cuts) and leaves segments of at least 512 bytes.
    """
    if len(shape) < 2 or shape[0] < 2:
        return None
    row_bytes = itemsize
    for d in shape[1:]:
        row_bytes *= d
    segments = _MAX_SEGMENTS
    while segments > 1 and (shape[1] % segments or row_bytes // segments < _MIN_SEGMENT_BYTES):
        segments //= 2
    if segments < 2:
        return None
    # groups of about 2 block sizes of full rows (a quarter block per tile at 8 segments): fewer, larger tiles cost
    # less per-tile work on load, and a column half of a group (1 MiB) still fits in a core's L2 cache
    return segments, max(1, (2 * block_size) // row_bytes)


def _word(seg_bytes: int) -> torch.dtype:
    """The widest integer type that tiles a segment: a gather of 8-byte words is several times faster than bytes."""
    for dtype in (torch.int64, torch.int32, torch.int16):
        if seg_bytes % dtype.itemsize == 0:
            return dtype
    return torch.uint8


def _gathered(rows_u8: torch.Tensor, seg_bytes: int, first_seg: int, nsegs: int) -> tuple[memoryview, int]:
    """Copy segments ``[first_seg, first_seg + nsegs)`` of ``rows_u8`` (a ``(g, row_bytes)`` uint8 view, rows
    contiguous) into a scratch buffer, segment after segment; returns the buffer and the bytes per tile."""
    g = rows_u8.shape[0]
    word = _word(seg_bytes)
    w = seg_bytes // word.itemsize
    tile = g * seg_bytes
    out = thread_scratch("tiles", nsegs * tile)
    src = rows_u8.narrow(1, first_seg * seg_bytes, nsegs * seg_bytes)
    if src.storage_offset() % word.itemsize or rows_u8.stride(0) % word.itemsize:
        word, w = torch.uint8, seg_bytes
    typed_src = src.view(word) if word != torch.uint8 else src
    out.view(word).view(nsegs, g, w).copy_(typed_src.view(g, nsegs, w).transpose(0, 1))
    return byte_view(out), tile


def data_rows(data: torch.Tensor) -> torch.Tensor:
    """A C-contiguous CPU tensor's bytes as a ``(rows, row_bytes)`` uint8 tensor (rows along dimension 0)."""
    return data.reshape(data.shape[0], -1).view(torch.uint8)


def hash_tile_group(rows_u8: torch.Tensor, segments: int) -> bytes:
    """The digests of one row group's tiles, segment after segment (``rows_u8``: the group's ``(g, row_bytes)``
    uint8 rows)."""
    view, tile = _gathered(rows_u8, rows_u8.shape[1] // segments, 0, segments)
    return b"".join(xxhash.xxh3_64_digest(view[s * tile : (s + 1) * tile]) for s in range(segments))


def hash_tiles(data: torch.Tensor, segments: int, group_rows: int) -> bytes:
    """Tile digests of a C-contiguous CPU tensor, group after group, segment after segment."""
    u8 = data_rows(data)
    rows = u8.shape[0]
    return b"".join(
        hash_tile_group(u8.narrow(0, r0, min(group_rows, rows - r0)), segments) for r0 in range(0, rows, group_rows)
    )


@dataclass(frozen=True)
class TileChecksums:
    """Digests of the tiles of one tensor record's data (see the module docstring)."""

    data_start: int
    rows: int
    row_bytes: int
    segments: int
    group_rows: int
    digests: bytes

    @property
    def segment_bytes(self) -> int:
        return self.row_bytes // self.segments

    def to_record(self) -> tuple[Any, ...]:
        fields = (self.data_start, self.rows, self.row_bytes, self.segments, self.group_rows)
        return (TILE_ALGORITHM, *fields, self.digests)

    @classmethod
    def from_record(cls, record: object, where: str) -> TileChecksums:
        """Validate a record read from metadata (untrusted) and build the object."""
        ok = (
            isinstance(record, tuple)
            and len(record) == 7
            and record[0] == TILE_ALGORITHM
            and all(type(v) is int and 0 <= v < _MAX_INT for v in record[1:6])
            and isinstance(record[6], bytes)
        )
        fields: tuple[int, ...] = tuple(record[1:6]) if ok else (0, 0, 0, 0, 0)  # type: ignore[index]
        digests: bytes = record[6] if ok else b""  # type: ignore[index]
        start, rows, row_bytes, segments, group_rows = fields
        ok = (
            ok
            and start >= 0
            and rows > 0
            and segments > 0
            and row_bytes > 0
            and row_bytes % segments == 0
            and group_rows > 0
            and len(digests) == _DIGEST * segments * (-(-rows // group_rows))
        )
        if not ok:
            raise CorruptCheckpointError(
                f"{where}: the tile checksum record in .metadata is malformed; the metadata is damaged. Load with "
                "verify_checksums=False only if you trust the data."
            )
        return cls(start, rows, row_bytes, segments, group_rows, digests)

    def segments_for(self, lo: int, hi: int) -> tuple[int, int]:
        """The segments ``[first, stop)`` covering bytes ``[lo, hi)`` of a row."""
        seg = self.segment_bytes
        return lo // seg, -(-hi // seg)

    def verify(self, data_u8: torch.Tensor, group: int, first_seg: int, stop_seg: int, path: str, item: str) -> int:
        """Check the tiles ``group`` x ``[first_seg, stop_seg)`` of ``data_u8`` (the record's whole data as a
        ``(rows, row_bytes)`` uint8 tensor, e.g. over a memory map); returns the bytes hashed."""
        r0 = group * self.group_rows
        g = min(self.group_rows, self.rows - r0)
        view, tile = _gathered(data_u8.narrow(0, r0, g), self.segment_bytes, first_seg, stop_seg - first_seg)
        for k, s in enumerate(range(first_seg, stop_seg)):
            at = (group * self.segments + s) * _DIGEST
            if xxhash.xxh3_64_digest(view[k * tile : (k + 1) * tile]) != self.digests[at : at + _DIGEST]:
                seg = self.segment_bytes
                raise CorruptCheckpointError(
                    f"{path}: checksum mismatch in rows [{r0}, {r0 + g}), bytes [{s * seg}, {(s + 1) * seg}) of each "
                    f"row ({item}): the data on storage is not what was saved (disk or transfer corruption). "
                    "Restore the file from a good copy or load an earlier checkpoint; `dcpio verify` lists every "
                    "damaged tensor."
                )
        return len(view)
