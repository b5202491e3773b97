"""The load half of the engine: one path from a DCP load plan to bytes in the destination tensors.

1. Requests are grouped by stored item; each item gets its checksums and, where the metadata alone says where its
   data is (a record dcpio wrote), a predicted layout.
2. The planner (:func:`~dcpio.engine.planner.plan_fetches`) chooses which items come into memory whole and which
   neighbours share a request, from each file's :class:`~dcpio.engine.requests.Capabilities`.
3. Each item is located by its format (:mod:`dcpio.formats.locate`) in the source its bytes are in (the file, or a
   fetch held in memory), the planner chooses its operations (:func:`~dcpio.engine.planner.plan_tensor`) and the
   executor runs them (:func:`~dcpio.engine.executor.run_tensor_ops`).

Tasks run on the shared queued runner: coalesced fetches first (Python work under the GIL that overlaps best with
the other threads' large copies, which release it), then in-place items largest first. Every task runs; the first
error is raised with the others attached.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlanner, ReadItem

from dcpio._runtime import gc_paused, raise_first, run_queued
from dcpio._torch_compat import _StorageInfo
from dcpio.engine.executor import NoWindow, Verifier, run_tensor_ops
from dcpio.engine.planner import copies_whole, plan_fetches, plan_tensor
from dcpio.engine.requests import Box, ByteRange, Capabilities, Fetch, StoredItem, Target, TensorLayout
from dcpio.engine.save import item_name
from dcpio.engine.sources import FileSource, IOStats, MemorySource, Source
from dcpio.errors import CheckpointError, CorruptCheckpointError, PlanMismatchError
from dcpio.formats.locate import (
    Expected,
    check_expected,
    check_predicted_head,
    head_checker,
    is_record,
    locate,
    predict,
)
from dcpio.integrity.checksum import ATTRIBUTE, BlockChecksums
from dcpio.integrity.tiles import TILE_ATTRIBUTE, TileChecksums
from dcpio.movers.base import FileSystemBase
from dcpio.movers.capabilities import UNBOUNDED
from dcpio.tensor_bytes import byte_view, is_dense_cpu, thread_scratch
from dcpio.transforms import apply_decode, decode_limit

__all__ = ["ReadOptions", "SourceCache", "read_plan"]


# an item already in memory: views instead of requests, nothing left to verify
_IN_MEMORY = Capabilities(UNBOUNDED, UNBOUNDED, 0, 0, 0, can_map=True, request_bound=False)


@dataclass(frozen=True)
class ReadOptions:
    threads: int
    verify: bool
    registry: object
    root: str
    # (dtype, chunk sizes) the metadata promises for a stored item; None when it does not say
    expected: Callable[[MetadataIndex], Expected] = lambda index: None


@dataclass
class _Group:
    """All read requests that hit one stored item."""

    key: int
    path: str
    info: _StorageInfo
    is_bytes: bool  # a BYTE_IO item (DCP keeps an item's requests of one kind)
    requests: list[ReadItem] = field(default_factory=list)
    sums: BlockChecksums | None = None
    tiles: TileChecksums | None = None
    predicted: TensorLayout | None = None

    @functools.cached_property
    def where(self) -> str:
        # built once: every step of the item's read names it in its errors
        kind = "item" if self.is_bytes else "tensor"
        return f"{self.info.relative_path}: {kind} '{item_name(self.requests[0].storage_index)}'"


class SourceCache:
    """One open source per file, shared by the threads (positional reads need no per-thread state)."""

    def __init__(self, fs: FileSystemBase, stats: IOStats) -> None:
        self._fs = fs
        self._stats = stats
        self._lock = threading.Lock()
        self._open: dict[str, FileSource] = {}

    def __call__(self, path: str) -> FileSource:
        with self._lock:
            source = self._open.get(path)
            if source is None:
                source = self._open[path] = FileSource(self._fs.open_reader(path), self._stats)
            return source

    def close(self) -> None:
        for source in self._open.values():
            source.handle.close()
        self._open.clear()


@dataclass
class _Load:
    """What every task of one load shares."""

    opts: ReadOptions
    files: dict[str, FileSource]  # every file the load reads, opened once (capabilities and size asked then)
    targets: dict[int, torch.Tensor]
    stats: IOStats
    byte_data: dict[int, bytes] = field(default_factory=dict)
    views: dict[int, torch.Tensor] = field(default_factory=dict)  # conjugate or negative destinations


def _checksums(info: _StorageInfo, where: str) -> BlockChecksums | None:
    record = getattr(info, ATTRIBUTE, None)
    return None if record is None else BlockChecksums.from_record(record, where)


def _tiles(info: _StorageInfo, where: str) -> TileChecksums | None:
    record = getattr(info, TILE_ATTRIBUTE, None)
    return None if record is None else TileChecksums.from_record(record, where)


def _group(
    items: Sequence[ReadItem], storage_data: dict[MetadataIndex, _StorageInfo], fs: FileSystemBase, root: str
) -> list[_Group]:
    # keyed by the stored item: in the SAFETENSORS layout many items share one (file, offset)
    groups: dict[MetadataIndex, _Group] = {}
    paths: dict[str, str] = {}
    for req in items:
        info = storage_data.get(req.storage_index)
        if info is None:
            raise PlanMismatchError(
                f"{root}: the checkpoint has no stored data for '{item_name(req.storage_index)}'; it was "
                "saved without this tensor/chunk. Check the state dict's keys against `dcpio inspect`."
            )
        group = groups.get(req.storage_index)
        if group is None:
            rel = info.relative_path
            path = paths.get(rel)
            if path is None:
                path = paths[rel] = str(fs.concat_path(root, rel))
            group = groups[req.storage_index] = _Group(len(groups), path, info, req.type == LoadItemType.BYTE_IO)
        group.requests.append(req)
    return list(groups.values())


def _stored(group: _Group) -> StoredItem:
    """What the planner needs of an item: where its bytes are and whether it must be fetched whole."""
    info = group.info
    whole = group.is_bytes or bool(info.transform_descriptors)
    return StoredItem(group.key, group.path, ByteRange(info.offset, info.offset + info.length), whole)


def _head_recorded(group: _Group) -> bool:
    """Whether the metadata records the item's head (a dcpio record whose layout it predicts); checked for real
    when the item is prepared."""
    record = getattr(group.info, ATTRIBUTE, None)
    return not group.is_bytes and not group.info.transform_descriptors and BlockChecksums.records_head(record)


def _prepare(group: _Group, load: _Load) -> None:
    """Check the item against its file, read its checksum records and predict its layout. Runs on the worker
    that serves the item: per item it is Python work under the GIL, which overlaps the other workers' reads."""
    info, where = group.info, group.where
    size = load.files[group.path].size()
    if info.offset + info.length > size:
        raise CorruptCheckpointError(
            f"{where}: the item spans bytes [{info.offset}, {info.offset + info.length}) but {group.path} has "
            f"{size} bytes; the file is truncated. Restore it or load an earlier checkpoint."
        )
    group.sums = _checksums(info, where)
    if not group.is_bytes:
        group.tiles = _tiles(info, where)
        group.predicted = predict(info, group.sums, load.opts.expected(group.requests[0].storage_index))


