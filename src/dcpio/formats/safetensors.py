"""The safetensors file format, parsed safely and written streaming.

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of UTF-8 JSON + the data section. The JSON maps each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data section) and may hold a
``"__metadata__"`` object of string to string. The reference writer pads the JSON with spaces so the data section starts
8-byte aligned, and orders tensors by descending dtype rank then name, which keeps every tensor aligned to its element
size; :func:`encode_header` and :func:`write_file` do the same, so their output is byte-identical to
``safetensors.torch.save`` for the same dict (with at most one metadata key: the reference writer's metadata order is a
hash order).

The three stable entry points (used by the HF storage classes, DCP's ``SAFETENSORS`` serialization format and
``dcpio convert``):

* :func:`encode_header` -- the bytes before the data section, for entries laid out by :func:`layout`.
* :func:`parse_header` -- the header of an untrusted file, every offset, shape and dtype checked against the file's
  length and each other; anything wrong is a :class:`~dcpio.errors.CorruptCheckpointError` naming the file and tensor.
* :func:`write_file` -- header then each tensor's bytes straight from tensor memory, one tensor in memory at a time,
  published through :mod:`dcpio.commit` (``<path>.tmp`` created exclusively + fsync + rename on disks).
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dcpio import knobs
from dcpio.commit import StagedFile, stage_file
from dcpio.errors import CheckpointError, CorruptCheckpointError
from dcpio.movers.base import FileSystemBase, ReadHandle, WriteHandle
from dcpio.tensor_bytes import byte_view

__all__ = [
    "DTYPES",
    "SafetensorsDtype",
    "SafetensorsHeader",
    "TensorEntry",
    "encode_header",
    "layout",
    "parse_header",
    "st_dtype_of",
    "torch_dtype_of",
    "torch_shape_of",
    "write_entries",
    "write_staged",
    "write_file",
]

_HEADER_LEN_BYTES = 8
_ALIGN = 8
_MAX_NDIM = 1024  # far above anything torch builds; bounds the work a hostile shape can cause
_METADATA_KEY = "__metadata__"
_WRITE_BATCH_BYTES = 64 << 20  # small tensors are gathered into one writev up to this much
_WRITE_BATCH_BUFFERS = 256


@dataclass(frozen=True)
class SafetensorsDtype:
    """One dtype of the safetensors format.

    Attributes:
        name: the string in the header (``"F32"``).
        bits: bits per element in the file (4 for ``F4``, 6 for the ``F6`` types).
        rank: position in the reference implementation's dtype order; the writer sorts by it, descending.
        torch_dtype: the torch dtype holding it, or None where torch has none (the ``F6`` types).
    """

    name: str
    bits: int
    rank: int
    torch_dtype: torch.dtype | None


def _td(name: str) -> torch.dtype | None:
    value = getattr(torch, name, None)
    return value if isinstance(value, torch.dtype) else None


# In the reference implementation's enum order: the writer sorts tensors by this, descending, then by name.
_DTYPE_ROWS: list[tuple[str, int, torch.dtype | None]] = [
    ("BOOL", 8, torch.bool),
    ("F4", 4, _td("float4_e2m1fn_x2")),  # torch packs two values per byte: shape's last dim is halved
    ("F6_E2M3", 6, None),
    ("F6_E3M2", 6, None),
    ("U8", 8, torch.uint8),
    ("I8", 8, torch.int8),
    ("F8_E5M2", 8, _td("float8_e5m2")),
    ("F8_E4M3", 8, _td("float8_e4m3fn")),
    ("F8_E8M0", 8, _td("float8_e8m0fnu")),
    ("F8_E4M3FNUZ", 8, _td("float8_e4m3fnuz")),
    ("F8_E5M2FNUZ", 8, _td("float8_e5m2fnuz")),
    ("I16", 16, torch.int16),
    ("U16", 16, _td("uint16")),
    ("F16", 16, torch.float16),
    ("BF16", 16, torch.bfloat16),
    ("I32", 32, torch.int32),
    ("U32", 32, _td("uint32")),
    ("F32", 32, torch.float32),
    ("C64", 64, torch.complex64),
    ("F64", 64, torch.float64),
    ("I64", 64, torch.int64),
    ("U64", 64, _td("uint64")),
]

DTYPES: dict[str, SafetensorsDtype] = {
    name: SafetensorsDtype(name, bits, rank, td) for rank, (name, bits, td) in enumerate(_DTYPE_ROWS)
}
"""Every dtype the safetensors format defines, by header name."""

_TORCH_TO_ST: dict[torch.dtype, SafetensorsDtype] = {d.torch_dtype: d for d in DTYPES.values() if d.torch_dtype}
_F4 = _td("float4_e2m1fn_x2")


def st_dtype_of(dtype: torch.dtype, name: str = "") -> str:
    """The safetensors header string for a torch dtype.

    Raises:
        CheckpointError: torch has the dtype but safetensors cannot store it (for example ``complex128``).
    """
    found = _TORCH_TO_ST.get(dtype)
    if found is None:
        supported = ", ".join(str(d) for d in _TORCH_TO_ST)
        raise CheckpointError(
            f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors (it supports {supported}); "
            "convert the tensor or save with dcpio.FileSystemWriter instead"
        )
    return found.name


def torch_dtype_of(st_dtype: str, path: str = "", name: str = "") -> torch.dtype:
    """The torch dtype for a safetensors header string.

    Raises:
        CorruptCheckpointError: the string is not a safetensors dtype.
        CheckpointError: it is one, but this torch has no dtype for it (the ``F6`` types).
    """
    found = DTYPES.get(st_dtype)
    if found is None:
        raise CorruptCheckpointError(f"{path}: tensor {name!r} has unknown safetensors dtype {st_dtype!r}")
    if found.torch_dtype is None:
        raise CheckpointError(
            f"{path}: tensor {name!r} has dtype {st_dtype}, which this version of torch cannot hold; "
            "load it with a newer torch or convert the file"
        )
    return found.torch_dtype


def torch_shape_of(st_dtype: str, shape: Sequence[int]) -> tuple[int, ...]:
    """The torch shape of a stored tensor: ``F4`` packs two values in each torch element of the last dimension."""
    if st_dtype == "F4" and shape:
        return (*shape[:-1], shape[-1] // 2)
    return tuple(shape)


def _st_shape_of(tensor: torch.Tensor) -> tuple[int, ...]:
    if _F4 is not None and tensor.dtype == _F4 and tensor.dim() > 0:
        return (*tensor.shape[:-1], tensor.shape[-1] * 2)
    return tuple(tensor.shape)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file; ``begin``/``end`` are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype_of(self.dtype, name=self.name)

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return torch_shape_of(self.dtype, self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed and validated safetensors header.

    Attributes:
        path: the file it came from (for messages).
        tensors: entries by name, in the header's order.
        metadata: the ``__metadata__`` strings, or None when absent.
        data_start: absolute offset of the data section (8 + header length).
        file_size: the file's length; every entry lies in ``[data_start, file_size)``.
    """

    path: str
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] | None
    data_start: int
    file_size: int

    def absolute(self, name: str) -> tuple[int, int]:
        """Absolute ``(offset, length)`` of a tensor's bytes in the file."""
        entry = self.tensors[name]
        return self.data_start + entry.begin, entry.nbytes


