"""Damaged checkpoints: flipped bytes in every kind of file, truncation, missing files, directories that are not
checkpoints. dcpio must raise a clear error (naming the file, the tensor and the byte range) and never hand back
wrong data; stock torch's reader, run alongside in a process that never imports dcpio, shows the contrast.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

import dcpio
from dcpio.formats.torch_save import parse_tensor_item
from helpers import assert_tree_equal, bitwise_equal, exception_chain, rand_tensor, run_stock, template_like

_RANGE = re.compile(r"bytes \[(\d+), (\d+)\)")


@pytest.fixture(autouse=True)
def _silence_dcp_logger() -> Iterator[None]:
    # torch's DCP logger prints every failed load with a traceback at ERROR; these tests fail hundreds on purpose
    logger = logging.getLogger("c10d-NullHandler-dcp_logger")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _save(sd: dict[str, Any], path: Path, **kw: Any) -> None:
    dcp.save(sd, storage_writer=dcpio.FileSystemWriter(path, **kw))


def _load(sd: Any, path: Path, **kw: Any) -> Any:
    dcp.load(sd, storage_reader=dcpio.FileSystemReader(path, **kw))
    return sd


def _load_error(sd: dict[str, Any], path: Path, **kw: Any) -> BaseException | None:
    """Load a fresh template of ``sd``; None if it loaded bit for bit, else the dcpio-level error.

    Raises:
        AssertionError: the load "succeeded" with data that differs from ``sd`` (silent corruption).
    """
    dest = template_like(sd)
    try:
        _load(dest, path, **kw)
    except BaseException as err:  # dcp.load wraps the storage layer's error in torch's CheckpointException
        chain = exception_chain(err)
        ours = [e for e in chain if isinstance(e, dcpio.CheckpointError | FileNotFoundError | PermissionError)]
        return ours[0] if ours else chain[-1]
    assert_tree_equal(sd, dest)
    return None


def _storage(path: Path) -> dict[str, Any]:
    md = dcpio.FileSystemReader(path).read_metadata()
    return {idx.fqn: info for idx, info in md.storage_data.items()}


def _flip(path: Path, pos: int, xor: int = 0xFF) -> None:
    with path.open("r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ xor]))


def _tensor_data_range(ckpt: Path, fqn: str) -> tuple[Path, int, int]:
    """(data file, first byte, end) of the raw bytes of tensor ``fqn`` (torch_save format, no transforms)."""
    info = _storage(ckpt)[fqn]
    file = ckpt / info.relative_path
    raw = file.read_bytes()[info.offset : info.offset + info.length]
    rec = parse_tensor_item(lambda o, n: raw[o : o + n], len(raw), fqn)
    start = info.offset + rec.data_offset
    return file, start, start + rec.data_length


def _small_sd(seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": rand_tensor((4, 4), torch.float32, gen), "step": 3}


# ------------------------------------------------------------------------------------------------------------------
# flipped bytes, torch_save format
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flip_in_tensor_data_names_file_tensor_and_byte_range(
    ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    monkeypatch.setenv("DCPIO_CHECKSUM_BLOCK", "65536")  # several blocks per tensor: the range must be the right one
    gen = torch.Generator().manual_seed(1)
    sd = {
        "encoder.layer.weight": rand_tensor((300, 300), torch.float32, gen),
        "other": rand_tensor((8,), torch.int64, gen),
    }
    _save(sd, ckpt_dir, thread_count=1)
    file, start, end = _tensor_data_range(ckpt_dir, "encoder.layer.weight")
    pos = {"first": start, "middle": (start + end) // 2, "last": end - 1}[where]
    _flip(file, pos)

    err = _load_error(sd, ckpt_dir)
    assert isinstance(err, dcpio.CorruptCheckpointError), repr(err)
    msg = str(err)
    assert file.name in msg and "encoder.layer.weight" in msg, msg
    m = _RANGE.search(msg)
    assert m, f"no byte range in: {msg}"
    lo, hi = int(m.group(1)), int(m.group(2))
    assert lo <= pos < hi and hi - lo <= 65536, f"flipped byte {pos} not in the reported range [{lo}, {hi})"


def test_every_single_bit_flip_in_a_data_file_is_caught(ckpt_dir: Path) -> None:
    """Every other byte of the file (bytes item, zip envelope, pickle, tensor data, central directory)."""
    sd = _small_sd()
    _save(sd, ckpt_dir, thread_count=1)
    (file,) = [p for p in ckpt_dir.iterdir() if p.suffix == ".distcp"]
    pristine = file.read_bytes()
    # records start on 64-byte boundaries; the zero bytes between them belong to no item and are never read
    items = sorted((i.offset, i.offset + i.length) for i in _storage(ckpt_dir).values())
    covered = {pos for lo, hi in items for pos in range(lo, hi)}
    gaps = [pos for pos in range(len(pristine)) if pos not in covered]
    assert all(pristine[pos] == 0 for pos in gaps) and len(gaps) < 64 * len(items), gaps
    assert all(lo % 64 == 0 for lo, _ in items), items
    silent: list[int] = []
    for pos in range(0, len(pristine), 2):
        if pos not in covered:
            continue
        _flip(file, pos, 0x01 if pos % 4 else 0x80)
        err = _load_error(sd, ckpt_dir)
        file.write_bytes(pristine)
        if err is None:
            silent.append(pos)  # loaded the right data although a stored byte changed: the flip went unnoticed
            continue
        assert isinstance(err, dcpio.CorruptCheckpointError), f"byte {pos}: {err!r}"
        assert file.name in str(err), f"byte {pos}: the error does not name the file: {err}"
    # every byte of every record in a dcpio data file is covered by a checksum
    assert not silent, f"flips at bytes {silent[:20]} went unnoticed"


def test_flip_in_bytes_item_names_the_value(ckpt_dir: Path) -> None:
    sd = _small_sd(2)
    _save(sd, ckpt_dir, thread_count=1)
    info = _storage(ckpt_dir)["step"]
    _flip(ckpt_dir / info.relative_path, info.offset + info.length // 2)
    err = _load_error(sd, ckpt_dir)
    assert isinstance(err, dcpio.CorruptCheckpointError), repr(err)
    assert "'step'" in str(err) and info.relative_path in str(err), str(err)
    assert _RANGE.search(str(err)), str(err)


def test_flip_in_zstd_item_is_caught_before_decompression(ckpt_dir: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    sd = {"emb": torch.arange(50_000, dtype=torch.float32), "noise": rand_tensor((64, 64), torch.bfloat16, gen)}
    _save(sd, ckpt_dir, thread_count=1, _extensions=[dcpio.ZStandard()])
    info = _storage(ckpt_dir)["emb"]
    assert info.transform_descriptors, "the item was not zstd-transformed"
    file = ckpt_dir / info.relative_path
    pristine = file.read_bytes()
    for pos in (info.offset, info.offset + 5, info.offset + info.length // 2, info.offset + info.length - 1):
        _flip(file, pos)
        err = _load_error(sd, ckpt_dir)
        file.write_bytes(pristine)
        assert isinstance(err, dcpio.CorruptCheckpointError), f"byte {pos}: {err!r}"
        assert file.name in str(err) and "'emb'" in str(err) and _RANGE.search(str(err)), str(err)


def test_verify_checksums_false_skips_the_check(ckpt_dir: Path) -> None:
    sd = {"w": torch.arange(1000, dtype=torch.int32)}
    _save(sd, ckpt_dir)
    file, start, _ = _tensor_data_range(ckpt_dir, "w")
    _flip(file, start + 40)  # element 10, lowest byte
    assert isinstance(_load_error(sd, ckpt_dir), dcpio.CorruptCheckpointError)
    out = _load({"w": torch.zeros(1000, dtype=torch.int32)}, ckpt_dir, verify_checksums=False)["w"]
    expected = sd["w"].clone()
    expected[10] ^= 0xFF
    assert torch.equal(out, expected), "verify_checksums=False should load the stored (flipped) bytes as they are"


def test_stock_torch_loads_a_flipped_data_file_silently(ckpt_dir: Path) -> None:
    """The contrast row: the same flipped file, torch's own reader, a process without dcpio."""
    sd = {"w": torch.arange(1000, dtype=torch.int32)}
    _save(sd, ckpt_dir)
    file, start, _ = _tensor_data_range(ckpt_dir, "w")
    _flip(file, start + 40)
    assert isinstance(_load_error(sd, ckpt_dir), dcpio.CorruptCheckpointError)
    out = run_stock(
        f"""
        import torch, torch.distributed.checkpoint as dcp
        dest = {{"w": torch.zeros(1000, dtype=torch.int32)}}
        dcp.load(dest, storage_reader=dcp.FileSystemReader({str(ckpt_dir)!r}))
        print("ELEMENT10", int(dest["w"][10]))
        """
    )
    assert "ELEMENT10 245" in out, out  # 10 ^ 0xFF: torch returned the corrupted value without a word


