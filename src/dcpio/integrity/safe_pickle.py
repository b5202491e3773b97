"""Reading ``.metadata`` without running code from it.

torch writes ``.metadata`` with ``pickle.dump`` and reads it with an unrestricted ``pickle.load``: any callable named
in the file runs on load. dcpio's unpickler resolves only an allow-list of names: DCP's own metadata dataclasses,
``torch.Size``, dtypes, layouts, and inert builtins. Any other name is refused in ``find_class``, which pickle calls
when it meets the name and before anything can call it, so a payload hidden deep inside otherwise valid metadata is
stopped too. The result is then checked structurally (types of every field) before anyone uses it.
"""

from __future__ import annotations

import collections
import copyreg
import io
import pathlib
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import metadata as _md
from torch.distributed.checkpoint.filesystem import _StorageInfo

from dcpio._runtime import gc_paused
from dcpio.errors import CorruptCheckpointError, UnsafeCheckpointError

__all__ = ["ALLOWED_GLOBALS", "load_metadata", "restricted_loads"]

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_DCP_FILESYSTEM = "torch.distributed.checkpoint.filesystem"


def _torch_attr_allowed(name: str) -> bool:
    value = getattr(torch, name, None)
    return isinstance(value, torch.dtype | torch.layout | torch.memory_format) or name == "Size"


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    (_DCP_METADATA, "Metadata"): _md.Metadata,
    (_DCP_METADATA, "TensorStorageMetadata"): _md.TensorStorageMetadata,
    (_DCP_METADATA, "BytesStorageMetadata"): _md.BytesStorageMetadata,
    (_DCP_METADATA, "ChunkStorageMetadata"): _md.ChunkStorageMetadata,
    (_DCP_METADATA, "TensorProperties"): _md.TensorProperties,
    (_DCP_METADATA, "MetadataIndex"): _md.MetadataIndex,
    (_DCP_METADATA, "StorageMeta"): _md.StorageMeta,
    (_DCP_METADATA, "_MEM_FORMAT_ENCODING"): _md._MEM_FORMAT_ENCODING,
    (_DCP_FILESYSTEM, "_StorageInfo"): _StorageInfo,
    ("collections", "OrderedDict"): collections.OrderedDict,
    # StorageMeta.checkpoint_id is often a Path; building one runs no I/O
    ("pathlib", "PosixPath"): pathlib.PurePosixPath,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
    ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex,
    ("builtins", "object"): object,
}

_SAFE_CLASSES = frozenset(v for v in ALLOWED_GLOBALS.values() if isinstance(v, type))


def _get_layout(name: object) -> torch.layout:
    # torch pickles a layout as torch.serialization._get_layout("torch.strided"); resolve only real layouts
    value = getattr(torch, name.removeprefix("torch."), None) if isinstance(name, str) else None
    if not isinstance(value, torch.layout):
        raise UnsafeCheckpointError(f"metadata names layout {name!r}, which is not a torch layout; refused")
    return value


def _latin1_encode(text: object, encoding: object = "latin1") -> bytes:
    # pickle protocols 0-2 spell a bytes object as _codecs.encode(<str>, "latin1"); nothing else is admitted
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or len(text) > (64 << 20):
        raise UnsafeCheckpointError(f"_codecs.encode called with {type(text).__name__}, {encoding!r}; refused")
    return text.encode("latin1")


