"""The ``torch.save`` record format of one DCP tensor item, written straight from tensor memory.

A ``torch.save`` file is a zip archive of *stored* (uncompressed) records: ``<name>/data.pkl`` (a small pickle
that says dtype, shape, stride and which storage record holds the bytes), a few tiny records (``byteorder``,
``version``...) and ``<name>/data/0`` (the raw tensor bytes, 64-byte aligned). dcpio writes the envelope (every
byte before and after the tensor data) itself and hands the tensor's memory to ``os.writev`` unchanged, so a
tensor costs its write and nothing else. ``torch.load`` reads the result as usual.

The zip CRC-32 field of the data record is written as 0, as torch does with
``torch.serialization.config.save.compute_crc32 = False``: ``torch.load`` never checks it and zlib's CRC-32
runs at 3.8 GB/s here, slower than the disk. Integrity comes from dcpio's block checksums instead
(:mod:`dcpio.integrity.checksum`), which cover every stored byte and are verified on load.

Parsing goes the other way and treats the bytes as untrusted: the central directory is located from the end of the
item, every offset is checked against the item's length, sizes are capped, the pickle is read by a restricted
unpickler that only records what ``_rebuild_tensor_v2/_v3`` would be called with, and the tensor's extent is checked
against its storage record.
"""

from __future__ import annotations

import pickle
import struct
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dcpio.errors import CorruptCheckpointError, UnsafeCheckpointError
from dcpio.integrity.safe_pickle import FrozenCallable, guarded_loads
from dcpio.knobs import max_record_header_bytes

__all__ = ["ZIP_MAGIC", "TensorRecord", "c_strides", "encode_envelope", "parse_tensor_item", "parse_verified_head"]

ZIP_MAGIC = b"PK\x03\x04"
_ALIGN = 64
_PREFIX = "archive"
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_EOCD = struct.Struct("<IHHHHIIH")
_EOCD64 = struct.Struct("<IQHHIIQQQQ")
_LOCATOR64 = struct.Struct("<IIQI")
_SIG_LOCAL, _SIG_CENTRAL, _SIG_EOCD = 0x04034B50, 0x02014B50, 0x06054B50
_SIG_EOCD64, _SIG_LOCATOR64 = 0x06064B50, 0x07064B50
_U32 = 0xFFFFFFFF
_FLAG_UTF8 = 0x0800
_PAD_TAG = 0x4246  # "FB": the padding extra field torch also uses; readers skip unknown extra tags

# dtypes with a legacy typed-storage class pickle as _rebuild_tensor_v2(torch.<Name>Storage, ...); the rest as
# _rebuild_tensor_v3(torch.storage.UntypedStorage, ..., dtype). Both are what torch.save itself emits.
_LEGACY_STORAGE: dict[torch.dtype, str] = {
    torch.uint8: "ByteStorage",
    torch.int8: "CharStorage",
    torch.int16: "ShortStorage",
    torch.int32: "IntStorage",
    torch.int64: "LongStorage",
    torch.float16: "HalfStorage",
    torch.float32: "FloatStorage",
    torch.float64: "DoubleStorage",
    torch.complex64: "ComplexFloatStorage",
    torch.complex128: "ComplexDoubleStorage",
    torch.bool: "BoolStorage",
    torch.bfloat16: "BFloat16Storage",
}
_STORAGE_DTYPE = {name: dtype for dtype, name in _LEGACY_STORAGE.items()}


# ----------------------------------------------------------------------------------------------------- writing
def _pickle_atom(value: object) -> bytes:
    # the opcodes pickle itself picks for an int/str, without the PROTO header and STOP
    return pickle.dumps(value, protocol=2)[2:-1]


def _pickle_tuple(values: tuple[int, ...]) -> bytes:
    return b"(" + b"".join(_pickle_atom(v) for v in values) + b"t"


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def c_strides(size: Sequence[int]) -> tuple[int, ...]:
    """Element strides of a C-contiguous tensor of ``size`` (what ``torch.empty(size).stride()`` gives)."""
    strides = [1] * len(size)
    for d in range(len(size) - 2, -1, -1):
        strides[d] = strides[d + 1] * max(size[d + 1], 1)
    return tuple(strides)


