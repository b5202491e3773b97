"""Reading ``.metadata`` (and every other pickle a checkpoint carries) without running code from it.

torch writes ``.metadata`` with ``pickle.dump`` and reads it with an unrestricted ``pickle.load``: any callable named
in the file runs on load. dcpio's unpickler resolves only an allow-list of names: DCP's own metadata dataclasses,
``torch.Size``, dtypes, layouts, and inert builtins. Any other name is refused in ``find_class``, which pickle calls
when it meets the name and before anything can call it, so a payload hidden deep inside otherwise valid metadata is
stopped too.

Three more guarantees hold whatever the bytes are:

* **Nothing outside the result is changed.** The pickle ``BUILD`` opcode applies state to whatever object is on the
  stack, a class object included (``setattr`` on the class). So ``find_class`` never hands out a mutable shared
  object: the metadata dataclasses are represented by stand-in classes whose metaclass refuses every attribute
  assignment and whose constructor makes a fresh instance of the real class; helper callables refuse assignment too;
  the remaining allowed classes are immutable built-in types. State therefore only ever reaches fresh instances.
  The enum inside ``TensorProperties`` is decoded from a fresh token, never handed out as the shared enum member.
* **Memory follows the input's size.** CPython's C unpickler sizes its memo from the index a ``PUT`` or
  ``LONG_BINPUT`` names (a 9-byte file can ask for GiBs) and hashes dict keys recursively in C (a deeply nested
  tuple overflows the C stack). A scan at C speed (one regular expression over the opcode stream) admits the C
  unpickler only for inputs whose memo indices stay below the input's size and whose nesting cannot be deep; any
  other input goes through the pure-Python unpickler, whose memo is a dict and which bounds nesting itself. Calls
  that could allocate from a number (``bytearray(1 << 30)``) are refused.
* **The result is checked in one place** (:func:`validate_metadata`): types, ranges, and names of every field dcpio
  or torch's planner uses, so a hostile but well-typed value becomes a :class:`CorruptCheckpointError`.
"""

from __future__ import annotations

import collections
import functools
import io
import pathlib
import pickle
import re
import struct
from collections.abc import Callable
from typing import Any, NoReturn

import torch
from torch.distributed.checkpoint import metadata as _md

from dcpio._runtime import gc_paused
from dcpio._torch_compat import _StorageInfo
from dcpio.errors import CorruptCheckpointError, UnsafeCheckpointError
from dcpio.integrity.paths import check_relative_path

__all__ = ["ALLOWED_GLOBALS", "FrozenCallable", "guarded_loads", "load_metadata", "restricted_loads"]

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_DCP_FILESYSTEM = "torch.distributed.checkpoint.filesystem"

# nesting deeper than this is never written by DCP; deeper tuples would overflow the C stack when hashed
MAX_DEPTH = 64
# integers in sizes, offsets and lengths: far beyond any real file, far below what breaks int -> str
MAX_INT = 1 << 62
# the fast path counts every byte that could build a tuple or frozenset; below this, nesting cannot hurt
_FAST_NESTING_BYTES = 50_000


class _FrozenType(type):
    """Metaclass of the stand-in classes: BUILD's ``setattr`` on the class itself is refused."""

    def __setattr__(cls, name: str, value: object) -> None:
        raise UnsafeCheckpointError(f"the pickle sets attribute {name!r} on class {cls.__name__}; refused")

    def __delattr__(cls, name: str) -> None:
        raise UnsafeCheckpointError(f"the pickle deletes attribute {name!r} of class {cls.__name__}; refused")


class FrozenCallable:
    """A callable that pickle may call but never modify (BUILD onto it is refused before anything is applied).

    Example::

        rebuild = FrozenCallable("rebuild", lambda *args: args)
    """

    __slots__ = ("_fn", "_name")
    _fn: Callable[..., Any]
    _name: str

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def __setattr__(self, name: str, value: object) -> None:
        raise UnsafeCheckpointError(f"the pickle sets attribute {name!r} on {self._name}; refused")

    def __delattr__(self, name: str) -> None:
        raise UnsafeCheckpointError(f"the pickle deletes attribute {name!r} of {self._name}; refused")

    def __repr__(self) -> str:
        return f"<{self._name}>"


