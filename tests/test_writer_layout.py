"""How the writer lays a rank's data out in files: the automatic thread count and explicit values."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dcpio


def _data_files(path: Path) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.endswith(".distcp"))


def _state(n: int, numel: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    return {f"w{i}": torch.randn(numel, generator=gen) for i in range(n)}


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_explicit_thread_count_is_honoured(tmp_path: Path, threads: int) -> None:
    state = _state(6, 1000)
    dcp.save(state, storage_writer=dcpio.FileSystemWriter(tmp_path, thread_count=threads))
    assert len(_data_files(tmp_path)) == threads
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(out, storage_reader=dcpio.FileSystemReader(tmp_path))
    assert all(torch.equal(out[k], v) for k, v in state.items())


def test_automatic_thread_count_keeps_small_saves_in_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCPIO_IO_THREADS", "4")
    dcp.save(_state(8, 1000), storage_writer=dcpio.FileSystemWriter(tmp_path / "small"))
    assert len(_data_files(tmp_path / "small")) == 1
    # 8 tensors of 1 MiB with one file per 2 MiB: as many files as threads allow
    monkeypatch.setenv("DCPIO_MIN_BYTES_PER_FILE", str(2 << 20))
    dcp.save(_state(8, 1 << 18), storage_writer=dcpio.FileSystemWriter(tmp_path / "big"))
    assert len(_data_files(tmp_path / "big")) == 4


def test_one_file_per_item(tmp_path: Path) -> None:
    state = _state(5, 100)
    dcp.save(state, storage_writer=dcpio.FileSystemWriter(tmp_path, single_file_per_rank=False, thread_count=2))
    assert len(_data_files(tmp_path)) == 5
