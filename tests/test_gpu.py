"""Accelerator paths: device tensors are staged through pinned memory with copies ahead of the writes.

CI has no GPU; these tests skip there and run on a machine with CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dcpio

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("copy_ahead", [0, 1 << 20, 64 << 20])
def test_cuda_state_dict_round_trip(tmp_path: Path, threads: int, copy_ahead: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    state = {f"w{i}": torch.randn(256, 1024 + i, device="cuda", generator=gen) for i in range(12)}
    state["t"] = torch.randn(64, 64, device="cuda", generator=gen).t()  # non-contiguous on the device
    state["h"] = torch.arange(100, device="cuda", dtype=torch.bfloat16)
    expected = {k: v.cpu().clone() for k, v in state.items()}
    writer = dcpio.FileSystemWriter(tmp_path, thread_count=threads, per_thread_copy_ahead=copy_ahead)
    dcp.save(state, storage_writer=writer)
    for target_device in ("cpu", "cuda"):
        out = {k: torch.zeros_like(v, device=target_device) for k, v in expected.items()}
        dcp.load(out, storage_reader=dcpio.FileSystemReader(tmp_path))
        for k, v in expected.items():
            assert torch.equal(out[k].cpu().view(torch.uint8), v.contiguous().view(torch.uint8)), k


def test_cuda_async_save_with_cached_pinned_staging(tmp_path: Path) -> None:
    state = {"w": torch.randn(1024, 1024, device="cuda")}
    writer = dcpio.FileSystemWriter(tmp_path / "a", cache_staged_state_dict=True)
    dcp.async_save(state, storage_writer=writer).result()
    staged_ptr = writer.state_dict_cache["w"].data_ptr()  # type: ignore[index]
    assert writer.state_dict_cache["w"].is_pinned()  # type: ignore[index]
    state["w"].add_(1)
    expected = state["w"].cpu().clone()
    writer.reset(tmp_path / "b")
    dcp.async_save(state, storage_writer=writer, checkpoint_id=tmp_path / "b").result()
    assert writer.state_dict_cache["w"].data_ptr() == staged_ptr  # type: ignore[index]
    out = {"w": torch.zeros(1024, 1024)}
    dcp.load(out, storage_reader=dcpio.FileSystemReader(tmp_path / "b"))
    assert torch.equal(out["w"], expected)


def test_cuda_cached_staging_waits_for_every_queued_copy(tmp_path: Path) -> None:
    # 64 x 8 MiB copies are queued without waiting one by one; the background write must still see every byte
    state = {f"w{i}": torch.randn(2048, 1024, device="cuda") for i in range(64)}
    writer = dcpio.FileSystemWriter(tmp_path / "a", cache_staged_state_dict=True)
    dcp.async_save(state, storage_writer=writer).result()
    for i, t in enumerate(state.values()):
        t.fill_(float(i + 1))
    expected = {k: v.cpu() for k, v in state.items()}
    writer.reset(tmp_path / "b")
    future = dcp.async_save(state, storage_writer=writer, checkpoint_id=tmp_path / "b")
    for t in state.values():
        t.zero_()  # training goes on at once: only the staged copy may reach the checkpoint
    future.result()
    out = {k: torch.empty(2048, 1024) for k in state}
    dcp.load(out, storage_reader=dcpio.FileSystemReader(tmp_path / "b"))
    for k, v in expected.items():
        assert torch.equal(out[k], v), k


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_copies_ahead_from_a_second_device_land_before_they_are_written(tmp_path: Path) -> None:
    # writer threads start on device 0; a rank that trains on device 1 must still have each copy waited for on
    # device 1's stream (an event recorded on device 0 would let the write read a half-copied buffer)
    with torch.cuda.device(1):
        state = {f"w{i}": torch.randn(2048, 1024, device="cuda:1") for i in range(16)}
        expected = {k: v.cpu() for k, v in state.items()}
        dcp.save(state, storage_writer=dcpio.FileSystemWriter(tmp_path, thread_count=2, per_thread_copy_ahead=1 << 30))
    out = {k: torch.empty(2048, 1024) for k in state}
    dcp.load(out, storage_reader=dcpio.FileSystemReader(tmp_path))
    for k, v in expected.items():
        assert torch.equal(out[k], v), k
