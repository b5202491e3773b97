"""The one exception hierarchy of dcpio.

Every error dcpio raises on purpose is a :class:`CheckpointError` (a plain ``Exception``), or a built-in
``FileNotFoundError`` / ``PermissionError`` where that is exactly what happened. Messages say *what* went
wrong, *where* (the file, the tensor, the byte range) and *what to do*.

Hierarchy::

    CheckpointError
    ├── CorruptCheckpointError      bytes on storage do not match what was written (checksum, truncation, structure)
    ├── UnsafeCheckpointError       metadata or a file name tries to run code or escape the checkpoint directory
    ├── IncompleteCheckpointError   no committed metadata: the save never finished, or this is not a checkpoint
    ├── CheckpointExistsError       ``overwrite=False`` and a committed checkpoint is already there (also a
    │                               ``RuntimeError`` saying "Checkpoint already exists", as torch's writer does)
    ├── StorageFullError            the device ran out of space (ENOSPC / EDQUOT) during a save
    ├── CheckpointWriteError        any other failure while writing
    ├── CheckpointReadError         any other failure while reading
    └── PlanMismatchError           what the caller asked for does not fit what the checkpoint holds
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointReadError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "IncompleteCheckpointError",
    "PlanMismatchError",
    "SaveConflictError",
    "StorageFullError",
    "UnsafeCheckpointError",
]


class CheckpointError(Exception):
    """Base class of every error dcpio raises on purpose."""


class CorruptCheckpointError(CheckpointError):
    """Stored bytes differ from what was written: a checksum mismatch, a truncated file, a broken record."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint asks for something dcpio refuses to do: run code, or touch a path outside the checkpoint."""


class IncompleteCheckpointError(CheckpointError):
    """There is no committed metadata: the save never finished, or the path is not a checkpoint."""


class CheckpointExistsError(CheckpointError, RuntimeError):
    """A committed checkpoint is already there and the writer was told not to overwrite it.

    Also a ``RuntimeError`` whose message contains torch's phrase "Checkpoint already exists", so code written
    against torch's ``FileSystemWriter`` (``except RuntimeError``, ``match="Checkpoint already exists"``) keeps working.

    Example::

        try:
            dcp.save(sd, storage_writer=dcpio.FileSystemWriter(path, overwrite=False))
        except dcpio.CheckpointExistsError:
            ...
    """

    TORCH_PHRASE = "Checkpoint already exists"

    def __init__(self, message: str = "") -> None:
        if self.TORCH_PHRASE not in message:
            message = f"{message} ({self.TORCH_PHRASE}.)" if message else f"{self.TORCH_PHRASE}."
        super().__init__(message)


class StorageFullError(CheckpointError):
    """The storage device ran out of space during a save; partial files were removed."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed for a reason other than a full disk."""


class CheckpointReadError(CheckpointError):
    """Reading a checkpoint failed for a reason other than corruption."""


class PlanMismatchError(CheckpointError):
    """The load plan asks for a tensor or a shape that the checkpoint does not hold."""


class SaveConflictError(CheckpointWriteError):
    """Another save is writing into the same checkpoint directory; this one stopped before writing anything."""
