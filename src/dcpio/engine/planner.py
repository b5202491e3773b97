"""The read planner: pure functions from what is stored and what is wanted to the I/O operations of a load.

No I/O happens here. Given the stored items, the checksums that cover them, the destinations and a mover's
:class:`~dcpio.engine.requests.Capabilities`, the planner decides

* which items come into memory whole, and which neighbours share one request (:func:`plan_fetches`), and
* for each request on a located tensor, how its bytes travel (:func:`plan_tensor`): straight into the destination,
  through scratch memory, or by a strided copy out of a memory view; with which bytes widened for verification and
  cut into which requests.

Guarantees (tested with Hypothesis in ``tests/test_planner.py``): every requested element is delivered by exactly
one operation, every block that is verified lies wholly inside what is read, and no request exceeds the mover's
``max_span``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from dcpio.engine.requests import (
    Box,
    ByteRange,
    Capabilities,
    Fetch,
    MappedCopy,
    ReadInto,
    ReadStrided,
    StoredItem,
    Target,
    TensorLayout,
    TensorOp,
)
from dcpio.errors import CorruptCheckpointError, PlanMismatchError
from dcpio.integrity.checksum import BlockChecksums
from dcpio.integrity.tiles import TileChecksums

__all__ = ["c_strides", "copies_whole", "plan_fetches", "plan_tensor", "split"]


def c_strides(size: Sequence[int]) -> tuple[int, ...]:
    """Row-major strides of a tensor of ``size``, in elements."""
    strides = [1] * len(size)
    for d in range(len(size) - 2, -1, -1):
        strides[d] = strides[d + 1] * max(size[d + 1], 1)
    return tuple(strides)


# ------------------------------------------------------------------------------------------------------ fetches
def plan_fetches(
    items: Iterable[StoredItem], caps: dict[str, Capabilities], located: set[int]
) -> tuple[list[Fetch], list[StoredItem]]:
    """Split ``items`` into whole-item fetches (neighbours coalesced) and items read in place.

    An item is fetched whole when it must be (``item.whole``) or when it is small for its mover; a small item whose
    layout is already known (``located``: its head is recorded) and that has no neighbour to share a request with is
    read in place instead, straight into its destination.
    """
    small: dict[str, list[StoredItem]] = {}
    in_place: list[StoredItem] = []
    for item in items:
        if item.whole or item.extent.length <= caps[item.path].whole_item_limit:
            small.setdefault(item.path, []).append(item)
        else:
            in_place.append(item)
    fetches: list[Fetch] = []
    for path in sorted(small):
        for run in _coalesce(sorted(small[path], key=lambda it: it.extent.start), caps[path]):
            if len(run) == 1 and not run[0].whole and run[0].key in located:
                in_place.append(run[0])
                continue
            span = ByteRange(run[0].extent.start, max(it.extent.stop for it in run))
            fetches.append(Fetch(path, span, tuple(it.key for it in run)))
    return fetches, in_place


def _coalesce(ordered: list[StoredItem], caps: Capabilities) -> list[list[StoredItem]]:
    runs: list[list[StoredItem]] = []
    stop = -1
    for item in ordered:
        if runs:
            gap = item.extent.start - stop
            span = max(stop, item.extent.stop) - runs[-1][0].extent.start
            if gap <= caps.coalesce_gap and span <= caps.coalesce_span:
                runs[-1].append(item)
                stop = max(stop, item.extent.stop)
                continue
        runs.append([item])
        stop = item.extent.stop
    return runs


# ------------------------------------------------------------------------------------------------------ tensors
def split(extent: ByteRange, step: int) -> tuple[ByteRange, ...]:
    """``extent`` cut into requests of at most ``step`` bytes (the last may be shorter)."""
    if extent.length == 0:
        return ()
    return tuple(ByteRange(a, min(a + step, extent.stop)) for a in range(extent.start, extent.stop, step))


def _widened(data: ByteRange, sums: BlockChecksums | None, verify: bool, where: str) -> ByteRange:
    if not verify or sums is None:
        return data
    lo, hi = sums.widen(data.start, data.stop)
    if lo > data.start or hi < data.stop:
        raise CorruptCheckpointError(
            f"{where}: bytes [{data.start}, {data.stop}) lie outside the checksummed range [{sums.base}, {sums.end});"
            " the metadata is inconsistent with the file. Restore it or load an earlier checkpoint."
        )
    return ByteRange(lo, hi)


def _step(caps: Capabilities, sums: BlockChecksums | None, verify: bool) -> int:
    if not verify or sums is None:
        return caps.max_span
    # whole blocks per request where the limit allows, so each request's bytes are hashed while in cache; a block
    # larger than the limit spans requests and is hashed once its last request is in
    bs = sums.block_size
    step = min(caps.verify_step, caps.max_span)
    return step // bs * bs if step >= bs else step


def check_box(layout: TensorLayout, box: Box, target: Target, where: str) -> None:
    """The box must lie inside the stored chunk and match the destination's shape."""
    if len(box.offsets) != len(layout.size) or any(
        o < 0 or n < 0 or o + n > s for o, n, s in zip(box.offsets, box.lengths, layout.size)
    ):
        raise PlanMismatchError(
            f"{where}: the load asks for offsets {list(box.offsets)} lengths {list(box.lengths)} but the "
            f"stored chunk has shape {list(layout.size)}; the metadata and the data file disagree"
        )
    if target.shape != box.lengths:
        raise PlanMismatchError(
            f"{where}: destination has shape {list(target.shape)}, the plan reads {list(box.lengths)}; "
            "the state dict's tensor does not match the checkpoint"
        )