def _tensor_pickle(dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    numel = 1
    for s in shape:
        numel *= s
    stride_t = c_strides(shape)
    legacy = _LEGACY_STORAGE.get(dtype)
    if legacy is not None:
        storage_type, count, rebuild = _global("torch", legacy), numel, "_rebuild_tensor_v2"
        tail = b""
    else:
        storage_type, count, rebuild = (
            _global("torch.storage", "UntypedStorage"),
            numel * dtype.itemsize,
            "_rebuild_tensor_v3",
        )
        tail = _global("torch", str(dtype).removeprefix("torch."))
    persistent = b"(" + _pickle_atom("storage") + storage_type + _pickle_atom("0") + _pickle_atom("cpu")
    persistent += _pickle_atom(count) + b"tQ"
    body = persistent + _pickle_atom(0) + _pickle_tuple(shape) + _pickle_tuple(stride_t) + b"\x89"
    body += _global("collections", "OrderedDict") + b")R" + tail
    return b"\x80\x02" + _global("torch._utils", rebuild) + b"(" + body + b"tR."


def _extra(zip64_sizes: int | None, pad_to: int | None, header_end: int) -> bytes:
    """Extra field: optional zip64 sizes, then padding so the record's data starts ``pad_to``-aligned."""
    extra = b""
    if zip64_sizes is not None:
        extra += struct.pack("<HHQQ", 0x0001, 16, zip64_sizes, zip64_sizes)
    if pad_to:
        pad = (-(header_end + len(extra))) % pad_to
        if pad:
            if pad < 4:
                pad += pad_to
            extra += struct.pack("<HH", _PAD_TAG, pad - 4) + b"Z" * (pad - 4)
    return extra


@dataclass
class _Entry:
    name: bytes
    offset: int
    size: int
    crc: int


def encode_envelope(dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[bytes, bytes]:
    """The bytes before and after the tensor's data for a C-contiguous tensor of ``dtype``/``shape``.

    ``head + <numel * itemsize bytes of tensor data> + tail`` is a complete ``torch.save`` archive.
    """
    nbytes = dtype.itemsize
    for s in shape:
        nbytes *= s
    head, entries = _local_records(dtype, shape, nbytes)
    return bytes(head), _encode_tail(entries, len(head) + nbytes)


def _local_records(dtype: torch.dtype, shape: tuple[int, ...], nbytes: int) -> tuple[bytearray, list[_Entry]]:
    """The archive's small members (stored whole) and the local header of ``data/0``, whose bytes follow."""
    small = [
        ("data.pkl", _tensor_pickle(dtype, shape)),
        (".format_version", b"1"),
        (".storage_alignment", b"64"),
        ("byteorder", b"little"),
        ("version", b"3\n"),
        (".data/serialization_id", b"0" * 40),
    ]
    head = bytearray()
    entries: list[_Entry] = []
    for name, payload in small:
        raw = f"{_PREFIX}/{name}".encode()
        offset = len(head)
        extra = _extra(None, _ALIGN, offset + _LOCAL.size + len(raw))
        crc = zlib.crc32(payload)
        head += _LOCAL.pack(
            _SIG_LOCAL, 20, _FLAG_UTF8, 0, 0, 0x21, crc, len(payload), len(payload), len(raw), len(extra)
        )
        head += raw + extra + payload
        entries.append(_Entry(raw, offset, len(payload), crc))
    raw = f"{_PREFIX}/data/0".encode()
    offset = len(head)
    big = nbytes >= _U32
    extra = _extra(nbytes if big else None, _ALIGN, offset + _LOCAL.size + len(raw))
    size32 = _U32 if big else nbytes
    head += _LOCAL.pack(_SIG_LOCAL, 45 if big else 20, _FLAG_UTF8, 0, 0, 0x21, 0, size32, size32, len(raw), len(extra))
    head += raw + extra
    entries.append(_Entry(raw, offset, nbytes, 0))
    return head, entries


def _encode_tail(entries: list[_Entry], cd_offset: int) -> bytes:
    """The central directory at ``cd_offset`` (zip64 fields where sizes or offsets need them) and the end records."""
    central = bytearray()
    for entry in entries:
        fields: list[int] = []
        usize = entry.size
        if usize >= _U32:
            fields += [usize, usize]
        off = entry.offset
        if off >= _U32:
            fields.append(off)
        extra = struct.pack(f"<HH{len(fields)}Q", 0x0001, 8 * len(fields), *fields) if fields else b""
        s32 = _U32 if usize >= _U32 else usize
        o32 = _U32 if off >= _U32 else off
        version = 45 if fields else 20
        crc = entry.crc
        central += _CENTRAL.pack(
            _SIG_CENTRAL,
            45,
            version,
            _FLAG_UTF8,
            0,
            0,
            0x21,
            crc,
            s32,
            s32,
            len(entry.name),
            len(extra),
            0,
            0,
            0,
            0,
            o32,
        )
        central += entry.name + extra
    eocd64_offset = cd_offset + len(central)
    n = len(entries)
    tail = bytes(central)
    tail += _EOCD64.pack(_SIG_EOCD64, 44, 45, 45, 0, 0, n, n, len(central), cd_offset)
    tail += _LOCATOR64.pack(_SIG_LOCATOR64, 0, eocd64_offset, 1)
    tail += _EOCD.pack(_SIG_EOCD, 0, 0, n, n, min(len(central), _U32), min(cd_offset, _U32), 0)
    return tail


# ----------------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class TensorRecord:
    """Where one ``torch.save``'d tensor's bytes are, relative to the start of its item, and how to view them."""

    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int  # in elements
    data_offset: int  # first byte of the storage record, relative to the item's start
    data_length: int  # bytes of the storage record

    @property
    def is_c_contiguous(self) -> bool:
        expected = 1
        for s, st in zip(reversed(self.size), reversed(self.stride)):
            if s != 1 and st != expected:
                return False
            expected *= s
        return True


@dataclass(frozen=True)
class _StorageRef:
    dtype: torch.dtype | None  # None: untyped (v3), sizes in bytes
    key: str
    count: int


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype | None


@dataclass(frozen=True)
class _Rebuilt:
    storage: _StorageRef
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype | None


def _rebuild_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, *_rest: Any) -> _Rebuilt:
    return _Rebuilt(storage, storage_offset, tuple(size), tuple(stride), None)


def _rebuild_v3(
    storage: Any, storage_offset: Any, size: Any, stride: Any, _rg: Any, _hooks: Any, dtype: Any, *_rest: Any
) -> _Rebuilt:
    return _Rebuilt(storage, storage_offset, tuple(size), tuple(stride), dtype)


_REBUILD_V2 = FrozenCallable("_rebuild_tensor_v2", _rebuild_v2)
_REBUILD_V3 = FrozenCallable("_rebuild_tensor_v3", _rebuild_v3)


def _record_class(module: str, name: str, where: str) -> Any:
    """Resolve a name in a tensor record's pickle: only what torch's rebuild of a plain tensor needs."""
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
        return _REBUILD_V2
    if module == "torch._utils" and name == "_rebuild_tensor_v3":
        return _REBUILD_V3
    if module == "collections" and name == "OrderedDict":
        return OrderedDict
    if module == "torch" and name in _STORAGE_DTYPE:
        return _StorageType(_STORAGE_DTYPE[name])
    if module == "torch.storage" and name == "UntypedStorage":
        return _StorageType(None)
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    raise UnsafeCheckpointError(
        f"{where}: the tensor record names '{module}.{name}', which a plain tensor never needs; "
        "refusing to load it (it could run code). The file was crafted or damaged."
    )


def _storage_ref(pid: Any, where: str) -> _StorageRef:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
        raise CorruptCheckpointError(f"{where}: unexpected storage reference in tensor record")
    _, stype, key, _location, count = pid
    if not isinstance(key, str) or type(count) is not int or not 0 <= count < 1 << 62:
        raise CorruptCheckpointError(f"{where}: malformed storage reference in tensor record")
    return _StorageRef(stype.dtype, key, count)


def _load_record(pkl: bytes, where: str) -> Any:
    # memory and nesting bounded by the record's size, and BUILD cannot reach anything but fresh objects
    return guarded_loads(pkl, lambda module, name: _record_class(module, name, where), lambda p: _storage_ref(p, where))


_MAX_INT = 1 << 62  # far beyond any real size, far below what breaks int -> str in messages


def _corrupt(where: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{where}: {what}. The data file is damaged or truncated; restore it from a good copy or load an earlier "
        "checkpoint (`dcpio verify` lists every damaged tensor)."
    )


def parse_tensor_item(read: Callable[[int, int], bytes], length: int, where: str) -> TensorRecord:
    """Locate and validate the tensor inside one ``torch.save`` archive of ``length`` bytes.

    ``read(offset, n)`` returns ``n`` bytes at ``offset`` relative to the item's start. ``where`` names the file
    and the tensor in errors. In steps: the end record frames the directory, the directory lists the records, each
    record's local header is checked against it, then the pickle says where the tensor's storage is.
    """
    if length < _EOCD.size + _LOCAL.size:
        raise _corrupt(where, f"item of {length} bytes is too short to be a torch.save record")
    records = _directory_records(_central_directory(read, length, where), where)
    prefix = next((n[: -len("/data.pkl")] for n in records if n.endswith("/data.pkl") and n.count("/") == 1), None)
    if prefix is None:
        raise _corrupt(where, "no data.pkl record: not a torch.save record")

    def at(name: str) -> tuple[int, int]:
        return _record_bytes_at(read, length, records, name, where)

    cap = max_record_header_bytes()
    pkl_start, pkl_size = at(f"{prefix}/data.pkl")
    if pkl_size > cap:
        raise _corrupt(where, f"data.pkl of {pkl_size} bytes exceeds the {cap}-byte cap")
    if f"{prefix}/byteorder" in records:
        bo_start, bo_size = at(f"{prefix}/byteorder")
        if bo_size <= 16 and read(bo_start, bo_size) not in (b"little",):
            raise _corrupt(where, "tensor was saved big-endian; dcpio reads little-endian records only")
    alignment = None
    if f"{prefix}/.storage_alignment" in records:
        al_start, al_size = at(f"{prefix}/.storage_alignment")
        raw_align = read(al_start, al_size) if al_size <= 8 else b""
        alignment = int(raw_align) if raw_align.isdigit() else None
    return _tensor_record(read(pkl_start, pkl_size), lambda key: at(f"{prefix}/data/{key}"), alignment, where)


def _end_record(read: Callable[[int, int], bytes], length: int, where: str) -> tuple[bytes, int]:
    """The item's last bytes and the position of the end-of-central-directory record in them."""
    tail_len = min(length, 4096)  # the directory of a tensor record is well under 1 KiB
    tail = read(length - tail_len, tail_len)
    pos = tail.rfind(struct.pack("<I", _SIG_EOCD))
    if (pos < 0 or pos + _EOCD.size > len(tail)) and tail_len < length:
        # a zip comment can push the end record further back (up to 64 KiB); look there before giving up
        tail_len = min(length, (1 << 16) + _EOCD.size)
        tail = read(length - tail_len, tail_len)
        pos = tail.rfind(struct.pack("<I", _SIG_EOCD))
    if pos < 0 or pos + _EOCD.size > len(tail):
        raise _corrupt(where, "no zip end-of-central-directory record: not a torch.save record")
    return tail, pos


def _central_directory(read: Callable[[int, int], bytes], length: int, where: str) -> tuple[bytes, int]:
    """The central directory's bytes and its entry count, bounds-checked against the item."""
    tail, pos = _end_record(read, length, where)
    _, _, _, _, total, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, pos)
    loc_pos = pos - _LOCATOR64.size
    if loc_pos >= 0 and struct.unpack_from("<I", tail, loc_pos)[0] == _SIG_LOCATOR64:
        _, _, eocd64_offset, _ = _LOCATOR64.unpack_from(tail, loc_pos)
        if eocd64_offset + _EOCD64.size > length:
            raise _corrupt(where, "zip64 end record points past the item")
        sig, _, _, _, _, _, _, total, cd_size, cd_offset = _EOCD64.unpack(read(eocd64_offset, _EOCD64.size))
        if sig != _SIG_EOCD64:
            raise _corrupt(where, "bad zip64 end-of-central-directory signature")
    if total > 1024 or cd_size > max_record_header_bytes() or cd_offset + cd_size > length:
        raise _corrupt(where, f"central directory ({total} entries, {cd_size} bytes at {cd_offset}) out of range")
    tail_start = length - len(tail)
    if cd_offset >= tail_start and cd_offset + cd_size <= length:
        return tail[cd_offset - tail_start : cd_offset - tail_start + cd_size], total
    return read(cd_offset, cd_size), total