# ------------------------------------------------------------------------------------------------------------------
# flipped bytes, SAFETENSORS format and .metadata
# ------------------------------------------------------------------------------------------------------------------


def test_every_byte_flip_in_a_safetensors_format_file_is_caught_or_harmless(ckpt_dir: Path) -> None:
    sd = _small_sd(4)
    _save(sd, ckpt_dir, thread_count=1, serialization_format=dcpio.SerializationFormat.SAFETENSORS)
    (file,) = [p for p in ckpt_dir.iterdir() if p.suffix == ".distcp"]
    info = _storage(ckpt_dir)["w"]
    pristine = file.read_bytes()
    caught_in_data = 0
    for xor in (0x01,):
        for pos in range(len(pristine)):
            _flip(file, pos, xor)
            err = _load_error(sd, ckpt_dir)  # asserts bit-exact data when it loads
            file.write_bytes(pristine)
            if err is not None:
                assert isinstance(err, dcpio.CorruptCheckpointError), f"byte {pos} ^ {xor:#x}: {err!r}"
                assert file.name in str(err), str(err)
                if pos >= len(pristine) - info.length:
                    caught_in_data += 1
    assert caught_in_data == info.length, "a flip inside the tensor's bytes went unnoticed"


def test_safetensors_blob_header_dtype_swap_is_caught(ckpt_dir: Path) -> None:
    sd = {"w": torch.linspace(-1, 1, 16).reshape(4, 4)}
    _save(sd, ckpt_dir, thread_count=1, serialization_format=dcpio.SerializationFormat.SAFETENSORS)
    (file,) = [p for p in ckpt_dir.iterdir() if p.suffix == ".distcp"]
    raw = file.read_bytes()
    assert raw.count(b'"F32"') == 1
    file.write_bytes(raw.replace(b'"F32"', b'"I32"'))  # one byte: 'F' -> 'I'
    err = _load_error(sd, ckpt_dir)  # AssertionError (silently wrong values) is the bug
    assert isinstance(err, dcpio.CorruptCheckpointError), repr(err)


