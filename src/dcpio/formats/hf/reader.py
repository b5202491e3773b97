"""The Hugging Face reader: hub folders (index honoured, shards assembled) described as DCP metadata, every request
planned and run by dcpio's I/O engine, whole tensors checked against their recorded digests."""

from __future__ import annotations

import difflib
import math
import os
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
)
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from dcpio import knobs
from dcpio._runtime import called_by_torch_load, gc_paused
from dcpio.engine.executor import Verifier, run_tensor_ops
from dcpio.engine.load import SourceCache
from dcpio.engine.planner import c_strides, plan_tensor
from dcpio.engine.requests import Box, ByteRange, Target, TensorLayout
from dcpio.engine.sources import FileSource, IOStats
from dcpio.errors import (
    CheckpointError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    PlanMismatchError,
    UnsafeCheckpointError,
)
from dcpio.formats.hf.common import (
    INDEX_NAME,
    _check_digest,
    _check_present,
    _checksums,
    _done,
    _join,
    _parallel,
    _read_header,
    _sharding_info,
    list_files,
)
from dcpio.formats.safetensors import (
    SafetensorsHeader,
    torch_dtype_of,
    torch_shape_of,
)
from dcpio.integrity.extents import check_tiling
from dcpio.integrity.paths import check_plain_name, confined, hub_blobs
from dcpio.movers.base import FileSystemBase
from dcpio.movers.local import FileSystem
from dcpio.tensor_bytes import byte_view, is_dense_cpu

__all__ = ["HuggingFaceLoadPlanner", "HuggingFaceStorageReader"]


@dataclass(frozen=True)
class _HFStorageInfo:
    """Where one stored chunk is: file (relative), absolute byte offset, torch shape and dtype, name in the file, and
    the checksum a dcpio export recorded for its bytes (None for files without)."""

    relative_path: str
    offset: int
    length: int
    shape: torch.Size
    dtype: torch.dtype
    key: str
    checksum: str | None = None


