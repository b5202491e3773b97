"""The save half of the engine: one task per data file, each item written straight from tensor memory.

Each tensor item is written as a ``torch.save``-compatible record whose envelope dcpio builds itself
(:mod:`dcpio.formats.torch_save`) around the tensor's own memory, handed to the mover's vectored append unchanged, a
slice of rows at a time: each slice is hashed into its checksum blocks (and tiles) and written while it is in the
CPU cache. The SAFETENSORS format's blob is encoded by :mod:`dcpio.formats.dcp_safetensors`. On a failed save every
file the save created is removed before the first error is raised; no worker's error is lost.
"""

from __future__ import annotations

import collections
import functools
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from dcpio import knobs
from dcpio._runtime import gc_paused, raise_first, run_queued
from dcpio._torch_compat import _StorageInfo
from dcpio.engine.sources import IOStats
from dcpio.errors import CheckpointError, CheckpointWriteError
from dcpio.formats import dcp_safetensors
from dcpio.formats.torch_save import encode_envelope
from dcpio.integrity.checksum import ATTRIBUTE, BlockHasher
from dcpio.integrity.tiles import TILE_ATTRIBUTE, TileChecksums, choose_tiling, data_rows, hash_tile_group
from dcpio.movers.base import FileSystemBase, WriteHandle
from dcpio.tensor_bytes import byte_view
from dcpio.transforms import encode

__all__ = ["FileJob", "WriteOptions", "item_name", "write_files", "write_stats"]

# every record starts on a 64-byte boundary of its file (torch.save aligns tensor data to 64 bytes within the
# record), so tensor data is aligned in the file too and a memory map can be viewed as the tensor's dtype
_RECORD_ALIGN = 64


@dataclass(frozen=True)
class FileJob:
    """One data file of a save: its name inside the checkpoint, its full path, and the items it holds."""

    relative_path: str
    path: str
    items: tuple[WriteItem, ...]


@dataclass(frozen=True)
class WriteOptions:
    threads: int
    sync: bool
    extensions: Sequence[Any] = ()
    serialization_format: str = "torch_save"
    checksum_block: int = field(default_factory=knobs.checksum_block_size)
    tiles: bool = field(default_factory=knobs.tile_checksums)
    copy_ahead: int = 10_000_000


def item_name(index: MetadataIndex) -> str:
    if index.offset is not None and any(index.offset):
        return f"{index.fqn} (chunk at {list(index.offset)})"
    return index.fqn


def _cpu_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.to("cpu")
    if tensor.is_conj() or tensor.is_neg():  # lazy views: their raw memory is not their value
        tensor = tensor.resolve_conj().resolve_neg()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return tensor


