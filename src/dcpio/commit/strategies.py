"""Commit strategies: how a file, or a set of files, becomes visible under its final name.

See :mod:`dcpio.commit` for the rules they keep and when each is used.
"""

from __future__ import annotations

import posixpath
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

from dcpio.errors import CheckpointError, CheckpointWriteError
from dcpio.movers.base import FileSystemBase, WriteHandle
from dcpio.names import TEMP_SUFFIX

__all__ = [
    "AtomicRenameCommit",
    "CommitStrategy",
    "GroupCommit",
    "PutLastCommit",
    "StagedFile",
    "publish_bytes",
    "stage_file",
    "strategy_for",
    "temp_name",
]


def temp_name(final: str) -> str:
    """The temporary name a file is staged under before its commit (``<final>.tmp``)."""
    return f"{final}{TEMP_SUFFIX}"


def _dirname(path: str) -> str:
    return posixpath.dirname(str(path).replace("\\", "/")) or "."


def _unlink_stale(fs: FileSystemBase, temp: str, err: OSError) -> None:
    """Remove whatever sits at a temporary name: the entry itself (a symlink is removed, never followed)."""
    try:
        fs.rm_file(temp)
    except FileNotFoundError:
        return
    except (OSError, CheckpointError) as rm_err:
        raise CheckpointWriteError(
            f"{temp}: the temporary name this save needs is taken ({err.strerror or err}) and the entry there "
            f"cannot be removed ({rm_err}). The previous checkpoint is intact; remove {temp} and save again."
        ) from rm_err


def create_exclusive(fs: FileSystemBase, temp: str) -> WriteHandle:
    """Open a new file at ``temp`` without ever writing through an existing entry.

    Movers with ``supports_exclusive_create`` refuse an existing name themselves (``O_EXCL | O_NOFOLLOW``); for the
    others an existing entry is removed first. A stale entry (a killed save's leftover, a planted symlink) is
    unlinked once and the create tried again; a second refusal means another writer races for the same name.
    """
    if not fs.supports_exclusive_create and fs.exists(temp):
        _unlink_stale(fs, temp, FileExistsError(17, "exists", temp))
    try:
        return fs.open_writer(temp)
    except FileExistsError as err:
        _unlink_stale(fs, temp, err)
    try:
        return fs.open_writer(temp)
    except FileExistsError as err:
        raise CheckpointWriteError(
            f"{temp}: another writer created this temporary file while this save was replacing a stale one. "
            "Two saves are writing into one directory; let one finish, then save again."
        ) from err


class StagedFile:
    """A file being written under its temporary name (or, on object stores, straight to its final key).

    ``write`` appends, ``commit`` makes it visible under ``final``, ``abort`` removes only what it created.
    """

    def __init__(self, fs: FileSystemBase, final: str, temp: str, handle: WriteHandle) -> None:
        self.fs = fs
        self.final = final
        self.temp = temp
        self.handle = handle
        self._finished = False

    def write(self, buffers: Sequence[memoryview]) -> int:
        """Append every buffer, in order; return the bytes written."""
        return self.handle.write(buffers)

    def tell(self) -> int:
        """Bytes written so far."""
        return self.handle.tell()

    def finish(self, sync: bool) -> None:
        """Complete the bytes (fsync where asked, close) without publishing them yet; see :class:`GroupCommit`."""
        if sync:
            self.handle.sync()
        self.handle.close()
        self._finished = True

    def commit(self, sync: bool) -> None:
        """Finish the file and publish it under its final name (rename, then fsync of the directory)."""
        if not self._finished:
            self.finish(sync)
        if self.temp != self.final:
            self.fs.replace(self.temp, self.final)
            if sync:
                self.fs.sync_dir(_dirname(self.final))

    def abort(self) -> None:
        """Give up: close the handle and remove the temporary file this stage created. Never raises."""
        self.handle.abort()
        if self.temp == self.final:
            return  # an object written straight to its key appears only on a successful close: nothing to remove
        try:
            self.fs.remove_quietly(self.temp)
        except (OSError, CheckpointError):  # the error being reported matters more than a leftover .tmp
            pass


class CommitStrategy(ABC):
    """How one file is made visible under its final name."""

    name: str = ""

    @abstractmethod
    def stage(self, fs: FileSystemBase, final: str) -> StagedFile:
        """Open ``final`` for streaming; nothing is visible under ``final`` until :meth:`StagedFile.commit`."""

    def publish(self, fs: FileSystemBase, final: str, data: bytes, sync: bool) -> None:
        """Write ``data`` and publish it at ``final`` all at once: readers see the old content or the new."""
        staged = self.stage(fs, final)
        try:
            staged.write([memoryview(data)])
            staged.commit(sync)
        except BaseException:
            staged.abort()
            raise


class AtomicRenameCommit(CommitStrategy):
    """Local disks: ``<final>.tmp`` created exclusively, written, fsynced, renamed over ``final``, directory fsynced.

    A crash before the rename leaves ``final`` as it was (plus a ``.tmp`` the next commit unlinks); after the rename
    and the directory fsync, the new content is durable. ``rename`` replacing an existing name is atomic on POSIX.
    """

    name = "atomic-rename"

    def stage(self, fs: FileSystemBase, final: str) -> StagedFile:
        temp = temp_name(final)
        return StagedFile(fs, final, temp, create_exclusive(fs, temp))