def _directory_records(directory: tuple[bytes, int], where: str) -> dict[str, tuple[int, int, int]]:
    """Name -> (local header offset, size, name length) for every stored (uncompressed) record."""
    cd, total = directory
    records: dict[str, tuple[int, int, int]] = {}
    p = 0
    for _ in range(total):
        if p + _CENTRAL.size > len(cd):
            raise _corrupt(where, "central directory is truncated")
        fields = _CENTRAL.unpack_from(cd, p)
        if fields[0] != _SIG_CENTRAL:
            raise _corrupt(where, "bad central directory entry signature")
        method, csize, usize, nlen, elen, clen, off = (fields[i] for i in (4, 8, 9, 10, 11, 12, 16))
        name = cd[p + _CENTRAL.size : p + _CENTRAL.size + nlen].decode("utf-8", "replace")
        extra = cd[p + _CENTRAL.size + nlen : p + _CENTRAL.size + nlen + elen]
        if usize == _U32 or csize == _U32 or off == _U32:
            usize, csize, off = _zip64_fields(extra, usize, csize, off, where)
        if method != 0 or csize != usize:
            raise _corrupt(where, f"record {name!r} is compressed; torch.save records are stored")
        if name in records:
            raise _corrupt(where, f"record {name!r} appears twice")
        records[name] = (off, usize, nlen)
        p += _CENTRAL.size + nlen + elen + clen
    return records