def read_plan(
    fs: FileSystemBase,
    items: Sequence[ReadItem],
    storage_data: dict[MetadataIndex, _StorageInfo],
    planner: LoadPlanner,
    opts: ReadOptions,
    check_bytes: Callable[[ReadItem, bytes], None],
) -> IOStats:
    """Serve every read item of a load plan; raises the first worker error after all workers stopped."""
    started = time.perf_counter()
    groups = _group(items, storage_data, fs, opts.root)
    stats = IOStats(items=len(groups), files=len({g.path for g in groups}))
    sources = SourceCache(fs, stats)
    load = _Load(opts, {}, {}, stats)
    try:
        for group in groups:
            if not group.is_bytes:
                for req in group.requests:
                    _resolve_target(req, planner, load)
        stored = [_stored(group) for group in groups]
        load.files = {path: sources(path) for path in {item.path for item in stored}}
        located = {g.key for g in groups if _head_recorded(g)}
        caps = {path: source.caps for path, source in load.files.items()}
        fetches, in_place = plan_fetches(stored, caps, located)
        with gc_paused():
            errors = run_queued(_tasks(fetches, in_place, groups, load), opts.threads, name="dcpio-r")
            if not errors:
                # inside the pause too: unpickling the byte items allocates enough to set off a full collection
                _hand_over(groups, load, planner, check_bytes)
    finally:
        sources.close()
    raise_first(errors)
    stats.seconds = time.perf_counter() - started
    return stats