def _metadata_flip_outcomes(ckpt: Path, sd: dict[str, Any]) -> list[tuple[int, int, BaseException | None]]:
    meta = ckpt / ".metadata"
    pristine = meta.read_bytes()
    outcomes = []
    for xor in (0x01,):
        for pos in range(len(pristine)):
            _flip(meta, pos, xor)
            try:
                reader = dcpio.FileSystemReader(ckpt)
                reader.set_up_storage_reader(reader.read_metadata(), True)
                err = _load_error(sd, ckpt)  # raises AssertionError on silently wrong data
            except Exception as exc:  # read_metadata / set_up_storage_reader called directly: dcpio's own error
                err = exc
            finally:
                meta.write_bytes(pristine)
            outcomes.append((pos, xor, err))
    return outcomes


@pytest.fixture(scope="module")
def metadata_outcomes(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[int, int, BaseException | None]]:
    ckpt = tmp_path_factory.mktemp("mdflip") / "ckpt"
    sd = _small_sd(5)
    _save(sd, ckpt, thread_count=1)
    return _metadata_flip_outcomes(ckpt, sd)


def test_no_metadata_flip_loads_wrong_data(metadata_outcomes: list[tuple[int, int, BaseException | None]]) -> None:
    # _load_error asserts bit-exact data whenever a load succeeds; here only the count of outcomes is checked
    assert len(metadata_outcomes) > 500
    assert sum(1 for *_, e in metadata_outcomes if isinstance(e, dcpio.CheckpointError)) > 500


_PLANNER_ERRORS = ("Missing key in checkpoint", "Size mismatch between saved")


def test_every_metadata_flip_gives_a_clear_error(
    metadata_outcomes: list[tuple[int, int, BaseException | None]],
) -> None:
    unclear = [
        (pos, xor, f"{type(e).__name__}: {e}"[:160])
        for pos, xor, e in metadata_outcomes
        if e is not None
        and not isinstance(e, dcpio.CheckpointError | FileNotFoundError)
        and not any(s in str(e) for s in _PLANNER_ERRORS)  # torch's planner naming the key: clear enough
    ]
    assert not unclear, f"{len(unclear)} flips gave unclear errors, e.g. {unclear[:5]}"


