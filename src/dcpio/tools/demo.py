"""``dcpio demo``: the README's main job, end to end, on an embedded default model.

1. Two real processes join a gloo process group on 127.0.0.1 and train a small model (an embedding, a few linear
   layers: about 9.5M fp32 parameters, ~38 MB) for a few steps with FSDP2 (``fully_shard``): every parameter and
   every optimizer state tensor is a DTensor sharded ``Shard(0)`` over the two ranks.
2. Each rank saves its shards with ``dcp.save`` and :class:`dcpio.FileSystemWriter`, and the same state with
   torch's stock ``FileSystemWriter``, timed between barriers (three rounds each, alternating; the best counts).
   Rank 0 also keeps the full (gathered) state in a plain ``torch.save`` file as the reference.
3. This process, with no process group, builds a fresh model and optimizer, loads the checkpoint with
   :class:`dcpio.FileSystemReader`, pushes it into the model and optimizer with ``set_state_dict``, reads them back,
   and compares every tensor bit for bit with the reference, and every non-tensor value for equality.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dcpio.errors import CheckpointError

__all__ = ["DemoResult", "run_demo"]

VOCAB = 8192
DIM = 512
HIDDEN = 1024
WORLD_SIZE = 2
_STATS = "demo_stats.json"
_REFERENCE = "reference_full_state.pt"


@dataclass
class DemoResult:
    """What :func:`run_demo` measured and checked.

    Attributes:
        directory: where the checkpoints were written (removed afterwards unless a directory was given).
        world_size: ranks that trained and saved.
        steps: optimizer steps taken before saving.
        parameters: model parameters.
        state_bytes: bytes of tensor data saved (model plus optimizer state, all ranks).
        files: data files of dcpio's checkpoint.
        dcpio_save_s: seconds of the faster dcpio save (between barriers).
        torch_save_s: seconds of the faster stock-torch save.
        dcpio_mb_s: ``state_bytes`` / ``dcpio_save_s``, in MB/s (10^6 bytes).
        torch_mb_s: likewise for stock torch.
        speedup: ``dcpio_mb_s / torch_mb_s``.
        load_s: seconds the single-process load with dcpio's reader took.
        tensors_checked: tensors compared bit for bit after the resume.
        bytes_checked: their bytes.
        bit_exact: every tensor and value matched.
        mismatches: names that did not match.
        total_s: the whole demo, process start-up included.
    """

    directory: str
    world_size: int
    steps: int
    parameters: int = 0
    state_bytes: int = 0
    files: list[str] = field(default_factory=list)
    dcpio_save_s: float = 0.0
    torch_save_s: float = 0.0
    dcpio_mb_s: float = 0.0
    torch_mb_s: float = 0.0
    speedup: float = 0.0
    load_s: float = 0.0
    tensors_checked: int = 0
    bytes_checked: int = 0
    bit_exact: bool = False
    mismatches: list[str] = field(default_factory=list)
    total_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_model() -> torch.nn.Module:
    """The demo's model: token embedding, a two-layer MLP block, a norm and an output projection."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Embedding(VOCAB, DIM),
        torch.nn.Linear(DIM, HIDDEN),
        torch.nn.GELU(),
        torch.nn.Linear(HIDDEN, DIM),
        torch.nn.LayerNorm(DIM),
        torch.nn.Linear(DIM, VOCAB),
    )


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1000 * rank + step))


def _tensor_bytes(obj: Any) -> int:
    from torch.distributed.tensor import DTensor

    from dcpio.tools._sources import flatten

    total = 0
    for _, v in flatten(obj):
        if isinstance(v, DTensor):
            total += v.numel() * v.element_size()  # global size: counted once, on rank 0's view
        elif isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
    return total


