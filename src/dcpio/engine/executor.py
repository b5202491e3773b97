"""The executor: runs the operations the planner chose for one located tensor, verifying what it reads.

It knows no format and makes no choices: each operation says which bytes to read, in which requests, whether to hash
them and where they go. Checksum failures raise :class:`~dcpio.errors.CorruptCheckpointError` naming the file, the
tensor and the byte range.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from dcpio.engine.planner import c_strides
from dcpio.engine.requests import Box, ByteRange, MappedCopy, ReadInto, ReadStrided, TensorLayout, TensorOp
from dcpio.engine.sources import FileSource, IOStats, Source
from dcpio.errors import CorruptCheckpointError
from dcpio.integrity.checksum import BlockChecksums, verify_pieces
from dcpio.integrity.tiles import TileChecksums
from dcpio.tensor_bytes import byte_view, thread_scratch

__all__ = ["NoWindow", "Verifier", "read_extent", "run_tensor_ops"]

# rows of a verified band copied out of a memory view at once: their blocks are hashed just before the copy, so the
# band should still be in cache when it is copied
_BAND_BYTES = 4 << 20


class NoWindow(Exception):
    """The source cannot be viewed in place after all (a file system without mmap): plan without views."""


class Verifier:
    """The checksums of one stored item and where to report a mismatch."""

    def __init__(self, sums: BlockChecksums | None, tiles: TileChecksums | None, path: str, where: str) -> None:
        self.sums = sums
        self.tiles = tiles
        self.path = path
        self.where = where

    def ends_block(self, offset: int) -> bool:
        return self.sums is None or (offset - self.sums.base) % self.sums.block_size == 0

    def blocks(self, pieces: Sequence[tuple[int, memoryview]], stats: IOStats) -> None:
        if self.sums is None:
            return
        verify_pieces(self.sums, pieces, self.path, self.where)
        stats.add(hashed=sum(len(v) for _, v in pieces))


def read_extent(
    source: Source,
    data: ByteRange,
    extent: ByteRange,
    pieces: Sequence[ByteRange],
    dest: memoryview,
    check: Verifier | None,
    stats: IOStats,
) -> memoryview:
    """Read ``extent`` request by request: ``data`` into ``dest``, the widening around it into scratch; hash each
    request's bytes (when ``check``) while they are in cache. Returns the bytes before ``data`` (a record's head when
    the extent starts there)."""
    lead = memoryview(bytearray(data.start - extent.start))
    trail = memoryview(bytearray(extent.stop - data.stop))
    parts = [(extent.start, lead), (data.start, dest), (data.stop, trail)]
    if check is None and not lead and not trail and len(pieces) == 1:
        source.readinto_many(data.start, [dest])
        return lead
    pending: list[tuple[int, memoryview]] = []
    for piece in pieces:
        views = [
            (max(piece.start, off), view[max(piece.start, off) - off : min(piece.stop, off + len(view)) - off])
            for off, view in parts
            if off < piece.stop and off + len(view) > piece.start
        ]
        source.readinto_many(piece.start, [v for _, v in views])
        if check is not None:
            pending += views
            if check.ends_block(piece.stop) or piece.stop == extent.stop:
                check.blocks(pending, stats)
                pending = []
    return lead


def run_tensor_ops(
    source: Source,
    layout: TensorLayout,
    ops: Sequence[TensorOp],
    wants: Sequence[tuple[Box, torch.Tensor]],
    check: Verifier,
    stats: IOStats,
    check_head: Callable[[bytes], None] | None,
) -> None:
    """Run ``ops`` (request ``i`` is ``wants[i]``); ``check_head`` validates the record's head bytes when the
    layout was predicted from metadata, from the bytes an operation read or with one small read of its own."""
    head = layout.head
    if check_head is not None and head is not None and not _reads_head(ops, head):
        check_head(source.read(head.start, head.length))
        check_head = None
    for op in ops:
        box, target = wants[op.request]
        if isinstance(op, ReadInto):
            verifier = check if op.verify else None
            lead = read_extent(source, op.data, op.extent, op.pieces, byte_view(target), verifier, stats)
            if check_head is not None and head is not None and op.extent.start <= head.start:
                check_head(bytes(lead[head.start - op.extent.start : head.stop - op.extent.start]))
                check_head = None
        elif isinstance(op, ReadStrided):
            _read_strided(source, layout, op, box, target, check, stats)
        else:
            _copy_mapped(source, layout, op, box, target, check, stats)


def _reads_head(ops: Sequence[TensorOp], head: ByteRange) -> bool:
    return any(isinstance(op, ReadInto) and op.extent.start <= head.start for op in ops)


def _read_strided(
    source: Source,
    layout: TensorLayout,
    op: ReadStrided,
    box: Box,
    target: torch.Tensor,
    check: Verifier,
    stats: IOStats,
) -> None:
    scratch = byte_view(thread_scratch("read", op.data.length))
    read_extent(source, op.data, op.extent, op.pieces, scratch, check if op.verify else None, stats)
    raw = torch.frombuffer(scratch, dtype=torch.uint8) if len(scratch) else torch.empty(0, dtype=torch.uint8)
    typed = raw.view(layout.dtype) if raw.numel() else torch.empty(0, dtype=layout.dtype)
    if op.whole_storage:
        view = typed.as_strided(layout.size, layout.stride, layout.storage_offset)
        for d, (o, n) in enumerate(zip(box.offsets, box.lengths)):
            view = view.narrow(d, o, n)
    else:
        view = typed.as_strided(box.lengths, c_strides(layout.size), 0)
    target.copy_(view)


def _copy_mapped(
    source: Source,
    layout: TensorLayout,
    op: MappedCopy,
    box: Box,
    target: torch.Tensor,
    check: Verifier,
    stats: IOStats,
) -> None:
    item = layout.dtype.itemsize
    first_byte = layout.storage.start + layout.storage_offset * item
    nbytes = layout.numel * item
    region = source.window(ByteRange(first_byte, first_byte + nbytes))
    if region is None:
        raise NoWindow(source.path)
    dest = staged = target
    if not op.byte_columns:
        boxed = region.view(layout.dtype).view(layout.size)
        for d, (o, n) in enumerate(zip(box.offsets, box.lengths)):
            boxed = boxed.narrow(d, o, n)
    else:
        # data not aligned to its element size (records torch wrote back to back): bytes into the destination's
        # bytes, the last dimension counted in bytes
        boxed = region.view(*layout.size[:-1], layout.size[-1] * item)
        last = len(layout.size) - 1
        for d, (o, n) in enumerate(zip(box.offsets, box.lengths)):
            boxed = boxed.narrow(d, o * item, n * item) if d == last else boxed.narrow(d, o, n)
        if target.stride(-1) != 1:  # contiguous by torch's rules (a last dimension of 1) but not viewable as bytes
            staged = torch.empty(target.shape, dtype=target.dtype)
        dest = staged.view(torch.uint8)
    if op.mode == "plain":
        dest.copy_(boxed)
        _mapped(stats, source, boxed.numel() * boxed.element_size())
    elif op.mode == "tiles":
        _copy_tiles(source, layout, region, box, boxed, dest, check, stats)
    else:
        _copy_bands(source, layout, box, boxed, dest, check, stats)
    if staged is not target:
        target.copy_(staged)


def _mapped(stats: IOStats, source: Source, nbytes: int) -> None:
    # a file's map is storage the read requests did not count; an in-memory source's bytes were counted as read
    if isinstance(source, FileSource):
        stats.add(mapped=nbytes)


def _copy_tiles(
    source: Source,
    layout: TensorLayout,
    region: torch.Tensor,
    box: Box,
    boxed: torch.Tensor,
    dest: torch.Tensor,
    check: Verifier,
    stats: IOStats,
) -> None:
    """Row group by row group: hash the tiles under the requested columns, then copy the group's rows while those
    bytes are in cache; only those tiles' bytes are touched."""
    tiles = check.tiles
    if tiles is None:
        raise CorruptCheckpointError(f"{check.where}: tile checksums expected but missing")
    item = layout.dtype.itemsize
    strides = c_strides(layout.size)
    lo = sum(o * st for o, st in zip(box.offsets[1:], strides[1:])) * item
    hi = (sum((o + n - 1) * st for o, n, st in zip(box.offsets[1:], box.lengths[1:], strides[1:])) + 1) * item
    s0, s1 = tiles.segments_for(lo, hi)
    data_u8 = region.view(tiles.rows, tiles.row_bytes)
    a, n0 = box.offsets[0], box.lengths[0]
    g_rows = tiles.group_rows
    touched = 0
    for g in range(a // g_rows, -(-(a + n0) // g_rows)):
        touched += tiles.verify(data_u8, g, s0, s1, source.path, check.where)
        r_lo, r_hi = max(a, g * g_rows), min(a + n0, (g + 1) * g_rows)
        dest.narrow(0, r_lo - a, r_hi - r_lo).copy_(boxed.narrow(0, r_lo - a, r_hi - r_lo))
    stats.add(hashed=touched)
    _mapped(stats, source, touched)


def _copy_bands(
    source: Source,
    layout: TensorLayout,
    box: Box,
    boxed: torch.Tensor,
    dest: torch.Tensor,
    check: Verifier,
    stats: IOStats,
) -> None:
    """Block checksums only: bands of rows, each band's blocks hashed in place, then the band copied."""
    sums = check.sums
    if sums is None:
        raise CorruptCheckpointError(f"{check.where}: block checksums expected but missing")
    item = layout.dtype.itemsize
    first_byte = layout.storage.start + layout.storage_offset * item
    rows = layout.size[0] if layout.size else 1
    row_bytes = layout.numel * item // rows if rows else 0
    a, n0 = (box.offsets[0], box.lengths[0]) if layout.size else (0, 1)
    band = max(1, _BAND_BYTES // max(1, row_bytes))
    verified_to = 0  # not first_byte: the block the data starts in may begin before it
    touched = 0
    for r in range(a, a + n0, band):
        r_end = min(a + n0, r + band)
        lo, hi = sums.widen(first_byte + r * row_bytes, first_byte + r_end * row_bytes)
        lo = max(lo, verified_to)
        if hi > lo:
            window = source.window(ByteRange(lo, hi))
            if window is None:
                raise NoWindow(source.path)
            check.blocks([(lo, byte_view(window))], stats)
            touched += hi - lo
            verified_to = hi
        if layout.size:
            dest.narrow(0, r - a, r_end - r).copy_(boxed.narrow(0, r - a, r_end - r))
        else:
            dest.copy_(boxed)
    _mapped(stats, source, touched)
