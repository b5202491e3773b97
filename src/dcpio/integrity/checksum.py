"""Block checksums: XXH3-64 over fixed-size blocks of each item's stored bytes.

Why XXH3: measured here at 25 GB/s on one core (CRC32C: 15 GB/s, zlib's CRC32: 3.8 GB/s) and the ``xxhash``
binding releases the GIL, so hashing overlaps the other thread's I/O. Why blocks: a resharding load reads part of a
stored item; whole-item checksums would force reading all of it. With blocks, a partial read widens to block
boundaries (at most one block on each side) and verifies exactly what it read.

Where it is recorded: as an extra attribute ``dcpio_checksum`` on torch's own ``_StorageInfo`` objects in
``.metadata``. Pickle restores extra instance attributes as they are, so torch's reader (which knows nothing of it)
loads dcpio checkpoints unchanged, while dcpio's reader finds and checks it. The record is a plain tuple
``("xxh3-64", block_size, base, length, digests)``: ``base`` is the absolute file offset the blocks start at,
``length`` the bytes covered, ``digests`` 8 big-endian bytes per block.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import xxhash

from dcpio.errors import CorruptCheckpointError

__all__ = ["ALGORITHM", "ATTRIBUTE", "BlockChecksums", "BlockHasher", "verify_pieces"]

ALGORITHM = "xxh3-64"
ATTRIBUTE = "dcpio_checksum"
_DIGEST = 8
_MAX_INT = 1 << 62  # untrusted integers: far beyond any file, far below what breaks int -> str


@dataclass(frozen=True)
class BlockChecksums:
    """Checksums of ``[base, base + length)`` of one file, one per ``block_size`` bytes (the last may be short)."""

    block_size: int
    base: int
    length: int
    digests: bytes
    # for torch.save records: length and digest of the envelope before the tensor data (zip headers and the pickle
    # that says dtype/shape/where the data starts), so a partial read can trust where it reads from
    head_length: int = -1
    head_digest: bytes = b""

    def to_record(self) -> tuple[Any, ...]:
        record: tuple[Any, ...] = (ALGORITHM, self.block_size, self.base, self.length, self.digests)
        if self.head_length >= 0:
            record += (self.head_length, self.head_digest)
        return record

    def with_head(self, head: memoryview | bytes) -> BlockChecksums:
        return BlockChecksums(
            self.block_size, self.base, self.length, self.digests, len(head), xxhash.xxh3_64_digest(head)
        )

    def check_head(self, head: bytes, path: str, item: str) -> None:
        """Verify the envelope head read from storage against the recorded digest."""
        if self.head_length < 0:
            return
        if len(head) != self.head_length or xxhash.xxh3_64_digest(head) != self.head_digest:
            raise CorruptCheckpointError(
                f"{path}: checksum mismatch in the record header (bytes [{self.base}, {self.base + self.head_length}))"
                f" ({item}): the tensor's dtype, shape or data offset on storage is not what was saved. Restore "
                "the file from a good copy or load an earlier checkpoint; `dcpio verify` lists every damaged tensor."
            )

    @staticmethod
    def records_head(record: object) -> bool:
        """Whether a metadata record (unvalidated) carries a header digest: the 7-field form of :meth:`from_record`."""
        return isinstance(record, tuple) and len(record) == 7

    @classmethod
    def from_record(cls, record: object, where: str) -> BlockChecksums:
        """Validate a record read from metadata (untrusted) and build the object."""
        ok = (
            isinstance(record, tuple)
            and len(record) in (5, 7)
            and record[0] == ALGORITHM
            and all(type(v) is int and 0 <= v < _MAX_INT for v in record[1:4])
            and isinstance(record[4], bytes)
            and (len(record) == 5 or (type(record[5]) is int and record[5] < _MAX_INT and isinstance(record[6], bytes)))
        )
        if not ok:
            raise CorruptCheckpointError(
                f"{where}: the checksum record in .metadata is malformed ({type(record).__name__}); "
                "the metadata is damaged. Load with verify_checksums=False only if you trust the data."
            )
        rec = cast("tuple[Any, ...]", record)
        block_size, base, length, digests = rec[1], rec[2], rec[3], rec[4]
        blocks = -(-length // block_size) if block_size > 0 else -1
        if block_size <= 0 or base < 0 or length < 0 or len(digests) != _DIGEST * blocks:
            raise CorruptCheckpointError(
                f"{where}: the checksum record in .metadata is inconsistent (block_size={block_size}, "
                f"length={length}, {len(digests)} digest bytes); the metadata is damaged."
            )
        if len(rec) == 7:
            head_length, head_digest = rec[5], rec[6]
            if head_length < 0 or head_length > length or len(head_digest) != _DIGEST:
                raise CorruptCheckpointError(f"{where}: the checksum record's header digest is malformed")
            return cls(block_size, base, length, digests, head_length, head_digest)
        return cls(block_size, base, length, digests)

    @property
    def end(self) -> int:
        return self.base + self.length

    def digest(self, block: int) -> bytes:
        return self.digests[block * _DIGEST : (block + 1) * _DIGEST]

    def widen(self, start: int, stop: int) -> tuple[int, int]:
        """The smallest block-aligned range covering ``[start, stop)`` (absolute offsets, clipped to the record)."""
        bs = self.block_size
        lo = self.base + ((start - self.base) // bs) * bs
        hi = min(self.end, self.base + (-(-(stop - self.base) // bs)) * bs)
        return max(lo, self.base), hi


class BlockHasher:
    """Feeds bytes in order and cuts them into blocks; ``finish()`` returns the :class:`BlockChecksums`."""

    def __init__(self, base: int, block_size: int) -> None:
        self._base = base
        self._block_size = block_size
        self._state = xxhash.xxh3_64()
        self._in_block = 0
        self._total = 0
        self._digests = bytearray()

    def update(self, data: memoryview) -> None:
        bs = self._block_size
        pos = 0
        n = len(data)
        while pos < n:
            if self._in_block == 0 and n - pos >= bs:
                # whole blocks straight from the caller's memory: one call each, no state object churn
                self._digests += xxhash.xxh3_64_digest(data[pos : pos + bs])
                pos += bs
                continue
            take = min(bs - self._in_block, n - pos)
            self._state.update(data[pos : pos + take])
            self._in_block += take
            pos += take
            if self._in_block == bs:
                self._digests += self._state.digest()
                self._state.reset()
                self._in_block = 0
        self._total += n

    def finish(self) -> BlockChecksums:
        if self._in_block:
            self._digests += self._state.digest()
            self._state.reset()
            self._in_block = 0
        return BlockChecksums(self._block_size, self._base, self._total, bytes(self._digests))


def _iter_block_slices(pieces: Sequence[tuple[int, memoryview]], lo: int, hi: int) -> Iterable[memoryview]:
    for start, view in pieces:
        stop = start + len(view)
        a, b = max(start, lo), min(stop, hi)
        if a < b:
            yield view[a - start : b - start]


def _mismatch(path: str, lo: int, hi: int, item: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path}: checksum mismatch in bytes [{lo}, {hi}) ({item}): the data on storage is not what was saved (disk "
        "or transfer corruption). Restore the file from a good copy or load an earlier checkpoint; `dcpio verify` "
        "lists every damaged tensor."
    )


def _verify_all(checksums: BlockChecksums, data: memoryview, path: str, item: str) -> None:
    # the whole checksummed range in one buffer (an item fetched whole): block by block, no piece bookkeeping
    bs = checksums.block_size
    for block, lo in enumerate(range(0, len(data), bs)):
        if xxhash.xxh3_64_digest(data[lo : lo + bs]) != checksums.digest(block):
            start = checksums.base + lo
            raise _mismatch(path, start, min(start + bs, checksums.end), item)


def verify_pieces(
    checksums: BlockChecksums,
    pieces: Sequence[tuple[int, memoryview]],
    path: str,
    item: str,
) -> None:
    """Check every block that ``pieces`` (``(absolute offset, bytes)``, contiguous, in order) fully cover.

    The caller widened its read to block boundaries, so every block it touched is covered. Raises
    :class:`CorruptCheckpointError` naming the file, the item and the byte range of the first bad block.
    """
    if not pieces:
        return
    if len(pieces) == 1 and pieces[0][0] == checksums.base and len(pieces[0][1]) == checksums.length:
        _verify_all(checksums, pieces[0][1], path, item)
        return
    first = pieces[0][0]
    last = pieces[-1][0] + len(pieces[-1][1])
    bs = checksums.block_size
    block = max(0, (first - checksums.base) // bs)
    while True:
        lo = checksums.base + block * bs
        hi = min(lo + bs, checksums.end)
        if lo >= last or lo >= checksums.end:
            break
        if lo >= first and hi <= last:
            parts = list(_iter_block_slices(pieces, lo, hi))
            if len(parts) == 1:
                digest = xxhash.xxh3_64_digest(parts[0])
            else:
                state = xxhash.xxh3_64()
                for part in parts:
                    state.update(part)
                digest = state.digest()
            if digest != checksums.digest(block):
                raise _mismatch(path, lo, hi, item)
        block += 1
