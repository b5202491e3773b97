"""The commit of a command's whole output (``dcpio convert``): stage a new directory beside the destination, make it
durable, swap it in. See :class:`DirectorySwap` and the rules in :mod:`dcpio.commit`."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Callable

__all__ = ["DirectorySwap"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _fsync_path(path: str, directory: bool) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):  # some file systems refuse fsync on directories
            raise
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Swap two directory entries atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), a)


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links: a copy keeps the content just the same
        shutil.copy2(src, dst)


class DirectorySwap:
    """A whole output (a directory, or one file) written into a new directory created exclusively beside ``dst``,
    then swapped in: the commit of ``dcpio convert``, whose output replaces a previous one as a whole.

    ``path`` is where the output is written, :meth:`commit` publishes it and :meth:`abort` removes what was staged;
    nothing at ``dst`` changes before :meth:`commit`. A directory output carries over (hard links, or copies) every
    entry of the old ``dst`` that its format does not own (``owns(name)`` False: ``config.json``, tokenizer files),
    is made durable (every file and directory fsynced), then replaces the old directory in one atomic exchange
    (``renameat2(RENAME_EXCHANGE)``) where the kernel has it, two renames otherwise. A file output is renamed over
    ``dst``. Local paths only.

    Example::

        swap = DirectorySwap("out/model", directory=True, owns=dcpio.names.owned_by_hf)
        try:
            write_everything_into(swap.path)
            swap.commit()
        except BaseException:
            swap.abort()
            raise
    """

    def __init__(self, dst: str, directory: bool, owns: Callable[[str], bool] | None = None) -> None:
        # a symlinked DST: the output replaces what it points to, and the link keeps pointing there
        self.dst = os.path.realpath(dst)
        self.directory = directory
        self.owns = owns or (lambda _name: True)
        parent = os.path.dirname(self.dst)
        os.makedirs(parent, exist_ok=True)
        self.root = tempfile.mkdtemp(prefix=f".{os.path.basename(self.dst)}.dcpio-stage-", dir=parent)
        self.path = self.root if directory else os.path.join(self.root, os.path.basename(self.dst))

    def _sync_staged(self) -> None:
        for here, _dirs, files in os.walk(self.root):
            for name in files:
                if not os.path.islink(os.path.join(here, name)):
                    _fsync_path(os.path.join(here, name), directory=False)
            _fsync_path(here, directory=True)

    def _carry_over(self) -> None:
        for name in sorted(os.listdir(self.dst)):
            if self.owns(name) or os.path.lexists(os.path.join(self.root, name)):
                continue
            src, target = os.path.join(self.dst, name), os.path.join(self.root, name)
            if os.path.isdir(src) and not os.path.islink(src):
                shutil.copytree(src, target, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(src, target)

    def commit(self) -> None:
        parent = os.path.dirname(self.dst)
        if not self.directory:
            self._sync_staged()
            os.replace(self.path, self.dst)
            _fsync_path(parent, directory=True)
            os.rmdir(self.root)
            return
        exists = os.path.isdir(self.dst)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(self.root, os.stat(self.dst).st_mode & 0o7777 if exists else 0o777 & ~mask)
        if exists:
            self._carry_over()
        self._sync_staged()
        if not exists:
            os.rename(self.root, self.dst)
        elif _exchange(self.root, self.dst):
            shutil.rmtree(self.root)  # the old output, now under the stage's name
        else:
            old = f"{self.root}.old"
            os.rename(self.dst, old)
            os.rename(self.root, self.dst)
            shutil.rmtree(old)
        _fsync_path(parent, directory=True)

    def abort(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