def _bytes(*args: object) -> bytes:
    # protocols 0-2 spell b"" as bytes(); refuse the forms that allocate from an int or read an iterable
    if args and not (len(args) == 1 and isinstance(args[0], bytes | bytearray)):
        raise UnsafeCheckpointError("metadata calls bytes() with arguments; refused")
    return bytes(*args)  # type: ignore[arg-type]


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    # protocol 0/1 pickles build objects through copyreg._reconstructor(cls, object, None); admit only our classes
    if cls not in _SAFE_CLASSES or base is not object or state is not None:
        raise UnsafeCheckpointError(f"copyreg._reconstructor called with {cls!r}, {base!r}; refused")
    return copyreg._reconstructor(cls, base, state)  # type: ignore[attr-defined]


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, where: str) -> None:
        super().__init__(io.BytesIO(data))
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and _torch_attr_allowed(name):
            return getattr(torch, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in (("builtins", "bytes"), ("__builtin__", "bytes")):
            return _bytes
        if (module, name) == ("torch.serialization", "_get_layout"):
            return _get_layout
        if (module, name) == ("copyreg", "_reconstructor"):
            return _reconstructor
        raise UnsafeCheckpointError(
            f"{self._where}: refusing to load '{module}.{name}': checkpoint metadata may only name DCP's metadata "
            "types, torch sizes and dtypes, and plain builtins. This file was crafted or damaged; do not load it "
            "with torch's reader either (it would run that code)."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self._where}: persistent references are not allowed in metadata")


def restricted_loads(data: bytes, where: str) -> Any:
    """Unpickle ``data`` admitting only :data:`ALLOWED_GLOBALS`; ``where`` names the file in errors."""
    try:
        with gc_paused():
            return _RestrictedUnpickler(data, where).load()
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # any parse failure of untrusted bytes is corruption, whatever pickle raised
        raise CorruptCheckpointError(
            f"{where}: not a readable checkpoint metadata file ({type(err).__name__}: {err}). The file is damaged "
            "or truncated; restore it or load an earlier checkpoint."
        ) from err


def _bad(where: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{where}: malformed metadata: {what}. The .metadata file is damaged or was not "
        "written by DCP; restore it or load an earlier checkpoint."
    )


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_sizes(v: object) -> bool:
    return isinstance(v, torch.Size | tuple | list) and all(_is_int(x) and x >= 0 for x in v)


def validate_metadata(md: object, where: str) -> _md.Metadata:
    """Check the type of every field dcpio and torch's planner use; raise :class:`CorruptCheckpointError`."""
    try:
        return _validate(md, where)
    except (AttributeError, TypeError, ValueError) as err:
        # a damaged field name leaves the dataclass without that attribute, a damaged value of the wrong type
        raise _bad(where, f"{type(err).__name__}: {err}") from err


def _validate(md: object, where: str) -> _md.Metadata:
    if not isinstance(md, _md.Metadata):
        raise _bad(where, f"top-level object is {type(md).__name__}, not Metadata")
    if not isinstance(md.state_dict_metadata, dict):
        raise _bad(where, "state_dict_metadata is not a dict")
    for fqn, item in md.state_dict_metadata.items():
        if not isinstance(fqn, str):
            raise _bad(where, f"key {fqn!r} is not a string")
        if isinstance(item, _md.TensorStorageMetadata):
            if not isinstance(item.properties, _md.TensorProperties) or not isinstance(
                item.properties.dtype, torch.dtype
            ):
                raise _bad(where, f"tensor '{fqn}' has no valid dtype")
            if not _check_sizes(item.size) or not isinstance(item.chunks, list):
                raise _bad(where, f"tensor '{fqn}' has an invalid size or chunk list")
            for chunk in item.chunks:
                if not isinstance(chunk, _md.ChunkStorageMetadata):
                    raise _bad(where, f"tensor '{fqn}' has a chunk of type {type(chunk).__name__}")
                if not (_check_sizes(chunk.offsets) and _check_sizes(chunk.sizes)):
                    raise _bad(where, f"tensor '{fqn}' has a chunk with invalid offsets/sizes")
                if len(chunk.offsets) != len(item.size) or len(chunk.sizes) != len(item.size):
                    raise _bad(where, f"tensor '{fqn}': chunk rank differs from the tensor's")
                if any(o + s > d for o, s, d in zip(chunk.offsets, chunk.sizes, item.size)):
                    raise _bad(where, f"tensor '{fqn}': a chunk reaches past the tensor's size {list(item.size)}")
        elif not isinstance(item, _md.BytesStorageMetadata):
            raise _bad(where, f"item '{fqn}' is a {type(item).__name__}")
    if md.storage_data is not None and not isinstance(md.storage_data, dict):
        raise _bad(where, "storage_data is not a dict")
    return md


def load_metadata(data: bytes, where: str) -> _md.Metadata:
    """Parse and validate the bytes of a ``.metadata`` file without running any code from it."""
    return validate_metadata(restricted_loads(data, where), where)
