"""The file names of a checkpoint, in one module (:mod:`dcpio.names`), held to what torch and dcpio really write."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

import dcpio
from dcpio import names
from helpers import run_stock


def test_names_match_the_files_a_dcpio_save_writes(tmp_path: Path) -> None:
    dcp.save({"w": torch.ones(4), "step": 3}, storage_writer=dcpio.FileSystemWriter(tmp_path, thread_count=2))
    files = sorted(os.listdir(tmp_path))
    data = [f for f in files if f.endswith(names.DATA_SUFFIX)]
    assert data and all(names.data_file_rank(f) == 0 for f in data), files
    assert all(names.is_dcp_member(f) and names.owned_by_dcp(f) and not names.owned_by_hf(f) for f in data)
    assert names.METADATA_NAME in files and names.is_metadata_name(names.METADATA_NAME)
    assert names.data_file_name(names.data_file_prefix(0), 0) in data


def test_names_match_the_files_stock_torch_writes(tmp_path: Path) -> None:
    run_stock(
        f"""
        import torch, torch.distributed.checkpoint as dcp
        dcp.save({{"w": torch.ones(4)}}, storage_writer=dcp.FileSystemWriter({str(tmp_path)!r}))
        """
    )
    data = [f for f in os.listdir(tmp_path) if f.endswith(names.DATA_SUFFIX)]
    assert data and all(names.rank_prefix(f) == 0 and names.is_dcp_member(f) for f in data), data


def test_name_patterns_refuse_look_alikes() -> None:
    assert names.data_file_rank("__3_0.distcp") == 3
    assert names.data_file_rank("__3_0.0123abcd.distcp") == 3
    assert names.data_file_name(names.data_file_prefix(3), 0, "0123abcd") == "__3_0.0123abcd.distcp"
    for other in ("__3_0.distcp.tmp", "x__3_0.distcp", "__3_0.XYZ.distcp", "__3.metadata", ".metadata"):
        assert names.data_file_rank(other) is None, other
    assert names.per_rank_metadata_rank(names.per_rank_metadata_name(12)) == 12
    assert names.per_rank_metadata_rank("__12.metadata.tmp") is None
    assert names.is_metadata_name(".metadata") and not names.is_metadata_name("x.metadata")
    assert names.owned_by_dcp("__1.metadata.tmp") and not names.owned_by_dcp("config.json")
    assert names.owned_by_hf(names.HF_INDEX_NAME) and names.owned_by_hf("a.safetensors.tmp")
    assert not names.owned_by_hf("config.json") and not names.owned_by_hf("tokenizer.json")
    assert names.lock_name(None) == names.LOCK_NAME and names.lock_name(3) == "__3.dcpio.lock"
    assert names.step_of(names.step_name(42)) == 42 and names.step_of("step-x") is None
    assert names.hf_file_name(2, 3) == "model-00002-of-00003.safetensors"
    shard = names.hf_file_name(2, 3, shard=4)
    assert shard == "shard-00004-model-00002-of-00003.safetensors" and names.hf_shard_rank(shard) == 4
    assert names.is_hf_export_file(shard) and names.is_hf_export_file(names.hf_file_name(1, 1) + ".tmp")
    assert not names.is_hf_export_file("model.safetensors") and names.hf_shard_rank("model.safetensors") is None