class _MemFormatToken:
    """What ``_MEM_FORMAT_ENCODING(n)`` unpickles to: a fresh value, never the shared enum member."""

    __slots__ = ("value",)
    value: int

    def __init__(self, value: int) -> None:
        object.__setattr__(self, "value", value)

    def __setattr__(self, name: str, value: object) -> None:
        raise UnsafeCheckpointError(f"the pickle sets attribute {name!r} on a memory-format value; refused")


_MEM_FORMATS = {
    _md._MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT.value: torch.contiguous_format,
    _md._MEM_FORMAT_ENCODING.TORCH_CHANNELS_LAST.value: torch.channels_last,
    _md._MEM_FORMAT_ENCODING.TORCH_PRESERVE_FORMAT.value: torch.preserve_format,
}
_TP_FIELDS = ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")


class _LoadingTensorProperties(_md.TensorProperties):
    """A ``TensorProperties`` until its state arrives; then it becomes one (same layout, class swapped)."""

    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) == 5:
            dtype, layout, requires_grad, token, pin_memory = state
            fmt = _MEM_FORMATS.get(token.value) if type(token) is _MemFormatToken else None
            values = {"dtype": dtype, "layout": layout, "requires_grad": requires_grad, "pin_memory": pin_memory}
            if fmt is None:
                raise CorruptCheckpointError("TensorProperties state names no known memory format")
            values["memory_format"] = fmt
        elif isinstance(state, dict) and all(type(k) is str and k in _TP_FIELDS for k in state):
            values = dict(state)  # older torch pickled the fields as a plain dict
        else:
            raise CorruptCheckpointError(f"TensorProperties state is a {type(state).__name__}, not its fields")
        self.__dict__.update(values)
        self.__class__ = _md.TensorProperties  # type: ignore[assignment]


def _stand_in(real: type) -> type:
    making = _LoadingTensorProperties if real is _md.TensorProperties else real
    # NEWOBJ calls __new__(cls) with no arguments (copyreg.__newobj__): a blank instance of the real class for BUILD
    # to fill. object.__new__ ignores the extra arguments of classes with their own __init__, and is C, not Python.
    new = staticmethod(functools.partial(object.__new__, making))
    return _FrozenType(real.__name__, (), {"__new__": new, "__slots__": (), "_dcpio_real": real})


_DATACLASSES = (
    _md.Metadata,
    _md.TensorStorageMetadata,
    _md.BytesStorageMetadata,
    _md.ChunkStorageMetadata,
    _md.TensorProperties,
    _md.MetadataIndex,
    _md.StorageMeta,
)
_STAND_INS: dict[type, type] = {real: _stand_in(real) for real in (*_DATACLASSES, _StorageInfo)}


def _mem_format(value: object) -> _MemFormatToken:
    if type(value) is not int or value not in _MEM_FORMATS:
        raise CorruptCheckpointError("metadata names an unknown memory format encoding")
    return _MemFormatToken(value)


def _path(cls: type) -> FrozenCallable:
    def build(*parts: object) -> Any:
        if len(parts) > 4096 or not all(type(p) is str for p in parts):
            raise UnsafeCheckpointError(f"metadata builds a {cls.__name__} from non-string parts; refused")
        return cls(*parts)

    return FrozenCallable(cls.__name__, build)


def _bytearray(*args: object) -> bytearray:
    # bytearray(b"...") (protocols 3+) or bytearray("...", "latin-1") (protocol 2); never bytearray(<int>)
    if not args:
        return bytearray()
    if len(args) == 1 and isinstance(args[0], bytes | bytearray):
        return bytearray(args[0])
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
        return bytearray(args[0], "latin-1")
    raise UnsafeCheckpointError("metadata calls bytearray() with a size or an iterable; refused")


def _get_layout(name: object) -> torch.layout:
    # torch pickles a layout as torch.serialization._get_layout("torch.strided"); resolve only real layouts
    value = getattr(torch, name.removeprefix("torch."), None) if isinstance(name, str) else None
    if not isinstance(value, torch.layout):
        raise UnsafeCheckpointError("metadata names a layout that is not a torch layout; refused")
    return value


def _latin1_encode(text: object, encoding: object = "latin1") -> bytes:
    # pickle protocols 0-2 spell a bytes object as _codecs.encode(<str>, "latin1"); nothing else is admitted
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"_codecs.encode called with a {type(text).__name__}; refused")
    return text.encode("latin1")


