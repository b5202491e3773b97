"""One storage tier of a :class:`~dcpio.manager.CheckpointManager`: a root holding one directory per step.

A root is a local directory or an fsspec URL (``s3://bucket/run``). Step ``N`` lives in ``ROOT/step-0000000N``; it
counts as committed once its ``.metadata`` exists and parses. Every write follows the same rule: data first,
``.metadata`` last, and the metadata is written once:

* on a local file system (a path or a ``file://`` URL) it is written to a private temporary name, fsynced, and
  *linked* (``os.link``) to ``.metadata``, which fails when the name exists; the directory is fsynced after;
* on S3 (and stores that honour it: MinIO, GCS's S3 API) it is a single ``PUT`` with ``If-None-Match: *``, which
  the store refuses (412) when the object exists. Two writers can therefore never both commit one step. Stores that
  ignore the header (some older S3-compatible servers) fall back to "last writer wins"; dcpio cannot tell them
  apart from the response.
* other fsspec stores (``memory://``, GCS through gcsfs, Azure) write the object in one request, unconditionally.

Deleting a step removes ``.metadata`` first (and syncs the directory), so a step half deleted by a crash never
looks committed; what is left is swept later as a leftover.
"""

from __future__ import annotations

import datetime
import errno
import os
import shutil
import uuid
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch.distributed.checkpoint.metadata import Metadata

from dcpio import knobs
from dcpio.commit import stage_file
from dcpio.errors import CheckpointError, CheckpointExistsError
from dcpio.integrity.safe_pickle import load_metadata
from dcpio.movers.base import FileSystemBase, PathLike
from dcpio.movers.fsspec import FsspecFileSystem
from dcpio.movers.local import FileSystem
from dcpio.names import METADATA_NAME, data_file_name, step_name, step_of
from dcpio.reader import FileSystemReader
from dcpio.writer import FileSystemWriter

__all__ = ["FileEntry", "StepScan", "Tier", "step_name"]

T = TypeVar("T")
_COPY_CHUNK = 8 << 20  # bytes per read when uploading a file: large enough for whole S3 parts, small in memory


@dataclass(frozen=True)
class FileEntry:
    """One object of a step directory."""

    size: int
    mtime: float


@dataclass
class StepScan:
    """What a listing found for one step: its directory and the files in it."""

    step: int
    path: str
    files: dict[str, FileEntry] = field(default_factory=dict)
    dir_mtime: float = 0.0

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files.values())

    @property
    def newest_mtime(self) -> float:
        return max([self.dir_mtime, *(f.mtime for f in self.files.values())])


