"""Hugging Face safetensors storage for DCP: save in the layout the hub and ``transformers`` load; load hub folders.

Layout written (facts as in torch's ``hf_storage``, so torch's reader, ``safetensors`` and ``transformers`` load it):

* ``model-0000i-of-0000N.safetensors`` per file index of ``fqn_to_index_mapping`` (one ``model-00001-of-00001``
  without it) and ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``), written last.
* ``save_distributed=True``: every rank writes ``shard-0000r-model-0000i-of-0000N.safetensors`` with its own chunks;
  each file's ``__metadata__`` carries ``DCP_SHARDING_INFO`` (JSON: fqn -> ``{"saved_offsets": [...]}``),
  ``DCP_VERSION`` and ``format: pt``. With ``enable_consolidation`` those go under ``sharded/`` and the coordinator
  then writes full tensors beside it (:func:`consolidate_safetensors_files`).

Commit protocol (:class:`dcpio.commit.GroupCommit`): every data file is written as ``<name>.tmp`` (created
exclusively) and fsynced; once every rank is done the coordinator renames them all to their final names, fsyncs the
directory and writes ``model.safetensors.index.json`` (tmp + rename) last. The HF layout has fixed file names (that
is what the ecosystem loads), so there is no single atomic commit: a save killed while writing data leaves the
previous export intact (plus ``.tmp`` files the next save replaces), but one killed during the renames, a few
milliseconds, can leave new files beside the older index. With ``save_distributed`` each shard file is published as
soon as it is complete, since consolidation reads them.

Writes stream: the header is computed from the save plan, then each tensor's bytes go from its memory to ``writev``,
one tensor resolved (and copied off an accelerator) at a time. Reads fetch only the byte ranges a rank needs, straight
into the destination tensor when it is a contiguous CPU tensor of the stored dtype.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import xxhash
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
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from dcpio import knobs
from dcpio._runtime import called_by_torch_load, gc_paused, raise_first, run_queued
from dcpio._torch_compat import _StorageInfo
from dcpio.commit import GroupCommit, StagedFile, stage_file
from dcpio.engine.executor import Verifier, run_tensor_ops
from dcpio.engine.load import SourceCache, capabilities
from dcpio.engine.planner import c_strides, plan_tensor
from dcpio.engine.requests import Box, ByteRange, Target, TensorLayout
from dcpio.engine.sources import FileSource, IOStats
from dcpio.errors import (
    CheckpointError,
    CheckpointWriteError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    PlanMismatchError,
    UnsafeCheckpointError,
)
from dcpio.formats.safetensors import (
    DTYPES,
    SafetensorsHeader,
    TensorEntry,
    encode_header,
    layout,
    parse_header,
    st_dtype_of,
    torch_dtype_of,
    torch_shape_of,
    write_staged,
)
from dcpio.integrity.extents import check_tiling
from dcpio.integrity.paths import check_plain_name, confined, hub_blobs
from dcpio.movers.base import FileSystemBase
from dcpio.movers.local import FileSystem, write_error
from dcpio.names import HF_INDEX_NAME, SAFETENSORS_SUFFIX, TEMP_SUFFIX
from dcpio.tensor_bytes import byte_view, is_dense_cpu

__all__ = [
    "HuggingFaceLoadPlanner",
    "HuggingFaceStorageReader",
    "HuggingFaceStorageWriter",
    "consolidate_safetensors_files",
    "consolidate_safetensors_files_on_every_rank",
]

INDEX_NAME = HF_INDEX_NAME
SUFFIX = SAFETENSORS_SUFFIX
SHARDED_DIR = "sharded"
SHARDING_INFO_KEY = "DCP_SHARDING_INFO"
SAVED_OFFSETS_KEY = "saved_offsets"
CHECKSUMS_KEY = "dcpio_checksums"  # __metadata__ string: JSON tensor name -> "xxh3-64:<16 hex digits>"
_DIGEST_PREFIX = "xxh3-64:"
_SHARD_NO = re.compile(r"^shard-(\d{5})-model-\d{5}-of-\d{5}\.safetensors$")
_DCP_VERSION = "1.0"
_OWN_NAME = re.compile(r"^(shard-\d{5}-)?model-\d{5}-of-\d{5}\.safetensors(\.tmp)?$")
_COPY_BLOCK = 16 << 20  # scratch bytes per strided copy during consolidation

T = TypeVar("T")
R = TypeVar("R")


def _file_name(index: int, count: int, shard: int | None = None) -> str:
    base = f"model-{index:05d}-of-{count:05d}{SUFFIX}"
    return base if shard is None else f"shard-{shard:05d}-{base}"


def _join(fs: FileSystemBase, directory: str, name: str) -> str:
    return str(fs.concat_path(directory, name))


def _parallel(fn: Callable[[T], R], items: Sequence[T], threads: int) -> list[R]:
    """``fn`` over ``items`` on at most ``threads`` threads, results in order; after a failure no new item starts,
    and the first failure is raised with any others attached as notes."""
    results: list[Any] = [None] * len(items)

    def task(i: int) -> None:
        results[i] = fn(items[i])

    raise_first(
        run_queued([functools.partial(task, i) for i in range(len(items))], threads, keep_going=False, name="dcpio-hf")
    )
    return results


def _done(value: Any) -> Future[Any]:
    fut: Future[Any] = Future()
    fut.set_result(value)
    return fut


def _sharding_info(header: SafetensorsHeader) -> dict[str, list[int]]:
    """``saved_offsets`` per tensor from ``DCP_SHARDING_INFO``, validated; all-zero offsets where absent."""
    raw = (header.metadata or {}).get(SHARDING_INFO_KEY)
    out = {name: [0] * len(e.shape) for name, e in header.tensors.items()}
    if raw is None:
        return out
    try:
        info = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise CorruptCheckpointError(f"{header.path}: {SHARDING_INFO_KEY} in the header is not JSON: {err}") from err
    if not isinstance(info, dict):
        raise CorruptCheckpointError(f"{header.path}: {SHARDING_INFO_KEY} is not a JSON object")
    for name, entry in header.tensors.items():
        item = info.get(name)
        offsets = item.get(SAVED_OFFSETS_KEY) if isinstance(item, dict) else None
        ndim = len(entry.shape)
        if (
            not isinstance(offsets, list)
            or len(offsets) != ndim
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        ):
            raise CorruptCheckpointError(
                f"{header.path}: tensor {name!r}: {SHARDING_INFO_KEY} gives saved_offsets {str(offsets)[:80]}, "
                f"expected {ndim} non-negative ints; the shard file is damaged, save it again"
            )
        out[name] = offsets
    return out


def tensor_digest(tensor: torch.Tensor) -> str:
    """The checksum string recorded for a tensor's stored bytes (``xxh3-64:<hex>``)."""
    t = tensor.detach()
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.cpu().contiguous()
    return _DIGEST_PREFIX + xxhash.xxh3_64_hexdigest(byte_view(t))


