"""dcpio at scale: metadata read once, replicated bytes read once, async saves within a staging budget.

Standalone (not imported by dcpio). Launches ``--ranks`` gloo ranks on this machine (default 4) and prints one table:

* **metadata**: ``.metadata`` bytes read from storage across all ranks per load (dcpio: 1x the file; stock: Nx).
* **replicated load** (every rank loads every tensor): bytes read across all ranks (as a multiple of the data files)
  and wall time, for stock torch, dcpio with ``replicated_reads=False`` and dcpio with it on; from local disk with a
  cold page cache (``posix_fadvise(DONTNEED)`` on every file first) and from a moto S3 server.
* **sharded load** (``Shard(0)`` DTensors saved and loaded on the same ranks): dcpio on vs off (nothing is shared,
  so the two must take the same time).
* **async save** with ``staging_budget`` a quarter of each rank's part: peak extra memory (``VmHWM`` after
  ``clear_refs``), time ``async_save`` blocks, and time to the end of the save, against an unbounded async save.

Bytes are counted by wrapping each reader's file system (dcpio: read handles plus the bytes taken from memory maps;
torch: its streams), so socket traffic between ranks is not counted as storage reads.

Usage::

    python benchmarks/scale.py                         # 4 ranks, 1 GiB, 3 rounds, S3 at 256 MiB
    python benchmarks/scale.py --size 256MiB --rounds 1 --s3-size 64MiB
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def _parse_size(text: str) -> int:
    units = {"gib": 1 << 30, "mib": 1 << 20, "gb": 10**9, "mb": 10**6, "kib": 1 << 10}
    low = text.strip().lower()
    for suffix, mult in units.items():
        if low.endswith(suffix):
            return int(float(low[: -len(suffix)]) * mult)
    return int(low)


# ================================================================================================ counting readers
class _CountingStream:
    """A torch reader's stream that adds what it reads to a counter."""

    def __init__(self, inner: Any, counts: dict[str, int], name: str) -> None:
        self._inner, self._counts, self._name = inner, counts, name

    def _add(self, n: int | None) -> None:
        self._counts[self._name] = self._counts.get(self._name, 0) + (n or 0)

    def read(self, *args: Any) -> bytes:
        data = self._inner.read(*args)
        self._add(len(data))
        return data

    def readline(self, *args: Any) -> bytes:
        data = self._inner.readline(*args)
        self._add(len(data))
        return data

    def readinto(self, buf: Any) -> int:
        n = self._inner.readinto(buf)
        self._add(n)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _count_torch_reader(reader: Any, counts: dict[str, int]) -> None:
    create = reader.fs.create_stream

    @contextlib.contextmanager
    def counting(path: Any, mode: str) -> Iterator[Any]:
        with create(path, mode) as stream:
            yield _CountingStream(stream, counts, str(path).rstrip("/").rsplit("/", 1)[-1])

    reader.fs.create_stream = counting


class _CountingHandle:
    """A dcpio read handle that adds the bytes its reads return to a counter (memory maps: see ``_mapped``)."""

    def __init__(self, inner: Any, add: Callable[[int], None]) -> None:
        self._inner, self._add = inner, add
        self.path = inner.path  # capabilities(), mapped() and the rest come from the inner handle

    def readinto(self, offset: int, buf: memoryview) -> None:
        self._inner.readinto(offset, buf)
        self._add(len(buf))

    def readinto_many(self, offset: int, buffers: Any) -> None:
        self._inner.readinto_many(offset, buffers)
        self._add(sum(len(b) for b in buffers))

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        self.readinto(offset, memoryview(out))
        return bytes(out)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _count_dcpio_reader(reader: Any, counts: dict[str, int]) -> None:
    """Count what dcpio's reader takes from storage: local reads as returned, object-store GETs as fetched."""
    open_reader, read_file = reader.fs.open_reader, reader.fs.read_file
    inside_read_file = [False]

    def adder(name: str) -> Callable[[int], None]:
        def add(n: int) -> None:
            if not inside_read_file[0]:
                counts[name] = counts.get(name, 0) + n

        return add

    def counting_open(path: Any) -> Any:
        handle = open_reader(path)
        add = adder(str(path).rstrip("/").rsplit("/", 1)[-1])
        get = getattr(handle, "_get", None)
        if get is None:
            return _CountingHandle(handle, add)

        def counted_get(offset: int, want: int) -> bytes:
            data = get(offset, want)
            add(len(data))
            return bytes(data)

        handle._get = counted_get
        return handle

    def counting_read_file(path: Any, limit: int) -> bytes:
        inside_read_file[0] = True
        try:
            data = read_file(path, limit)
        finally:
            inside_read_file[0] = False
        name = str(path).rstrip("/").rsplit("/", 1)[-1]
        counts[name] = counts.get(name, 0) + len(data)
        return bytes(data)

    reader.fs.open_reader, reader.fs.read_file = counting_open, counting_read_file


