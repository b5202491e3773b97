"""The ``dcpio`` commands on Hugging Face folders read them exactly as ``HuggingFaceStorageReader`` does: the index is
the truth, sharded (``save_distributed``) folders are assembled, checksums are verified, files outside the folder are
refused; and HF exports carry per-tensor checksums that safetensors and transformers ignore."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from dcpio.cli.main import EXIT_OK, EXIT_PROBLEM, main
from dcpio.errors import (
    CheckpointError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    StorageFullError,
    UnsafeCheckpointError,
)
from dcpio.formats.hf import HuggingFaceStorageReader, HuggingFaceStorageWriter, consolidate_safetensors_files
from dcpio.formats.safetensors import write_file
from dcpio.movers import FileSystem
from dcpio.tools import convert, diff_checkpoints, inspect_checkpoint, verify_checkpoint
from helpers import bitwise_equal, exception_chain, run_stock

INDEX = "model.safetensors.index.json"
SRC_DIR = str(Path(__file__).resolve().parent.parent / "src")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _manual_shard(path: Path, tensors: dict[str, tuple[torch.Tensor, list[int]]]) -> None:
    """A shard file as a ``save_distributed`` save writes it (``DCP_SHARDING_INFO`` with each chunk's offsets)."""
    info = {k: {"saved_offsets": offs} for k, (_, offs) in tensors.items()}
    write_file(
        FileSystem(),
        str(path),
        {k: t for k, (t, _) in tensors.items()},
        {"DCP_SHARDING_INFO": json.dumps(info), "DCP_VERSION": "1.0", "format": "pt"},
    )


def _sharded_folder(root: Path) -> dict[str, torch.Tensor]:
    """Two ranks' shard files of a Shard(0) and a Shard(1) tensor: the layout of ``save_distributed=True``."""
    g = _gen(1)
    full = {"rows": torch.randn(6, 4, generator=g), "cols": torch.randn(3, 8, generator=g).to(torch.bfloat16)}
    root.mkdir(parents=True, exist_ok=True)
    _manual_shard(
        root / "shard-00001-model-00001-of-00001.safetensors",
        {"rows": (full["rows"][:3], [0, 0]), "cols": (full["cols"][:, :4].contiguous(), [0, 0])},
    )
    _manual_shard(
        root / "shard-00002-model-00001-of-00001.safetensors",
        {"rows": (full["rows"][3:], [3, 0]), "cols": (full["cols"][:, 4:].contiguous(), [0, 4])},
    )
    return full


def _flip(file: Path, offset: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def _data_offset(file: Path, name: str) -> int:
    from dcpio.formats.safetensors import parse_header

    header = parse_header(file.read_bytes(), None, str(file))
    return header.absolute(name)[0]


# ------------------------------------------------------------------------------ sharded folders are assembled
def test_convert_sharded_folder_to_torch_writes_whole_tensors(tmp_path: Path) -> None:
    full = _sharded_folder(tmp_path / "sharded")
    out = tmp_path / "model.pt"
    assert main(["convert", str(tmp_path / "sharded"), str(out), "--to", "torch"]) == EXIT_OK
    got = torch.load(out, weights_only=True)
    assert set(got) == set(full)
    for k, v in full.items():
        assert bitwise_equal(got[k], v), k


def test_inspect_and_diff_see_sharded_folder_as_the_reader_does(tmp_path: Path) -> None:
    full = _sharded_folder(tmp_path / "sharded")
    summary = inspect_checkpoint(tmp_path / "sharded")
    items = {i.name: i for i in summary.items}
    assert items["rows"].shape == [6, 4] and items["rows"].chunks == 2
    assert items["cols"].shape == [3, 8] and len(items["cols"].files) == 2
    pt = tmp_path / "full.pt"
    torch.save(full, pt)
    report = diff_checkpoints(tmp_path / "sharded", pt)
    assert report.match, report.entries


# ---------------------------------------------------------------------------------------- the index is the truth
def _indexed_folder(root: Path) -> dict[str, torch.Tensor]:
    g = _gen(2)
    sd = {"a": torch.randn(4, 4, generator=g), "b": torch.randn(5, generator=g)}
    root.mkdir(parents=True, exist_ok=True)
    save_file({"a": sd["a"]}, str(root / "model-00001-of-00002.safetensors"))
    save_file({"b": sd["b"]}, str(root / "model-00002-of-00002.safetensors"))
    wm = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (root / INDEX).write_text(json.dumps({"metadata": {"total_size": 84}, "weight_map": wm}))
    return sd


def test_stale_shards_beside_the_index_are_ignored(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    sd = _indexed_folder(folder)
    # an older export's file, holding a different "a": the index does not name it
    save_file({"a": torch.zeros(4, 4), "old": torch.ones(3)}, str(folder / "model-00001-of-00003.safetensors"))
    names = {i.name for i in inspect_checkpoint(folder).items}
    assert names == {"a", "b"}
    pt = tmp_path / "out.pt"
    convert(folder, pt, to="torch")
    got = torch.load(pt, weights_only=True)
    assert set(got) == {"a", "b"} and torch.equal(got["a"], sd["a"])
    report = verify_checkpoint(folder)
    assert report.ok, report.problems
    assert report.unreferenced == ["model-00001-of-00003.safetensors"]


def test_shard_listed_by_index_but_missing_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "hf"
    _indexed_folder(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    assert main(["verify", str(folder)]) == EXIT_PROBLEM
    out = capsys.readouterr().out
    assert "model-00002-of-00002.safetensors" in out and "missing" in out
    with pytest.raises(IncompleteCheckpointError, match=r"model-00002-of-00002\.safetensors"):
        HuggingFaceStorageReader(str(folder)).read_metadata()
    with pytest.raises(IncompleteCheckpointError, match=r"model-00002-of-00002\.safetensors"):
        inspect_checkpoint(folder)


# -------------------------------------------------------------------------------------------------- confinement
def test_commands_refuse_a_safetensors_symlink_out_of_the_folder(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"secret": torch.ones(3)}, str(outside / "x.safetensors"))
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, str(folder / "model.safetensors"))
    (folder / "evil.safetensors").symlink_to(outside / "x.safetensors")
    with pytest.raises(UnsafeCheckpointError):
        HuggingFaceStorageReader(str(folder)).read_metadata()
    with pytest.raises(UnsafeCheckpointError):
        inspect_checkpoint(folder)
    with pytest.raises(UnsafeCheckpointError):
        convert(folder, tmp_path / "o.pt", to="torch")
    with pytest.raises(UnsafeCheckpointError):
        diff_checkpoints(folder, folder)
    assert not verify_checkpoint(folder).ok
    assert not (tmp_path / "o.pt").exists()


# ------------------------------------------------------------------------------------------- export checksums
def test_export_checksums_catch_a_flipped_bit_and_stay_invisible_to_safetensors(tmp_path: Path) -> None:
    g = _gen(3)
    sd = {"w": torch.randn(64, 16, generator=g), "b": torch.randn(16, generator=g)}
    out = tmp_path / "export"
    dcp.save(sd, storage_writer=HuggingFaceStorageWriter(str(out)), no_dist=True)
    file = out / "model-00001-of-00001.safetensors"
    meta = json.loads(file.read_bytes()[8 : 8 + int.from_bytes(file.read_bytes()[:8], "little")])["__metadata__"]
    assert "dcpio_checksums" in meta and set(json.loads(meta["dcpio_checksums"])) == {"w", "b"}
    loaded = load_file(str(file))  # safetensors ignores the extra metadata string
    assert torch.equal(loaded["w"], sd["w"])
    assert verify_checkpoint(out).ok and verify_checkpoint(out).checksummed

    _flip(file, _data_offset(file, "w") + 100)
    torch.save(sd, tmp_path / "want.pt")
    # stock torch's HF reader loads the flipped value without a word
    out_text = run_stock(
        f"""
        import torch, torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageReader
        want = torch.load({str(tmp_path / "want.pt")!r}, weights_only=True)
        got = {{k: torch.zeros_like(v) for k, v in want.items()}}
        dcp.load(got, storage_reader=HuggingFaceStorageReader({str(out)!r}), no_dist=True)
        print("silently different:", not torch.equal(got["w"], want["w"]))
        """
    )
    assert "silently different: True" in out_text
    with pytest.raises(BaseException) as info:
        dcp.load({"w": torch.zeros(64, 16), "b": torch.zeros(16)}, storage_reader=HuggingFaceStorageReader(out))
    found = [e for e in exception_chain(info.value) if isinstance(e, CorruptCheckpointError)]
    assert found and "'w'" in str(found[0]) and file.name in str(found[0])
    report = verify_checkpoint(out)
    assert not report.ok and report.damaged_items() == ["w"]


def test_folders_without_checksums_load_as_before(tmp_path: Path) -> None:
    sd = {"w": torch.randn(8, 8, generator=_gen(4))}
    save_file(sd, str(tmp_path / "model.safetensors"))
    dest = {"w": torch.zeros(8, 8)}
    dcp.load(dest, storage_reader=HuggingFaceStorageReader(tmp_path), no_dist=True)
    assert torch.equal(dest["w"], sd["w"])
    report = verify_checkpoint(tmp_path)
    assert report.ok and not report.checksummed


def test_consolidation_verifies_shard_checksums(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    w = torch.randn(8, 4, generator=_gen(5))
    digests = {}
    import xxhash

    for r, (lo, hi) in enumerate(((0, 4), (4, 8)), start=1):
        part = w[lo:hi].contiguous()
        digests[r] = xxhash.xxh3_64_hexdigest(part.numpy().tobytes())
        write_file(
            FileSystem(),
            str(shards / f"shard-0000{r}-model-00001-of-00001.safetensors"),
            {"w": part},
            {
                "DCP_SHARDING_INFO": json.dumps({"w": {"saved_offsets": [lo, 0]}}),
                "dcpio_checksums": json.dumps({"w": f"xxh3-64:{digests[r]}"}),
                "format": "pt",
            },
        )
    consolidate_safetensors_files(str(shards), str(tmp_path / "ok"), {"w": 1})
    assert torch.equal(load_file(str(tmp_path / "ok" / "model-00001-of-00001.safetensors"))["w"], w)
    victim = shards / "shard-00002-model-00001-of-00001.safetensors"
    _flip(victim, _data_offset(victim, "w") + 5)
    with pytest.raises(CorruptCheckpointError, match="shard-00002"):
        consolidate_safetensors_files(str(shards), str(tmp_path / "bad"), {"w": 1})
    assert not (tmp_path / "bad" / "model-00001-of-00001.safetensors").exists()


# -------------------------------------------------------------------------------- consolidation: shards must tile
def test_consolidation_with_a_missing_shard_names_it(tmp_path: Path) -> None:
    root = tmp_path / "sharded"
    _sharded_folder(root)
    # a third rank's file is there, the second's is gone: its rows would otherwise come out as zeros
    (root / "shard-00002-model-00001-of-00001.safetensors").rename(root / "moved.bak")
    _manual_shard(root / "shard-00003-model-00001-of-00001.safetensors", {"extra": (torch.ones(2), [0])})
    with pytest.raises(CheckpointError) as info:
        consolidate_safetensors_files(str(root), str(tmp_path / "out"), {"rows": 1, "cols": 1, "extra": 1})
    msg = str(info.value)
    assert "shard-00002" in msg and "missing" in msg
    assert not (tmp_path / "out" / "model-00001-of-00001.safetensors").exists()


_HOSTILE_SHARD = """
import json, resource, sys
sys.path.insert(0, {src!r})
resource.setrlimit(resource.RLIMIT_AS, (700 << 20, 700 << 20))
import torch
from dcpio.errors import CheckpointError
from dcpio.formats.hf import consolidate_safetensors_files
from dcpio.formats.safetensors import write_file
from dcpio.movers import FileSystem
root = {root!r}
info = {{"w": {{"saved_offsets": [1 << 26, 0]}}}}
write_file(FileSystem(), root + "/shard-00001-model-00001-of-00001.safetensors", {{"w": torch.ones(2, 4)}},
           {{"DCP_SHARDING_INFO": json.dumps(info), "format": "pt"}})
try:
    consolidate_safetensors_files(root, root + "/out", {{"w": 1}})
except CheckpointError as err:
    print("refused:", str(err).splitlines()[0])
else:
    print("accepted")
"""


def test_consolidation_refuses_a_shard_offset_far_past_its_data_before_allocating(tmp_path: Path) -> None:
    # a ~200-byte shard claims to sit at row 2^26 of a 4-column float32 tensor: 1 GiB of zeros today
    code = _HOSTILE_SHARD.format(src=SRC_DIR, root=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused:" in proc.stdout and "'w'" in proc.stdout, proc.stdout
    assert resource.getrlimit(resource.RLIMIT_AS)  # the limit applied to the child only


def test_consolidation_without_a_mapping_writes_one_file(tmp_path: Path) -> None:
    full = _sharded_folder(tmp_path / "sharded")
    consolidate_safetensors_files(str(tmp_path / "sharded"), str(tmp_path / "out"), None)
    got = load_file(str(tmp_path / "out" / "model-00001-of-00001.safetensors"))
    assert set(got) == set(full)
    for k, v in full.items():
        assert bitwise_equal(got[k], v), k
    assert verify_checkpoint(tmp_path / "out").checksummed


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", f"dcpio-test-{os.getpid()}", str(mount)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root): no full-disk test")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_during_an_hf_export_names_it_and_leaves_no_partial_file(small_disk: Path) -> None:
    g = _gen(6)
    sd = {"a": torch.randn(160, 1024, generator=g), "b": torch.randn(160, 1024, generator=g)}  # 2 x 640 KiB
    out = small_disk / "export"
    writer = HuggingFaceStorageWriter(str(out), fqn_to_index_mapping={"a": 1, "b": 2}, thread_count=1)
    with pytest.raises(BaseException) as info:
        dcp.save(sd, storage_writer=writer, no_dist=True)
    found = [e for e in exception_chain(info.value) if isinstance(e, StorageFullError)]
    assert found and str(out) in str(found[0]) and "no space" in str(found[0])
    assert sorted(p.name for p in out.iterdir()) == []


def test_verify_names_the_damaged_shard_of_a_save_distributed_export(tmp_path: Path) -> None:
    root = tmp_path / "sharded"
    full = _sharded_folder(root)
    victim = root / "shard-00002-model-00001-of-00001.safetensors"
    # the manual shards carry no checksums: add them as a dcpio export records them, then flip a data byte
    from dcpio.formats.hf import digests_metadata, tensor_digest

    for r, lo in ((1, 0), (2, 3)):
        rows = full["rows"][lo : lo + 3].contiguous()
        cols = full["cols"][:, 4 * (r - 1) : 4 * r].contiguous()
        info = {"rows": {"saved_offsets": [lo, 0]}, "cols": {"saved_offsets": [0, 4 * (r - 1)]}}
        meta = {"DCP_SHARDING_INFO": json.dumps(info), "format": "pt"}
        meta.update(digests_metadata({"rows": tensor_digest(rows), "cols": tensor_digest(cols)}))
        write_file(
            FileSystem(),
            str(root / f"shard-0000{r}-model-00001-of-00001.safetensors"),
            {"rows": rows, "cols": cols},
            meta,
        )
    assert verify_checkpoint(root).ok and verify_checkpoint(root).checksummed
    _flip(victim, _data_offset(victim, "cols") + 3)
    report = verify_checkpoint(root)
    assert report.damaged_files() == [victim.name] and report.damaged_items() == ["cols"]
    assert report.items_checked == 4  # every chunk of the sound file was still read


def test_a_hub_cache_snapshot_whose_files_link_to_its_blobs_loads(tmp_path: Path) -> None:
    # huggingface_hub's cache layout: snapshots/<rev>/model.safetensors -> ../../blobs/<hash>
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    sd = {"w": torch.randn(4, 4, generator=_gen(7))}
    save_file(sd, str(repo / "blobs" / "e3b0c4"))
    (snap / "model.safetensors").symlink_to(Path("../../blobs/e3b0c4"))
    dest = {"w": torch.zeros(4, 4)}
    dcp.load(dest, storage_reader=HuggingFaceStorageReader(snap), no_dist=True)
    assert torch.equal(dest["w"], sd["w"])
    assert verify_checkpoint(snap).ok
    # a link anywhere else is still refused, also from a snapshot
    save_file({"x": torch.ones(2)}, str(tmp_path / "elsewhere.safetensors"))
    (snap / "other.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(UnsafeCheckpointError, match=r"other\.safetensors"):
        inspect_checkpoint(snap)


class _NoLocalRoot(FileSystem):
    """The real local mover, presenting itself as a store without local paths (as an object store does)."""

    def local_root(self, path: Any) -> str | None:
        return None


@pytest.mark.parametrize("mover", [FileSystem, _NoLocalRoot])
@pytest.mark.parametrize("distributed", [False, True])
def test_export_checksums_match_the_data_with_and_without_header_patching(
    tmp_path: Path, mover: type[FileSystem], distributed: bool
) -> None:
    g = _gen(8)
    sd = {"a": torch.randn(33, 7, generator=g), "b": torch.randn(5, generator=g).half(), "e": torch.zeros(0, 3)}
    out = tmp_path / "export"
    kw: dict[str, Any] = (
        {"save_distributed": True} if distributed else {"fqn_to_index_mapping": {"a": 1, "b": 2, "e": 2}}
    )
    dcp.save(sd, storage_writer=HuggingFaceStorageWriter(str(out), _fs=mover(), **kw), no_dist=True)
    report = verify_checkpoint(out)
    assert report.ok and report.checksummed, report.problems
    files = sorted(out.glob("*.safetensors"))
    got = {k: v for f in files for k, v in load_file(str(f)).items()}
    for k, v in sd.items():
        assert bitwise_equal(got[k], v), k
    assert not list(out.glob("*.tmp"))