def _bytes(*args: object) -> bytes:
    # protocols 0-2 spell b"" as bytes(); refuse the forms that allocate from an int or read an iterable
    if args and not (len(args) == 1 and isinstance(args[0], bytes | bytearray)):
        raise UnsafeCheckpointError("metadata calls bytes() with arguments; refused")
    return bytes(*args)


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    # protocol 0/1 pickles build objects through copyreg._reconstructor(cls, object, None); admit only our classes
    real = getattr(cls, "_dcpio_real", None) if isinstance(cls, _FrozenType) else None
    if real is None or base is not object or state is not None:
        raise UnsafeCheckpointError("copyreg._reconstructor called with a class outside the allow-list; refused")
    return cls.__new__(cls)


_IMMUTABLE_TYPES: dict[tuple[str, str], type] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "object"): object,
}

ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(_DCP_METADATA, real.__name__): stand_in for real, stand_in in _STAND_INS.items() if real is not _StorageInfo},
    (_DCP_FILESYSTEM, "_StorageInfo"): _STAND_INS[_StorageInfo],
    (_DCP_METADATA, "_MEM_FORMAT_ENCODING"): FrozenCallable("_MEM_FORMAT_ENCODING", _mem_format),
    # StorageMeta.checkpoint_id is often a Path; building a pure path runs no I/O
    ("pathlib", "PosixPath"): _path(pathlib.PurePosixPath),
    ("pathlib", "PurePosixPath"): _path(pathlib.PurePosixPath),
    ("pathlib", "WindowsPath"): _path(pathlib.PureWindowsPath),
    ("pathlib", "PureWindowsPath"): _path(pathlib.PureWindowsPath),
    **_IMMUTABLE_TYPES,
    ("builtins", "bytearray"): FrozenCallable("bytearray", _bytearray),
    ("_codecs", "encode"): FrozenCallable("_codecs.encode", _latin1_encode),
    ("builtins", "bytes"): FrozenCallable("bytes", _bytes),
    ("__builtin__", "bytes"): FrozenCallable("bytes", _bytes),
    ("torch.serialization", "_get_layout"): FrozenCallable("_get_layout", _get_layout),
    ("copyreg", "_reconstructor"): FrozenCallable("copyreg._reconstructor", _reconstructor),
}


_PY2_MODULES = {"copy_reg": "copyreg", "__builtin__": "builtins"}


def _torch_attr(name: str) -> Any:
    # dtypes, layouts and memory formats are immutable singletons; torch.Size is an immutable type
    value = getattr(torch, name, None)
    if isinstance(value, torch.dtype | torch.layout | torch.memory_format) or value is torch.Size:
        return value
    return None


def _metadata_class(module: str, name: str, where: str) -> Any:
    module = _PY2_MODULES.get(module, module)
    allowed = ALLOWED_GLOBALS.get((module, name))
    if allowed is None and module == "torch":
        allowed = _torch_attr(name)
    if allowed is None:
        raise UnsafeCheckpointError(
            f"{where}: refusing to load '{module}.{name}': checkpoint metadata may only name DCP's metadata "
            "types, torch sizes and dtypes, and plain builtins. This file was crafted or damaged; do not load it "
            "with torch's reader either (it would run that code)."
        )
    return allowed


# ---------------------------------------------------------------------------------------------------------------
# the opcode scan that admits the C unpickler


def _one_byte_lengths(opcodes: bytes, pad: bytes = b"") -> bytes:
    # an opcode followed by a length n (one byte, then `pad`) and n bytes: one alternative per length
    body = b"|".join(re.escape(bytes([n]) + pad) + (b".{%d}" % n if n else b"") for n in range(256))
    return b"[" + re.escape(opcodes) + b"](?:" + body + b")"


# opcodes CPython's pickler writes for metadata, in rough order of frequency; all others take the exact path
_NO_ARG = b"\x94(}u)\x81b\x85\x86\x87]eatNR\x88\x89\x93\x8f\x90\x91\x92.0s2d1l"
_LONG1 = b"|".join(re.escape(bytes([n])) + (b".{%d}" % n if n else b"") for n in range(9))
_FIXED = b"\\x80.|\\x95.{8}|[hqK].|M..|[jJ]....|G.{8}|\\x8a(?:" + _LONG1 + b")"
_GLOBAL_LINE = b"|c[\\x20-\\x7e]{1,200}\\n[\\x20-\\x7e]{1,200}\\n"


