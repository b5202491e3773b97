"""The one commit path of dcpio: how every writer makes bytes visible under a checkpoint's names.

Rules every strategy keeps:

* Nothing a committed checkpoint names is changed or removed before the new checkpoint is committed. Data files
  of a DCP save are created under names no file has (``__0_0.<tag>.distcp`` when ``__0_0.distcp`` is taken), and
  only the commit point (``.metadata``, ``__{rank}.metadata``, an HF folder's index) replaces anything.
* Temporary files are created exclusively: locally with ``O_CREAT | O_EXCL | O_NOFOLLOW``, so a name that exists
  (a file, or a symlink planted at ``.metadata.tmp``) is never opened or followed. A stale entry at a temporary
  name (a killed save's leftover, a planted link) is unlinked, which removes the link and never its target, and the
  exclusive create is tried again.
* A failed write removes only what it created.

Strategies, chosen from the mover's capability flags by :func:`strategy_for`:

* :class:`AtomicRenameCommit` (``supports_atomic_rename``: local disks): ``<final>.tmp`` created exclusively,
  written, fsynced, renamed over ``<final>`` (atomic on POSIX), then the directory fsynced so the rename survives a
  power loss.
* :class:`PutLastCommit` (object stores): one PUT of the whole object to its final key. An object store shows an
  object whole or not at all, and has no atomic rename (S3's rename is a copy then a delete), so the metadata is
  written last, by one request, once every data object is complete.
* :class:`GroupCommit` (HF folders, whose file names are fixed by the ecosystem): every file is staged under its
  ``.tmp`` name, then all are renamed in order, then the index is committed last (see its docstring for what a crash
  at each point leaves).
* :class:`DirectorySwap` (a command's whole output, ``dcpio convert``): written into a new directory created
  exclusively beside the destination, fsynced, then swapped in by one ``renameat2(RENAME_EXCHANGE)`` (two renames
  where the kernel lacks it); files of the old directory the output format does not own are carried over.

Other writers' entry points (``formats/hf/``, consolidation)::

    from dcpio.commit import GroupCommit, publish_bytes, stage_file

    publish_bytes(fs, "out/model.safetensors.index.json", data, sync=True)   # one small file, all at once

    staged = stage_file(fs, "out/model.safetensors")                         # stream a large file, then commit
    try:
        staged.write([memoryview(header), memoryview(payload)])
        staged.commit(sync=True)
    except BaseException:
        staged.abort()                                                        # removes only the temporary file
        raise

    group = GroupCommit(fs, "out")                                            # several files as one set
    for name in names:
        ...  # group.stage(name) -> StagedFile; write; .finish(sync) (no rename yet)
    group.commit(names, index_name, index_bytes, sync=True)

Saves into one directory are serialised by :class:`SaveLock`; :mod:`dcpio.commit.saves` records which save each
metadata file belongs to.
"""

from __future__ import annotations

from dcpio.commit.directory import DirectorySwap
from dcpio.commit.lock import SaveConflictError, SaveLock
from dcpio.commit.strategies import (
    AtomicRenameCommit,
    CommitStrategy,
    GroupCommit,
    PutLastCommit,
    StagedFile,
    publish_bytes,
    stage_file,
    strategy_for,
    temp_name,
)

__all__ = [
    "AtomicRenameCommit",
    "CommitStrategy",
    "DirectorySwap",
    "GroupCommit",
    "PutLastCommit",
    "SaveConflictError",
    "SaveLock",
    "StagedFile",
    "publish_bytes",
    "stage_file",
    "strategy_for",
    "temp_name",
]
