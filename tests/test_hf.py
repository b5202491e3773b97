"""Hugging Face safetensors storage: layout, round trips, interop (safetensors, torch, transformers), gloo ranks."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from dcpio.errors import CheckpointError, CorruptCheckpointError, PlanMismatchError, UnsafeCheckpointError
from dcpio.formats.hf import (
    HuggingFaceLoadPlanner,
    HuggingFaceStorageReader,
    HuggingFaceStorageWriter,
    consolidate_safetensors_files,
)
from dcpio.formats.safetensors import DTYPES, write_file
from dcpio.movers import FileSystem
from helpers import all_dtypes, bitwise_equal, exception_chain, rand_tensor, run_stock, spawn_ranks

INDEX = "model.safetensors.index.json"
_STORABLE = [d for d in all_dtypes(complex_=True) if any(x.torch_dtype == d for x in DTYPES.values())]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _save(sd: dict[str, torch.Tensor], path: Path, **kw: Any) -> None:
    dcp.save(sd, storage_writer=HuggingFaceStorageWriter(str(path), **kw), no_dist=True)


def _load(template: dict[str, torch.Tensor], path: Path, planner: Any = None, **kw: Any) -> dict[str, torch.Tensor]:
    dcp.load(template, storage_reader=HuggingFaceStorageReader(str(path), **kw), planner=planner, no_dist=True)
    return template


def _find(exc: BaseException, kind: type[BaseException]) -> BaseException:
    found = [e for e in exception_chain(exc) if isinstance(e, kind)]
    assert found, f"no {kind.__name__} in {exception_chain(exc)!r}"
    return found[0]


# ------------------------------------------------------------------------------------------- layout, round trip
def test_every_dtype_round_trips(tmp_path: Path) -> None:
    g = _gen(1)
    sd = {f"t.{str(d).removeprefix('torch.')}": rand_tensor([5, 3], d, g) for d in _STORABLE}
    sd["scalar"] = torch.tensor(7, dtype=torch.int64)
    sd["empty"] = torch.zeros(0, 4)
    _save(sd, tmp_path)
    got = _load({k: torch.zeros_like(v) for k, v in sd.items()}, tmp_path, thread_count=2)
    for k, v in sd.items():
        assert bitwise_equal(got[k], v), k
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["model-00001-of-00001.safetensors", INDEX]


def test_mapping_layout_index_and_safetensors_load(tmp_path: Path) -> None:
    g = _gen(2)
    sd = {
        "embed.weight": torch.randn(16, 8, generator=g),
        "layers.0.w": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "layers.0.mask": torch.rand(8, generator=g) > 0.5,
        "layers.1.w": torch.randint(-5, 5, (4, 4), generator=g, dtype=torch.int32),
        "head.bias": torch.randn(16, generator=g, dtype=torch.float64),
    }
    mapping = {"embed.weight": 1, "layers.0.w": 2, "layers.0.mask": 2, "layers.1.w": 3, "head.bias": 3}
    _save(sd, tmp_path, fqn_to_index_mapping=mapping)
    names = {i: f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names.values(), INDEX])
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["weight_map"] == {k: names[i] for k, i in mapping.items()}
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
    for i, name in names.items():
        loaded = load_file(str(tmp_path / name))
        assert set(loaded) == {k for k, j in mapping.items() if j == i}
        for k, v in loaded.items():
            assert bitwise_equal(v, sd[k]), k


def test_tied_weights_save_and_load(tmp_path: Path) -> None:
    emb = torch.randn(32, 8, generator=_gen(3))
    sd = {"model.embed_tokens.weight": emb, "lm_head.weight": emb}
    _save(sd, tmp_path)
    loaded = load_file(str(tmp_path / "model-00001-of-00001.safetensors"))
    assert torch.equal(loaded["lm_head.weight"], emb) and torch.equal(loaded["model.embed_tokens.weight"], emb)
    got = _load({k: torch.zeros(32, 8) for k in sd}, tmp_path)
    assert torch.equal(got["lm_head.weight"], emb)


def test_no_tmp_left_and_stale_files_removed_on_resave(tmp_path: Path) -> None:
    sd = {"a": torch.ones(4), "b": torch.zeros(4)}
    _save(sd, tmp_path, fqn_to_index_mapping={"a": 1, "b": 2})
    assert (tmp_path / "model-00002-of-00002.safetensors").exists()
    _save(sd, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-00001-of-00001.safetensors", INDEX]
    assert torch.equal(_load({"a": torch.zeros(4), "b": torch.ones(4)}, tmp_path)["b"], torch.zeros(4))


def test_writer_rejects_non_tensors_and_unmapped_keys(tmp_path: Path) -> None:
    with pytest.raises(BaseException) as info:
        _save({"a": torch.ones(2), "step": 3}, tmp_path / "x")  # type: ignore[dict-item]
    assert "step" in str(_find(info.value, CheckpointError))
    with pytest.raises(BaseException) as info:
        _save({"a": torch.ones(2), "b": torch.ones(2)}, tmp_path / "y", fqn_to_index_mapping={"a": 1})
    assert "'b'" in str(_find(info.value, PlanMismatchError))


def test_load_converts_dtype_and_fills_non_contiguous_destinations(tmp_path: Path) -> None:
    src = torch.randn(6, 4, generator=_gen(4))
    _save({"w": src, "v": src.clone()}, tmp_path)
    dest = {"w": torch.zeros(6, 4, dtype=torch.float64), "v": torch.zeros(4, 6).t()}
    _load(dest, tmp_path)
    assert torch.equal(dest["w"], src.double())
    assert torch.equal(dest["v"], src)


# ------------------------------------------------------------------------------------------------- interop
def test_torch_hf_reader_loads_our_output(tmp_path: Path) -> None:
    g = _gen(5)
    emb = torch.randn(10, 6, generator=g)
    sd = {
        "emb": emb,
        "tied": emb,
        "w16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "ids": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "f16": torch.randn(7, generator=g).half(),
    }
    out = tmp_path / "ckpt"
    _save(sd, out, fqn_to_index_mapping={"emb": 1, "tied": 2, "w16": 2, "ids": 1, "f16": 2})
    torch.save(sd, tmp_path / "expected.pt")
    run_stock(
        f"""
        import torch, torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageReader
        want = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        got = {{k: torch.zeros_like(v) for k, v in want.items()}}
        dcp.load(got, storage_reader=HuggingFaceStorageReader({str(out)!r}), no_dist=True)
        for k in want:
            assert torch.equal(got[k], want[k]), k
        print("ok")
        """
    )


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_from_pretrained_logits_match(tmp_path: Path, tie: bool) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    sd = model.state_dict()
    if tie:
        assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    out = tmp_path / "model"
    n = len(sd)
    mapping = {k: 1 + (i * 2) // n for i, k in enumerate(sd)}
    _save(dict(sd), out, fqn_to_index_mapping=mapping)
    config.save_pretrained(str(out))
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    ids = torch.randint(0, 64, (2, 9), generator=_gen(6))
    with torch.no_grad():
        want = model(ids).logits
        got = loaded(ids).logits
    assert torch.equal(want, got)
    loaded_sd = loaded.state_dict()
    for k, v in sd.items():
        assert torch.equal(loaded_sd[k], v), k


# -------------------------------------------------------------------------------------------- hub folders
def _hub_tensors() -> dict[str, torch.Tensor]:
    g = _gen(7)
    return {
        "model.layers.0.weight": torch.randn(8, 4, generator=g),
        "model.layers.1.weight": torch.randn(8, 4, generator=g).to(torch.float16),
        "model.norm.weight": torch.randn(4, generator=g),
        "model.flags": torch.tensor([True, False, True]),
        "model.count": torch.tensor(5, dtype=torch.int32),
    }


@pytest.mark.parametrize("kind", ["single", "sharded_index", "sharded_no_index"])
def test_reader_loads_plain_hub_folders(tmp_path: Path, kind: str) -> None:
    sd = _hub_tensors()
    keys = sorted(sd)
    if kind == "single":
        save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    else:
        parts = {"model-00001-of-00002.safetensors": keys[:2], "model-00002-of-00002.safetensors": keys[2:]}
        for name, ks in parts.items():
            save_file({k: sd[k] for k in ks}, str(tmp_path / name))
        if kind == "sharded_index":
            wm = {k: n for n, ks in parts.items() for k in ks}
            (tmp_path / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}))
            # a stray file the index does not name must be ignored
            save_file({"model.norm.weight": torch.zeros(4)}, str(tmp_path / "stale.safetensors"))
    got = _load({k: torch.zeros_like(v) for k, v in sd.items()}, tmp_path, thread_count=3)
    for k, v in sd.items():
        assert bitwise_equal(got[k], v), k


def test_key_mapping_renames(tmp_path: Path) -> None:
    sd = _hub_tensors()
    save_file(sd, str(tmp_path / "model.safetensors"))
    mapping = {r"^model\.layers\.(\d+)\.": r"blocks.\1.", r"^model\.": ""}
    want = {"blocks.0.weight", "blocks.1.weight", "norm.weight", "flags", "count"}
    reader = HuggingFaceStorageReader(str(tmp_path), key_mapping=mapping)
    assert set(reader.read_metadata().state_dict_metadata) == want
    dest = {"blocks.1.weight": torch.zeros(8, 4, dtype=torch.float16), "norm.weight": torch.zeros(4)}
    dcp.load(dest, storage_reader=reader, no_dist=True)
    assert torch.equal(dest["blocks.1.weight"], sd["model.layers.1.weight"])
    assert torch.equal(dest["norm.weight"], sd["model.norm.weight"])


# ---------------------------------------------------------------------------------------------------- errors
def test_missing_key_names_key_file_and_neighbours(tmp_path: Path) -> None:
    save_file(_hub_tensors(), str(tmp_path / "model.safetensors"))
    with pytest.raises(BaseException) as info:
        _load({"model.layers.0.weigth": torch.zeros(8, 4)}, tmp_path, planner=HuggingFaceLoadPlanner())
    msg = str(_find(info.value, PlanMismatchError))
    assert "model.layers.0.weigth" in msg and "model.layers.0.weight" in msg and "model.safetensors" in msg


def test_shape_mismatch_names_file_and_found_shape(tmp_path: Path) -> None:
    save_file(_hub_tensors(), str(tmp_path / "model.safetensors"))
    with pytest.raises(BaseException) as info:
        _load({"model.layers.0.weight": torch.zeros(4, 8)}, tmp_path, planner=HuggingFaceLoadPlanner())
    msg = str(_find(info.value, PlanMismatchError))
    assert "model.layers.0.weight" in msg and "[8, 4]" in msg and "model.safetensors" in msg
    # torch's default planner refuses too (its own message)
    with pytest.raises(BaseException) as info:
        _load({"model.layers.0.weight": torch.zeros(4, 8)}, tmp_path)
    assert "model.layers.0.weight" in str(info.value)


def test_truncated_and_corrupted_files(tmp_path: Path) -> None:
    save_file(_hub_tensors(), str(tmp_path / "model.safetensors"))
    path = tmp_path / "model.safetensors"
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    broken = bytearray(blob)
    broken[8 + n // 2] = ord("}")
    for bad in (blob[:-5], bytes(broken), blob[:6]):
        path.write_bytes(bad)
        with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors"):
            HuggingFaceStorageReader(str(tmp_path)).read_metadata()
        # through dcp.load torch keeps only the message of a read_metadata error (in an AssertionError)
        with pytest.raises(BaseException, match="not a valid safetensors file"):
            _load({"model.norm.weight": torch.zeros(4)}, tmp_path)


def test_file_truncated_after_planning_is_corrupt(tmp_path: Path) -> None:
    save_file(_hub_tensors(), str(tmp_path / "model.safetensors"))
    reader = HuggingFaceStorageReader(str(tmp_path))
    metadata = reader.read_metadata()
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-40])
    reader.read_metadata = lambda *a, **k: metadata  # type: ignore[method-assign]
    with pytest.raises(BaseException) as info:
        dcp.load({k: torch.zeros_like(v) for k, v in _hub_tensors().items()}, storage_reader=reader, no_dist=True)
    assert "model.safetensors" in str(_find(info.value, CorruptCheckpointError))


def test_index_naming_outside_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {"a": "../evil.safetensors"}}))
    with pytest.raises(UnsafeCheckpointError, match="evil"):
        HuggingFaceStorageReader(str(tmp_path)).read_metadata()


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a Hugging Face checkpoint"):
        HuggingFaceStorageReader(str(tmp_path)).read_metadata()


def _read_block(reader: HuggingFaceStorageReader, offs: tuple[int, ...], lens: tuple[int, ...]) -> torch.Tensor:
    """Read one block of the only tensor ``x`` through ``read_data``, as a sharded load would."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

    metadata = reader.read_metadata()
    reader.set_up_storage_reader(metadata, True)
    dest = {"x": torch.zeros(lens)}
    planner = DefaultLoadPlanner()
    planner.set_up_planner(dest, metadata, True)
    (index,) = [k for k in metadata.storage_data if k.fqn == "x"]
    zeros = tuple(0 for _ in lens)
    item = ReadItem(LoadItemType.TENSOR, MetadataIndex("x", zeros), zeros, index, offs, lens)
    reader.read_data(LoadPlan([item]), planner).wait()
    return dest["x"]


