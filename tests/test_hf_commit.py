"""An HF export that fails while writing data leaves the previous export in the folder intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException

import dcpio
from dcpio.movers.base import WriteHandle


class _FailOnSecondFile(dcpio.FileSystem):
    """Real local mover whose second data file fails mid-write, as a full disk or a crash would."""

    def __init__(self) -> None:
        self.opened = 0

    def open_writer(self, path: str | Path) -> WriteHandle:  # type: ignore[override]
        if str(path).endswith(".safetensors.tmp"):
            self.opened += 1
            if self.opened == 2:
                raise OSError(28, "No space left on device", str(path))
        return super().open_writer(path)


def _state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(64, 32, generator=gen) for i in range(4)}


def test_failed_export_keeps_previous_export(tmp_path: Path) -> None:
    mapping = {"layer0.weight": 1, "layer1.weight": 1, "layer2.weight": 2, "layer3.weight": 2}
    old = _state(1)
    dcp.save(old, storage_writer=dcpio.HuggingFaceStorageWriter(tmp_path, fqn_to_index_mapping=mapping))
    index_before = (tmp_path / "model.safetensors.index.json").read_bytes()
    files_before = {p.name: p.read_bytes() for p in tmp_path.glob("*.safetensors")}

    with pytest.raises(CheckpointException) as info:  # torch wraps the storage error
        dcp.save(
            _state(2),
            storage_writer=dcpio.HuggingFaceStorageWriter(
                tmp_path, fqn_to_index_mapping=mapping, thread_count=1, _fs=_FailOnSecondFile()
            ),
        )

    assert "No space left" in str(info.value)
    assert (tmp_path / "model.safetensors.index.json").read_bytes() == index_before
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.safetensors")} == files_before
    weight_map = json.loads(index_before)["weight_map"]
    for name, tensor in old.items():
        assert torch.equal(load_file(tmp_path / weight_map[name])[name], tensor)
