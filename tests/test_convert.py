"""``dcpio convert`` commits like a save, never touches its source or files it does not own, bounds its output by
what the checkpoint holds, and covers what users ask for: key selection, prefix renames, DCP -> DCP."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dcpio
from dcpio.cli.main import EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, main
from dcpio.errors import StorageFullError
from dcpio.tools import convert, diff_checkpoints, inspect_checkpoint, verify_checkpoint
from helpers import bitwise_equal, run_stock

INDEX = "model.safetensors.index.json"


def _state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"embed.weight": torch.randn(16, 8, generator=g), "head.bias": torch.randn(16, generator=g)},
        "optim": {"state": {"embed.weight": {"exp_avg": torch.randn(16, 8, generator=g)}}, "lr": 0.1},
        "step": 7,
    }


def _save(sd: dict[str, Any], path: Path) -> Path:
    dcp.save(sd, storage_writer=dcpio.FileSystemWriter(str(path)), no_dist=True)
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _data_file(ckpt: Path) -> Path:
    return next(p for p in ckpt.iterdir() if p.name.endswith(".distcp"))


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if "dcpio-stage" in p.name or p.name.endswith(".tmp")]


# -------------------------------------------------------------------------------------- commit like a save
def test_failed_overwrite_keeps_the_previous_output(tmp_path: Path) -> None:
    src = _save(_state(), tmp_path / "ckpt")
    out = tmp_path / "export"
    assert main(["convert", str(src), str(out), "--to", "hf"]) == EXIT_OK
    before = _snapshot(out)
    victim = _data_file(src)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))  # a damaged source: the conversion fails part-way
    assert main(["convert", str(src), str(out), "--to", "hf", "--overwrite"]) == EXIT_PROBLEM
    assert _snapshot(out) == before
    assert _leftovers(tmp_path) == []
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"previous")
    assert main(["convert", str(src), str(pt), "--to", "torch", "--overwrite"]) == EXIT_PROBLEM
    assert pt.read_bytes() == b"previous"
    assert _leftovers(tmp_path) == []


def test_destination_containing_or_inside_the_source_is_refused(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    src = _save(_state(), runs / "step-1")
    before = _snapshot(runs)
    assert main(["convert", str(src), str(runs), "--to", "dcp", "--overwrite"]) == EXIT_USAGE
    assert main(["convert", str(src), str(src / "hf"), "--to", "hf", "--overwrite"]) == EXIT_USAGE
    assert main(["convert", str(src), str(src), "--to", "dcp", "--overwrite"]) == EXIT_USAGE
    assert _snapshot(runs) == before


def test_overwrite_replaces_only_the_weights_and_keeps_other_files(tmp_path: Path) -> None:
    src = _save(_state(), tmp_path / "ckpt")
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "x"}')
    (out / "tokenizer.json").write_text("tok")
    (out / "extra").mkdir()
    (out / "extra" / "notes.txt").write_text("mine")
    # an older, larger export: its shards must not survive beside the new index
    for i in (1, 2, 3):
        (out / f"model-0000{i}-of-00003.safetensors").write_bytes(b"old")
    (out / INDEX).write_text("{}")
    assert main(["convert", str(src), str(out), "--to", "hf", "--overwrite", "--only", "model."]) == EXIT_OK
    assert (out / "config.json").read_text() == '{"model_type": "x"}'
    assert (out / "tokenizer.json").read_text() == "tok"
    assert (out / "extra" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model-00001-of-00001.safetensors"]
    assert set(json.loads((out / INDEX).read_text())["weight_map"]) == {"model.embed.weight", "model.head.bias"}
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------------- output bounded by what is stored
def _rewrite_metadata(ckpt: Path, edit: Any) -> None:
    md = pickle.loads((ckpt / ".metadata").read_bytes())
    edit(md)
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))


def test_hostile_planner_data_index_does_not_inflate_a_torch_export(tmp_path: Path) -> None:
    src = _save({"layers": [torch.arange(12, dtype=torch.float32)]}, tmp_path / "ckpt")

    def edit(md: Any) -> None:
        md.planner_data["layers.0"] = ("layers", 10_000_000)

    _rewrite_metadata(src, edit)
    out = tmp_path / "out.pt"
    code = main(["convert", str(src), str(out), "--to", "torch"])
    if code == EXIT_OK:
        assert out.stat().st_size < 100_000
        got = torch.load(out, weights_only=True)
        assert torch.equal(got["layers"][10_000_000], torch.arange(12, dtype=torch.float32))
    else:
        assert code == EXIT_PROBLEM and not out.exists()


def test_tensor_size_past_its_chunks_is_refused_before_writing(tmp_path: Path) -> None:
    src = _save({"w": torch.ones(2, 3)}, tmp_path / "ckpt")

    def edit(md: Any) -> None:
        md.state_dict_metadata["w"].size = torch.Size([1 << 26, 3])

    _rewrite_metadata(src, edit)
    out = tmp_path / "out.pt"
    assert main(["convert", str(src), str(out), "--to", "torch"]) == EXIT_PROBLEM
    assert not out.exists() and _leftovers(tmp_path) == []
    assert not verify_checkpoint(src).ok


# ------------------------------------------------------------------------------------- what users ask for
def test_only_exclude_strip_and_rename(tmp_path: Path) -> None:
    sd = _state()
    src = _save(sd, tmp_path / "ckpt")
    out = tmp_path / "hf"
    args = ["convert", str(src), str(out), "--to", "hf", "--exclude", "optim.", "--strip-prefix", "model."]
    assert main([*args, "--rename", "head.=lm_head."]) == EXIT_OK
    names = set(json.loads((out / INDEX).read_text())["weight_map"])
    assert names == {"embed.weight", "lm_head.bias"}
    from safetensors.torch import load_file

    got = load_file(str(out / "model-00001-of-00001.safetensors"))
    assert torch.equal(got["lm_head.bias"], sd["model"]["head.bias"])
    # two names that would land on one are refused, and nothing selected is refused
    assert (
        main(["convert", str(src), str(tmp_path / "x"), "--to", "hf", "--rename", "model.head.bias=model.embed.weight"])
        == 2
    )
    assert main(["convert", str(src), str(tmp_path / "y"), "--to", "hf", "--only", "nothing."]) == EXIT_USAGE
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.fixture(scope="module")
def stock_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stock") / "ckpt"
    run_stock(
        f"""
        import torch, torch.distributed.checkpoint as dcp
        g = torch.Generator().manual_seed(3)
        sd = {{"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g).half(), "step": 3}}
        dcp.save(sd, storage_writer=dcp.FileSystemWriter({str(path)!r}), no_dist=True)
        """
    )
    return path


@pytest.mark.parametrize(
    ("flags", "fmt", "transforms"),
    [
        ([], "dcp torch_save", []),
        (["--format", "safetensors"], "dcp safetensors", []),
        (["--compress", "zstd"], "dcp torch_save", ["stream.zstd/1"]),
    ],
)
def test_dcp_to_dcp_adds_checksums_changes_format_compresses(
    tmp_path: Path, stock_ckpt: Path, flags: list[str], fmt: str, transforms: list[str]
) -> None:
    if "zstd" in flags:
        pytest.importorskip("zstandard")
    assert not inspect_checkpoint(stock_ckpt).checksummed
    out = tmp_path / "out"
    assert main(["convert", str(stock_ckpt), str(out), "--to", "dcp", *flags]) == EXIT_OK
    summary = inspect_checkpoint(out)
    assert summary.checksummed and summary.transforms == transforms
    md = dcpio.FileSystemReader(str(out)).read_metadata()
    info = next(i for idx, i in md.storage_data.items() if idx.fqn == "w")
    with open(out / info.relative_path, "rb") as f:
        f.seek(info.offset)
        head = f.read(9)
    # a safetensors record opens with its header length and "{"; a torch_save record is a zip ("PK")
    assert (head[8:9] == b"{") == (fmt == "dcp safetensors")
    assert (head[:2] == b"PK") == (fmt == "dcp torch_save" and not transforms)  # zstd frames are not zips
    report = diff_checkpoints(stock_ckpt, out)
    assert report.match, report.entries
    assert verify_checkpoint(out).ok


def test_gpt2_export_into_a_model_folder_loads_with_from_pretrained(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    # a training checkpoint: the model under "model.", optimizer state beside it
    src = _save({"model": sd, "optim": {"exp_avg": {k: torch.zeros_like(v) for k, v in sd.items()}}}, tmp_path / "c")
    folder = tmp_path / "gpt2"
    config.save_pretrained(str(folder))
    config_bytes = (folder / "config.json").read_bytes()
    args = ["convert", str(src), str(folder), "--to", "hf", "--overwrite", "--only", "model.", "--strip-prefix"]
    assert main([*args, "model.", "--max-shard-size", "50KB"]) == EXIT_OK
    assert (folder / "config.json").read_bytes() == config_bytes
    loaded = transformers.GPT2LMHeadModel.from_pretrained(str(folder), local_files_only=True).eval()
    for k, v in loaded.state_dict().items():
        assert bitwise_equal(v, sd[k]), k
    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # HF -> HF into the same kind of folder: the config stays, the weights are replaced
    again = tmp_path / "gpt2-copy"
    config.save_pretrained(str(again))
    assert main(["convert", str(folder), str(again), "--to", "hf", "--overwrite"]) == EXIT_OK
    assert (again / "config.json").read_bytes() == config_bytes
    assert diff_checkpoints(folder, again).match


# ------------------------------------------------------------------------------------------- full disk
@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", f"dcpio-test-{uuid.uuid4().hex[:8]}", str(mount)],
        capture_output=True,
    )
    if proc.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root): no full-disk test")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("to", ["torch", "hf"])
def test_full_disk_names_the_destination_and_leaves_nothing(tmp_path: Path, small_disk: Path, to: str) -> None:
    g = torch.Generator().manual_seed(5)
    src = _save({"w": torch.randn(512, 1024, generator=g)}, tmp_path / "ckpt")  # 2 MiB into a 1 MiB disk
    dst = small_disk / ("model.pt" if to == "torch" else "export")
    with pytest.raises(StorageFullError) as info:
        convert(src, dst, to=to)
    msg = str(info.value)
    assert str(dst) in msg and "space" in msg and str(src) not in msg.split("space")[0]
    assert os.listdir(small_disk) == []
    shutil.rmtree(tmp_path / "ckpt")


def test_symlinked_destination_is_replaced_through_the_link(tmp_path: Path) -> None:
    src = _save(_state(), tmp_path / "ckpt")
    real = tmp_path / "real-export"
    assert main(["convert", str(src), str(real), "--to", "hf", "--only", "model."]) == EXIT_OK
    (real / "config.json").write_text("{}")
    link = tmp_path / "export"
    link.symlink_to(real)
    assert main(["convert", str(src), str(link), "--to", "hf", "--overwrite", "--exclude", "model."]) == EXIT_OK
    assert link.is_symlink() and (real / "config.json").read_text() == "{}"
    names = set(json.loads((real / INDEX).read_text())["weight_map"])
    assert names == {"optim.state.embed.weight.exp_avg"}
    assert _leftovers(tmp_path) == []
