"""Checkpoints that try to run code or reach outside their directory.

Every payload here is harmless: it creates a marker file. dcpio must refuse each one with
:class:`dcpio.UnsafeCheckpointError` naming the class or the path, and the marker must not exist afterwards (proof
that nothing ran). The same files given to torch's own reader, in a process that never imports dcpio, run the payload
or read outside the directory: that is the contrast documented in the README ("What happens when").
"""

from __future__ import annotations

import builtins
import io
import logging
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import _StorageInfo

import dcpio
from helpers import SmallObject, assert_tree_equal, exception_chain, run_stock, template_like


@pytest.fixture(autouse=True)
def _silence_dcp_logger() -> Iterator[None]:
    logger = logging.getLogger("c10d-NullHandler-dcp_logger")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


class _Payload:
    """Pickles as ``exec(<code that creates marker>)``: what a crafted checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


class _SystemPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _dcpio_error(exc: BaseException, cls: type[BaseException]) -> BaseException:
    found = [e for e in exception_chain(exc) if isinstance(e, cls)]
    assert found, f"no {cls.__name__} in {[f'{type(e).__name__}: {e}'[:200] for e in exception_chain(exc)]}"
    return found[0]


def _save(sd: dict[str, Any], path: Path, **kw: Any) -> None:
    dcp.save(sd, storage_writer=dcpio.FileSystemWriter(path, **kw))


def _good(path: Path) -> dict[str, Any]:
    sd = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "step": 4}
    _save(sd, path, thread_count=1)
    return sd


def _metadata(path: Path) -> Any:
    return dcpio.FileSystemReader(path).read_metadata()


def _write_metadata(path: Path, md: Any) -> None:
    md.storage_meta = None  # drop the reader's load_id bookkeeping; torch writes None too when unset
    (path / ".metadata").write_bytes(pickle.dumps(md))


# ------------------------------------------------------------------------------------------------------------------
# crafted .metadata
# ------------------------------------------------------------------------------------------------------------------


def test_top_level_os_system_payload_is_refused(ckpt_dir: Path, tmp_path: Path) -> None:
    sd = _good(ckpt_dir)
    marker = tmp_path / "pwned_system"
    (ckpt_dir / ".metadata").write_bytes(pickle.dumps(_SystemPayload(marker)))
    with pytest.raises(dcpio.UnsafeCheckpointError) as info:
        dcpio.FileSystemReader(ckpt_dir).read_metadata()
    assert "system" in str(info.value) and ".metadata" in str(info.value), str(info.value)
    with pytest.raises(BaseException) as load_info:  # and through dcp.load
        dcp.load(template_like(sd), storage_reader=dcpio.FileSystemReader(ckpt_dir))
    assert "system" in str(load_info.value)
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("where", ["relative_path", "chunk_size", "storage_meta"])
def test_payload_hidden_inside_valid_metadata_is_refused_before_it_runs(
    ckpt_dir: Path, tmp_path: Path, where: str
) -> None:
    sd = _good(ckpt_dir)
    md = _metadata(ckpt_dir)
    marker = tmp_path / f"pwned_{where}"
    if where == "relative_path":
        info = next(v for k, v in md.storage_data.items() if k.fqn == "w")
        info.relative_path = _Payload(marker)
    elif where == "chunk_size":
        md.state_dict_metadata["w"].chunks[0].sizes = _Payload(marker)
    _write_metadata(ckpt_dir, md)
    if where == "storage_meta":
        from torch.distributed.checkpoint.metadata import StorageMeta

        md.storage_meta = StorageMeta(checkpoint_id=_Payload(marker))  # type: ignore[arg-type]
        (ckpt_dir / ".metadata").write_bytes(pickle.dumps(md))

    with pytest.raises(dcpio.UnsafeCheckpointError) as info:
        dcpio.FileSystemReader(ckpt_dir).read_metadata()
    assert "builtins.exec" in str(info.value), str(info.value)
    with pytest.raises(BaseException) as load_info:
        dcp.load(template_like(sd), storage_reader=dcpio.FileSystemReader(ckpt_dir))
    assert "builtins.exec" in str(load_info.value)
    assert not marker.exists(), "the hidden payload ran"


def test_stock_torch_runs_the_hidden_metadata_payload(ckpt_dir: Path, tmp_path: Path) -> None:
    """The contrast row: torch's reader unpickles .metadata unrestricted, so the payload runs."""
    _good(ckpt_dir)
    md = _metadata(ckpt_dir)
    marker = tmp_path / "pwned_by_torch"
    next(iter(md.storage_data.values())).relative_path = _Payload(marker)
    _write_metadata(ckpt_dir, md)
    run_stock(
        f"""
        import torch.distributed.checkpoint as dcp
        try:
            dcp.FileSystemReader({str(ckpt_dir)!r}).read_metadata()
        except Exception:
            pass  # the load may fail afterwards; the payload already ran
        """
    )
    assert marker.exists(), "torch's reader did not run the payload (the contrast row would be wrong)"


