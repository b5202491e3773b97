"""The local-disk byte mover.

Writes go through ``os.writev`` on a raw descriptor and reads through ``os.preadv`` into the caller's buffer: no
Python-level copy, no buffered-IO layer, and the GIL is released for the whole system call, so several threads
really do move bytes at once. Errors are turned into dcpio's own with the file named.

Scattered reads (a column slice of a stored chunk: one short run per row) go through a read-only memory map of the
file instead: one ``preadv`` per row costs a system call per few KiB, while a strided copy out of the map moves
only the bytes asked for at memory speed. Bytes taken out of maps are not in ``/proc/self/io``'s ``rchar``; the
reader's ``stats.bytes_mapped`` counts them.
"""

from __future__ import annotations

import errno
import io
import mmap
import os
import socket
import stat
import threading
from collections.abc import Generator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import torch

from dcpio.errors import CheckpointReadError, CheckpointWriteError, StorageFullError, UnsafeCheckpointError
from dcpio.movers.base import FileSystemBase, PathLike, ReadHandle, WriteHandle, _truncated

__all__ = ["FileSystem", "LocalReadHandle", "LocalWriteHandle", "write_error"]

_IOV_MAX = 512  # below every platform's IOV_MAX (1024 on Linux)
_MAX_IO = 1 << 30  # Linux moves at most 0x7ffff000 bytes a call; stay below it

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def write_error(path: str, err: OSError, what: str = "writing") -> Exception:
    """Turn an ``OSError`` met while saving into dcpio's error naming the file and the fix."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFullError(
            f"{path}: no space left on the device while {what}. The partial files of this save were removed and "
            "the previous checkpoint is untouched; free space (or delete old checkpoints) and save again."
        )
    if isinstance(err, PermissionError):
        return PermissionError(
            err.errno, f"{path}: permission denied while {what}; check the directory's owner and mode", path
        )
    return CheckpointWriteError(f"{path}: {what} failed: {err.strerror or err}. The previous checkpoint is intact.")


class LocalWriteHandle(WriteHandle):
    def __init__(self, path: str) -> None:
        self.path = path
        try:
            # a new file only: never truncate or write through an existing name or symlink (see dcpio.commit)
            self._fd: int | None = os.open(path, _CREATE_FLAGS, 0o644)
        except FileExistsError:
            raise
        except OSError as err:
            raise write_error(path, err, "creating the file") from err
        self._written = 0

    def write(self, buffers: Sequence[memoryview]) -> int:
        if self._fd is None:
            raise CheckpointWriteError(f"{self.path}: write after close (a bug in dcpio; please report it)")
        pending = [b.cast("B") if b.format != "B" or b.ndim != 1 else b for b in buffers if len(b)]
        total = 0
        try:
            while pending:
                batch: list[memoryview] = []
                size = 0
                for b in pending[:_IOV_MAX]:
                    if size + len(b) > _MAX_IO and batch:
                        break
                    batch.append(b[: _MAX_IO - size] if size + len(b) > _MAX_IO else b)
                    size += len(batch[-1])
                n = os.writev(self._fd, batch)
                total += n
                # drop what was written, keep the rest (a short write is legal)
                rest: list[memoryview] = []
                consumed = n
                for b in pending:
                    if consumed >= len(b):
                        consumed -= len(b)
                        continue
                    rest.append(b[consumed:])
                    consumed = 0
                pending = rest
        except OSError as err:
            raise write_error(self.path, err) from err
        self._written += total
        return total

    def tell(self) -> int:
        return self._written

    def sync(self) -> None:
        if self._fd is None:
            return
        try:
            os.fsync(self._fd)
        except OSError as err:
            raise write_error(self.path, err, "syncing the file") from err

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError as err:
                raise write_error(self.path, err, "closing the file") from err

    def abort(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:  # the file is being removed anyway
                pass


_READ_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)


def _open_regular(path: str) -> int:
    """Open ``path`` for reading only if it is a regular file, never through a final symlink.

    O_NONBLOCK keeps the open of a FIFO from waiting for a writer forever; the flag is dropped again once the file is
    known to be regular (it means nothing for regular files, but stays off for clarity).
    """
    fd = os.open(path, _READ_FLAGS | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO, socket or device"
            raise UnsafeCheckpointError(
                f"{path}: is {kind}, not a regular file; a checkpoint's files are plain files. Something replaced "
                "it; remove it and restore the file from a good copy."
            )
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class LocalReadHandle(ReadHandle):
    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._fd: int | None = _open_regular(path)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                errno.ENOENT,
                f"{path}: a data file the checkpoint's metadata names is missing; the checkpoint is incomplete. "
                "Restore the file or load another checkpoint",
                path,
            ) from err
        except PermissionError as err:
            raise PermissionError(errno.EACCES, f"{path}: permission denied; check the file's mode", path) from err
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise UnsafeCheckpointError(
                    f"{path}: is a symbolic link; dcpio opens checkpoint files without following links (one could "
                    "be swapped in after the path was checked). Copy the real file into the checkpoint instead."
                ) from err
            raise CheckpointReadError(f"{path}: cannot open: {err.strerror or err}") from err
        self._size = os.fstat(self._fd).st_size
        self._map_lock = threading.Lock()
        self._map: mmap.mmap | None = None
        self._map_tensor: torch.Tensor | None = None
        self._map_failed = False

    def size(self) -> int:
        return self._size

    def mapped(self) -> torch.Tensor | None:
        # ACCESS_COPY: a private mapping, so the tensor over it is writable (torch warns about read-only buffers)
        # while the file can never be written through it. Mapped once per handle, shared by the threads.
        with self._map_lock:
            if self._map_tensor is None and not self._map_failed:
                if self._fd is None or self._size == 0:
                    return None
                try:
                    self._map = mmap.mmap(self._fd, self._size, access=mmap.ACCESS_COPY)
                except (OSError, ValueError):  # a file system without mmap: callers use positional reads
                    self._map_failed = True
                    return None
                self._map_tensor = torch.frombuffer(self._map, dtype=torch.uint8)
            return self._map_tensor

    def readinto(self, offset: int, buf: memoryview) -> None:
        if self._fd is None:
            raise CheckpointReadError(f"{self.path}: read after close (a bug in dcpio; please report it)")
        if buf.format != "B" or buf.ndim != 1:
            buf = buf.cast("B")
        want = len(buf)
        got = 0
        try:
            while got < want:
                n = os.preadv(self._fd, [buf[got : got + min(want - got, _MAX_IO)]], offset + got)
                if n == 0:
                    raise _truncated(self.path, offset, want, got)
                got += n
        except OSError as err:
            raise CheckpointReadError(
                f"{self.path}: reading bytes [{offset}, {offset + want}) failed: {err.strerror or err}"
            ) from err

    def readinto_many(self, offset: int, buffers: Sequence[memoryview]) -> None:
        # one preadv for all pieces; a short read (signal, page-cache pressure) finishes piece by piece
        views = [b.cast("B") if b.format != "B" or b.ndim != 1 else b for b in buffers if len(b)]
        total = sum(len(v) for v in views)
        if self._fd is None or not views or total > _MAX_IO or len(views) > _IOV_MAX:
            super().readinto_many(offset, views)
            return
        try:
            got = os.preadv(self._fd, views, offset)
        except OSError as err:
            raise CheckpointReadError(
                f"{self.path}: reading bytes [{offset}, {offset + total}) failed: {err.strerror or err}"
            ) from err
        if got < total:
            pos = 0
            for v in views:
                end = pos + len(v)
                if end > got:
                    start = max(got - pos, 0)
                    self.readinto(offset + pos + start, v[start:])
                pos = end

    def close(self) -> None:
        with self._map_lock:
            self._map_tensor = None
            if self._map is not None:
                mapping, self._map = self._map, None
                try:
                    mapping.close()
                except BufferError:  # a view still uses it; it is unmapped when that view is freed
                    pass
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


_HOST = socket.gethostname().replace("/", "_")


def _sweep_private(path: str) -> None:
    """Remove private files of :meth:`FileSystem.create_new_bytes` left by killed processes of this host."""
    directory, base = os.path.split(path)
    prefix = f"{base}.{_HOST}."
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".new")):
            continue
        pid = name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:  # another process swept it first
                pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


class FileSystem(FileSystemBase):
    """The local filesystem, with zero-copy vectored writes and positional reads."""

    supports_exclusive_create = True

    @contextmanager
    def create_stream(self, path: PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        with Path(path).open(mode) as stream:
            yield cast(io.IOBase, stream)

    def concat_path(self, path: PathLike, suffix: str) -> PathLike:
        return Path(path) / suffix

    def init_path(self, path: PathLike) -> PathLike:
        return Path(path)

    def rename(self, path: PathLike, new_path: PathLike) -> None:
        os.replace(path, new_path)

    def mkdir(self, path: PathLike) -> None:
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(str(path), err, "creating the checkpoint directory") from err

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PathLike) -> bool:
        if isinstance(checkpoint_id, Path):
            return True
        if "://" in str(checkpoint_id):
            return False
        for parent in Path(checkpoint_id).parents:
            if parent.exists() and os.access(str(parent), os.W_OK):
                return True
        return False

    def exists(self, path: PathLike) -> bool:
        return os.path.exists(path)

    def rm_file(self, path: PathLike) -> None:
        os.unlink(path)

    def ls(self, path: PathLike) -> list[str]:
        return [os.path.join(str(path), name) for name in sorted(os.listdir(path))]

    def open_writer(self, path: PathLike) -> WriteHandle:
        return LocalWriteHandle(str(path))

    def open_reader(self, path: PathLike) -> ReadHandle:
        return LocalReadHandle(str(path))

    def create_new_bytes(self, path: PathLike, data: bytes) -> bool:
        # written under a private name, then hard-linked to ``path``: the link fails if the name exists, so the
        # file appears with its whole content or not at all (a reader never sees it empty)
        _sweep_private(str(path))
        private = f"{path}.{_HOST}.{os.getpid()}.{threading.get_ident()}.new"
        handle = LocalWriteHandle(private)
        try:
            handle.write([memoryview(data)])  # no fsync: after a power loss a lock is stale whatever it holds
            handle.close()
            os.link(private, path, follow_symlinks=False)
        except FileExistsError:
            return False
        except OSError as err:
            handle.abort()
            raise write_error(str(path), err, "creating the file") from err
        finally:
            self.remove_quietly(private)
        return True

    def sync_dir(self, path: PathLike) -> None:
        try:
            fd = os.open(str(path) or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:  # some filesystems refuse fsync on directories; rename durability is then theirs
            pass
        finally:
            os.close(fd)

    def local_root(self, path: PathLike) -> str | None:
        return os.path.realpath(path)
