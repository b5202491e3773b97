"""The ``dcpio`` command, driven as a user drives it: in-process through ``main([...])`` and as a real subprocess
(``python -m dcpio.cli.main`` and the installed ``dcpio`` script), on checkpoints written by dcpio and by stock
torch (in a subprocess that never imports dcpio), healthy and damaged."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dcpio
from dcpio.cli.main import EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, main
from dcpio.tools import convert, diff_checkpoints, inspect_checkpoint, verify_checkpoint
from helpers import assert_tree_equal, bitwise_equal, make_state_dict, run_stock
from s3_server import S3Endpoint, moto, s3  # noqa: F401  (fixtures)

SRC_DIR = str(Path(__file__).resolve().parent.parent / "src")


def _flat(obj: Any) -> dict[str, Any]:
    """The entry names DCP gives a state dict (its default planner's flattening)."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    return dict(flatten_state_dict(obj)[0])


def _save(sd: dict[str, Any], path: Path, **kw: Any) -> Path:
    dcp.save(sd, storage_writer=dcpio.FileSystemWriter(str(path), **kw), no_dist=True)
    return path


def _load_like(template: dict[str, Any], path: Path) -> dict[str, Any]:
    """Load ``path`` with dcpio's reader into fresh tensors shaped like ``template``'s."""

    def fresh(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return torch.zeros(x.shape, dtype=x.dtype)
        if isinstance(x, dict):
            return {k: fresh(v) for k, v in x.items()}
        if isinstance(x, list):
            return [fresh(v) for v in x]
        return x

    target = fresh(template)
    dcp.load(target, storage_reader=dcpio.FileSystemReader(str(path)), no_dist=True)
    return target


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env["NO_COLOR"] = "1"
    full_env["PYTHONPATH"] = SRC_DIR + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "dcpio.cli.main", *args], capture_output=True, text=True, env=full_env, timeout=300
    )


def _storage_info(path: Path, fqn: str) -> Any:
    md = dcpio.FileSystemReader(str(path)).read_metadata()
    infos = [info for idx, info in md.storage_data.items() if idx.fqn == fqn]
    assert len(infos) == 1
    return infos[0]


def _flip(file: Path, offset: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sd() -> dict[str, Any]:
    """Every dtype safetensors and torch.save hold, views, nesting; no custom objects (plain values only)."""
    state = make_state_dict(seed=3, complex_=False, objects=False)
    state["plain"] = {"step": 42, "name": "run-1", "lrs": [0.1, 0.01]}
    return state


@pytest.fixture(scope="module")
def dcpio_ckpt(tmp_path_factory: pytest.TempPathFactory, sd: dict[str, Any]) -> Path:
    return _save(sd, tmp_path_factory.mktemp("dcpio") / "ckpt")


@pytest.fixture(scope="module")
def stock_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stock") / "ckpt"
    run_stock(
        f"""
        import torch.distributed.checkpoint as dcp
        import helpers
        sd = helpers.make_state_dict(seed=5, objects=False)
        dcp.save(sd, storage_writer=dcp.FileSystemWriter({str(path)!r}), no_dist=True)
        """
    )
    return path


@pytest.fixture
def damaged(tmp_path: Path, dcpio_ckpt: Path) -> Path:
    dst = tmp_path / "damaged"
    shutil.copytree(dcpio_ckpt, dst)
    return dst


# ------------------------------------------------------------------------------------------------- basics
def test_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "exit codes:" in out
    for cmd in ("inspect", "verify", "convert", "diff", "demo", "bench"):
        assert cmd in out
    assert main(["verify", "--help"]) == EXIT_OK
    assert "3  unexpected failure" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main([]) == EXIT_USAGE
    assert main(["no-such-command"]) == EXIT_USAGE
    assert main(["convert", "a", "b"]) == EXIT_USAGE  # --to is required
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "nowhere")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("dcpio: error: ") and "nowhere" in err
    assert "hint:" in err and "Traceback" not in err