def digests_metadata(digests: Mapping[str, str]) -> dict[str, str]:
    """The ``__metadata__`` entry carrying per-tensor checksums (safetensors and transformers ignore it)."""
    return {CHECKSUMS_KEY: json.dumps(dict(sorted(digests.items())), separators=(",", ":"))}


def _checksums(header: SafetensorsHeader) -> dict[str, str]:
    """Per-tensor checksums from ``__metadata__`` (empty for files without them), validated."""
    raw = (header.metadata or {}).get(CHECKSUMS_KEY)
    if raw is None:
        return {}
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise CorruptCheckpointError(f"{header.path}: {CHECKSUMS_KEY} in the header is not JSON: {err}") from err
    ok = isinstance(doc, dict) and all(
        isinstance(v, str) and v.startswith(_DIGEST_PREFIX) and len(v) == len(_DIGEST_PREFIX) + 16 for v in doc.values()
    )
    if not ok or set(doc) - set(header.tensors):
        raise CorruptCheckpointError(
            f"{header.path}: {CHECKSUMS_KEY} in the header is damaged (not a map of this file's tensors to "
            f"{_DIGEST_PREFIX} digests); restore the file from a good copy or export it again"
        )
    return dict(doc)


def _check_digest(data: memoryview | Any, want: str | None, path: str, key: str) -> None:
    """Compare bytes (a buffer, or a finished ``xxh3_64`` hasher) with the checksum recorded for them."""
    if want is None:
        return
    got = _DIGEST_PREFIX + (data.hexdigest() if hasattr(data, "hexdigest") else xxhash.xxh3_64_hexdigest(data))
    if got != want:
        raise CorruptCheckpointError(
            f"{path}: tensor {key!r}: its bytes do not match the checksum recorded when it was exported ({want}, "
            f"read {got}); the file is damaged. Restore it from a good copy or export it again"
        )


def _cpu_dense(tensor: torch.Tensor) -> torch.Tensor:
    t = tensor.detach()
    return t if is_dense_cpu(t) else t.cpu().contiguous()


