"""The byte movers' contract: everything dcpio needs from a storage backend, and nothing about checkpoints.

The protocol classes (writer, reader) speak DCP; a byte mover only creates, appends, reads ranges, renames, lists and
removes. A local disk, an fsspec store and an in-memory store differ only below this seam.

:class:`FileSystemBase` keeps torch's abstract interface (``create_stream``, ``concat_path``, ``init_path``,
``rename``, ``mkdir``, ``validate_checkpoint_id``, ``exists``, ``rm_file``, ``ls``) so code written against torch's
class keeps working, and adds the fast paths the I/O engine uses: an append handle that takes a list of buffers
(zero-copy from tensor memory), and a read handle that fills a caller's buffer from a byte range.
"""

from __future__ import annotations

import io
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Generator, Sequence
from contextlib import contextmanager
from typing import IO, Any, cast

import torch
from torch.distributed.checkpoint.filesystem import FileSystemBase as _TorchFileSystemBase

from dcpio.errors import CheckpointWriteError, CorruptCheckpointError
from dcpio.movers.capabilities import Capabilities, local_capabilities

__all__ = ["FileSystemBase", "ReadHandle", "StreamReadHandle", "StreamWriteHandle", "WriteHandle"]

PathLike = str | os.PathLike[str]


class WriteHandle(ABC):
    """An open file being written front to back."""

    path: str

    @abstractmethod
    def write(self, buffers: Sequence[memoryview]) -> int:
        """Append every buffer, in order; return the number of bytes written."""

    @abstractmethod
    def tell(self) -> int:
        """Bytes written so far."""

    @abstractmethod
    def sync(self) -> None:
        """Make the bytes durable (fsync where the store has it; a no-op where a close is the commit)."""

    @abstractmethod
    def close(self) -> None:
        """Finish the file. For object stores this is where the object becomes visible."""

    def abort(self) -> None:
        """Give up on the file: close what can be closed, never raise. The caller removes the file."""
        try:
            self.close()
        except Exception:  # an abort runs on an error path already being reported
            pass


class ReadHandle(ABC):
    """An open file read by byte ranges, safe to share between threads."""

    path: str

    @abstractmethod
    def size(self) -> int:
        """The file's length in bytes."""

    @abstractmethod
    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``[offset, offset + len(buf))``; raise if the file ends before."""

    def readinto_many(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Fill ``buffers`` from consecutive bytes starting at ``offset`` (one request where the store allows)."""
        for buf in buffers:
            if len(buf):
                self.readinto(offset, buf)
                offset += len(buf)

    def mapped(self) -> torch.Tensor | None:
        """The whole file as a read-only uint8 CPU tensor over a memory map, or None where the store has none.

        Used for scattered reads; the tensor is valid until :meth:`close`. Like any memory map, it requires that
        nobody truncates the file while it is being loaded.
        """
        return None

    def capabilities(self) -> Capabilities:
        """What the I/O planner may assume of this file (see :mod:`dcpio.movers.capabilities`).

        The default describes a kernel file system, with memory maps where :meth:`mapped` is overridden; an object
        store's handle returns :func:`~dcpio.movers.capabilities.object_store_capabilities`.
        """
        return local_capabilities(can_map=type(self).mapped is not ReadHandle.mapped)

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        self.readinto(offset, memoryview(out))
        return bytes(out)

    @abstractmethod
    def close(self) -> None:
        """Release the handle."""


def _truncated(path: str, offset: int, want: int, got: int) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path}: file ends early: wanted bytes [{offset}, {offset + want}) but only {got} could be read. "
        "The file is truncated or was replaced; restore it from a good copy or save the checkpoint again."
    )


def _write_error(path: str, err: OSError, what: str = "writing") -> Exception:
    from dcpio.movers.local import write_error  # local.py builds on this module

    return write_error(path, err, what)


class StreamWriteHandle(WriteHandle):
    """A :class:`WriteHandle` over any writable binary stream (the fallback for ``create_stream`` backends)."""

    def __init__(self, path: str, stream: IO[bytes], closer: Any = None) -> None:
        self.path = path
        self._stream = stream
        self._closer = closer
        self._written = 0

    def write(self, buffers: Sequence[memoryview]) -> int:
        n = 0
        for b in buffers:
            view = b.cast("B") if b.format != "B" or b.ndim != 1 else b
            pos = 0
            while pos < len(view):
                # raw streams may take part of a buffer (a short write is legal); None means "all of it" for
                # streams that do not count
                try:
                    done = self._stream.write(view[pos:])
                except OSError as err:
                    raise _write_error(self.path, err) from err
                step = len(view) - pos if done is None else int(done)
                if step <= 0:
                    raise CheckpointWriteError(
                        f"{self.path}: the stream accepted no bytes at byte {self._written + n + pos} (the backend's "
                        "write returned 0); the store is full or broken. The previous checkpoint is intact."
                    )
                pos += step
            n += len(view)
        self._written += n
        return n

    def tell(self) -> int:
        return self._written

    def sync(self) -> None:
        try:
            self._stream.flush()
        except OSError as err:
            raise _write_error(self.path, err, "flushing the file") from err
        fileno = getattr(self._stream, "fileno", None)
        if fileno is None:
            return
        try:
            os.fsync(fileno())
        except (OSError, io.UnsupportedOperation, AttributeError):
            # object-store streams have no descriptor: their close() is the durability point
            pass

    def close(self) -> None:
        try:
            if self._closer is not None:
                closer, self._closer = self._closer, None
                closer.__exit__(None, None, None)
            else:
                self._stream.close()
        except OSError as err:  # buffered bytes meet a full disk at the last flush
            raise _write_error(self.path, err, "closing the file") from err


