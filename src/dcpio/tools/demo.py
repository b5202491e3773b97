"""``dcpio demo``: a training run's checkpoints end to end, and what only dcpio does, on an embedded model.

1. Two real processes join a gloo process group on 127.0.0.1 and train a small model (an embedding, a few linear
   layers: about 9.5M fp32 parameters, ~38 MB) with FSDP2 (``fully_shard``): every parameter and optimizer state
   tensor is a DTensor sharded ``Shard(0)`` over the two ranks. After every step they save through a
   :class:`dcpio.CheckpointManager` (``keep_last=2``), which keeps the two newest committed steps. The final state
   is also saved with :class:`dcpio.FileSystemWriter` and with torch's stock writer (``dcpio_ckpt``, ``torch_ckpt``,
   for ``dcpio diff``), and rank 0 keeps the full (gathered) state as a ``torch.save`` reference.
2. A crashed save: a separate process starts saving the next step into the same run and is SIGKILLed once its data
   files are being written. The manager's newest committed step is still the previous one.
3. The resume: this process, with no process group, loads the manager's newest step into a fresh model and
   optimizer (resharding 2 ranks to 1), and compares every tensor bit for bit with the reference.
4. A load that reads only what it needs: the model alone, from the same checkpoint: bytes read (the kernel's
   ``rchar`` plus what dcpio took from memory-mapped files) against the checkpoint's size.
5. A flipped byte: a copy of the checkpoint with one byte of one tensor flipped. dcpio's reader refuses it, naming
   the file and the tensor; torch's stock reader loads it without a word.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
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
from dcpio.names import DATA_SUFFIX

__all__ = ["DemoResult", "run_demo"]

VOCAB = 8192
DIM = 512
HIDDEN = 1024
WORLD_SIZE = 2
KEEP_LAST = 2
_STATS = "demo_stats.json"
_REFERENCE = "reference_full_state.pt"
_RUN = "run"


@dataclass
class DemoResult:
    """What :func:`run_demo` measured and checked.

    Attributes:
        directory: where the checkpoints were written (removed afterwards unless a directory was given).
        world_size: ranks that trained and saved.
        steps: optimizer steps taken (one manager save after each).
        parameters: model parameters.
        state_bytes: bytes of tensor data saved per step (model plus optimizer state, all ranks).
        files: data files of the newest step's checkpoint.
        kept_steps: the steps the manager kept (``keep_last=2``).
        save_s: seconds of the manager's last save (between barriers).
        save_mb_s: ``state_bytes`` / ``save_s``, in MB/s (10^6 bytes).
        crash_step: the step whose save was SIGKILLed mid-way.
        crash_files: data files that save had begun when it was killed.
        crash_latest: the manager's newest committed step after the kill.
        crash_intact: the previous step stayed the newest committed one and resumed bit for bit.
        load_s: seconds the single-process resume (2 ranks to 1) took.
        tensors_checked: tensors compared bit for bit after the resume.
        bytes_checked: their bytes.
        bit_exact: every tensor and value matched.
        mismatches: names that did not match.
        partial_read_bytes: bytes read to load the model alone from the same checkpoint.
        checkpoint_bytes: bytes of that checkpoint's files.
        partial_stats: the reader's own account of that load (:class:`dcpio.IOStats` summary).
        corrupt_caught: dcpio's reader refused the copy with a flipped byte.
        corrupt_message: the first line of its error.
        torch_loaded_corrupt: torch's stock reader loaded the damaged copy without an error.
        total_s: the whole demo, process start-up included.
    """

    directory: str
    world_size: int
    steps: int
    parameters: int = 0
    state_bytes: int = 0
    files: list[str] = field(default_factory=list)
    kept_steps: list[int] = field(default_factory=list)
    save_s: float = 0.0
    save_mb_s: float = 0.0
    crash_step: int = 0
    crash_files: int = 0
    crash_latest: int | None = None
    crash_intact: bool = False
    load_s: float = 0.0
    tensors_checked: int = 0
    bytes_checked: int = 0
    bit_exact: bool = False
    mismatches: list[str] = field(default_factory=list)
    partial_read_bytes: int = 0
    checkpoint_bytes: int = 0
    partial_stats: str = ""
    corrupt_caught: bool = False
    corrupt_message: str = ""
    torch_loaded_corrupt: bool = False
    total_s: float = 0.0

    @property
    def ok(self) -> bool:
        """Everything the demo shows held."""
        return self.bit_exact and self.crash_intact and self.corrupt_caught

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


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

    import dcpio

    torch.set_num_threads(1)  # two ranks on two cores: one thread each avoids oversubscription
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model, opt = _sharded_model(world_size)
        manager = dcpio.CheckpointManager(os.path.join(directory, _RUN), keep_last=KEEP_LAST)
        seconds = 0.0
        for step in range(1, steps + 1):
            _train_step(model, opt, rank, step)
            msd, osd = get_state_dict(model, opt)
            state = {"model": msd, "optim": osd, "step": step}
            dist.barrier()
            t0 = time.perf_counter()
            manager.save(step, state)
            dist.barrier()
            seconds = time.perf_counter() - t0
        kept = manager.steps()
        manager.close()
        # the same final state through the plain writer and torch's stock one, for `dcpio diff`
        dcp.save(state, storage_writer=dcpio.FileSystemWriter(os.path.join(directory, "dcpio_ckpt")))
        dcp.save(state, storage_writer=TorchWriter(os.path.join(directory, "torch_ckpt")))

        full_m, full_o = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save({"model": full_m, "optim": full_o, "step": steps}, os.path.join(directory, _REFERENCE))
            stats = {
                "parameters": sum(p.numel() for p in model.parameters()),
                "state_bytes": _tensor_bytes(state),
                "save_s": seconds,
                "kept_steps": kept,
            }
            with open(os.path.join(directory, _STATS), "w") as f:
                json.dump(stats, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _sharded_model(world_size: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    model = build_model()
    for layer in model.children():
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> None:
    x = _batch(rank, step)
    logits = model(x[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    loss.backward()  # type: ignore[no-untyped-call]
    opt.step()
    opt.zero_grad()


def _crashing_save(run: str, step: int, nbytes: int) -> None:
    """Body of the process the demo kills: save ``step`` into the run (it never returns on its own in time)."""
    import dcpio

    gen = torch.Generator().manual_seed(step)
    per = max(1, nbytes // 4 // 8)
    state = {f"t{i}": torch.randn(per, generator=gen) for i in range(8)}
    dcpio.CheckpointManager(run, keep_last=KEEP_LAST).save(step, state)
    print("committed", flush=True)  # reached only when the kill came too late


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


def _crash(run: str, step: int, nbytes: int, timeout: float) -> int:
    """Start saving ``step`` in another process and SIGKILL it once its data files exist; return how many."""
    from dcpio.manager import step_name

    src_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = src_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = f"from dcpio.tools.demo import _crashing_save; _crashing_save({run!r}, {step}, {nbytes})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    target = os.path.join(run, step_name(step))
    deadline = time.monotonic() + timeout
    begun: list[str] = []
    try:
        while not begun and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
            try:
                begun = [n for n in os.listdir(target) if n.endswith(DATA_SUFFIX)]
            except FileNotFoundError:
                continue
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    finally:
        _, err = proc.communicate()
    if proc.returncode != -signal.SIGKILL:
        tail = err.decode(errors="replace").strip().splitlines()[-5:]
        raise CheckpointError(f"the demo's crashing save exited {proc.returncode} before it was killed: {tail}")
    return len(begun)


def _load_model_only(reader: Any) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    state = {"model": build_model().state_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def _partial_load(path: str) -> tuple[int, int, str]:
    """Load the model alone (2 ranks' shards into 1 process); return (bytes read, checkpoint bytes, the reader's
    account of the load)."""
    import dcpio

    size = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
    reader = dcpio.FileSystemReader(path)
    _load_model_only(reader)
    stats = reader.stats  # what the reader did: requests, bytes read or copied out of memory maps, bytes verified
    return stats.bytes_read + stats.bytes_mapped, size, stats.summary()


def _flip_a_byte(src: str, dst: str, fqn: str) -> str:
    """Copy checkpoint ``src`` to ``dst`` with one byte in the middle of ``fqn``'s first chunk flipped."""
    import dcpio

    shutil.copytree(src, dst)
    metadata = dcpio.FileSystemReader(dst).read_metadata()
    info = next(v for k, v in metadata.storage_data.items() if k.fqn == fqn)
    with open(os.path.join(dst, info.relative_path), "r+b") as f:
        f.seek(info.offset + info.length // 2)
        byte = f.read(1)
        f.seek(info.offset + info.length // 2)
        f.write(bytes([byte[0] ^ 0x10]))
    return str(info.relative_path)


def _first_failure(err: BaseException) -> BaseException:
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        found: BaseException = first[0] if isinstance(first, tuple) else first
        return found
    return err


def _corruption(root: str, newest: str) -> tuple[bool, str, bool]:
    """Flip a byte in a copy; (dcpio refused it, dcpio's message, torch's stock reader loaded it)."""
    from torch.distributed.checkpoint import FileSystemReader as TorchReader
    from torch.distributed.checkpoint.api import CheckpointException

    import dcpio

    damaged = os.path.join(root, "damaged_copy")
    _flip_a_byte(newest, damaged, "model.0.weight")
    try:
        _load_model_only(dcpio.FileSystemReader(damaged))
        caught, message = False, ""
    except (CheckpointError, CheckpointException) as err:
        inner = _first_failure(err)
        caught = isinstance(inner, dcpio.CorruptCheckpointError)
        message = str(inner).strip().splitlines()[0]
    try:
        _load_model_only(TorchReader(damaged))
        torch_loaded = True
    except (Exception, CheckpointException):  # any refusal by torch counts as "not loaded"
        torch_loaded = False
    return caught, message, torch_loaded


def _resume(mgr: Any, reference: str, result: DemoResult) -> None:
    """Load the manager's newest step into a fresh model and optimizer; compare with the reference bit for bit."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from dcpio.tools._sources import flatten

    t0 = time.perf_counter()
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    msd, osd = get_state_dict(model, opt)
    state: dict[str, Any] = {"model": msd, "optim": osd, "step": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: loading in a single process" is the point here
        mgr.load(state)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    result.load_s = time.perf_counter() - t0
    msd, osd = get_state_dict(model, opt)  # read back from the live model and optimizer
    resumed = dict(flatten({"model": msd, "optim": osd, "step": state["step"]}))
    expected = dict(flatten(torch.load(reference, map_location="cpu", weights_only=True)))
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


def _read_stats(root: str, result: DemoResult) -> None:
    with open(os.path.join(root, _STATS)) as f:
        stats = json.load(f)
    result.parameters = int(stats["parameters"])
    result.state_bytes = int(stats["state_bytes"])
    result.save_s = float(stats["save_s"])
    result.save_mb_s = result.state_bytes / 1e6 / max(result.save_s, 1e-9)
    result.kept_steps = [int(s) for s in stats["kept_steps"]]


def run_demo(
    directory: str | os.PathLike[str] | None = None,
    steps: int = 3,
    log: Callable[[str], None] | None = None,
    timeout: float = 300.0,
) -> DemoResult:
    """Train on 2 gloo ranks saving each step through a CheckpointManager; crash a save; resume; show dcpio's checks.

    Args:
        directory: where to write the checkpoints (kept). None: a temporary directory, removed afterwards.
        steps: training steps (a save after each).
        log: called with one line per stage (the CLI prints them).
        timeout: seconds allowed for the training ranks, and for the crashing save to begin.

    Returns:
        A :class:`DemoResult`; ``ok`` says whether everything it shows held.

    Raises:
        dcpio.CheckpointError: a training rank failed (its log tail is in the message).
    """
    import dcpio
    from dcpio.manager import step_name

    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    say = log or (lambda _line: None)
    start = time.perf_counter()
    temp = directory is None
    root = tempfile.mkdtemp(prefix="dcpio-demo-") if directory is None else os.fspath(directory)
    os.makedirs(root, exist_ok=True)
    result = DemoResult(directory=root, world_size=WORLD_SIZE, steps=steps)
    try:
        say(
            f"training {steps} steps on {WORLD_SIZE} gloo ranks (FSDP2, parameters and optimizer state sharded "
            f"Shard(0)), saving each step with dcpio.CheckpointManager(keep_last={KEEP_LAST}) ..."
        )
        _launch(root, steps, timeout)
        _read_stats(root, result)
        run = os.path.join(root, _RUN)
        newest = os.path.join(run, step_name(steps))
        result.files = sorted(f for f in os.listdir(newest) if not f.startswith("."))

        result.crash_step = steps + 1
        say(f"crash: another process saves step {result.crash_step} into the run and is SIGKILLed mid-write ...")
        result.crash_files = _crash(run, result.crash_step, result.state_bytes, timeout)
        mgr = dcpio.CheckpointManager(run)
        result.crash_latest = mgr.latest()

        say(f"resuming step {result.crash_latest} on 1 process (no process group) with the manager ...")
        _resume(mgr, os.path.join(root, _REFERENCE), result)
        result.crash_intact = result.crash_latest == steps and result.bit_exact

        say("loading the model alone from the same checkpoint, then a copy with one byte flipped ...")
        result.partial_read_bytes, result.checkpoint_bytes, result.partial_stats = _partial_load(newest)
        result.corrupt_caught, result.corrupt_message, result.torch_loaded_corrupt = _corruption(root, newest)
        result.total_s = time.perf_counter() - start
        return result
    finally:
        if temp:
            shutil.rmtree(root, ignore_errors=True)
