"""Shared helpers for dcpio's tests: state dicts covering every dtype, bit-exact comparison, a stock-torch
subprocess runner and a multi-process gloo launcher.

This module never imports dcpio, so a stock-torch child process may import it (``sys.path`` gets this
directory) to rebuild the same deterministic state dicts without pulling dcpio in.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TESTS_DIR",
    "SmallObject",
    "all_dtypes",
    "assert_tree_equal",
    "bitwise_equal",
    "dcp_failures",
    "exception_chain",
    "free_port",
    "make_state_dict",
    "rand_tensor",
    "run_stock",
    "spawn_ranks",
    "template_like",
    "trusted_objects",
]

TESTS_DIR = str(Path(__file__).resolve().parent)

# dtypes every format round-trips (the brief's list); looked up by name so older torch builds simply lack some
_CORE_DTYPE_NAMES = (
    "bfloat16",
    "float16",
    "float32",
    "float64",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
)
_COMPLEX_DTYPE_NAMES = ("complex64", "complex128")
# torch.save and torch's DCP reader handle these too; kept apart so a failure on them is reported on its own
_EXOTIC_DTYPE_NAMES = ("complex32", "float4_e2m1fn_x2")


def all_dtypes(*, complex_: bool = True, exotic: bool = False) -> list[torch.dtype]:
    """The dtypes this torch build has, from the lists above."""
    names = list(_CORE_DTYPE_NAMES)
    if complex_:
        names += _COMPLEX_DTYPE_NAMES
    if exotic:
        names += _EXOTIC_DTYPE_NAMES
    found = [getattr(torch, n, None) for n in names]
    return [d for d in found if isinstance(d, torch.dtype)]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------------


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    # a fresh tensor, not .contiguous(): a size-1 view with stride 2 counts as contiguous yet cannot be
    # viewed as bytes
    dense = torch.empty(tuple(t.shape), dtype=t.dtype)
    dense.copy_(t.detach().cpu())
    return dense.reshape(-1).view(torch.uint8)


def bitwise_equal(a: object, b: object) -> bool:
    """True when ``a`` and ``b`` are tensors of the same dtype and shape whose elements have the same bytes.

    Compares raw bytes, so NaN payloads, negative zeros and dtypes without ``==`` (float8, uint64...) count.
    Strides and storage offsets do not matter: a transposed view equals its contiguous copy.
    """
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return False
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    if a.numel() == 0:
        return True
    return bool(torch.equal(_raw_bytes(a), _raw_bytes(b)))


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor(dtype={x.dtype}, shape={tuple(x.shape)}, stride={x.stride()})"
    return f"{type(x).__name__}({x!r:.80})"


def assert_tree_equal(expected: object, actual: object, path: str = "") -> None:
    """Assert nested state dicts are equal: tensors bit for bit, containers by structure, the rest by ``==``.

    Raises:
        AssertionError: naming the first differing key path.
    """
    where = path or "<root>"
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor):
            raise AssertionError(f"{where}: expected {_describe(expected)}, got {_describe(actual)}")
        if not bitwise_equal(expected, actual):
            raise AssertionError(f"{where}: tensors differ: expected {_describe(expected)}, got {_describe(actual)}")
        return
    if isinstance(expected, Mapping):
        if not isinstance(actual, Mapping):
            raise AssertionError(f"{where}: expected a mapping, got {_describe(actual)}")
        if set(expected) != set(actual):
            raise AssertionError(f"{where}: keys differ: {sorted(map(str, set(expected) ^ set(actual)))}")
        for k in expected:
            assert_tree_equal(expected[k], actual[k], f"{path}.{k}" if path else str(k))
        return
    if isinstance(expected, (list, tuple)):
        if type(actual) is not type(expected) or len(actual) != len(expected):
            raise AssertionError(f"{where}: expected {_describe(expected)}, got {_describe(actual)}")
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_tree_equal(e, a, f"{path}[{i}]")
        return
    if type(expected) is not type(actual) or expected != actual:
        raise AssertionError(f"{where}: expected {_describe(expected)}, got {_describe(actual)}")


# --------------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SmallObject:
    """A small picklable user object stored as a bytes item."""

    name: str
    values: list[int]
    scale: float = 1.5


def rand_tensor(shape: Sequence[int], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A tensor of ``dtype`` filled with random *bit patterns* (NaNs, infinities and denormals included)."""
    numel = 1
    for s in shape:
        numel *= s
    if dtype == torch.bool:
        return torch.randint(0, 2, (numel,), generator=gen, dtype=torch.uint8).bool().reshape(tuple(shape))
    elsize = dtype.itemsize
    raw = torch.randint(0, 256, (numel * elsize,), generator=gen, dtype=torch.uint8)
    return raw.view(dtype).reshape(tuple(shape))


