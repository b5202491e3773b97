"""The I/O engine: moves the bytes of every item of a save or load plan, in parallel, zero-copy where it can.

The writer and reader (protocol classes) decide *what* goes *where*; this module does the moving:

* **Save**: one task per data file on a bounded pool of threads. Each tensor item is written as a
  ``torch.save``-compatible record whose envelope dcpio builds itself (:mod:`dcpio.formats.torch_save`) around the
  tensor's own memory, handed to ``os.writev`` unchanged, 2 MiB of rows at a time: each slice is hashed into its
  checksum blocks (and tiles) and written while it is in the CPU cache.
* **Load**: requests are grouped by stored item; each group parses the item's header once, then reads only the byte
  range each request needs (widened to checksum blocks), straight into the destination tensor when it is a
  contiguous CPU tensor of the stored dtype. A strided box (a column slice) on a local file is copied out of a
  memory map, verified tile by tile (:mod:`dcpio.integrity.tiles`); elsewhere it goes through a scratch buffer.
  Neighbouring small records share one read (one ``preadv`` locally, one ranged GET on object stores, where a
  whole record is also one request). Read workers take their tasks from a shared queue, small batches first.

Every worker exception reaches the caller: a load runs every task and raises the first error with the others
attached as notes; on a failed save every file the save created is removed before the first error is raised.
"""

from __future__ import annotations

import collections
import functools
import io
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlanner,
    ReadItem,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult

from dcpio import knobs
from dcpio._runtime import gc_paused, raise_first, run_queued
from dcpio.errors import CheckpointError, CheckpointWriteError, CorruptCheckpointError, PlanMismatchError
from dcpio.formats.torch_save import (
    ZIP_MAGIC,
    TensorRecord,
    c_strides,
    encode_envelope,
    parse_tensor_item,
    parse_verified_head,
)
from dcpio.integrity.checksum import ATTRIBUTE, BlockChecksums, BlockHasher, verify_pieces
from dcpio.integrity.tiles import TILE_ATTRIBUTE, TileChecksums, choose_tiling, data_rows, hash_tile_group
from dcpio.movers.base import FileSystemBase, ReadHandle, WriteHandle
from dcpio.movers.local import count_mapped
from dcpio.tensor_bytes import byte_view, is_dense_cpu, thread_scratch
from dcpio.transforms import apply_decode, decode_limit, encode

__all__ = ["FileJob", "ReadOptions", "WriteOptions", "read_plan", "write_files"]

# every record starts on a 64-byte boundary of its file (torch.save aligns tensor data to 64 bytes within the
# record), so tensor data is aligned in the file too and a memory map can be viewed as the tensor's dtype
_RECORD_ALIGN = 64
_WRITE_SLICE = 2 << 20  # bytes of a record hashed and written per step: cache-resident between the two
_VERIFY_CHUNK = 4 << 20  # bytes read per system call when verifying: a few checksum blocks, still cache-resident
_SMALL_ITEM = 256 << 10  # items up to this size are read with one call and parsed in memory
_COALESCE_GAP = 64 << 10  # neighbouring small records this close share one read
_LOCAL_SPAN = 1 << 20  # local files: at most this many bytes per shared read


# ======================================================================================================== save
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