# ------------------------------------------------------------------------------------------------------------------
# truncated, missing, not a checkpoint, permissions
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 100, "half", "minus1"])
def test_truncated_data_file_is_corrupt_and_named(ckpt_dir: Path, keep: int | str) -> None:
    gen = torch.Generator().manual_seed(6)
    sd = {"big": rand_tensor((128, 128), torch.float32, gen), "small": rand_tensor((3,), torch.int8, gen)}
    _save(sd, ckpt_dir, thread_count=1)
    (file,) = [p for p in ckpt_dir.iterdir() if p.suffix == ".distcp"]
    raw = file.read_bytes()
    n = keep if isinstance(keep, int) else {"half": len(raw) // 2, "minus1": len(raw) - 1}[keep]
    file.write_bytes(raw[:n])
    err = _load_error(sd, ckpt_dir)
    assert isinstance(err, dcpio.CorruptCheckpointError), repr(err)
    assert file.name in str(err), str(err)


def test_missing_data_file_is_file_not_found_naming_it(ckpt_dir: Path) -> None:
    sd = _small_sd(7)
    _save(sd, ckpt_dir, single_file_per_rank=False)
    victim = _storage(ckpt_dir)["w"].relative_path
    (ckpt_dir / victim).unlink()
    err = _load_error(sd, ckpt_dir)
    assert isinstance(err, FileNotFoundError), repr(err)
    assert victim in str(err), str(err)


def test_missing_metadata_is_incomplete(ckpt_dir: Path) -> None:
    _save(_small_sd(8), ckpt_dir)
    (ckpt_dir / ".metadata").unlink()
    with pytest.raises(dcpio.IncompleteCheckpointError, match="never committed"):
        dcpio.FileSystemReader(ckpt_dir).read_metadata()


@pytest.mark.parametrize("kind", ["empty", "other_files", "hf_like"])
def test_directory_that_is_not_a_checkpoint_is_incomplete(tmp_path: Path, kind: str) -> None:
    d = tmp_path / "notckpt"
    d.mkdir()
    if kind == "other_files":
        (d / "notes.txt").write_text("hello")
        (d / "sub").mkdir()
    elif kind == "hf_like":
        (d / "model.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{}      ")
    with pytest.raises(dcpio.IncompleteCheckpointError) as info:
        dcpio.FileSystemReader(d).read_metadata()
    assert str(d) in str(info.value)


def test_a_file_instead_of_a_directory_is_a_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, f)
    with pytest.raises((dcpio.IncompleteCheckpointError, NotADirectoryError)) as info:
        dcpio.FileSystemReader(f).read_metadata()
    assert str(f) in str(info.value)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file modes")
def test_permission_denied_is_permission_error_naming_the_file(ckpt_dir: Path) -> None:
    sd = _small_sd(9)
    _save(sd, ckpt_dir)
    data = next(p for p in ckpt_dir.iterdir() if p.suffix == ".distcp")
    data.chmod(0)
    try:
        err = _load_error(sd, ckpt_dir)
        assert isinstance(err, PermissionError) and data.name in str(err), repr(err)
        (ckpt_dir / ".metadata").chmod(0)
        with pytest.raises(PermissionError, match=r"\.metadata"):
            dcpio.FileSystemReader(ckpt_dir).read_metadata()
    finally:
        data.chmod(0o644)
        (ckpt_dir / ".metadata").chmod(0o644)


# ------------------------------------------------------------------------------------------------------------------
# checkpoints written by stock torch: no checksums, structural checks only
# ------------------------------------------------------------------------------------------------------------------


def _stock_save(path: Path) -> None:
    run_stock(
        f"""
        import torch, torch.distributed.checkpoint as dcp
        g = torch.Generator().manual_seed(10)
        sd = {{"w": torch.randn(64, 64, generator=g), "b": torch.arange(7, dtype=torch.int64), "step": 5}}
        dcp.save(sd, storage_writer=dcp.FileSystemWriter({str(path)!r}))
        """
    )


def _stock_sd() -> dict[str, Any]:
    g = torch.Generator().manual_seed(10)
    return {"w": torch.randn(64, 64, generator=g), "b": torch.arange(7, dtype=torch.int64), "step": 5}


@pytest.fixture(scope="module")
def stock_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stock") / "ckpt"
    _stock_save(path)
    return path


def test_stock_written_checkpoint_loads_without_checksums(stock_ckpt: Path) -> None:
    assert all(not hasattr(info, "dcpio_checksum") for info in _storage(stock_ckpt).values())
    sd = _stock_sd()
    dest = template_like(sd)
    _load(dest, stock_ckpt)
    assert_tree_equal(sd, dest)