# ------------------------------------------------------------------------------------------------------------------
# crafted data-file records and bytes items
# ------------------------------------------------------------------------------------------------------------------


def _replace_item(ckpt: Path, fqn: str, payload: bytes) -> None:
    """Point item ``fqn`` at a new data file holding ``payload`` (no checksum, as torch would write it)."""
    md = _metadata(ckpt)
    for index in list(md.storage_data):
        if index.fqn == fqn:
            (ckpt / "__0_7.distcp").write_bytes(payload)
            md.storage_data[index] = _StorageInfo("__0_7.distcp", 0, len(payload))
    _write_metadata(ckpt, md)


def test_tensor_record_naming_a_non_tensor_global_is_refused(ckpt_dir: Path, tmp_path: Path) -> None:
    sd = _good(ckpt_dir)
    marker = tmp_path / "pwned_record"
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)  # a torch.save archive whose data.pkl calls builtins.exec
    _replace_item(ckpt_dir, "w", buf.getvalue())
    with pytest.raises(BaseException) as info:
        dcp.load(template_like(sd), storage_reader=dcpio.FileSystemReader(ckpt_dir))
    err = _dcpio_error(info.value, dcpio.UnsafeCheckpointError)
    assert ".exec'" in str(err) and "__0_7.distcp" in str(err) and "'w'" in str(err), str(err)
    assert not marker.exists(), "the record's payload ran"


def test_bytes_item_with_payload_is_refused_by_default(ckpt_dir: Path, tmp_path: Path) -> None:
    sd = _good(ckpt_dir)
    marker = tmp_path / "pwned_bytes"
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    _replace_item(ckpt_dir, "step", buf.getvalue())
    with pytest.raises(BaseException) as info:
        dcp.load(template_like(sd), storage_reader=dcpio.FileSystemReader(ckpt_dir))
    err = _dcpio_error(info.value, dcpio.UnsafeCheckpointError)
    assert "'step'" in str(err), str(err)
    assert not marker.exists(), "the bytes item's payload ran"

    # torch's planner calls torch.load(weights_only=False) on bytes items: stock torch runs it
    run_stock(
        f"""
        import torch, torch.distributed.checkpoint as dcp
        dest = {{"w": torch.zeros(3, 4), "step": None}}
        dcp.load(dest, storage_reader=dcp.FileSystemReader({str(ckpt_dir)!r}))
        """
    )
    assert marker.exists(), "torch's reader did not run the bytes item's payload"


def test_custom_class_value_needs_allow_pickle(ckpt_dir: Path) -> None:
    sd = {"w": torch.ones(3), "obj": SmallObject("adam", [1, 2, 3])}
    _save(sd, ckpt_dir)
    with pytest.raises(BaseException) as info:
        dcp.load({"w": torch.zeros(3), "obj": None}, storage_reader=dcpio.FileSystemReader(ckpt_dir))
    err = _dcpio_error(info.value, dcpio.UnsafeCheckpointError)
    assert "'obj'" in str(err) and "allow_pickle" in str(err), str(err)

    dest: dict[str, Any] = {"w": torch.zeros(3), "obj": None}
    dcp.load(dest, storage_reader=dcpio.FileSystemReader(ckpt_dir, allow_pickle=True))
    assert_tree_equal(sd, dest)