def _nbytes(st_dtype: str, shape: Sequence[int]) -> int:
    bits = math.prod(shape) * DTYPES[st_dtype].bits
    return bits // 8 if bits % 8 == 0 else -1


def layout(specs: Iterable[tuple[str, str, Sequence[int]]], sort: bool = True) -> list[TensorEntry]:
    """Lay tensors out back to back in a data section.

    Args:
        specs: ``(name, safetensors dtype, shape)`` per tensor.
        sort: order as the reference writer does (descending dtype rank, then name), which keeps every tensor aligned
            to its element size; False keeps the given order.

    Returns:
        The entries with their data offsets, in file order.
    """
    items = [(name, dtype, tuple(int(d) for d in shape)) for name, dtype, shape in specs]
    for name, dtype, shape in items:
        if dtype not in DTYPES:
            raise CheckpointError(f"tensor {name!r}: {dtype!r} is not a safetensors dtype")
        if _nbytes(dtype, shape) < 0:
            raise CheckpointError(f"tensor {name!r}: shape {list(shape)} of {dtype} is not a whole number of bytes")
    if sort:
        items.sort(key=lambda it: (-DTYPES[it[1]].rank, it[0]))
    out: list[TensorEntry] = []
    offset = 0
    for name, dtype, shape in items:
        size = _nbytes(dtype, shape)
        out.append(TensorEntry(name, dtype, shape, offset, offset + size))
        offset += size
    return out


