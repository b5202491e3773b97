"""Make plain ``dcp.save(sd, checkpoint_id=path)`` / ``dcp.load(sd, checkpoint_id=path)`` calls use dcpio.

Frameworks such as torchtitan pass only a ``checkpoint_id``; torch then picks a storage class itself
(``torch.distributed.checkpoint._storage_utils._storage_setup``): its ``FileSystemWriter``/``FileSystemReader`` for a
local path, its ``FsspecWriter``/``FsspecReader`` for a URL. :func:`install` puts dcpio's classes in the places that
function reads them from (the module globals of ``_storage_utils`` and the attributes of ``_fsspec_filesystem``,
looked up on every call), so those calls get dcpio without editing the framework. :func:`uninstall` puts torch's
classes back. Nothing else of torch changes: calls that pass a ``storage_writer``/``storage_reader`` are unaffected.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["install", "installed", "is_installed", "uninstall"]

_STORAGE_UTILS = "torch.distributed.checkpoint._storage_utils"
_FSSPEC = "torch.distributed.checkpoint._fsspec_filesystem"
_lock = threading.Lock()
# (module, attribute) -> torch's original object, while installed
_saved: dict[tuple[str, str], Any] = {}


def _targets() -> dict[tuple[str, str], Any]:
    from dcpio.reader import FileSystemReader
    from dcpio.writer import FileSystemWriter

    targets: dict[tuple[str, str], Any] = {
        (_STORAGE_UTILS, "FileSystemReader"): FileSystemReader,
        (_STORAGE_UTILS, "FileSystemWriter"): FileSystemWriter,
    }
    try:
        importlib.import_module(_FSSPEC)
        from dcpio.fsspec_storage import FsspecReader, FsspecWriter
    except ImportError:  # no fsspec: torch cannot pick its fsspec classes either
        return targets
    targets[(_FSSPEC, "FsspecReader")] = FsspecReader
    targets[(_FSSPEC, "FsspecWriter")] = FsspecWriter
    return targets


def install() -> None:
    """Route ``dcp.save``/``dcp.load`` calls that pass only a ``checkpoint_id`` through dcpio's classes.

    Idempotent; undone by :func:`uninstall`. Local paths get :class:`dcpio.FileSystemWriter` /
    :class:`dcpio.FileSystemReader`, URLs dcpio's fsspec classes (when ``fsspec`` is installed).

    Example::

        import torch.distributed.checkpoint as dcp, dcpio
        dcpio.install()
        dcp.save(state_dict, checkpoint_id="ckpt/step-100")  # written by dcpio
    """
    with _lock:
        for (module, name), ours in _targets().items():
            mod = importlib.import_module(module)
            if (module, name) not in _saved:
                _saved[(module, name)] = getattr(mod, name)
            setattr(mod, name, ours)


def uninstall() -> None:
    """Give ``dcp.save``/``dcp.load`` torch's own classes back (a no-op when dcpio is not installed).

    Example::

        dcpio.uninstall()
        dcp.load(state_dict, checkpoint_id="ckpt/step-100")  # read by torch's FileSystemReader again
    """
    with _lock:
        for (module, name), original in list(_saved.items()):
            setattr(importlib.import_module(module), name, original)
            del _saved[(module, name)]


def is_installed() -> bool:
    """Whether :func:`install` is in effect."""
    with _lock:
        return bool(_saved)


@contextmanager
def installed() -> Iterator[None]:
    """dcpio's classes for plain ``checkpoint_id`` calls inside the ``with`` block only.

    Example::

        with dcpio.installed():
            dcp.load(state_dict, checkpoint_id="ckpt/step-100")
    """
    was = is_installed()
    install()
    try:
        yield
    finally:
        if not was:
            uninstall()
