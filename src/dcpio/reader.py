"""``FileSystemReader``: the DCP ``StorageReader`` of dcpio.

Call order (driven by ``dcp.load``)::

    reset(checkpoint_id) -> read_metadata(rank=...)      parse .metadata with the restricted unpickler
    -> set_up_storage_reader(metadata, is_coordinator)   validate every stored item's file name, offset, length
    -> prepare_local_plan(plan) -> prepare_global_plan(plans)
    -> read_data(plan, planner)                          the I/O engine reads only the bytes each item needs

Reads every format torch's writer produces (``torch_save`` records, with or without stream transforms, and the
``SAFETENSORS`` format torch's own reader cannot load) and dcpio's own. Block checksums written by dcpio are
verified by default (``verify_checksums=False`` turns that off); checkpoints written by torch have none, and get the
structural checks only (record layout, sizes and offsets against the file).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import os
import pickle
import time
import uuid
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from dcpio import collectives, knobs, shared_reads
from dcpio._runtime import called_by_torch_load, end_gc_pause, start_gc_pause
from dcpio._torch_compat import _StorageInfo
from dcpio.commit.saves import check_consistent
from dcpio.engine import IOStats, ReadOptions, read_plan
from dcpio.errors import (
    CheckpointError,
    CheckpointReadError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    UnsafeCheckpointError,
)
from dcpio.integrity.paths import check_relative_path, check_stays_inside, confined
from dcpio.integrity.safe_pickle import load_metadata
from dcpio.movers.adapter import as_mover
from dcpio.movers.base import FileSystemBase
from dcpio.movers.local import FileSystem
from dcpio.names import DATA_SUFFIX, METADATA_NAME, TEMP_SUFFIX
from dcpio.transforms import ExtensionRegistry
from dcpio.writer import metadata_path

__all__ = ["FileSystemReader"]

_log = logging.getLogger("dcpio")


class FileSystemReader(StorageReader):
    """Reads a DCP checkpoint directory; a drop-in for ``torch.distributed.checkpoint.FileSystemReader``.

    Args:
        path: the checkpoint directory.
        _extension_registry: where stream-transform descriptors are looked up (default knows ZStandard).
        verify_checksums: check dcpio's block checksums of every byte read (default True).
        thread_count: I/O threads; None picks :func:`dcpio.knobs.default_io_threads`.
        allow_pickle: let non-tensor values that need arbitrary classes to unpickle reach torch's planner.
            By default a value is first unpickled with torch's ``weights_only`` rules (plain data, tensors and
            classes registered with ``torch.serialization.add_safe_globals``) and refused otherwise, because
            the planner's ``torch.load(weights_only=False)`` would run any code a crafted checkpoint carries.
        process_group: the group whose ranks share reads: ``"auto"`` (default) is the group of the ``dcp.load`` in
            progress (torch's default group, or the one given to ``dcp.load(process_group=...)``); outside
            ``dcp.load`` (a direct ``read_metadata()`` call, ``no_dist=True``) every rank reads for itself. Give a
            ``ProcessGroup`` to choose one (then every rank of it must load), or None to never share.
        replicated_reads: ``"auto"`` (default; ``DCPIO_REPLICATED_READS=0`` turns it off), True or False. When on,
            ``.metadata`` is read by one rank and broadcast, and every stored byte range that several ranks load
            (a ``Replicate()`` placement, plain tensors every rank loads, step counters) is read by one rank and
            broadcast over the group; checksums are verified by the rank that read. Sharded loads are unaffected.
            ``"auto"`` shares the data only where that helps: on object stores, or when the ranks run on more than
            one host (on one host the page cache already reads a file once for all ranks); True always does.

    Example::

        import torch.distributed.checkpoint as dcp, dcpio
        dcp.load(state_dict, storage_reader=dcpio.FileSystemReader("ckpt/step-100"))
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        _extension_registry: Any = None,
        *,
        verify_checksums: bool = True,
        thread_count: int | None = None,
        allow_pickle: bool = False,
        process_group: Any = collectives.AUTO,
        replicated_reads: bool | str = collectives.AUTO,
        _fs: FileSystemBase | None = None,
    ) -> None:
        super().__init__()
        if thread_count is not None and thread_count < 1:
            raise ValueError(f"thread_count must be at least 1 (or None), got {thread_count}")
        self.fs = _fs if _fs is not None else FileSystem()
        self.path: Any = self.fs.init_path(path)
        self.registry = _extension_registry if _extension_registry is not None else ExtensionRegistry()
        self.verify_checksums = verify_checksums
        self.thread_count = thread_count
        self.allow_pickle = allow_pickle
        if replicated_reads != collectives.AUTO and not isinstance(replicated_reads, bool):
            raise ValueError(f"replicated_reads must be 'auto', True or False, got {replicated_reads!r}")
        self.process_group: Any = process_group
        self.replicated_reads = replicated_reads
        self._group: collectives.GroupInfo | None = None  # the load's group while one is in progress
        self.storage_data: dict[Any, Any] = {}
        self._metadata: Metadata | None = None
        self._parsed: Metadata | None = None  # what read_metadata parsed and validated, entry by entry
        self.load_id = str(uuid.uuid4())
        self.rank: int | None = None
        self.is_coordinator = False
        self.use_collectives = True
        self.stats = IOStats()
        self._deferred: BaseException | None = None
        self._per_rank_present = False

    @property
    def fs(self) -> FileSystemBase:
        """The byte mover. Any torch ``FileSystemBase`` assigned here is adapted (torch's FsspecReader does this)."""
        return self._fs

    @fs.setter
    def fs(self, value: Any) -> None:
        self._fs = as_mover(value)

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.storage_data = {}
        if checkpoint_id:
            self.path = self.fs.init_path(checkpoint_id)
        self.load_id = str(uuid.uuid4())

    def _metadata_path(self, rank: int | None) -> str:
        return metadata_path(self.fs, self.path, rank)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Parse ``.metadata`` (or ``__{rank}.metadata``) without running code from it.

        Called directly, a failure raises dcpio's error. Called by ``dcp.load``, a failure is raised from
        :meth:`set_up_storage_reader` instead (the next call torch makes): torch 2.13 replaces any exception from
        ``read_metadata`` by an ``AssertionError`` carrying only its text, while an exception from
        ``set_up_storage_reader`` reaches the caller as ``CheckpointException.failures[rank][0]``, the error object.
        """
        rank = kwargs.get("rank")
        self._deferred = None
        try:
            return self._read_metadata(rank)
        except (CheckpointError, OSError) as err:
            if not called_by_torch_load() or (rank is None and self._has_per_rank_metadata()):
                raise  # a direct call; or torch goes on to read the per-rank metadata next
            self._deferred = err
            return Metadata(state_dict_metadata={}, storage_data={}, storage_meta=StorageMeta(load_id=self.load_id))

    def _read_metadata(self, rank: int | None) -> Metadata:
        path = self._metadata_path(rank)
        self._per_rank_present = False
        # the global file is read by one rank of the load and its bytes broadcast (see dcpio.collectives); every
        # rank parses them with the restricted unpickler itself. A per-rank file is each rank's own
        group = self.process_group if rank is None and self._sharing() else None
        data = collectives.read_once(group, functools.partial(self._metadata_bytes, path))
        metadata = load_metadata(data, path)
        check_consistent(self.fs, self.path, rank, metadata, path)  # ranks of one save; see dcpio.commit.saves
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # type: ignore[union-attr]
        self._parsed = metadata
        return metadata

    def _has_per_rank_metadata(self) -> bool:
        """Per-rank metadata lies beside the global one: torch falls back to it when the global read fails."""
        if self._per_rank_present:
            return True
        try:
            names = [str(p).rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(str(self.path))]
        except (OSError, NotImplementedError):
            return False
        return any(n.startswith("__") and n.endswith(METADATA_NAME) for n in names)

    def _sharing(self) -> bool:
        if self.replicated_reads == collectives.AUTO:
            return knobs.replicated_reads()
        return bool(self.replicated_reads)

    def _metadata_bytes(self, path: str) -> bytes:
        if not self.fs.exists(path):
            self._explain_missing(path)
        return self.fs.read_file(path, knobs.max_metadata_bytes())

    def _explain_missing(self, metadata_path: str) -> None:
        root = str(self.path)
        if not self.fs.exists(root):
            import errno

            raise FileNotFoundError(errno.ENOENT, f"{root}: no such checkpoint directory; check the path", root)
        try:
            names = [str(p).rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(root)]
        except (OSError, NotADirectoryError) as err:
            raise IncompleteCheckpointError(f"{root}: not a checkpoint directory ({err})") from err
        per_rank = sorted(n for n in names if n.startswith("__") and n.endswith(METADATA_NAME))
        if METADATA_NAME in names and not metadata_path.endswith("/" + METADATA_NAME):
            raise IncompleteCheckpointError(
                f"{metadata_path} is missing, but {root} holds a global {METADATA_NAME}: the checkpoint was saved "
                "with collectives; load it with dcp.load's defaults (the global metadata failed to load first)."
            )
        if per_rank and metadata_path.endswith("/" + METADATA_NAME):
            self._per_rank_present = True
            raise IncompleteCheckpointError(
                f"{metadata_path} is missing, but {root} holds per-rank metadata ({', '.join(per_rank[:4])}): it was "
                "saved with use_collectives=False. Load it the same way (dcp.load(..., use_collectives=False)) on "
                "as many ranks as saved it."
            )
        if any(n.endswith(DATA_SUFFIX) or n.endswith(METADATA_NAME + TEMP_SUFFIX) for n in names):
            raise IncompleteCheckpointError(
                f"{metadata_path} is missing: the save into {root} never committed (it was interrupted before "
                "writing its metadata), so the data files there are not a checkpoint. Save again, or load an "
                "earlier checkpoint."
            )
        raise IncompleteCheckpointError(
            f"{root}: not a DCP checkpoint (no {METADATA_NAME} file). If it holds safetensors files, use "
            "dcpio.HuggingFaceStorageReader; otherwise check the path."
        )

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            raise deferred  # read_metadata's failure, raised where torch passes the error object on
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank")
        self.use_collectives = kwargs.get("use_collectives", True)
        sharing = self.use_collectives and self._sharing()
        self._group = collectives.resolve_group(self.process_group) if sharing else None
        storage = metadata.storage_data
        if not isinstance(storage, dict):
            raise CorruptCheckpointError(
                f"{self.path}: the metadata has no storage_data; it was not written by a file-system writer"
            )
        root = str(self.path)
        local_root = self.fs.local_root(root)
        if metadata is self._parsed:
            # validated entry by entry as it was parsed (load_metadata); each file is still confined here
            files: dict[str, str] = {}
            for index, info in storage.items():
                files.setdefault(info.relative_path, index.fqn)
            for rel, fqn in files.items():
                confined(local_root, rel, f"{root}/{METADATA_NAME}: item '{fqn}'")
        else:
            self._check_storage_data(storage, root, local_root)
        self.storage_data = storage
        self._metadata = metadata

    @staticmethod
    def _check_storage_data(storage: dict[Any, Any], root: str, local_root: str | None) -> None:
        """Metadata this reader did not parse (a caller's own object): the fields the engine relies on, checked."""
        checked: set[str] = set()
        for index, info in storage.items():
            where = f"{root}/{METADATA_NAME}: item '{getattr(index, 'fqn', index)}'"
            if not isinstance(info, _StorageInfo):
                raise CorruptCheckpointError(f"{where}: storage info is a {type(info).__name__}, not _StorageInfo")
            rel = check_relative_path(getattr(info, "relative_path", None), where)
            offset, length = getattr(info, "offset", None), getattr(info, "length", None)
            if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length >= 0):
                raise CorruptCheckpointError(
                    f"{where}: invalid offset/length {offset!r}/{length!r}; the .metadata file is damaged"
                )
            descriptors = getattr(info, "transform_descriptors", None)
            if descriptors is not None and not (
                isinstance(descriptors, list | tuple) and all(isinstance(d, str) for d in descriptors)
            ):
                raise CorruptCheckpointError(f"{where}: invalid transform descriptors {descriptors!r}")
            if local_root is not None and rel not in checked:
                check_stays_inside(local_root, rel, where)
                checked.add(rel)

    def _expected(self, index: Any) -> tuple[torch.dtype, tuple[int, ...]] | None:
        md = self._metadata.state_dict_metadata.get(index.fqn) if self._metadata is not None else None
        if not isinstance(md, TensorStorageMetadata):
            return None
        chunks = md.chunks
        wanted = tuple(index.offset or ())
        hint = index.index
        if hint is not None and 0 <= hint < len(chunks) and tuple(chunks[hint].offsets) == wanted:
            return md.properties.dtype, tuple(chunks[hint].sizes)
        for chunk in chunks:
            if tuple(chunk.offsets) == wanted:
                return md.properties.dtype, tuple(chunk.sizes)
        return None

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        start_gc_pause(self)  # through torch's global planning to the last byte of this load; see GcPause
        if self._group is not None and plan.storage_data is None:
            plan = dataclasses.replace(plan, storage_data=shared_reads.rank_facts())  # for the coordinator
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        if self._group is None or self._metadata is None:
            return plans
        # "auto" shares data where it helps: object stores, or ranks on several hosts (see dcpio.shared_reads)
        always = self.replicated_reads is True or self.fs.local_root(str(self.path)) is None
        return shared_reads.assign(plans, self._metadata, self.storage_data, self._group.world, always=always)

    def _check_bytes(self, req: ReadItem, data: bytes) -> None:
        """Refuse a non-tensor value whose unpickling would need more than torch's weights_only rules allow."""
        if self.allow_pickle:
            return
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(
                f"{self.path}: value '{req.storage_index.fqn}' needs classes or functions outside torch's "
                f"weights_only allow-list to load ({str(err).splitlines()[0][:200]}). Loading it could run code "
                "from the checkpoint. If you trust this checkpoint, register the classes with "
                "torch.serialization.add_safe_globals([...]) or pass allow_pickle=True to the reader."
            ) from err
        except Exception as err:  # not a torch.save payload at all
            raise CorruptCheckpointError(
                f"{self.path}: value '{req.storage_index.fqn}' is not a readable torch.save payload ({err})"
            ) from err

    def _shared_group(self) -> collectives.GroupInfo:
        if self._group is None:
            raise CheckpointReadError(
                f"{self.path}: the coordinator scheduled shared reads but this rank has no process group to receive "
                "them; give every rank the same process_group= and replicated_reads= settings"
            )
        return self._group

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        opts = ReadOptions(
            threads=self.thread_count if self.thread_count is not None else knobs.default_io_threads(),
            verify=self.verify_checksums,
            registry=self.registry,
            root=str(self.path),
            expected=self._expected,
        )

        self.stats = IOStats()
        started = time.perf_counter()

        def read(items: Sequence[ReadItem], target: Any) -> None:
            self.stats.include(read_plan(self.fs, items, self.storage_data, target, opts, self._check_bytes))

        try:
            if isinstance(plan.storage_data, shared_reads.SharedReadPlan):
                shared_reads.run(plan.storage_data, self._shared_group(), plan.items, planner, read, self._check_bytes)
            else:
                read(plan.items, planner)
        finally:
            self._group = None
            end_gc_pause(self)
        self.stats.seconds = time.perf_counter() - started
        _log.info("dcpio load of %s: %s", self.path, self.stats.summary())
        future: Future[None] = Future()
        future.set_result(None)
        return future

    @property
    def checkpoint_id(self) -> Any:
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return FileSystem.validate_checkpoint_id(checkpoint_id)