def test_bench_starts_the_benchmark_of_the_checkout() -> None:
    # the benchmark is not in the package: `dcpio bench` runs benchmarks/run.py of this source checkout
    proc = _run(["bench", "--help"])
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "usage: dcpio bench" in proc.stdout and "--rounds" in proc.stdout
    proc = _run(["bench", "--cases", "nonsense"])
    assert proc.returncode == EXIT_USAGE
    assert "unknown case(s) ['nonsense']" in proc.stderr


def test_bench_outside_a_checkout_is_one_line_error(tmp_path: Path) -> None:
    # an installed package (a copy of dcpio with no benchmarks/ folder beside it): the CLI says where the bench is
    shutil.copytree(Path(SRC_DIR) / "dcpio", tmp_path / "site" / "dcpio")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), NO_COLOR="1")
    proc = subprocess.run(
        [sys.executable, "-m", "dcpio", "bench"], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert proc.stderr.startswith("dcpio: error: the benchmark is not part of the installed package")
    assert "benchmarks/run.py" in proc.stderr and "Traceback" not in proc.stderr


def test_library_never_imports_the_benchmark() -> None:
    # every module of the package imported: none of them pulls in the benchmark
    code = (
        "import pkgutil, importlib, sys, dcpio\n"
        "for m in pkgutil.walk_packages(dcpio.__path__, 'dcpio.'):\n"
        "    if m.name != 'dcpio.__main__':\n"
        "        importlib.import_module(m.name)\n"
        "print(sorted(n for n in sys.modules if n.startswith(('dcpio_bench', 'dcpio.bench'))))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=SRC_DIR)
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# -------------------------------------------------------------------------------------- the command's surface
_IMPORTS_AFTER = (
    "import sys\n"
    "from dcpio.cli.main import main\n"
    "rc = main({argv!r})\n"
    "print('RC', rc, 'TORCH', 'torch' in sys.modules, file=sys.stderr)\n"
)


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        ["verify", "--help"],
        ["no-such-command"],
        ["convert", "a", "b"],
        ["diff", "--atol", "-1", "a", "b"],
        ["demo", "--steps", "-1"],
    ],
)
def test_help_version_and_argument_errors_do_not_import_torch(argv: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORTS_AFTER.format(argv=argv)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=SRC_DIR),
        timeout=120,
    )
    expected = EXIT_OK if argv[-1] in ("--help", "--version") else EXIT_USAGE
    assert f"RC {expected} TORCH False" in proc.stderr, proc.stderr