@pytest.mark.parametrize("cut", ["half", "minus1", "tensor_end"])
def test_truncated_stock_written_file_is_a_structural_error(stock_ckpt: Path, tmp_path: Path, cut: str) -> None:
    ckpt = tmp_path / "copy"
    shutil.copytree(stock_ckpt, ckpt)
    info = _storage(ckpt)["w"]
    file = ckpt / info.relative_path
    raw = file.read_bytes()
    n = {"half": len(raw) // 2, "minus1": len(raw) - 1, "tensor_end": info.offset + info.length - 1}[cut]
    file.write_bytes(raw[:n])
    err = _load_error(_stock_sd(), ckpt)
    assert isinstance(err, dcpio.CorruptCheckpointError), repr(err)
    assert file.name in str(err), str(err)


def test_damaged_stock_written_envelope_is_caught_or_harmless(stock_ckpt: Path, tmp_path: Path) -> None:
    """No checksums: flips in torch's zip records must still never load wrong data (data bytes aside)."""
    ckpt = tmp_path / "copy"
    shutil.copytree(stock_ckpt, ckpt)
    info = _storage(ckpt)["w"]
    file = ckpt / info.relative_path
    pristine = file.read_bytes()
    item = pristine[info.offset : info.offset + info.length]
    rec = parse_tensor_item(lambda o, n: item[o : o + n], len(item), "w")
    data = range(info.offset + rec.data_offset, info.offset + rec.data_offset + rec.data_length)
    sd = _stock_sd()
    caught = 0
    for pos in range(info.offset, info.offset + info.length):
        if pos in data:
            continue  # unverifiable without a checksum: documented, not tested
        _flip(file, pos, 0x01)
        err = _load_error(sd, ckpt)  # asserts bit-exact data when it loads
        file.write_bytes(pristine)
        if err is not None:
            assert isinstance(err, dcpio.CheckpointError), f"byte {pos}: {err!r}"
            caught += 1
    assert caught, "no envelope flip was noticed at all"


class _SliceLoader:
    """The two planner calls ``read_data`` makes for tensors: a resharding load reading part of one item."""

    def __init__(self, n: int) -> None:
        self.out = torch.zeros(n)

    def resolve_tensor(self, req: ReadItem) -> torch.Tensor:
        return self.out

    def commit_tensor(self, req: ReadItem, tensor: torch.Tensor) -> None:
        pass


def test_flip_in_envelope_is_caught_by_a_partial_read(ckpt_dir: Path) -> None:
    full = torch.arange(1 << 20, dtype=torch.float32)  # 4 MiB: several checksum blocks
    _save({"w": full}, ckpt_dir, thread_count=1)
    info = _storage(ckpt_dir)["w"]
    file = ckpt_dir / info.relative_path
    raw = file.read_bytes()
    item = raw[info.offset : info.offset + info.length]
    rec = parse_tensor_item(lambda o, n: item[o : o + n], len(item), "w")
    local = item.rfind(b"/data/0", 0, rec.data_offset) - len("archive") - 30  # the data record's local header
    assert item[local : local + 4] == b"PK\x03\x04"
    _flip(file, info.offset + local + 28, 0x40)  # extra-field length +-64 bytes

    reader = dcpio.FileSystemReader(ckpt_dir)
    md = reader.read_metadata()
    reader.set_up_storage_reader(md, True)
    (index,) = md.storage_data
    req = ReadItem(
        type=LoadItemType.TENSOR,
        dest_index=index,
        dest_offsets=torch.Size([0]),
        storage_index=index,
        storage_offsets=torch.Size([600_000]),
        lengths=torch.Size([1000]),
    )
    loader = _SliceLoader(1000)
    try:
        reader.read_data(LoadPlan([req]), loader).wait()  # type: ignore[arg-type]
    except dcpio.CorruptCheckpointError:
        return
    assert torch.equal(loader.out, full[600_000:601_000]), "a partial read returned shifted data silently"


def test_flip_in_stock_tensor_data_is_undetectable_without_checksums(stock_ckpt: Path, tmp_path: Path) -> None:
    """Documents the limit: torch writes no checksum dcpio could check, so data flips load as stored."""
    ckpt = tmp_path / "copy"
    shutil.copytree(stock_ckpt, ckpt)
    file, start, _ = _tensor_data_range(ckpt, "b")
    _flip(file, start)
    dest = template_like(_stock_sd())
    _load(dest, ckpt)
    assert int(dest["b"][0]) == 0xFF and bitwise_equal(dest["w"], _stock_sd()["w"])
