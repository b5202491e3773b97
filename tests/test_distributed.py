"""Real multi-process checkpoints: gloo over 127.0.0.1, DTensor state dicts on a CPU device mesh.

Two launches keep this file fast: 2 ranks save (layout A) and reload with another layout, and save/load without
collectives; then 3 ranks load the 2-rank checkpoint with a third layout and save their own (layout D). The test
process itself (no process group) then loads both checkpoints as plain full tensors and inspects their metadata.
The rank functions below run in the child processes (``spawn_ranks`` imports this module there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import dcpio
from helpers import assert_tree_equal, rand_tensor, spawn_ranks, template_like


def _full() -> dict[str, torch.Tensor]:
    """The unsharded tensors, identical in every process (fixed seed)."""
    gen = torch.Generator().manual_seed(42)
    return {
        "s0": rand_tensor((7, 5), torch.float32, gen),  # 7 rows: uneven over 2 and 3 ranks
        "s1": rand_tensor((4, 9), torch.bfloat16, gen),
        "rep": rand_tensor((256, 256), torch.float32, gen),  # 256 KiB, so a duplicate would show on disk
        "ids": rand_tensor((5,), torch.int64, gen),
        "tiny": rand_tensor((2,), torch.float16, gen),  # one rank of three holds an empty shard
        "nested.w": rand_tensor((6, 4), torch.float8_e5m2, gen),
        "plain": rand_tensor((3, 3), torch.float64, gen),  # a regular tensor, the same on every rank
    }


# placements per layout: A saves on 2 ranks, B reloads on 2, C loads on 3, D saves on 3
_LAYOUTS: dict[str, dict[str, str]] = {
    "A": {"s0": "S0", "s1": "S1", "rep": "R", "ids": "S0", "tiny": "S0", "nested.w": "S1"},
    "B": {"s0": "S1", "s1": "S0", "rep": "S0", "ids": "R", "tiny": "R", "nested.w": "S0"},
    "C": {"s0": "S0", "s1": "S1", "rep": "R", "ids": "S0", "tiny": "S0", "nested.w": "R"},
    "D": {"s0": "S1", "s1": "R", "rep": "S1", "ids": "S0", "tiny": "S0", "nested.w": "S0"},
}


def _placement(code: str) -> Any:
    from torch.distributed.tensor import Replicate, Shard

    return {"S0": Shard(0), "S1": Shard(1), "R": Replicate()}[code]


def _dtensor_state_dict(mesh: Any, layout: str, full: dict[str, torch.Tensor]) -> dict[str, Any]:
    from torch.distributed.tensor import distribute_tensor

    dt = {
        name: distribute_tensor(full[name].clone(), mesh, [_placement(code)], src_data_rank=None)
        for name, code in _LAYOUTS[layout].items()
    }
    return {
        "s0": dt["s0"],
        "s1": dt["s1"],
        "rep": dt["rep"],
        "ids": dt["ids"],
        "tiny": dt["tiny"],
        "nested": {"w": dt["nested.w"]},
        "plain": full["plain"].clone(),
        "step": 1234,
    }


def _sentinel_full() -> dict[str, torch.Tensor]:
    return {k: template_like(v) for k, v in _full().items()}


def _verify_local(loaded: dict[str, Any], mesh: Any, layout: str) -> None:
    """Each rank's local shards equal the same slice of the full tensors, bit for bit."""
    expected = _dtensor_state_dict(mesh, layout, _full())
    for name in ("s0", "s1", "rep", "ids", "tiny"):
        assert_tree_equal(expected[name].to_local(), loaded[name].to_local(), f"rank {dist.get_rank()}: {name}")
    assert_tree_equal(expected["nested"]["w"].to_local(), loaded["nested"]["w"].to_local(), "nested.w")
    assert_tree_equal(expected["plain"], loaded["plain"], "plain")
    assert loaded["step"] == 1234


def _load_in_layout(path: str, mesh: Any, layout: str, **reader_kw: Any) -> dict[str, Any]:
    dest = _dtensor_state_dict(mesh, layout, _sentinel_full())
    dest["step"] = None
    dcp.load(dest, storage_reader=dcpio.FileSystemReader(path, **reader_kw))
    return dest


def _rank_tensors(rank: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1000 + rank)
    return {"x": rand_tensor((4, 3), torch.float32, gen), "m": {"y": rand_tensor((5,), torch.int32, gen)}, "r": rank}


# ------------------------------------------------------------------------------------------------------------------
# rank functions (run in the children)
# ------------------------------------------------------------------------------------------------------------------