def _tasks(
    fetches: list[Fetch], in_place: list[StoredItem], groups: list[_Group], load: _Load
) -> list[Callable[[], None]]:
    # fetches in file order, then the in-place items, largest first so the long reads start early. Locally the
    # fetches are one task: serving small items is Python work under the GIL, done by one thread while the others
    # run the large reads (which release it); split, every thread would start with GIL-bound work at once. On object
    # stores, four tasks per thread, each waiting on the network
    on_store = any(source.caps.request_bound for source in load.files.values())
    batches = max(1, load.opts.threads) * 4 if on_store else 1
    per_batch = max(1, -(-len(fetches) // batches))
    tasks: list[Callable[[], None]] = [
        functools.partial(_run_fetches, fetches[i : i + per_batch], groups, load)
        for i in range(0, len(fetches), per_batch)
    ]
    for item in sorted(in_place, key=lambda it: it.extent.length, reverse=True):
        tasks.append(functools.partial(_serve_in_place, groups[item.key], load))
    return tasks


def _hand_over(
    groups: list[_Group], load: _Load, planner: LoadPlanner, check_bytes: Callable[[ReadItem, bytes], None]
) -> None:
    for group in groups:
        if group.is_bytes:
            data = load.byte_data[group.key]
            for req in group.requests:
                check_bytes(req, data)
                planner.load_bytes(req, io.BytesIO(data))
    for group in groups:
        if not group.is_bytes:
            for req in group.requests:
                view = load.views.get(id(req))
                if view is not None:
                    view.copy_(load.targets[id(req)])
                planner.commit_tensor(req, load.targets[id(req)] if view is None else view)


def _resolve_target(req: ReadItem, planner: LoadPlanner, load: _Load) -> None:
    target = planner.resolve_tensor(req).detach()
    if target.is_conj() or target.is_neg():
        # a lazy view's raw memory is not its value: the bytes land in a plain buffer, copied through the view
        load.views[id(req)] = target
        target = torch.empty(target.shape, dtype=target.dtype, device=target.device)
    load.targets[id(req)] = target


def _run_fetches(fetches: list[Fetch], groups: list[_Group], load: _Load) -> None:
    for fetch in fetches:
        source = load.files[fetch.path]
        buf = thread_scratch("span", fetch.span.length)
        source.readinto_many(fetch.span.start, [byte_view(buf)])
        memory = MemorySource(fetch.path, fetch.span.start, buf)
        for key in fetch.keys:
            group = groups[key]
            _prepare(group, load)
            if not _copy_whole_record(memory, group, load):
                _serve_fetched(memory, group, load)


def _copy_whole_record(memory: MemorySource, group: _Group, load: _Load) -> bool:
    """A record dcpio wrote whose one request wants it whole (:func:`~dcpio.engine.planner.copies_whole`): its blocks
    and head checked, its data copied in one go. False, with nothing done, for any other item. Small records are
    served by the hundred; the general path's planning costs more than their bytes."""
    layout = group.predicted
    if layout is None or layout.head is None or group.sums is None or len(group.requests) != 1:
        return False
    req = group.requests[0]
    target = load.targets[id(req)]
    box = Box(tuple(req.storage_offsets), tuple(req.lengths))
    if not copies_whole(layout, box, Target(tuple(target.shape), target.dtype, is_dense_cpu(target))):
        return False
    _verify_whole(memory, group, load)  # every block of the item, its head included
    head = bytes(memory.bytes_at(layout.head))
    check_predicted_head(head, layout, group.info.length, group.sums, load.opts.verify, memory.path, group.where)
    if layout.storage.length:
        byte_view(target)[:] = memory.bytes_at(layout.storage)
    return True


def _wants(group: _Group, load: _Load) -> list[tuple[Box, torch.Tensor]]:
    return [(Box(tuple(r.storage_offsets), tuple(r.lengths)), load.targets[id(r)]) for r in group.requests]


def _execute(
    source: Source, layout: TensorLayout, group: _Group, load: _Load, caps: Capabilities, verify: bool
) -> None:
    """Plan and run one located tensor's requests; without views where the source turns out to have none."""
    wants = _wants(group, load)
    specs = [(box, Target(tuple(t.shape), t.dtype, is_dense_cpu(t))) for box, t in wants]
    check = Verifier(group.sums, group.tiles, source.path, group.where)
    check_head = None
    if layout.head is not None and group.sums is not None:
        check_head = head_checker(layout, group.info.length, group.sums, verify, source.path, group.where)
    try:
        ops = plan_tensor(layout, specs, group.sums, group.tiles, caps, verify, group.where)
        run_tensor_ops(source, layout, ops, wants, check, load.stats, check_head)
    except NoWindow:
        no_views = dataclasses.replace(caps, can_map=False)
        ops = plan_tensor(layout, specs, group.sums, group.tiles, no_views, verify, group.where)
        run_tensor_ops(source, layout, ops, wants, check, load.stats, check_head)


def _serve_in_place(group: _Group, load: _Load) -> None:
    _prepare(group, load)
    _serve_from_file(group, load)


def _serve_from_file(group: _Group, load: _Load) -> None:
    """Serve a prepared item by reading its file where the item's bytes are."""
    source = load.files[group.path]
    verify = load.opts.verify
    layout = group.predicted
    if layout is None:
        fqn = group.requests[0].storage_index.fqn
        layout = locate(source, group.info, fqn, group.sums, verify, group.where)
        check_expected(layout, load.opts.expected(group.requests[0].storage_index), group.where)
    _execute(source, layout, group, load, source.caps, verify)


def _serve_fetched(memory: MemorySource, group: _Group, load: _Load) -> None:
    """Serve a prepared ``group`` from its whole stored item, already in memory."""
    info = group.info
    if group.is_bytes or info.transform_descriptors:
        _verify_whole(memory, group, load)
        stored = memory.window(ByteRange(info.offset, info.offset + info.length))
        assert stored is not None  # a memory source always has a view
        raw = bytes(byte_view(stored)) if info.length else b""
        if group.is_bytes:
            transformed = bool(info.transform_descriptors)
            load.byte_data[group.key] = _decode(load.opts, info, raw, group.where, None) if transformed else raw
            return
        try:
            expected = load.opts.expected(group.requests[0].storage_index)
            decoded = _decode(load.opts, info, raw, group.where, expected)
        except CheckpointError as err:
            # torch's SAFETENSORS layout with a transform: the item's bytes start with an empty frame and run into
            # whatever follows it, so they do not decode as a whole; the blob behind the frames says where it is
            _serve_after_frames(group, load, err)
            return
        _serve_decoded(decoded, group, load)
        return
    if not is_record(memory, info.offset, info.length):
        _serve_from_file(group, load)  # a SAFETENSORS blob: the item's bytes are elsewhere in the file
        return
    _verify_whole(memory, group, load)
    layout = group.predicted
    if layout is None:
        fqn = group.requests[0].storage_index.fqn
        layout = locate(memory, info, fqn, group.sums, False, group.where)
        check_expected(layout, load.opts.expected(group.requests[0].storage_index), group.where)
    _execute(memory, layout, group, load, _IN_MEMORY, False)


def _verify_whole(memory: MemorySource, group: _Group, load: _Load) -> None:
    if not load.opts.verify or group.sums is None:
        return
    rng = ByteRange(group.info.offset, group.info.offset + group.info.length)
    Verifier(group.sums, None, memory.path, group.where).blocks([(rng.start, memory.bytes_at(rng))], load.stats)


def _serve_decoded(raw: bytes, group: _Group, load: _Load) -> None:
    info = group.info
    fqn = group.requests[0].storage_index.fqn
    expected = load.opts.expected(group.requests[0].storage_index)
    if raw[:4] == b"PK\x03\x04":
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        memory = MemorySource(group.path, 0, data)
        plain = _StorageInfo(info.relative_path, 0, len(raw))
        layout = locate(memory, plain, fqn, None, False, group.where)
        check_expected(layout, expected, group.where)
        _execute(memory, layout, group, load, _IN_MEMORY, False)
        return
    if raw:
        raise CorruptCheckpointError(f"{group.where}: decoded item is not a torch.save record")
    _serve_after_frames(group, load, None)


def _serve_after_frames(group: _Group, load: _Load, decode_error: CheckpointError | None) -> None:
    """torch's SAFETENSORS layout with a stream transform: an empty frame stands where the tensor would be, and the
    tensor is in the blob behind the frames."""
    source = load.files[group.path]
    fqn = group.requests[0].storage_index.fqn
    try:
        layout = locate(source, group.info, fqn, group.sums, load.opts.verify, group.where, after_frames=True)
    except CheckpointError:
        if decode_error is not None:
            raise decode_error from None
        raise
    check_expected(layout, load.opts.expected(group.requests[0].storage_index), group.where)
    _execute(source, layout, group, load, source.caps, load.opts.verify)


def _decode(opts: ReadOptions, info: _StorageInfo, stored: bytes, where: str, expected: Expected) -> bytes:
    limit = decode_limit(expected, len(stored))  # a decompression bomb stops at what the item can hold
    try:
        return bytes(apply_decode(opts.registry, info.transform_descriptors or (), stored, limit, where))
    except CheckpointError:
        raise
    except Exception as err:  # a damaged compressed stream may fail in any way inside the codec
        raise CorruptCheckpointError(
            f"{where}: cannot undo stream transforms {list(info.transform_descriptors or ())}: "
            f"{type(err).__name__}: {err}. The stored item is damaged; restore the file or load an earlier checkpoint."
        ) from err