# ================================================================================================ state dicts
def _replicated_state(size: int) -> dict[str, Any]:
    """Transformer-shaped fp32 tensors summing to about ``size`` bytes, the same on every rank, and a step."""
    import torch

    h = max(64, int((size / 4 / 22) ** 0.5) // 16 * 16)  # 4 layers of [4h, h] + [h, 4h] + 2 x [h, h] + vectors
    gen = torch.Generator().manual_seed(0)
    sd: dict[str, Any] = {"step": 1000}
    layers = max(1, round(size / (4 * (10 * h * h + 4 * h))))
    for i in range(layers):
        sd[f"layers.{i}.up"] = torch.rand(4 * h, h, generator=gen)
        sd[f"layers.{i}.down"] = torch.rand(h, 4 * h, generator=gen)
        sd[f"layers.{i}.q"] = torch.rand(h, h, generator=gen)
        sd[f"layers.{i}.o"] = torch.rand(h, h, generator=gen)
        for v in ("ln1", "ln2", "b1", "b2"):
            sd[f"layers.{i}.{v}"] = torch.rand(h, generator=gen)
    return sd


def _template(sd: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {k: (torch.empty_like(v) if isinstance(v, torch.Tensor) else None) for k, v in sd.items()}


# ================================================================================================ rank side
def _drop_cache(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _timed_load(make_reader: Callable[[], Any], system: str, cold: Path | None, template: Callable[[], Any]) -> dict:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    reader = make_reader()
    counts: dict[str, int] = {}
    (_count_torch_reader if system == "stock" else _count_dcpio_reader)(reader, counts)
    dest = template()
    if cold is not None and dist.get_rank() == 0:
        _drop_cache(cold)
    dist.barrier()
    t0 = time.perf_counter()
    dcp.load(dest, storage_reader=reader)
    dist.barrier()
    seconds = time.perf_counter() - t0
    # plus the bytes dcpio took out of memory-mapped files, which the counting wrappers do not see
    mapped = int(getattr(getattr(reader, "stats", None), "bytes_mapped", 0))
    data = sum(n for name, n in counts.items() if name != ".metadata") + mapped
    return {"seconds": seconds, "metadata": counts.get(".metadata", 0), "data": data}


def _gather(value: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _load_rounds(
    rounds: int, systems: dict[str, Callable[[], Any]], cold: Path | None, template: Callable[[], Any]
) -> dict[str, Any]:
    results: dict[str, list[list[dict]]] = {s: [] for s in systems}
    names = list(systems)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate: no system always first
            results[name].append(_gather(_timed_load(systems[name], name.split()[0], cold, template)))
    return results


def _replicated_case(root: Path, size: int, rounds: int, s3: dict[str, Any] | None) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader as TorchReader

    import dcpio

    sd = _replicated_state(size)
    ck = root / "replicated"
    dcp.save(sd, storage_writer=dcpio.FileSystemWriter(ck))
    systems = {
        "stock": lambda: TorchReader(ck),
        "dcpio off": lambda: dcpio.FileSystemReader(ck, replicated_reads=False),
        "dcpio on": lambda: dcpio.FileSystemReader(ck, replicated_reads=True),
    }
    out = {"disk": _load_rounds(rounds, systems, ck, lambda: _template(sd))}
    if s3 is not None:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader as TorchFsspecReader

        s3_sd = _replicated_state(s3["size"])
        url = s3["url"] + "/replicated"
        opts = s3["options"]
        dcp.save(s3_sd, storage_writer=dcpio.FsspecWriter(url, **opts))
        s3_systems = {
            "stock": lambda: TorchFsspecReader(url, **opts),
            "dcpio off": lambda: dcpio.FsspecReader(url, replicated_reads=False, **opts),
            "dcpio on": lambda: dcpio.FsspecReader(url, replicated_reads=True, **opts),
        }
        out["s3"] = _load_rounds(rounds, s3_systems, None, lambda: _template(s3_sd))
    return out


def _sharded_case(root: Path, size: int, rounds: int) -> dict[str, Any]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import dcpio

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = {k: v for k, v in _replicated_state(size).items() if k != "step"}

    def sharded(zero: bool) -> dict[str, Any]:
        import torch

        return {
            k: distribute_tensor(torch.zeros_like(v) if zero else v, mesh, [Shard(0)], src_data_rank=None)
            for k, v in full.items()
        }

    ck = root / "sharded"
    dcp.save(sharded(False), storage_writer=dcpio.FileSystemWriter(ck))
    systems = {
        "dcpio off": lambda: dcpio.FileSystemReader(ck, replicated_reads=False),
        "dcpio on": lambda: dcpio.FileSystemReader(ck, replicated_reads=True),
    }
    return _load_rounds(rounds, systems, ck, lambda: sharded(True))


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _async_case(root: Path, size: int, rounds: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import dcpio

    rank, world = dist.get_rank(), dist.get_world_size()
    part = size // world
    gen = torch.Generator().manual_seed(rank)
    n = max(4, part // (16 * MIB))
    sd = {f"r{rank}.t{i}": torch.rand(part // n // 4, generator=gen) for i in range(n)}
    budget = part // 4
    out: dict[str, list[dict[str, float]]] = {"unbounded": [], "budget": []}
    for r in range(rounds):
        for mode in ("unbounded", "budget") if r % 2 == 0 else ("budget", "unbounded"):
            writer = dcpio.FileSystemWriter(root / f"async_{mode}", staging_budget=budget if mode == "budget" else None)
            gc.collect()
            dist.barrier()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = _status("VmRSS")
            t0 = time.perf_counter()
            future = dcp.async_save(sd, storage_writer=writer)
            blocked = time.perf_counter() - t0
            future.result()
            total = time.perf_counter() - t0
            peak = _status("VmHWM") - base
            del future, writer
            out[mode].append({"blocked": blocked, "total": total, "peak": peak, "budget": budget, "part": part})
            dist.barrier()
    return {mode: _gather(samples) for mode, samples in out.items()}


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{args.port}",
        rank=int(os.environ["RANK"]),
        world_size=args.ranks,
        timeout=datetime.timedelta(minutes=20),
    )
    root = Path(args.dir)
    s3 = json.loads(args.s3) if args.s3 else None
    result: dict[str, Any] = {}
    cases = args.cases.split(",")
    if "replicated" in cases:
        result["replicated"] = _replicated_case(root, args.size, args.rounds, s3)
    if "sharded" in cases:
        result["sharded"] = _sharded_case(root, args.size, args.rounds)
    if "async" in cases:
        result["async"] = _async_case(root, args.size, args.rounds)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# ================================================================================================ parent side
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(args: argparse.Namespace, work: Path, s3: dict[str, Any] | None) -> dict[str, Any]:
    out = work / "result.json"
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(REPO / "src"))
    procs = []
    for rank in range(args.ranks):
        cmd = [
            sys.executable, __file__, "--worker", "--port", str(port), "--ranks", str(args.ranks),
            "--size", str(args.size), "--rounds", str(args.rounds), "--dir", str(work), "--out", str(out),
            "--cases", args.cases, "--s3", json.dumps(s3) if s3 else "",
        ]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=dict(env, RANK=str(rank))))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a rank failed: exit codes {codes}")
    return dict(json.loads(out.read_text()))


def _sum_over_ranks(samples: list[list[dict]], field: str) -> float:
    return statistics.median(sum(r[field] for r in ranks) for ranks in samples)


def _seconds(samples: list[list[dict]]) -> float:
    return statistics.median(ranks[0]["seconds"] for ranks in samples)


def _load_rows(title: str, results: dict[str, Any], md_size: int, data_size: int, ranks: int) -> list[str]:
    rows = [f"{title}: .metadata {md_size} B, data files {data_size / MIB:.1f} MiB, {ranks} ranks"]
    rows.append(
        f"  {'system':<10} {'metadata read':>16} {'data read':>14} {'seconds':>9} {'vs stock':>9} {'vs off':>7}"
    )
    stock = _seconds(results["stock"]) if "stock" in results else None
    off = _seconds(results["dcpio off"]) if "dcpio off" in results else None
    for name, samples in results.items():
        secs = _seconds(samples)
        md = _sum_over_ranks(samples, "metadata") / md_size
        data = _sum_over_ranks(samples, "data") / data_size
        vs_stock = f"{secs / stock:.2f}" if stock else "-"
        vs_off = f"{secs / off:.2f}" if off else "-"
        rows.append(f"  {name:<10} {md:>15.2f}x {data:>13.2f}x {secs:>9.3f} {vs_stock:>9} {vs_off:>7}")
    per_rank = [r["data"] / MIB for r in results[list(results)[-1]][-1]]
    rows.append(f"  {list(results)[-1]}: MiB read per rank (last round): {', '.join(f'{x:.1f}' for x in per_rank)}")
    return rows


def _dir_sizes(root: Path) -> tuple[int, int]:
    md = (root / ".metadata").stat().st_size
    data = sum(p.stat().st_size for p in root.iterdir() if p.name.endswith(".distcp"))
    return md, data


def _async_rows(results: dict[str, Any]) -> list[str]:
    rows = ["async save (each rank its own part; budget = a quarter of the part)"]
    rows.append(f"  {'mode':<10} {'peak extra MiB (max rank)':>26} {'blocked s':>10} {'total s':>9}")
    for mode, per_rank in results.items():
        peak = max(max(s["peak"] for s in samples) for samples in per_rank) / MIB
        blocked = statistics.median(max(s["blocked"] for s in rounds) for rounds in zip(*per_rank))
        total = statistics.median(max(s["total"] for s in rounds) for rounds in zip(*per_rank))
        rows.append(f"  {mode:<10} {peak:>26.1f} {blocked:>10.3f} {total:>9.3f}")
    sample = results["budget"][0][0]
    part, budget = sample["part"] / MIB, sample["budget"] / MIB
    rows.append(f"  part {part:.0f} MiB per rank, budget {budget:.0f} MiB (bar: peak <= budget + 64 MiB)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--size", type=_parse_size, default=1 << 30)
    parser.add_argument("--s3-size", type=_parse_size, default=256 * MIB)
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", default="replicated,sharded,async")
    parser.add_argument("--dir", default=None, help="local scratch directory (default: a temporary one)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--s3", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.dir, prefix="dcpio-scale-")))
        s3 = None
        if not args.no_s3 and "replicated" in args.cases:
            sys.path.insert(0, str(REPO / "tests"))
            from s3_server import MotoServer

            server = stack.enter_context(MotoServer())
            ep = server.new_bucket()
            s3 = {"url": ep.url(), "options": ep.storage_options, "size": args.s3_size}
        t0 = time.perf_counter()
        result = _launch(args, work, s3)
        rows = [f"dcpio scale bench: {args.ranks} gloo ranks, {args.size / MIB:.0f} MiB, {args.rounds} round(s), "
                f"medians; {time.perf_counter() - t0:.0f} s"]  # fmt: skip
        if "replicated" in result:
            md, data = _dir_sizes(work / "replicated")
            rows += _load_rows(
                "replicated load, local disk, cold page cache", result["replicated"]["disk"], md, data, args.ranks
            )
            if "s3" in result["replicated"]:
                sizes = _s3_sizes(s3)
                rows += _load_rows("replicated load, moto S3", result["replicated"]["s3"], *sizes, args.ranks)
        if "sharded" in result:
            md, data = _dir_sizes(work / "sharded")
            rows += _load_rows(
                "sharded load (Shard(0), same ranks), cold page cache", result["sharded"], md, data, args.ranks
            )
        if "async" in result:
            rows += _async_rows(result["async"])
        print("\n".join(rows))


def _s3_sizes(s3: dict[str, Any] | None) -> tuple[int, int]:
    import fsspec

    assert s3 is not None
    fs = fsspec.filesystem("s3", **s3["options"])
    root = s3["url"].removeprefix("s3://") + "/replicated"
    entries = fs.ls(root, detail=True)
    md = sum(e["size"] for e in entries if e["name"].endswith("/.metadata"))
    data = sum(e["size"] for e in entries if e["name"].endswith(".distcp"))
    return md, data


if __name__ == "__main__":
    main()
