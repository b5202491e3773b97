"""An HF export that fails while writing data leaves the previous export in the folder intact."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException

import dcpio
from dcpio.movers.base import WriteHandle
from helpers import exception_chain


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


def _plant_lock(folder: Path, pid: int) -> None:
    doc = {"pid": pid, "host": socket.gethostname(), "save_id": "another-export", "started": time.time()}
    (folder / ".dcpio.lock").write_text(json.dumps(doc))


def test_export_into_a_folder_another_live_export_holds_is_refused(tmp_path: Path) -> None:
    """Two exports into one folder would unlink each other's staged files and mix their shards under one index;
    the second one fails at its start instead, naming the holder, and the previous export stays as it was."""
    old = _state(1)
    dcp.save(old, storage_writer=dcpio.HuggingFaceStorageWriter(tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _plant_lock(tmp_path, holder.pid)
        with pytest.raises(BaseException) as info:
            dcp.save(_state(2), storage_writer=dcpio.HuggingFaceStorageWriter(tmp_path))
        conflicts = [e for e in exception_chain(info.value) if isinstance(e, dcpio.SaveConflictError)]
        assert conflicts, [f"{type(e).__name__}: {e}" for e in exception_chain(info.value)]
        assert f"pid {holder.pid}" in str(conflicts[0]) and str(tmp_path) in str(conflicts[0])
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != ".dcpio.lock"} == before
        assert json.loads((tmp_path / ".dcpio.lock").read_text())["pid"] == holder.pid  # not taken from a live one
    finally:
        holder.kill()
        holder.wait()
    new = _state(3)
    dcp.save(new, storage_writer=dcpio.HuggingFaceStorageWriter(tmp_path))  # the holder is gone: taken over
    assert not (tmp_path / ".dcpio.lock").exists()
    for name, tensor in new.items():
        assert torch.equal(load_file(tmp_path / "model-00001-of-00001.safetensors")[name], tensor)


@pytest.mark.parametrize("fails_in", ["global_plan", "write"])
def test_failed_export_releases_its_lock(tmp_path: Path, fails_in: str) -> None:
    mapping = {"layer0.weight": 1, "layer1.weight": 1, "layer2.weight": 2, "layer3.weight": 2}
    if fails_in == "global_plan":  # a tensor the mapping does not place: refused by prepare_global_plan
        writer = dcpio.HuggingFaceStorageWriter(tmp_path, fqn_to_index_mapping={"layer0.weight": 1})
    else:
        writer = dcpio.HuggingFaceStorageWriter(tmp_path, fqn_to_index_mapping=mapping, _fs=_FailOnSecondFile())
    with pytest.raises(CheckpointException) as info:  # torch wraps the storage error
        dcp.save(_state(2), storage_writer=writer)
    assert ("no file index" if fails_in == "global_plan" else "No space left") in str(info.value)
    assert not (tmp_path / ".dcpio.lock").exists()
