"""The benchmark (``benchmarks/dcpio_bench``) runs end to end at a tiny size and reports the structure the README
relies on.

Opt-in: these tests carry the ``bench`` marker, which the default run deselects (``pytest -m bench`` runs them).
No timing assertions: only that each case ran, produced one sample per round for each system it compares, verified
its loads bit for bit, and that the bars and the table are there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from dcpio_bench import bench

pytestmark = pytest.mark.bench


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(["--dir", str(tmp_path), "--size", "2MiB", "--rounds", "1", "--no-shm", *extra])


def _run_json(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, Any]:
    rc = bench.run_bench(_args(tmp_path, "--json", *extra))
    assert rc == 0
    return json.loads(capsys.readouterr().out)


def test_parse_size() -> None:
    assert bench.parse_size("1GiB") == 1 << 30
    assert bench.parse_size("64MiB") == 64 << 20
    assert bench.parse_size("500MB") == 500_000_000
    assert bench.parse_size("4096") == 4096
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_size("lots")
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_size("0")


def test_workload_shape() -> None:
    specs = bench.workload_specs(64 << 20)
    shapes = [s.shape for s in specs]
    assert len(specs) == 16 + 64 + 300
    assert len({s.name for s in specs}) == len(specs)
    h = shapes[-1][0]
    assert h % 16 == 0
    assert shapes[:16] == [(4 * h, h)] * 16
    assert shapes[16:80] == [(h, h)] * 64
    assert shapes[80:] == [(h,)] * 300
    total = sum(s.nbytes for s in specs)
    assert 0.8 * (64 << 20) < total < 1.2 * (64 << 20)
    state = bench.build_state_dict(specs[:3])
    assert state["step"] == bench.STEP_VALUE
    assert set(state) == {s.name for s in specs[:3]} | {"step"}


def test_raw_round_trip(tmp_path: Path) -> None:
    state = bench.build_state_dict(bench.workload_specs(1 << 20))
    path = str(tmp_path / "raw.bin")
    written = bench.raw_save(state, path, sync=True)
    targets = bench._empty_targets(state)
    read = bench.raw_load(targets, path)
    assert read == bench._state_nbytes(state)
    assert written > read  # the pickled step follows the tensor bytes
    assert bench._same(state, targets)
    targets[next(iter(targets))].view(-1)[0] += 1
    assert not bench._same(state, targets)


def test_save_load_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = _run_json(tmp_path, capsys, "--cases", "save,load")
    assert result["config"]["rounds"] == 1
    assert result["config"]["shm"] is False
    machine = result["machine"]
    assert machine["cpu_count"] >= 1
    assert machine["torch"]
    assert any(fs["fstype"] for fs in machine["filesystems"].values())
    assert set(result["cases"]) == {"save/disk", "load/disk"}
    have_dcpio = bench.dcpio_attr("FileSystemWriter") is not None
    systems = ["torch", "raw"] + (["dcpio"] if have_dcpio else [])
    for name in ("save/disk", "load/disk"):
        case = result["cases"][name]
        assert case["errors"] == []
        for system in systems:
            fig = case["figures"][system]
            assert fig["unit"] == "GB/s"
            assert len(fig["samples"]) == (1 if name.startswith("save") else bench.QUICK_REPEATS)
            assert fig["median"] > 0 and math.isfinite(fig["median"])
        assert "torch/raw" in case["ratios"]
        assert ("dcpio/raw" in case["ratios"]) == have_dcpio
    load = result["cases"]["load/disk"]
    for system in systems:
        assert load["info"][f"{system}_verified_bit_exact"] is True
    bars = {b["bar"]: b for b in result["bars"]}
    assert {b["case"] for b in result["bars"]} == {"save/disk", "load/disk"}
    expected_status = {"PASS", "FAIL"} if have_dcpio else {"n/a"}
    for bar in bars.values():
        assert bar["status"] in expected_status
    # Nothing is left behind in --dir.
    assert list(tmp_path.iterdir()) == []


def test_table_and_async_peak(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = bench.run_bench(_args(tmp_path, "--cases", "async,peak", "--json-out", str(tmp_path / "out.json")))
    assert rc == 0
    table = capsys.readouterr().out
    assert "machine:" in table
    assert "[async]" in table and "[peak]" in table
    assert "bars (issue 3" in table
    result = json.loads((tmp_path / "out.json").read_text())
    asyncs = result["cases"]["async"]
    assert len(asyncs["figures"]["clone (memcpy)"]["samples"]) == bench.QUICK_REPEATS
    assert len(asyncs["figures"]["torch"]["samples"]) == bench.QUICK_REPEATS
    assert "torch/clone (memcpy)" in asyncs["ratios"]
    assert asyncs["errors"] == [e for e in asyncs["errors"] if e.startswith("torch ")]  # torch's cached mode needs CUDA
    assert len(asyncs["figures"][bench.NESTED]["samples"]) == bench.QUICK_REPEATS
    assert f"{bench.NESTED}/copy_ into preallocated" in asyncs["ratios"]
    # the cached bar holds dcpio's cached staging to a copy_ into warm memory, not to a clone that also allocates
    cached_bar = next(b for b in result["bars"] if b["bar"].startswith("async_save blocking, cached"))
    assert cached_bar["value"] == asyncs["ratios"]["dcpio cached/copy_ into preallocated"]["median"]
    peak = result["cases"]["peak"]
    assert peak["errors"] == []
    assert peak["figures"]["torch overhead"]["unit"] == "MiB"
    assert peak["figures"]["torch peak RSS"]["median"] > 0
    assert peak["info"]["state_dict_bytes"] > 0
    bar_names = {b["bar"] for b in result["bars"]}
    assert any("async_save" in n for n in bar_names)
    assert any("peak memory" in n for n in bar_names)


def test_bad_case_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.run_bench(_args(tmp_path, "--cases", "save,nonsense")) == 2
    assert "nonsense" in capsys.readouterr().err


@pytest.mark.slow
def test_reshard_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = _run_json(tmp_path, capsys, "--cases", "reshard")
    for name in ("reshard/2to2", "reshard/4to2"):
        case = result["cases"][name]
        assert case["errors"] == []
        assert case["info"]["torch_verified_bit_exact"] is True
        assert len(case["figures"]["torch seconds"]["samples"]) == 1
        # Stock torch reads whole saved chunks: a column shard of row-sharded chunks costs more than needed.
        assert case["figures"]["torch read/needed"]["median"] > 1.5
        if bench.dcpio_attr("FileSystemReader") is not None:
            assert case["info"]["dcpio_verified_bit_exact"] is True
            assert "speedup torch/dcpio" in case["ratios"]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity (Linux)")
def test_even_free_pages_touches_memory_on_every_cpu_and_leaves_the_caller_alone() -> None:
    mine = os.sched_getaffinity(0)
    assert bench.even_free_pages(0) == []
    ran_on = bench.even_free_pages(1 << 20)
    assert ran_on == [({cpu}, 1 << 20) for cpu in sorted(mine)]  # one thread pinned to each CPU this process may use
    assert os.sched_getaffinity(0) == mine
    # a size no machine has is cut to a quarter of the available memory over all threads, not attempted
    huge = bench.even_free_pages(1 << 50)
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    total = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemTotal:"))
    assert 0 < sum(n for _, n in huge) <= total // 4
