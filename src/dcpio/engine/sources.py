"""Where the executor reads bytes from: a mover's read handle, or items already fetched into memory.

Both answer the same three questions (read these bytes into these buffers, give me these bytes, show me these bytes
as a tensor without copying), so every operation of a plan runs the same way on a file, an object-store object or a
coalesced fetch held in memory.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dcpio.engine.requests import ByteRange
from dcpio.errors import CorruptCheckpointError
from dcpio.movers.base import ReadHandle
from dcpio.movers.capabilities import Capabilities
from dcpio.tensor_bytes import byte_view

__all__ = ["FileSource", "IOStats", "MemorySource", "Source"]


@dataclass
class IOStats:
    """What one load or save did, for logs and dashboards.

    Attributes:
        bytes_read: bytes that reached storage in read requests (a load).
        bytes_written: bytes written to storage (a save).
        requests: read or write requests sent to the mover.
        bytes_hashed: bytes whose checksums were computed (verified on a load, recorded on a save).
        bytes_mapped: bytes copied out of memory-mapped files instead of read requests.
        files: data files read or written.
        items: stored items (tensor chunks and byte values) moved.
        seconds: wall time of the storage layer's part of the call.

    Example::

        reader = dcpio.FileSystemReader("ckpt/step-100")
        dcp.load(state_dict, storage_reader=reader)
        print(reader.stats.bytes_read, reader.stats.throughput)
    """

    bytes_read: int = 0
    requests: int = 0
    bytes_hashed: int = 0
    bytes_mapped: int = 0
    bytes_written: int = 0
    files: int = 0
    items: int = 0
    seconds: float = 0.0

    def include(self, other: IOStats) -> None:
        """Add what ``other`` counted (a load that runs the engine more than once, as shared reads do)."""
        self.add(read=other.bytes_read, requests=other.requests, hashed=other.bytes_hashed, mapped=other.bytes_mapped)
        with self._lock:
            self.bytes_written += other.bytes_written
            self.files += other.files
            self.items += other.items

    @property
    def throughput(self) -> float:
        """Bytes moved per second (read, written or copied out of a memory map)."""
        moved = self.bytes_read + self.bytes_written + self.bytes_mapped
        return moved / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One line for a log."""
        moved = self.bytes_read + self.bytes_written + self.bytes_mapped
        return (
            f"{moved / 1e6:.1f} MB in {self.seconds:.3f} s ({self.throughput / 1e9:.2f} GB/s), {self.files} files, "
            f"{self.items} items, {self.requests} requests, {self.bytes_hashed / 1e6:.1f} MB checksummed"
        )

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    # a writer travels to torch's async checkpoint process by pickle, with its stats: the lock stays behind
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def add(self, *, read: int = 0, requests: int = 0, hashed: int = 0, mapped: int = 0) -> None:
        with self._lock:
            self.bytes_read += read
            self.requests += requests
            self.bytes_hashed += hashed
            self.bytes_mapped += mapped


class Source:
    """The bytes of one file, addressed by absolute offsets."""

    path: str

    def size(self) -> int:
        raise NotImplementedError

    def readinto_many(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Fill ``buffers`` from consecutive bytes starting at ``offset``."""
        raise NotImplementedError

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto_many(offset, [memoryview(buf)])
        return bytes(buf)

    def window(self, rng: ByteRange) -> torch.Tensor | None:
        """A uint8 tensor over ``rng`` without copying, or None where the bytes cannot be viewed in place."""
        return None


class FileSource(Source):
    """A mover's read handle, with every request counted."""

    def __init__(self, handle: ReadHandle, stats: IOStats) -> None:
        self.handle = handle
        self.path = handle.path
        self._stats = stats
        self.caps: Capabilities = handle.capabilities()  # what the planner may assume of this file, asked once

    def size(self) -> int:
        return self.handle.size()

    def readinto_many(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self.handle.readinto_many(offset, buffers)
        self._stats.add(read=sum(len(b) for b in buffers), requests=1)

    def window(self, rng: ByteRange) -> torch.Tensor | None:
        mapped = self.handle.mapped()
        if mapped is None:
            return None
        if rng.stop > mapped.numel():
            raise CorruptCheckpointError(
                f"{self.path}: bytes [{rng.start}, {rng.stop}) lie past the file's end ({mapped.numel()} bytes); the "
                "file is truncated. Restore it or load an earlier checkpoint."
            )
        return mapped.narrow(0, rng.start, rng.length)


class MemorySource(Source):
    """Bytes ``[base, base + len(data))`` of a file, already in memory (a coalesced fetch, a decoded item)."""

    def __init__(self, path: str, base: int, data: torch.Tensor) -> None:
        self.path = path
        self.base = base
        self._data = data
        self._view = byte_view(data)

    def size(self) -> int:
        return self.base + self._data.numel()

    def _check(self, start: int, stop: int) -> None:
        if start < self.base or stop > self.base + self._data.numel():
            raise CorruptCheckpointError(
                f"{self.path}: bytes [{start}, {stop}) lie outside the item's stored bytes [{self.base}, "
                f"{self.base + self._data.numel()}); the record is damaged. Restore the file or load an earlier "
                "checkpoint."
            )

    def readinto_many(self, offset: int, buffers: Sequence[memoryview]) -> None:
        pos = offset
        for buf in buffers:
            n = len(buf)
            self._check(pos, pos + n)
            buf.cast("B")[:] = self._view[pos - self.base : pos - self.base + n]
            pos += n

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, offset + length)
        return bytes(self._view[offset - self.base : offset - self.base + length])

    def window(self, rng: ByteRange) -> torch.Tensor | None:
        self._check(rng.start, rng.stop)
        return self._data.narrow(0, rng.start - self.base, rng.length)

    def bytes_at(self, rng: ByteRange) -> memoryview:
        """The bytes of ``rng`` as a memoryview slice (no tensor made: small items are served by the hundred)."""
        self._check(rng.start, rng.stop)
        return self._view[rng.start - self.base : rng.stop - self.base]
