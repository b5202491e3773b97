"""``dcpio inspect``: what a checkpoint holds, read from its metadata and headers only (no tensor data)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from dcpio.names import HF_INDEX_NAME, METADATA_NAME
from dcpio.tools._sources import (
    DcpSource,
    HfSource,
    TorchFileSource,
    detect,
    dtype_name,
    is_url,
    rank_of,
    url_fs,
)

__all__ = ["CheckpointSummary", "ItemSummary", "inspect_checkpoint"]


@dataclass
class ItemSummary:
    """One entry of a checkpoint.

    Attributes:
        name: flattened name.
        kind: ``"tensor"`` or ``"object"``.
        dtype: e.g. ``"float32"`` (``None`` for objects).
        shape: global shape (``None`` for objects).
        chunks: how many stored pieces make it up (shards of a sharded tensor; 1 otherwise).
        nbytes: bytes of the full tensor's elements (0 for objects).
        stored_bytes: bytes it takes in the data files (after any compression; record headers included).
        files: data files holding its pieces, relative to the checkpoint.
    """

    name: str
    kind: str
    dtype: str | None
    shape: list[int] | None
    chunks: int
    nbytes: int
    stored_bytes: int
    files: list[str]


@dataclass
class CheckpointSummary:
    """What :func:`inspect_checkpoint` reports.

    Attributes:
        path: what was inspected.
        format: ``"dcp torch_save"``, ``"dcp safetensors"``, ``"hf safetensors"`` or ``"torch.save file"``.
        writer: ``"dcpio"`` (items carry dcpio checksums), ``"torch"`` or another producer where known.
        ranks: number of ranks that wrote data files (``None`` where the format has no ranks).
        files: data files (relative paths), metadata excluded.
        total_bytes: bytes on storage of the data files plus metadata.
        items: one :class:`ItemSummary` per entry.
        transforms: stream transforms applied to items (e.g. ``stream.zstd/1``).
        checksummed: every stored item carries a dcpio checksum.
    """

    path: str
    format: str
    writer: str
    ranks: int | None
    files: list[str]
    total_bytes: int
    items: list[ItemSummary] = field(default_factory=list)
    transforms: list[str] = field(default_factory=list)
    checksummed: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (what ``dcpio inspect --json`` prints)."""
        return asdict(self)


def _sizes(path: str, files: list[str], opts: Mapping[str, Any]) -> dict[str, int | None]:
    """Size on storage of each file under ``path`` (``None`` if it is missing)."""
    out: dict[str, int | None] = {}
    if is_url(path):
        fs, root = url_fs(path, opts)
        for f in files:
            full = root + "/" + f
            out[f] = int(fs.size(full)) if fs.exists(full) else None
        return out
    for f in files:
        try:
            out[f] = os.path.getsize(os.path.join(path, f))
        except OSError:
            out[f] = None
    return out


def _read_head(path: str, rel: str, n: int, opts: Mapping[str, Any]) -> bytes:
    if is_url(path):
        fs, root = url_fs(path, opts)
        with fs.open(root + "/" + rel, "rb") as f:
            return bytes(f.read(n))
    with open(os.path.join(path, rel), "rb") as f:
        return f.read(n)