def make_state_dict(
    *,
    seed: int = 0,
    complex_: bool = True,
    exotic: bool = False,
    views: bool = True,
    objects: bool = True,
    nested: bool = True,
    shape: Sequence[int] = (3, 5),
) -> dict[str, Any]:
    """A deterministic state dict covering every dtype, 0-dim and empty tensors, views, nesting and objects.

    The same arguments give the same bytes in any process (the stock-torch children rebuild it to compare).

    Args:
        seed: seeds the bit patterns.
        complex_: include complex64/complex128 (not in the SAFETENSORS format).
        exotic: include complex32 and float4_e2m1fn_x2.
        views: include non-contiguous tensors (transposed, strided, expanded) and offset views.
        objects: include non-tensor values (ints, floats, strings, None, a dataclass, tuples, bytes).
        nested: include nested dicts and lists.
        shape: the shape of the per-dtype tensors.
    """
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, Any] = {}
    sd["dtypes"] = {_dtype_name(dt): rand_tensor(shape, dt, gen) for dt in all_dtypes(complex_=complex_, exotic=exotic)}
    sd["shapes"] = {
        "scalar_f32": rand_tensor((), torch.float32, gen),
        "scalar_i64": rand_tensor((), torch.int64, gen),
        "scalar_bf16": rand_tensor((), torch.bfloat16, gen),
        "empty_1d": torch.empty(0, dtype=torch.float32),
        "empty_2d_bf16": torch.empty(3, 0, dtype=torch.bfloat16),
        "empty_2d_i32": torch.empty(0, 4, dtype=torch.int32),
        "big_1d": rand_tensor((70_001,), torch.float32, gen),  # odd length, > a page
    }
    if views:
        base = rand_tensor((6, 8), torch.float32, gen)
        base_i = rand_tensor((5, 7), torch.int16, gen)
        flat = rand_tensor((100,), torch.bfloat16, gen)
        small = rand_tensor((4,), torch.float64, gen)
        sd["views"] = {
            "transposed": base.t(),
            "strided": base[::2, 1::3],
            "column": base_i[:, 3],
            "offset_contiguous": flat[17:53],  # contiguous but a nonzero storage offset
            "offset_2d": flat[10:40].view(5, 6),
            "expanded": small.expand(3, 4),  # stride 0
            "permuted_3d": rand_tensor((2, 3, 4), torch.uint8, gen).permute(2, 0, 1),
        }
    if nested:
        sd["model"] = {
            "layers": [
                {
                    "weight": rand_tensor((4, 3), torch.bfloat16, gen),
                    "bias": rand_tensor((4,), torch.float16, gen),
                },
                {
                    "weight": rand_tensor((2, 4), torch.float32, gen),
                    "bias": rand_tensor((2,), torch.float32, gen),
                },
            ],
            "embed": {"table": {"w": rand_tensor((6, 2), torch.int8, gen)}},
        }
    if objects:
        sd["objects"] = {
            "step": 12345,
            "neg": -7,
            "lr": 0.000123,
            "name": "run-αβγ",
            "none": None,
            "flag": True,
            "obj": SmallObject("adam", [1, 2, 3]),
            "tuple": (1, "two", 3.0),
            "blob": b"\x00\x01binary\xff",
            "ints": [1, 2, 3],
        }
    return sd


def trusted_objects() -> Any:
    """A context in which :class:`SmallObject` passes torch's ``weights_only`` allow-list.

    dcpio's reader refuses pickled values that need classes outside that list unless the user registers them
    (or passes ``allow_pickle=True``); the tests take the registration path a careful user takes.
    """
    return torch.serialization.safe_globals([SmallObject])