# ------------------------------------------------------------------------------------------------------------------
# paths that leave the checkpoint directory
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "dotdot_inside"])
def test_paths_outside_the_checkpoint_are_refused(tmp_path: Path, kind: str) -> None:
    ckpt = tmp_path / "ckpt"
    sd = _good(ckpt)
    md = _metadata(ckpt)
    info = next(v for k, v in md.storage_data.items() if k.fqn == "w")
    outside = tmp_path / "outside.distcp"
    shutil.copy(ckpt / info.relative_path, outside)  # a valid file the crafted path would read
    name = {
        "dotdot": "../outside.distcp",
        "absolute": str(outside),
        "symlink": "__0_9.distcp",
        "dotdot_inside": "sub/../../outside.distcp",
    }[kind]
    if kind == "symlink":
        os.symlink(outside, ckpt / name)
    info.relative_path = name
    delattr(info, "dcpio_checksum")  # the outside file's bytes would even pass: refuse on the name alone
    _write_metadata(ckpt, md)

    reader = dcpio.FileSystemReader(ckpt)
    with pytest.raises(dcpio.UnsafeCheckpointError) as err:
        reader.set_up_storage_reader(reader.read_metadata(), True)
    assert name in str(err.value), str(err.value)
    with pytest.raises(BaseException) as load_info:
        dcp.load(template_like(sd), storage_reader=dcpio.FileSystemReader(ckpt))
    _dcpio_error(load_info.value, dcpio.UnsafeCheckpointError)


@pytest.mark.parametrize("name", ["../outside.distcp", "/etc/hostname", "sub/../../outside.distcp", ""])
def test_metadata_handed_in_by_the_caller_is_checked_entry_by_entry(tmp_path: Path, name: str) -> None:
    """A reader skips re-checking the entries of the metadata it parsed itself; one it did not parse (another
    reader's, a caller's edited copy) gets every entry checked before the engine trusts it."""
    ckpt = tmp_path / "ckpt"
    _good(ckpt)
    md = _metadata(ckpt)  # parsed by another reader instance
    info = next(v for k, v in md.storage_data.items() if k.fqn == "w")
    info.relative_path = name
    reader = dcpio.FileSystemReader(ckpt)
    with pytest.raises((dcpio.UnsafeCheckpointError, dcpio.CorruptCheckpointError)) as err:
        reader.set_up_storage_reader(md, True)
    assert "'w'" in str(err.value), str(err.value)


def test_metadata_parsed_by_the_reader_still_confines_each_file(tmp_path: Path) -> None:
    """The reader's own parse checked the names; a data file swapped for a link afterwards is still refused."""
    ckpt = tmp_path / "ckpt"
    _good(ckpt)
    reader = dcpio.FileSystemReader(ckpt)
    md = reader.read_metadata()
    info = next(v for k, v in md.storage_data.items() if k.fqn == "w")
    outside = tmp_path / "outside.distcp"
    shutil.move(ckpt / info.relative_path, outside)
    os.symlink(outside, ckpt / info.relative_path)
    with pytest.raises(dcpio.UnsafeCheckpointError) as err:
        reader.set_up_storage_reader(md, True)
    assert info.relative_path in str(err.value) and "outside the checkpoint" in str(err.value), str(err.value)


def test_stock_torch_reads_outside_the_checkpoint(tmp_path: Path) -> None:
    """The contrast row: torch joins relative_path to the directory and reads whatever it names."""
    ckpt = tmp_path / "ckpt"
    _good(ckpt)
    md = _metadata(ckpt)
    info = next(v for k, v in md.storage_data.items() if k.fqn == "w")
    outside = tmp_path / "outside.distcp"
    shutil.copy(ckpt / info.relative_path, outside)
    info.relative_path = "../outside.distcp"
    _write_metadata(ckpt, md)
    out = run_stock(
        f"""
        import torch, torch.distributed.checkpoint as dcp
        dest = {{"w": torch.zeros(3, 4), "step": None}}
        dcp.load(dest, storage_reader=dcp.FileSystemReader({str(ckpt)!r}))
        print("LOADED_FROM_OUTSIDE", float(dest["w"].sum()))
        """
    )
    assert "LOADED_FROM_OUTSIDE 66.0" in out, out