@pytest.mark.parametrize(
    ("shape", "offs", "lens", "max_ratio"),
    [
        ((64, 32), (16, 0), (16, 32), 1.0),  # row slice: one range
        ((16, 16384), (0, 8192), (16, 8192), 1.0),  # big column runs
        ((64, 32), (0, 16), (64, 16), 2.0),  # small column runs
        ((4, 6, 8), (1, 2, 0), (2, 3, 8), 2.0),
        ((10,), (3,), (4,), 1.0),
    ],
)
def test_reads_only_needed_ranges(
    tmp_path: Path, shape: tuple[int, ...], offs: tuple[int, ...], lens: tuple[int, ...], max_ratio: float
) -> None:
    # the HF reader runs dcpio's engine; reader.stats counts bytes read by requests and copied out of maps
    full = torch.randn(*shape, generator=_gen(8))
    write_file(FileSystem(), str(tmp_path / "m.safetensors"), {"x": full, "after": torch.ones(1 << 16)})
    reader = HuggingFaceStorageReader(str(tmp_path), _only_files=["m.safetensors"])
    got = _read_block(reader, offs, lens)
    assert torch.equal(got, full[tuple(slice(o, o + n) for o, n in zip(offs, lens))])
    needed = got.numel() * 4
    moved = reader.stats.bytes_read + reader.stats.bytes_mapped
    assert needed <= moved <= max_ratio * needed, reader.stats