@functools.lru_cache(maxsize=17)
def _scanner(memo_bits: int) -> re.Pattern[bytes]:
    # LONG_BINPUT is admitted with an index below 2**memo_bits (little-endian, 4 bytes)
    if memo_bits <= 24:
        put = b"r..[\\x00-" + re.escape(bytes([(1 << (memo_bits - 16)) - 1])) + b"]\\x00"
    else:
        put = b"r...[\\x00-" + re.escape(bytes([(1 << (memo_bits - 24)) - 1])) + b"]"
    alternatives = [
        b"[" + re.escape(_NO_ARG) + b"]",
        _FIXED,
        _one_byte_lengths(b"\x8cCU"),
        put,
        _one_byte_lengths(b"X", b"\x00\x00\x00"),
    ]
    return re.compile(b"(?:" + b"|".join(alternatives) + _GLOBAL_LINE + b")*+", re.S)


_LONG_LENGTH = {ord("X"): 4, ord("B"): 4, ord("T"): 4, 0x8D: 8, 0x8E: 8, 0x8B: 4}


def _fast_path_ok(data: bytes) -> bool:
    """True when the C unpickler can read ``data`` without outsized allocation or deep recursion."""
    # only tuples hash recursively in C; every TUPLE opcode needs a MARK before it
    tuples = data.count(b"\x85") + data.count(b"\x86") + data.count(b"\x87") + min(data.count(b"t"), data.count(b"("))
    if tuples > _FAST_NESTING_BYTES:
        return False
    scan = _scanner(max(16, min(32, len(data).bit_length() + 1)))
    pos, end = 0, len(data)
    while True:
        match = scan.match(data, pos)
        pos = match.end() if match is not None else pos
        if pos >= end:
            return pos == end
        size = _LONG_LENGTH.get(data[pos])
        if size is None or pos + 1 + size > end:
            return False  # an opcode the scan does not admit: the exact path decides
        length = int.from_bytes(data[pos + 1 : pos + 1 + size], "little")
        pos += 1 + size + length
        if pos > end:
            return False  # a length past the end: the exact path reports the truncation


# the pure-Python unpickler: typeshed describes it as the C one, so it is taken untyped
_PyUnpickler: Any = pickle._Unpickler


class _ExactUnpickler(_PyUnpickler):  # type: ignore[misc]
    """The pure-Python unpickler (dict memo) with BUILD, buffers and nesting bounded."""

    dispatch = dict(_PyUnpickler.dispatch)

    def __init__(self, data: bytes, resolve: Callable[[str, str], Any], persistent: Callable[[Any], Any]) -> None:
        super().__init__(io.BytesIO(data))
        self._resolve, self._persistent, self._size = resolve, persistent, len(data)
        self._depth: dict[int, tuple[object, int]] = {}

    def find_class(self, module: str, name: str) -> Any:
        return self._resolve(module, name)

    def persistent_load(self, pid: Any) -> Any:
        return self._persistent(pid)

    def _nest(self) -> None:
        # a tuple not in the table holds no tuples (depth 1); only deeper ones are recorded
        value = self.stack[-1]
        depth = 1 + max(
            (self._depth[id(v)][1] if id(v) in self._depth else int(type(v) is tuple) for v in value), default=0
        )
        if depth > MAX_DEPTH:
            raise CorruptCheckpointError(f"values nested more than {MAX_DEPTH} levels deep")
        if depth > 1:
            self._depth[id(value)] = (value, depth)  # the value is kept alive so its id is not reused

    def load_build(self) -> None:
        if isinstance(self.stack[-2], type):
            raise UnsafeCheckpointError("the pickle applies state to a class object; refused")
        super().load_build()

    def load_bytearray8(self) -> None:
        (size,) = struct.unpack("<Q", self.read(8))
        if size > self._size:
            raise CorruptCheckpointError(f"a {size}-byte bytearray in a {self._size}-byte pickle")
        buf = bytearray(size)
        self.readinto(buf)
        self.append(buf)

    def _refuse_buffer(self) -> NoReturn:
        raise UnsafeCheckpointError("out-of-band pickle buffers are not allowed in a checkpoint")