class PutLastCommit(CommitStrategy):
    """Object stores: the whole object PUT to its final key, as the last request of a save.

    A PUT (or a multipart upload's completion) is atomic: readers see the previous object or the new one. A save
    that dies before it leaves the previous metadata naming the previous objects, which are removed only after.
    A streamed file goes straight to its key only where the mover has ``supports_atomic_writes``; elsewhere it is
    staged under ``<final>.tmp`` and copied over ``final`` at the commit.
    """

    name = "put-last"

    def stage(self, fs: FileSystemBase, final: str) -> StagedFile:
        if fs.supports_atomic_writes:
            # an upload becomes the object only when it completes; an aborted one leaves the old object
            return StagedFile(fs, final, final, fs.open_writer(final))
        # stores that show a file while it is written (memory://): stage aside, publish by a copy at the commit
        temp = temp_name(final)
        return StagedFile(fs, final, temp, create_exclusive(fs, temp))

    def publish(self, fs: FileSystemBase, final: str, data: bytes, sync: bool) -> None:
        fs.put_bytes(final, data)


def strategy_for(fs: FileSystemBase) -> CommitStrategy:
    """The strategy the mover's capabilities call for: rename where it is atomic, put-last elsewhere.

    Example::

        strategy_for(dcpio.FileSystem()).name                      # "atomic-rename"
        strategy_for(FsspecFileSystem("memory://x")).name          # "put-last"
    """
    return AtomicRenameCommit() if fs.supports_atomic_rename else PutLastCommit()


def stage_file(fs: FileSystemBase, final: str) -> StagedFile:
    """Open ``final`` for streaming through the mover's commit strategy (see :func:`strategy_for`).

    Example::

        staged = stage_file(dcpio.FileSystem(), "out/model.safetensors")
        try:
            staged.write([memoryview(header), memoryview(data)])
            staged.commit(sync=True)
        except BaseException:
            staged.abort()
            raise
    """
    return strategy_for(fs).stage(fs, str(final))


def publish_bytes(fs: FileSystemBase, final: str, data: bytes, sync: bool) -> None:
    """Publish a small file (metadata, an index) all at once through the mover's commit strategy.

    Example::

        publish_bytes(dcpio.FileSystem(), "ckpt/.metadata", pickle.dumps(metadata), sync=True)
    """
    strategy_for(fs).publish(fs, str(final), data, sync)


class GroupCommit:
    """Several files committed as one set, for layouts whose file names are fixed (HF folders).

    Order, and what a crash at each point leaves:

    1. :meth:`stage` each file as ``<name>.tmp`` (created exclusively), write it, :meth:`StagedFile.finish` it
       (fsync, close). A crash here leaves the previous set and its index untouched, plus ``.tmp`` files that the
       next commit into the folder replaces.
    2. :meth:`commit` renames every staged file over its final name, in sorted order, then fsyncs the directory. A
       crash during these renames (milliseconds) can leave some new files beside the previous index: the fixed
       names allow no single atomic switch. Every file is still whole (a rename never exposes a partial file).
    3. The index is published last (:func:`publish_bytes`). Once it is durable, the new set is committed; files of
       the previous set that the new index does not name are removed only after this point, by the caller.

    Example::

        group = GroupCommit(fs, "export")
        for name, tensors in files.items():
            staged = group.stage(name)
            write_staged(staged, ..., publish=False)        # dcpio.formats.safetensors; finish, no rename yet
        group.commit(files, "model.safetensors.index.json", index_bytes, sync=True)
    """

    def __init__(self, fs: FileSystemBase, directory: str) -> None:
        self.fs = fs
        self.directory = str(directory)

    def _path(self, name: str) -> str:
        return str(self.fs.concat_path(self.directory, name))

    def stage(self, name: str) -> StagedFile:
        """Open ``<name>.tmp`` in the folder exclusively; :meth:`commit` later renames it to ``name``."""
        final = self._path(name)
        temp = temp_name(final)
        return StagedFile(self.fs, final, temp, create_exclusive(self.fs, temp))

    def publish_staged(self, names: Iterable[str], sync: bool) -> None:
        """Step 2: rename every staged ``names`` entry to its final name, in sorted order; fsync the directory."""
        for name in sorted(set(names)):
            final = self._path(name)
            self.fs.replace(temp_name(final), final)
        if sync:
            self.fs.sync_dir(self.directory)

    def commit(self, names: Iterable[str], index_name: str, index: bytes, sync: bool) -> None:
        """Steps 2 and 3: publish the staged files, then the index (in this folder) last."""
        self.publish_staged(names, sync)
        publish_bytes(self.fs, self._path(index_name), index, sync)

    def abort(self, names: Iterable[str]) -> None:
        """Remove the staged ``.tmp`` files of ``names`` (only those: files of the committed set stay)."""
        for name in set(names):
            try:
                self.fs.remove_quietly(temp_name(self._path(name)))
            except (OSError, CheckpointError):  # on an error path already being reported
                pass