def _write_checksummed(
    fs: FileSystemBase,
    staged: StagedFile,
    entries: Sequence[TensorEntry],
    get: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str],
    *,
    sync: bool,
    publish: bool,
) -> int:
    """Write a safetensors file whose header carries every tensor's checksum into ``staged``; return its length.

    The header comes first in the file but the checksums are known only once each tensor has been fetched. Where the
    file is local, the header is written with placeholder digests of the same length, each tensor hashed as it is
    streamed (fetched, and copied off an accelerator, once), and the header overwritten in place before the file is
    synced. Elsewhere every tensor is fetched and hashed first. ``publish``: commit the staged file under its final
    name; otherwise only finish it, for a :class:`dcpio.commit.GroupCommit` to publish with the others.
    """
    if fs.local_root(_dirname(staged.temp)) is None:
        meta = {**metadata, **digests_metadata({e.name: tensor_digest(get(e.name)) for e in entries})}
        return write_staged(staged, entries, get, meta, sync=sync, publish=publish)
    digests: dict[str, str] = {}

    def hashed(name: str) -> torch.Tensor:
        t = _cpu_dense(get(name))
        digests[name] = tensor_digest(t)
        return t

    placeholder = digests_metadata({e.name: _DIGEST_PREFIX + "0" * 16 for e in entries})
    size = write_staged(staged, entries, hashed, {**metadata, **placeholder}, sync=False, publish=False)
    try:
        _patch_head(staged.temp, encode_header(entries, {**metadata, **digests_metadata(digests)}), sync)
        if publish:
            staged.commit(sync)
    except BaseException:
        staged.abort()
        raise
    return size


def _patch_head(path: str, head: bytes, sync: bool) -> None:
    """Overwrite the start of a just-written file (a header of unchanged length), then make the file durable."""
    try:
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
        try:
            if os.pwrite(fd, head, 0) != len(head):
                raise CheckpointWriteError(f"{path}: short write of the header; export again")
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        raise write_error(path, err, "writing the header") from err


def _dirname(path: str) -> str:
    return os.path.dirname(str(path)) or "."


def _read_header(fs: FileSystemBase, path: str) -> SafetensorsHeader:
    handle = fs.open_reader(path)
    try:
        return parse_header(handle, handle.size(), path)
    finally:
        handle.close()


def _list_safetensors(fs: FileSystemBase, directory: str) -> list[str]:
    return sorted(
        p for p in fs.ls(directory) if os.path.basename(p).endswith(SUFFIX) and not os.path.basename(p).startswith(".")
    )


def _write_index(fs: FileSystemBase, directory: str, weight_map: Mapping[str, str], total: int, sync: bool) -> None:
    doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    fs.write_file_atomic(_join(fs, directory, INDEX_NAME), (json.dumps(doc, indent=2) + "\n").encode(), sync)


def _remove_stale(fs: FileSystemBase, directory: str, keep: set[str]) -> None:
    """After a commit, drop data files of this layout that the new index does not name (an older save's)."""
    try:
        names = [os.path.basename(p) for p in fs.ls(directory)]
    except FileNotFoundError:
        return
    for name in names:
        if _OWN_NAME.match(name) and name not in keep:
            fs.remove_quietly(_join(fs, directory, name))