def encode_header(entries: Sequence[TensorEntry], metadata: Mapping[str, str] | None = None) -> bytes:
    """Everything before the data section: the 8-byte length, the JSON, and space padding to 8-byte alignment.

    The JSON is compact, ``__metadata__`` first (when ``metadata`` is not None, even if empty), then the entries in the
    given order, exactly as the reference implementation serialises it.

    Raises:
        CheckpointError: duplicate or reserved names, non-string metadata, or entries that are not back to back.
    """
    header: dict[str, Any] = {}
    if metadata is not None:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise CheckpointError(
                    f"safetensors metadata must map str to str, got {key!r}: {type(value).__name__}; "
                    "convert the values with str() or json.dumps()"
                )
        header[_METADATA_KEY] = dict(metadata)
    expected = 0
    for e in entries:
        if e.name == _METADATA_KEY or e.name in header:
            raise CheckpointError(f"tensor name {e.name!r} is reserved or used twice; rename the tensor")
        if e.begin != expected or e.end - e.begin != _nbytes(e.dtype, e.shape):
            raise CheckpointError(f"tensor {e.name!r}: entries must be laid out back to back (use layout())")
        expected = e.end
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-len(body) % _ALIGN)
    return struct.pack("<Q", len(body)) + body


def _corrupt(path: str, what: str, name: str | None = None) -> CorruptCheckpointError:
    where = f"{path}: tensor {name!r}: " if name is not None else f"{path}: "
    return CorruptCheckpointError(
        f"{where}{what}. This is not a valid safetensors file (truncated, corrupted, or another format); "
        "restore it from a good copy or download it again"
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r} in the header")
        out[key] = value
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_header(
    read: ReadHandle | bytes | bytearray | memoryview, file_size: int | None, path: str
) -> SafetensorsHeader:
    """Parse and validate the header of an untrusted safetensors file.

    Args:
        read: an open :class:`~dcpio.movers.ReadHandle`, or bytes holding at least the header (usually the file).
        file_size: the file's length; None means ``read.size()`` (handle) or ``len(read)`` (bytes).
        path: the file's name, for messages.

    Checks: the header length is at most :func:`dcpio.knobs.max_record_header_bytes` and inside the file; the JSON is
    UTF-8, an object, without duplicate keys; ``__metadata__`` maps str to str; every dtype is known; every shape is
    a list of non-negative ints; every ``data_offsets`` pair matches its shape's byte size; the tensors tile the data
    section exactly (no overlap, no gap, nothing past the end), as the reference implementation requires.

    Raises:
        CorruptCheckpointError: any of the above fails; the message names the file and the tensor. Nothing else.
    """
    fetch, size = _fetcher(read, file_size, path)
    data_start, doc = _read_json(fetch, size, path)
    data_len = size - data_start
    metadata: dict[str, str] | None = None
    tensors: dict[str, TensorEntry] = {}
    for name, info in doc.items():
        if name == _METADATA_KEY:
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise _corrupt(path, "__metadata__ must be an object of string values")
            metadata = info
            continue
        tensors[name] = _entry(name, info, data_len, path)
    _check_tiling(tensors, data_len, path)
    return SafetensorsHeader(path=path, tensors=tensors, metadata=metadata, data_start=data_start, file_size=size)


def _fetcher(
    read: ReadHandle | bytes | bytearray | memoryview, file_size: int | None, path: str
) -> tuple[Callable[[int, int], bytes], int]:
    """A ``fetch(offset, length)`` over the handle or bytes, and the file's size."""
    if isinstance(read, (bytes, bytearray, memoryview)):
        raw = bytes(read)

        def from_bytes(offset: int, length: int) -> bytes:
            if offset + length > len(raw):
                raise _corrupt(path, f"needs bytes [{offset}, {offset + length}) but only {len(raw)} were given")
            return raw[offset : offset + length]

        return from_bytes, len(raw) if file_size is None else file_size
    handle = read
    return handle.read, handle.size() if file_size is None else file_size