def copies_whole(layout: TensorLayout, box: Box, target: Target) -> bool:
    """The request wants a C-contiguous stored chunk whole, into a dense destination of its dtype and shape: its
    data moves as one copy of ``layout.storage``, the operation :func:`plan_tensor` plans for it (one
    :class:`ReadInto` of exactly those bytes). Small records fetched by the hundred take this route without building
    the operation."""
    return (
        target.dense
        and target.dtype == layout.dtype
        and target.shape == box.lengths == layout.size
        and not any(box.offsets)
        and layout.storage_offset == 0
        and layout.is_c_contiguous
        and layout.storage.length == layout.numel * layout.dtype.itemsize
    )


def plan_tensor(
    layout: TensorLayout,
    wants: Sequence[tuple[Box, Target]],
    sums: BlockChecksums | None,
    tiles: TileChecksums | None,
    caps: Capabilities,
    verify: bool,
    where: str,
) -> list[TensorOp]:
    """The operations that serve every ``(box, target)`` of one located tensor; request ``i`` is ``wants[i]``."""
    ops: list[TensorOp] = []
    for i, (box, target) in enumerate(wants):
        check_box(layout, box, target, where)
        if math.prod(box.lengths) == 0:
            continue
        ops.append(_plan_request(i, layout, box, target, sums, tiles, caps, verify, len(wants) == 1, where))
    return ops


def _plan_request(
    i: int,
    layout: TensorLayout,
    box: Box,
    target: Target,
    sums: BlockChecksums | None,
    tiles: TileChecksums | None,
    caps: Capabilities,
    verify: bool,
    only: bool,
    where: str,
) -> TensorOp:
    item = layout.dtype.itemsize
    step = _step(caps, sums, verify)
    if not layout.is_c_contiguous:
        extent = _widened(layout.storage, sums, verify, where)
        return ReadStrided(i, layout.storage, extent, split(extent, step), verify and sums is not None, True)
    strides = c_strides(layout.size)
    first = layout.storage_offset + sum(o * s for o, s in zip(box.offsets, strides))
    last = layout.storage_offset + sum((o + n - 1) * s for o, n, s in zip(box.offsets, box.lengths, strides))
    data = ByteRange(layout.storage.start + first * item, layout.storage.start + (last + 1) * item)
    if data.stop > layout.storage.stop:
        raise CorruptCheckpointError(f"{where}: requested bytes reach past the stored tensor")
    checked = verify and sums is not None
    if last + 1 - first == math.prod(box.lengths) and target.dtype == layout.dtype and target.dense:
        extent = _widened(data, sums, verify, where)
        head = layout.head
        cheap = caps.request_bound or (head is not None and extent.stop - head.start <= caps.whole_item_limit)
        if head is not None and only and cheap and data == layout.storage:
            # one request for the record's head, its data and (to finish the last block) its tail, instead of a
            # head read before the data read
            extent = ByteRange(head.start, max(extent.stop, data.stop))
        return ReadInto(i, data, extent, split(extent, step), checked)
    if caps.can_map:
        mapped = _plan_mapped(i, layout, box, target, sums, tiles, verify, where)
        if mapped is not None:
            return mapped
    extent = _widened(data, sums, verify, where)
    return ReadStrided(i, data, extent, split(extent, step), checked, False)


def _plan_mapped(
    i: int,
    layout: TensorLayout,
    box: Box,
    target: Target,
    sums: BlockChecksums | None,
    tiles: TileChecksums | None,
    verify: bool,
    where: str,
) -> MappedCopy | None:
    item = layout.dtype.itemsize
    first_byte = layout.storage.start + layout.storage_offset * item
    byte_columns = first_byte % item != 0
    if byte_columns and not (layout.size and target.dtype == layout.dtype and target.dense):
        return None
    if not verify or sums is None:
        return MappedCopy(i, "plain", byte_columns)
    rows = layout.size[0] if layout.size else 1
    row_bytes = layout.numel * item // rows if rows else 0
    if tiles is not None and len(layout.size) >= 2:
        if tiles.data_start != first_byte or tiles.rows != rows or tiles.row_bytes != row_bytes:
            raise CorruptCheckpointError(
                f"{where}: the tile checksum record says the data is {tiles.rows} rows of {tiles.row_bytes} bytes "
                f"at byte {tiles.data_start}, the record header says {rows} x {row_bytes} at {first_byte}; the "
                "metadata or the data file is damaged. Restore it or load an earlier checkpoint."
            )
        return MappedCopy(i, "tiles", byte_columns)
    a, n = (box.offsets[0], box.lengths[0]) if layout.size else (0, 1)
    lo, hi = sums.widen(first_byte + a * row_bytes, first_byte + (a + n) * row_bytes)
    if lo < sums.base or hi > sums.end or first_byte + (a + n) * row_bytes > sums.end:
        return None
    return MappedCopy(i, "blocks", byte_columns)