def _mtime(info: dict[str, Any]) -> float:
    for key in ("mtime", "LastModified", "last_modified", "created", "updated"):
        value = info.get(key)
        if isinstance(value, datetime.datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return 0.0


class _CommitOnceLocal(FileSystem):
    """The local byte mover, with ``.metadata`` published by ``os.link`` so an existing commit is never replaced."""

    def write_file_atomic(self, path: PathLike, data: bytes, sync: bool) -> None:
        if os.path.basename(str(path)) != METADATA_NAME:
            super().write_file_atomic(path, data, sync)
            return
        tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
        handle = self.open_writer(tmp)
        try:
            handle.write([memoryview(data)])
            handle.sync()
            handle.close()
            _link_once(tmp, str(path))
        except BaseException:
            handle.abort()
            raise
        finally:
            self.remove_quietly(tmp)
        self.sync_dir(os.path.dirname(str(path)))


def _link_once(tmp: str, target: str) -> None:
    try:
        os.link(tmp, target)
    except FileExistsError as err:
        raise CheckpointExistsError(
            f"{target}: this step was committed by another save while this one was writing; the committed one was "
            "left untouched. Save under a new step number."
        ) from err
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # a file system without hard links (some FUSE and SMB mounts): check, then rename (not race-free)
        if os.path.exists(target):
            raise CheckpointExistsError(
                f"{target}: this step is already committed; save under a new step number"
            ) from err
        os.replace(tmp, target)


class _CommitOnceFsspec(FsspecFileSystem):
    """The fsspec byte mover, with ``.metadata`` written by a conditional PUT on S3."""

    def write_file_atomic(self, path: PathLike, data: bytes, sync: bool) -> None:
        if os.path.basename(str(path)) == METADATA_NAME and self.is_local:  # file:// URLs: the local hard link
            _CommitOnceLocal().write_file_atomic(self._p(path), data, sync)
            return
        if os.path.basename(str(path)) != METADATA_NAME or not self.is_s3:
            super().write_file_atomic(path, data, sync)
            return
        bucket, key, _ = self.fs.split_path(self._p(path))

        def put() -> bool:
            try:
                self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            except FileExistsError:  # s3fs's mapping of 412 PreconditionFailed
                return False
            return True

        written = self.call("committing (PUT If-None-Match: *)", path, put, writing=True)
        self.fs.invalidate_cache(self._p(path))
        if written:
            return
        # a PUT retried after its first attempt landed finds its own object: that is a success, not a conflict
        existing = self.read_file(path, knobs.max_metadata_bytes())
        if existing != data:
            raise CheckpointExistsError(
                f"{self.url(path)}: another writer committed this step first (the store refused the conditional "
                "PUT); its checkpoint was left untouched. Save under a new step number."
            )


class Tier:
    """A checkpoint root on one kind of storage: listing, commit checks, deletion, writers, readers, uploads.

    Args:
        root: a local directory or an fsspec URL.
        name: ``"local"`` or ``"durable"``, for messages and ``dcpio ls``.
        storage_options: fsspec options for a URL root (``key``, ``secret``, ``client_kwargs``...).
    """

    def __init__(self, root: str | os.PathLike[str], *, name: str, storage_options: dict[str, Any] | None = None):
        text = os.fspath(root)
        self.name = name
        self.is_url = "://" in text
        self.mover: FileSystemBase
        if self.is_url:
            self.root = text.rstrip("/")
            self._fsspec = _CommitOnceFsspec(self.root, **dict(storage_options or {}))
            self.mover = self._fsspec
        else:
            self.root = os.path.abspath(text)
            self.mover = _CommitOnceLocal()
        self._parsed: dict[tuple[int, int, float], bool] = {}

    # -- paths ----------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts]) if self.is_url else os.path.join(self.root, *parts)

    def step_path(self, step: int, *parts: str) -> str:
        return self.path(step_name(step), *parts)

    def _call(self, what: str, path: str, fn: Callable[[], T], writing: bool = False) -> T:
        if self.is_url:
            return self._fsspec.call(what, path, fn, writing=writing)
        return fn()

    # -- listing --------------------------------------------------------------------------------------------
    def scan(self) -> dict[int, StepScan]:
        """Every step directory under the root, with its files (one listing; none when the root is missing)."""
        return self._scan_url() if self.is_url else self._scan_local()

    def _scan_local(self) -> dict[int, StepScan]:
        out: dict[int, StepScan] = {}
        try:
            entries = list(os.scandir(self.root))
        except (FileNotFoundError, NotADirectoryError):
            return out
        for entry in entries:
            step = step_of(entry.name)
            try:
                if step is None or not entry.is_dir():
                    continue
                scan = StepScan(step, entry.path, dir_mtime=entry.stat().st_mtime)
                for f in os.scandir(entry.path):
                    if f.is_file():
                        st = f.stat()
                        scan.files[f.name] = FileEntry(st.st_size, st.st_mtime)
            except FileNotFoundError:  # removed while we looked: another rank's or process's deletion
                continue
            out[scan.step] = scan
        return out

    def _scan_url(self) -> dict[int, StepScan]:
        fs = self._fsspec.fs
        base = self._fsspec._p(self.root).rstrip("/")
        fs.invalidate_cache(base)
        try:
            found = self._call(
                "listing the checkpoints", self.root, lambda: fs.find(base, maxdepth=2, withdirs=False, detail=True)
            )
        except FileNotFoundError:
            return {}
        out: dict[int, StepScan] = {}
        for path, info in found.items():
            rel = str(path).rstrip("/")[len(base) + 1 :].split("/")
            step = step_of(rel[0]) if len(rel) == 2 else None
            if step is None or info.get("type", "file") != "file":
                continue
            scan = out.setdefault(step, StepScan(step, self.path(rel[0])))
            scan.files[rel[1]] = FileEntry(int(info.get("size") or 0), _mtime(info))
        return out

    def names(self, step: int) -> set[str]:
        """The file names in one step directory (empty when it does not exist)."""
        try:
            entries = self.mover.ls(self.step_path(step))
        except (FileNotFoundError, NotADirectoryError):
            return set()
        return {str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries}

    # -- commit ---------------------------------------------------------------------------------------------
    def read_metadata(self, step: int) -> Metadata:
        """The parsed ``.metadata`` of ``step`` (restricted unpickler; raises when missing or damaged)."""
        path = self.step_path(step, METADATA_NAME)
        return load_metadata(self.mover.read_file(path, knobs.max_metadata_bytes()), path)

    def committed(self, scan: StepScan) -> bool:
        """Whether a scanned step's ``.metadata`` exists and parses (cached per size and modification time)."""
        entry = scan.files.get(METADATA_NAME)
        if entry is None:
            return False
        key = (scan.step, entry.size, entry.mtime)
        if key not in self._parsed:
            try:
                self.read_metadata(scan.step)
                self._parsed[key] = True
            except (CheckpointError, OSError, ValueError):
                self._parsed[key] = False
        return self._parsed[key]

    def commit(self, step: int, metadata: bytes) -> None:
        """Publish ``.metadata`` for ``step``, once (see the module docstring)."""
        self.mover.write_file_atomic(self.step_path(step, METADATA_NAME), metadata, True)

    # -- writing and reading --------------------------------------------------------------------------------
    def writer(self, step: int, **options: Any) -> StepWriter:
        """A dcpio writer for ``step`` that refuses to replace a committed checkpoint."""
        return StepWriter(self.step_path(step), overwrite=False, _fs=self.mover, **options)

    def reader(self, step: int, **options: Any) -> FileSystemReader:
        return FileSystemReader(self.step_path(step), _fs=self.mover, **options)

    def put_file(self, step: int, name: str, source: str) -> int:
        """Copy the local file ``source`` to ``name`` in ``step`` through the mover's commit strategy (a temporary
        renamed into place on disk, so a resumed upload replaces what a killed one left; multipart on S3)."""
        staged = stage_file(self.mover, self.step_path(step, name))
        written = 0
        try:
            with open(source, "rb") as f:
                while chunk := f.read(_COPY_CHUNK):
                    written += staged.write([memoryview(chunk)])
            staged.commit(sync=True)
        except BaseException:
            staged.abort()
            raise
        return written

    def put_bytes(self, step: int, name: str, data: bytes) -> None:
        self.mover.write_file_atomic(self.step_path(step, name), data, True)

    def mkdir(self, step: int) -> None:
        self.mover.mkdir(self.step_path(step))

    # -- deletion -------------------------------------------------------------------------------------------
    def remove(self, step: int, name: str) -> None:
        self.mover.remove_quietly(self.step_path(step, name))

    def delete(self, step: int) -> None:
        """Remove a whole step: its ``.metadata`` first (made durable), then the rest."""
        directory = self.step_path(step)
        self.remove(step, METADATA_NAME)
        if not self.is_url:
            try:
                self.mover.sync_dir(directory)
            except FileNotFoundError:
                return
            shutil.rmtree(directory, onerror=_ignore_missing)
            return
        fs = self._fsspec.fs
        base = self._fsspec._p(directory)
        try:
            self._call("deleting the step", directory, lambda: fs.rm(base, recursive=True), writing=True)
        except FileNotFoundError:
            pass
        fs.invalidate_cache(base)


def _ignore_missing(func: Any, path: str, exc_info: Any) -> None:
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


class StepWriter(FileSystemWriter):
    """A :class:`dcpio.FileSystemWriter` that remembers which data files this rank wrote (for the upload)."""

    def __init__(self, path: str | os.PathLike[str], **options: Any) -> None:
        super().__init__(path, **options)
        self.written: tuple[str, ...] = ()

    def _file_name(self, prefix: str, n: int, taken: AbstractSet[str] | None) -> str:
        # always tagged with this save's id: two saves racing for one step never share (and so never remove)
        # each other's data files; only one of them can commit
        return data_file_name(prefix, n, self.save_tag)

    def write_data(self, plan: Any, planner: Any) -> Any:
        future = super().write_data(plan, planner)
        results = future.value()
        self.written = tuple(sorted({str(r.storage_data.relative_path) for r in results}))
        return future