def _read_json(fetch: Callable[[int, int], bytes], size: int, path: str) -> tuple[int, dict[str, Any]]:
    """The header's length (bounded by the cap and the file) and its JSON object; returns (data start, object)."""
    if size < _HEADER_LEN_BYTES:
        raise _corrupt(path, f"the file is {size} bytes, shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", fetch(0, _HEADER_LEN_BYTES))
    cap = knobs.max_record_header_bytes()
    if header_len > cap:
        raise CorruptCheckpointError(
            f"{path}: the safetensors header claims {header_len} bytes, more than the {cap}-byte cap. The file is "
            "corrupt or hostile; raise DCPIO_MAX_HEADER_BYTES only if you trust it"
        )
    if header_len > size - _HEADER_LEN_BYTES:
        raise _corrupt(path, f"the header claims {header_len} bytes but the file has only {size - 8} after the length")
    text = fetch(_HEADER_LEN_BYTES, header_len)
    if not text.startswith(b"{"):
        raise _corrupt(path, "the header does not start with '{'")
    try:
        doc = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise _corrupt(path, f"the header is not valid JSON ({type(err).__name__}: {str(err)[:200]})") from err
    if not isinstance(doc, dict):
        raise _corrupt(path, "the header is not a JSON object")
    return _HEADER_LEN_BYTES + header_len, doc


