"""Partial reads of large records (what a resharding load does), with checksum verification on."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

import dcpio
from dcpio.tools.verify import verify_checkpoint
from helpers import exception_chain, run_stock


class _Into:
    """The two planner calls ``read_data`` makes for tensors, aimed at one destination."""

    def __init__(self, dest: torch.Tensor) -> None:
        self.dest = dest

    def resolve_tensor(self, req: ReadItem) -> torch.Tensor:
        return self.dest

    def commit_tensor(self, req: ReadItem, tensor: torch.Tensor) -> None:
        pass


def _read_box(
    path: Path,
    offsets: tuple[int, ...],
    lengths: tuple[int, ...],
    dtype: torch.dtype,
    *,
    name: str = "w",
    verify: bool = True,
) -> torch.Tensor:
    """Read box ``offsets``/``lengths`` of the stored chunk of ``name`` (saved whole) through dcpio's reader."""
    reader = dcpio.FileSystemReader(path, verify_checksums=verify)
    reader.set_up_storage_reader(reader.read_metadata(), True)
    dest = torch.zeros(lengths, dtype=dtype)
    zeros = torch.Size([0] * len(offsets))
    req = ReadItem(
        type=LoadItemType.TENSOR,
        dest_index=MetadataIndex(name),
        dest_offsets=zeros,
        storage_index=MetadataIndex(name, zeros),
        storage_offsets=torch.Size(offsets),
        lengths=torch.Size(lengths),
    )
    reader.read_data(LoadPlan([req]), _Into(dest)).wait()  # type: ignore[arg-type]
    _last_stats[:] = [reader.stats]
    return dest


_last_stats: list[Any] = []  # the IOStats of the last _read_box


def _touched(before: int) -> int:
    """Bytes taken from the checkpoint since ``before`` (an rchar reading): read calls plus bytes out of maps."""
    return _proc_rchar() - before + _last_stats[0].bytes_mapped


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


def _proc_rchar() -> int:
    with open("/proc/self/io", encoding="ascii") as stream:
        return next(int(line.split()[1]) for line in stream if line.startswith("rchar:"))


def _flip(tmp_path: Path, row: int, col: int) -> None:
    data_file = next(p for p in tmp_path.iterdir() if p.name.endswith(".distcp"))
    info = next(iter(dcpio.FileSystemReader(tmp_path).read_metadata().storage_data.values()))
    head = info.dcpio_checksum[5]
    raw = bytearray(data_file.read_bytes())
    raw[info.offset + head + (row * 1440 + col) * 4] ^= 0x01
    data_file.write_bytes(bytes(raw))
    assert os.path.getsize(data_file) == len(raw)


def _save_matrix(tmp_path: Path) -> torch.Tensor:
    full = torch.randn(5760, 1440, generator=torch.Generator().manual_seed(7))
    dcp.save({"w": full}, storage_writer=dcpio.FileSystemWriter(tmp_path, thread_count=1))
    return full


def test_column_half_reads_and_hashes_only_its_own_bytes(tmp_path: Path) -> None:
    full = _save_matrix(tmp_path)
    needed = 5760 * 720 * 4
    before = _proc_rchar()
    got = _read_box(tmp_path, (0, 720), (5760, 720), torch.float32)
    touched = _touched(before)
    assert torch.equal(got, full[:, 720:])
    assert needed <= touched <= 1.1 * needed, touched / needed