def test_version_and_python_m_dcpio() -> None:
    env = dict(os.environ, PYTHONPATH=SRC_DIR)
    proc = subprocess.run([sys.executable, "-m", "dcpio", "--version"], capture_output=True, text=True, env=env)
    assert proc.returncode == EXIT_OK
    assert proc.stdout.strip() == f"dcpio {dcpio.__version__}"
    proc = subprocess.run([sys.executable, "-m", "dcpio"], capture_output=True, text=True, env=env)
    assert proc.returncode == EXIT_USAGE and "usage: dcpio" in proc.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--atol", "-1"], "'-1' is not a tolerance"),
        (["--atol", "nan"], "'nan' is not a tolerance"),
        (["--atol", "inf"], "'inf' is not a tolerance"),
        (["--atol", "lots"], "'lots' is not a number"),
    ],
)
def test_nonsensical_atol_is_refused(
    argv: list[str], message: str, dcpio_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["diff", *argv, str(dcpio_ckpt), str(dcpio_ckpt)]) == EXIT_USAGE
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("steps", ["-1", "0", "two"])
def test_nonsensical_demo_steps_are_refused(steps: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--steps", steps]) == EXIT_USAGE
    assert "argument --steps" in capsys.readouterr().err


def _not_checkpoints(root: Path, ckpt: Path) -> dict[str, tuple[Path, str]]:
    empty = root / "empty"
    empty.mkdir()
    other = root / "notes"
    other.mkdir()
    (other / "readme.txt").write_text("not a checkpoint")
    plain = root / "plain.txt"
    plain.write_text("hello")
    data_file = next(p for p in ckpt.iterdir() if p.name.endswith(".distcp"))
    return {
        "empty directory": (empty, "is an empty directory"),
        "directory of other files": (other, "holds no checkpoint files"),
        "plain file": (plain, "is not a checkpoint file"),
        "data file": (data_file, f"pass the directory instead: dcpio {{cmd}} {ckpt}"),
    }


@pytest.mark.parametrize("cmd", ["inspect", "verify", "diff", "convert"])
def test_paths_that_are_not_checkpoints_are_usage_errors(
    cmd: str, tmp_path: Path, dcpio_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for kind, (path, message) in _not_checkpoints(tmp_path, dcpio_ckpt).items():
        argv = {
            "inspect": ["inspect", str(path)],
            "verify": ["verify", str(path)],
            "diff": ["diff", str(dcpio_ckpt), str(path)],
            "convert": ["convert", str(path), str(tmp_path / "out"), "--to", "dcp"],
        }[cmd]
        assert main(argv) == EXIT_USAGE, kind
        err = capsys.readouterr().err
        assert err.startswith(f"dcpio: error: {path} "), (kind, err)
        assert message.format(cmd=cmd) in err, (kind, err)
        assert "hint: run `dcpio verify" not in err and "corrupt" not in err.lower(), (kind, err)
        assert not (tmp_path / "out").exists()


def test_quiet_hides_notes(damaged: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (damaged / "stray.distcp").write_bytes(b"left over")
    assert main(["verify", str(damaged)]) == EXIT_OK
    assert "note: 1 file(s) not referenced" in capsys.readouterr().out
    for argv in (["-q", "verify", str(damaged)], ["verify", "-q", str(damaged)]):
        assert main(argv) == EXIT_OK
        out = capsys.readouterr().out
        assert out.startswith("OK") and "note:" not in out and "stray.distcp" not in out


def test_verify_hint_names_the_path_and_only_where_it_helps(damaged: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (damaged / ".metadata").write_bytes(b"\x80\x04garbage")
    assert main(["inspect", str(damaged)]) == EXIT_PROBLEM
    err = capsys.readouterr().err
    assert f"hint: run `dcpio verify {damaged}` for a full report" in err
    assert main(["verify", str(damaged)]) == EXIT_PROBLEM
    captured = capsys.readouterr()
    assert "dcpio verify" not in captured.out + captured.err


# ------------------------------------------------------------------------------------------------- inspect
def test_inspect_dcpio_checkpoint_json(capsys: pytest.CaptureFixture[str], dcpio_ckpt: Path, sd: Any) -> None:
    assert main(["inspect", "--json", str(dcpio_ckpt)]) == EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "dcp torch_save"
    assert doc["writer"] == "dcpio" and doc["checksummed"] is True
    assert doc["ranks"] == 1
    on_disk = sorted(p.name for p in dcpio_ckpt.iterdir() if p.name != ".metadata")
    assert doc["files"] == on_disk
    assert doc["total_bytes"] == sum(p.stat().st_size for p in dcpio_ckpt.iterdir())
    items = {i["name"]: i for i in doc["items"]}
    flat = _flat(sd)
    assert set(items) == set(flat)
    for name, value in flat.items():
        item = items[name]
        if isinstance(value, torch.Tensor):
            assert item["kind"] == "tensor"
            assert item["dtype"] == str(value.dtype).removeprefix("torch.")
            assert item["shape"] == list(value.shape)
            assert item["chunks"] == 1
            assert item["nbytes"] == value.numel() * value.element_size()
        else:
            assert item["kind"] == "object" and item["dtype"] is None
        assert item["files"] and set(item["files"]) <= set(on_disk)


def test_inspect_table_and_stock_writer(capsys: pytest.CaptureFixture[str], stock_ckpt: Path) -> None:
    assert main(["inspect", str(stock_ckpt)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "format:      dcp torch_save (writer: torch, no checksums)" in out
    assert "dtypes.float8_e5m2" in out and "[3, 5]" in out
    summary = inspect_checkpoint(stock_ckpt)
    assert summary.writer == "torch" and not summary.checksummed


def test_inspect_safetensors_format_written_by_torch(tmp_path: Path) -> None:
    path = tmp_path / "st"
    run_stock(
        f"""
        import torch, torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.filesystem import SerializationFormat
        sd = {{"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}}
        dcp.save(sd, storage_writer=dcp.FileSystemWriter({str(path)!r},
                 serialization_format=SerializationFormat.SAFETENSORS), no_dist=True)
        """
    )
    summary = inspect_checkpoint(path)
    assert summary.format == "dcp safetensors"
    assert {i.name: i.shape for i in summary.items} == {"a": [2, 3], "b": [4]}
    report = verify_checkpoint(path)
    assert report.ok, report.problems


# ------------------------------------------------------------------------------------------------- verify
def test_verify_sound_checkpoints(
    capsys: pytest.CaptureFixture[str], dcpio_ckpt: Path, stock_ckpt: Path, sd: Any
) -> None:
    assert main(["verify", str(dcpio_ckpt)]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("OK") and "checksums verified" in out
    assert main(["verify", str(stock_ckpt)]) == EXIT_OK
    assert "structure checked (no dcpio checksums" in capsys.readouterr().out
    report = verify_checkpoint(dcpio_ckpt)
    assert report.ok and report.checksummed and report.unreferenced == []
    assert report.items_checked == len(_flat(sd))


def test_verify_flipped_byte_names_file_and_tensor(damaged: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = _storage_info(damaged, "shapes.big_1d")
    _flip(damaged / info.relative_path, info.offset + info.length // 2)
    assert main(["verify", str(damaged)]) == EXIT_PROBLEM
    out = capsys.readouterr().out
    assert out.startswith("DAMAGED")
    assert info.relative_path in out and "shapes.big_1d" in out and "checksum" in out
    report = verify_checkpoint(damaged)
    assert report.damaged_items() == ["shapes.big_1d"]  # only that tensor; everything else still read fine
    assert report.damaged_files() == [info.relative_path]


def test_verify_reports_every_damaged_tensor(damaged: Path) -> None:
    names = ["shapes.big_1d", "model.layers.1.weight", "dtypes.int64"]
    for name in names:
        info = _storage_info(damaged, name)
        _flip(damaged / info.relative_path, info.offset + info.length - 30)  # inside the record's tail
    report = verify_checkpoint(damaged)
    assert report.damaged_items() == sorted(names)


def test_verify_truncated_file(damaged: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = _storage_info(damaged, "shapes.big_1d")
    victim = damaged / info.relative_path
    os.truncate(victim, info.offset + info.length // 2)  # inside big_1d: it and every item after it are cut
    assert main(["verify", str(damaged)]) == EXIT_PROBLEM
    out = capsys.readouterr().out
    assert info.relative_path in out and "truncated" in out
    report = verify_checkpoint(damaged)
    assert any(p.kind == "truncated" and p.file == info.relative_path for p in report.problems)
    # one line for the file, with the items it takes down counted, not one line per item
    lost = [p.item for p in report.problems if p.item is not None]
    assert lost and "shapes.big_1d" in lost
    problem_lines = [ln for ln in out.splitlines() if ln.startswith("  ")]
    assert len(problem_lines) == 1, out
    assert f"{len(lost)} item(s) in it cannot be read: " in problem_lines[0]
    assert all(f"[{item}]" not in out for item in lost)


def test_verify_missing_metadata(damaged: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (damaged / ".metadata").unlink()
    assert main(["verify", str(damaged)]) == EXIT_PROBLEM
    assert ".metadata is missing" in capsys.readouterr().out
    # inspect cannot describe it: one line, a hint, no traceback ... unless --debug
    assert main(["inspect", str(damaged)]) == EXIT_PROBLEM
    err = capsys.readouterr().err
    assert err.startswith("dcpio: error: ") and ".metadata is missing" in err and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if ln.startswith("dcpio: error:")]) == 1
    assert main(["--debug", "inspect", str(damaged)]) == EXIT_PROBLEM
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_verify_missing_and_unreferenced_files(damaged: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = _storage_info(damaged, "model.layers.0.weight")
    (damaged / info.relative_path).unlink()
    (damaged / "stray.distcp").write_bytes(b"left over")
    assert main(["verify", str(damaged)]) == EXIT_PROBLEM
    out = capsys.readouterr().out
    assert "missing-file" in out and info.relative_path in out
    assert "stray.distcp" in out
    report = verify_checkpoint(damaged)
    assert report.unreferenced == ["stray.distcp"]
    assert "model.layers.0.weight" in report.damaged_items()
    # the missing file is one line that counts what it held, not a line per item
    assert f"{len(report.damaged_items())} item(s) in it cannot be read" in out
    assert "[model.layers.0.weight]" not in out


def test_verify_subprocess_damaged_plain_output(damaged: Path) -> None:
    info = _storage_info(damaged, "dtypes.float32")
    _flip(damaged / info.relative_path, info.offset + info.length - 30)
    proc = _run(["verify", str(damaged)])
    assert proc.returncode == EXIT_PROBLEM, proc.stderr
    assert "dtypes.float32" in proc.stdout and info.relative_path in proc.stdout
    assert "\x1b[" not in proc.stdout + proc.stderr  # no colour, no progress bar off a terminal
    proc = _run(["verify", "--json", str(damaged)])
    assert proc.returncode == EXIT_PROBLEM
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False and [p["item"] for p in doc["problems"]] == ["dtypes.float32"]


def test_verify_damaged_hf_folder_and_torch_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    hf = tmp_path / "hf"
    hf.mkdir()
    save_file({"a": torch.randn(100, 100)}, str(hf / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.randn(10)}, str(hf / "model-00002-of-00002.safetensors"))
    assert main(["verify", str(hf)]) == EXIT_OK
    capsys.readouterr()
    victim = hf / "model-00001-of-00002.safetensors"
    os.truncate(victim, victim.stat().st_size - 100)
    assert main(["verify", str(hf)]) == EXIT_PROBLEM
    assert victim.name in capsys.readouterr().out
    report = verify_checkpoint(hf)
    assert report.damaged_files() == [victim.name]
    assert report.items_checked == 1  # the sound file's tensor was still read

    pt = tmp_path / "m.pt"
    torch.save({"w": torch.randn(1000)}, pt)
    assert main(["verify", str(pt)]) == EXIT_OK
    os.truncate(pt, pt.stat().st_size - 2000)
    assert main(["verify", str(pt)]) == EXIT_PROBLEM
    assert "m.pt" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- diff
def test_diff_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(3), "only_a": torch.zeros(2)}
    a = _save(base, tmp_path / "a")
    same = _save({k: v.clone() for k, v in base.items()}, tmp_path / "same")
    changed = {"w": base["w"].clone(), "b": base["b"].clone(), "only_b": torch.zeros(1)}
    changed["w"][1, 2] += 0.5
    b = _save(changed, tmp_path / "b")

    assert main(["diff", str(a), str(same)]) == EXIT_OK
    assert "MATCH" in capsys.readouterr().out
    assert main(["diff", str(a), str(b)]) == EXIT_PROBLEM
    out = capsys.readouterr().out
    assert "DIFFER" in out and "only_a" in out and "only_b" in out and "0.5" in out
    report = diff_checkpoints(a, b)
    status = {e.name: e for e in report.entries}
    assert status["w"].status == "different" and status["w"].max_abs_diff == 0.5
    assert status["b"].status == "equal"
    assert status["only_a"].status == "only-a" and status["only_b"].status == "only-b"

    close = _save({"w": changed["w"], "b": base["b"], "only_a": base["only_a"]}, tmp_path / "close")
    assert main(["diff", str(a), str(close)]) == EXIT_PROBLEM
    assert main(["diff", "--atol", "0.5", str(a), str(close)]) == EXIT_OK
    assert main(["diff", "--atol", "0.4", str(a), str(close)]) == EXIT_PROBLEM


def test_diff_dtype_and_shape(tmp_path: Path) -> None:
    a = _save({"x": torch.zeros(4), "y": torch.zeros(2, 2)}, tmp_path / "a")
    b = _save({"x": torch.zeros(4, dtype=torch.float64), "y": torch.zeros(4)}, tmp_path / "b")
    status = {e.name: e.status for e in diff_checkpoints(a, b).entries}
    assert status == {"x": "dtype", "y": "shape"}


def test_diff_stock_vs_dcpio_same_state(tmp_path: Path, stock_ckpt: Path) -> None:
    # the same deterministic state written by stock torch and by dcpio compares equal, bit for bit
    mine = _save(make_state_dict(seed=5, objects=False), tmp_path / "mine")
    report = diff_checkpoints(stock_ckpt, mine)
    assert report.match, [e for e in report.entries if e.status != "equal"]
    different = _save(make_state_dict(seed=6, objects=False), tmp_path / "other")
    assert not diff_checkpoints(stock_ckpt, different).match


# ------------------------------------------------------------------------------------------------- convert
def test_convert_dcp_hf_dcp_bit_exact(tmp_path: Path, dcpio_ckpt: Path, sd: Any) -> None:
    hf = tmp_path / "hf"
    assert main(["convert", str(dcpio_ckpt), str(hf), "--to", "hf", "--max-shard-size", "100KB"]) == EXIT_OK
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in hf.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    tensors = {k: v for k, v in _flat(sd).items() if isinstance(v, torch.Tensor)}
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    # each shard holds at most 100 KB of tensor data unless a single tensor is bigger on its own
    from safetensors import safe_open

    for shard in shards:
        with safe_open(str(hf / shard), "pt") as f:
            names = list(f.keys())
            size = sum(f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in names)
            for n in names:
                assert bitwise_equal(f.get_tensor(n), tensors[n]), n
        assert size <= 100_000 or len(names) == 1

    back = tmp_path / "back"
    assert main(["convert", str(hf), str(back), "--to", "dcp"]) == EXIT_OK
    loaded = _load_like(tensors, back)
    assert_tree_equal(tensors, loaded)
    report = diff_checkpoints(dcpio_ckpt, back)
    assert {e.status for e in report.entries} == {"equal", "only-a"}  # non-tensor values cannot go through HF
    assert {e.name for e in report.entries if e.status == "only-a"} == {
        k for k, v in _flat(sd).items() if not isinstance(v, torch.Tensor)
    }


def test_convert_dcp_torch_dcp(tmp_path: Path, dcpio_ckpt: Path, sd: Any) -> None:
    pt = tmp_path / "model.pt"
    assert main(["convert", str(dcpio_ckpt), str(pt), "--to", "torch"]) == EXIT_OK
    loaded = torch.load(pt, weights_only=True)
    expected = json.loads(json.dumps(sd, default=lambda o: None))  # structure only, for the key check below
    assert set(loaded) == set(expected)
    assert_tree_equal(_flat(sd), _flat(loaded))
    assert isinstance(loaded["model"]["layers"], list)  # nesting rebuilt, lists stay lists
    # stock torch alone reads the file
    out = run_stock(
        f"""
        import torch
        sd = torch.load({str(pt)!r}, weights_only=True, mmap=True)
        print(sorted(sd), float(sd["shapes"]["big_1d"].double().nan_to_num().sum()) != 0.0)
        """
    )
    assert "['dtypes', 'model', 'plain', 'shapes', 'views'] True" in out

    back = tmp_path / "back"
    assert main(["convert", str(pt), str(back), "--to", "dcp"]) == EXIT_OK
    report = diff_checkpoints(dcpio_ckpt, back)
    assert report.match, [e for e in report.entries if e.status != "equal"]
    assert main(["diff", str(dcpio_ckpt), str(pt)]) == EXIT_OK  # across kinds too


def test_convert_stock_checkpoint_to_torch(tmp_path: Path, stock_ckpt: Path) -> None:
    pt = tmp_path / "stock.pt"
    assert convert(stock_ckpt, pt, to="torch").tensors > 0
    run_stock(
        f"""
        import torch, helpers
        got = torch.load({str(pt)!r}, weights_only=True)
        helpers.assert_tree_equal(helpers.make_state_dict(seed=5, objects=False), got)
        """
    )


def test_convert_refusals(tmp_path: Path, dcpio_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "hf"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["convert", str(dcpio_ckpt), str(dst), "--to", "hf"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("dcpio: error: ") and "--overwrite" in err
    assert (dst / "keep.txt").read_text() == "mine"
    # DCP -> DCP is a conversion too (format, compression, checksums): see test_convert.py
    assert main(["convert", str(dcpio_ckpt), str(dcpio_ckpt), "--to", "dcp"]) == EXIT_USAGE
    assert main(["convert", str(dcpio_ckpt), str(tmp_path / "y"), "--to", "hf", "--max-shard-size", "lots"]) == 2
    assert "cannot read 'lots' as a size" in capsys.readouterr().err
    assert main(["convert", str(dcpio_ckpt), str(dst), "--to", "hf", "--overwrite"]) == EXIT_OK
    assert (dst / "keep.txt").read_text() == "mine"  # not a checkpoint file: a convert leaves it alone


def test_transformers_folder_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a folder exactly as transformers writes it (sharded, with an index), through DCP and back to HF
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=64)
    model = transformers.GPT2LMHeadModel(config)
    src = tmp_path / "hf_src"
    model.save_pretrained(str(src), max_shard_size="100KB")
    assert len(list(src.glob("*.safetensors"))) > 1

    assert main(["inspect", "--json", str(src)]) == EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "hf safetensors"
    on_disk = {k: v for k, v in transformers.GPT2LMHeadModel.from_pretrained(str(src)).state_dict().items()}
    items = {i["name"]: i for i in doc["items"]}
    assert items["transformer.wte.weight"]["shape"] == [1000, 64]
    assert set(items) <= set(on_disk)

    ck = tmp_path / "dcp"
    out = tmp_path / "hf_out"
    assert main(["convert", str(src), str(ck), "--to", "dcp"]) == EXIT_OK
    assert main(["verify", str(ck)]) == EXIT_OK
    assert main(["convert", str(ck), str(out), "--to", "hf"]) == EXIT_OK
    assert main(["diff", str(src), str(out)]) == EXIT_OK
    shutil.copy(src / "config.json", out / "config.json")  # the weights are ours to convert; the config is the user's
    again = transformers.GPT2LMHeadModel.from_pretrained(str(out)).state_dict()
    assert set(again) == set(on_disk)
    for name, tensor in on_disk.items():
        assert bitwise_equal(tensor, again[name]), name


def test_installed_script_inspect_json(dcpio_ckpt: Path) -> None:
    script = Path(sys.executable).parent / "dcpio"
    if not script.exists():
        pytest.skip("the dcpio console script is not installed in this environment (pip install -e .)")
    proc = subprocess.run(
        [str(script), "inspect", "--json", str(dcpio_ckpt)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["writer"] == "dcpio"


# ------------------------------------------------------------------------------------------------- demo
@pytest.mark.slow
def test_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    where = tmp_path / "demo"
    assert main(["demo", str(where)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "dcpio.FileSystemWriter" in out and "MB/s" in out and "identical bit for bit" in out
    ckpt = where / "dcpio_ckpt"
    summary = inspect_checkpoint(ckpt)
    assert summary.ranks == 2 and summary.writer == "dcpio"
    weight = next(i for i in summary.items if i.name == "model.0.weight")
    assert weight.shape == [8192, 512] and weight.chunks == 2  # Shard(0) over 2 ranks
    assert verify_checkpoint(ckpt).ok
    # what stock torch saved from the same ranks holds the same values
    assert main(["diff", str(ckpt), str(where / "torch_ckpt")]) == EXIT_OK
    # shards from 2 ranks become full tensors in HF files
    assert main(["convert", str(ckpt), str(where / "hf"), "--to", "hf", "--max-shard-size", "40MB"]) == EXIT_OK
    report = diff_checkpoints(ckpt, where / "hf")
    assert {e.status for e in report.entries} == {"equal", "only-a"}
    assert {e.name for e in report.entries if e.status == "equal"} == {
        i.name for i in summary.items if i.kind == "tensor"
    }


# ------------------------------------------------------------------------------------------------- fsspec URLs
def test_fsspec_url_inspect_verify_diff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import fsspec

    url = f"memory://cli-test-{os.getpid()}-{tmp_path.name}"
    sd = {"w": torch.randn(40, 40), "n": 3, "layers": [torch.arange(5)]}
    try:
        dcp.save(sd, storage_writer=dcpio.FsspecWriter(url), no_dist=True)
        assert main(["inspect", "--json", url]) == EXIT_OK
        doc = json.loads(capsys.readouterr().out)
        assert doc["writer"] == "dcpio" and {i["name"] for i in doc["items"]} == {"w", "n", "layers.0"}
        assert main(["verify", url]) == EXIT_OK
        local = _save(sd, tmp_path / "local")
        assert main(["diff", url, str(local)]) == EXIT_OK
        capsys.readouterr()

        fs, root = fsspec.core.url_to_fs(url)
        info = _storage_info_url(url, "w")
        blob = bytearray(fs.cat(f"{root}/{info.relative_path}"))
        blob[info.offset + info.length // 2] ^= 0xFF
        fs.pipe(f"{root}/{info.relative_path}", bytes(blob))
        assert main(["verify", url]) == EXIT_PROBLEM
        out = capsys.readouterr().out
        assert info.relative_path in out and "[w]" in out
        assert main(["diff", url, str(local)]) == EXIT_PROBLEM
    finally:
        fs, root = fsspec.core.url_to_fs(url)
        if fs.exists(root):
            fs.rm(root, recursive=True)


def _storage_info_url(url: str, fqn: str) -> Any:
    md = dcpio.FsspecReader(url).read_metadata()
    (info,) = [i for idx, i in md.storage_data.items() if idx.fqn == fqn]
    return info


@pytest.mark.s3
def test_s3_url_subprocess_with_storage_options(s3: S3Endpoint, tmp_path: Path) -> None:  # noqa: F811
    # a real S3 API (moto on 127.0.0.1, authentication on): the CLI reaches it only through -o options
    url = s3.url("ckpt")
    sd = {"w": torch.randn(64, 64), "step": 7}
    dcp.save(sd, storage_writer=dcpio.FsspecWriter(url, **s3.storage_options), no_dist=True)
    opts = [f"-o{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in s3.storage_options.items()]
    proc = _run(["verify", url, *opts])
    assert proc.returncode == EXIT_OK, proc.stdout + proc.stderr
    assert proc.stdout.startswith("OK") and "checksums verified" in proc.stdout
    pt = tmp_path / "from_s3.pt"
    proc = _run(["convert", url, str(pt), "--to", "torch", *opts])
    assert proc.returncode == EXIT_OK, proc.stderr
    assert bitwise_equal(torch.load(pt, weights_only=True)["w"], sd["w"])
    # without keys (none in the environment either), or with wrong ones: an environment error (exit 2) in one line
    no_keys = {
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
    }
    endpoint = f"-oclient_kwargs={json.dumps(s3.storage_options['client_kwargs'])}"
    for extra in ([], ["-okey=wrong", "-osecret=wrong"]):
        proc = _run(["inspect", url, endpoint, *extra], env=no_keys)
        assert proc.returncode == EXIT_USAGE, proc.stderr
        assert proc.stderr.startswith("dcpio: error: ") and "Traceback" not in proc.stderr
        assert "hint: pass credentials with -o key=... -o secret=..." in proc.stderr