def _record_bytes_at(
    read: Callable[[int, int], bytes], length: int, records: dict[str, tuple[int, int, int]], name: str, where: str
) -> tuple[int, int]:
    """Where record ``name``'s bytes are, after its local header has been checked against the directory."""
    if name not in records:
        raise _corrupt(where, f"record {name!r} is missing")
    off, size, _ = records[name]
    if off + _LOCAL.size > length:
        raise _corrupt(where, f"record {name!r} header lies past the item's end")
    nlen = len(name.encode())
    header = read(off, min(_LOCAL.size + nlen + 1024, length - off))
    local = _LOCAL.unpack_from(header)
    if local[0] != _SIG_LOCAL:
        raise _corrupt(where, f"record {name!r}: bad local header signature")
    elen = local[10]
    # the local header must repeat the directory's name, and its extra fields must tile their declared length:
    # a damaged length here would shift where the data is read from
    if local[9] != nlen or header[_LOCAL.size : _LOCAL.size + nlen] != name.encode():
        raise _corrupt(where, f"record {name!r}: local header names another record")
    extra = header[_LOCAL.size + nlen : _LOCAL.size + nlen + elen]
    if len(extra) == elen and not _extra_tiles(extra):
        raise _corrupt(where, f"record {name!r}: malformed extra field in its local header")
    start = off + _LOCAL.size + local[9] + local[10]
    if start + size > length:
        raise _corrupt(where, f"record {name!r} ([{start}, {start + size})) reaches past the item's end ({length})")
    return start, size


