"""DCP's ``SerializationFormat.SAFETENSORS`` layout of a data file.

The layout is torch's: the file's bytes items come first, then one safetensors blob holding every tensor of the
file keyed by its fully-qualified name; each tensor's ``_StorageInfo`` points at the *blob's* start (offset) with
the tensor's byte count (length), and a reader finds the tensor by name in the blob's header. torch 2.13's own
reader cannot load these files (it hands the blob to ``torch.load``); dcpio reads and writes them.

dcpio adds its block checksums per tensor, over the tensor's bytes in the blob.
"""

from __future__ import annotations

import json
import struct
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch.distributed.checkpoint.planner import WriteItem
from torch.distributed.checkpoint.storage import WriteResult

from dcpio._torch_compat import _StorageInfo
from dcpio.errors import CheckpointWriteError, CorruptCheckpointError
from dcpio.formats.safetensors import SafetensorsHeader, _st_shape_of, encode_header, layout, parse_header, st_dtype_of
from dcpio.formats.torch_save import TensorRecord, c_strides
from dcpio.integrity.checksum import ATTRIBUTE, BlockHasher
from dcpio.knobs import max_record_header_bytes
from dcpio.movers.base import ReadHandle, WriteHandle

if TYPE_CHECKING:
    from dcpio.engine.sources import Source
from dcpio.tensor_bytes import byte_view

__all__ = ["locate", "write_blob"]

# the header metadata keys torch's writer puts in the blob (format facts from torch's _hf_utils)
_CUSTOM_METADATA_KEY = "DCP_SHARDING_INFO"
_DCP_VERSION_KEY = "DCP_VERSION"
_FORMAT_KEY = "format"
_FORMAT_VALUE = "pt"


def write_blob(
    handle: WriteHandle,
    relative_path: str,
    items: Sequence[tuple[WriteItem, torch.Tensor]],
    block_size: int,
) -> list[WriteResult]:
    """Append the safetensors blob of ``items`` (contiguous CPU tensors) to ``handle``; one result per item."""
    names = [item.index.fqn for item, _ in items]
    if len(set(names)) != len(names):
        raise CheckpointWriteError(
            f"{relative_path}: two chunks of one tensor landed in one safetensors blob; use "
            "single_file_per_rank=False for this state dict"
        )
    entries = layout(
        ((item.index.fqn, st_dtype_of(t.dtype, item.index.fqn), _st_shape_of(t)) for item, t in items), sort=False
    )
    sharding = {
        item.index.fqn: {"saved_offsets": list(item.tensor_data.chunk.offsets)}  # type: ignore[union-attr]
        for item, _ in items
    }
    head = encode_header(
        entries, {_CUSTOM_METADATA_KEY: json.dumps(sharding), _DCP_VERSION_KEY: "1.0", _FORMAT_KEY: _FORMAT_VALUE}
    )
    blob_start = handle.tell()
    handle.write([memoryview(head)])
    data_start = blob_start + len(head)
    results: list[WriteResult] = []
    for (item, tensor), entry in zip(items, entries):
        view = byte_view(tensor)
        hasher = BlockHasher(data_start + entry.begin, block_size)
        hasher.update(view)
        handle.write([view])
        # tensors in the blob are stored as they are: stream transforms apply to the file's bytes items only
        info = _StorageInfo(relative_path, blob_start, entry.nbytes)
        setattr(info, ATTRIBUTE, hasher.finish().to_record())
        results.append(WriteResult(index=item.index, size_in_bytes=entry.nbytes, storage_data=info))
    return results


_cache_lock = threading.Lock()
# parsed blob headers per open handle: a handle lives exactly as long as one read_data call
_headers: weakref.WeakKeyDictionary[ReadHandle | Source, dict[int, SafetensorsHeader]] = weakref.WeakKeyDictionary()


def _header_at(handle: ReadHandle | Source, offset: int, where: str) -> SafetensorsHeader:
    with _cache_lock:
        cache = _headers.setdefault(handle, {})
        header = cache.get(offset)
    if header is not None:
        return header
    size = handle.size()
    if offset + 8 > size:
        raise CorruptCheckpointError(f"{where}: the safetensors blob at byte {offset} lies past the file's end")
    (n,) = struct.unpack("<Q", handle.read(offset, 8))
    if n > max_record_header_bytes() or offset + 8 + n > size:
        raise CorruptCheckpointError(
            f"{where}: item at byte {offset} is neither a torch.save record nor a safetensors blob (header length "
            f"{n}); the file is damaged. Restore it or load an earlier checkpoint."
        )
    header = parse_header(handle.read(offset, 8 + n), size - offset, f"{handle.path} (blob at byte {offset})")
    with _cache_lock:
        cache[offset] = header
    return header


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_FRAME_PIECE = 64


def _skip_empty_frames(handle: ReadHandle | Source, offset: int, where: str) -> int:
    """Where the blob starts behind the empty transform frames torch writes in place of each tensor.

    torch's writer, with a stream transform and the SAFETENSORS format, opens the transform for every tensor, writes
    nothing into it and closes it: each tensor's offset points at an empty zstd frame, and the blob follows the
    last of them. The frames are walked (and checked to be empty) until the blob's header.
    """
    import zstandard

    size = handle.size()
    pos = offset
    for _ in range(1 << 20):
        if pos + 4 > size or handle.read(pos, 4) != _ZSTD_MAGIC:
            return pos
        window = handle.read(pos, min(1 << 12, size - pos))
        decoder = zstandard.ZstdDecompressor().decompressobj()
        produced = b""
        fed = 0
        try:
            # fed in small pieces and stopped at the first output byte: a frame that is not empty (a decompression
            # bomb behind a damaged offset, say) never gets to inflate
            for piece in range(0, len(window), _FRAME_PIECE):
                produced = decoder.decompress(window[piece : piece + _FRAME_PIECE])
                fed = min(len(window), piece + _FRAME_PIECE)
                if produced or decoder.eof:
                    break
        except zstandard.ZstdError as err:
            raise CorruptCheckpointError(f"{where}: damaged transform frame at byte {pos} of {handle.path}") from err
        if produced or not decoder.eof:
            raise CorruptCheckpointError(
                f"{where}: expected an empty transform frame at byte {pos} of {handle.path} (torch's SAFETENSORS "
                "layout with a stream transform); the file is damaged or not in that layout"
            )
        pos += fed - len(decoder.unused_data)
    raise CorruptCheckpointError(f"{where}: too many transform frames before the safetensors blob")


def locate(
    handle: ReadHandle | Source, info: _StorageInfo, fqn: str, where: str, *, after_frames: bool = False
) -> tuple[TensorRecord, int]:
    """Find tensor ``fqn`` in the safetensors blob ``info`` points at; returns its record and absolute data start.

    ``after_frames``: the item was written by torch with a stream transform, so empty frames precede the blob.
    """
    start = _skip_empty_frames(handle, info.offset, where) if after_frames else info.offset
    header = _header_at(handle, start, where)
    entry = header.tensors.get(fqn)
    if entry is None:
        raise CorruptCheckpointError(
            f"{where}: the safetensors blob at byte {start} of {handle.path} has no tensor named {fqn!r}"
        )
    if entry.nbytes != info.length:
        raise CorruptCheckpointError(
            f"{where}: metadata says {info.length} bytes, the blob's header says {entry.nbytes}; the file and the "
            "metadata disagree"
        )
    shape = tuple(entry.torch_shape)
    rec = TensorRecord(entry.torch_dtype, shape, c_strides(shape), 0, 0, entry.nbytes)
    return rec, start + header.data_start + entry.begin