def _inspect_dcp(src: DcpSource) -> CheckpointSummary:
    storage = src.storage_info()
    per_item: dict[str, list[Any]] = {}
    transforms: set[str] = set()
    checksummed = bool(storage)
    for idx, info in storage.items():
        per_item.setdefault(idx.fqn, []).append(info)
        transforms.update(info.transform_descriptors or ())
        if getattr(info, "dcpio_checksum", None) is None:
            checksummed = False
    files = sorted({info.relative_path for info in storage.values()})
    sizes = _sizes(src.path, [*files, METADATA_NAME], src.storage_options)
    total = sum(s for s in sizes.values() if s is not None)
    ranks = {r for r in (rank_of(f) for f in files) if r is not None}

    fmt = "dcp torch_save"
    for f in files:
        if sizes.get(f):
            head = _read_head(src.path, f, 9, src.storage_options)
            # a safetensors file opens with a little-endian header length and then the JSON "{"
            if len(head) == 9 and head[:4] != b"PK\x03\x04" and head[8:9] == b"{":
                fmt = "dcp safetensors"
            break
    writer = "dcpio" if any(getattr(i, "dcpio_checksum", None) is not None for i in storage.values()) else "torch"

    items = []
    for entry in src.entries():
        infos = per_item.get(entry.name, [])
        md = src.metadata.state_dict_metadata[entry.name]
        chunks = len(md.chunks) if isinstance(md, TensorStorageMetadata) else len(infos)
        items.append(
            ItemSummary(
                name=entry.name,
                kind=entry.kind,
                dtype=dtype_name(entry.dtype) if entry.dtype is not None else None,
                shape=list(entry.shape) if entry.shape is not None else None,
                chunks=chunks,
                nbytes=entry.nbytes,
                stored_bytes=sum(int(i.length) for i in infos),
                files=sorted({i.relative_path for i in infos}),
            )
        )
    return CheckpointSummary(
        path=src.path,
        format=fmt,
        writer=writer,
        ranks=len(ranks) if ranks else None,
        files=files,
        total_bytes=total,
        items=items,
        transforms=sorted(transforms),
        checksummed=checksummed,
    )


def _inspect_hf(src: HfSource) -> CheckpointSummary:
    files = src.files
    total = 0
    for f in files:
        total += os.path.getsize(os.path.join(src.folder, f))
    index = os.path.join(src.folder, HF_INDEX_NAME)
    if os.path.isdir(src.path) and os.path.exists(index):
        total += os.path.getsize(index)
    writers = {str(meta.get("format", "")) for meta in src.header_metadata.values()}
    items = []
    for entry in src.entries():
        md = src.metadata.state_dict_metadata[entry.name]
        items.append(
            ItemSummary(
                name=entry.name,
                kind="tensor",
                dtype=dtype_name(entry.dtype) if entry.dtype is not None else None,
                shape=list(entry.shape) if entry.shape is not None else None,
                chunks=len(md.chunks) if isinstance(md, TensorStorageMetadata) else 1,
                nbytes=entry.nbytes,
                stored_bytes=src.stored_bytes(entry.name),
                files=src.files_of(entry.name),
            )
        )
    return CheckpointSummary(
        path=src.path,
        format="hf safetensors",
        writer="safetensors" + (f" (format={','.join(sorted(w for w in writers if w))})" if any(writers) else ""),
        ranks=None,
        files=files,
        total_bytes=total,
        items=items,
        checksummed=src.checksummed,
    )


def _inspect_torch(src: TorchFileSource) -> CheckpointSummary:
    items = []
    name = os.path.basename(src.path)
    for entry in src.entries():
        items.append(
            ItemSummary(
                name=entry.name,
                kind=entry.kind,
                dtype=dtype_name(entry.dtype) if entry.dtype is not None else None,
                shape=list(entry.shape) if entry.shape is not None else None,
                chunks=1,
                nbytes=entry.nbytes,
                stored_bytes=entry.nbytes,
                files=[name],
            )
        )
    return CheckpointSummary(
        path=src.path,
        format="torch.save file",
        writer="torch.save",
        ranks=None,
        files=[name],
        total_bytes=os.path.getsize(src.path),
        items=items,
    )


def inspect_checkpoint(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> CheckpointSummary:
    """Summarise the checkpoint at ``path`` from its metadata and headers, without reading tensor data.

    Args:
        path: a DCP checkpoint directory (local path or fsspec URL), a Hugging Face safetensors folder (or one
            ``.safetensors`` file), or a ``torch.save`` file.
        storage_options: fsspec options for a URL (``key``, ``secret``, ``client_kwargs`` ...).

    Returns:
        A :class:`CheckpointSummary`.

    Raises:
        FileNotFoundError: nothing at ``path``.
        dcpio.IncompleteCheckpointError: a directory with no committed ``.metadata``.
        dcpio.CheckpointError: metadata that cannot be read safely.
    """
    found = detect(str(path))
    if found.kind == "dcp":
        return _inspect_dcp(DcpSource(found.path, storage_options))
    if found.kind == "hf":
        return _inspect_hf(HfSource(found.path))
    return _inspect_torch(TorchFileSource(found.path))