def test_whole_tensor_load_reads_that_tensor_only(tmp_path: Path) -> None:
    w = torch.arange(64 * 32, dtype=torch.float32).reshape(64, 32)
    save_file({"w": w, "other": torch.ones(1 << 16)}, str(tmp_path / "model.safetensors"))
    reader = HuggingFaceStorageReader(tmp_path)
    out = {"w": torch.zeros(64, 32)}
    dcp.load(out, storage_reader=reader, no_dist=True)
    assert torch.equal(out["w"], w)
    assert reader.stats.bytes_read == w.numel() * 4, reader.stats
    assert reader.stats.requests == 1, reader.stats


# ---------------------------------------------------------------------------------------------- consolidation
def _manual_shard(path: Path, tensors: dict[str, tuple[torch.Tensor, list[int]]]) -> None:
    info = {k: {"saved_offsets": offs} for k, (_, offs) in tensors.items()}
    write_file(
        FileSystem(),
        str(path),
        {k: t for k, (t, _) in tensors.items()},
        {"DCP_SHARDING_INFO": json.dumps(info), "DCP_VERSION": "1.0", "format": "pt"},
    )


def test_consolidate_every_dtype_gaps_and_uneven(tmp_path: Path) -> None:
    g = _gen(9)
    shards = tmp_path / "shards"
    shards.mkdir()
    full = {f"t.{d}": rand_tensor([6, 5], d, g) for d in (torch.int64, torch.bool, torch.bfloat16, torch.uint8)}
    # rank 1 holds rows 0..3 and columns 0..2, rank 2 rows 4..5 / columns 3..4 (Shard(0) and Shard(1) mixes)
    _manual_shard(
        shards / "shard-00001-model-00001-of-00001.safetensors", {k: (v[:4], [0, 0]) for k, v in full.items()}
    )
    _manual_shard(
        shards / "shard-00002-model-00001-of-00001.safetensors", {k: (v[4:], [4, 0]) for k, v in full.items()}
    )
    gap = torch.arange(40, dtype=torch.float32).reshape(8, 5)
    cols = torch.randn(3, 8, generator=g)
    _manual_shard(
        shards / "shard-00003-model-00001-of-00001.safetensors",
        {"gap": (gap[:2], [0, 0]), "cols": (cols[:, :3], [0, 0])},
    )
    _manual_shard(
        shards / "shard-00004-model-00001-of-00001.safetensors",
        {"gap": (gap[6:], [6, 0]), "cols": (cols[:, 3:], [0, 3])},
    )
    out = tmp_path / "out"
    mapping = {**{k: 1 for k in full}, "gap": 2, "cols": 2}
    # rows 2..5 of "gap" are in no shard: refused (a missing shard), never written out as zeros
    with pytest.raises(CorruptCheckpointError, match=r"'gap'.*20 of its elements"):
        consolidate_safetensors_files(str(shards), str(out), mapping, num_threads=2)
    assert not (out / "model-00002-of-00002.safetensors").exists()
    _manual_shard(shards / "shard-00005-model-00001-of-00001.safetensors", {"gap": (gap[2:6], [2, 0])})
    consolidate_safetensors_files(str(shards), str(out), mapping, num_threads=2)
    got = {
        **load_file(str(out / "model-00001-of-00002.safetensors")),
        **load_file(str(out / "model-00002-of-00002.safetensors")),
    }
    for k, v in full.items():
        assert bitwise_equal(got[k], v), k
    assert torch.equal(got["gap"], gap)
    assert torch.equal(got["cols"], cols)
    index = json.loads((out / INDEX).read_text())
    assert index["weight_map"]["gap"] == "model-00002-of-00002.safetensors"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_consolidate_mapping_mismatch_is_clear(tmp_path: Path) -> None:
    _manual_shard(tmp_path / "s.safetensors", {"a": (torch.ones(2), [0]), "b": (torch.ones(2), [0])})
    with pytest.raises(PlanMismatchError, match="'b'"):
        consolidate_safetensors_files(str(tmp_path), str(tmp_path / "o"), {"a": 1})