class HuggingFaceStorageReader(StorageReader):
    """A DCP ``StorageReader`` for Hugging Face safetensors folders.

    Reads folders written by :class:`HuggingFaceStorageWriter` (plain, sharded, consolidated) and plain hub folders
    (``model.safetensors``; sharded with ``model.safetensors.index.json``; sharded without an index). When there is an
    index it is the truth: files it does not name are ignored, and a file it names but the folder lacks is an error.
    The chunks of a sharded (``save_distributed``) folder must tile each tensor exactly. Only the byte ranges the plan
    asks for are read, in parallel over ``thread_count`` threads, straight into destination tensors that are
    contiguous CPU tensors of the stored dtype (otherwise through scratch with a dtype-converting copy). A read of a
    whole stored tensor is checked against the checksum a dcpio export records in the header (``dcpio_checksums``).

    Call order (driven by ``dcp.load``): ``reset`` -> ``read_metadata`` -> ``set_up_storage_reader`` ->
    ``prepare_local_plan`` -> ``prepare_global_plan`` (coordinator) -> ``read_data``.

    For errors that name the file and what it holds when a key is missing or a shape differs, pass
    ``planner=HuggingFaceLoadPlanner()`` to ``dcp.load`` (torch's default planner raises its own shorter message).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        thread_count: int | None = None,
        key_mapping: Mapping[str, str] | None = None,
        *,
        verify_checksums: bool = True,
        _fs: FileSystemBase | None = None,
        _only_files: Sequence[str] | None = None,
    ) -> None:
        """Point the reader at a folder.

        Args:
            path: the folder.
            thread_count: threads reading byte ranges (and parsing headers) in parallel; None (the default) picks
                :func:`dcpio.knobs.default_io_threads` (torch's class defaults to 1).
            key_mapping: regex -> replacement renames applied to stored names (first matching pattern wins, as in
                ``transformers``), so ``{"^model\\.": ""}`` loads a ``model.``-prefixed file into a bare state dict.
            verify_checksums: check the per-tensor checksums of dcpio exports (default True).
            _fs: the byte mover (default: local disk).
            _only_files: read just these files of the folder, each on its own terms (no index, no tiling check):
                what ``dcpio verify`` uses to read every sound file of a damaged folder.
        """
        super().__init__()
        self.fs: FileSystemBase = _fs if _fs is not None else FileSystem()
        self.path = str(path)
        self.thread_count = knobs.default_io_threads() if thread_count is None else max(1, int(thread_count))
        self.key_mapping = [(re.compile(p), r) for p, r in (key_mapping or {}).items()]
        self.verify_checksums = verify_checksums
        self.only_files = list(_only_files) if _only_files is not None else None
        self.load_id = str(uuid.uuid4())
        self.storage_data: dict[MetadataIndex, _HFStorageInfo] = {}
        self.headers: dict[str, SafetensorsHeader] = {}
        self.stats = IOStats()  # what the last read_data did (bytes read, requests, time)
        self._deferred: BaseException | None = None

    @property
    def checkpoint_id(self) -> str:
        return self.path

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.storage_data = {}
        if checkpoint_id:
            self.path = str(checkpoint_id)
        self.load_id = str(uuid.uuid4())

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return FileSystem.validate_checkpoint_id(checkpoint_id)

    def _rename(self, key: str) -> str:
        for pattern, replacement in self.key_mapping:
            new, n = pattern.subn(replacement, key)
            if n:
                return new
        return key

    def _files(self) -> tuple[list[str], dict[str, str] | None]:
        if self.only_files is not None:
            return [check_plain_name(n, self.path, self.path) for n in self.only_files], None
        names, weight_map = list_files(self.fs, self.path)
        if weight_map is not None:
            _check_present(self.fs, self.path, names, weight_map)
        return names, weight_map

    def _check_inside(self, name: str) -> str:
        root = self.fs.local_root(self.path)
        blobs = hub_blobs(root) if root is not None else None
        confined(root, name, f"{self.path}: {name}", also=[blobs] if blobs else [])
        path = _join(self.fs, self.path, name)
        if blobs is not None and os.path.islink(path):
            # a hub snapshot's link into its own blobs: open the blob itself (files are opened without following
            # links), after checking where the link points now
            target = os.path.realpath(path)
            if os.path.dirname(target) != blobs:
                raise UnsafeCheckpointError(
                    f"{path}: links to {target}, outside the hub cache's blobs directory {blobs}; refusing to read it"
                )
            return target
        return path

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Parse every file's header (validated, in parallel) and describe the tensors as DCP metadata."""
        if "rank" in kwargs:  # dcp.load retries with rank= after a failure; HF folders have no per-rank metadata
            raise IncompleteCheckpointError(f"{self.path}: Hugging Face folders have no per-rank metadata")
        self._deferred = None
        try:
            return self._read_metadata()
        except (CheckpointError, OSError) as err:
            if not called_by_torch_load():
                raise
            self._deferred = err  # raised from set_up_storage_reader, so dcp.load's caller gets this error object
            return Metadata(state_dict_metadata={}, storage_data={})

    def _read_metadata(self) -> Metadata:
        names, weight_map = self._files()
        paths = [self._check_inside(n) for n in names]
        headers = _parallel(lambda p: _read_header(self.fs, p), paths, self.thread_count)
        self.headers = dict(zip(names, headers))
        sd_md: dict[str, TensorStorageMetadata] = {}
        storage: dict[MetadataIndex, _HFStorageInfo] = {}
        origin: dict[tuple[str, tuple[int, ...]], str] = {}
        for name, header in zip(names, headers):
            self._describe_file(name, header, sd_md, storage, origin)
        if weight_map is not None:
            held = {(n, k) for n, h in zip(names, headers) for k in h.tensors}
            lost = [(k, f) for k, f in weight_map.items() if (f, k) not in held]
            if lost:
                raise CorruptCheckpointError(
                    f"{self.path}/{INDEX_NAME}: names {lost[:5]} (tensor, file) but those files do not hold them; "
                    "the index and the data files are from different saves"
                )
        if self.only_files is None:
            fix = "a shard file is missing or comes from another save; restore it, or export the folder again"
            for fqn, md in sd_md.items():
                check_tiling(fqn, md.size, [(c.offsets, c.sizes) for c in md.chunks], self.path, fix)
        self.storage_data = storage
        return Metadata(
            state_dict_metadata=dict(sd_md),
            storage_data=storage,
            storage_meta=StorageMeta(checkpoint_id=self.path, load_id=self.load_id),
        )

    def _describe_file(
        self,
        name: str,
        header: SafetensorsHeader,
        sd_md: dict[str, TensorStorageMetadata],
        storage: dict[MetadataIndex, _HFStorageInfo],
        origin: dict[tuple[str, tuple[int, ...]], str],
    ) -> None:
        sharding = _sharding_info(header)
        digests = _checksums(header)
        for key, entry in header.tensors.items():
            dtype = torch_dtype_of(entry.dtype, header.path, key)
            shape = torch.Size(torch_shape_of(entry.dtype, entry.shape))
            offsets = tuple(sharding[key])
            fqn = self._rename(key)
            where = origin.setdefault((fqn, offsets), f"{name}:{key}")
            if where != f"{name}:{key}":
                raise CorruptCheckpointError(
                    f"{self.path}: tensor {fqn!r} (at offsets {list(offsets)}) is stored twice, as {where} and "
                    f"{name}:{key}; remove the stale file or fix key_mapping"
                )
            md = sd_md.get(fqn)
            if md is None:
                md = sd_md[fqn] = TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size([0] * len(shape)), [])
            if md.properties.dtype != dtype or len(md.size) != len(shape):
                raise CorruptCheckpointError(
                    f"{header.path}: tensor {key!r} is {dtype} {list(shape)} here but {md.properties.dtype} of "
                    f"rank {len(md.size)} in another file; the folder mixes different saves"
                )
            md.chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=shape))
            md.size = torch.Size([max(a, o + s) for a, o, s in zip(md.size, offsets, shape)])
            start, length = header.absolute(key)
            storage[MetadataIndex(fqn=fqn, offset=torch.Size(offsets))] = _HFStorageInfo(
                name, start, length, shape, dtype, key, digests.get(key) if self.verify_checksums else None
            )

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            raise deferred
        self.storage_data = metadata.storage_data
        if not isinstance(self.storage_data, dict):
            raise CheckpointError(f"{self.path}: metadata did not come from HuggingFaceStorageReader.read_metadata")

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read every requested block through dcpio's engine (the planner picks whole reads, strided copies out of
        a memory map or scratch); a request for a whole tensor is checked against its recorded digest."""
        jobs: list[tuple[ReadItem, _HFStorageInfo]] = []
        for req in plan.items:
            info = self.storage_data.get(req.storage_index)
            if info is None:
                raise PlanMismatchError(
                    f"{self.path}: the plan asks for {req.storage_index.fqn!r} at offsets "
                    f"{list(req.storage_index.offset or ())}, which no file here holds"
                )
            jobs.append((req, info))
        # sorted by file and offset: neighbouring requests hit neighbouring pages
        jobs.sort(key=lambda j: (j[1].relative_path, j[1].offset))
        threads = self.thread_count if self.fs.supports_parallel_reads else 1
        # checked again here, not only in read_metadata: metadata can come from elsewhere (set_up_storage_reader)
        paths = {name: self._check_inside(name) for name in {info.relative_path for _, info in jobs}}
        stats = IOStats()
        sources = SourceCache(self.fs, stats)
        started = time.perf_counter()
        try:
            with gc_paused():
                _parallel(
                    lambda j: _read_item(sources(paths[j[1].relative_path]), j[0], j[1], planner, stats), jobs, threads
                )
        finally:
            sources.close()
        stats.items = len(jobs)
        stats.files = len(paths)
        stats.seconds = time.perf_counter() - started
        self.stats = stats
        return _done(None)


def _read_item(source: FileSource, req: ReadItem, info: _HFStorageInfo, planner: LoadPlanner, stats: IOStats) -> None:
    """One request: locate the block in the file (a C-contiguous tensor at ``info.offset``), let the engine plan
    and run its reads into the destination (or a buffer of the stored dtype), check the digest, hand it over."""
    target = planner.resolve_tensor(req).detach()
    where = f"{source.path}: tensor {info.key!r}"
    box = Box(tuple(int(o) for o in req.storage_offsets), tuple(int(n) for n in req.lengths))
    if tuple(target.shape) != box.lengths:
        raise PlanMismatchError(
            f"{where}: the destination has shape {list(target.shape)} but the plan reads {list(box.lengths)} of "
            f"the stored {list(info.shape)} ({info.dtype}); the model and the checkpoint differ"
        )
    direct = is_dense_cpu(target) and target.dtype == info.dtype
    dest = target if direct else torch.empty(box.lengths, dtype=info.dtype)
    shape = tuple(info.shape)
    nbytes = math.prod(shape) * info.dtype.itemsize
    stored = TensorLayout(info.dtype, shape, c_strides(shape), 0, ByteRange(info.offset, info.offset + nbytes))
    caps = source.caps
    ops = plan_tensor(stored, [(box, Target(box.lengths, info.dtype, True))], None, None, caps, False, where)
    run_tensor_ops(source, stored, ops, [(box, dest)], Verifier(None, None, source.path, where), stats, None)
    if info.checksum is not None and not any(box.offsets) and box.lengths == shape:
        _check_digest(byte_view(dest), info.checksum, source.path, info.key)
    if not direct:
        target.copy_(dest)
    planner.commit_tensor(req, target)


class HuggingFaceLoadPlanner(DefaultLoadPlanner):
    """torch's default load planner, with missing keys and shape mismatches reported against the files.

    The message names the key, the file(s) holding the nearest names or the stored shape, and what to do.
    Use with :class:`HuggingFaceStorageReader`: ``dcp.load(sd, storage_reader=r, planner=HuggingFaceLoadPlanner())``.
    """

    def create_local_plan(self) -> LoadPlan:
        _check_state_dict(self.state_dict, self.metadata, strict=not self.allow_partial_load)
        return super().create_local_plan()


def _check_state_dict(state_dict: Mapping[str, Any], metadata: Metadata | None, strict: bool) -> None:
    if metadata is None:
        return
    where = metadata.storage_meta.checkpoint_id if metadata.storage_meta is not None else "the checkpoint"
    files: dict[str, set[str]] = {}
    for index, info in (metadata.storage_data or {}).items():
        if isinstance(info, _HFStorageInfo):
            files.setdefault(index.fqn, set()).add(info.relative_path)
    stored = metadata.state_dict_metadata
    for fqn, obj in state_dict.items():
        md = stored.get(fqn)
        if md is None:
            if not strict:
                continue
            close = difflib.get_close_matches(fqn, list(stored), n=3)
            near = ", ".join(f"{c!r} in {sorted(files.get(c, []))}" for c in close) or "nothing similar"
            raise PlanMismatchError(
                f"{where}: key {fqn!r} is missing from the checkpoint ({len(stored)} tensors). Closest stored "
                f"names: {near}. Rename with key_mapping=..., or pass allow_partial_load=True to skip it"
            )
        size = getattr(obj, "size", None)
        if isinstance(md, TensorStorageMetadata) and callable(size) and tuple(size()) != tuple(md.size):
            raise PlanMismatchError(
                f"{where}: key {fqn!r}: the model expects shape {list(size())} but {sorted(files.get(fqn, []))} "
                f"hold shape {list(md.size)} ({md.properties.dtype}); load a matching model or checkpoint"
            )
