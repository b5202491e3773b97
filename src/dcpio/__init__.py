"""dcpio: a fast, safe, drop-in storage layer for ``torch.distributed.checkpoint``.

Use dcpio's classes where you would use torch's::

    import torch.distributed.checkpoint as dcp
    import dcpio

    dcp.save(state_dict, storage_writer=dcpio.FileSystemWriter("ckpt"))
    dcp.load(state_dict, storage_reader=dcpio.FileSystemReader("ckpt"))
"""

from __future__ import annotations

from typing import Any

from dcpio.commit import SaveConflictError
from dcpio.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointReadError,
    CheckpointWriteError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    PlanMismatchError,
    StorageFullError,
    UnsafeCheckpointError,
)
from dcpio.movers.base import FileSystemBase
from dcpio.movers.local import FileSystem
from dcpio.reader import FileSystemReader
from dcpio.transforms import Extension, ExtensionRegistry, StreamTransformExtension, ZStandard
from dcpio.writer import DEFAULT_SUFFIX, FileSystemWriter, SerializationFormat

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SUFFIX",
    "CheckpointError",
    "CheckpointExistsError",
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
    "IncompleteCheckpointError",
    "PlanMismatchError",
    "SaveConflictError",
    "SerializationFormat",
    "StorageFullError",
    "StreamTransformExtension",
    "UnsafeCheckpointError",
    "ZStandard",
    "consolidate_safetensors_files",
]

# optional backends load on first use so that `import dcpio` stays light and works without fsspec/safetensors extras
_LAZY = {
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
    import importlib

    return getattr(importlib.import_module(module), name)
