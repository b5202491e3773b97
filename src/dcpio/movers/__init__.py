"""Byte movers: the storage backends, and nothing about checkpoints.

* ``base``: the contract (torch's ``FileSystemBase`` plus fast paths and capability flags).
* ``local``: local disks (vectored writes, positional reads, exclusive creates, fsync).
* ``fsspec``: any fsspec URL; ``s3``: its S3 specifics (multipart uploads, conditional PUTs); ``retry``: the retry
  policy and the final error messages of remote stores.
* ``registry``: which mover serves a path or URL, with install hints for missing packages.
* ``adapter``: any torch ``FileSystemBase`` as a mover (for ``writer.fs = ...``).

How bytes become a committed checkpoint is :mod:`dcpio.commit`'s business, chosen from the movers' flags.
"""

from __future__ import annotations

from dcpio.movers.base import FileSystemBase, ReadHandle, WriteHandle
from dcpio.movers.local import FileSystem

__all__ = ["FileSystem", "FileSystemBase", "ReadHandle", "WriteHandle"]