# --------------------------------------------------------------------------------------------------------- writer
class HuggingFaceStorageWriter(StorageWriter):
    """A DCP ``StorageWriter`` that saves safetensors files in the Hugging Face layout.

    Call order (driven by ``dcp.save``): ``reset`` -> ``set_up_storage_writer`` -> ``prepare_local_plan`` (every rank)
    -> ``prepare_global_plan`` (coordinator) -> ``write_data`` (every rank) -> ``finish`` (coordinator).

    Unlike torch's writer, tensors that share memory (tied embeddings) save: each name gets its own bytes. State dicts
    must hold tensors only (safetensors has no place for other objects).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fqn_to_index_mapping: dict[str, int] | None = None,
        thread_count: int = 1,
        save_distributed: bool = False,
        enable_consolidation: bool = False,
        thread_count_consolidation: int = 1,
        *,
        sync_files: bool = True,
        _fs: FileSystemBase | None = None,
    ) -> None:
        """Point the writer at a directory.

        Args:
            path: the output directory.
            fqn_to_index_mapping: tensor name -> file index 1..N; None puts everything in one file.
            thread_count: files written in parallel by each rank.
            save_distributed: every rank writes its own shards (sharding in the header metadata); no index is
                written unless ``enable_consolidation``.
            enable_consolidation: with ``save_distributed``, shards go under ``path/sharded`` and the coordinator
                writes full tensors into ``path`` in ``finish``.
            thread_count_consolidation: output files consolidated in parallel.
            sync_files: fsync every file and the directory (crash safety).
            _fs: the byte mover (default: local disk).
        """
        super().__init__()
        self.fs: FileSystemBase = _fs if _fs is not None else FileSystem()
        self.path = str(path)
        self.fqn_to_index_mapping = dict(fqn_to_index_mapping) if fqn_to_index_mapping is not None else None
        self.thread_count = max(1, int(thread_count))
        self.save_distributed = save_distributed
        self.enable_consolidation = enable_consolidation
        self.thread_count_consolidation = max(1, int(thread_count_consolidation))
        self.sync_files = sync_files
        self.save_id = str(uuid.uuid4())
        self.rank: int | None = None
        if self.fqn_to_index_mapping is not None:
            bad = {k: v for k, v in self.fqn_to_index_mapping.items() if not isinstance(v, int) or v < 1}
            if bad:
                raise ValueError(f"fqn_to_index_mapping values must be file indices >= 1; got {list(bad.items())[:5]}")

    @property
    def _data_dir(self) -> str:
        if self.save_distributed and self.enable_consolidation:
            return _join(self.fs, self.path, SHARDED_DIR)
        return self.path

    @property
    def checkpoint_id(self) -> str:
        return self.path

    @property
    def metadata_path(self) -> str:
        return INDEX_NAME

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            self.path = str(checkpoint_id)
        self.save_id = str(uuid.uuid4())

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.rank = kwargs.get("rank")

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path, save_id=self.save_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return FileSystem.validate_checkpoint_id(checkpoint_id)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        not_tensors = [item.index.fqn for item in plan.items if item.type == WriteItemType.BYTE_IO]
        if not_tensors:
            raise CheckpointWriteError(
                f"{self.path}: safetensors holds tensors only, but the state dict has non-tensor entries "
                f"{not_tensors[:5]}; drop them (or save them with dcpio.FileSystemWriter)"
            )
        self.fs.mkdir(self._data_dir)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        mapping = self.fqn_to_index_mapping
        if mapping is not None:
            missing = sorted({i.index.fqn for p in plans for i in p.items if i.index.fqn not in mapping})
            if missing:
                raise PlanMismatchError(
                    f"{self.path}: fqn_to_index_mapping has no file index for {missing[:10]} "
                    f"({len(missing)} tensors); add them to the mapping"
                )
        if not self.save_distributed:
            writers: dict[int, int] = {}
            for rank, plan in enumerate(plans):
                for item in plan.items:
                    td = item.tensor_data
                    if td is not None and (any(td.chunk.offsets) or td.chunk.sizes != td.size):
                        raise CheckpointWriteError(
                            f"{self.path}: tensor {item.index.fqn!r} is sharded (rank {rank} holds a "
                            f"{list(td.chunk.sizes)} chunk of {list(td.size)}); pass save_distributed=True"
                        )
                    index = mapping[item.index.fqn] if mapping is not None else 1
                    if writers.setdefault(index, rank) != rank:
                        raise CheckpointWriteError(
                            f"{self.path}: ranks {writers[index]} and {rank} would both write file index {index}; "
                            "pass save_distributed=True or give each rank's tensors their own file indices"
                        )
        return [
            dataclasses.replace(
                plan,
                storage_data={
                    "fqn_to_index_mapping": mapping,
                    "shard_index": rank + 1 if self.save_distributed else None,
                },
            )
            for rank, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        if not plan.items:
            return _done([])
        storage = plan.storage_data if isinstance(plan.storage_data, dict) else {}
        mapping: dict[str, int] | None = storage.get("fqn_to_index_mapping", self.fqn_to_index_mapping)
        shard: int | None = storage.get("shard_index")
        count = max(mapping.values()) if mapping else 1
        buckets: dict[int, list[WriteItem]] = {}
        for item in plan.items:
            buckets.setdefault(mapping[item.index.fqn] if mapping else 1, []).append(item)
        jobs = [(_file_name(i, count, shard), items) for i, items in sorted(buckets.items())]
        try:
            results = _parallel(lambda job: self._write_file(job[0], job[1], planner), jobs, self.thread_count)
        except BaseException:
            if not self.save_distributed:  # this save's finished files wait as .tmp for finish(): none is committed
                for name, _ in jobs:
                    self.fs.remove_quietly(f"{_join(self.fs, self._data_dir, name)}{TEMP_SUFFIX}")
            raise
        if self.sync_files:
            self.fs.sync_dir(self._data_dir)
        return _done([r for rs in results for r in rs])

    def _write_file(self, name: str, items: list[WriteItem], planner: SavePlanner) -> list[WriteResult]:
        by_fqn: dict[str, WriteItem] = {}
        for item in items:
            if item.index.fqn in by_fqn:
                raise CheckpointWriteError(
                    f"{self.path}/{name}: this rank holds several chunks of {item.index.fqn!r} (a ShardedTensor with "
                    "several local shards); the HF layout stores one chunk per tensor and rank"
                )
            by_fqn[item.index.fqn] = item
        specs = []
        for fqn, item in by_fqn.items():
            td = item.tensor_data
            if td is None:
                raise CheckpointWriteError(f"{self.path}/{name}: {fqn!r} has no tensor data in the save plan")
            st = st_dtype_of(td.properties.dtype, fqn)
            shape = list(td.chunk.sizes)
            if st == "F4" and shape:
                shape[-1] *= 2
            specs.append((fqn, st, shape))
        entries = layout(specs)
        sharding = {fqn: {SAVED_OFFSETS_KEY: [int(o) for o in by_fqn[fqn].tensor_data.chunk.offsets]} for fqn in by_fqn}  # type: ignore[union-attr]
        metadata = {SHARDING_INFO_KEY: json.dumps(sharding), "DCP_VERSION": _DCP_VERSION, "format": "pt"}

        def resolve(fqn: str) -> torch.Tensor:
            data = planner.resolve_data(by_fqn[fqn])
            if not isinstance(data, torch.Tensor):
                raise CheckpointWriteError(
                    f"{self.path}/{name}: {fqn!r} resolved to {type(data).__name__}, not a tensor"
                )
            return data

        path = _join(self.fs, self._data_dir, name)
        if self.save_distributed:
            # shards are read back by the consolidation: publish each one as soon as it is complete
            staged = stage_file(self.fs, path)
            size = _write_checksummed(self.fs, staged, entries, resolve, metadata, sync=self.sync_files, publish=True)
        else:
            # published together in finish(), right before the index: a save killed while writing data (nearly all
            # of its time) leaves the previous export untouched
            staged = GroupCommit(self.fs, self._data_dir).stage(name)  # <name>.tmp, created exclusively
            size = _write_checksummed(self.fs, staged, entries, resolve, metadata, sync=self.sync_files, publish=False)
        data_start = size - sum(e.nbytes for e in entries)
        return [
            WriteResult(
                index=by_fqn[e.name].index,
                size_in_bytes=e.nbytes,
                storage_data=_StorageInfo(relative_path=name, offset=data_start + e.begin, length=e.nbytes),
            )
            for e in entries
        ]

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        if self.save_distributed:
            if not self.enable_consolidation:
                return  # shards of one tensor sit in several files: an index cannot name one file per tensor
            mapping = self.fqn_to_index_mapping or dict.fromkeys(metadata.state_dict_metadata, 1)
            consolidate_safetensors_files(
                self._data_dir,
                self.path,
                mapping,
                num_threads=self.thread_count_consolidation,
                _fs=self.fs,
                sync=self.sync_files,
            )
            return
        weight_map: dict[str, str] = {}
        sizes: dict[str, int] = {}
        for wr_list in results:
            for wr in wr_list:
                weight_map[wr.index.fqn] = wr.storage_data.relative_path
                sizes[wr.index.fqn] = wr.storage_data.length
        GroupCommit(self.fs, self._data_dir).publish_staged(weight_map.values(), self.sync_files)
        _write_index(self.fs, self.path, weight_map, sum(sizes.values()), self.sync_files)
        _remove_stale(self.fs, self.path, set(weight_map.values()))


# --------------------------------------------------------------------------------------------------- consolidation
@dataclass
class _Shard:
    handle_key: str  # input file path
    offset: int  # absolute offset of the shard's bytes
    shape: tuple[int, ...]  # torch shape
    offsets: tuple[int, ...]  # position in the full tensor (torch units)
    checksum: str | None = None  # recorded by a dcpio export, verified as the shard is read


@dataclass
class _FullTensor:
    st_dtype: str
    elem: int  # bytes per torch element
    shape: list[int]  # torch shape of the full tensor
    shards: list[_Shard]

    @property
    def st_shape(self) -> tuple[int, ...]:
        if self.st_dtype == "F4" and self.shape:
            return (*self.shape[:-1], self.shape[-1] * 2)
        return tuple(self.shape)


def _elem_bytes(st_dtype: str, path: str, name: str) -> int:
    if st_dtype == "F4":
        return 1  # torch packs two F4 values per byte
    bits = DTYPES[st_dtype].bits
    if bits % 8:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {st_dtype}, which cannot be consolidated by bytes")
    return bits // 8


def _add_shards(full: dict[str, _FullTensor], header: SafetensorsHeader) -> None:
    digests = _checksums(header)
    for name, offsets in _sharding_info(header).items():
        entry = header.tensors[name]
        shape = torch_shape_of(entry.dtype, entry.shape)
        t = full.get(name)
        if t is None:
            elem = _elem_bytes(entry.dtype, header.path, name)
            t = full[name] = _FullTensor(entry.dtype, elem, [0] * len(shape), [])
        if t.st_dtype != entry.dtype or len(t.shape) != len(shape):
            raise CorruptCheckpointError(
                f"{header.path}: tensor {name!r} is {entry.dtype} of rank {len(shape)} here but {t.st_dtype} of "
                f"rank {len(t.shape)} in another shard; the shard files come from different saves"
            )
        t.shape = [max(a, o + s) for a, o, s in zip(t.shape, offsets, shape)]
        t.shards.append(_Shard(header.path, header.data_start + entry.begin, shape, tuple(offsets), digests.get(name)))


def _missing_ranks(files: Sequence[str]) -> list[str]:
    """Ranks whose shard files are all absent although a higher rank's are there (``shard-00002-*`` when 00001 and
    00003 wrote files): a save_distributed folder with a rank's files lost."""
    ranks = set()
    for f in files:
        m = _SHARD_NO.match(os.path.basename(f))
        if m:
            ranks.add(int(m.group(1)))
    return [f"shard-{r:05d}-*{SUFFIX}" for r in range(1, max(ranks, default=0) + 1) if r not in ranks]


