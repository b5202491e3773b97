"""``FileSystemWriter``: the DCP ``StorageWriter`` of dcpio.

Call order (driven by ``dcp.save`` / ``dcp.async_save``)::

    reset(checkpoint_id) -> set_up_storage_writer(is_coordinator, rank=..., use_collectives=...)
    -> prepare_local_plan(plan)            every rank: create the directory, refuse an existing one if overwrite=False
    -> prepare_global_plan(plans)          coordinator: give each rank its file-name prefix
    -> write_data(plan, planner)           every rank: the I/O engine writes this rank's data files
    -> finish(metadata, results)           coordinator: commit .metadata, then remove superseded files

Commit protocol (why a crash never loses the last good checkpoint): data files of a save never overwrite a file
that exists (they are created exclusively); when ``__0_0.distcp`` is taken (by the previous checkpoint), the save
uses ``__0_0.<tag>.distcp`` with a per-save tag. ``.metadata`` is the commit point, published through
:mod:`dcpio.commit` (``.metadata.tmp`` + fsync + rename + directory fsync on disks, one PUT on object stores).
Only after that are files that the new metadata does not name removed. A save killed at any moment leaves either
the old metadata (naming only old, untouched files) or the new one (naming only new, fully synced files).

Concurrent saves: the coordinator (each rank, for a per-rank save) holds :class:`dcpio.commit.SaveLock` from
``prepare_local_plan`` to the end of ``finish``, so a second save into the same directory fails at its start with
:class:`dcpio.commit.SaveConflictError`. Every save records a generation (:mod:`dcpio.commit.saves`): a per-rank
save never removes the global ``.metadata`` or a file it names, and a load over ranks that committed different
saves is refused.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import threading
import time
import uuid
import warnings
from collections.abc import Sequence, Set
from enum import StrEnum
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from dcpio import knobs
from dcpio._runtime import end_gc_pause, start_gc_pause
from dcpio._torch_compat import _StoragePrefix
from dcpio.collectives import DecidedPrefix
from dcpio.commit import SaveLock, publish_bytes
from dcpio.commit.saves import next_generation, per_rank_metadata, record_generation
from dcpio.engine import FileJob, IOStats, WriteOptions, write_files
from dcpio.engine.save import write_stats
from dcpio.errors import CheckpointError, CheckpointExistsError, CheckpointWriteError
from dcpio.integrity.safe_pickle import load_metadata
from dcpio.movers.adapter import as_mover
from dcpio.movers.base import FileSystemBase
from dcpio.movers.local import FileSystem
from dcpio.names import (
    DATA_SUFFIX,
    METADATA_NAME,
    data_file_name,
    data_file_prefix,
    data_file_rank,
    per_rank_metadata_name,
)
from dcpio.staging import DcpioStager, take_prewritten
from dcpio.transforms import StreamTransformExtension

__all__ = ["DEFAULT_SUFFIX", "FileSystemWriter", "SerializationFormat"]

_log = logging.getLogger("dcpio")

DEFAULT_SUFFIX = DATA_SUFFIX
_DCP_VERSION = "1.0.0"  # the metadata version torch's FileSystemWriter records (filesystem.CURRENT_DCP_VERSION)
# data files dcpio (or torch) names: __{rank}_{n}.distcp, or __{rank}_{n}.{tag}.distcp when the plain name is taken


def metadata_path(fs: FileSystemBase, root: Any, rank: int | None) -> str:
    """The global ``.metadata`` (``rank=None``) or a rank's own ``__{rank}.metadata`` in checkpoint ``root``."""
    name = METADATA_NAME if rank is None else per_rank_metadata_name(rank)
    return str(fs.concat_path(root, name))


class SerializationFormat(StrEnum):
    """How tensors are laid out inside data files (torch's enum values)."""

    TORCH_SAVE = "torch_save"
    SAFETENSORS = "safetensors"


def _format_value(fmt: Any) -> str:
    value = getattr(fmt, "value", fmt)
    if value not in ("torch_save", "safetensors"):
        raise ValueError(f"serialization_format must be TORCH_SAVE or SAFETENSORS, got {fmt!r}")
    return str(value)


def _item_bytes(item: WriteItem) -> int:
    if item.tensor_data is None:
        return 0
    n = item.tensor_data.properties.dtype.itemsize
    for s in item.tensor_data.chunk.sizes:
        n *= s
    return n


def _buckets(items: Sequence[WriteItem], count: int) -> list[list[WriteItem]]:
    """Spread items over ``count`` files: largest first onto the lightest file; bytes items round robin."""
    buckets: list[list[WriteItem]] = [[] for _ in range(count)]
    loads = [0] * count
    bytes_items = [it for it in items if it.type == WriteItemType.BYTE_IO]
    tensors = sorted((it for it in items if it.type != WriteItemType.BYTE_IO), key=_item_bytes, reverse=True)
    for i, item in enumerate(bytes_items):
        buckets[i % count].append(item)
    for item in tensors:
        j = loads.index(min(loads))
        buckets[j].append(item)
        loads[j] += _item_bytes(item)
    return [b for b in buckets if b]


