"""Consolidation: full tensors assembled from the shard files of a ``save_distributed`` export (torch's
``consolidate_safetensors_files``), each shard read through the engine's shared sources and checked against its digest,
every output file committed through :mod:`dcpio.commit`."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from dcpio.commit import stage_file
from dcpio.engine.load import SourceCache
from dcpio.engine.sources import FileSource, IOStats
from dcpio.errors import (
    CheckpointError,
    CheckpointWriteError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    PlanMismatchError,
)
from dcpio.formats.hf.common import (
    _COPY_BLOCK,
    SUFFIX,
    _check_digest,
    _checksums,
    _join,
    _list_safetensors,
    _parallel,
    _read_header,
    _remove_stale,
    _sharding_info,
    _write_checksummed,
    _write_index,
)
from dcpio.formats.safetensors import (
    DTYPES,
    SafetensorsHeader,
    layout,
    torch_dtype_of,
    torch_shape_of,
)
from dcpio.integrity.extents import check_tiling
from dcpio.movers.base import FileSystemBase
from dcpio.movers.local import FileSystem
from dcpio.names import hf_file_name, hf_shard_rank
from dcpio.tensor_bytes import byte_view

__all__ = ["consolidate_safetensors_files", "consolidate_safetensors_files_on_every_rank"]


@dataclass
class _Shard:
    handle_key: str  # input file path
    offset: int  # absolute offset of the shard's bytes
    shape: tuple[int, ...]  # torch shape
    offsets: tuple[int, ...]  # position in the full tensor (torch units)
    checksum: str | None = None  # recorded by a dcpio export, verified as the shard is read


@dataclass
class _FullTensor:
    st_dtype: str
    elem: int  # bytes per torch element
    shape: list[int]  # torch shape of the full tensor
    shards: list[_Shard]

    @property
    def st_shape(self) -> tuple[int, ...]:
        if self.st_dtype == "F4" and self.shape:
            return (*self.shape[:-1], self.shape[-1] * 2)
        return tuple(self.shape)


def _elem_bytes(st_dtype: str, path: str, name: str) -> int:
    if st_dtype == "F4":
        return 1  # torch packs two F4 values per byte
    bits = DTYPES[st_dtype].bits
    if bits % 8:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {st_dtype}, which cannot be consolidated by bytes")
    return bits // 8


def _add_shards(full: dict[str, _FullTensor], header: SafetensorsHeader) -> None:
    digests = _checksums(header)
    for name, offsets in _sharding_info(header).items():
        entry = header.tensors[name]
        shape = torch_shape_of(entry.dtype, entry.shape)
        t = full.get(name)
        if t is None:
            elem = _elem_bytes(entry.dtype, header.path, name)
            t = full[name] = _FullTensor(entry.dtype, elem, [0] * len(shape), [])
        if t.st_dtype != entry.dtype or len(t.shape) != len(shape):
            raise CorruptCheckpointError(
                f"{header.path}: tensor {name!r} is {entry.dtype} of rank {len(shape)} here but {t.st_dtype} of "
                f"rank {len(t.shape)} in another shard; the shard files come from different saves"
            )
        t.shape = [max(a, o + s) for a, o, s in zip(t.shape, offsets, shape)]
        t.shards.append(_Shard(header.path, header.data_start + entry.begin, shape, tuple(offsets), digests.get(name)))


def _missing_ranks(files: Sequence[str]) -> list[str]:
    """Ranks whose shard files are all absent although a higher rank's are there (``shard-00002-*`` when 00001 and
    00003 wrote files): a save_distributed folder with a rank's files lost."""
    ranks = set()
    for f in files:
        rank = hf_shard_rank(os.path.basename(f))
        if rank is not None:
            ranks.add(rank)
    return [f"shard-{r:05d}-*{SUFFIX}" for r in range(1, max(ranks, default=0) + 1) if r not in ranks]