def _nesting(name: str) -> Callable[[_ExactUnpickler], None]:
    original = _PyUnpickler.dispatch[getattr(pickle, name)[0]]

    def load(self: _ExactUnpickler) -> None:
        original(self)
        self._nest()

    return load


for _op in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"):
    _ExactUnpickler.dispatch[getattr(pickle, _op)[0]] = _nesting(_op)
_ExactUnpickler.dispatch[pickle.BUILD[0]] = _ExactUnpickler.load_build
_ExactUnpickler.dispatch[pickle.BYTEARRAY8[0]] = _ExactUnpickler.load_bytearray8
_ExactUnpickler.dispatch[pickle.NEXT_BUFFER[0]] = _ExactUnpickler._refuse_buffer
_ExactUnpickler.dispatch[pickle.READONLY_BUFFER[0]] = _ExactUnpickler._refuse_buffer


class _FastUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, resolve: Callable[[str, str], Any], persistent: Callable[[Any], Any]) -> None:
        super().__init__(io.BytesIO(data))
        self._resolve, self._persistent = resolve, persistent

    def find_class(self, module: str, name: str) -> Any:
        return self._resolve(module, name)

    def persistent_load(self, pid: Any) -> Any:
        return self._persistent(pid)


def guarded_loads(data: bytes, resolve: Callable[[str, str], Any], persistent: Callable[[Any], Any]) -> Any:
    """Unpickle untrusted ``data`` with ``resolve`` as ``find_class``, memory and nesting bounded by its size.

    ``resolve`` must only return immutable objects (types that refuse attribute assignment, or
    :class:`FrozenCallable`), so that a BUILD opcode cannot change anything outside the result.

    Example::

        value = guarded_loads(data, lambda module, name: FrozenCallable(name, tuple), refuse)
    """
    cls = _FastUnpickler if _fast_path_ok(data) else _ExactUnpickler
    with gc_paused():
        return cls(data, resolve, persistent).load()


def restricted_loads(data: bytes, where: str) -> Any:
    """Unpickle ``data`` admitting only :data:`ALLOWED_GLOBALS`; ``where`` names the file in errors."""

    def persistent(pid: Any) -> NoReturn:
        raise UnsafeCheckpointError(f"{where}: persistent references are not allowed in metadata")

    try:
        return guarded_loads(data, lambda module, name: _metadata_class(module, name, where), persistent)
    except (UnsafeCheckpointError, CorruptCheckpointError) as err:
        if str(err).startswith(where):
            raise
        raise type(err)(f"{where}: {err}. The file was crafted or damaged; restore it or load an earlier one.") from err
    except Exception as err:  # any parse failure of untrusted bytes is corruption, whatever pickle raised
        raise CorruptCheckpointError(
            f"{where}: the metadata file is there but damaged: it cannot be parsed ({type(err).__name__}: "
            f"{_short(err)}). Restore it from a good copy or load an earlier checkpoint."
        ) from err


def _short(err: BaseException) -> str:
    try:
        return str(err)[:300]
    except Exception:  # a message that cannot even be formatted (a huge int in it) is not worth more
        return type(err).__name__


# ---------------------------------------------------------------------------------------------------------------
# the one structural check of parsed metadata

_FIELDS: dict[type, frozenset[str]] = {
    cls: frozenset(f.name for f in cls.__dataclass_fields__.values()) for cls in (*_DATACLASSES, _StorageInfo)
}
# dcpio records its block and tile checksums as extra attributes of torch's _StorageInfo
_EXTRAS: dict[type, frozenset[str]] = {_StorageInfo: frozenset({"dcpio_checksum", "dcpio_tiles"})}
# fields that may be absent from an instance's state because the class holds their default
_DEFAULTED: dict[type, frozenset[str]] = {
    cls: frozenset(n for n in names if hasattr(cls, n)) for cls, names in _FIELDS.items()
}
_PLAIN_LEAVES = (str, int, float, bool, bytes, type(None))


class _Bad(Exception):
    """A structural problem; :func:`validate_metadata` adds the file name and the advice."""