def _item_name(index: MetadataIndex) -> str:
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
            event = torch.cuda.Event()
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
    from dcpio.formats import dcp_safetensors  # local: only the SAFETENSORS format needs it

    handle = fs.open_writer(job.path)
    results: list[WriteResult] = []
    descriptors = [ext.get_descriptor() for ext in reversed(opts.extensions)] or None
    safetensors_items: list[tuple[WriteItem, torch.Tensor]] = []
    try:
        # bytes items first, like torch, so a file's small objects sit together at its start
        ordered = sorted(job.items, key=lambda it: it.type != WriteItemType.BYTE_IO)
        for item, data in _resolved(ordered, planner, opts.copy_ahead):
            keepalive: Any
            tiles: TileChecksums | None = None
            if item.type == WriteItemType.BYTE_IO:
                if not isinstance(data, io.BytesIO):
                    raise CheckpointWriteError(
                        f"{job.path}: planner returned {type(data).__name__} for bytes item '{item.index.fqn}'"
                    )
                keepalive = data
                pieces: list[memoryview] = [data.getbuffer()]
            else:
                if not isinstance(data, torch.Tensor):
                    raise CheckpointWriteError(
                        f"{job.path}: planner returned {type(data).__name__} for tensor item '{item.index.fqn}'"
                    )
                tensor = _cpu_contiguous(data)
                if opts.serialization_format == "safetensors":
                    safetensors_items.append((item, tensor))
                    continue
                keepalive = tensor
                head, tail = encode_envelope(tensor.dtype, tuple(tensor.shape))
                pieces = [memoryview(head), byte_view(tensor), memoryview(tail)]
            if opts.extensions:
                pieces = [memoryview(p) for p in encode(opts.extensions, pieces)]
            pad = -handle.tell() % _RECORD_ALIGN
            if pad:
                handle.write([memoryview(bytes(pad))])
            offset = handle.tell()
            hasher = BlockHasher(offset, opts.checksum_block)
            if not opts.extensions and isinstance(keepalive, torch.Tensor):
                length, tiles = _write_record(handle, pieces, keepalive, hasher, offset + len(pieces[0]), opts)
            else:
                for piece in pieces:
                    hasher.update(piece)
                length = handle.write(pieces)
            del keepalive
            info = _StorageInfo(job.relative_path, offset, length, transform_descriptors=descriptors)
            sums = hasher.finish()
            if item.type != WriteItemType.BYTE_IO and not opts.extensions:
                sums = sums.with_head(pieces[0])
            setattr(info, ATTRIBUTE, sums.to_record())
            if tiles is not None:
                setattr(info, TILE_ATTRIBUTE, tiles.to_record())
            results.append(WriteResult(index=item.index, size_in_bytes=length, storage_data=info))
        if safetensors_items:
            results += dcp_safetensors.write_blob(handle, job.relative_path, safetensors_items, opts.checksum_block)
        if opts.sync:
            handle.sync()
        handle.close()
    except BaseException:
        handle.abort()
        raise
    return results


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
        step = _WRITE_SLICE
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

    def write_one(i: int) -> None:
        try:
            per_job[i] = _write_one_file(fs, jobs[i], planner, opts)
        except BaseException as err:  # named after its file, then rolled back and re-raised by the caller
            named = _name_file(err, jobs[i].path)
            if named is err:
                raise
            raise named from err

    with gc_paused():
        tasks = [functools.partial(write_one, i) for i in range(len(jobs))]
        errors = run_queued(tasks, opts.threads, keep_going=False, name="dcpio-w")
    if errors:
        for job in jobs:
            fs.remove_quietly(job.path)
        raise_first(errors)
    return [result for results in per_job for result in results]


def _name_file(err: BaseException, path: str) -> BaseException:
    if isinstance(err, CheckpointError | OSError) or not isinstance(err, Exception):
        return err
    wrapped = CheckpointWriteError(f"{path}: writing failed: {type(err).__name__}: {err}")
    wrapped.__cause__ = err
    return wrapped


# ======================================================================================================== load
@dataclass(frozen=True)
class ReadOptions:
    threads: int
    verify: bool
    registry: Any
    root: str
    # (dtype, chunk sizes) the metadata promises for a stored item; None when it does not say
    expected: Callable[[MetadataIndex], tuple[torch.dtype, tuple[int, ...]] | None] = lambda index: None


@dataclass
class _Group:
    """All read requests that hit one stored item."""

    info: _StorageInfo
    requests: list[ReadItem] = field(default_factory=list)


def _checksums(info: _StorageInfo, where: str) -> BlockChecksums | None:
    record = getattr(info, ATTRIBUTE, None)
    return None if record is None else BlockChecksums.from_record(record, where)


