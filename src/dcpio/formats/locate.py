"""Formats locate, the engine moves: where a stored tensor's bytes are, for every layout dcpio reads.

A stored item named by DCP metadata is one of

* a ``torch.save`` record dcpio wrote: its checksum record carries the length and digest of the record's head, so
  with the dtype and shape the metadata promises the layout is known without any I/O (:func:`predict`); the head is
  read with the data (or alone) and checked against that prediction (:func:`head_checker`);
* a ``torch.save`` record torch wrote: its zip directory is walked to find the data (:func:`locate`);
* a tensor of DCP's ``SAFETENSORS`` layout: found by name in the blob's header (:mod:`dcpio.formats.dcp_safetensors`).

The result is a :class:`~dcpio.engine.requests.TensorLayout` with absolute offsets of the source it was located in.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dcpio._torch_compat import _StorageInfo
from dcpio.engine.requests import ByteRange, TensorLayout
from dcpio.engine.sources import Source
from dcpio.errors import CorruptCheckpointError
from dcpio.formats import dcp_safetensors
from dcpio.formats.torch_save import ZIP_MAGIC, TensorRecord, c_strides, parse_tensor_item, parse_verified_head
from dcpio.integrity.checksum import BlockChecksums

__all__ = ["Expected", "check_expected", "check_predicted_head", "head_checker", "is_record", "locate", "predict"]

# (dtype, chunk sizes) the metadata promises for a stored item; None where it does not say
Expected = tuple[torch.dtype, tuple[int, ...]] | None


def has_recorded_head(sums: BlockChecksums | None, offset: int) -> bool:
    """The item is a record dcpio wrote, whose checksummed head alone says where its data is."""
    return sums is not None and sums.head_length > 0 and sums.base == offset


def is_record(source: Source, offset: int, length: int) -> bool:
    """The item at ``offset`` is a ``torch.save`` record (not the start of a SAFETENSORS blob)."""
    return length >= 4 and source.read(offset, 4) == ZIP_MAGIC


def predict(info: _StorageInfo, sums: BlockChecksums | None, expected: Expected) -> TensorLayout | None:
    """The layout of a record dcpio wrote, from its metadata alone (None when it cannot be known without I/O)."""
    if expected is None or info.transform_descriptors or not has_recorded_head(sums, info.offset):
        return None
    assert sums is not None  # has_recorded_head
    dtype, size = expected
    start = info.offset + sums.head_length
    nbytes = math.prod(size) * dtype.itemsize
    if start + nbytes > info.offset + info.length:
        return None
    return TensorLayout(
        dtype, size, c_strides(size), 0, ByteRange(start, start + nbytes), ByteRange(info.offset, start)
    )


def _layout(rec: TensorRecord, data_base: int) -> TensorLayout:
    storage = ByteRange(data_base, data_base + rec.data_length)
    return TensorLayout(rec.dtype, tuple(rec.size), tuple(rec.stride), rec.storage_offset, storage)


def check_expected(layout: TensorLayout | TensorRecord, expected: Expected, where: str) -> None:
    """The record must hold the dtype and chunk shape the metadata promises (catches damaged record headers)."""
    if expected is None:
        return
    dtype, sizes = expected
    if layout.dtype != dtype or tuple(layout.size) != tuple(sizes):
        raise CorruptCheckpointError(
            f"{where}: the stored record holds {layout.dtype} {list(layout.size)} but the metadata says {dtype} "
            f"{list(sizes)}; the data file's record header is damaged (or belongs to another checkpoint). Restore "
            "the file or load an earlier checkpoint."
        )


def check_predicted_head(
    head: bytes, predicted: TensorLayout, item_length: int, sums: BlockChecksums, verify: bool, path: str, where: str
) -> None:
    """A predicted record's head bytes: their digest (when verifying), then the layout they describe must be the
    predicted one."""
    if verify:
        sums.check_head(head, path, where)
    rec = parse_verified_head(head, item_length, where)
    check_expected(rec, (predicted.dtype, predicted.size), where)
    if rec.data_length != predicted.storage.length or rec.storage_offset or not rec.is_c_contiguous:
        raise CorruptCheckpointError(f"{where}: the record's layout does not match its metadata")


def head_checker(
    predicted: TensorLayout, item_length: int, sums: BlockChecksums, verify: bool, path: str, where: str
) -> Callable[[bytes], None]:
    """:func:`check_predicted_head` for one record, to be called with its head bytes once they are read."""

    def check(head: bytes) -> None:
        check_predicted_head(head, predicted, item_length, sums, verify, path, where)

    return check


def locate(
    source: Source,
    info: _StorageInfo,
    fqn: str,
    sums: BlockChecksums | None,
    verify: bool,
    where: str,
    *,
    after_frames: bool = False,
) -> TensorLayout:
    """Find the tensor of ``info`` in ``source`` by reading what its format needs."""
    base, length = info.offset, info.length
    if has_recorded_head(sums, base) and not after_frames:
        assert sums is not None
        head = source.read(base, sums.head_length)
        if verify:
            sums.check_head(head, source.path, where)
        return _layout(parse_verified_head(head, length, where), base + sums.head_length)
    if not after_frames and is_record(source, base, length):
        rec = parse_tensor_item(lambda o, n: source.read(base + o, n), length, where)
        if verify and sums is not None and sums.head_length >= 0:
            # the requested blocks alone cannot vouch for *where* they are: check the header that says so
            if rec.data_offset != sums.head_length:
                raise CorruptCheckpointError(
                    f"{where}: the record says its data starts at byte {rec.data_offset} of the item, the checksum "
                    f"record says {sums.head_length}; the record header is damaged. Restore the file or load an "
                    "earlier checkpoint."
                )
            sums.check_head(source.read(base, sums.head_length), source.path, where)
        return _layout(rec, base + rec.data_offset)
    rec, data_base = dcp_safetensors.locate(source, info, fqn, where, after_frames=after_frames)
    return _layout(rec, data_base)
