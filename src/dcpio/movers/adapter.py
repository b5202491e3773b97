"""Any torch ``FileSystemBase`` as a dcpio mover: the seam where third-party backends plug in.

torch's own ``FsspecWriter`` is built by assigning ``self.fs = FileSystem()`` after the base class's constructor,
and third-party backends are written the same way against torch's abstract class (``create_stream``, ``rename``,
``exists``, ...). dcpio's writer and reader call more than that (range reads, vectored appends, listing), so a
backend assigned to ``writer.fs`` / ``reader.fs`` is wrapped here: dcpio's fast paths fall back to the backend's
streams, and nothing the backend lacks is assumed (no exclusive create, no listing unless it has ``ls``).
"""

from __future__ import annotations

import io
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

from torch.distributed.checkpoint.filesystem import FileSystemBase as TorchFileSystemBase

from dcpio.movers.base import FileSystemBase, PathLike

__all__ = ["TorchFileSystemAdapter", "as_mover"]


class TorchFileSystemAdapter(FileSystemBase):
    """A dcpio mover over a backend that implements only torch's ``FileSystemBase`` methods.

    Args:
        inner: the backend. Its ``rename`` is trusted to be atomic (torch's own writer relies on that too) unless
            the backend sets ``supports_atomic_rename = False``.

    Example::

        writer = dcpio.FileSystemWriter(path)
        writer.fs = MyTorchStyleFileSystem()   # wrapped in a TorchFileSystemAdapter automatically
    """

    supports_exclusive_create = False

    def __init__(self, inner: TorchFileSystemBase) -> None:
        self.inner = inner
        self.supports_atomic_rename = bool(getattr(inner, "supports_atomic_rename", True))
        self.supports_parallel_reads = bool(getattr(inner, "supports_parallel_reads", False))

    @contextmanager
    def create_stream(self, path: PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        with self.inner.create_stream(path, mode) as stream:
            yield stream

    def concat_path(self, path: PathLike, suffix: str) -> PathLike:
        return self.inner.concat_path(path, suffix)

    def init_path(self, path: PathLike, **kwargs: Any) -> PathLike:
        return self.inner.init_path(path, **kwargs) if kwargs else self.inner.init_path(path)

    def rename(self, path: PathLike, new_path: PathLike) -> None:
        self.inner.rename(path, new_path)

    def mkdir(self, path: PathLike) -> None:
        self.inner.mkdir(path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PathLike) -> bool:
        return True

    def exists(self, path: PathLike) -> bool:
        return bool(self.inner.exists(path))

    def rm_file(self, path: PathLike) -> None:
        self.inner.rm_file(path)

    def ls(self, path: PathLike) -> list[str]:
        lister = getattr(self.inner, "ls", None)
        if not callable(lister):
            raise NotImplementedError(f"{type(self.inner).__name__} cannot list {path}")
        base = str(path).rstrip("/")
        return [f"{base}/{str(e).rstrip('/').rsplit('/', 1)[-1]}" for e in lister(path)]

    def local_root(self, path: PathLike) -> str | None:
        return None


def as_mover(fs: Any) -> FileSystemBase:
    """``fs`` itself if it is a dcpio mover, else a :class:`TorchFileSystemAdapter` around a torch backend."""
    if isinstance(fs, FileSystemBase):
        return fs
    if isinstance(fs, TorchFileSystemBase):
        return TorchFileSystemAdapter(fs)
    raise TypeError(
        f"{type(fs).__name__} is not a file system: assign a torch.distributed.checkpoint.filesystem.FileSystemBase "
        "(or a dcpio mover) to writer.fs / reader.fs"
    )