def _read_verified(
    handle: ReadHandle,
    start: int,
    stop: int,
    dest: memoryview | None,
    sums: BlockChecksums | None,
    verify: bool,
    where: str,
) -> memoryview:
    """Bytes ``[start, stop)`` of the file, into ``dest`` when given, checked against ``sums``."""
    if dest is None:
        dest = memoryview(bytearray(stop - start))
    if not verify or sums is None:
        handle.readinto(start, dest)
        return dest
    lo, hi = sums.widen(start, stop)
    if lo > start or hi < stop:
        raise CorruptCheckpointError(
            f"{where}: bytes [{start}, {stop}) lie outside the checksummed range [{sums.base}, {sums.end}); "
            "the metadata is inconsistent with the file"
        )
    lead = memoryview(bytearray(start - lo))
    trail = memoryview(bytearray(hi - stop))
    pieces = [(lo, lead), (start, dest), (stop, trail)]
    if handle.prefers_large_reads:
        # object stores: one request for the whole range, then the hash pass
        handle.readinto_many(lo, [lead, dest, trail])
        verify_pieces(sums, pieces, handle.path, where)
        return dest
    # local files: read one checksum block at a time and hash it while it is still in the CPU cache; a hash pass
    # over the whole tensor after reading it would stream it from DRAM a second time
    # a few blocks per system call: each call hands the GIL back and forth, and the bytes still fit the cache
    step = max(sums.block_size, (_VERIFY_CHUNK // sums.block_size) * sums.block_size)
    for b0 in range(lo, hi, step):
        b1 = min(b0 + step, hi)
        parts = [
            (max(b0, off), view[max(b0, off) - off : min(b1, off + len(view)) - off])
            for off, view in pieces
            if off < b1 and off + len(view) > b0
        ]
        handle.readinto_many(b0, [view for _, view in parts])
        verify_pieces(sums, parts, handle.path, where)
    return dest


def _load_tensor_group(
    fs: FileSystemBase,
    path: str,
    group: _Group,
    targets: dict[int, torch.Tensor],
    opts: ReadOptions,
    handles: Callable[[str], ReadHandle],
) -> None:
    info = group.info
    fqn = group.requests[0].storage_index.fqn
    where = _tensor_where(group)
    sums = _checksums(info, where)
    handle = handles(path)
    base = info.offset

    if base + info.length > handle.size():
        raise CorruptCheckpointError(
            f"{where}: the item spans bytes [{base}, {base + info.length}) but {path} has {handle.size()} bytes; "
            "the file is truncated. Restore it or load an earlier checkpoint."
        )
    if info.transform_descriptors:
        stored = _read_verified(handle, base, base + info.length, None, sums, opts.verify, where)
        decode_error: CheckpointError | None = None
        try:
            raw = _decode(opts, info, bytes(stored), where, group.requests[0].storage_index)
        except CheckpointError as err:
            raw, decode_error = bytearray(), err
        if raw[:4] == ZIP_MAGIC:
            _copy_from_record_bytes(memoryview(raw), group, targets, where, opts)
            return
        if raw:
            raise CorruptCheckpointError(f"{where}: decoded item is not a torch.save record")
        # torch's SAFETENSORS layout with a transform: an empty frame stands where the tensor would be
        from dcpio.formats import dcp_safetensors

        try:
            rec, data_base = dcp_safetensors.locate(handle, info, fqn, where, after_frames=True)
        except CheckpointError:
            if decode_error is not None:
                raise decode_error from None
            raise
        _check_expected(rec, group.requests[0].storage_index, opts, where)
        for req in group.requests:
            _read_request(handle, rec, data_base, req, targets[id(req)], None, opts.verify, where)
        return
    if (
        sums is not None
        and sums.head_length > 0
        and sums.base == base
        and _read_whole_record(handle, info, sums, group, targets, opts, where)
    ):
        return
    if info.length <= _SMALL_ITEM:
        # one read for the whole record instead of header, directory and data reads: small items are syscall-bound
        stored = memoryview(bytearray(info.length))
        handle.readinto(base, stored)
        if _serve_stored_record(stored, group, sums, targets, opts, handle.path, where):
            return

    if sums is not None and sums.head_length > 0 and sums.base == base:
        # a record dcpio wrote: its checksummed head alone says where the data is (one small read); without
        # verification too, as in _read_whole_record: the head parser checks the structure it relies on
        head = handle.read(base, sums.head_length)
        rec = _dcpio_head(head, sums, info.length, group.requests[0].storage_index, opts, handle.path, where)
        tiles = _tile_sums_of(info, where)
        for req in group.requests:
            target = targets[id(req)]
            _read_request(handle, rec, base + rec.data_offset, req, target, sums, opts.verify, where, tiles)
        return
    magic = handle.read(base, 4) if info.length >= 4 else b""
    if magic == ZIP_MAGIC:
        rec = parse_tensor_item(lambda o, n: handle.read(base + o, n), info.length, where)
        if opts.verify and sums is not None and sums.head_length >= 0:
            # the requested blocks alone cannot vouch for *where* they are: check the header that says so
            if rec.data_offset != sums.head_length:
                raise CorruptCheckpointError(
                    f"{where}: the record says its data starts at byte {rec.data_offset} of the item, the checksum "
                    f"record says {sums.head_length}; the record header is damaged. Restore the file or load an "
                    "earlier checkpoint."
                )
            sums.check_head(handle.read(base, sums.head_length), handle.path, where)
        data_base = base + rec.data_offset
    else:
        from dcpio.formats import dcp_safetensors

        rec, data_base = dcp_safetensors.locate(handle, info, fqn, where)
    _check_expected(rec, group.requests[0].storage_index, opts, where)
    for req in group.requests:
        _read_request(handle, rec, data_base, req, targets[id(req)], sums, opts.verify, where)


def _tensor_where(group: _Group) -> str:
    return f"{group.info.relative_path}: tensor '{_item_name(group.requests[0].storage_index)}'"


def _serve_stored_record(
    stored: memoryview,
    group: _Group,
    sums: BlockChecksums | None,
    targets: dict[int, torch.Tensor],
    opts: ReadOptions,
    path: str,
    where: str,
) -> bool:
    """Serve ``group`` from its whole stored item, already in memory: verify its blocks, then copy out of the
    ``torch.save`` record. False (nothing done) when the item is not a ``torch.save`` record."""
    if stored[:4] != ZIP_MAGIC:
        return False
    if opts.verify and sums is not None:
        verify_pieces(sums, [(group.info.offset, stored)], path, where)
    if sums is not None and 0 < sums.head_length <= len(stored) and sums.base == group.info.offset:
        # a record dcpio wrote: its (checked) head locates the data, no directory walk
        head = bytes(stored[: sums.head_length])
        rec = _dcpio_head(head, sums, len(stored), group.requests[0].storage_index, opts, path, where)
        if _copy_whole(stored, rec, group, targets):
            return True
    _copy_from_record_bytes(stored, group, targets, where, opts)
    return True


def _copy_whole(stored: memoryview, rec: TensorRecord, group: _Group, targets: dict[int, torch.Tensor]) -> bool:
    """One memcpy of the record's data when the only request wants all of it in a dense tensor of its dtype (a
    small record costs more in tensor calls than in bytes); False when the request needs the general copy."""
    if len(group.requests) != 1 or rec.storage_offset or not rec.is_c_contiguous:
        return False
    req = group.requests[0]
    target = targets[id(req)]
    if not _wants_all(req, target, rec.dtype, rec.size):
        return False
    nbytes = math.prod(rec.size) * rec.dtype.itemsize
    if nbytes != rec.data_length or rec.data_offset + nbytes > len(stored):
        return False
    if nbytes:
        byte_view(target)[:] = stored[rec.data_offset : rec.data_offset + nbytes]
    return True


def _wants_all(req: ReadItem, target: torch.Tensor, dtype: torch.dtype, size: Sequence[int]) -> bool:
    """The request asks for the whole stored chunk (``size``), into a dense CPU tensor of ``dtype`` and that shape,
    so the stored bytes can land in the destination as they are."""
    whole = tuple(size)
    return (
        not any(req.storage_offsets)
        and tuple(req.lengths) == whole
        and tuple(target.shape) == whole
        and target.dtype == dtype
        and is_dense_cpu(target)
    )


def _read_whole_record(
    handle: ReadHandle,
    info: _StorageInfo,
    sums: BlockChecksums,
    group: _Group,
    targets: dict[int, torch.Tensor],
    opts: ReadOptions,
    where: str,
) -> bool:
    """A whole dcpio record wanted whole, by a contiguous destination of its dtype: one vectored read (one ranged
    request on an object store).

    The record's head, its data (straight into the destination) and its tail come in with one ``preadv``; then the
    blocks, the head digest and the parsed header are checked. Returns False (nothing read) when the request does
    not fit this path.
    """
    # local files: small records only (a large one is read block by block, hashed while in cache); object stores:
    # any size, since one request for head, data and tail beats two
    if len(group.requests) != 1 or (info.length > _SMALL_ITEM and not handle.prefers_large_reads):
        return False
    req = group.requests[0]
    expected = opts.expected(req.storage_index)
    target = targets[id(req)]
    if expected is None or not _wants_all(req, target, *expected):
        return False
    data = byte_view(target)
    head = memoryview(bytearray(sums.head_length))
    tail_len = info.length - sums.head_length - len(data)
    if tail_len < 0:
        return False
    tail = memoryview(bytearray(tail_len))
    base = info.offset
    handle.readinto_many(base, [head, data, tail])
    if opts.verify:
        verify_pieces(
            sums, [(base, head), (base + len(head), data), (base + len(head) + len(data), tail)], handle.path, where
        )
    rec = _dcpio_head(bytes(head), sums, info.length, req.storage_index, opts, handle.path, where)
    if rec.data_length != len(data) or rec.storage_offset or not rec.is_c_contiguous:
        raise CorruptCheckpointError(f"{where}: the record's layout does not match its metadata")
    return True


def _dcpio_head(
    head: bytes,
    sums: BlockChecksums,
    item_length: int,
    index: MetadataIndex,
    opts: ReadOptions,
    path: str,
    where: str,
) -> TensorRecord:
    """The record a dcpio-written head describes: the head checked against its digest (when verifying), parsed,
    and held to the dtype and shape the metadata promises."""
    if opts.verify:
        sums.check_head(head, path, where)
    rec = parse_verified_head(head, item_length, where)
    _check_expected(rec, index, opts, where)
    return rec


def _check_expected(rec: TensorRecord, index: MetadataIndex, opts: ReadOptions, where: str) -> None:
    """The record must hold the dtype and chunk shape the metadata promises (catches damaged record headers)."""
    expected = opts.expected(index)
    if expected is None:
        return
    dtype, sizes = expected
    if rec.dtype != dtype or tuple(rec.size) != tuple(sizes):
        raise CorruptCheckpointError(
            f"{where}: the stored record holds {rec.dtype} {list(rec.size)} but the metadata says {dtype} "
            f"{list(sizes)}; the data file's record header is damaged (or belongs to another checkpoint). Restore "
            "the file or load an earlier checkpoint."
        )


def _copy_from_record_bytes(
    raw: memoryview, group: _Group, targets: dict[int, torch.Tensor], where: str, opts: ReadOptions
) -> None:
    """Serve every request of ``group`` from a whole ``torch.save`` record held in memory."""
    rec = parse_tensor_item(lambda o, n: bytes(raw[o : o + n]), len(raw), where)
    _check_expected(rec, group.requests[0].storage_index, opts, where)
    if rec.data_length:
        whole = torch.frombuffer(raw[rec.data_offset : rec.data_offset + rec.data_length], dtype=torch.uint8)
        if whole.data_ptr() % rec.dtype.itemsize:
            # a record inside a shared read of back-to-back records (torch writes them unaligned): typed views of
            # misaligned memory can crash vectorised kernels, so the bytes move to an aligned buffer first
            whole = whole.clone()
    else:
        whole = torch.empty(0, dtype=torch.uint8)
    for req in group.requests:
        _copy_from_storage(whole, rec, req, targets[id(req)], where)


def _load_small_groups(
    fs: FileSystemBase,
    batch: list[tuple[str, _Group]],
    targets: dict[int, torch.Tensor],
    opts: ReadOptions,
    handles: Callable[[str], ReadHandle],
) -> None:
    """Serve small records, ``batch`` sorted by file and offset: neighbours come in with one read (one ranged GET
    on an object store, where a request costs far more than its bytes; one ``preadv`` locally, where the calls and
    tensor operations per record cost more than its bytes), then each is checked and copied out of memory."""
    runs: list[list[tuple[str, _Group]]] = []
    for path, group in batch:
        info = group.info
        if info.transform_descriptors:  # decoded one by one on the general path
            runs.append([(path, group)])
            continue
        if runs and not runs[-1][-1][1].info.transform_descriptors:
            last_path, last = runs[-1][-1]
            first = runs[-1][0][1].info
            gap = info.offset - (last.info.offset + last.info.length)
            span = info.offset + info.length - first.offset
            if last_path == path and 0 <= gap <= _COALESCE_GAP and span <= _span_limit(handles(path)):
                runs[-1].append((path, group))
                continue
        runs.append([(path, group)])
    for run in runs:
        path = run[0][0]
        handle = handles(path)
        start = run[0][1].info.offset
        end = max(g.info.offset + g.info.length for _, g in run)
        if len(run) == 1 or end > handle.size():  # a truncated file: the general path names the item
            for p, group in run:
                _load_tensor_group(fs, p, group, targets, opts, handles)
            continue
        buf = byte_view(thread_scratch("span", end - start))
        handle.readinto(start, buf)
        for p, group in run:
            info = group.info
            stored = buf[info.offset - start : info.offset - start + info.length]
            where = _tensor_where(group)
            sums = _checksums(info, where)
            if not _serve_stored_record(stored, group, sums, targets, opts, handle.path, where):
                _load_tensor_group(fs, p, group, targets, opts, handles)  # SAFETENSORS layout: the general path


def _span_limit(handle: ReadHandle) -> int:
    """Bytes one read of neighbouring small records may span: a multipart part on object stores, 1 MiB (cache
    sized) on local files."""
    return knobs.s3_part_size() if handle.prefers_large_reads else _LOCAL_SPAN


def _check_box(rec: TensorRecord, req: ReadItem, target: torch.Tensor, where: str) -> None:
    if len(req.storage_offsets) != len(rec.size) or any(
        o + n > s for o, n, s in zip(req.storage_offsets, req.lengths, rec.size)
    ):
        raise PlanMismatchError(
            f"{where}: the load asks for offsets {list(req.storage_offsets)} lengths {list(req.lengths)} but the "
            f"stored chunk has shape {list(rec.size)}; the metadata and the data file disagree"
        )
    if tuple(target.shape) != tuple(req.lengths):
        raise PlanMismatchError(
            f"{where}: destination has shape {list(target.shape)}, the plan reads {list(req.lengths)}; "
            "the state dict's tensor does not match the checkpoint"
        )


def _copy_from_storage(whole: torch.Tensor, rec: TensorRecord, req: ReadItem, target: torch.Tensor, where: str) -> None:
    """Copy the requested box out of a fully-read storage (``whole``: uint8) into ``target``."""
    _check_box(rec, req, target, where)
    typed = whole.view(rec.dtype) if whole.numel() else torch.empty(0, dtype=rec.dtype)
    view = (
        typed.as_strided(rec.size, rec.stride, rec.storage_offset)
        if math.prod(rec.size)
        else torch.empty(rec.size, dtype=rec.dtype)
    )
    for d, (o, n) in enumerate(zip(req.storage_offsets, req.lengths)):
        view = view.narrow(d, o, n)
    target.copy_(view)


def _read_request(
    handle: ReadHandle,
    rec: TensorRecord,
    data_base: int,
    req: ReadItem,
    target: torch.Tensor,
    sums: BlockChecksums | None,
    verify: bool,
    where: str,
    tiles: TileChecksums | None = None,
) -> None:
    _check_box(rec, req, target, where)
    count = math.prod(req.lengths)
    if count == 0:
        return
    item = rec.dtype.itemsize
    if not rec.is_c_contiguous:
        # written by torch with its original strides: read the whole storage, view it as saved
        scratch = byte_view(thread_scratch("read", rec.data_length))
        buf = _read_verified(handle, data_base, data_base + rec.data_length, scratch, sums, verify, where)
        _copy_from_storage(torch.frombuffer(buf, dtype=torch.uint8), rec, req, target, where)
        return
    strides = list(c_strides(rec.size))
    first = rec.storage_offset + sum(o * s for o, s in zip(req.storage_offsets, strides))
    last = rec.storage_offset + sum((o + n - 1) * s for o, n, s in zip(req.storage_offsets, req.lengths, strides))
    start, stop = data_base + first * item, data_base + (last + 1) * item
    if stop - data_base > rec.data_length:
        raise CorruptCheckpointError(f"{where}: requested bytes reach past the stored tensor")
    contiguous_box = (last + 1 - first) == count
    if contiguous_box and target.dtype == rec.dtype and is_dense_cpu(target):
        _read_verified(handle, start, stop, byte_view(target), sums, verify, where)
        return
    mapped = None if handle.prefers_large_reads else handle.mapped()
    if mapped is not None and _copy_mapped(
        mapped, handle.path, rec, data_base, req, target, sums, tiles, verify, where
    ):
        return
    buf = _read_verified(handle, start, stop, byte_view(thread_scratch("read", stop - start)), sums, verify, where)
    span = torch.frombuffer(buf, dtype=torch.uint8).view(rec.dtype)
    view = span.as_strided(tuple(req.lengths), tuple(strides), 0)
    target.copy_(view)


def _tile_sums_of(info: _StorageInfo, where: str) -> TileChecksums | None:
    record = getattr(info, TILE_ATTRIBUTE, None)
    return None if record is None else TileChecksums.from_record(record, where)


def _copy_mapped(
    mapped: torch.Tensor,
    path: str,
    rec: TensorRecord,
    data_base: int,
    req: ReadItem,
    target: torch.Tensor,
    sums: BlockChecksums | None,
    tiles: TileChecksums | None,
    verify: bool,
    where: str,
) -> bool:
    """Serve one request by strided copies out of the file's memory map; False when the layout does not allow it.

    Verified with tiles: row group by row group, the tiles under the requested columns are gathered and hashed, and
    the group's rows are copied while those bytes are still in cache; only those tiles' bytes are touched. Verified
    with blocks only: each band of rows has its blocks hashed in place in the map, then is copied. Unverified: one
    strided copy of exactly the requested bytes.
    """
    item = rec.dtype.itemsize
    first_byte = data_base + rec.storage_offset * item
    numel = math.prod(rec.size)
    if data_base + rec.data_length > mapped.numel() or (rec.storage_offset + numel) * item > rec.data_length:
        return False
    region = mapped.narrow(0, first_byte, numel * item)
    dest = target
    if first_byte % item == 0:
        box = region.view(rec.dtype).view(rec.size)
        for d, (o, n) in enumerate(zip(req.storage_offsets, req.lengths)):
            box = box.narrow(d, o, n)
    elif rec.size and target.dtype == rec.dtype and is_dense_cpu(target):
        # data not aligned to its element size (records torch wrote back to back): copy bytes into the bytes of
        # the destination; the last dimension counts bytes
        box = region.view(*rec.size[:-1], rec.size[-1] * item)
        last = len(rec.size) - 1
        for d, (o, n) in enumerate(zip(req.storage_offsets, req.lengths)):
            box = box.narrow(d, o * item, n * item) if d == last else box.narrow(d, o, n)
        dest = target.view(torch.uint8)
    else:
        return False
    a, n0 = (req.storage_offsets[0], req.lengths[0]) if rec.size else (0, 1)
    if not verify or sums is None:
        dest.copy_(box)
        count_mapped(box.numel() * item)
        return True
    rows = rec.size[0] if rec.size else 1
    row_bytes = numel * item // rows if rows else 0
    if tiles is not None and len(rec.size) >= 2:
        if tiles.data_start != first_byte or tiles.rows != rows or tiles.row_bytes != row_bytes:
            raise CorruptCheckpointError(
                f"{where}: the tile checksum record says the data is {tiles.rows} rows of {tiles.row_bytes} bytes "
                f"at byte {tiles.data_start}, the record header says {rows} x {row_bytes} at {first_byte}; the "
                "metadata or the data file is damaged. Restore it or load an earlier checkpoint."
            )
        strides = c_strides(rec.size)
        lo = sum(o * st for o, st in zip(req.storage_offsets[1:], strides[1:])) * item
        ends = zip(req.storage_offsets[1:], req.lengths[1:], strides[1:])
        hi = (sum((o + n - 1) * st for o, n, st in ends) + 1) * item
        s0, s1 = tiles.segments_for(lo, hi)
        data_u8 = region.view(rows, row_bytes)
        touched = 0
        g_rows = tiles.group_rows
        for g in range(a // g_rows, -(-(a + n0) // g_rows)):
            touched += tiles.verify(data_u8, g, s0, s1, path, where)
            r_lo, r_hi = max(a, g * g_rows), min(a + n0, (g + 1) * g_rows)
            dest.narrow(0, r_lo - a, r_hi - r_lo).copy_(box.narrow(0, r_lo - a, r_hi - r_lo))
        count_mapped(touched)
        return True
    # block checksums only: bands of rows, each band's blocks hashed in place, then the band copied
    row_step = row_bytes if rows else 0
    band = max(1, _VERIFY_CHUNK // max(1, row_step))
    verified_to = first_byte
    touched = 0
    for r in range(a, a + n0, band):
        r_end = min(a + n0, r + band)
        lo, hi = sums.widen(first_byte + r * row_step, first_byte + r_end * row_step)
        if lo < sums.base or hi > sums.end:
            return False
        lo = max(lo, verified_to)
        if hi > lo:
            verify_pieces(sums, [(lo, byte_view(mapped.narrow(0, lo, hi - lo)))], path, where)
            touched += hi - lo
            verified_to = hi
        dest.narrow(0, r - a, r_end - r).copy_(box.narrow(0, r - a, r_end - r))
    count_mapped(touched)
    return True


def _load_bytes_group(path: str, group: _Group, opts: ReadOptions, handles: Callable[[str], ReadHandle]) -> bytes:
    info = group.info
    where = f"{info.relative_path}: item '{group.requests[0].storage_index.fqn}'"
    handle = handles(path)
    if info.offset + info.length > handle.size():
        raise CorruptCheckpointError(
            f"{where}: the item spans bytes [{info.offset}, {info.offset + info.length}) but the file has "
            f"{handle.size()} bytes; it is truncated. Restore it or load an earlier checkpoint."
        )
    stored = _read_verified(
        handle, info.offset, info.offset + info.length, None, _checksums(info, where), opts.verify, where
    )
    data = bytes(stored)
    if info.transform_descriptors:
        data = bytes(_decode(opts, info, data, where))
    return data


def _decode(
    opts: ReadOptions, info: _StorageInfo, stored: bytes, where: str, index: MetadataIndex | None = None
) -> bytearray:
    limit = decode_limit(opts.expected(index) if index is not None else None, len(stored))
    try:
        return apply_decode(opts.registry, info.transform_descriptors or (), stored, limit, where)
    except CheckpointError:
        raise
    except Exception as err:  # a damaged compressed stream may fail in any way inside the codec
        raise CorruptCheckpointError(
            f"{where}: cannot undo stream transforms {list(info.transform_descriptors or ())}: "
            f"{type(err).__name__}: {err}. The stored item is damaged; restore the file or load an earlier checkpoint."
        ) from err


class _HandleCache:
    """One open read handle per file, shared by the threads (positional reads need no per-thread state)."""

    def __init__(self, fs: FileSystemBase) -> None:
        self._fs = fs
        self._lock = threading.Lock()
        self._open: dict[str, ReadHandle] = {}

    def __call__(self, path: str) -> ReadHandle:
        with self._lock:
            handle = self._open.get(path)
            if handle is None:
                handle = self._fs.open_reader(path)
                self._open[path] = handle
            return handle

    def close(self) -> None:
        for handle in self._open.values():
            handle.close()
        self._open.clear()


def read_plan(
    fs: FileSystemBase,
    items: Sequence[ReadItem],
    storage_data: dict[MetadataIndex, Any],
    planner: LoadPlanner,
    opts: ReadOptions,
    check_bytes: Callable[[ReadItem, bytes], None],
) -> None:
    """Serve every read item of a load plan; raises the first worker error after all workers stopped."""
    # keyed by the stored item: in the SAFETENSORS layout many items share one (file, offset)
    groups: dict[MetadataIndex, _Group] = {}
    for req in items:
        info = storage_data.get(req.storage_index)
        if info is None:
            raise PlanMismatchError(
                f"{opts.root}: the checkpoint has no stored data for '{_item_name(req.storage_index)}'; it was "
                "saved without this tensor/chunk. Check the state dict's keys against `dcpio inspect`."
            )
        group = groups.get(req.storage_index)
        if group is None:
            group = groups[req.storage_index] = _Group(info)
        group.requests.append(req)

    targets: dict[int, torch.Tensor] = {}
    views: dict[int, torch.Tensor] = {}  # conjugate or negative views, filled through a plain buffer
    for group in groups.values():
        for req in group.requests:
            if req.type != LoadItemType.BYTE_IO:
                target = planner.resolve_tensor(req).detach()
                if target.is_conj() or target.is_neg():  # bytes land in a plain buffer, copied through the view
                    views[id(req)] = target
                    target = torch.empty(target.shape, dtype=target.dtype, device=target.device)
                targets[id(req)] = target

    paths: dict[str, str] = {}

    def path_of(rel: str) -> str:
        path = paths.get(rel)
        if path is None:
            path = paths[rel] = str(fs.concat_path(opts.root, rel))
        return path

    ordered = sorted(groups.values(), key=lambda g: g.info.length, reverse=True)
    handles = _HandleCache(fs)
    small: list[tuple[str, _Group]] = []
    large: list[tuple[str, _Group]] = []
    byte_groups: list[tuple[str, _Group]] = []
    # on object stores records up to a quarter part are batched too: neighbours share a request
    store_batch_limit = knobs.s3_part_size() // 4
    on_store = False
    for group in ordered:
        path = path_of(group.info.relative_path)
        if group.requests[0].type == LoadItemType.BYTE_IO:
            byte_groups.append((path, group))
            continue
        on_store = handles(path).prefers_large_reads
        limit = store_batch_limit if on_store else _SMALL_ITEM
        (small if group.info.length <= limit else large).append((path, group))
    tasks: list[Callable[[], None]] = []
    # small records in batches, in file order (neighbours share a read), queued first: locally they are Python work
    # under the GIL, which overlaps best with the other threads' large copies (those release it); left for the end,
    # batches contend with each other (a 1 GiB load: 3 ms faster this way). One batch per thread locally; four per
    # thread on object stores, where each waits on the network
    small.sort(key=lambda pg: (pg[0], pg[1].info.offset))
    batches = max(1, opts.threads) * (4 if on_store else 1)
    per_batch = max(1, -(-len(small) // batches))
    for i in range(0, len(small), per_batch):
        tasks.append(functools.partial(_load_small_groups, fs, small[i : i + per_batch], targets, opts, handles))
    for path, group in large:  # largest first, so the long reads start early
        tasks.append(functools.partial(_load_tensor_group, fs, path, group, targets, opts, handles))
    byte_data: dict[int, bytes] = {}

    def load_bytes(path: str, group: _Group) -> None:
        byte_data[id(group)] = _load_bytes_group(path, group, opts, handles)

    tasks += [functools.partial(load_bytes, path, group) for path, group in byte_groups]
    try:
        with gc_paused():
            errors = run_queued(tasks, opts.threads, name="dcpio-r")
    finally:
        handles.close()
    raise_first(errors)

    for _, group in byte_groups:
        data = byte_data[id(group)]
        for req in group.requests:
            check_bytes(req, data)
            planner.load_bytes(req, io.BytesIO(data))
    for group in groups.values():
        for req in group.requests:
            if req.type != LoadItemType.BYTE_IO:
                view = views.get(id(req))
                if view is not None:
                    view.copy_(targets[id(req)])
                planner.commit_tensor(req, targets[id(req)] if view is None else view)
