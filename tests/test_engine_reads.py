"""Partial reads of large records (what a resharding load does), with checksum verification on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

import dcpio


class _Into:
    """The two planner calls ``read_data`` makes for tensors, aimed at one destination."""

    def __init__(self, dest: torch.Tensor) -> None:
        self.dest = dest

    def resolve_tensor(self, req: ReadItem) -> torch.Tensor:
        return self.dest

    def commit_tensor(self, req: ReadItem, tensor: torch.Tensor) -> None:
        pass


def _read_box(path: Path, offsets: tuple[int, ...], lengths: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    reader = dcpio.FileSystemReader(path)
    reader.set_up_storage_reader(reader.read_metadata(), True)
    dest = torch.zeros(lengths, dtype=dtype)
    zeros = torch.Size([0] * len(offsets))
    req = ReadItem(
        type=LoadItemType.TENSOR,
        dest_index=MetadataIndex("w"),
        dest_offsets=zeros,
        storage_index=MetadataIndex("w", zeros),
        storage_offsets=torch.Size(offsets),
        lengths=torch.Size(lengths),
    )
    reader.read_data(LoadPlan([req]), _Into(dest)).wait()  # type: ignore[arg-type]
    return dest


CASES: list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], torch.dtype]] = [
    ((5760, 1440), (0, 720), (5760, 720), torch.float32),  # a Shard(0) -> Shard(1) column half
    ((5760, 1440), (3, 0), (5000, 721), torch.float32),  # odd rows and columns
    ((4096, 3000), (10, 1001), (4000, 1999), torch.bfloat16),
    ((64, 128, 300), (1, 5, 0), (60, 100, 300), torch.float32),  # 3-d: slices of the middle dimension
    ((3000, 2048), (0, 1), (3000, 2047), torch.int8),
]


@pytest.mark.parametrize(("shape", "offsets", "lengths", "dtype"), CASES)
def test_verified_strided_box_is_exact(
    tmp_path: Path, shape: tuple[int, ...], offsets: tuple[int, ...], lengths: tuple[int, ...], dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    full = (torch.randn(shape, generator=gen) * 50).to(dtype)
    dcp.save({"w": full}, storage_writer=dcpio.FileSystemWriter(tmp_path))
    expected: Any = full
    for dim, (o, n) in enumerate(zip(offsets, lengths)):
        expected = expected.narrow(dim, o, n)
    assert torch.equal(_read_box(tmp_path, offsets, lengths, dtype), expected)


def test_flip_in_the_unneeded_half_of_a_block_is_still_caught(tmp_path: Path) -> None:
    full = torch.randn(5760, 1440, generator=torch.Generator().manual_seed(7))
    dcp.save({"w": full}, storage_writer=dcpio.FileSystemWriter(tmp_path, thread_count=1))
    data_file = next(p for p in tmp_path.iterdir() if p.name.endswith(".distcp"))
    reader = dcpio.FileSystemReader(tmp_path)
    info = next(iter(reader.read_metadata().storage_data.values()))
    head = info.dcpio_checksum[5]
    raw = bytearray(data_file.read_bytes())
    raw[info.offset + head + (3000 * 1440 + 10) * 4] ^= 0x01  # row 3000, column 10: outside columns [720, 1440)
    data_file.write_bytes(bytes(raw))
    assert os.path.getsize(data_file) == len(raw)
    with pytest.raises(dcpio.CorruptCheckpointError, match=r"checksum mismatch in bytes \[\d+, \d+\)"):
        _read_box(tmp_path, (0, 720), (5760, 720), torch.float32)