def _worker(rank: int, world_size: int, port: int, directory: str, steps: int) -> None:
    """One rank of the demo (runs in its own process)."""
    warnings.filterwarnings("ignore")  # FSDP's and DCP's advisory warnings would drown the demo's log
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter as TorchWriter
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import dcpio

    torch.set_num_threads(1)  # two ranks on two cores: one thread each avoids oversubscription
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        model = build_model()
        for layer in model.children():
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for step in range(steps):
            x = _batch(rank, step)
            logits = model(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad()

        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd, "step": steps}
        times: dict[str, list[float]] = {"dcpio": [], "torch": []}
        # alternate so neither writer always meets a warmer page cache; the best of three counts for each
        order = ["torch", "dcpio", "dcpio", "torch", "torch", "dcpio"]
        for i, system in enumerate(order):
            path = os.path.join(directory, f"{system}_ckpt")
            if system == "dcpio":
                writer: Any = dcpio.FileSystemWriter(path)
            else:
                writer = TorchWriter(path)
            dist.barrier()
            t0 = time.perf_counter()
            dcp.save(state, storage_writer=writer)
            dist.barrier()
            times[system].append(time.perf_counter() - t0)
            del i

        full_m, full_o = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save({"model": full_m, "optim": full_o, "step": steps}, os.path.join(directory, _REFERENCE))
            stats = {
                "parameters": sum(p.numel() for p in model.parameters()),
                "state_bytes": _tensor_bytes(state),
                "dcpio_save_s": min(times["dcpio"]),
                "torch_save_s": min(times["torch"]),
            }
            with open(os.path.join(directory, _STATS), "w") as f:
                json.dump(stats, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(directory: str, steps: int, timeout: float) -> None:
    port = _free_port()
    src_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = src_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    procs = []
    logs = []
    for rank in range(WORLD_SIZE):
        code = f"from dcpio.tools.demo import _worker; _worker({rank}, {WORLD_SIZE}, {port}, {directory!r}, {steps})"
        log = open(os.path.join(directory, f"rank{rank}.log"), "w+b")  # closed in the finally below
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=log, env=env))
    deadline = time.monotonic() + timeout
    failed: list[str] = []
    try:
        for rank, proc in enumerate(procs):
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                rc = None
            if rc != 0:
                logs[rank].seek(0)
                tail = logs[rank].read().decode(errors="replace").strip().splitlines()[-15:]
                failed.append(
                    f"rank {rank} " + ("timed out" if rc is None else f"exited {rc}") + ":\n  " + "\n  ".join(tail)
                )
                for other in procs:
                    if other.poll() is None:
                        other.kill()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    if failed:
        raise CheckpointError("the demo's training ranks failed:\n" + "\n".join(failed))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return bool(torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


def run_demo(
    directory: str | os.PathLike[str] | None = None,
    steps: int = 3,
    log: Callable[[str], None] | None = None,
    timeout: float = 300.0,
) -> DemoResult:
    """Train on 2 gloo ranks, save sharded with dcpio, resume on 1 process, check bit for bit, compare with torch.

    Args:
        directory: where to write the checkpoints (kept). None: a temporary directory, removed afterwards.
        steps: training steps before the save.
        log: called with one line per stage (the CLI prints them).
        timeout: seconds allowed for the training ranks.

    Returns:
        A :class:`DemoResult`; ``bit_exact`` says whether the resumed state matched.

    Raises:
        dcpio.CheckpointError: a training rank failed (its log tail is in the message).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import dcpio
    from dcpio.tools._sources import flatten

    say = log or (lambda _line: None)
    start = time.perf_counter()
    temp = directory is None
    root = tempfile.mkdtemp(prefix="dcpio-demo-") if directory is None else os.fspath(directory)
    os.makedirs(root, exist_ok=True)
    result = DemoResult(directory=root, world_size=WORLD_SIZE, steps=steps)
    try:
        say(
            f"training {steps} steps on {WORLD_SIZE} gloo ranks (FSDP2, parameters and optimizer state sharded "
            "Shard(0)); saving with dcpio and with stock torch ..."
        )
        _launch(root, steps, timeout)
        with open(os.path.join(root, _STATS)) as f:
            stats = json.load(f)
        result.parameters = int(stats["parameters"])
        result.state_bytes = int(stats["state_bytes"])
        result.dcpio_save_s = float(stats["dcpio_save_s"])
        result.torch_save_s = float(stats["torch_save_s"])
        result.dcpio_mb_s = result.state_bytes / 1e6 / max(result.dcpio_save_s, 1e-9)
        result.torch_mb_s = result.state_bytes / 1e6 / max(result.torch_save_s, 1e-9)
        result.speedup = result.dcpio_mb_s / max(result.torch_mb_s, 1e-9)
        ckpt = os.path.join(root, "dcpio_ckpt")
        result.files = sorted(f for f in os.listdir(ckpt) if not f.startswith("."))
        say(
            f"saved {result.state_bytes / 1e6:.1f} MB of model + optimizer state as {len(result.files)} files: "
            + ", ".join(result.files)
        )

        say("resuming on 1 process (no process group) with dcpio.FileSystemReader ...")
        t0 = time.perf_counter()
        model = build_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        msd, osd = get_state_dict(model, opt)
        state: dict[str, Any] = {"model": msd, "optim": osd, "step": 0}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no process group: loading in a single process" is the point here
            dcp.load(state, storage_reader=dcpio.FileSystemReader(ckpt), no_dist=True)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        result.load_s = time.perf_counter() - t0
        msd, osd = get_state_dict(model, opt)  # read back from the live model and optimizer
        resumed = dict(flatten({"model": msd, "optim": osd, "step": state["step"]}))

        reference = torch.load(os.path.join(root, _REFERENCE), map_location="cpu", weights_only=True)
        expected = dict(flatten(reference))
        for name in sorted(set(expected) | set(resumed)):
            want, got = expected.get(name), resumed.get(name)
            if isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor):
                result.tensors_checked += 1
                result.bytes_checked += want.numel() * want.element_size()
                ok = _same_bits(want, got)
            else:
                ok = name in expected and name in resumed and want == got
            if not ok:
                result.mismatches.append(name)
        result.bit_exact = not result.mismatches and result.tensors_checked > 0
        result.total_s = time.perf_counter() - start
        return result
    finally:
        if temp:
            shutil.rmtree(root, ignore_errors=True)