def test_consolidate_without_a_mapping_writes_one_file(tmp_path: Path) -> None:
    # torch documents fqn_to_index_mapping=None as "everything in one output file"
    shards = tmp_path / "shards"
    shards.mkdir()
    w = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    _manual_shard(shards / "shard-00001-model-00001-of-00001.safetensors", {"w": (w[:2], [0, 0]), "b": (w[0], [0])})
    _manual_shard(shards / "shard-00002-model-00001-of-00001.safetensors", {"w": (w[2:], [2, 0])})
    out = tmp_path / "out"
    consolidate_safetensors_files(str(shards), str(out), None, num_threads=2)
    assert sorted(p.name for p in out.iterdir()) == ["model-00001-of-00001.safetensors", INDEX]
    got = load_file(str(out / "model-00001-of-00001.safetensors"))
    assert torch.equal(got["w"], w) and torch.equal(got["b"], w[0])
    assert set(json.loads((out / INDEX).read_text())["weight_map"]) == {"w", "b"}


# ------------------------------------------------------------------------------------------ gloo, 2 ranks
def _originals() -> dict[str, torch.Tensor]:
    g = _gen(10)
    return {
        "row": torch.randn(9, 6, generator=g),  # uneven Shard(0): 5 + 4 rows
        "col": torch.randn(4, 10, generator=g).to(torch.bfloat16),  # Shard(1)
        "ids": torch.randint(-100, 100, (6, 7), generator=g, dtype=torch.int64),  # Shard(1), uneven
        "mask": torch.rand(5, 3, generator=g) > 0.5,  # Shard(0) bool
        "tiny": torch.randn(1, 4, generator=g),  # Shard(0) of 1 row: rank 1's shard is empty
        "rep": torch.randn(3, generator=g),  # replicated
    }