def _entry(name: str, info: Any, data_len: int, path: str) -> TensorEntry:
    """One tensor's entry, checked: known dtype, a shape of non-negative ints, offsets inside the data section that
    hold exactly the shape's bytes."""
    if not isinstance(info, dict):
        raise _corrupt(path, "the entry is not an object", name)
    dtype = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _corrupt(path, f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})", name)
    if not isinstance(shape, list) or len(shape) > _MAX_NDIM or not all(_is_int(d) and d >= 0 for d in shape):
        raise _corrupt(path, f"shape {str(shape)[:100]} is not a list of at most {_MAX_NDIM} non-negative ints", name)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise _corrupt(path, f"data_offsets {str(offsets)[:100]} is not a pair of ints", name)
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise _corrupt(path, f"data_offsets [{begin}, {end}] fall outside the data section of {data_len} bytes", name)
    # bound the product while computing it: a hostile shape of many huge dims must not cost time or memory
    numel = 0 if any(d == 0 for d in shape) else 1
    for d in shape if numel else ():
        numel *= d
        if numel > 8 * data_len:
            raise _corrupt(path, f"shape {shape[:8]} is larger than the whole data section", name)
    bits = numel * DTYPES[dtype].bits
    nbytes = bits // 8 if bits % 8 == 0 else -1
    if nbytes != end - begin:
        raise _corrupt(
            path,
            f"shape {shape} of {dtype} needs {nbytes} bytes but data_offsets [{begin}, {end}] hold {end - begin}",
            name,
        )
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def _check_tiling(tensors: Mapping[str, TensorEntry], data_len: int, path: str) -> None:
    """The tensors tile the data section exactly: no overlap, no gap, nothing past the end."""
    expected = 0
    for entry in sorted(tensors.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != expected:
            what = "overlaps the previous tensor" if entry.begin < expected else f"leaves a gap at byte {expected}"
            raise _corrupt(path, f"data_offsets [{entry.begin}, {entry.end}] {what}", entry.name)
        expected = entry.end
    if expected != data_len:
        raise _corrupt(path, f"the tensors cover {expected} bytes of a {data_len}-byte data section")


def write_file(
    fs: FileSystemBase,
    path: str,
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
    sync: bool = True,
    *,
    sort: bool = True,
    atomic: bool = True,
) -> int:
    """Write a safetensors file: the header, then each tensor's bytes straight from its memory.

    Tensors that share memory (tied weights) are each written in full. A tensor that is not a contiguous CPU tensor is
    made one just before its bytes are written, so at most one such copy is alive at a time.

    Args:
        fs: the byte mover.
        path: the file to create.
        tensors: name to tensor, as a mapping or pairs.
        metadata: ``__metadata__`` strings (None: no such key).
        sync: fsync the file (and its directory when ``atomic``).
        sort: order tensors as the reference writer does (see :func:`layout`).
        atomic: publish through the mover's commit strategy (:func:`dcpio.commit.stage_file`: ``<path>.tmp`` then
            a rename on disks); False writes ``path`` itself, which must be a new name.

    Returns:
        The file's length in bytes.
    """
    pairs = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    by_name: dict[str, torch.Tensor] = {}
    for name, tensor in pairs:
        if name in by_name:
            raise CheckpointError(f"{path}: tensor {name!r} is given twice; names in a safetensors file are unique")
        if tensor.layout != torch.strided:
            raise CheckpointError(f"{path}: tensor {name!r} is {tensor.layout}; call .to_dense() first")
        by_name[name] = tensor
    entries = layout(((n, st_dtype_of(t.dtype, n), _st_shape_of(t)) for n, t in by_name.items()), sort=sort)
    return write_entries(fs, path, entries, by_name.__getitem__, metadata, sync=sync, atomic=atomic)


def write_entries(
    fs: FileSystemBase,
    path: str,
    entries: Sequence[TensorEntry],
    get_tensor: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    sync: bool = True,
    atomic: bool = True,
) -> int:
    """Stream a file laid out by :func:`layout`, asking ``get_tensor(name)`` for each tensor just before writing it.

    Fetching lazily lets a caller resolve (or copy off an accelerator) one tensor at a time. Each tensor's dtype and
    shape are checked against its entry. Returns the file's length; see :func:`write_file` for the other arguments.
    """
    if not atomic:
        handle = fs.open_writer(path)  # a new name (created exclusively where the mover can)
        try:
            total = _write_body(handle, path, entries, get_tensor, metadata)
            if sync:
                handle.sync()
            handle.close()
        except BaseException:
            handle.abort()
            fs.remove_quietly(path)
            raise
        return total
    return write_staged(stage_file(fs, path), entries, get_tensor, metadata, sync=sync)


def write_staged(
    staged: StagedFile,
    entries: Sequence[TensorEntry],
    get_tensor: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    sync: bool = True,
    publish: bool = True,
) -> int:
    """Stream a file into a :class:`dcpio.commit.StagedFile` and commit it (``publish=False``: finish it only, for
    a :class:`dcpio.commit.GroupCommit` that renames the set later). On failure the staged file is aborted."""
    try:
        total = _write_body(staged.handle, staged.final, entries, get_tensor, metadata)
        if publish:
            staged.commit(sync)
        else:
            staged.finish(sync)
    except BaseException:
        staged.abort()  # removes only the temporary file it created
        raise
    return total


def _write_body(
    handle: WriteHandle,
    path: str,
    entries: Sequence[TensorEntry],
    get_tensor: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None,
) -> int:
    if sys.byteorder != "little":
        raise CheckpointError("safetensors files are little-endian; writing them on a big-endian host is unsupported")
    handle.write([memoryview(encode_header(entries, metadata))])
    _write_tensors(handle, path, entries, get_tensor)
    return handle.tell()


def _write_tensors(
    handle: WriteHandle, path: str, entries: Sequence[TensorEntry], get_tensor: Callable[[str], torch.Tensor]
) -> None:
    batch: list[memoryview] = []
    keep: list[torch.Tensor] = []
    batch_bytes = 0
    for entry in entries:
        tensor = get_tensor(entry.name).detach()
        if st_dtype_of(tensor.dtype, entry.name) != entry.dtype or _st_shape_of(tensor) != entry.shape:
            raise CheckpointError(
                f"{path}: tensor {entry.name!r} is {tensor.dtype} {list(tensor.shape)} but the header was "
                f"planned for {entry.dtype} {list(entry.shape)}; the state dict changed during the save"
            )
        if entry.nbytes == 0:
            continue
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            tensor = tensor.cpu().contiguous()
        keep.append(tensor)  # the view borrows the tensor's memory until the write returns
        batch.append(byte_view(tensor))
        batch_bytes += entry.nbytes
        if batch_bytes >= _WRITE_BATCH_BYTES or len(batch) >= _WRITE_BATCH_BUFFERS:
            handle.write(batch)
            batch, keep, batch_bytes = [], [], 0
    if batch:
        handle.write(batch)
