"""dcp.async_save with dcpio's writer as the async stager."""

from __future__ import annotations

import copy
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import AsyncStager

import dcpio
from helpers import assert_tree_equal, make_state_dict, rand_tensor, template_like, trusted_objects


def _wait(response: Any) -> None:
    # torch returns a Future, or an AsyncSaveResponse when the stager itself returns a future
    fut: Future[Any] = response.upload_completion if hasattr(response, "upload_completion") else response
    fut.result(timeout=120)


def _tensors(sd: Any) -> list[torch.Tensor]:
    if isinstance(sd, torch.Tensor):
        return [sd]
    if isinstance(sd, dict):
        return [t for v in sd.values() for t in _tensors(v)]
    if isinstance(sd, list):
        return [t for v in sd for t in _tensors(v)]
    return []


def _mutate_in_place(sd: Any) -> None:
    """Flip bits of every element through the caller's own storage (views write into their bases)."""
    for t in _tensors(sd):
        if not t.numel() or 0 in t.stride():
            continue  # an expanded tensor cannot be written element-wise; its base is mutated elsewhere
        raw = t.detach()
        flipped = raw.contiguous().reshape(-1).view(torch.uint8) ^ (0x01 if t.dtype == torch.bool else 0x5A)
        raw.copy_(flipped.view(t.dtype).reshape(t.shape))


def test_writer_is_an_async_stager() -> None:
    assert isinstance(dcpio.FileSystemWriter("unused"), AsyncStager)


def test_mutation_after_async_save_returns_does_not_change_checkpoint(ckpt_dir: Path) -> None:
    sd = make_state_dict(seed=21)
    sd["big"] = rand_tensor((1 << 20,), torch.float32, torch.Generator().manual_seed(1))  # keeps the upload busy
    expected = copy.deepcopy(sd)
    writer = dcpio.FileSystemWriter(ckpt_dir, thread_count=2)
    response = dcp.async_save(sd, storage_writer=writer)
    # the caller's training step runs right away: change every tensor and some objects in place
    _mutate_in_place(sd)
    sd["objects"]["ints"].append(99)
    sd["objects"]["obj"].values.append(99)
    _wait(response)

    loaded = template_like(expected)
    with trusted_objects():
        dcp.load(loaded, storage_reader=dcpio.FileSystemReader(ckpt_dir))
    assert_tree_equal(expected, loaded)


def test_stage_returns_a_copy_that_later_mutation_cannot_change() -> None:
    sd = make_state_dict(seed=22, objects=False)
    expected = copy.deepcopy(sd)
    writer = dcpio.FileSystemWriter("unused-path")
    staged = writer.stage(sd)
    if isinstance(staged, Future):
        staged = staged.result(timeout=60)
    _mutate_in_place(sd)
    assert_tree_equal(expected, staged)
    src_ptrs = {t.data_ptr() for t in _tensors(sd) if t.numel()}
    assert not src_ptrs & {t.data_ptr() for t in _tensors(staged) if t.numel()}, "staged tensors share memory"


def test_cache_staged_state_dict_reuses_buffers_across_saves(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(23)
    sd = {
        "w": rand_tensor((64, 32), torch.bfloat16, gen),
        "b": rand_tensor((1000,), torch.float32, gen),
        "t": rand_tensor((8, 8), torch.int64, gen).t(),
        "nested": {"x": rand_tensor((5,), torch.float8_e4m3fn, gen)},
        "step": 1,
    }
    writer = dcpio.FileSystemWriter(tmp_path / "c1", cache_staged_state_dict=True)

    def stage(state: dict[str, Any]) -> dict[str, Any]:
        out = writer.stage(state)
        return out.result(timeout=60) if isinstance(out, Future) else out

    staged1 = stage(sd)
    ptrs1 = [t.data_ptr() for t in _tensors(staged1)]
    assert_tree_equal({k: v for k, v in sd.items() if k != "step"}, {k: v for k, v in staged1.items() if k != "step"})
    first = copy.deepcopy(staged1)

    _mutate_in_place(sd)
    staged2 = stage(sd)
    ptrs2 = [t.data_ptr() for t in _tensors(staged2)]
    assert ptrs1 == ptrs2, "cache_staged_state_dict=True allocated new staging buffers for the second save"
    assert_tree_equal({k: v for k, v in sd.items() if k != "step"}, {k: v for k, v in staged2.items() if k != "step"})
    assert not all(
        torch.equal(a.reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
        for a, b in zip(_tensors(first), _tensors(staged2))
    ), "the mutation did not reach the second staging (the test is broken)"

    # the same through dcp.async_save: two checkpoints, each with its own values, one stager
    sd1 = copy.deepcopy(sd)
    _wait(dcp.async_save(sd, checkpoint_id=tmp_path / "c1", storage_writer=writer))
    _mutate_in_place(sd)
    sd["step"] = 2
    sd2 = copy.deepcopy(sd)
    _wait(dcp.async_save(sd, checkpoint_id=tmp_path / "c2", storage_writer=writer))
    staged3 = stage(sd)
    assert [t.data_ptr() for t in _tensors(staged3)] == ptrs1, "staging buffers changed across async saves"

    for path, want in ((tmp_path / "c1", sd1), (tmp_path / "c2", sd2)):
        loaded = template_like(want)
        dcp.load(loaded, storage_reader=dcpio.FileSystemReader(path))
        assert_tree_equal(want, loaded)
