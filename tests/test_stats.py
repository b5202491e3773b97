"""What a save or a load did is visible: an INFO line on the ``dcpio`` logger and ``stats`` on the writer/reader."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dcpio


def test_save_and_load_report_what_they_moved(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = {"w": torch.randn(256, 1024), "b": torch.randn(1024), "step": 7}
    writer = dcpio.FileSystemWriter(tmp_path, thread_count=2)
    with caplog.at_level(logging.INFO, logger="dcpio"):
        dcp.save(state, storage_writer=writer)
        out = {"w": torch.zeros(256, 1024), "b": torch.zeros(1024), "step": 0}
        reader = dcpio.FileSystemReader(tmp_path)
        dcp.load(out, storage_reader=reader)
    tensor_bytes = (256 * 1024 + 1024) * 4
    data_bytes = sum(p.stat().st_size for p in tmp_path.glob("*.distcp"))
    assert tensor_bytes < writer.stats.bytes_written <= data_bytes
    assert writer.stats.items == 3 and writer.stats.files == len(list(tmp_path.glob("*.distcp")))
    assert tensor_bytes <= reader.stats.bytes_read <= data_bytes
    assert reader.stats.bytes_hashed >= tensor_bytes  # verified by default
    assert reader.stats.items == 3 and reader.stats.requests >= 1 and reader.stats.seconds > 0
    lines = [r.getMessage() for r in caplog.records if r.name == "dcpio"]
    assert any(m.startswith("dcpio save to") and "MB" in m for m in lines), lines
    assert any(m.startswith("dcpio load of") and "checksummed" in m for m in lines), lines


def test_an_unverified_load_hashes_nothing(tmp_path: Path) -> None:
    dcp.save({"w": torch.randn(512, 512)}, storage_writer=dcpio.FileSystemWriter(tmp_path))
    reader = dcpio.FileSystemReader(tmp_path, verify_checksums=False)
    dcp.load({"w": torch.zeros(512, 512)}, storage_reader=reader)
    assert reader.stats.bytes_hashed == 0 and reader.stats.bytes_read >= 512 * 512 * 4


def test_the_library_logs_nothing_unless_asked() -> None:
    handlers = logging.getLogger("dcpio").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)


def test_writer_and_reader_with_stats_pickle(tmp_path: Path) -> None:
    # torch's PROCESS async checkpointer ships the writer to its background process by pickle
    import pickle

    writer = dcpio.FileSystemWriter(tmp_path / "ckpt")
    dcp.save({"w": torch.ones(4)}, storage_writer=writer, no_dist=True)
    reader = dcpio.FileSystemReader(tmp_path / "ckpt")
    dcp.load({"w": torch.zeros(4)}, storage_reader=reader, no_dist=True)
    for obj in (writer, reader):
        copy = pickle.loads(pickle.dumps(obj))
        assert copy.stats.bytes_written == obj.stats.bytes_written
        assert copy.stats.bytes_read == obj.stats.bytes_read
        copy.stats.add(read=1)  # the lock came back with it
