"""Worker processes of the benchmark: gloo ranks for resharding, a fresh process for peak memory.

Run as ``python -m dcpio_bench.workers '<json job>'`` by :mod:`dcpio_bench.bench` only; the job names its ``mode``
(``reshard-save``, ``reshard-load`` or ``peak``) and an ``out`` path where the worker writes its JSON result.
Ranks read ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` from the environment.

Resharding tensors hold ``(tensor_id * 7919 + flat_index) % 65521`` so that any rank can compute the exact
values of any slice without holding the whole tensor: the load side checks its shards bit for bit.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from typing import Any

import torch

from dcpio_bench.bench import (
    STEP_VALUE,
    TensorSpec,
    build_state_dict,
    make_reader,
    make_writer,
    workload_specs,
)

__all__ = ["expected_block", "main", "read_proc_io"]


def read_proc_io() -> dict[str, int]:
    """This process's ``/proc/self/io`` counters (``rchar``, ``read_bytes``, ``syscr`` ...)."""
    counters: dict[str, int] = {}
    with open("/proc/self/io", encoding="ascii") as stream:
        for line in stream:
            key, _, value = line.partition(":")
            counters[key.strip()] = int(value)
    return counters


def expected_block(tid: int, spec: TensorSpec, rows: tuple[int, int], cols: tuple[int, int] | None) -> torch.Tensor:
    """Exact values of ``spec[r0:r1, c0:c1]`` (or ``spec[r0:r1]`` for vectors)."""
    r = torch.arange(rows[0], rows[1], dtype=torch.int64)
    if len(spec.shape) == 1:
        flat = r
    else:
        assert cols is not None  # internal invariant of this module, not input validation
        c = torch.arange(cols[0], cols[1], dtype=torch.int64)
        flat = r[:, None] * spec.shape[1] + c[None, :]
    return ((flat + tid * 7919) % 65521).to(torch.float32)


def _init() -> tuple[int, int, Any]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        rank=rank,
        world_size=world,
    )
    return rank, world, init_device_mesh("cpu", (world,))


def _reshard_save(job: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor, Shard

    rank, world, mesh = _init()
    specs = workload_specs(job["size"])
    state: dict[str, Any] = {}
    for tid, spec in enumerate(specs):
        rows = spec.shape[0] // world
        cols = (0, spec.shape[1]) if len(spec.shape) == 2 else None
        local = expected_block(tid, spec, (rank * rows, (rank + 1) * rows), cols)
        state[spec.name] = DTensor.from_local(
            local,
            mesh,
            [Shard(0)],
            run_check=False,
            shape=torch.Size(spec.shape),
            stride=_strides(spec.shape),
        )
    state["step"] = STEP_VALUE
    seconds: dict[str, float] = {}
    for system in job["systems"]:
        dist.barrier()
        start = time.perf_counter()
        dcp.save(state, storage_writer=make_writer(system, job["paths"][system]))
        seconds[system] = time.perf_counter() - start
    dist.barrier()
    dist.destroy_process_group()
    return {"rank": rank, "save_seconds": seconds}


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[1], 1) if len(shape) == 2 else (1,)


def _reshard_load(job: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor, Replicate, Shard

    rank, world, mesh = _init()
    specs = workload_specs(job["size"])
    systems: list[str] = job.get("load_systems", job["systems"])
    targets: dict[str, dict[str, Any]] = {}
    needed = 0
    for system in systems:
        target: dict[str, Any] = {}
        for spec in specs:
            if len(spec.shape) == 2:
                cols = spec.shape[1] // world
                local = torch.zeros(spec.shape[0], cols)
                placement: Any = Shard(1)
            else:
                local = torch.zeros(spec.shape)
                placement = Replicate()
            target[spec.name] = DTensor.from_local(
                local,
                mesh,
                [placement],
                run_check=False,
                shape=torch.Size(spec.shape),
                stride=_strides(spec.shape),
            )
        target["step"] = 0
        targets[system] = target
    needed = sum(t.to_local().numel() * 4 for t in targets[systems[0]].values() if isinstance(t, DTensor))
    rounds: list[dict[str, dict[str, float]]] = []
    verified: dict[str, bool] = {}
    for r in range(job["rounds"]):
        k = r % len(systems)
        per_round: dict[str, dict[str, float]] = {}
        for system in systems[k:] + systems[:k]:
            dist.barrier()
            reader = make_reader(system, job["paths"][system])
            before = read_proc_io()
            start = time.perf_counter()
            dcp.load(targets[system], storage_reader=reader)
            seconds = time.perf_counter() - start
            after = read_proc_io()
            # bytes dcpio copied or hashed out of memory-mapped files, which rchar cannot see (0 for torch's reader)
            stats = getattr(reader, "stats", None)
            mapped = int(getattr(stats, "bytes_mapped", 0))
            per_round[system] = {
                "seconds": seconds,
                # every byte taken from the checkpoint: read calls plus what was copied or hashed out of maps
                "rchar": after["rchar"] - before["rchar"] + mapped,
                "mapped": mapped,
                "read_bytes": after["read_bytes"] - before["read_bytes"],
                "syscr": after["syscr"] - before["syscr"],
            }
            if r == 0:
                verified[system] = _verify(targets[system], specs, rank, world)
        rounds.append(per_round)
    dist.barrier()
    dist.destroy_process_group()
    return {"rank": rank, "needed_bytes": needed, "rounds": rounds, "verified": verified}


def _verify(target: dict[str, Any], specs: list[TensorSpec], rank: int, world: int) -> bool:
    if target["step"] != STEP_VALUE:
        return False
    for tid, spec in enumerate(specs):
        local = target[spec.name].to_local()
        if len(spec.shape) == 2:
            cols = spec.shape[1] // world
            want = expected_block(tid, spec, (0, spec.shape[0]), (rank * cols, (rank + 1) * cols))
        else:
            want = expected_block(tid, spec, (0, spec.shape[0]), None)
        if not torch.equal(local.view(torch.uint8), want.view(torch.uint8)):
            return False
    return True


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as stream:
        for line in stream:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak(job: dict[str, Any]) -> dict[str, Any]:
    import gc

    import torch.distributed.checkpoint as dcp

    state = build_state_dict(workload_specs(job["size"]))
    state_bytes = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    writer = make_writer(job["system"], job["path"])
    gc.collect()
    # Writing 5 to clear_refs resets VmHWM to the current RSS, so VmHWM after the save is the save's own peak.
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as stream:
            stream.write("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    before = _status_kib("VmRSS")
    dcp.save(state, storage_writer=writer)
    peak = _status_kib("VmHWM")
    return {
        "state_bytes": state_bytes,
        "rss_before": before,
        "peak_rss": peak,
        "overhead": peak - before,
        "hwm_reset": hwm_reset,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the job given as a JSON argument and write its result to ``job["out"]``."""
    args = sys.argv[1:] if argv is None else argv
    job = json.loads(args[0])
    warnings.simplefilter("ignore")
    modes = {"reshard-save": _reshard_save, "reshard-load": _reshard_load, "peak": _peak}
    result = modes[job["mode"]](job)
    with open(job["out"], "w", encoding="utf-8") as stream:
        json.dump(result, stream)
    return 0


if __name__ == "__main__":
    sys.exit(main())