_PLACEMENT = {"row": 0, "col": 1, "ids": 1, "mask": 0, "tiny": 0, "rep": None}


def _rank_main(rank: int, world: int, root: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from dcpio.formats.hf import consolidate_safetensors_files_on_every_rank

    mesh = init_device_mesh("cpu", (world,))
    orig = _originals()

    def sharded(placement: dict[str, int | None]) -> dict[str, Any]:
        return {
            k: distribute_tensor(v.clone(), mesh, [Shard(p) if p is not None else Replicate()])
            for k, v in orig.items()
            for p in [placement[k]]
        }

    mapping = {"row": 1, "col": 1, "ids": 2, "mask": 2, "tiny": 2, "rep": 1}
    writer = HuggingFaceStorageWriter(
        os.path.join(root, "consolidated"),
        fqn_to_index_mapping=mapping,
        save_distributed=True,
        enable_consolidation=True,
        thread_count_consolidation=2,
    )
    dcp.save(sharded(_PLACEMENT), storage_writer=writer)
    plain = os.path.join(root, "distributed")
    dcp.save(sharded(_PLACEMENT), storage_writer=HuggingFaceStorageWriter(plain, save_distributed=True))
    # resharding load: saved Shard(0)/Shard(1), loaded with the other placement
    swapped = {k: (None if p is None else 1 - p) for k, p in _PLACEMENT.items()}
    dest = sharded(swapped)
    for v in dest.values():
        v.to_local().zero_()
    dcp.load(dest, storage_reader=HuggingFaceStorageReader(plain, thread_count=2))
    for k, v in dest.items():
        full = v.full_tensor()
        assert torch.equal(full.view(torch.uint8), orig[k].view(torch.uint8)), k
    consolidate_safetensors_files_on_every_rank(plain, os.path.join(root, "every_rank"), mapping, num_threads=2)
    print(f"rank {rank} ok")


def test_two_gloo_ranks_save_distributed_and_consolidate(tmp_path: Path) -> None:
    outs = spawn_ranks(2, "test_hf:_rank_main", [str(tmp_path)], tmp_path)
    assert [o.strip().splitlines()[-1] for o in outs] == ["rank 0 ok", "rank 1 ok"]
    orig = _originals()
    shard_files = sorted(p.name for p in (tmp_path / "distributed").iterdir())
    assert shard_files == [
        "shard-00001-model-00001-of-00001.safetensors",
        "shard-00002-model-00001-of-00001.safetensors",
    ]
    assert sorted(p.name for p in (tmp_path / "consolidated" / "sharded").iterdir()) == [
        f"shard-0000{r}-model-0000{i}-of-00002.safetensors" for r in (1, 2) for i in (1, 2)
    ]
    for variant in ("consolidated", "every_rank"):
        folder = tmp_path / variant
        names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        got: dict[str, torch.Tensor] = {}
        for name in names:
            got.update(load_file(str(folder / name)))
        assert set(got) == set(orig)
        for k, v in orig.items():
            assert bitwise_equal(got[k], v), (variant, k)
        index = json.loads((folder / INDEX).read_text())
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in orig.values())
    # the sharded files of a save_distributed save load whole with dcpio's reader (several chunks per tensor)
    got = _load({k: torch.zeros_like(v) for k, v in orig.items()}, tmp_path / "distributed", thread_count=2)
    for k, v in orig.items():
        assert bitwise_equal(got[k], v), k
    # and torch's own reader loads the consolidated output
    torch.save(orig, tmp_path / "orig.pt")
    run_stock(
        f"""
        import torch, torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageReader
        want = torch.load({str(tmp_path / "orig.pt")!r}, weights_only=True)
        got = {{k: torch.zeros_like(v) for k, v in want.items()}}
        dcp.load(got, storage_reader=HuggingFaceStorageReader({str(tmp_path / "consolidated")!r}), no_dist=True)
        for k in want:
            assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k
        """
    )


def test_metadata_failure_reaches_the_caller_of_dcp_load_as_the_dcpio_error(tmp_path: Path) -> None:
    # torch 2.13 turns a read_metadata error into an AssertionError carrying its text; the HF reader defers it to
    # set_up_storage_reader, like FileSystemReader, so the caller gets the dcpio error object
    from torch.distributed.checkpoint.api import CheckpointException

    from dcpio.errors import IncompleteCheckpointError

    save_file({"w": torch.ones(4)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    index = {
        "metadata": {},
        "weight_map": {"w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"},
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointException) as info:
        dcp.load({"w": torch.zeros(4)}, storage_reader=HuggingFaceStorageReader(tmp_path), no_dist=True)
    err = info.value.failures[0]
    err = err[0] if isinstance(err, tuple) else err
    assert isinstance(err, IncompleteCheckpointError), repr(err)
    assert "model-00002-of-00002.safetensors" in str(err)
    with pytest.raises(IncompleteCheckpointError):  # a direct call raises at once
        HuggingFaceStorageReader(tmp_path).read_metadata()
