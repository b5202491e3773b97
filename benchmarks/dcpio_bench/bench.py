"""The dcpio benchmark: dcpio against stock torch DCP and raw I/O, measured side by side in one run.

Every case alternates the systems it compares inside each round (the order rotates from round to round so
that no system always runs first or last) and reports the median of the rounds, with the spread
``(max - min) / median`` so that a reader can tell a real difference from noise. Ratios are the median of the
per-round ratios: each round's figures are taken back to back, which cancels slow drift of the machine (other
jobs, page-cache pressure).

Cases (``--cases``):

- ``save``: ``dcp.save`` with ``dcpio.FileSystemWriter`` / torch's ``FileSystemWriter`` (default options,
  so both fsync) against raw ``os.write`` of the same bytes into one file plus ``fsync``; on ``/dev/shm`` and
  on ``--dir``.
- ``load``: ``dcp.load`` into preallocated tensors with each reader's default options (dcpio verifies
  checksums) against raw ``readinto`` of one file into the same preallocated tensors; page cache warmed first.
  Each round times three loads per system (``QUICK_REPEATS``), alternating.
- ``reshard``: real gloo processes on 127.0.0.1: 2 ranks save ``Shard(0)`` and 2 ranks load ``Shard(1)``; then
  4 ranks to 2. Bytes read per rank come from ``/proc/self/io`` ``rchar`` deltas around ``dcp.load`` inside
  each rank.
- ``async``: time until ``dcp.async_save`` returns, against one ``clone()`` of the state dict; again with
  ``cache_staged_state_dict=True`` from the second save on, against a ``copy_`` into preallocated tensors.
  Three timings of each per round (``QUICK_REPEATS``).
- ``peak``: peak RSS of a fresh subprocess during ``dcp.save`` of the state dict, over its RSS just before it.
- ``hf``: a safetensors hub folder loaded into preallocated tensors (dcpio's and torch's HF readers against
  ``safetensors.torch.load_file`` + ``copy_``) and exported (HF writers against ``save_file`` and raw writes).
- ``s3``: dcpio's and torch's fsspec classes against a moto S3 server this bench starts on 127.0.0.1.

Run ``python benchmarks/run.py --help`` (or ``dcpio bench --help`` in a source checkout); ``benchmarks/README.md``
explains each figure.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import pickle
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dcpio._runtime import raise_first, run_queued

__all__ = [
    "ALL_CASES",
    "Bar",
    "BenchConfig",
    "CaseResult",
    "Figure",
    "TensorSpec",
    "add_arguments",
    "build_state_dict",
    "describe_machine",
    "format_report",
    "main",
    "parse_size",
    "run",
    "run_bench",
    "workload_specs",
]

ALL_CASES = ("save", "load", "reshard", "async", "peak", "hf", "s3")
QUICK_REPEATS = 3  # timed repetitions per system per round of the quick cases: loads and async_save blocking
NESTED = "dcpio cached, one top-level key"
SYSTEMS = ("dcpio", "torch", "raw")
MIB = 1 << 20
GIB = 1 << 30
STEP_VALUE = 1000
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


def _log(message: str) -> None:
    # Progress goes to stderr so that stdout carries only the table (or the JSON).
    print(f"[dcpio bench] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# Sizes and the workload
# ----------------------------------------------------------------------------------------------------

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1 << 30,
}


def parse_size(text: str) -> int:
    """Parse ``"1GiB"``, ``"64MiB"``, ``"500MB"`` or a plain byte count into bytes.

    Raises:
        argparse.ArgumentTypeError: the text is not a positive size.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 1GiB, 256MiB, 500MB or 1048576")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return value


def _fmt_bytes(n: float) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


@dataclass(frozen=True)
class TensorSpec:
    """One fp32 tensor of the workload."""

    name: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * 4


def workload_specs(size_bytes: int) -> list[TensorSpec]:
    """The transformer-shaped workload scaled to about ``size_bytes``.

    16 large matrices ``[4h, h]`` (MLP), 64 medium ``[h, h]`` (attention projections) and 300 vectors ``[h]``
    (norms, biases): ``4 * (128 h^2 + 300 h)`` bytes. ``h`` is a multiple of 16 so every tensor splits evenly
    over 2 and 4 ranks along either dimension (the resharding case needs that). The step counter is added by
    :func:`build_state_dict`.
    """
    # Solve 128 h^2 + 300 h = size / 4 for h.
    h_real = (-300 + math.sqrt(300**2 + 128 * size_bytes)) / 256
    h = max(16, round(h_real / 16) * 16)
    specs = [TensorSpec(f"layers.{i}.mlp.w_in.weight", (4 * h, h)) for i in range(16)]
    specs += [TensorSpec(f"layers.{i // 4}.attn.{'qkvo'[i % 4]}_proj.weight", (h, h)) for i in range(64)]
    specs += [TensorSpec(f"layers.{i % 16}.norm{i // 16}.weight", (h,)) for i in range(300)]
    return specs


