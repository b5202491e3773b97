"""Property tests of the read planner and executor: every requested element arrives, every verified block lies
inside what is read, no request exceeds the mover's limit, and a flipped byte under a verified read is caught."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dcpio.engine.executor import Verifier, run_tensor_ops
from dcpio.engine.planner import c_strides, copies_whole, plan_fetches, plan_tensor
from dcpio.engine.requests import (
    Box,
    ByteRange,
    Capabilities,
    MappedCopy,
    ReadInto,
    ReadStrided,
    StoredItem,
    Target,
    TensorLayout,
)
from dcpio.engine.sources import IOStats, MemorySource, Source
from dcpio.errors import CorruptCheckpointError
from dcpio.integrity.checksum import BlockChecksums, BlockHasher

_DTYPES = [torch.uint8, torch.int16, torch.float32, torch.float64, torch.bfloat16]


@st.composite
def capabilities(draw: st.DrawFn) -> Capabilities:
    return Capabilities(
        max_span=draw(st.integers(1, 4096)),
        verify_step=draw(st.integers(1, 4096)),
        coalesce_gap=draw(st.integers(0, 512)),
        coalesce_span=draw(st.integers(1, 8192)),
        whole_item_limit=draw(st.integers(0, 2048)),
        can_map=draw(st.booleans()),
        request_bound=draw(st.booleans()),
    )


@st.composite
def stored_items(draw: st.DrawFn) -> list[StoredItem]:
    items = []
    for key in range(draw(st.integers(0, 30))):
        start = draw(st.integers(0, 20000))
        length = draw(st.integers(0, 3000))
        path = draw(st.sampled_from(["a", "b"]))
        items.append(StoredItem(key, path, ByteRange(start, start + length), draw(st.booleans())))
    return items


@given(stored_items(), capabilities(), capabilities(), st.data())
def test_every_item_is_fetched_once_or_read_in_place(
    items: list[StoredItem], caps_a: Capabilities, caps_b: Capabilities, data: st.DataObject
) -> None:
    caps = {"a": caps_a, "b": caps_b}
    located = set(data.draw(st.sets(st.integers(0, 30))))
    fetches, in_place = plan_fetches(items, caps, located)
    seen = [key for f in fetches for key in f.keys] + [it.key for it in in_place]
    assert sorted(seen) == sorted(it.key for it in items)
    by_key = {it.key: it for it in items}
    for fetch in fetches:
        for key in fetch.keys:
            item = by_key[key]
            assert item.path == fetch.path and fetch.span.contains(item.extent)
        if len(fetch.keys) > 1:
            assert fetch.span.length <= caps[fetch.path].coalesce_span
    for item in in_place:
        assert not item.whole  # items that must be read whole always come into memory
        small = item.extent.length <= caps[item.path].whole_item_limit
        assert not small or item.key in located


@st.composite
def tensor_cases(draw: st.DrawFn) -> dict[str, object]:
    dtype = draw(st.sampled_from(_DTYPES))
    size = tuple(draw(st.lists(st.integers(1, 7), min_size=0, max_size=3)))
    item = dtype.itemsize
    numel = math.prod(size)
    start = draw(st.integers(0, 64))
    storage = ByteRange(start, start + numel * item)
    offsets, lengths = [], []
    for s in size:
        o = draw(st.integers(0, s - 1))
        offsets.append(o)
        lengths.append(draw(st.integers(1, s - o)))
    target_dtype = draw(st.sampled_from([dtype, torch.float32]))
    dense = draw(st.booleans())
    block = draw(st.integers(1, 64))
    base = draw(st.integers(0, start))
    tail = draw(st.integers(0, 16))
    return {
        "layout": TensorLayout(dtype, size, c_strides(size), 0, storage),
        "box": Box(tuple(offsets), tuple(lengths)),
        "target": (target_dtype, dense),
        "checksums": (block, base, storage.stop + tail),
        "caps": draw(capabilities()),
        "verify": draw(st.booleans()),
        "flip": draw(st.integers(0, 1 << 30)),
    }


def _file(size: int) -> torch.Tensor:
    return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(size))


def _sums(data: torch.Tensor, block: int, base: int, end: int) -> BlockChecksums:
    hasher = BlockHasher(base, block)
    hasher.update(memoryview(data[base:end].numpy().tobytes()))
    return hasher.finish()


def _expected(data: torch.Tensor, layout: TensorLayout, box: Box) -> torch.Tensor:
    raw = data[layout.storage.start : layout.storage.stop].clone()
    whole = raw.view(layout.dtype).view(layout.size) if layout.numel else torch.empty(layout.size, dtype=layout.dtype)
    for d, (o, n) in enumerate(zip(box.offsets, box.lengths)):
        whole = whole.narrow(d, o, n)
    return whole


def _destination(shape: tuple[int, ...], dtype: torch.dtype, dense: bool) -> torch.Tensor:
    if dense or len(shape) < 2:
        return torch.zeros(shape, dtype=dtype)
    return torch.zeros(tuple(reversed(shape)), dtype=dtype).t() if len(shape) == 2 else torch.zeros(shape, dtype=dtype)


class _NoViews(Source):
    def __init__(self, inner: MemorySource) -> None:
        self.inner = inner
        self.path = inner.path

    def size(self) -> int:
        return self.inner.size()

    def readinto_many(self, offset: int, buffers: object) -> None:
        self.inner.readinto_many(offset, buffers)  # type: ignore[arg-type]


_NO_SPLIT = Capabilities(1, 1, 0, 1, 0, can_map=True, request_bound=False)


@settings(max_examples=300, deadline=None)
@given(tensor_cases())
# found by this test: bytes copied out of an unaligned mapped record into a destination whose last dimension is 1
# with a stride of 2 (contiguous to torch, not viewable as bytes); a bfloat16 NaN compared with itself
@example(
    {
        "layout": TensorLayout(torch.int16, (2, 2), (2, 1), 0, ByteRange(1, 9)),
        "box": Box((0, 0), (2, 1)),
        "target": (torch.int16, False),
        "checksums": (1, 0, 9),
        "caps": _NO_SPLIT,
        "verify": False,
        "flip": 0,
    }
)
@example(
    {
        "layout": TensorLayout(torch.bfloat16, (3,), (1,), 0, ByteRange(54, 60)),
        "box": Box((0,), (1,)),
        "target": (torch.bfloat16, False),
        "checksums": (1, 0, 65),
        "caps": dataclasses.replace(_NO_SPLIT, can_map=False),
        "verify": False,
        "flip": 0,
    }
)
def test_planned_reads_deliver_every_element_and_verify_what_they_read(case: dict[str, object]) -> None:
    layout: TensorLayout = case["layout"]  # type: ignore[assignment]
    box: Box = case["box"]  # type: ignore[assignment]
    caps: Capabilities = case["caps"]  # type: ignore[assignment]
    verify: bool = case["verify"]  # type: ignore[assignment]
    block, base, end = case["checksums"]  # type: ignore[misc]
    target_dtype, dense = case["target"]  # type: ignore[misc]
    data = _file(end + 8)
    sums = _sums(data, block, base, end)
    dest = _destination(box.lengths, target_dtype, dense)
    spec = Target(tuple(dest.shape), dest.dtype, dest.is_contiguous())
    ops = plan_tensor(layout, [(box, spec)], sums, None, caps, verify, "t")
    assert len(ops) == (1 if math.prod(box.lengths) else 0)
    for op in ops:
        if isinstance(op, ReadInto | ReadStrided):
            assert op.extent.contains(op.data)
            assert op.pieces[0].start == op.extent.start and op.pieces[-1].stop == op.extent.stop
            assert all(a.stop == b.start for a, b in zip(op.pieces, op.pieces[1:]))  # each byte read once
            assert all(p.length <= caps.max_span for p in op.pieces)
            if op.verify:  # every block the read verifies lies wholly inside it
                assert sums.base <= op.extent.start and op.extent.stop <= sums.end
                assert (op.extent.start - sums.base) % block == 0
                assert (op.extent.stop - sums.base) % block == 0 or op.extent.stop == sums.end
        else:
            assert isinstance(op, MappedCopy) and caps.can_map
    memory = MemorySource("f", 0, data)
    source: Source = memory if caps.can_map else _NoViews(memory)
    check = Verifier(sums, None, "f", "t")
    run_tensor_ops(source, layout, ops, [(box, dest)], check, IOStats(), None)
    # NaN bit patterns are values too: equal as stored, NaN where NaN
    torch.testing.assert_close(dest, _expected(data, layout, box).to(target_dtype), rtol=0, atol=0, equal_nan=True)


@settings(max_examples=200, deadline=None)
@given(tensor_cases(), st.booleans())
def test_copies_whole_is_the_single_read_of_the_storage_the_planner_plans(case: dict[str, object], whole: bool) -> None:
    """The load's shortcut for small records (copy the stored bytes as they are) is taken exactly when the planner
    would plan one read of exactly those bytes into the destination."""
    layout: TensorLayout = case["layout"]  # type: ignore[assignment]
    box: Box = case["box"]  # type: ignore[assignment]
    target_dtype, dense = case["target"]  # type: ignore[misc]
    if whole:  # the whole chunk, into a dense destination of its dtype
        box, target_dtype, dense = Box((0,) * len(layout.size), layout.size), layout.dtype, True
    spec = Target(box.lengths, target_dtype, dense)
    block, base, end = case["checksums"]  # type: ignore[misc]
    sums = _sums(_file(end + 8), block, base, end)
    shortcut = copies_whole(layout, box, spec)
    assert shortcut == (box.lengths == layout.size and target_dtype == layout.dtype and dense)
    if shortcut and layout.numel:
        ops = plan_tensor(layout, [(box, spec)], sums, None, case["caps"], case["verify"], "t")  # type: ignore[arg-type]
        assert len(ops) == 1 and isinstance(ops[0], ReadInto) and ops[0].data == layout.storage


@settings(max_examples=200, deadline=None)
@given(tensor_cases())
def test_a_flipped_byte_under_a_verified_read_is_caught(case: dict[str, object]) -> None:
    layout: TensorLayout = case["layout"]  # type: ignore[assignment]
    box: Box = case["box"]  # type: ignore[assignment]
    caps: Capabilities = case["caps"]  # type: ignore[assignment]
    block, base, end = case["checksums"]  # type: ignore[misc]
    flip: int = case["flip"]  # type: ignore[assignment]
    if not math.prod(box.lengths):
        return
    data = _file(end + 8)
    sums = _sums(data, block, base, end)
    # flip a byte of an element the box delivers
    item = layout.dtype.itemsize
    strides = c_strides(layout.size)
    index = []
    rest = flip
    for o, n in zip(box.offsets, box.lengths):
        index.append(o + rest % n)
        rest //= n
    at = layout.storage.start + sum(i * s for i, s in zip(index, strides)) * item + rest % item
    data[at] ^= 0xFF
    dest = torch.zeros(box.lengths, dtype=layout.dtype)
    spec = Target(tuple(dest.shape), dest.dtype, True)
    ops = plan_tensor(layout, [(box, spec)], sums, None, caps, True, "t")
    memory = MemorySource("f", 0, data)
    source: Source = memory if caps.can_map else _NoViews(memory)
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        run_tensor_ops(source, layout, ops, [(box, dest)], Verifier(sums, None, "f", "t"), IOStats(), None)
