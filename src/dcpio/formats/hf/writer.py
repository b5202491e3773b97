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
one tensor resolved (and copied off an accelerator) at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    Metadata,
    StorageMeta,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from dcpio._torch_compat import _StorageInfo
from dcpio.commit import GroupCommit, SaveLock, stage_file
from dcpio.errors import (
    CheckpointWriteError,
    PlanMismatchError,
)
from dcpio.formats.hf.common import (
    _DCP_VERSION,
    INDEX_NAME,
    SAVED_OFFSETS_KEY,
    SHARDED_DIR,
    SHARDING_INFO_KEY,
    _done,
    _join,
    _parallel,
    _remove_stale,
    _write_checksummed,
    _write_index,
)
from dcpio.formats.hf.consolidate import (
    consolidate_safetensors_files,
)
from dcpio.formats.safetensors import (
    layout,
    st_dtype_of,
)
from dcpio.movers.base import FileSystemBase
from dcpio.movers.local import FileSystem
from dcpio.names import TEMP_SUFFIX, hf_file_name

__all__ = ["HuggingFaceStorageWriter"]


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
        self.is_coordinator = False
        self._lock: SaveLock | None = None
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
        self.is_coordinator = is_coordinator

    def _release_lock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

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
        if self.is_coordinator:
            # one export per folder at a time: two would unlink each other's staged files (a stale .tmp is
            # removed before an exclusive create) and mix their shards under one index. The coordinator holds the
            # folder's lock from here to the index commit; a second export fails here, before any rank writes
            self._lock = SaveLock(self.fs, self.path, self.save_id)
            self._lock.acquire()
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        try:
            return self._global_plan(plans)
        except BaseException:
            self._release_lock()  # write_data and finish will not run
            raise

    def _global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
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
        jobs = [(hf_file_name(i, count, shard), items) for i, items in sorted(buckets.items())]
        try:
            results = _parallel(lambda job: self._write_file(job[0], job[1], planner), jobs, self.thread_count)
        except BaseException:
            self._release_lock()  # this export is over; finish() will not run
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
        try:
            self._commit(metadata, results)
        finally:
            self._release_lock()

    def _commit(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
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