def build_state_dict(specs: Sequence[TensorSpec], seed: int = 0) -> dict[str, Any]:
    """Random fp32 tensors for ``specs`` plus ``"step"``, an int (saved by DCP as a bytes item)."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {spec.name: torch.rand(spec.shape, generator=gen) for spec in specs}
    state["step"] = STEP_VALUE
    return state


def _tensor_items(state: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in state.items() if isinstance(v, torch.Tensor)]


def _state_nbytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for _, t in _tensor_items(state))


def _empty_targets(state: dict[str, Any]) -> dict[str, Any]:
    targets: dict[str, Any] = {k: torch.zeros_like(v) for k, v in _tensor_items(state)}
    targets["step"] = 0
    return targets


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    for key, value in a.items():
        other = b.get(key)
        if isinstance(value, torch.Tensor):
            if not isinstance(other, torch.Tensor) or not torch.equal(value.view(torch.uint8), other.view(torch.uint8)):
                return False
        elif value != other:
            return False
    return True


# ----------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------


@dataclass
class Figure:
    """One measured quantity: its samples (one per round) and unit."""

    unit: str
    samples: list[float] = field(default_factory=list)
    higher_is_better: bool = True

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def spread(self) -> float | None:
        """``(max - min) / median`` over the rounds; None with fewer than two samples."""
        med = self.median
        if len(self.samples) < 2 or not med:
            return None
        return (max(self.samples) - min(self.samples)) / abs(med)

    def to_json(self) -> dict[str, Any]:
        return {"unit": self.unit, "median": self.median, "spread": self.spread, "samples": self.samples}


@dataclass
class CaseResult:
    """What one case measured: figures by label, paired ratios, notes, and why it failed or was skipped."""

    name: str
    title: str
    figures: dict[str, Figure] = field(default_factory=dict)
    ratios: dict[str, Figure] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: str | None = None

    def figure(self, label: str, unit: str, higher_is_better: bool = True) -> Figure:
        if label not in self.figures:
            self.figures[label] = Figure(unit, higher_is_better=higher_is_better)
        return self.figures[label]

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "figures": {k: v.to_json() for k, v in self.figures.items()},
            "ratios": {k: v.to_json() for k, v in self.ratios.items()},
            "info": self.info,
            "notes": self.notes,
            "errors": self.errors,
            "skipped": self.skipped,
        }


@dataclass
class Bar:
    """One bar of issue 3 (or 5), checked against a measured value."""

    name: str
    case: str
    value: float | None
    threshold: float
    op: str  # ">=" or "<="
    detail: str = ""

    @property
    def status(self) -> str:
        if self.value is None or math.isnan(self.value):
            return "n/a"
        ok = self.value >= self.threshold if self.op == ">=" else self.value <= self.threshold
        return "PASS" if ok else "FAIL"

    def to_json(self) -> dict[str, Any]:
        return {
            "bar": self.name,
            "case": self.case,
            "value": self.value,
            "op": self.op,
            "threshold": self.threshold,
            "status": self.status,
            "detail": self.detail,
        }


def _paired_ratio(case: CaseResult, num: str, den: str) -> None:
    """Per-round ratio ``num / den`` of two figures measured in the same rounds."""
    a, b = case.figures.get(num), case.figures.get(den)
    if a is None or b is None or not a.samples or len(a.samples) != len(b.samples):
        return
    ratio = Figure("x", [x / y for x, y in zip(a.samples, b.samples) if y])
    if ratio.samples:
        case.ratios[f"{num}/{den}"] = ratio


# ----------------------------------------------------------------------------------------------------
# The systems under test
# ----------------------------------------------------------------------------------------------------


def dcpio_attr(name: str) -> Any:
    """``dcpio.<name>`` when that part of dcpio has landed, else None."""
    try:
        import dcpio
    except ImportError:  # dcpio not installed: the bench still measures torch and raw I/O
        return None
    return getattr(dcpio, name, None)


def make_writer(system: str, path: str, **kwargs: Any) -> Any:
    """A default-options ``FileSystemWriter`` of ``system`` (``"dcpio"`` or ``"torch"``)."""
    if system == "dcpio":
        cls = dcpio_attr("FileSystemWriter")
        if cls is None:
            raise RuntimeError("dcpio.FileSystemWriter is not available in this checkout")
        return cls(path, **kwargs)
    from torch.distributed.checkpoint import FileSystemWriter

    return FileSystemWriter(path, **kwargs)


def make_reader(system: str, path: str) -> Any:
    """A default-options ``FileSystemReader`` of ``system`` (dcpio's verifies checksums by default)."""
    if system in ("dcpio", "dcpio-noverify"):
        cls = dcpio_attr("FileSystemReader")
        if cls is None:
            raise RuntimeError("dcpio.FileSystemReader is not available in this checkout")
        # "dcpio-noverify" is only reported for information (what the reads cost without block checksums)
        return cls(path, verify_checksums=False) if system == "dcpio-noverify" else cls(path)
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(path)


def _byte_view(tensor: torch.Tensor) -> memoryview:
    # numpy's buffer protocol gives a zero-copy view; the uint8 reinterpretation keeps it flat and byte-sized.
    array: Any = tensor.detach().reshape(-1).view(torch.uint8).numpy()
    return memoryview(array)


def raw_save(state: dict[str, Any], path: str, sync: bool = True) -> int:
    """Write each tensor's bytes, then the pickled step, into one file with ``os.write``; fsync if asked."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    total = 0
    try:
        for _, tensor in _tensor_items(state):
            view = _byte_view(tensor)
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
            total += done
        total += os.write(fd, pickle.dumps(state.get("step")))
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return total


def raw_load(targets: dict[str, Any], path: str) -> int:
    """Read the file :func:`raw_save` wrote with ``readinto`` straight into the preallocated ``targets``."""
    total = 0
    with open(path, "rb", buffering=0) as stream:
        for _, tensor in _tensor_items(targets):
            view = _byte_view(tensor)
            done = 0
            while done < len(view):
                got = stream.readinto(view[done:])
                if not got:
                    raise EOFError(f"{path} ended after {total + done} bytes; rerun the raw save")
                done += got
            total += done
        targets["step"] = pickle.loads(stream.read())
    return total


def warm_page_cache(path: str) -> None:
    """Read every file under ``path`` once so that the timed load finds it in the page cache."""
    buf = bytearray(16 * MIB)
    files = [path] if os.path.isfile(path) else [str(p) for p in Path(path).rglob("*") if p.is_file()]
    for name in files:
        with open(name, "rb", buffering=0) as stream:
            while stream.readinto(buf):
                pass


def _rmtree(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.unlink(path)


def _rotated(items: Sequence[str], round_index: int) -> list[str]:
    k = round_index % len(items)
    return list(items[k:]) + list(items[:k])


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # DCP warns on every single-process save/load ("no process group"); the table is what matters here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------------------------------------------
# Configuration and machine description
# ----------------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """What one bench run does (built from the command line by :func:`run_bench`)."""

    dir: str
    size: int = GIB
    rounds: int = 3
    cases: tuple[str, ...] = ALL_CASES
    use_shm: bool = True
    s3_size: int = 256 * MIB
    worker_timeout: float = 900.0


def _mount_of(path: str) -> dict[str, str]:
    """The /proc/mounts entry (device, mount point, fs type) holding ``path``."""
    real = os.path.realpath(path)
    best = {"device": "?", "mountpoint": "/", "fstype": "?"}
    best_len = -1
    try:
        with open("/proc/mounts", encoding="utf-8") as stream:
            for line in stream:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) > best_len:
                    best = {"device": parts[0], "mountpoint": mount, "fstype": parts[2]}
                    best_len = len(mount)
    except OSError:
        pass
    return best


def describe_machine(dirs: Sequence[str]) -> dict[str, Any]:
    """Cores, CPU model, RAM, load average, file systems of ``dirs``, torch/python/dcpio versions."""
    cpu_model = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as stream:
        for line in stream:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_total = None
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="utf-8") as stream:
        for line in stream:
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
                break
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        commit = out.stdout.strip() or None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "mem_total_bytes": mem_total,
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "dcpio_commit": commit,
        "filesystems": {d: _mount_of(d) for d in dirs},
    }


# ----------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Device:
    key: str  # "shm" or "disk"
    root: str
    fast: bool


def _devices(cfg: BenchConfig) -> list[_Device]:
    devices = []
    if cfg.use_shm and os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        devices.append(_Device("shm", tempfile.mkdtemp(prefix="dcpio-bench-", dir="/dev/shm"), True))
    devices.append(_Device("disk", tempfile.mkdtemp(prefix="dcpio-bench-", dir=cfg.dir), False))
    return devices


def _systems_available() -> list[str]:
    have = ["torch", "raw"]
    if dcpio_attr("FileSystemWriter") is not None and dcpio_attr("FileSystemReader") is not None:
        have.insert(0, "dcpio")
    return have


def _available_memory() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` in bytes, or None where there is no such file."""
    try:
        with open("/proc/meminfo", encoding="ascii") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def even_free_pages(nbytes: int) -> list[tuple[set[int], int]]:
    """Leave about ``nbytes`` of just-freed memory on every CPU's free-page list before a timed write.

    Why: Linux keeps freed pages on per-CPU lists (``pcp``), and on a VM whose host takes back free memory a
    write that misses its CPU's list lands on pages the host has to fault in again (``benchmarks/README.md`` has
    the measurements). Deleting the previous checkpoint on the bench's main thread filled only that CPU's list, so
    single-threaded writers (raw, torch) got hot pages and dcpio's worker threads on the other CPU often did not.
    A thread pinned to each CPU touches and frees ``nbytes`` here, so every writer starts from the same state
    whichever CPU it runs on.
    Where threads cannot be pinned (no ``sched_setaffinity``), one unpinned thread does it.

    All threads together touch at most a quarter of the available memory (a 128-core machine would otherwise
    need 128 times ``nbytes``). Returns ``(CPU set the thread ran on, bytes it touched)`` per thread; empty for
    ``nbytes <= 0``. A thread's failure is raised here (with any others as notes).
    """
    if nbytes <= 0:
        return []
    setaffinity = getattr(os, "sched_setaffinity", None)
    cpus: list[int | None] = [None]
    if setaffinity is not None:
        cpus = list(sorted(os.sched_getaffinity(0))) or [None]
    available = _available_memory()
    each = nbytes if available is None else max(0, min(nbytes, available // (4 * len(cpus))))
    if each == 0:
        return []
    ran_on: list[tuple[set[int], int]] = [(set(), 0) for _ in cpus]

    def touch(i: int, cpu: int | None) -> None:
        if cpu is not None and setaffinity is not None:
            setaffinity(0, {cpu})  # 0 is the calling thread: a pool thread of run_queued, gone afterwards
        block = torch.empty(each, dtype=torch.uint8)
        block.fill_(1)
        del block
        ran_on[i] = (set(os.sched_getaffinity(0)) if setaffinity is not None else set(), each)

    tasks = [functools.partial(touch, i, cpu) for i, cpu in enumerate(cpus)]
    errors = run_queued(tasks, len(tasks), name="dcpio-bench-pages")
    if errors:
        errors[0].add_note(f"dcpio bench: touching {each} bytes on each CPU before a timed write; try a smaller --size")
    raise_first(errors)
    return ran_on


def _timed(fn: Callable[[], Any], fresh_pages: int = 0) -> float:
    """Seconds ``fn`` takes, after a collection and, for a write of ``fresh_pages`` bytes, :func:`even_free_pages`."""
    even_free_pages(fresh_pages)
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _save_one(system: str, state: dict[str, Any], path: str) -> None:
    import torch.distributed.checkpoint as dcp

    if system == "raw":
        os.makedirs(path, exist_ok=True)
        raw_save(state, os.path.join(path, "raw.bin"), sync=True)
        return
    with _quiet():
        dcp.save(state, storage_writer=make_writer(system, path))


def _save_with(state: dict[str, Any], cls: Any, path: str, kwargs: dict[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(state, storage_writer=cls(path, **kwargs))


def _load_with(targets: dict[str, Any], cls: Any, path: str, kwargs: dict[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.load(targets, storage_reader=cls(path, **kwargs))


def _load_one(system: str, targets: dict[str, Any], path: str) -> None:
    import torch.distributed.checkpoint as dcp

    if system == "raw":
        raw_load(targets, os.path.join(path, "raw.bin"))
        return
    with _quiet():
        dcp.load(targets, storage_reader=make_reader(system, path))


def _case_save_load(
    cfg: BenchConfig, state: dict[str, Any], devices: list[_Device], want_save: bool, want_load: bool
) -> list[CaseResult]:
    """Save (and then load) the workload with each system on each device, alternating within each round."""
    nbytes = _state_nbytes(state)
    systems = _systems_available()
    results: list[CaseResult] = []
    for dev in devices:
        where = f"{dev.root} ({_mount_of(dev.root)['fstype']})"
        save = CaseResult(f"save/{dev.key}", f"save, {'fast device' if dev.fast else 'disk, fsync'}: {where}")
        load = CaseResult(
            f"load/{dev.key}",
            f"load into preallocated tensors, {'fast device' if dev.fast else 'disk'}: {where}",
        )
        if "dcpio" not in systems:
            for case in (save, load):
                case.notes.append("dcpio side not measured: dcpio.FileSystemWriter/Reader not in this checkout")
        paths = {s: os.path.join(dev.root, f"ckpt-{s}") for s in systems}
        targets = _empty_targets(state) if want_load else {}
        for r in range(cfg.rounds):
            for system in _rotated(systems, r):
                _rmtree(paths[system])
                if not dev.fast:
                    os.sync()  # start each timed save with no one's dirty pages pending on the disk
                try:
                    seconds = _timed(functools.partial(_save_one, system, state, paths[system]), nbytes)
                except Exception as err:  # one system failing must not hide the others' figures
                    save.errors.append(f"round {r} {system}: {type(err).__name__}: {err}")
                    continue
                if want_save:
                    save.figure(system, "GB/s").samples.append(nbytes / seconds / 1e9)
                    rate = nbytes / seconds / 1e9
                    _log(f"save/{dev.key} round {r + 1}/{cfg.rounds} {system}: {rate:.3f} GB/s")
            if not want_load:
                continue
            # a load takes a tenth of a save: each round times QUICK_REPEATS of them per system, alternating, so the
            # medians rest on more pairs than the saves'
            for rep in range(QUICK_REPEATS):
                for system in _rotated(systems, r + rep):
                    if not os.path.exists(paths[system]):
                        continue
                    if not dev.fast:
                        warm_page_cache(paths[system])
                    first = r == 0 and rep == 0
                    if first:
                        for _, t in _tensor_items(targets):
                            t.zero_()
                        targets["step"] = 0
                    try:
                        seconds = _timed(functools.partial(_load_one, system, targets, paths[system]))
                    except Exception as err:
                        load.errors.append(f"round {r} {system}: {type(err).__name__}: {err}")
                        continue
                    if first:
                        load.info[f"{system}_verified_bit_exact"] = _same(state, targets)
                    load.figure(system, "GB/s").samples.append(nbytes / seconds / 1e9)
                    rate = nbytes / seconds / 1e9
                    _log(f"load/{dev.key} round {r + 1}/{cfg.rounds} #{rep + 1} {system}: {rate:.3f} GB/s")
        for system in systems:
            _rmtree(paths[system])
        for case in (save, load):
            _paired_ratio(case, "dcpio", "raw")
            _paired_ratio(case, "torch", "raw")
            _paired_ratio(case, "dcpio", "torch")
            case.info["bytes"] = nbytes
        if want_save:
            results.append(save)
        if want_load:
            results.append(load)
    return results


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_ranks(world: int, job: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    """Start ``world`` processes running ``job`` (see :mod:`dcpio_bench.workers`); collect their results."""
    port = _free_port()
    out_dir = tempfile.mkdtemp(prefix="dcpio-bench-ranks-")
    procs = []
    try:
        for rank in range(world):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
            # the workers import this package by name, whichever directory the bench was started from
            env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH", "")) if p)
            env["MASTER_PORT"] = str(port)
            spec = dict(job, out=os.path.join(out_dir, f"rank{rank}.json"))
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "dcpio_bench.workers", json.dumps(spec)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        outputs = []
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            outputs.append(out)
        results = []
        for rank, (proc, out) in enumerate(zip(procs, outputs)):
            if proc.returncode != 0:
                tail = "\n".join(out.strip().splitlines()[-15:])
                raise RuntimeError(f"{job['mode']} rank {rank} exited with {proc.returncode}:\n{tail}")
            with open(os.path.join(out_dir, f"rank{rank}.json"), encoding="utf-8") as stream:
                results.append(json.load(stream))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(out_dir, ignore_errors=True)


def _case_reshard(cfg: BenchConfig, root: str) -> list[CaseResult]:
    systems = [s for s in _systems_available() if s != "raw"]
    results = []
    for save_world in (2, 4):
        case = CaseResult(
            f"reshard/{save_world}to2",
            f"resharding load: {save_world} ranks saved Shard(0), 2 ranks load Shard(1) (gloo, {root})",
        )
        if "dcpio" not in systems:
            case.notes.append("dcpio side not measured: dcpio.FileSystemWriter/Reader not in this checkout")
        case.notes.append(
            "bytes read = /proc/self/io rchar delta around dcp.load in each rank (includes .metadata and "
            "gloo socket reads) plus the bytes dcpio copied or hashed out of memory-mapped data files (which rchar "
            "cannot see; the reader's stats.bytes_mapped); needed = the rank's target bytes"
        )
        paths = {s: os.path.join(root, f"reshard{save_world}-{s}") for s in systems}
        load_systems = list(systems)
        if "dcpio" in systems:
            load_systems.append("dcpio-noverify")
            case.notes.append("dcpio-noverify: dcpio's reader with verify_checksums=False (information, no bar)")
        base = {"size": cfg.size, "systems": systems, "load_systems": load_systems, "paths": paths}
        try:
            _log(f"reshard {save_world}->2: saving on {save_world} ranks")
            saved = _run_ranks(save_world, dict(base, mode="reshard-save"), cfg.worker_timeout)
            for system in systems:
                case.info[f"{system}_save_seconds"] = max(r["save_seconds"][system] for r in saved)
                warm_page_cache(paths[system])
            _log(f"reshard {save_world}->2: loading on 2 ranks, {cfg.rounds} rounds")
            load_paths = dict(paths, **{"dcpio-noverify": paths["dcpio"]} if "dcpio" in paths else {})
            job = dict(base, mode="reshard-load", rounds=cfg.rounds, paths=load_paths)
            loaded = _run_ranks(2, job, cfg.worker_timeout)
        except Exception as err:
            case.errors.append(f"{type(err).__name__}: {err}")
            results.append(case)
            for p in paths.values():
                _rmtree(p)
            continue
        for system in load_systems:
            for r in range(cfg.rounds):
                case.figure(f"{system} seconds", "s", higher_is_better=False).samples.append(
                    max(rank["rounds"][r][system]["seconds"] for rank in loaded)
                )
                case.figure(f"{system} read/needed", "x", higher_is_better=False).samples.append(
                    max(rank["rounds"][r][system]["rchar"] / rank["needed_bytes"] for rank in loaded)
                )
            case.info[f"{system}_verified_bit_exact"] = all(rank["verified"][system] for rank in loaded)
            case.info[f"{system}_bytes_read_per_rank"] = [
                statistics.median(x[system]["rchar"] for x in rank["rounds"]) for rank in loaded
            ]
            case.info[f"{system}_mapped_bytes_per_rank"] = [
                statistics.median(x[system].get("mapped", 0) for x in rank["rounds"]) for rank in loaded
            ]
            case.info[f"{system}_disk_read_bytes_per_rank"] = [
                statistics.median(x[system]["read_bytes"] for x in rank["rounds"]) for rank in loaded
            ]
        case.info["needed_bytes_per_rank"] = [rank["needed_bytes"] for rank in loaded]
        if "dcpio" in systems:
            a, b = case.figures["torch seconds"], case.figures["dcpio seconds"]
            case.ratios["speedup torch/dcpio"] = Figure("x", [x / y for x, y in zip(a.samples, b.samples)])
        for p in paths.values():
            _rmtree(p)
        results.append(case)
    return results


def _case_async(cfg: BenchConfig, state: dict[str, Any], root: str) -> CaseResult:
    import torch.distributed.checkpoint as dcp

    case = CaseResult(
        "async",
        f"dcp.async_save blocking time vs one clone() of the state dict; cached staging vs a copy_ into "
        f"preallocated tensors ({root})",
    )
    systems = [s for s in _systems_available() if s != "raw"]
    if "dcpio" not in systems:
        case.notes.append("dcpio side not measured: dcpio.FileSystemWriter not in this checkout")
    tensors = _tensor_items(state)
    nbytes = _state_nbytes(state)
    preallocated = [torch.empty_like(t) for _, t in tensors]

    def clone() -> None:
        copies = {k: t.clone() for k, t in tensors}
        del copies

    def copy_into() -> None:
        for dst, (_, src) in zip(preallocated, tensors):
            dst.copy_(src)

    # information (no bar): the same tensors under one top-level key, as training loops pass {"model": ...}; torch's
    # async_save wraps every top-level key in a logging call before staging, which a flat dict pays per key
    nested = {"model": state}

    def blocking(writer: Any, path: str, obj: dict[str, Any] = state) -> float:
        with _quiet():
            start = time.perf_counter()
            response = dcp.async_save(obj, storage_writer=writer, checkpoint_id=path)
            seconds = time.perf_counter() - start
            upload: Any = getattr(response, "upload_completion", response)
            upload.result()
        return seconds

    cached_writers: dict[str, Any] = {}
    counter = 0
    for system in systems:
        # The cached stager keeps its buffers from the first save on; that first save is not timed.
        try:
            cached_writers[system] = make_writer(system, os.path.join(root, "warm"), cache_staged_state_dict=True)
            blocking(cached_writers[system], os.path.join(root, f"async-{system}-cached-warm"))
        except Exception as err:
            case.errors.append(f"{system} cache_staged_state_dict=True warm-up: {type(err).__name__}: {err}")
            cached_writers.pop(system, None)
        _rmtree(os.path.join(root, f"async-{system}-cached-warm"))
    nested_writer: Any = None
    if "dcpio" in cached_writers:
        try:
            nested_writer = make_writer("dcpio", os.path.join(root, "warm"), cache_staged_state_dict=True)
            blocking(nested_writer, os.path.join(root, "async-nested-warm"), nested)
        except Exception as err:
            case.errors.append(f"dcpio cached, one top-level key, warm-up: {type(err).__name__}: {err}")
            nested_writer = None
        _rmtree(os.path.join(root, "async-nested-warm"))
    # an async_save blocks for a tenth of a second: QUICK_REPEATS sub-rounds per round, each timing every variant
    for r in range(cfg.rounds * QUICK_REPEATS):
        case.figure("clone (memcpy)", "s", higher_is_better=False).samples.append(_timed(clone, nbytes))
        case.figure("copy_ into preallocated", "s", higher_is_better=False).samples.append(_timed(copy_into))
        for system in _rotated(systems, r):
            counter += 1
            path = os.path.join(root, f"async-{system}-{counter}")
            try:
                even_free_pages(nbytes)  # the clone and the uncached stagers allocate: same pages for each
                gc.collect()
                case.figure(f"{system}", "s", higher_is_better=False).samples.append(
                    blocking(make_writer(system, path), path)
                )
            except Exception as err:
                case.errors.append(f"round {r} {system}: {type(err).__name__}: {err}")
            _rmtree(path)
            if system in cached_writers:
                path = os.path.join(root, f"async-{system}-cached-{counter}")
                try:
                    gc.collect()
                    case.figure(f"{system} cached", "s", higher_is_better=False).samples.append(
                        blocking(cached_writers[system], path)
                    )
                except Exception as err:
                    case.errors.append(f"round {r} {system} cached: {type(err).__name__}: {err}")
                _rmtree(path)
        if nested_writer is not None:
            counter += 1
            path = os.path.join(root, f"async-nested-{counter}")
            try:
                gc.collect()
                case.figure(NESTED, "s", higher_is_better=False).samples.append(blocking(nested_writer, path, nested))
            except Exception as err:
                case.errors.append(f"round {r} {NESTED}: {type(err).__name__}: {err}")
            _rmtree(path)
        _log(f"async round {r // QUICK_REPEATS + 1}/{cfg.rounds} #{r % QUICK_REPEATS + 1} done")
    for label in ("dcpio", "dcpio cached", "torch", "torch cached", NESTED):
        _paired_ratio(case, label, "clone (memcpy)")
    for label in ("dcpio cached", NESTED):
        _paired_ratio(case, label, "copy_ into preallocated")
    if nested_writer is not None:
        case.notes.append(
            f"'{NESTED}': the same tensors passed as {{'model': state_dict}} (information, no bar); torch's "
            "async_save wraps every top-level key in a logging call before staging"
        )
    case.info["bytes"] = nbytes
    return case


def _case_peak(cfg: BenchConfig, root: str) -> CaseResult:
    case = CaseResult(
        "peak", f"peak RSS of a fresh process saving the state dict, over its RSS before the save ({root})"
    )
    case.notes.append(
        "overhead = VmHWM during dcp.save - VmRSS just before it (HWM reset via /proc/self/clear_refs); "
        "the RSS before the save holds the interpreter, torch and the state dict"
    )
    systems = [s for s in _systems_available() if s != "raw"]
    for r in range(cfg.rounds):
        for system in _rotated(systems, r):
            path = os.path.join(root, f"peak-{system}")
            try:
                (res,) = _run_ranks(
                    1, {"mode": "peak", "system": system, "size": cfg.size, "path": path}, cfg.worker_timeout
                )
            except Exception as err:
                case.errors.append(f"round {r} {system}: {type(err).__name__}: {err}")
                continue
            finally:
                _rmtree(path)
            case.figure(f"{system} overhead", "MiB", higher_is_better=False).samples.append(res["overhead"] / MIB)
            case.figure(f"{system} peak RSS", "MiB", higher_is_better=False).samples.append(res["peak_rss"] / MIB)
            case.info["state_dict_bytes"] = res["state_bytes"]
            case.info[f"{system}_hwm_reset"] = res["hwm_reset"]
        _log(f"peak round {r + 1}/{cfg.rounds} done")
    return case


def _write_hub_folder(state: dict[str, Any], folder: str, shards: int = 4) -> dict[str, int]:
    """Write a hub-style sharded safetensors folder with its index json; return fqn -> file index."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    tensors = _tensor_items(state)
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    mapping: dict[str, int] = {}
    acc = 0
    for name, t in tensors:
        mapping[name] = min(shards, 1 + acc * shards // max(1, total))
        acc += t.numel() * t.element_size()
    files = {i: f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)}
    for i, fname in files.items():
        save_file({k: t for k, t in tensors if mapping[k] == i}, os.path.join(folder, fname))
    index = {"metadata": {"total_size": total}, "weight_map": {k: files[i] for k, i in mapping.items()}}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as stream:
        json.dump(index, stream)
    return mapping


def _case_hf(cfg: BenchConfig, state: dict[str, Any], root: str) -> list[CaseResult]:
    from safetensors.torch import load_file, save_file
    from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

    tensors_only = dict(_tensor_items(state))
    nbytes = _state_nbytes(state)
    load = CaseResult("hf/load", f"safetensors hub folder (4 files) into preallocated tensors ({root})")
    export = CaseResult("hf/export", f"export to a safetensors folder (4 files) ({root})")
    d_reader, d_writer = dcpio_attr("HuggingFaceStorageReader"), dcpio_attr("HuggingFaceStorageWriter")
    if d_reader is None or d_writer is None:
        for case in (load, export):
            case.notes.append("dcpio side not measured: dcpio.HuggingFaceStorageReader/Writer not in this checkout")
    folder = os.path.join(root, "hub")
    mapping = _write_hub_folder(state, folder)
    targets = {k: torch.zeros_like(v) for k, v in tensors_only.items()}

    def st_load() -> None:
        for fname in sorted(os.listdir(folder)):
            if fname.endswith(".safetensors"):
                for key, value in load_file(os.path.join(folder, fname)).items():
                    targets[key].copy_(value)

    loaders: dict[str, Callable[[], None]] = {"safetensors+copy_": st_load}
    loaders["torch"] = functools.partial(_load_with, targets, HuggingFaceStorageReader, folder, {})
    if d_reader is not None:
        loaders["dcpio"] = functools.partial(_load_with, targets, d_reader, folder, {})

    def st_export(path: str) -> None:
        os.makedirs(path, exist_ok=True)
        for i in sorted(set(mapping.values())):
            part = {k: t for k, t in tensors_only.items() if mapping[k] == i}
            save_file(part, os.path.join(path, f"model-{i:05d}-of-{len(set(mapping.values())):05d}.safetensors"))

    def raw_export(path: str) -> None:
        os.makedirs(path, exist_ok=True)
        raw_save(state, os.path.join(path, "raw.bin"), sync=False)

    exporters: dict[str, Callable[[str], None]] = {
        "safetensors.save_file": st_export,
        "raw (no fsync)": raw_export,
    }
    hf_kw = {"fqn_to_index_mapping": mapping}

    def hf_export(cls: Any, path: str) -> None:
        _save_with(tensors_only, cls, path, hf_kw)

    exporters["torch"] = functools.partial(hf_export, HuggingFaceStorageWriter)
    if d_writer is not None:
        exporters["dcpio"] = functools.partial(hf_export, d_writer)

    for r in range(cfg.rounds):
        for name in _rotated(list(loaders), r):
            if r == 0:
                for t in targets.values():
                    t.zero_()
            try:
                with _quiet():
                    seconds = _timed(loaders[name])
            except Exception as err:
                load.errors.append(f"round {r} {name}: {type(err).__name__}: {err}")
                continue
            if r == 0:
                load.info[f"{name}_verified_bit_exact"] = _same(tensors_only, targets)
            load.figure(name, "GB/s").samples.append(nbytes / seconds / 1e9)
        for name in _rotated(list(exporters), r):
            path = os.path.join(root, f"export-{r}-{re.sub(r'[^a-z]', '', name)}")
            try:
                with _quiet():
                    seconds = _timed(functools.partial(exporters[name], path), nbytes)
            except Exception as err:
                export.errors.append(f"round {r} {name}: {type(err).__name__}: {err}")
                continue
            finally:
                _rmtree(path)
            export.figure(name, "GB/s").samples.append(nbytes / seconds / 1e9)
        _log(f"hf round {r + 1}/{cfg.rounds} done")
    _rmtree(folder)
    _paired_ratio(load, "dcpio", "safetensors+copy_")
    _paired_ratio(load, "torch", "safetensors+copy_")
    _paired_ratio(load, "dcpio", "torch")
    _paired_ratio(export, "dcpio", "raw (no fsync)")
    _paired_ratio(export, "torch", "raw (no fsync)")
    _paired_ratio(export, "dcpio", "torch")
    return [load, export]


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for the duration of the block; yields its endpoint URL."""
    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {url}") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _case_s3(cfg: BenchConfig) -> CaseResult:
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    case = CaseResult("s3", f"S3 (moto server on 127.0.0.1), {_fmt_bytes(cfg.s3_size)} state dict")
    import importlib.util

    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("s3fs") is None:
        case.skipped = "moto[server] or s3fs is not installed"
        return case
    d_writer, d_reader = dcpio_attr("FsspecWriter"), dcpio_attr("FsspecReader")
    if d_writer is None or d_reader is None:
        case.notes.append("dcpio side not measured: dcpio.FsspecWriter/Reader not in this checkout")
    state = build_state_dict(workload_specs(cfg.s3_size), seed=3)
    nbytes = _state_nbytes(state)
    targets = _empty_targets(state)
    classes: dict[str, tuple[Any, Any]] = {"torch": (FsspecWriter, FsspecReader)}
    if d_writer is not None and d_reader is not None:
        classes["dcpio"] = (d_writer, d_reader)
    with moto_server() as url:
        opts = {
            "key": "bench",
            "secret": "bench",
            "client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"},
        }
        import boto3

        # boto3 directly: s3fs's mkdir sends a LocationConstraint that moto rejects for us-east-1
        boto3.client(
            "s3", endpoint_url=url, aws_access_key_id="bench", aws_secret_access_key="bench", region_name="us-east-1"
        ).create_bucket(Bucket="dcpio-bench")
        for r in range(cfg.rounds):
            for name in _rotated(list(classes), r):
                writer_cls, reader_cls = classes[name]
                path = f"s3://dcpio-bench/{name}-{r}"
                try:
                    with _quiet():
                        seconds = _timed(functools.partial(_save_with, state, writer_cls, path, opts))
                        case.figure(f"{name} save", "GB/s").samples.append(nbytes / seconds / 1e9)
                        if r == 0:
                            for _, t in _tensor_items(targets):
                                t.zero_()
                        seconds = _timed(functools.partial(_load_with, targets, reader_cls, path, opts))
                        case.figure(f"{name} load", "GB/s").samples.append(nbytes / seconds / 1e9)
                    if r == 0:
                        case.info[f"{name}_verified_bit_exact"] = _same(state, targets)
                except Exception as err:
                    case.errors.append(f"round {r} {name}: {type(err).__name__}: {err}")
            _log(f"s3 round {r + 1}/{cfg.rounds} done")
    _paired_ratio(case, "dcpio save", "torch save")
    _paired_ratio(case, "dcpio load", "torch load")
    case.info["bytes"] = nbytes
    return case


# ----------------------------------------------------------------------------------------------------
# Bars, report, entry points
# ----------------------------------------------------------------------------------------------------


def _median_ratio(cases: dict[str, CaseResult], case: str, ratio: str) -> float | None:
    c = cases.get(case)
    if c is None or ratio not in c.ratios:
        return None
    return c.ratios[ratio].median


def _median_fig(cases: dict[str, CaseResult], case: str, label: str) -> float | None:
    c = cases.get(case)
    if c is None or label not in c.figures:
        return None
    return c.figures[label].median


def evaluate_bars(cases: dict[str, CaseResult]) -> list[Bar]:
    """The bars of issue 3 (and issue 5's HF speed) against this run's medians; ``n/a`` where not measured."""
    bars = [
        Bar(
            "fast device save >= 0.8 of raw",
            "save/shm",
            _median_ratio(cases, "save/shm", "dcpio/raw"),
            0.8,
            ">=",
        ),
        Bar(
            "fast device load >= 0.8 of raw",
            "load/shm",
            _median_ratio(cases, "load/shm", "dcpio/raw"),
            0.8,
            ">=",
        ),
        Bar(
            "disk save (fsync) >= 0.85 of raw",
            "save/disk",
            _median_ratio(cases, "save/disk", "dcpio/raw"),
            0.85,
            ">=",
        ),
        Bar(
            "disk load (warm cache) >= 0.75 of raw",
            "load/disk",
            _median_ratio(cases, "load/disk", "dcpio/raw"),
            0.75,
            ">=",
        ),
    ]
    for world in (2, 4):
        key = f"reshard/{world}to2"
        bars.append(
            Bar(
                f"reshard {world}->2 reads <= 1.1x needed",
                key,
                _median_fig(cases, key, "dcpio read/needed"),
                1.1,
                "<=",
                "worst rank, median over rounds",
            )
        )
        bars.append(
            Bar(
                f"reshard {world}->2 >= 2x faster than stock",
                key,
                _median_ratio(cases, key, "speedup torch/dcpio"),
                2.0,
                ">=",
            )
        )
    bars.append(
        Bar(
            "async_save blocking <= 1.3x one memcpy",
            "async",
            _median_ratio(cases, "async", "dcpio/clone (memcpy)"),
            1.3,
            "<=",
        )
    )
    bars.append(
        Bar(
            "async_save blocking, cached staging <= 1.1x one memcpy into warm memory",
            "async",
            # the cached stager copies into buffers it already holds, so its memcpy is a copy_ into preallocated
            # tensors: a clone() also allocates and faults in every page, a cost so variable on a VM that it would
            # decide the bar by itself
            _median_ratio(cases, "async", "dcpio cached/copy_ into preallocated"),
            1.1,
            "<=",
        )
    )
    bars.append(
        Bar(
            "peak memory of a save <= state dict + 256 MiB",
            "peak",
            _median_fig(cases, "peak", "dcpio overhead"),
            256.0,
            "<=",
            "MiB over the RSS before the save",
        )
    )
    bars.append(
        Bar(
            "HF load >= safetensors load_file + copy_ (issue 5)",
            "hf/load",
            _median_ratio(cases, "hf/load", "dcpio/safetensors+copy_"),
            1.0,
            ">=",
        )
    )
    return bars


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Run the selected cases and return the full result (what ``--json`` prints)."""
    unknown = [c for c in cfg.cases if c not in ALL_CASES]
    if unknown:
        raise ValueError(f"unknown bench case(s) {unknown}; choose from {', '.join(ALL_CASES)}")
    os.makedirs(cfg.dir, exist_ok=True)
    torch.manual_seed(0)
    devices = _devices(cfg)
    machine = describe_machine([d.root for d in devices])
    specs = workload_specs(cfg.size)
    cases: dict[str, CaseResult] = {}
    started = time.time()
    state: dict[str, Any] = {}
    try:
        needs_state = any(c in cfg.cases for c in ("save", "load", "async", "hf"))
        if needs_state:
            _log(f"building the {_fmt_bytes(sum(s.nbytes for s in specs))} state dict")
            state = build_state_dict(specs)
        if "save" in cfg.cases or "load" in cfg.cases:
            for res in _case_save_load(cfg, state, devices, "save" in cfg.cases, "load" in cfg.cases):
                cases[res.name] = res
        disk = devices[-1].root
        fast = devices[0].root
        if "reshard" in cfg.cases:
            for res in _case_reshard(cfg, disk):
                cases[res.name] = res
        if "async" in cfg.cases:
            cases["async"] = _guarded("async", functools.partial(_case_async, cfg, state, fast))
        if "peak" in cfg.cases:
            cases["peak"] = _guarded("peak", functools.partial(_case_peak, cfg, disk))
        if "hf" in cfg.cases:
            try:
                for res in _case_hf(cfg, state, fast):
                    cases[res.name] = res
            except Exception as err:
                cases["hf/load"] = CaseResult("hf/load", "safetensors", errors=[f"{type(err).__name__}: {err}"])
        if "s3" in cfg.cases:
            cases["s3"] = _guarded("s3", functools.partial(_case_s3, cfg))
    finally:
        for dev in devices:
            shutil.rmtree(dev.root, ignore_errors=True)
    machine["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    bars = [b for b in evaluate_bars(cases) if b.case in cases]
    return {
        "config": {
            "dir": cfg.dir,
            "size": cfg.size,
            "actual_bytes": sum(s.nbytes for s in specs),
            "rounds": cfg.rounds,
            "cases": list(cfg.cases),
            "shm": any(d.key == "shm" for d in devices),
            "s3_size": cfg.s3_size,
            "seconds": round(time.time() - started, 1),
        },
        "machine": machine,
        "cases": {k: v.to_json() for k, v in cases.items()},
        "bars": [b.to_json() for b in bars],
    }


def _guarded(name: str, fn: Callable[[], CaseResult]) -> CaseResult:
    try:
        return fn()
    except Exception as err:
        return CaseResult(name, name, errors=[f"{type(err).__name__}: {err}"])


def _fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "GB/s":
        return f"{value:.3f} GB/s"
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.3f} s"
    if unit == "MiB":
        return f"{value:.0f} MiB"
    return f"{value:.3f}{unit}"


def _fmt_fig(fig: dict[str, Any]) -> str:
    text = _fmt_value(fig["median"], fig["unit"])
    if fig["spread"] is not None:
        text += f"  (spread {fig['spread'] * 100:.0f}%)"
    return text


def format_report(result: dict[str, Any]) -> str:
    """The plain-text table ``dcpio bench`` prints."""
    cfg, mach = result["config"], result["machine"]
    lines = [
        f"dcpio bench: {_fmt_bytes(cfg['actual_bytes'])} state dict (16 large fp32 matrices, 64 medium, "
        f"300 vectors, a step counter); median of {cfg['rounds']} round(s); spread = (max-min)/median; "
        "GB/s = 1e9 bytes/s",
        f"machine: {mach['cpu_count']} cores ({mach['cpu_model']}), "
        f"{(mach['mem_total_bytes'] or 0) / GIB:.1f} GiB RAM, torch {mach['torch']}, "
        f"python {mach['python']}, "
        f"dcpio {mach['dcpio_commit']}, load average {_fmt_load(mach.get('loadavg'))} -> "
        f"{_fmt_load(mach.get('loadavg_end'))}",
    ]
    for path, mount in mach["filesystems"].items():
        lines.append(f"  {path}: {mount['fstype']} on {mount['device']} (mounted at {mount['mountpoint']})")
    for name, case in result["cases"].items():
        lines.append("")
        lines.append(f"[{name}] {case['title']}")
        if case["skipped"]:
            lines.append(f"  skipped: {case['skipped']}")
        width = max([len(k) for k in case["figures"]] + [len(k) for k in case["ratios"]] + [8])
        for label, fig in case["figures"].items():
            lines.append(f"  {label:<{width}}  {_fmt_fig(fig)}")
        for label, fig in case["ratios"].items():
            lines.append(f"  {label:<{width}}  {_fmt_fig(fig)}")
        for key, value in case["info"].items():
            if key.endswith("_per_rank"):
                value = ", ".join(_fmt_bytes(v) for v in value)
            elif key.endswith("bytes") and isinstance(value, int):
                value = _fmt_bytes(value)
            elif isinstance(value, float):
                value = f"{value:.3f}"
            lines.append(f"  {key}: {value}")
        lines.extend(f"  note: {n}" for n in case["notes"])
        lines.extend(f"  ERROR: {e}" for e in case["errors"])
    if result["bars"]:
        lines.append("")
        lines.append("bars (issue 3; HF load from issue 5):")
        for bar in result["bars"]:
            value = "n/a" if bar["value"] is None else f"{bar['value']:.3f}"
            detail = f"  [{bar['detail']}]" if bar["detail"] else ""
            lines.append(f"  {bar['status']:<4}  {bar['bar']:<55} measured {value}{detail}")
    return "\n".join(lines)


def _fmt_load(load: Any) -> str:
    if not load:
        return "?"
    return "/".join(f"{x:.1f}" for x in load)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``dcpio bench``'s options to ``parser``."""
    parser.add_argument(
        "--dir",
        default=None,
        help="local directory for the disk cases (default: a temporary directory under $TMPDIR or /tmp)",
    )
    parser.add_argument("--size", type=parse_size, default=GIB, help="state dict size, e.g. 1GiB, 64MiB (default 1GiB)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per case; medians are reported (default 3)")
    parser.add_argument(
        "--cases",
        default=",".join(ALL_CASES),
        help=f"comma-separated cases to run (default all): {','.join(ALL_CASES)}",
    )
    parser.add_argument("--no-shm", action="store_true", help="skip the /dev/shm (fast device) runs")
    parser.add_argument(
        "--s3-size",
        type=parse_size,
        default=256 * MIB,
        help="state dict size of the S3 case (default 256MiB)",
    )
    parser.add_argument("--json", action="store_true", help="print the full result as JSON instead of the table")
    parser.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a bar FAILs")


def run_bench(args: argparse.Namespace) -> int:
    """Run the bench as configured by :func:`add_arguments`'s options; print the table (or JSON).

    Returns:
        0 on success; 1 with ``--strict`` when a bar FAILs; 2 on invalid options.
    """
    cases = tuple(c.strip() for c in str(args.cases).split(",") if c.strip())
    bad = [c for c in cases if c not in ALL_CASES]
    if bad or not cases:
        print(f"dcpio bench: unknown case(s) {bad}; choose from {','.join(ALL_CASES)}", file=sys.stderr)
        return 2
    if args.rounds < 1:
        print("dcpio bench: --rounds must be at least 1 (3 or more for a reportable median)", file=sys.stderr)
        return 2
    tmp_owner = None
    directory = args.dir
    if directory is None:
        tmp_owner = tempfile.mkdtemp(prefix="dcpio-bench-")
        directory = tmp_owner
    try:
        cfg = BenchConfig(
            dir=directory,
            size=args.size,
            rounds=args.rounds,
            cases=cases,
            use_shm=not args.no_shm,
            s3_size=args.s3_size,
        )
        result = run(cfg)
    finally:
        if tmp_owner is not None:
            shutil.rmtree(tmp_owner, ignore_errors=True)
    text = json.dumps(result, indent=2)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as stream:
            stream.write(text + "\n")
    print(text if args.json else format_report(result), flush=True)
    if getattr(args, "strict", False) and any(b["status"] == "FAIL" for b in result["bars"]):
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/run.py`` / ``python -m dcpio_bench`` (with ``benchmarks/`` on the path)."""
    parser = argparse.ArgumentParser(prog="dcpio bench", description=(__doc__ or "").split("\n\n")[0])
    add_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