def _bad(where: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{where}: malformed metadata: {what}. The .metadata file is there but damaged, or was not written by "
        "DCP; restore it from a good copy or load an earlier checkpoint."
    )


def _name(value: object) -> str:
    """A short description of an untrusted value that cannot fail or recurse (no repr of nested data)."""
    if type(value) is str:
        return repr(value[:200])
    if type(value) is int:
        return str(value) if -MAX_INT < value < MAX_INT else f"an integer of {value.bit_length()} bits"
    return f"a {type(value).__name__}"


def _fields(obj: object, cls: type, what: str) -> None:
    if type(obj) is cls and obj.__dict__.keys() == _FIELDS[cls]:
        return  # the common case, checked at C speed
    if type(obj) is not cls:
        raise _Bad(f"{what} is {_name(obj)}, not {cls.__name__}")
    extra = obj.__dict__.keys() - _FIELDS[cls] - _EXTRAS.get(cls, frozenset())
    missing = _FIELDS[cls] - obj.__dict__.keys() - _DEFAULTED[cls]
    if extra or (missing and cls is not _md.TensorProperties):
        raise _Bad(f"{what} has fields {sorted(extra)[:3]} it should not have, or lacks {sorted(missing)[:3]}")


def _int(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value < MAX_INT:
        raise _Bad(f"{what} is {_name(value)}, not a non-negative integer below 2**62")
    return value


def _shape(value: Any, what: str) -> tuple[int, ...]:
    """``value`` as a hashable tuple of sizes (a torch.Size is returned as it is: it only ever holds ints)."""
    kind = type(value)
    if kind is torch.Size:
        if len(value) <= MAX_DEPTH and (not value or (min(value) >= 0 and max(value) < MAX_INT)):
            return value  # type: ignore[no-any-return]
    elif kind in (tuple, list) and len(value) <= MAX_DEPTH:
        return tuple(_int(v, what) for v in value)
    raise _Bad(f"{what} is {_name(value)}, not a tuple of sizes below 2**62")


def _optional_str(value: object, what: str) -> None:
    if value is not None and type(value) is not str:
        raise _Bad(f"{what} is {_name(value)}, not a string")


def _plain(value: object, what: str) -> None:
    """Plain data only (no objects), at most :data:`MAX_DEPTH` deep; iterative, so it cannot recurse."""
    todo: list[tuple[object, int]] = [(value, 0)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, _PLAIN_LEAVES) and type(item) in _PLAIN_LEAVES:
            continue
        if depth >= MAX_DEPTH or type(item) not in (tuple, list, dict):
            raise _Bad(f"{what} holds {_name(item)} at depth {depth}; only plain data is allowed there")
        children = [*item.keys(), *item.values()] if type(item) is dict else item
        todo.extend((child, depth + 1) for child in children)  # type: ignore[attr-defined]


def _check_properties(fqn: str, props: object) -> int:
    """The tensor's element size, after checking its properties."""
    _fields(props, _md.TensorProperties, f"tensor '{fqn}': properties")
    dtype = getattr(props, "dtype", None)
    if not isinstance(dtype, torch.dtype) or not isinstance(getattr(props, "layout", torch.strided), torch.layout):
        raise _Bad(f"tensor '{fqn}' has no valid dtype or layout")
    return dtype.itemsize


def _check_chunk(fqn: str, chunk: object, size: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """The chunk's offsets (hashable) and element count, after checking it lies inside ``size``."""
    _fields(chunk, _md.ChunkStorageMetadata, f"tensor '{fqn}': a chunk")
    offsets = _shape(chunk.offsets, f"tensor '{fqn}': chunk offsets")  # type: ignore[attr-defined]
    sizes = _shape(chunk.sizes, f"tensor '{fqn}': chunk sizes")  # type: ignore[attr-defined]
    if len(offsets) != len(size) or len(sizes) != len(size):
        raise _Bad(f"tensor '{fqn}': a chunk's rank differs from the tensor's")
    volume = 1
    for o, s, d in zip(offsets, sizes, size):
        if o + s > d:
            raise _Bad(f"tensor '{fqn}': a chunk reaches past the tensor's size {list(size)}")
        volume *= s
    return offsets, volume


_CHUNK_KEYS = _FIELDS[_md.ChunkStorageMetadata]


def _check_tensor(fqn: str, item: _md.TensorStorageMetadata) -> list[tuple[int, ...]]:
    """The offsets of the tensor's chunks, after checking sizes, ranges and that the chunks cover the tensor."""
    _fields(item, _md.TensorStorageMetadata, f"tensor '{fqn}'")
    itemsize = _check_properties(fqn, item.properties)
    size = _shape(item.size, f"tensor '{fqn}': size")
    numel = 1
    for dim in size:
        numel *= dim
    if numel * itemsize >= MAX_INT:
        raise _Bad(f"tensor '{fqn}' claims {numel} elements")
    if type(item.chunks) is not list:
        raise _Bad(f"tensor '{fqn}': the chunk list is {_name(item.chunks)}")
    covered = 0
    offsets: list[tuple[int, ...]] = []
    rank = len(size)
    for chunk in item.chunks:
        if type(chunk) is _md.ChunkStorageMetadata and chunk.__dict__.keys() == _CHUNK_KEYS:
            offset, sizes = chunk.offsets, chunk.sizes
            if type(offset) is torch.Size and type(sizes) is torch.Size and len(offset) == len(sizes) == rank:
                # a torch.Size holds only ints; in bounds when offset + size <= dim for every dim
                volume = 1
                for o, n, d in zip(offset, sizes, size):
                    if o < 0 or n < 0 or o + n > d:
                        break
                    volume *= n
                else:
                    covered += volume
                    offsets.append(offset)
                    continue
        checked, volume = _check_chunk(fqn, chunk, size)
        covered += volume
        offsets.append(checked)
    if covered < numel:
        stored = "no stored chunks" if not item.chunks else f"chunks covering only {covered} of {numel} elements"
        raise _Bad(f"tensor '{fqn}' of size {list(size)} is listed with {stored}; loading it would leave it unset")
    return offsets


_INFO_REQUIRED = _FIELDS[_StorageInfo] - _DEFAULTED[_StorageInfo]
_INFO_ALLOWED = _FIELDS[_StorageInfo] | _EXTRAS[_StorageInfo]
_INDEX_ALLOWED = _FIELDS[_md.MetadataIndex]


def _entry_is_plain(index: Any, info: Any) -> bool:
    # the shape of every entry a writer produces, tested at C speed; anything else gets the detailed check
    return (
        type(index) is _md.MetadataIndex
        and type(info) is _StorageInfo
        and type(index.fqn) is str
        and type(index.offset) in (torch.Size, type(None))
        and (index.index is None or type(index.index) is int)
    ) and (
        type(info.relative_path) is str
        and type(info.offset) is int
        and type(info.length) is int
        and 0 <= info.offset < MAX_INT
        and 0 <= info.length < MAX_INT
        and 0 < len(info.relative_path) <= 4096
        and info.transform_descriptors is None
        and _INFO_REQUIRED <= info.__dict__.keys() <= _INFO_ALLOWED
        and index.__dict__.keys() <= _INDEX_ALLOWED
    )


def _check_entry(index: Any, info: Any) -> tuple[str, tuple[int, ...]]:
    _fields(index, _md.MetadataIndex, "a storage key")
    if type(index.fqn) is not str:
        raise _Bad(f"a storage key names {_name(index.fqn)}, not a string")
    offset = () if index.offset is None else _shape(index.offset, f"item '{index.fqn}': offset")
    if index.index is not None:
        _int(index.index, f"item '{index.fqn}': index")
    where = f"item '{index.fqn}'"
    _fields(info, _StorageInfo, f"{where}: storage info")
    if type(info.relative_path) is not str or not 0 < len(info.relative_path) <= 4096:
        raise _Bad(f"{where}: the file name is {_name(info.relative_path)}")
    _int(info.offset, f"{where}: offset")
    _int(info.length, f"{where}: length")
    descriptors = info.transform_descriptors
    if descriptors is not None and not (
        type(descriptors) in (list, tuple) and len(descriptors) <= 64 and all(type(d) is str for d in descriptors)
    ):
        raise _Bad(f"{where}: the transform descriptors are {_name(descriptors)}")
    return index.fqn, offset


def _check_storage(storage: object, chunks: dict[str, list[tuple[int, ...]]], where: str) -> None:
    if storage is None:
        return
    if type(storage) is not dict:
        raise _Bad(f"storage_data is {_name(storage)}, not a dict")
    stored: set[tuple[str, Any]] = set()
    files: dict[str, str] = {}
    for index, info in storage.items():
        if _entry_is_plain(index, info):
            stored.add((index.fqn, index.offset))
        else:
            stored.add(_check_entry(index, info))
        files.setdefault(info.relative_path, index.fqn)
    for name, fqn in files.items():  # a handful of files: confined once each
        check_relative_path(name, f"{where}: item '{fqn}'")
    for fqn, offsets in chunks.items():
        for offset in offsets:
            if (fqn, offset) not in stored:
                raise _Bad(f"tensor '{fqn}': the chunk at offsets {list(offset)} has no stored bytes in storage_data")


def _check_storage_meta(meta: object) -> None:
    if meta is None:
        return
    _fields(meta, _md.StorageMeta, "storage_meta")
    if meta.checkpoint_id is not None and type(meta.checkpoint_id) not in (  # type: ignore[attr-defined]
        str,
        pathlib.PurePosixPath,
        pathlib.PureWindowsPath,
    ):
        raise _Bad(f"storage_meta.checkpoint_id is {_name(meta.checkpoint_id)}")  # type: ignore[attr-defined]
    _optional_str(meta.save_id, "storage_meta.save_id")  # type: ignore[attr-defined]
    _optional_str(meta.load_id, "storage_meta.load_id")  # type: ignore[attr-defined]
    modules = meta.modules  # type: ignore[attr-defined]
    if type(modules) is not list or not all(type(m) is str for m in modules):
        raise _Bad(f"storage_meta.modules is {_name(modules)}, not a list of strings")


def _validate(md: object, where: str) -> _md.Metadata:
    _fields(md, _md.Metadata, "the top-level object")
    assert isinstance(md, _md.Metadata)  # for the type checker; _fields checked the exact type
    if type(md.state_dict_metadata) is not dict:
        raise _Bad(f"state_dict_metadata is {_name(md.state_dict_metadata)}, not a dict")
    chunks: dict[str, list[tuple[int, ...]]] = {}
    for fqn, item in md.state_dict_metadata.items():
        if type(fqn) is not str:
            raise _Bad(f"a key is {_name(fqn)}, not a string")
        if type(item) is _md.TensorStorageMetadata:
            chunks[fqn] = _check_tensor(fqn, item)
        elif type(item) is _md.BytesStorageMetadata:
            _fields(item, _md.BytesStorageMetadata, f"item '{fqn}'")
        else:
            raise _Bad(f"item '{fqn}' is {_name(item)}")
    _check_storage(md.storage_data, chunks if type(md.storage_data) is dict else {}, where)
    _check_storage_meta(md.storage_meta)
    _optional_str(md.version, "version")
    _check_planner_data(md.planner_data)
    return md


def _check_planner_data(data: object) -> None:
    # torch's default planners store {fqn: (path, of, keys)}; test that shape quickly, anything else in detail
    if type(data) is dict:
        for key, path in data.items():
            if (
                type(key) is not str
                or type(path) is not tuple
                or not all(type(p) is str or type(p) is int for p in path)
            ):
                _plain(path, f"planner_data for {_name(key)}")
                _plain(key, "a planner_data key")
        return
    _plain(data, "planner_data")


def validate_metadata(md: object, where: str) -> _md.Metadata:
    """Check the type and range of every field dcpio and torch's planner use; raise :class:`CorruptCheckpointError`.

    Example::

        metadata = validate_metadata(pickle_result, "ckpt/.metadata")
    """
    try:
        return _validate(md, where)
    except _Bad as err:
        raise _bad(where, str(err)) from None
    except (AttributeError, TypeError, ValueError, RecursionError) as err:
        # a damaged field name leaves the dataclass without that attribute, a damaged value of the wrong type
        raise _bad(where, f"{type(err).__name__}: {_short(err)}") from err


def load_metadata(data: bytes, where: str) -> _md.Metadata:
    """Parse and validate the bytes of a ``.metadata`` file without running any code from it.

    Example::

        metadata = load_metadata(Path("ckpt/.metadata").read_bytes(), "ckpt/.metadata")
    """
    return validate_metadata(restricted_loads(data, where), where)