def _resolved(items: Sequence[WriteItem], planner: SavePlanner, copy_ahead: int) -> Iterator[tuple[WriteItem, Any]]:
    """Yield ``(item, data)`` in order; accelerator tensors are copied to pinned CPU memory ahead of their write.

    Up to ``copy_ahead`` bytes of device-to-host copies are in flight while earlier items are written, so the copy
    engine and the disk work at the same time (torch's writer does this only with one thread; here every writer
    thread does it for its own file). CPU tensors pass through untouched.
    """
    pending: collections.deque[tuple[WriteItem, Any, Any, int]] = collections.deque()
    inflight = 0
    for item in items:
        data = planner.resolve_data(item)
        if not (isinstance(data, torch.Tensor) and data.device.type == "cuda" and copy_ahead > 0):
            while pending:  # keep the file's item order
                yield _landed(pending.popleft())
            inflight = 0
            yield item, data
            continue
        src = data.detach()
        if not src.is_contiguous():
            src = src.contiguous()
        # this runs on a writer thread, whose current CUDA device is 0 whatever the training thread set: the
        # event must be recorded on the stream of the tensor's own device, or it would not wait for the copy
        with torch.cuda.device(src.device):
            host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            host.copy_(src, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(torch.cuda.current_stream(src.device))
        nbytes = src.numel() * src.element_size()
        pending.append((item, host, event, nbytes))
        inflight += nbytes
        while inflight > copy_ahead and len(pending) > 1:
            landed = pending.popleft()
            inflight -= landed[3]
            yield _landed(landed)
    while pending:
        yield _landed(pending.popleft())


def _landed(entry: tuple[WriteItem, Any, Any, int]) -> tuple[WriteItem, Any]:
    item, host, event, _ = entry
    event.synchronize()
    return item, host


def _write_one_file(fs: FileSystemBase, job: FileJob, planner: SavePlanner, opts: WriteOptions) -> list[WriteResult]:
    handle = fs.open_writer(job.path)
    try:
        results = _write_items(handle, job, planner, opts)
        if opts.sync:
            handle.sync()
        handle.close()
    except BaseException:
        handle.abort()
        raise
    return results


def _write_items(handle: WriteHandle, job: FileJob, planner: SavePlanner, opts: WriteOptions) -> list[WriteResult]:
    results: list[WriteResult] = []
    safetensors_items: list[tuple[WriteItem, torch.Tensor]] = []
    # bytes items first, like torch, so a file's small objects sit together at its start
    ordered = sorted(job.items, key=lambda it: it.type != WriteItemType.BYTE_IO)
    for item, data in _resolved(ordered, planner, opts.copy_ahead):
        if item.type == WriteItemType.BYTE_IO:
            if not isinstance(data, io.BytesIO):
                raise CheckpointWriteError(
                    f"{job.path}: planner returned {type(data).__name__} for bytes item '{item.index.fqn}'"
                )
            results.append(_write_item(handle, job, item, [data.getbuffer()], None, opts))
            continue
        if not isinstance(data, torch.Tensor):
            raise CheckpointWriteError(
                f"{job.path}: planner returned {type(data).__name__} for tensor item '{item.index.fqn}'"
            )
        tensor = _cpu_contiguous(data)
        if opts.serialization_format == "safetensors":
            safetensors_items.append((item, tensor))
            continue
        head, tail = encode_envelope(tensor.dtype, tuple(tensor.shape))
        pieces = [memoryview(head), byte_view(tensor), memoryview(tail)]
        results.append(_write_item(handle, job, item, pieces, tensor, opts))
    if safetensors_items:
        results += dcp_safetensors.write_blob(handle, job.relative_path, safetensors_items, opts.checksum_block)
    return results


def _write_item(
    handle: WriteHandle,
    job: FileJob,
    item: WriteItem,
    pieces: list[memoryview],
    tensor: torch.Tensor | None,
    opts: WriteOptions,
) -> WriteResult:
    """Append one item (a tensor's record, or a bytes value) on a 64-byte boundary, with its checksum records."""
    if opts.extensions:
        pieces = [memoryview(p) for p in encode(opts.extensions, pieces)]
    pad = -handle.tell() % _RECORD_ALIGN
    if pad:
        handle.write([memoryview(bytes(pad))])
    offset = handle.tell()
    hasher = BlockHasher(offset, opts.checksum_block)
    tiles: TileChecksums | None = None
    if not opts.extensions and tensor is not None:
        length, tiles = _write_record(handle, pieces, tensor, hasher, offset + len(pieces[0]), opts)
    else:
        for piece in pieces:
            hasher.update(piece)
        length = handle.write(pieces)
    descriptors = [ext.get_descriptor() for ext in reversed(opts.extensions)] or None
    info = _StorageInfo(job.relative_path, offset, length, transform_descriptors=descriptors)
    sums = hasher.finish()
    if tensor is not None and not opts.extensions:
        sums = sums.with_head(pieces[0])
    setattr(info, ATTRIBUTE, sums.to_record())
    if tiles is not None:
        setattr(info, TILE_ATTRIBUTE, tiles.to_record())
    return WriteResult(index=item.index, size_in_bytes=length, storage_data=info)


def _write_record(
    handle: WriteHandle,
    pieces: list[memoryview],
    tensor: torch.Tensor,
    hasher: BlockHasher,
    data_start: int,
    opts: WriteOptions,
) -> tuple[int, TileChecksums | None]:
    """Write one tensor record (head, data, tail) a slice of rows at a time: each slice is hashed into its checksum
    blocks and tiles and written while it is in the CPU cache, so the tensor streams from memory once instead of once
    per pass (block hashes, tile gather, write). Returns the bytes written and the tile checksums (None when the
    tensor gets none)."""
    head, data, tail = pieces
    tiling = choose_tiling(tuple(tensor.shape), tensor.element_size(), opts.checksum_block) if opts.tiles else None
    digests = bytearray()
    if tiling is not None:
        segments, group_rows = tiling
        rows_u8 = data_rows(tensor)
        step = group_rows * rows_u8.shape[1]
    else:
        step = knobs.write_slice_bytes()
    hasher.update(head)
    lead = [head]
    written = 0
    for pos in range(0, max(len(data), 1), step):
        piece = data[pos : pos + step]
        hasher.update(piece)
        if tiling is not None:
            row_bytes = rows_u8.shape[1]
            digests += hash_tile_group(rows_u8.narrow(0, pos // row_bytes, len(piece) // row_bytes), segments)
        last = pos + step >= len(data)
        if last:
            hasher.update(tail)
        written += handle.write([*lead, piece, tail] if last else [*lead, piece])
        lead = []
    if tiling is None:
        return written, None
    rows, row_bytes = rows_u8.shape
    return written, TileChecksums(data_start, rows, row_bytes, segments, group_rows, bytes(digests))


def write_files(
    fs: FileSystemBase, jobs: Sequence[FileJob], planner: SavePlanner, opts: WriteOptions
) -> list[WriteResult]:
    """Write every job's file; on any failure remove all of this save's files and raise the first error."""
    per_job: list[list[WriteResult]] = [[] for _ in jobs]
    not_ours: set[int] = set()  # files whose name was taken: the entry there is someone else's, never removed

    def write_one(i: int) -> None:
        try:
            per_job[i] = _write_one_file(fs, jobs[i], planner, opts)
        except BaseException as err:  # named after its file, then rolled back and re-raised by the caller
            if isinstance(err, FileExistsError):
                not_ours.add(i)
            named = _name_file(err, jobs[i].path)
            if named is err:
                raise
            raise named from err

    with gc_paused():
        tasks = [functools.partial(write_one, i) for i in range(len(jobs))]
        errors = run_queued(tasks, opts.threads, keep_going=False, name="dcpio-w")
    if errors:
        for i, job in enumerate(jobs):
            if i not in not_ours:
                fs.remove_quietly(job.path)
        raise_first(errors)
    return [result for results in per_job for result in results]


def _name_file(err: BaseException, path: str) -> BaseException:
    if isinstance(err, CheckpointError | OSError) or not isinstance(err, Exception):
        return err
    wrapped = CheckpointWriteError(f"{path}: writing failed: {type(err).__name__}: {err}")
    wrapped.__cause__ = err
    return wrapped


def write_stats(results: Sequence[WriteResult], files: int, seconds: float) -> IOStats:
    """What a save's ``write_data`` did: every item is written once and checksummed as it is written."""
    written = sum(r.size_in_bytes for r in results)
    return IOStats(
        bytes_written=written,
        bytes_hashed=written,
        files=files,
        items=len(results),
        seconds=seconds,
        requests=files,
    )