def _tensor_record(
    pkl: bytes, storage_at: Callable[[str], tuple[int, int]], alignment: int | None, where: str
) -> TensorRecord:
    """Validate the pickle of a tensor record and where its storage record lies; build the :class:`TensorRecord`."""
    try:
        obj = _load_record(pkl, where)
    except (UnsafeCheckpointError, CorruptCheckpointError):
        raise
    except Exception as err:  # a damaged pickle may raise anything; all of it is corruption
        raise _corrupt(where, f"tensor record's pickle is unreadable ({type(err).__name__}: {err})") from err
    if not isinstance(obj, _Rebuilt) or not isinstance(obj.storage, _StorageRef):
        raise _corrupt(where, f"record holds a {type(obj).__name__}, not a plain tensor")
    dtype = obj.dtype if obj.storage.dtype is None else obj.storage.dtype
    if not isinstance(dtype, torch.dtype):
        raise _corrupt(where, "tensor record has no dtype")
    if not (
        len(obj.size) == len(obj.stride) <= 64
        and all(type(v) is int and 0 <= v < _MAX_INT for v in (*obj.size, *obj.stride, obj.storage_offset))
    ):
        raise _corrupt(where, "tensor record has an invalid size, stride or offset")
    storage_bytes = obj.storage.count * (1 if obj.storage.dtype is None else dtype.itemsize)
    data_start, data_size = storage_at(obj.storage.key)
    if alignment is not None and 0 < alignment <= 1 << 16 and data_start % alignment:
        # torch (and dcpio) align storage records; a misaligned one means a damaged header shifted the data
        raise _corrupt(where, f"storage record starts at byte {data_start}, not {alignment}-byte aligned")
    if data_size != storage_bytes:
        raise _corrupt(where, f"storage record has {data_size} bytes, the pickle says {storage_bytes}")
    numel = 1
    for s in obj.size:
        numel *= s
    if numel:
        reach = obj.storage_offset + sum((s - 1) * st for s, st in zip(obj.size, obj.stride)) + 1
        if reach * dtype.itemsize > data_size:
            raise _corrupt(where, f"tensor of size {list(obj.size)} reaches past its {data_size}-byte storage")
    if numel > 1 and data_size == numel * dtype.itemsize and not _dense(obj.size, obj.stride):
        # a storage exactly the tensor's size must be covered once: overlapping strides mean a damaged record
        raise _corrupt(where, f"tensor of size {list(obj.size)} has overlapping strides {list(obj.stride)}")
    return TensorRecord(dtype, obj.size, obj.stride, obj.storage_offset, data_start, data_size)


