"""Byte movers: where checkpoint bytes live. ``local`` for disks, ``fsspec`` for object stores and the rest."""

from __future__ import annotations

from dcpio.movers.base import FileSystemBase, ReadHandle, WriteHandle
from dcpio.movers.local import FileSystem

__all__ = ["FileSystem", "FileSystemBase", "ReadHandle", "WriteHandle"]