class StreamReadHandle(ReadHandle):
    """A :class:`ReadHandle` over a seekable binary stream; a lock serialises seek+read between threads."""

    def __init__(self, path: str, stream: IO[bytes], closer: Any = None) -> None:
        self.path = path
        self._stream = stream
        self._closer = closer
        self._lock = threading.Lock()
        self._size: int | None = None

    def size(self) -> int:
        if self._size is None:
            with self._lock:
                self._size = self._stream.seek(0, io.SEEK_END)
        return self._size

    def readinto(self, offset: int, buf: memoryview) -> None:
        want = len(buf)
        got = 0
        with self._lock:
            self._stream.seek(offset)
            while got < want:
                readinto = getattr(self._stream, "readinto", None)
                if readinto is not None:
                    n = readinto(buf[got:])
                else:
                    chunk = self._stream.read(want - got)
                    n = len(chunk)
                    buf[got : got + n] = chunk
                if not n:
                    raise _truncated(self.path, offset, want, got)
                got += n

    def close(self) -> None:
        if self._closer is not None:
            closer, self._closer = self._closer, None
            closer.__exit__(None, None, None)


class FileSystemBase(_TorchFileSystemBase):
    """Abstract byte mover. Subclasses implement torch's stream interface; the fast paths have fallbacks.

    Capability flags tell the I/O engine what the store can do well:

    * ``supports_parallel_reads``: several threads may read ranges of one file at once.
    * ``supports_atomic_rename``: ``rename`` replaces the target atomically (POSIX). Read by
      :func:`dcpio.commit.strategy_for`: object stores commit by writing the metadata object last instead.
    * ``supports_exclusive_create``: :meth:`open_writer` refuses a name that exists (``O_EXCL | O_NOFOLLOW``)
      instead of writing through it; where False, the commit module checks and clears the name first.
    * ``supports_atomic_writes``: a file written through :meth:`open_writer` appears whole at ``close`` and not at
      all after ``abort`` (an S3 upload). Only then may a put-last commit stream straight to the final name.
    """

    supports_parallel_reads: bool = True
    supports_atomic_rename: bool = True
    supports_exclusive_create: bool = False
    supports_atomic_writes: bool = False

    @contextmanager
    @abstractmethod
    def create_stream(self, path: PathLike, mode: str) -> Generator[io.IOBase, None, None]: ...

    @abstractmethod
    def ls(self, path: PathLike) -> list[str]:
        """Full paths of the entries directly under ``path``."""

    def open_writer(self, path: PathLike) -> WriteHandle:
        """Create ``path`` for appending: a new file (``FileExistsError`` if the name is taken) where the mover has
        ``supports_exclusive_create``, else created or truncated."""
        cm = self.create_stream(path, "wb")
        stream = cm.__enter__()
        return StreamWriteHandle(str(path), cast(IO[bytes], stream), closer=cm)

    def open_reader(self, path: PathLike) -> ReadHandle:
        """Open ``path`` for range reads."""
        cm = self.create_stream(path, "rb")
        stream = cm.__enter__()
        return StreamReadHandle(str(path), cast(IO[bytes], stream), closer=cm)

    def read_file(self, path: PathLike, limit: int) -> bytes:
        """The whole of a small file, refusing one larger than ``limit`` bytes."""
        handle = self.open_reader(path)
        try:
            size = handle.size()
            if size > limit:
                raise CorruptCheckpointError(
                    f"{path}: {size} bytes, more than the {limit}-byte cap for this kind of file; "
                    "it is not what dcpio wrote. Raise DCPIO_MAX_METADATA_BYTES only if you trust it."
                )
            return handle.read(0, size)
        finally:
            handle.close()

    def write_file_atomic(self, path: PathLike, data: bytes, sync: bool) -> None:
        """Publish ``data`` at ``path`` all at once through the commit module (:func:`dcpio.commit.publish_bytes`)."""
        from dcpio.commit import publish_bytes  # the commit module builds on this one

        publish_bytes(self, str(path), data, sync)

    def put_bytes(self, path: PathLike, data: bytes) -> None:
        """Store ``data`` as the whole of ``path`` in one operation (the put-last commit's primitive)."""
        handle = self.open_writer(path)
        try:
            handle.write([memoryview(data)])
            handle.close()
        except BaseException:
            handle.abort()
            raise

    def create_new_bytes(self, path: PathLike, data: bytes) -> bool:
        """Create ``path`` holding ``data`` if no entry has that name; False if one does (used for lock files).

        Atomic where the mover has ``supports_exclusive_create`` or overrides this (a conditional PUT); elsewhere a
        check then a write, which two writers can still race through.
        """
        if self.exists(path):
            return False
        self.put_bytes(path, data)
        return True

    def replace(self, path: PathLike, new_path: PathLike) -> None:
        """Rename ``path`` over ``new_path``, replacing it."""
        self.rename(path, new_path)

    def sync_dir(self, path: PathLike) -> None:
        """Make a directory's entries durable; a no-op where the store has no directories."""

    def remove_quietly(self, path: PathLike) -> None:
        """Remove ``path`` if it exists, ignoring a file that is already gone."""
        try:
            if self.exists(path):
                self.rm_file(path)
        except FileNotFoundError:
            pass

    def local_root(self, path: PathLike) -> str | None:
        """The real local directory behind ``path``, or None for a remote store (used for symlink checks)."""
        return None