def test_without_tiles_a_verified_column_half_hashes_whole_rows(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("DCPIO_TILE_CHECKSUMS", "0")
    full = _save_matrix(tmp_path)
    before = _proc_rchar()
    got = _read_box(tmp_path, (0, 720), (5760, 720), torch.float32)
    touched = _touched(before)
    assert torch.equal(got, full[:, 720:])
    assert touched >= 1.9 * 5760 * 720 * 4  # row-major blocks hold both halves: all of them are hashed


def test_flip_in_the_requested_columns_is_caught_by_its_tile(tmp_path: Path) -> None:
    _save_matrix(tmp_path)
    _flip(tmp_path, 3000, 1000)  # inside columns [720, 1440)
    with pytest.raises(dcpio.CorruptCheckpointError, match=r"checksum mismatch in rows \[\d+, \d+\), bytes"):
        _read_box(tmp_path, (0, 720), (5760, 720), torch.float32)


def test_flip_outside_the_requested_columns_is_not_read_but_verify_finds_it(tmp_path: Path) -> None:
    full = _save_matrix(tmp_path)
    _flip(tmp_path, 3000, 10)  # outside columns [720, 1440): the column-half load never touches it
    assert torch.equal(_read_box(tmp_path, (0, 720), (5760, 720), torch.float32), full[:, 720:])
    with pytest.raises(dcpio.CorruptCheckpointError, match="checksum mismatch"):
        _read_box(tmp_path, (0, 0), (5760, 1440), torch.float32)
    report = verify_checkpoint(str(tmp_path))
    assert not report.ok


def test_without_tiles_a_flip_in_the_unneeded_half_of_a_block_is_caught(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("DCPIO_TILE_CHECKSUMS", "0")
    _save_matrix(tmp_path)
    _flip(tmp_path, 3000, 10)
    with pytest.raises(dcpio.CorruptCheckpointError, match=r"checksum mismatch in bytes \[\d+, \d+\)"):
        _read_box(tmp_path, (0, 720), (5760, 720), torch.float32)


@pytest.mark.parametrize("verify", [True, False])
def test_strided_boxes_with_and_without_verification(tmp_path: Path, verify: bool) -> None:
    full = torch.arange(64 * 96 * 5, dtype=torch.float32).view(64, 96, 5)
    dcp.save({"w": full}, storage_writer=dcpio.FileSystemWriter(tmp_path))
    for offsets, lengths in [((0, 48, 0), (64, 48, 5)), ((7, 13, 1), (50, 70, 3)), ((0, 0, 2), (64, 96, 1))]:
        dest = _read_box(tmp_path, offsets, lengths, torch.float32, verify=verify)
        want = full[tuple(slice(o, o + n) for o, n in zip(offsets, lengths))]
        assert torch.equal(dest, want), (offsets, lengths)


def _rewrite_tiles(tmp_path: Path, change: Any) -> None:
    meta = tmp_path / ".metadata"
    md = pickle.loads(meta.read_bytes())
    info = next(iter(md.storage_data.values()))
    info.dcpio_tiles = change(info.dcpio_tiles)
    meta.write_bytes(pickle.dumps(md))


def test_a_malformed_tile_record_is_named(tmp_path: Path) -> None:
    _save_matrix(tmp_path)
    _rewrite_tiles(tmp_path, lambda rec: (*rec[:6], rec[6][:-8]))  # one digest short
    with pytest.raises(dcpio.CorruptCheckpointError, match=r"tile checksum record in \.metadata is malformed"):
        _read_box(tmp_path, (0, 720), (5760, 720), torch.float32)


def test_tile_digests_that_disagree_with_the_data_fail_the_load_and_verify(tmp_path: Path) -> None:
    full = _save_matrix(tmp_path)
    _rewrite_tiles(tmp_path, lambda rec: (*rec[:6], bytes(len(rec[6]))))
    with pytest.raises(dcpio.CorruptCheckpointError, match="checksum mismatch in rows"):
        _read_box(tmp_path, (0, 720), (5760, 720), torch.float32)
    # a full load verifies blocks, not tiles, and is right; verify reports the damaged metadata
    assert torch.equal(_read_box(tmp_path, (0, 0), (5760, 1440), torch.float32), full)
    report = verify_checkpoint(str(tmp_path))
    assert not report.ok
    assert any("tile checksums in .metadata disagree" in p.message for p in report.problems), report.problems


def test_column_slices_of_a_stock_torch_checkpoint_with_unaligned_records(tmp_path: Path) -> None:
    """Stock torch writes records back to back, so tensor data sits at odd file offsets; the memory-mapped column
    reads then copy bytes instead of elements. Exact for several dtypes, with and without dtype conversion."""
    run_stock(
        f"""
        import torch
        import torch.distributed.checkpoint as dcp
        g = torch.Generator().manual_seed(5)
        sd = {{
            "a": torch.randn(301, 97, generator=g),
            "b": (torch.randn(64, 130, generator=g) * 100).to(torch.bfloat16),
            "c": torch.randint(-100, 100, (50, 33), generator=g, dtype=torch.int8),
            "d": torch.randn(40, 12, 7, generator=g).double(),
        }}
        dcp.save(sd, storage_writer=dcp.FileSystemWriter({str(tmp_path)!r}))
        torch.save(sd, {str(tmp_path / "orig.pt")!r})
        """
    )
    orig = torch.load(tmp_path / "orig.pt")
    md = dcpio.FileSystemReader(tmp_path).read_metadata()
    assert any(info.offset % 2 for info in md.storage_data.values())  # the unaligned layout this test is about
    boxes = {
        "a": ((3, 40), (290, 50)),
        "b": ((0, 65), (64, 65)),
        "c": ((10, 1), (40, 31)),
        "d": ((2, 3, 1), (30, 8, 5)),
    }
    for name, (offsets, lengths) in boxes.items():
        want = orig[name][tuple(slice(o, o + n) for o, n in zip(offsets, lengths))]
        for dtype in (orig[name].dtype, torch.float64):
            dest = _read_box(tmp_path, offsets, lengths, dtype, name=name)
            assert torch.equal(dest, want.to(dtype)), (name, dtype)


def test_every_damaged_tensor_of_a_load_is_reported(tmp_path: Path) -> None:
    """Workers keep going after a failure: a load over two damaged records (a large one and a small one, served by
    different tasks) raises for one and names the other in a note; undamaged tensors are still loaded."""
    gen = torch.Generator().manual_seed(11)
    sd = {
        "big": torch.randn(1024, 512, generator=gen),
        "ok": torch.randn(1024, 512, generator=gen),
        **{f"v{i}": torch.randn(64, generator=gen) for i in range(8)},
    }
    dcp.save(sd, storage_writer=dcpio.FileSystemWriter(tmp_path, thread_count=1))
    storage = dcpio.FileSystemReader(tmp_path).read_metadata().storage_data
    for fqn in ("big", "v5"):
        info = next(i for idx, i in storage.items() if idx.fqn == fqn)
        data_file = tmp_path / info.relative_path
        raw = bytearray(data_file.read_bytes())
        raw[info.offset + info.dcpio_checksum[5] + 100] ^= 0x10  # a data byte
        data_file.write_bytes(bytes(raw))
    out = {k: torch.zeros_like(v) for k, v in sd.items()}
    with pytest.raises(BaseException) as info_:
        dcp.load(out, storage_reader=dcpio.FileSystemReader(tmp_path, thread_count=2))
    corrupt = [e for e in exception_chain(info_.value) if isinstance(e, dcpio.CorruptCheckpointError)]
    assert corrupt, f"no CorruptCheckpointError in {info_.value!r}"
    text = str(corrupt[0]) + " ".join(getattr(corrupt[0], "__notes__", []))
    assert "'big'" in text and "'v5'" in text, text
    assert "also failed" in text
    assert torch.equal(out["ok"], sd["ok"]) and torch.equal(out["v4"], sd["v4"])


def test_read_scratch_buffers_do_not_outlive_the_load(tmp_path: Path) -> None:
    """Reads run on pool threads even with one thread, so per-thread scratch buffers (shared small-record reads,
    strided boxes) are freed with them instead of staying attached to the caller's thread."""
    import dcpio.tensor_bytes as tb

    gen = torch.Generator().manual_seed(12)
    sd = {f"v{i}": torch.randn(256, generator=gen) for i in range(6)}
    sd["m"] = torch.randn(64, 48, generator=gen).t()  # stored with its transposed strides: read through scratch
    dcp.save(sd, storage_writer=dcpio.FileSystemWriter(tmp_path, thread_count=1))
    before = dict(getattr(tb._scratch, "buffers", {}))
    out = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in sd.items()}
    dcp.load(out, storage_reader=dcpio.FileSystemReader(tmp_path, thread_count=1))
    assert all(torch.equal(out[k], sd[k]) for k in sd)
    assert dict(getattr(tb._scratch, "buffers", {})) == before


def test_an_unverified_load_locates_dcpio_records_by_their_head_alone(tmp_path: Path, monkeypatch: Any) -> None:
    # without verification a dcpio record is still located by its head (one small read), not by a walk of its zip
    # directory (end record, directory, local headers, data.pkl: several reads per record)
    from dcpio.movers import local

    state = {f"w{i}": torch.randn(512, 1024) for i in range(4)}  # 2 MiB each: above the small-record batching
    dcp.save(state, storage_writer=dcpio.FileSystemWriter(tmp_path))
    small_reads: list[int] = []
    real_read = local.LocalReadHandle.readinto_many

    def counted(self: Any, offset: int, buffers: Any) -> None:
        total = sum(len(b) for b in buffers)
        if self.path.endswith(".distcp") and total < 4096:  # not .metadata, not tensor data
            small_reads.append(total)
        real_read(self, offset, buffers)

    monkeypatch.setattr(local.LocalReadHandle, "readinto_many", counted)
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(out, storage_reader=dcpio.FileSystemReader(tmp_path, verify_checksums=False))
    assert all(torch.equal(out[k], v) for k, v in state.items())
    assert len(small_reads) == len(state), small_reads  # one head per record


def test_a_column_box_without_tiles_verifies_the_block_its_data_starts_in(tmp_path: Path, monkeypatch: Any) -> None:
    # block checksums only (tiles off): a column box is copied out of the memory map band by band, each band's blocks
    # hashed first. The record's data starts inside a block that also holds the record head; that block was never
    # hashed, so a flipped byte among the first elements loaded silently.
    monkeypatch.setenv("DCPIO_TILE_CHECKSUMS", "0")
    full = torch.randn(4096, 128, generator=torch.Generator().manual_seed(3))  # 2 MiB: read in place
    dcp.save({"w": full}, storage_writer=dcpio.FileSystemWriter(tmp_path, thread_count=1))
    info = next(iter(dcpio.FileSystemReader(tmp_path).read_metadata().storage_data.values()))
    assert not hasattr(info, "dcpio_tiles") and (info.offset + info.dcpio_checksum[5]) % info.dcpio_checksum[1]
    data_file = next(p for p in tmp_path.iterdir() if p.name.endswith(".distcp"))
    raw = bytearray(data_file.read_bytes())
    raw[info.offset + info.dcpio_checksum[5] + 4] ^= 0x01  # row 0, column 1
    data_file.write_bytes(bytes(raw))
    with pytest.raises(dcpio.CorruptCheckpointError, match="checksum mismatch"):
        _read_box(tmp_path, (0, 1), (4096, 8), torch.float32)