# parsed heads, by (head bytes, item length): the result depends on nothing else, and the hundreds of norm
# vectors or layer matrices of one shape share a head byte for byte
_HEADS: dict[tuple[bytes, int], TensorRecord] = {}
_HEADS_MAX = 4096


def parse_verified_head(head: bytes, item_length: int, where: str) -> TensorRecord:
    """Parse the envelope head of a record dcpio wrote, already checked against its recorded digest.

    dcpio's records carry their sizes in the local headers and end the head with the storage record's header, so
    the head alone locates the data: one read instead of the directory walk :func:`parse_tensor_item` does.
    """
    key = (head, item_length)
    rec = _HEADS.get(key)
    if rec is None:
        rec = _parse_head(head, item_length, where)
        if len(_HEADS) >= _HEADS_MAX:
            _HEADS.clear()
        _HEADS[key] = rec
    return rec


def _parse_head(head: bytes, item_length: int, where: str) -> TensorRecord:
    records: dict[str, tuple[int, int]] = {}
    p = 0
    while True:
        if p + _LOCAL.size > len(head):
            raise _corrupt(where, "record header ends inside a local header")
        sig, _, _, _, _, _, _, csize, usize, nlen, elen = _LOCAL.unpack_from(head, p)
        if sig != _SIG_LOCAL:
            raise _corrupt(where, "bad local header signature in the record header")
        name = head[p + _LOCAL.size : p + _LOCAL.size + nlen].decode("utf-8", "replace")
        extra = head[p + _LOCAL.size + nlen : p + _LOCAL.size + nlen + elen]
        if usize == _U32 or csize == _U32:
            usize, csize, _ = _zip64_fields(extra, usize, csize, 0, where)
        start = p + _LOCAL.size + nlen + elen
        records[name] = (start, usize)
        if start >= len(head):
            break
        p = start + csize
    prefix = next((n[: -len("/data.pkl")] for n in records if n.endswith("/data.pkl")), None)
    if prefix is None:
        raise _corrupt(where, "no data.pkl record in the record header")
    pkl_start, pkl_size = records[f"{prefix}/data.pkl"]

    def storage_at(key: str) -> tuple[int, int]:
        found = records.get(f"{prefix}/data/{key}")
        if found is None or found[0] != len(head) or found[0] + found[1] > item_length:
            raise _corrupt(where, f"storage record {key!r} is not where the record header ends")
        return found

    return _tensor_record(head[pkl_start : pkl_start + pkl_size], storage_at, _ALIGN, where)


def _dense(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for st, s in sorted((st, s) for s, st in zip(size, stride) if s != 1):
        if st != expected:
            return False
        expected *= s
    return True


def _extra_tiles(extra: bytes) -> bool:
    p = 0
    while p < len(extra):
        if p + 4 > len(extra):
            return False
        _, size = struct.unpack_from("<HH", extra, p)
        p += 4 + size
    return p == len(extra)


def _zip64_fields(extra: bytes, usize: int, csize: int, off: int, where: str) -> tuple[int, int, int]:
    p = 0
    while p + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, p)
        if tag == 0x0001:
            body = extra[p + 4 : p + 4 + size]
            q = 0
            values = []
            for current in (usize, csize, off):
                if current == _U32:
                    if q + 8 > len(body):
                        raise _corrupt(where, "zip64 extra field is truncated")
                    values.append(struct.unpack_from("<Q", body, q)[0])
                    q += 8
                else:
                    values.append(current)
            return values[0], values[1], values[2]
        p += 4 + size
    raise _corrupt(where, "zip64 sizes announced but no zip64 extra field")
