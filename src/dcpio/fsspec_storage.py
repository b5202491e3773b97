"""``FsspecWriter`` / ``FsspecReader``: dcpio's writer and reader on any fsspec URL (``s3://``, ...).

They are the local-disk classes with a different byte mover (:class:`dcpio.movers.fsspec.FsspecFileSystem`),
so everything the local classes guarantee (checksums, restricted metadata unpickling, per-save file names, the
metadata object written last as the commit point) holds on object stores too. Storage options pass through to
fsspec as keywords, exactly as with torch's classes::

    writer = dcpio.FsspecWriter("s3://bucket/step-100", key=..., secret=...,
                                client_kwargs={"endpoint_url": "http://127.0.0.1:9000"})
    dcp.save(state_dict, storage_writer=writer)
    dcp.load(state_dict, storage_reader=dcpio.FsspecReader("s3://bucket/step-100", key=..., secret=..., ...))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from dcpio.movers.base import FileSystemBase
from dcpio.movers.fsspec import FsspecFileSystem
from dcpio.movers.registry import mover_for, protocol_of
from dcpio.reader import FileSystemReader
from dcpio.writer import FileSystemWriter, SerializationFormat

__all__ = ["FsspecReader", "FsspecWriter"]


def _mover(path: str | os.PathLike[str], storage_options: dict[str, Any]) -> FileSystemBase:
    """The mover the registry picks for a URL (install hints included); plain paths go through fsspec's local."""
    if protocol_of(path) is None:
        return FsspecFileSystem(path, **storage_options)
    return mover_for(path, **storage_options)


class FsspecWriter(FileSystemWriter):
    """A :class:`dcpio.FileSystemWriter` writing to an fsspec URL.

    The positional order is that of torch's ``FsspecWriter`` (``overwrite`` sixth), so it is a drop-in
    replacement; ``cache_staged_state_dict`` (a ``FileSystemWriter`` keyword torch's class lacks) comes after.
    Every other keyword is a storage option for fsspec (``key``, ``secret``, ``token``, ``client_kwargs``).

    Call order (as DCP drives it): ``reset`` → ``set_up_storage_writer`` → ``prepare_local_plan`` →
    ``prepare_global_plan`` → ``write_data`` → ``finish``; ``finish`` PUTs the metadata object (the commit).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        single_file_per_rank: bool = True,
        sync_files: bool = True,
        thread_count: int | None = None,
        per_thread_copy_ahead: int = 10_000_000,
        overwrite: bool = True,
        _extensions: Sequence[Any] | None = None,
        serialization_format: SerializationFormat = SerializationFormat.TORCH_SAVE,
        cache_staged_state_dict: bool = False,
        *,
        staging_budget: int | None = None,
        **storage_options: Any,
    ) -> None:
        super().__init__(
            path,
            staging_budget=staging_budget,
            single_file_per_rank=single_file_per_rank,
            sync_files=sync_files,
            thread_count=thread_count,
            per_thread_copy_ahead=per_thread_copy_ahead,
            cache_staged_state_dict=cache_staged_state_dict,
            overwrite=overwrite,
            _extensions=_extensions,
            serialization_format=serialization_format,
            _fs=_mover(path, storage_options),
        )

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return FsspecFileSystem.validate_checkpoint_id(checkpoint_id)


class FsspecReader(FileSystemReader):
    """A :class:`dcpio.FileSystemReader` reading from an fsspec URL with ranged GETs.

    Args:
        path: the checkpoint's URL.
        _extension_registry: stream transforms to recognise (as for ``FileSystemReader``).
        verify_checksums: check every item's checksum while loading (default True).
        thread_count: parallel reads; None picks the default from :mod:`dcpio.knobs`.
        allow_pickle: let non-tensor values that need arbitrary classes reach torch's planner (as for
            ``FileSystemReader``; off by default because unpickling them can run code).
        process_group, replicated_reads: which ranks share reads, and whether (as for ``FileSystemReader``).
        **storage_options: passed to fsspec, as with torch's ``FsspecReader``.

    Call order: ``reset`` → ``read_metadata`` → ``set_up_storage_reader`` → ``prepare_local_plan`` →
    ``prepare_global_plan`` → ``read_data``. Only the byte ranges the load plan needs are downloaded.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        _extension_registry: Any = None,
        *,
        verify_checksums: bool = True,
        thread_count: int | None = None,
        allow_pickle: bool = False,
        process_group: Any = "auto",
        replicated_reads: bool | str = "auto",
        **storage_options: Any,
    ) -> None:
        super().__init__(
            path,
            _extension_registry,
            verify_checksums=verify_checksums,
            thread_count=thread_count,
            allow_pickle=allow_pickle,
            process_group=process_group,
            replicated_reads=replicated_reads,
            _fs=_mover(path, storage_options),
        )

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return FsspecFileSystem.validate_checkpoint_id(checkpoint_id)
