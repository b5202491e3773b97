"""Every file a checkpoint names must stay inside the checkpoint's directory.

``relative_path`` comes from untrusted metadata: ``../../etc/passwd``, an absolute path or a symlink pointing out of
the directory would make the reader open (or the writer's cleanup remove) files that are not the checkpoint's.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence

from dcpio.errors import UnsafeCheckpointError

__all__ = ["check_plain_name", "check_relative_path", "check_stays_inside", "confined", "hub_blobs"]


def check_relative_path(relative: object, where: str) -> str:
    """Return ``relative`` if it is a plain relative name inside the checkpoint; raise otherwise."""
    if not isinstance(relative, str) or not relative:
        raise UnsafeCheckpointError(f"{where}: a data file name in the metadata is {relative!r}, not a file name")
    if "\x00" in relative or "\\" in relative:
        raise UnsafeCheckpointError(f"{where}: data file name {relative!r} has forbidden characters; refused")
    if relative.startswith("/") or os.path.isabs(relative) or "://" in relative:
        raise UnsafeCheckpointError(
            f"{where}: data file name {relative!r} is absolute; a checkpoint may only name files inside its own "
            "directory. The metadata was crafted or damaged; refused."
        )
    norm = posixpath.normpath(relative)
    if norm == ".." or norm.startswith("../") or norm == ".":
        raise UnsafeCheckpointError(
            f"{where}: data file name {relative!r} points outside the checkpoint directory; refused."
        )
    return relative


def check_stays_inside(root: str, relative: str, where: str, also: Sequence[str] = ()) -> None:
    """For local checkpoints: refuse a name that resolves (through symlinks) outside ``root`` (and the real
    directories in ``also``)."""
    real_root = os.path.realpath(root)
    target = os.path.realpath(os.path.join(real_root, relative))
    if not any(os.path.commonpath([r, target]) == r for r in (real_root, *also)):
        raise UnsafeCheckpointError(
            f"{where}: data file {relative!r} resolves to {target}, outside the checkpoint directory {real_root} "
            "(a symlink pointing out?); refused."
        )


def check_plain_name(name: object, directory: str, where: str) -> str:
    """Return ``name`` if it is one plain file name (no directory part), as an HF index must give; raise otherwise."""
    rel = check_relative_path(name, where)
    if "/" in rel or rel in (".", ".."):
        raise UnsafeCheckpointError(
            f"{where}: names file {rel!r}, which is not a plain file name inside {directory}; refusing to read it"
        )
    return rel


def hub_blobs(local_root: str) -> str | None:
    """The ``blobs`` directory of a huggingface_hub cache entry when ``local_root`` is one of its snapshots.

    The hub cache keeps ``models--org--name/snapshots/<revision>/model.safetensors`` as a symlink to
    ``../../blobs/<hash>``: the files of a snapshot live outside the snapshot's directory, in its own repository's
    store, and nowhere else.
    """
    snapshots = os.path.dirname(local_root)
    if os.path.basename(snapshots) != "snapshots":
        return None
    blobs = os.path.join(os.path.dirname(snapshots), "blobs")
    return os.path.realpath(blobs) if os.path.isdir(blobs) else None


def confined(local_root: str | None, relative: str, where: str, also: Sequence[str] = ()) -> None:
    """The one confinement check of every reader and command: a safe relative name that, for a local checkpoint
    (``local_root`` is its real directory), does not resolve through a symlink to anything outside it (or outside
    the real directories in ``also``, such as a hub snapshot's ``blobs``)."""
    check_relative_path(relative, where)
    if local_root is not None:
        check_stays_inside(local_root, relative, where, also)