def _prefix_of(plan: SavePlan, rank: int) -> str:
    given = plan.storage_data
    return given.prefix if isinstance(given, _StoragePrefix) else data_file_prefix(rank)


class _DcpioWriter(StorageWriter):
    """The protocol half of :class:`FileSystemWriter`, over any byte mover."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        single_file_per_rank: bool = True,
        sync_files: bool = True,
        thread_count: int | None = None,
        per_thread_copy_ahead: int = 10_000_000,
        overwrite: bool = True,
        _extensions: Sequence[StreamTransformExtension] | None = None,
        serialization_format: Any = SerializationFormat.TORCH_SAVE,
        *,
        _fs: FileSystemBase | None = None,
    ) -> None:
        super().__init__()
        if thread_count is not None and thread_count < 1:
            raise ValueError(f"thread_count must be at least 1 (or None to choose automatically), got {thread_count}")
        self.fs = _fs if _fs is not None else FileSystem()
        self.path: Any = self.fs.init_path(path)
        self.single_file_per_rank = single_file_per_rank
        self.sync_files = sync_files
        self.thread_count = thread_count
        self.per_thread_copy_ahead = per_thread_copy_ahead
        self.overwrite = overwrite
        self.extensions: Sequence[StreamTransformExtension] = tuple(_extensions or ())
        self.serialization_format = SerializationFormat(_format_value(serialization_format))
        self.save_id = str(uuid.uuid4())
        self.rank: int | None = None
        self.is_coordinator = False
        self.use_collectives = True
        self.stats = IOStats()  # what the last save's write_data did (see dcpio.IOStats)
        self._lock: SaveLock | None = None
        self._generation: int | None = None

    @property
    def save_tag(self) -> str:
        """8 hex digits of this save's id: what a data file name carries when the plain name is an earlier save's."""
        return self.save_id.replace("-", "")[:8]

    @property
    def fs(self) -> FileSystemBase:
        """The byte mover. Any torch ``FileSystemBase`` assigned here is adapted (torch's FsspecWriter does this)."""
        return self._fs

    @fs.setter
    def fs(self, value: Any) -> None:
        self._fs = as_mover(value)

    # ------------------------------------------------------------------ protocol
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            self.path = self.fs.init_path(checkpoint_id)
        self.save_id = str(uuid.uuid4())
        if threading.current_thread() is not threading.main_thread():
            # dcp.async_save's background save starts here, while the caller waits for the GIL to return from
            # async_save; hand it over now instead of after the interpreter's 5 ms switch interval
            time.sleep(0)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank")
        self.use_collectives = kwargs.get("use_collectives", True)

    def _metadata_path(self, rank: int | None = None) -> str:
        return metadata_path(self.fs, self.path, rank)

    def _committed(self) -> bool:
        return self.fs.exists(self._metadata_path(None if self.use_collectives else 0)) or self.fs.exists(
            self._metadata_path()
        )

    def _per_rank(self) -> bool:
        return not self.use_collectives and self.rank is not None

    def _take_lock(self) -> None:
        """Coordinator (or each rank of a per-rank save): lock the directory and pick this save's generation."""
        self._generation = None
        if not (self.is_coordinator or self._per_rank()):
            return
        self._lock = SaveLock(self.fs, self.path, self.save_id, self.rank if self._per_rank() else None)
        self._lock.acquire()
        self._generation = next_generation(self.fs, self.path, self.rank if self._per_rank() else None)

    def _release_lock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        self.fs.mkdir(self.path)
        self._take_lock()
        if self.rank is not None and not self.use_collectives:
            plan = dataclasses.replace(plan, storage_data=_StoragePrefix(data_file_prefix(self.rank)))
        start_gc_pause(self)  # through torch's global planning to this rank's last write; see GcPause
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # what exists is looked at once, here on the coordinator, and handed to every rank with its plan: ranks on a
        # shared file system with cached attributes could disagree, and N ranks listing one directory load its server.
        # A refusal is raised by every rank in write_data, which also ends each rank's collector pause
        refused = not self.overwrite and self._committed()
        taken = frozenset(self._existing_names())
        return [
            dataclasses.replace(plan, storage_data=DecidedPrefix(_prefix_of(plan, i), taken, refused))
            for i, plan in enumerate(plans)
        ]

    def _refuse_existing(self) -> None:
        end_gc_pause(self)
        self._release_lock()
        raise CheckpointExistsError(
            f"{self.path}: a checkpoint already exists here and the writer has overwrite=False. It was left "
            "untouched; save to a new directory, or pass overwrite=True to replace it."
        )

    def _threads(self) -> int:
        return self.thread_count if self.thread_count is not None else knobs.default_io_threads()

    def _file_name(self, prefix: str, n: int, taken: Set[str] | None) -> str:
        name = data_file_name(prefix, n)
        exists = (name in taken) if taken is not None else self.fs.exists(self.fs.concat_path(self.path, name))
        if exists:
            # the name belongs to an earlier save (perhaps the committed one): never write over it
            name = data_file_name(prefix, n, self.save_tag)
        return name

    def _existing_names(self) -> set[str]:
        return self._listing() or set()

    def _listing(self) -> set[str] | None:
        """Names in the checkpoint directory; None where the backend cannot list (checked file by file then)."""
        # one listing per save instead of an existence check per file (two requests each on S3)
        try:
            return {str(p).rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path)}
        except FileNotFoundError:
            return set()
        except NotImplementedError:
            return None

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        prefix_obj = plan.storage_data
        if isinstance(prefix_obj, DecidedPrefix) and prefix_obj.refused:
            self._refuse_existing()
        prefix = prefix_obj.prefix if isinstance(prefix_obj, _StoragePrefix) else data_file_prefix(self.rank or 0)
        threads = self._threads()
        files = threads
        # tensors an async save's stage() already wrote (over its staging budget) need only their results
        to_write, prewritten = take_prewritten(list(plan.items), planner, getattr(self, "prewritten", {}))
        if self.thread_count is None:
            # automatic: a file per thread only when each gets enough bytes to amortise its create + fsync
            # (measured here: ~10-30 ms per fsync'ed file on a virtio disk, i.e. ~64 MiB of writing)
            rank_bytes = sum(_item_bytes(it) for it in to_write)
            files = max(1, min(threads, rank_bytes // knobs.min_bytes_per_file()))
        groups = _buckets(to_write, files) if self.single_file_per_rank else [[it] for it in to_write]
        jobs = []
        taken = prefix_obj.taken if isinstance(prefix_obj, DecidedPrefix) else self._listing()
        for n, items in enumerate(groups):
            name = self._file_name(prefix, n, taken)
            jobs.append(FileJob(name, str(self.fs.concat_path(self.path, name)), tuple(items)))
        opts = WriteOptions(
            threads=threads,
            sync=self.sync_files,
            extensions=self.extensions,
            serialization_format=self.serialization_format.value,
            copy_ahead=self.per_thread_copy_ahead,
        )
        future: Future[list[WriteResult]] = Future()
        started = time.perf_counter()
        try:
            results = write_files(self.fs, jobs, planner, opts) + prewritten
        except BaseException:
            self._release_lock()  # this save is over; finish() will not run
            raise
        finally:
            end_gc_pause(self)
        self.stats = write_stats(results, len(jobs), time.perf_counter() - started)
        _log.info("dcpio save to %s: %s", self.path, self.stats.summary())
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        try:
            self._commit(metadata, results)
        finally:
            self._release_lock()

    def _commit(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        storage_md: dict[Any, Any] = {}
        for rank_results in results:
            for result in rank_results:
                storage_md[result.index] = result.storage_data
        metadata.storage_data = storage_md
        metadata.storage_meta = self.storage_meta()
        metadata.version = _DCP_VERSION
        per_rank = self._per_rank()
        target = self._metadata_path(self.rank if per_rank else None)
        try:
            payload = pickle.dumps(metadata)
        except Exception as err:
            raise CheckpointWriteError(
                f"{target}: the checkpoint metadata cannot be pickled ({err}); the previous checkpoint is intact"
            ) from err
        try:
            publish_bytes(self.fs, target, payload, self.sync_files)
        except BaseException:
            # not committed: this save's data files are orphans (they never reuse a name the old checkpoint has)
            for name in {getattr(info, "relative_path", None) for info in storage_md.values()}:
                if isinstance(name, str):
                    self.fs.remove_quietly(str(self.fs.concat_path(self.path, name)))
            raise
        keep = {getattr(info, "relative_path", None) for info in storage_md.values()}
        if per_rank:
            # the global .metadata stays (a newer generation shadows it on load); so does every file it names,
            # which other ranks of the previous checkpoint may read
            keep |= self._named_by_global()
        else:
            self._remove_rank_metadata()
        self._remove_superseded(keep, self.rank if per_rank else None)

    def _named_by_global(self) -> set[Any]:
        path = self._metadata_path(None)
        try:
            if not self.fs.exists(path):
                return set()
            md = load_metadata(self.fs.read_file(path, knobs.max_metadata_bytes()), path)
        except (OSError, CheckpointError) as err:
            # cannot tell what it names: remove nothing of this rank's older files
            warnings.warn(f"{path}: unreadable ({err}); keeping every older data file", stacklevel=2)
            return {None, *self._existing_names()}
        storage = md.storage_data if isinstance(md.storage_data, dict) else {}
        return {getattr(info, "relative_path", None) for info in storage.values()}

    def _remove_rank_metadata(self) -> None:
        """After a collective commit, per-rank metadata in the directory describe older saves: superseded."""
        for name in per_rank_metadata(sorted(self._existing_names())).values():
            try:
                self.fs.remove_quietly(str(self.fs.concat_path(self.path, name)))
            except (OSError, CheckpointError) as err:
                warnings.warn(f"{self.path}: committed, but removing superseded {name} failed: {err}", stacklevel=2)

    def _remove_superseded(self, keep: set[Any], only_rank: int | None) -> None:
        """After the commit: delete data files no longer named by the committed metadata (ours and torch's)."""
        try:
            entries = self.fs.ls(self.path)
        except NotImplementedError:
            return  # a backend that cannot list (torch's interface has no ls): older files stay, as with torch
        except (OSError, CheckpointError) as err:
            # the new checkpoint is committed; leftover files cost space, not correctness
            warnings.warn(f"{self.path}: committed, but listing old data files for removal failed: {err}", stacklevel=2)
            return
        for full in entries:
            name = str(full).rstrip("/").rsplit("/", 1)[-1]
            rank = data_file_rank(name)
            if rank is None or name in keep:
                continue
            if only_rank is not None and rank != only_rank:
                continue
            try:
                self.fs.remove_quietly(str(self.fs.concat_path(self.path, name)))
            except (OSError, CheckpointError) as err:
                warnings.warn(f"{self.path}: committed, but removing superseded {name} failed: {err}", stacklevel=2)

    def storage_meta(self) -> StorageMeta | None:
        meta = StorageMeta(checkpoint_id=self.checkpoint_id, save_id=self.save_id)
        return record_generation(meta, self._generation) if self._generation is not None else meta

    @property
    def checkpoint_id(self) -> Any:
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return FileSystem.validate_checkpoint_id(checkpoint_id)


class FileSystemWriter(_DcpioWriter, DcpioStager):
    """Writes a DCP checkpoint to a directory; a drop-in for ``torch.distributed.checkpoint.FileSystemWriter``.

    Args:
        path: the checkpoint directory (created if missing).
        single_file_per_rank: one data file per thread per rank (True) or one per item (False).
        sync_files: fsync data files, the metadata and the directory (needed for crash safety).
        thread_count: I/O threads (= data files per rank); None picks :func:`dcpio.knobs.default_io_threads`.
        per_thread_copy_ahead: bytes copied off an accelerator ahead of writing them.
        cache_staged_state_dict: for ``dcp.async_save``, reuse the staging buffers across saves.
        staging_budget: for ``dcp.async_save``, the most bytes of host memory its CPU copy may take (None: the
            ``DCPIO_STAGING_BUDGET`` knob, unset by default: no bound). Tensors beyond it are written while
            ``async_save`` stages, so a state dict larger than the budget still saves; see :mod:`dcpio.staging`.
        overwrite: replace an existing checkpoint (atomically) or refuse with :class:`dcpio.CheckpointExistsError`.
        _extensions: stream transforms such as :class:`dcpio.ZStandard`.
        serialization_format: :attr:`SerializationFormat.TORCH_SAVE` (default; loadable by torch's reader) or
            :attr:`SerializationFormat.SAFETENSORS`.

    Example::

        import torch.distributed.checkpoint as dcp, dcpio
        dcp.save(state_dict, storage_writer=dcpio.FileSystemWriter("ckpt/step-100"))
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        single_file_per_rank: bool = True,
        sync_files: bool = True,
        thread_count: int | None = None,
        per_thread_copy_ahead: int = 10_000_000,
        cache_staged_state_dict: bool = False,
        overwrite: bool = True,
        _extensions: Sequence[StreamTransformExtension] | None = None,
        serialization_format: Any = SerializationFormat.TORCH_SAVE,
        *,
        staging_budget: int | None = None,
        _fs: FileSystemBase | None = None,
    ) -> None:
        _DcpioWriter.__init__(
            self,
            path,
            single_file_per_rank=single_file_per_rank,
            sync_files=sync_files,
            thread_count=thread_count,
            per_thread_copy_ahead=per_thread_copy_ahead,
            overwrite=overwrite,
            _extensions=_extensions,
            serialization_format=serialization_format,
            _fs=_fs,
        )
        DcpioStager.__init__(self, cache_staged_state_dict=cache_staged_state_dict, staging_budget=staging_budget)