def _gather_full_tensors(fs: FileSystemBase, input_dir: str, threads: int) -> dict[str, _FullTensor]:
    files = _list_safetensors(fs, input_dir)
    if not files:
        raise IncompleteCheckpointError(f"{input_dir}: no {SUFFIX} files to consolidate; check the directory")
    absent = _missing_ranks(files)
    if absent:
        raise IncompleteCheckpointError(
            f"{input_dir}: the shard files {', '.join(absent[:8])} are missing (higher ranks' files are there), so "
            "parts of the tensors are in no file; restore them, or save again, before consolidating"
        )
    headers = _parallel(lambda p: _read_header(fs, p), files, max(threads, 2))
    full: dict[str, _FullTensor] = {}
    for header in headers:
        _add_shards(full, header)
    fix = f"a shard file of {input_dir} is missing or comes from another save; restore it (or save again)"
    for name, t in full.items():
        check_tiling(name, t.shape, [(s.offsets, s.shape) for s in t.shards], input_dir, fix)
    return full


def _place_shard(source: FileSource, shard: _Shard, full_u8: torch.Tensor, t: _FullTensor, name: str) -> None:
    """Read one shard's bytes into its place in the full tensor's byte buffer, verifying its checksum."""
    shape, offs, full_shape, e = shard.shape, shard.offsets, t.shape, t.elem
    if math.prod(shape) == 0:
        _check_digest(memoryview(b""), shard.checksum, shard.handle_key, name)
        return
    if not full_shape:
        source.readinto_many(shard.offset, [byte_view(full_u8)[:e]])
        _check_digest(byte_view(full_u8)[:e], shard.checksum, shard.handle_key, name)
        return
    region = full_u8.view(*full_shape, e)[tuple(slice(o, o + s) for o, s in zip(offs, shape))]
    if region.is_contiguous():
        source.readinto_many(shard.offset, [byte_view(region)])
        _check_digest(byte_view(region), shard.checksum, shard.handle_key, name)
        return
    # a strided destination (for example a Shard(1) column block): read whole leading slabs through bounded scratch
    slab = math.prod(shape[1:]) * e
    rows = max(1, _COPY_BLOCK // max(1, slab))
    scratch = torch.empty(min(rows, shape[0]) * slab, dtype=torch.uint8)
    hasher = xxhash.xxh3_64()
    for r0 in range(0, shape[0], rows):
        n = min(rows, shape[0] - r0)
        part = scratch[: n * slab]
        source.readinto_many(shard.offset + r0 * slab, [byte_view(part)])
        hasher.update(byte_view(part))
        region[r0 : r0 + n].copy_(part.view(n, *shape[1:], e))
    _check_digest(hasher, shard.checksum, shard.handle_key, name)


def _consolidate_file(
    fs: FileSystemBase,
    out_path: str,
    fqns: list[str],
    full: dict[str, _FullTensor],
    sources: SourceCache,
    sync: bool,
) -> int:
    entries = layout((fqn, full[fqn].st_dtype, full[fqn].st_shape) for fqn in fqns)

    def materialise(fqn: str) -> torch.Tensor:
        t = full[fqn]
        # the shards tile the tensor exactly (checked when gathered): every byte is written below
        buf = torch.empty(math.prod(t.shape) * t.elem, dtype=torch.uint8)
        for shard in t.shards:
            _place_shard(sources(shard.handle_key), shard, buf, t, fqn)
        dtype = torch_dtype_of(t.st_dtype, out_path, fqn)
        return buf.view(dtype).view(t.shape) if t.shape else buf.view(dtype).reshape(())

    _write_checksummed(fs, stage_file(fs, out_path), entries, materialise, {"format": "pt"}, sync=sync, publish=True)
    return sum(e.nbytes for e in entries)


def _consolidate(
    fs: FileSystemBase,
    input_dir: str,
    output_dir: str,
    fqn_to_index_mapping: Mapping[str, int] | None,
    num_threads: int,
    sync: bool,
    only_indices: Callable[[int], bool],
) -> tuple[dict[str, str], int]:
    full = _gather_full_tensors(fs, input_dir, num_threads)
    if fqn_to_index_mapping is None:  # torch's documented meaning: every tensor in one output file
        fqn_to_index_mapping = dict.fromkeys(full, 1)
    unmapped = sorted(set(full) - set(fqn_to_index_mapping))
    absent = sorted(set(fqn_to_index_mapping) - set(full))
    if unmapped or absent:
        raise PlanMismatchError(
            f"{input_dir}: fqn_to_index_mapping does not match the shards: no file index for {unmapped[:10]}, "
            f"no shard holds {absent[:10]}; fix the mapping"
        )
    count = max(fqn_to_index_mapping.values())
    by_index: dict[int, list[str]] = {}
    for fqn, index in fqn_to_index_mapping.items():
        by_index.setdefault(index, []).append(fqn)
    weight_map = {fqn: _file_name(i, count) for fqn, i in fqn_to_index_mapping.items()}
    total = sum(math.prod(full[f].shape) * full[f].elem for f in full)
    mine = sorted(i for i in by_index if only_indices(i))
    if not mine:
        return weight_map, total
    fs.mkdir(output_dir)
    sources = SourceCache(fs, IOStats())
    try:
        _parallel(
            lambda i: _consolidate_file(
                fs, _join(fs, output_dir, _file_name(i, count)), by_index[i], full, sources, sync
            ),
            mine,
            num_threads,
        )
    finally:
        sources.close()
    return weight_map, total


def consolidate_safetensors_files(
    input_dir: str,
    output_dir: str,
    fqn_to_index_mapping: dict[str, int] | None,
    num_threads: int = 1,
    *,
    _fs: FileSystemBase | None = None,
    sync: bool = True,
) -> None:
    """Turn the shard files of a ``save_distributed`` save into full tensors in the HF layout.

    Each output tensor is assembled in one buffer straight from the shard files' byte ranges and written out before
    the next one is built: peak memory is the largest tensor per thread plus a constant. Works on bytes, so every
    dtype (int, bool, float8) consolidates. Files without ``DCP_SHARDING_INFO`` count as full tensors at offset 0.
    The shards must tile every tensor exactly: a region no shard holds (a missing rank's file) or a shard reaching
    past its data is refused, naming the tensor, before anything is allocated. Checksums recorded by a dcpio export
    are verified as each shard is read, and the output carries its own.

    Example::

        dcpio.consolidate_safetensors_files("export/sharded", "export/", fqn_to_index_mapping=None)

    Args:
        input_dir: directory of the shard files.
        output_dir: where ``model-0000i-of-0000N.safetensors`` and the index go (index last).
        fqn_to_index_mapping: tensor name -> output file index (1..N); must name exactly the tensors of the shards.
            None puts every tensor in one file (``model-00001-of-00001.safetensors``).
        num_threads: output files assembled in parallel.
    """
    fs = _fs if _fs is not None else FileSystem()
    weight_map, total = _consolidate(
        fs, str(input_dir), str(output_dir), fqn_to_index_mapping, num_threads, sync, lambda _i: True
    )
    _write_index(fs, str(output_dir), weight_map, total, sync)
    _remove_stale(fs, str(output_dir), set(weight_map.values()))


def consolidate_safetensors_files_on_every_rank(
    input_dir: str,
    output_dir: str,
    fqn_to_index_mapping: dict[str, int] | None,
    num_threads: int = 1,
    process_group: Any = None,
    *,
    _fs: FileSystemBase | None = None,
    sync: bool = True,
) -> None:
    """:func:`consolidate_safetensors_files` spread over the ranks of a process group.

    Rank ``r`` of ``W`` assembles the output files whose index ``i`` has ``i % W == r``; after a barrier rank 0 writes
    the index (every rank knows it from the shard headers alone), then all ranks meet at a second barrier. Call it on
    every rank with the same arguments.
    """
    import torch.distributed as dist

    fs = _fs if _fs is not None else FileSystem()
    rank = dist.get_rank(process_group) if dist.is_initialized() else 0
    world = dist.get_world_size(process_group) if dist.is_initialized() else 1
    error: BaseException | None = None
    weight_map: dict[str, str] = {}
    total = 0
    try:
        weight_map, total = _consolidate(
            fs,
            str(input_dir),
            str(output_dir),
            fqn_to_index_mapping,
            num_threads,
            sync,
            lambda i: i % world == rank,
        )
    except BaseException as err:  # reported after the barrier so no rank waits forever
        error = err
    failed = [error is not None]
    if dist.is_initialized():
        flags: list[Any] = [None] * world
        dist.all_gather_object(flags, failed[0], group=process_group)
        failed = flags
    if error is not None:
        raise error
    if any(failed):
        raise CheckpointWriteError(f"{output_dir}: consolidation failed on another rank; see that rank's error")
    if rank == 0:
        _write_index(fs, str(output_dir), weight_map, total, sync)
        _remove_stale(fs, str(output_dir), set(weight_map.values()))
    if dist.is_initialized():
        dist.barrier(group=process_group)


# --------------------------------------------------------------------------------------------------------- reader
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


def list_files(fs: FileSystemBase, path: str) -> tuple[list[str], dict[str, str] | None]:
    """The data files of an HF folder and its weight map: those ``model.safetensors.index.json`` names when there is
    one (other ``*.safetensors`` beside it are an older export's and are ignored), else every ``*.safetensors``.

    Raises:
        CorruptCheckpointError: the index is not valid JSON or has no weight map.
        UnsafeCheckpointError: the index names something that is not a plain file name in the folder.
        IncompleteCheckpointError: no data files at all.
    """
    index_path = _join(fs, path, INDEX_NAME)
    if fs.exists(index_path):
        raw = fs.read_file(index_path, knobs.max_metadata_bytes())
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            raise CorruptCheckpointError(f"{index_path}: not valid JSON ({err}); restore or re-download it") from err
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CorruptCheckpointError(f"{index_path}: no weight_map of tensor name -> file name")
        names = sorted({check_plain_name(v, path, index_path) for v in weight_map.values()})
        return names, weight_map
    names = [os.path.basename(p) for p in _list_safetensors(fs, path)]
    if not names:
        raise IncompleteCheckpointError(
            f"{path}: no {SUFFIX} files and no {INDEX_NAME}; this is not a Hugging Face checkpoint folder "
            "(or the save never finished)"
        )
    return names, None


def _check_present(fs: FileSystemBase, path: str, names: Sequence[str], weight_map: Mapping[str, str]) -> None:
    missing = [n for n in names if not fs.exists(_join(fs, path, n))]
    if missing:
        held = sorted(k for k, f in weight_map.items() if f in set(missing))
        raise IncompleteCheckpointError(
            f"{path}/{INDEX_NAME} lists {', '.join(missing[:5])}"
            + (" ..." if len(missing) > 5 else "")
            + f", which the folder lacks ({len(held)} tensors, e.g. {held[:3]}); the download or copy is incomplete "
            "(transformers cannot load it either). Fetch the missing files again"
        )


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
            state_dict_metadata=dict(sd_md),  # type: ignore[arg-type]
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
        self.storage_data = metadata.storage_data  # type: ignore[assignment]
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
    caps = capabilities(source.handle)
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
