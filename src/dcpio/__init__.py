"""dcpio: a fast, safe, drop-in storage layer for ``torch.distributed.checkpoint``.

Use dcpio's classes where you would use torch's::

    import torch.distributed.checkpoint as dcp
    import dcpio

    dcp.save(state_dict, storage_writer=dcpio.FileSystemWriter("ckpt"))
    dcp.load(state_dict, storage_reader=dcpio.FileSystemReader("ckpt"))
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from dcpio._version import __version__
from dcpio.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointReadError,
    CheckpointWriteError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    PlanMismatchError,
    SaveConflictError,
    StorageFullError,
    UnsafeCheckpointError,
)

if TYPE_CHECKING:
    from dcpio.engine.sources import IOStats
    from dcpio.formats.hf import HuggingFaceStorageReader, HuggingFaceStorageWriter, consolidate_safetensors_files
    from dcpio.fsspec_storage import FsspecReader, FsspecWriter
    from dcpio.install import install, installed, uninstall
    from dcpio.manager import CheckpointManager
    from dcpio.movers.base import FileSystemBase
    from dcpio.movers.local import FileSystem
    from dcpio.reader import FileSystemReader
    from dcpio.transforms import Extension, ExtensionRegistry, StreamTransformExtension, ZStandard
    from dcpio.writer import DEFAULT_SUFFIX, FileSystemWriter, SerializationFormat

# a library stays silent unless the application configures logging (INFO: one line per save and load)
logging.getLogger("dcpio").addHandler(logging.NullHandler())

__all__ = [
    "DEFAULT_SUFFIX",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointManager",
    "CheckpointReadError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "Extension",
    "ExtensionRegistry",
    "FileSystem",
    "FileSystemBase",
    "FileSystemReader",
    "FileSystemWriter",
    "FsspecReader",
    "FsspecWriter",
    "HuggingFaceStorageReader",
    "HuggingFaceStorageWriter",
    "IOStats",
    "IncompleteCheckpointError",
    "PlanMismatchError",
    "SaveConflictError",
    "SerializationFormat",
    "StorageFullError",
    "StreamTransformExtension",
    "UnsafeCheckpointError",
    "ZStandard",
    "__version__",
    "consolidate_safetensors_files",
    "install",
    "installed",
    "uninstall",
]

# Everything that needs torch loads on first use: `import dcpio` (and so `dcpio --help`, `dcpio --version` and the
# command's argument errors) then costs milliseconds instead of torch's import, and works without the optional extras.
_LAZY = {
    "IOStats": "dcpio.engine.sources",
    "DEFAULT_SUFFIX": "dcpio.writer",
    "FileSystemWriter": "dcpio.writer",
    "SerializationFormat": "dcpio.writer",
    "FileSystemReader": "dcpio.reader",
    "FileSystemBase": "dcpio.movers.base",
    "FileSystem": "dcpio.movers.local",
    "Extension": "dcpio.transforms",
    "ExtensionRegistry": "dcpio.transforms",
    "StreamTransformExtension": "dcpio.transforms",
    "ZStandard": "dcpio.transforms",
    "CheckpointManager": "dcpio.manager",
    "install": "dcpio.install",
    "installed": "dcpio.install",
    "uninstall": "dcpio.install",
    "FsspecWriter": "dcpio.fsspec_storage",
    "FsspecReader": "dcpio.fsspec_storage",
    "HuggingFaceStorageWriter": "dcpio.formats.hf",
    "HuggingFaceStorageReader": "dcpio.formats.hf",
    "consolidate_safetensors_files": "dcpio.formats.hf",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dcpio' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
