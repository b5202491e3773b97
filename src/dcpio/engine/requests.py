"""Typed byte requests: what the read planner is given and what it hands to the executor.

Everything here is plain, frozen data. The planner (:mod:`dcpio.engine.planner`) turns stored items, destination
descriptions and a mover's :class:`~dcpio.movers.capabilities.Capabilities` (declared by its read handles) into
operations; the executor (:mod:`dcpio.engine.executor`) runs
them. Offsets are absolute byte offsets of one file unless a field says otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dcpio.movers.capabilities import Capabilities

__all__ = [
    "Box",
    "ByteRange",
    "Capabilities",
    "Fetch",
    "MappedCopy",
    "ReadInto",
    "ReadStrided",
    "StoredItem",
    "Target",
    "TensorLayout",
    "TensorOp",
]


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Bytes ``[start, stop)`` of one file."""

    start: int
    stop: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.stop:
            raise ValueError(f"invalid byte range [{self.start}, {self.stop})")

    @property
    def length(self) -> int:
        return self.stop - self.start

    def contains(self, other: ByteRange) -> bool:
        return self.start <= other.start and other.stop <= self.stop


@dataclass(frozen=True, slots=True)
class StoredItem:
    """One stored item named by the checkpoint's metadata: where it is and what checks it."""

    key: int  # the caller's handle for the item
    path: str
    extent: ByteRange  # the bytes the metadata names for the item
    whole: bool  # must be read in full (stream transforms, byte values)


@dataclass(frozen=True, slots=True)
class Fetch:
    """One request that brings whole items into memory: ``span`` covers every item in ``keys``."""

    path: str
    span: ByteRange
    keys: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TensorLayout:
    """Where a stored tensor's bytes are and how to view them (what a format's ``locate`` returns).

    ``storage`` is the absolute byte range of the tensor's whole storage; the tensor is
    ``storage.as_strided(size, stride, storage_offset)``. ``head`` is the range of the record's envelope before
    the data when it must be checked against a recorded digest before the data is trusted (None otherwise).
    """

    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    storage: ByteRange
    head: ByteRange | None = None

    @property
    def is_c_contiguous(self) -> bool:
        expected = 1
        for s, st in zip(reversed(self.size), reversed(self.stride)):
            if s != 1 and st != expected:
                return False
            expected *= s
        return True

    @property
    def numel(self) -> int:
        return math.prod(self.size)


@dataclass(frozen=True, slots=True)
class Box:
    """The part of a stored chunk one read request wants: ``offsets`` and ``lengths`` per dimension."""

    offsets: tuple[int, ...]
    lengths: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Target:
    """What the planner needs to know of a destination tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    dense: bool  # a C-contiguous CPU tensor whose bytes the executor can read into directly


@dataclass(frozen=True, slots=True)
class ReadInto:
    """Read ``data`` straight into the destination's bytes.

    ``pieces`` are the requests, in order, that cover ``extent`` (``data`` widened to whole checksum blocks and,
    where the planner chose it, to the record's head); ``verify`` says whether the blocks of ``extent`` are hashed.
    """

    request: int
    data: ByteRange
    extent: ByteRange
    pieces: tuple[ByteRange, ...]
    verify: bool


@dataclass(frozen=True, slots=True)
class ReadStrided:
    """Read ``extent`` into scratch memory and copy the box out of it (a strided box without a memory view)."""

    request: int
    data: ByteRange  # from the box's first element to its last
    extent: ByteRange
    pieces: tuple[ByteRange, ...]
    verify: bool
    whole_storage: bool  # the record is not C-contiguous: ``data`` is its whole storage


@dataclass(frozen=True, slots=True)
class MappedCopy:
    """Copy the box out of the file's memory view, verifying what it touches.

    ``mode``: ``"tiles"`` (column-segment digests of the row groups touched), ``"blocks"`` (block digests of bands
    of rows, hashed in place) or ``"plain"`` (no verification).
    """

    request: int
    mode: str
    byte_columns: bool  # the data is not aligned to its element size: copy bytes into the destination's bytes


TensorOp = ReadInto | ReadStrided | MappedCopy