def _sentinel_like(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(tuple(t.shape), dtype=t.dtype)
    if out.numel():
        # 0xA5 everywhere: a load that leaves the destination untouched cannot pass a bit-exact comparison
        out.reshape(-1).view(torch.uint8).fill_(0xA5)
    return out


def template_like(sd: object) -> Any:
    """A load destination shaped like ``sd``: contiguous tensors of a sentinel byte, other leaves None."""
    if isinstance(sd, torch.Tensor):
        return _sentinel_like(sd)
    if isinstance(sd, Mapping):
        return {k: template_like(v) for k, v in sd.items()}
    if isinstance(sd, list):
        # DCP loads a list leaf of plain values as one object: keep it a placeholder
        if any(isinstance(v, (torch.Tensor, Mapping, list)) for v in sd):
            return [template_like(v) for v in sd]
        return None
    return None


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def dcp_failures(exc: BaseException) -> list[BaseException]:
    """The per-rank exceptions inside torch's ``CheckpointException`` (a BaseException), else ``[exc]``."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        return [pair[0] for pair in failures.values()]
    return [exc]


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc``, the per-rank errors in torch's CheckpointException, every ``__cause__``/``__context__``."""
    out: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if any(e is seen for seen in out):
            continue
        out.append(e)
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo.extend(pair[0] for pair in failures.values())
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return out


# --------------------------------------------------------------------------------------------------
# Subprocesses
# --------------------------------------------------------------------------------------------------

_STOCK_PROLOGUE = textwrap.dedent(
    f"""
    import sys as _sys
    _sys.path.insert(0, {TESTS_DIR!r})

    class _NoDcpio:
        # the stock side proves torch alone reads/writes the files: importing dcpio here is a test bug or a
        # format leak (e.g. a pickled dcpio class inside .metadata)
        def find_spec(self, name, path=None, target=None):
            if name == "dcpio" or name.startswith("dcpio."):
                raise ImportError("stock-torch subprocess tried to import " + name)
            return None

    _sys.meta_path.insert(0, _NoDcpio())
    import warnings as _warnings
    _warnings.simplefilter("ignore")
    """
)

_STOCK_EPILOGUE = textwrap.dedent(
    """
    import sys as _sys
    assert "dcpio" not in _sys.modules, "dcpio was imported in the stock-torch subprocess"
    """
)


def _child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env["GLOO_SOCKET_IFNAME"] = "lo"
    if extra:
        env.update(extra)
    return env


def run_stock(code: str, timeout: float = 180, env: Mapping[str, str] | None = None) -> str:
    """Run ``code`` in a fresh Python process that never imports dcpio; return its stdout.

    The child may ``import helpers`` (this module). It fails if anything imports dcpio.

    Raises:
        AssertionError: the child failed or timed out; the message carries its stdout and stderr.
    """
    full = _STOCK_PROLOGUE + "\n" + textwrap.dedent(code) + "\n" + _STOCK_EPILOGUE
    try:
        proc = subprocess.run(
            [sys.executable, "-c", full],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_child_env(env),
            cwd=TESTS_DIR,
        )
    except subprocess.TimeoutExpired as err:
        raise AssertionError(
            f"stock-torch subprocess timed out after {timeout}s\nstdout:\n{err.stdout}\nstderr:\n{err.stderr}"
        ) from err
    if proc.returncode != 0:
        raise AssertionError(
            f"stock-torch subprocess failed (exit {proc.returncode})\n--- stdout ---\n{proc.stdout}\n"
            f"--- stderr ---\n{proc.stderr}"
        )
    return proc.stdout


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_RANK_BOOTSTRAP = textwrap.dedent(
    """
    import datetime, importlib, json, os, sys, traceback, warnings
    warnings.simplefilter("ignore")
    sys.path.insert(0, os.environ["DCPIO_TEST_TESTS_DIR"])
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    target = os.environ["DCPIO_TEST_TARGET"]
    args = json.loads(os.environ["DCPIO_TEST_ARGS"])
    try:
        dist.init_process_group(
            "gloo",
            init_method="tcp://127.0.0.1:" + os.environ["MASTER_PORT"],
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=float(os.environ["DCPIO_TEST_PG_TIMEOUT"])),
        )
        module_name, fn_name = target.split(":")
        getattr(importlib.import_module(module_name), fn_name)(rank, world, *args)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        sys.stdout.flush()
        # skip interpreter teardown: other ranks may be blocked in a collective with us
        os._exit(1)
    else:
        sys.stderr.flush()
        sys.stdout.flush()
        # skip C++ static teardown as well: a gloo thread still joinable there aborts the process
        # ("terminate called without an active exception", exit -6) after the work succeeded; seen once in CI
        os._exit(0)
    """
)


def spawn_ranks(
    world_size: int,
    target: str,
    args: Sequence[Any],
    tmp_path: Path,
    timeout: float = 240,
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """Run ``world_size`` real processes on gloo over 127.0.0.1 and return each rank's stdout.

    Args:
        world_size: number of ranks.
        target: ``"module:function"`` (module importable from the tests directory), called as
            ``function(rank, world_size, *args)`` after the process group is up; or a path to a ``.py``
            script, run with ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` set and ``args`` as argv,
            which sets up its own process group.
        args: JSON-serialisable arguments.
        tmp_path: where the ranks' logs go.
        timeout: seconds for the whole launch.
        env: extra environment variables.

    Raises:
        AssertionError: a rank failed or the launch timed out; the message has every rank's traceback.
    """
    for attempt in range(3):
        try:
            return _launch_once(world_size, target, args, Path(tmp_path), timeout, env)
        except _PortTaken:
            # another process took the free port between free_port() and rank 0 binding it: pick another
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class _PortTaken(AssertionError):
    pass


def _launch_once(
    world_size: int, target: str, args: Sequence[Any], tmp_path: Path, timeout: float, env: Mapping[str, str] | None
) -> list[str]:
    log_dir = tmp_path / f"rank_logs_{time.monotonic_ns()}"
    log_dir.mkdir(parents=True)
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[tuple[Path, Path]] = []
    is_script = target.endswith(".py")
    for rank in range(world_size):
        child_env = _child_env(env)
        child_env.update(
            {
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "DCPIO_TEST_TESTS_DIR": TESTS_DIR,
                "DCPIO_TEST_TARGET": target,
                "DCPIO_TEST_ARGS": json.dumps(list(args)),
                "DCPIO_TEST_PG_TIMEOUT": str(int(timeout)),
            }
        )
        cmd = [sys.executable, target, *map(str, args)] if is_script else [sys.executable, "-c", _RANK_BOOTSTRAP]
        out_path, err_path = log_dir / f"rank{rank}.out", log_dir / f"rank{rank}.err"
        logs.append((out_path, err_path))
        with out_path.open("wb") as out, err_path.open("wb") as err:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=err, env=child_env, cwd=TESTS_DIR))

    deadline = time.monotonic() + timeout
    first_failure: float | None = None
    timed_out = False
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if first_failure is None and any(p.returncode not in (None, 0) for p in procs):
            first_failure = now
        # once a rank died, the others are likely blocked in a collective: give them a moment, then stop them
        if now > deadline or (first_failure is not None and now - first_failure > 15):
            timed_out = now > deadline
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            break
        time.sleep(0.05)

    outs = [o.read_text(errors="replace") for o, _ in logs]
    errs = [e.read_text(errors="replace") for _, e in logs]
    if timed_out or any(p.returncode != 0 for p in procs):
        parts = [
            f"spawn_ranks({world_size}, {target!r}) failed" + (f" (timed out after {timeout}s)" if timed_out else "")
        ]
        for rank, p in enumerate(procs):
            parts.append(
                f"=== rank {rank}: exit {p.returncode} ===\n--- stdout ---\n{outs[rank]}\n--- stderr ---\n{errs[rank]}"
            )
        if not timed_out and any("EADDRINUSE" in e or "ddress already in use" in e for e in errs):
            raise _PortTaken("\n".join(parts))
        raise AssertionError("\n".join(parts))
    return outs