def two_rank_worker(rank: int, world: int, root: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    sd = _dtensor_state_dict(mesh, "A", _full())
    dcp.save(sd, storage_writer=dcpio.FileSystemWriter(f"{root}/ckA", thread_count=2))
    dcp.save(sd, storage_writer=dcpio.FileSystemWriter(f"{root}/ckO", single_file_per_rank=False))

    _verify_local(_load_in_layout(f"{root}/ckA", mesh, "A"), mesh, "A")
    _verify_local(_load_in_layout(f"{root}/ckA", mesh, "B", thread_count=3), mesh, "B")

    # without collectives every rank writes and reads its own __{rank}.metadata
    mine = _rank_tensors(rank)
    dcp.save(mine, storage_writer=dcpio.FileSystemWriter(f"{root}/ckD"), use_collectives=False)
    dist.barrier()
    dest = template_like(mine)
    dcp.load(dest, storage_reader=dcpio.FileSystemReader(f"{root}/ckD"))
    assert_tree_equal(mine, dest, f"rank {rank} use_collectives=False")


def three_rank_worker(rank: int, world: int, root: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    # a 2-rank checkpoint, read by 3 ranks in another layout
    _verify_local(_load_in_layout(f"{root}/ckA", mesh, "C", thread_count=2), mesh, "C")
    # a 3-rank checkpoint with one file per item, compressed
    sd = _dtensor_state_dict(mesh, "D", _full())
    writer = dcpio.FileSystemWriter(
        f"{root}/ckB", single_file_per_rank=False, thread_count=2, _extensions=[dcpio.ZStandard()]
    )
    dcp.save(sd, storage_writer=writer)
    _verify_local(_load_in_layout(f"{root}/ckB", mesh, "A"), mesh, "A")
    # 3 ranks replace the 2-rank checkpoint ckO: the old ranks' files must go
    dcp.save(sd, storage_writer=dcpio.FileSystemWriter(f"{root}/ckO", overwrite=True))


# ------------------------------------------------------------------------------------------------------------------
# tests (in the pytest process)
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def two_rank_run(dist_root: Path) -> Path:
    spawn_ranks(2, "test_distributed:two_rank_worker", [str(dist_root)], dist_root)
    return dist_root


@pytest.fixture(scope="module")
def three_rank_run(two_rank_run: Path) -> Path:
    spawn_ranks(3, "test_distributed:three_rank_worker", [str(two_rank_run)], two_rank_run)
    return two_rank_run


def _expected_full_state() -> dict[str, Any]:
    full = _full()
    return {
        "s0": full["s0"],
        "s1": full["s1"],
        "rep": full["rep"],
        "ids": full["ids"],
        "tiny": full["tiny"],
        "nested": {"w": full["nested.w"]},
        "plain": full["plain"],
        "step": 1234,
    }


def test_two_ranks_save_and_reload_in_other_layouts(two_rank_run: Path) -> None:
    # the resharded loads are checked inside the ranks; here: the checkpoint is complete
    assert (two_rank_run / "ckA" / ".metadata").is_file()


@pytest.mark.parametrize("ckpt", ["ckA", "ckB", "ckO"])
@pytest.mark.parametrize("threads", [1, 3])
def test_single_process_without_process_group_loads_full_tensors(three_rank_run: Path, ckpt: str, threads: int) -> None:
    assert not dist.is_initialized()
    expected = _expected_full_state()
    dest = template_like(expected)
    dcp.load(dest, storage_reader=dcpio.FileSystemReader(three_rank_run / ckpt, thread_count=threads))
    assert_tree_equal(expected, dest)


def test_replicated_tensors_are_written_once(two_rank_run: Path) -> None:
    path = two_rank_run / "ckA"
    md = dcpio.FileSystemReader(path).read_metadata()
    per_fqn: dict[str, list[Any]] = {}
    for idx, info in md.storage_data.items():
        per_fqn.setdefault(idx.fqn, []).append(info)
    assert len(per_fqn["rep"]) == 1, f"Replicate() DTensor stored {len(per_fqn['rep'])} times"
    assert len(per_fqn["plain"]) == 1, f"a tensor equal on all ranks stored {len(per_fqn['plain'])} times"
    assert len(per_fqn["s0"]) == 2 and len(per_fqn["s1"]) == 2  # one shard per rank

    full = _full()
    unique = sum(t.numel() * t.element_size() for t in full.values())
    rep_bytes = full["rep"].numel() * full["rep"].element_size()
    on_disk = sum(p.stat().st_size for p in path.iterdir() if p.name != ".metadata")
    assert unique <= on_disk < unique + rep_bytes, f"{on_disk} bytes of data for {unique} unique bytes"


def test_use_collectives_false_writes_per_rank_metadata(two_rank_run: Path) -> None:
    path = two_rank_run / "ckD"
    assert (path / "__0.metadata").is_file() and (path / "__1.metadata").is_file()
    assert not (path / ".metadata").exists()
    # one process without a process group reads rank 0's part
    rank0 = _rank_tensors(0)
    dest = template_like(rank0)
    dcp.load(dest, storage_reader=dcpio.FileSystemReader(path))
    assert_tree_equal(rank0, dest)
    # and each rank's metadata names only that rank's files
    for rank in (0, 1):
        md = dcpio.FileSystemReader(path).read_metadata(rank=rank)
        files = {info.relative_path for info in md.storage_data.values()}
        assert files and all(f.startswith(f"__{rank}_") for f in files), files


def test_three_ranks_overwrite_two_rank_checkpoint_without_stale_files(three_rank_run: Path) -> None:
    path = three_rank_run / "ckO"
    md = dcpio.FileSystemReader(path).read_metadata()
    named = {info.relative_path for info in md.storage_data.values()}
    assert {f.split("_")[2] for f in named} == {"0", "1", "2"}, f"not every rank's files are named: {named}"
    on_disk = {p.name for p in path.iterdir()}
    assert on_disk == named | {".metadata"}, f"stale files after the overwrite: {sorted(on_disk - named)}"


def failing_worker(rank: int, world: int) -> None:
    raise ValueError(f"boom from rank {rank} of {world}")


def test_spawn_ranks_surfaces_every_rank_traceback(tmp_path: Path) -> None:
    with pytest.raises(AssertionError) as info:
        spawn_ranks(2, "test_distributed:failing_worker", [], tmp_path, timeout=120)
    text = str(info.value)
    for rank in (0, 1):
        assert f"boom from rank {rank} of 2" in text
        assert f"=== rank {rank}: exit 1 ===" in text
    assert text.count("Traceback (most recent call last)") >= 2