def _gather_full_tensors(fs: FileSystemBase, input_dir: str, threads: int) -> dict[str, _FullTensor]:
    files = _list_safetensors(fs, input_dir)
    if not files:
        raise IncompleteCheckpointError(f"{input_dir}: no {SUFFIX} files to consolidate; check the directory")
    absent = _missing_ranks(files)
    if absent:
        raise IncompleteCheckpointError(
            f"{input_dir}: the shard files {', '.join(absent[:8])} are missing (higher ranks' files are there), so "
            "parts of the tensors are in no file; restore them, or save again, before consolidating"
        )
    headers = _parallel(lambda p: _read_header(fs, p), files, max(threads, 2))
    full: dict[str, _FullTensor] = {}
    for header in headers:
        _add_shards(full, header)
    fix = f"a shard file of {input_dir} is missing or comes from another save; restore it (or save again)"
    for name, t in full.items():
        check_tiling(name, t.shape, [(s.offsets, s.shape) for s in t.shards], input_dir, fix)
    return full


def _place_shard(source: FileSource, shard: _Shard, full_u8: torch.Tensor, t: _FullTensor, name: str) -> None:
    """Read one shard's bytes into its place in the full tensor's byte buffer, verifying its checksum."""
    shape, offs, full_shape, e = shard.shape, shard.offsets, t.shape, t.elem
    if math.prod(shape) == 0:
        _check_digest(memoryview(b""), shard.checksum, shard.handle_key, name)
        return
    if not full_shape:
        source.readinto_many(shard.offset, [byte_view(full_u8)[:e]])
        _check_digest(byte_view(full_u8)[:e], shard.checksum, shard.handle_key, name)
        return
    region = full_u8.view(*full_shape, e)[tuple(slice(o, o + s) for o, s in zip(offs, shape))]
    if region.is_contiguous():
        source.readinto_many(shard.offset, [byte_view(region)])
        _check_digest(byte_view(region), shard.checksum, shard.handle_key, name)
        return
    # a strided destination (for example a Shard(1) column block): read whole leading slabs through bounded scratch
    slab = math.prod(shape[1:]) * e
    rows = max(1, _COPY_BLOCK // max(1, slab))
    scratch = torch.empty(min(rows, shape[0]) * slab, dtype=torch.uint8)
    hasher = xxhash.xxh3_64()
    for r0 in range(0, shape[0], rows):
        n = min(rows, shape[0] - r0)
        part = scratch[: n * slab]
        source.readinto_many(shard.offset + r0 * slab, [byte_view(part)])
        hasher.update(byte_view(part))
        region[r0 : r0 + n].copy_(part.view(n, *shape[1:], e))
    _check_digest(hasher, shard.checksum, shard.handle_key, name)


def _consolidate_file(
    fs: FileSystemBase,
    out_path: str,
    fqns: list[str],
    full: dict[str, _FullTensor],
    sources: SourceCache,
    sync: bool,
) -> int:
    entries = layout((fqn, full[fqn].st_dtype, full[fqn].st_shape) for fqn in fqns)

    def materialise(fqn: str) -> torch.Tensor:
        t = full[fqn]
        # the shards tile the tensor exactly (checked when gathered): every byte is written below
        buf = torch.empty(math.prod(t.shape) * t.elem, dtype=torch.uint8)
        for shard in t.shards:
            _place_shard(sources(shard.handle_key), shard, buf, t, fqn)
        dtype = torch_dtype_of(t.st_dtype, out_path, fqn)
        return buf.view(dtype).view(t.shape) if t.shape else buf.view(dtype).reshape(())

    _write_checksummed(fs, stage_file(fs, out_path), entries, materialise, {"format": "pt"}, sync=sync, publish=True)
    return sum(e.nbytes for e in entries)


def _consolidate(
    fs: FileSystemBase,
    input_dir: str,
    output_dir: str,
    fqn_to_index_mapping: Mapping[str, int] | None,
    num_threads: int,
    sync: bool,
    only_indices: Callable[[int], bool],
) -> tuple[dict[str, str], int]:
    full = _gather_full_tensors(fs, input_dir, num_threads)
    if fqn_to_index_mapping is None:  # torch's documented meaning: every tensor in one output file
        fqn_to_index_mapping = dict.fromkeys(full, 1)
    unmapped = sorted(set(full) - set(fqn_to_index_mapping))
    absent = sorted(set(fqn_to_index_mapping) - set(full))
    if unmapped or absent:
        raise PlanMismatchError(
            f"{input_dir}: fqn_to_index_mapping does not match the shards: no file index for {unmapped[:10]}, "
            f"no shard holds {absent[:10]}; fix the mapping"
        )
    count = max(fqn_to_index_mapping.values())
    by_index: dict[int, list[str]] = {}
    for fqn, index in fqn_to_index_mapping.items():
        by_index.setdefault(index, []).append(fqn)
    weight_map = {fqn: hf_file_name(i, count) for fqn, i in fqn_to_index_mapping.items()}
    total = sum(math.prod(full[f].shape) * full[f].elem for f in full)
    mine = sorted(i for i in by_index if only_indices(i))
    if not mine:
        return weight_map, total
    fs.mkdir(output_dir)
    sources = SourceCache(fs, IOStats())
    try:
        _parallel(
            lambda i: _consolidate_file(
                fs, _join(fs, output_dir, hf_file_name(i, count)), by_index[i], full, sources, sync
            ),
            mine,
            num_threads,
        )
    finally:
        sources.close()
    return weight_map, total


def consolidate_safetensors_files(
    input_dir: str,
    output_dir: str,
    fqn_to_index_mapping: dict[str, int] | None,
    num_threads: int = 1,
    *,
    _fs: FileSystemBase | None = None,
    sync: bool = True,
) -> None:
    """Turn the shard files of a ``save_distributed`` save into full tensors in the HF layout.

    Each output tensor is assembled in one buffer straight from the shard files' byte ranges and written out before
    the next one is built: peak memory is the largest tensor per thread plus a constant. Works on bytes, so every
    dtype (int, bool, float8) consolidates. Files without ``DCP_SHARDING_INFO`` count as full tensors at offset 0.
    The shards must tile every tensor exactly: a region no shard holds (a missing rank's file) or a shard reaching
    past its data is refused, naming the tensor, before anything is allocated. Checksums recorded by a dcpio export
    are verified as each shard is read, and the output carries its own.

    Example::

        dcpio.consolidate_safetensors_files("export/sharded", "export/", fqn_to_index_mapping=None)

    Args:
        input_dir: directory of the shard files.
        output_dir: where ``model-0000i-of-0000N.safetensors`` and the index go (index last).
        fqn_to_index_mapping: tensor name -> output file index (1..N); must name exactly the tensors of the shards.
            None puts every tensor in one file (``model-00001-of-00001.safetensors``).
        num_threads: output files assembled in parallel.
    """
    fs = _fs if _fs is not None else FileSystem()
    weight_map, total = _consolidate(
        fs, str(input_dir), str(output_dir), fqn_to_index_mapping, num_threads, sync, lambda _i: True
    )
    _write_index(fs, str(output_dir), weight_map, total, sync)
    _remove_stale(fs, str(output_dir), set(weight_map.values()))


def consolidate_safetensors_files_on_every_rank(
    input_dir: str,
    output_dir: str,
    fqn_to_index_mapping: dict[str, int] | None,
    num_threads: int = 1,
    process_group: Any = None,
    *,
    _fs: FileSystemBase | None = None,
    sync: bool = True,
) -> None:
    """:func:`consolidate_safetensors_files` spread over the ranks of a process group.

    Rank ``r`` of ``W`` assembles the output files whose index ``i`` has ``i % W == r``; after a barrier rank 0 writes
    the index (every rank knows it from the shard headers alone), then all ranks meet at a second barrier. Call it on
    every rank with the same arguments.
    """
    import torch.distributed as dist

    fs = _fs if _fs is not None else FileSystem()
    rank = dist.get_rank(process_group) if dist.is_initialized() else 0
    world = dist.get_world_size(process_group) if dist.is_initialized() else 1
    error: BaseException | None = None
    weight_map: dict[str, str] = {}
    total = 0
    try:
        weight_map, total = _consolidate(
            fs,
            str(input_dir),
            str(output_dir),
            fqn_to_index_mapping,
            num_threads,
            sync,
            lambda i: i % world == rank,
        )
    except BaseException as err:  # reported after the barrier so no rank waits forever
        error = err
    failed = [error is not None]
    if dist.is_initialized():
        flags: list[Any] = [None] * world
        dist.all_gather_object(flags, failed[0], group=process_group)
        failed = flags
    if error is not None:
        raise error
    if any(failed):
        raise CheckpointWriteError(f"{output_dir}: consolidation failed on another rank; see that rank's error")
    if rank == 0:
        _write_index(fs, str(output_dir), weight_map, total, sync)
        _remove_stale(fs, str(output_dir), set(weight_map.values()))
    if dist.is_initialized():
        dist.barrier(group=process_group)
