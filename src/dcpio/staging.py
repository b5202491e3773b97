"""Staging for ``dcp.async_save``: a CPU copy of the state dict that training can no longer change.

``dcp.async_save`` calls ``stage(state_dict)`` on the caller's thread and writes the returned copy in the
background, so the time spent here is the time training is blocked. The walk copies every tensor into fresh CPU
memory, deep-copies any other value (torch's own stager refuses values that are not tensors, containers or
primitives), and keeps DTensor / ShardedTensor wrappers by staging them with torch's state-dict helpers. With
``cache_staged_state_dict=True`` the tensor buffers of the first copy are kept (pinned when an accelerator is
present) and refilled by later saves, so from the second save on staging is one memcpy into warm memory.

The walk only pairs each CPU tensor with its buffer; the copies then run as one ``torch._foreach_copy_`` call. One
``copy_`` per tensor costs about 30 us of dispatch and thread fork/join each: 11 ms of a 64 MiB, 381-tensor state
dict (17 ms against 5.5 ms batched, measured here). CUDA tensors staged into pinned buffers (the cached case) are
queued with ``non_blocking=True`` and waited for once per device at the end of ``stage``, instead of one
synchronising copy per tensor.

**Staging budget** (``staging_budget=`` bytes, or ``DCPIO_STAGING_BUDGET``): the copy held for the background write
is at most that large. Tensors are taken in walk order; one that no longer fits is written to the checkpoint
directory right away, while ``stage`` runs (straight from its memory on the CPU; through the I/O engine's bounded,
pinned copy-ahead from an accelerator), and the staged dict holds a *placeholder* in its place: a tensor of the same
dtype and shape whose 16-byte storage carries a token (all strides 0), which costs no memory, crosses a process
boundary (``AsyncCheckpointerType.PROCESS``) and survives torch's planner. The writer's ``write_data`` turns each
placeholder's item into the write result recorded when its bytes were written. So ``async_save`` returns once every
tensor is either staged or written, and the extra host memory stays within the budget plus the engine's copy-ahead.
An accelerator tensor larger than the whole budget is still copied to the host whole, one at a time, while it is
written (CPU tensors are written from their own memory, with no copy). Bytes written early go to files named like the
save's own (``__{rank}_{n}.{tag}.distcp``): a save that fails or that
another rank ends up writing (replicated tensors) leaves files the next committed save removes.
"""

from __future__ import annotations

import copy
import sys
import uuid
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlanner, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from dcpio import knobs
from dcpio._torch_compat import _copy_state_dict, _create_cpu_state_dict
from dcpio.engine import FileJob, WriteOptions, write_files
from dcpio.errors import CheckpointExistsError
from dcpio.names import METADATA_NAME, data_file_name, data_file_prefix

__all__ = ["DcpioStager", "take_prewritten"]

_MAGIC = b"dcpioPW1"  # first half of a placeholder's 16-byte storage; the second half is its token
_TOKEN_BYTES = 16


@dataclass
class _Overflow:
    """A tensor that did not fit the budget: written by ``stage`` itself, a placeholder left in its place."""

    token: bytes
    source: torch.Tensor


def _accelerator_present() -> bool:
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver install must not break CPU checkpointing
        return False


def _is_distributed_tensor(value: object) -> bool:
    if not isinstance(value, torch.Tensor) or type(value) is torch.Tensor:
        return False
    name = type(value).__name__
    return name in ("DTensor", "ShardedTensor")


def _copy_all(dests: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``dests[i].copy_(sources[i])`` for every i, in one call (CPU tensors of matching dtypes)."""
    if not dests:
        return
    foreach_copy = getattr(torch, "_foreach_copy_", None)
    if foreach_copy is not None:
        try:
            foreach_copy(dests, sources)
            return
        except (RuntimeError, TypeError):  # a layout the batched kernel refuses: copy one by one
            pass
    for dest, src in zip(dests, sources):
        dest.copy_(src)


def _placeholder(like: torch.Tensor, token: bytes) -> torch.Tensor:
    """A tensor of ``like``'s dtype and shape over a 16-byte storage holding ``_MAGIC`` and ``token``."""
    storage = torch.UntypedStorage(_TOKEN_BYTES)  # type: ignore[no-untyped-call]
    raw = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (_TOKEN_BYTES,), (1,))
    raw.copy_(torch.frombuffer(bytearray(_MAGIC + token), dtype=torch.uint8))
    shape = tuple(like.shape)
    return torch.empty(0, dtype=like.dtype).set_(storage, 0, shape, (0,) * len(shape))


def placeholder_token(value: object) -> bytes | None:
    """The token of a placeholder made by :func:`_placeholder`, None for any other value."""
    if not isinstance(value, torch.Tensor) or value.device.type != "cpu" or value.layout != torch.strided:
        return None
    if any(value.stride()) or value.untyped_storage().nbytes() != _TOKEN_BYTES:
        return None
    raw = torch.empty(0, dtype=torch.uint8).set_(value.untyped_storage(), 0, (_TOKEN_BYTES,), (1,))
    data = raw.numpy().tobytes()
    return data[8:] if data[:8] == _MAGIC else None


def take_prewritten(
    items: list[WriteItem], planner: SavePlanner, prewritten: dict[bytes, tuple[int, Any]]
) -> tuple[list[WriteItem], list[WriteResult]]:
    """Split a save plan's items into those still to write and the results of those ``stage`` already wrote."""
    if not prewritten:
        return items, []
    rest: list[WriteItem] = []
    done: list[WriteResult] = []
    for item in items:
        token = placeholder_token(planner.resolve_data(item)) if item.type != WriteItemType.BYTE_IO else None
        found = prewritten.get(token) if token is not None else None
        if found is None:
            rest.append(item)
        else:
            done.append(WriteResult(index=item.index, size_in_bytes=found[0], storage_data=found[1]))
    return rest, done


class _SourcePlanner:
    """The planner the I/O engine sees when ``stage`` writes overflow tensors: items resolve to their sources."""

    def __init__(self, sources: dict[str, torch.Tensor]) -> None:
        self.sources = sources

    def resolve_data(self, item: WriteItem) -> torch.Tensor:
        return self.sources[item.index.fqn]


def _overflow_item(entry: _Overflow) -> WriteItem:
    src = entry.source
    shape = torch.Size(src.shape)
    chunk = ChunkStorageMetadata(offsets=torch.Size([0] * len(shape)), sizes=shape)
    props = TensorProperties(dtype=src.dtype)
    return WriteItem(
        index=MetadataIndex(entry.token.hex()),
        type=WriteItemType.TENSOR,
        tensor_data=TensorWriteData(chunk=chunk, properties=props, size=shape),
    )


def _checkpoint_id_in_progress() -> Any:
    """The ``checkpoint_id`` given to the ``dcp.async_save`` that calls ``stage`` (None if none was given)."""
    frame = sys._getframe(1)
    for _ in range(16):
        if frame.f_code.co_name == "async_save" and "checkpoint_id" in frame.f_locals:
            return frame.f_locals["checkpoint_id"]
        if frame.f_back is None:
            break
        frame = frame.f_back
    return None


class DcpioStager:
    """The ``AsyncStager`` half of :class:`dcpio.FileSystemWriter` (torch's protocol: ``stage``,
    ``should_synchronize_after_execute``, ``synchronize_staging``, ``close``)."""

    _synchronize_after_execute: bool = False
    per_thread_copy_ahead: int
    # the writer's, used to write tensors over the budget while staging
    fs: Any
    path: Any
    sync_files: bool
    overwrite: bool
    extensions: Any
    serialization_format: Any
    thread_count: int | None

    def __init__(self, cache_staged_state_dict: bool = False, staging_budget: int | None = None) -> None:
        if staging_budget is not None and staging_budget < 0:
            raise ValueError(f"staging_budget must be a number of bytes >= 0 (or None), got {staging_budget}")
        self.staging_budget = staging_budget
        # token -> (bytes, storage info) of the tensors the last stage() wrote itself
        self.prewritten: dict[bytes, tuple[int, Any]] = {}
        self._room: int | None = None  # budget left during a walk; None: no budget
        self._overflow: list[_Overflow] = []
        self.cache_staged_state_dict = cache_staged_state_dict
        self.state_dict_cache: dict[str, Any] | None = None
        self._buffers: dict[tuple[Any, ...], Any] = {}
        # (buffers, sources) of the CPU tensors found by the walk in progress
        self._pending: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        # accelerator devices with device-to-host copies into pinned buffers queued by the walk in progress
        self._cuda_devices: set[torch.device] = set()

    @property
    def should_synchronize_after_execute(self) -> bool:
        return self._synchronize_after_execute

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Return a CPU copy of ``state_dict`` that later changes to the original cannot reach."""
        # the copy is already on the CPU: nothing to copy ahead of the writes
        self.per_thread_copy_ahead = 0
        if not self.cache_staged_state_dict:
            self._buffers = {}
        budget = self.staging_budget if self.staging_budget is not None else knobs.staging_budget()
        self._room = budget if budget is not None and self._format_allows_prewrite() else None
        self.prewritten = {}
        try:
            staged: dict[str, Any] = self._stage(state_dict, ())
            self._write_overflow()
            _copy_all(*self._pending)
        finally:
            self._room = None
            self._overflow = []
            # the background writer reads these buffers: every queued device-to-host copy must have landed,
            # also when the walk failed halfway (the buffers are reused by the next save)
            for device in self._cuda_devices:
                torch.cuda.synchronize(device)
            self._pending = ([], [])
            self._cuda_devices = set()
        if self.cache_staged_state_dict:
            self.state_dict_cache = staged
        return staged

    def _stage(self, value: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(value, dict):
            try:
                out = type(value)()  # keeps OrderedDict and other dict subclasses
            except TypeError:
                out = {}
            for key, item in value.items():
                out[key] = self._stage(item, (*path, key))
            return out
        if isinstance(value, list | tuple) and not hasattr(value, "_fields"):
            items = [self._stage(item, (*path, i)) for i, item in enumerate(value)]
            return type(value)(items)
        if _is_distributed_tensor(value):
            return self._stage_wrapped(value, path)
        if isinstance(value, torch.Tensor):
            return self._stage_tensor(value, path)
        return copy.deepcopy(value)

    def _over_budget(self, src: torch.Tensor) -> bool:
        """Whether ``src`` is written now instead of staged (and the budget it takes if not)."""
        if self._room is None or src.layout != torch.strided or src.device.type not in ("cpu", "cuda"):
            return False
        nbytes = src.numel() * src.element_size()
        if nbytes <= self._room:
            self._room -= nbytes
            return False
        return True

    def _defer(self, src: torch.Tensor) -> torch.Tensor:
        entry = _Overflow(uuid.uuid4().bytes[:8], src)
        self._overflow.append(entry)
        return _placeholder(src, entry.token)

    def _stage_tensor(self, tensor: torch.Tensor, path: tuple[Any, ...]) -> torch.Tensor:
        src = tensor.detach()
        if self._over_budget(src):
            return self._defer(src)
        buf = self._buffers.get(path)
        fits = (
            isinstance(buf, torch.Tensor)
            and buf.shape == src.shape
            and buf.dtype == src.dtype
            and buf.layout == src.layout
        )
        if not fits:
            pin = self.cache_staged_state_dict and src.device.type != "cpu" and _accelerator_present()
            buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=pin) if src.layout == torch.strided else None
        if buf is None:  # sparse and other layouts: a plain copy
            buf = src.to("cpu", copy=True)
        elif src.device.type == "cpu" and buf.dtype == src.dtype:
            self._pending[0].append(buf)  # copied with the others once the walk is done
            self._pending[1].append(src)
        elif src.device.type == "cuda" and buf.is_pinned():
            # queued on the device's stream without waiting for each one; stage() waits once for all of them
            buf.copy_(src, non_blocking=True)
            self._cuda_devices.add(src.device)
        else:
            buf.copy_(src, non_blocking=False)
        if self.cache_staged_state_dict:
            self._buffers[path] = buf
        return buf

    def _stage_wrapped(self, value: torch.Tensor, path: tuple[Any, ...]) -> Any:
        # DTensor / ShardedTensor: torch's helpers know how to rebuild the wrapper around a CPU local tensor
        local = value.to_local() if hasattr(value, "to_local") else None  # DTensor: its local shard
        if isinstance(local, torch.Tensor) and self._over_budget(local.detach()):
            from torch.distributed.tensor import DTensor

            stand_in = self._defer(local.detach())
            spec = (value.device_mesh, value.placements)  # type: ignore[attr-defined]
            return DTensor.from_local(stand_in, *spec, run_check=False, shape=value.shape, stride=value.stride())
        holder = {"v": value}
        cached = self._buffers.get(path)
        if cached is None:
            cached = _create_cpu_state_dict(holder, pin_memory=self.cache_staged_state_dict and _accelerator_present())
            if self.cache_staged_state_dict:
                self._buffers[path] = cached
        return _copy_state_dict(holder, cached)["v"]

    def _format_allows_prewrite(self) -> bool:
        # placeholders become torch_save records; the SAFETENSORS layout writes one blob per file at the end
        return bool(getattr(self.serialization_format, "value", self.serialization_format) == "torch_save")

    def _write_overflow(self) -> None:
        """Write the tensors over the budget into new data files of the checkpoint directory, now."""
        if not self._overflow:
            return
        given = _checkpoint_id_in_progress()
        root = self.fs.init_path(given) if given else self.path
        self.fs.mkdir(root)
        if not self.overwrite and self.fs.exists(str(self.fs.concat_path(root, METADATA_NAME))):
            raise CheckpointExistsError(
                f"{root}: a checkpoint already exists here and the writer has overwrite=False. It was left "
                "untouched; save to a new directory, or pass overwrite=True to replace it."
            )
        threads = self.thread_count if self.thread_count is not None else knobs.default_io_threads()
        jobs = _overflow_jobs(self.fs, root, self._overflow, threads)
        opts = WriteOptions(
            threads=threads,
            sync=self.sync_files,
            extensions=tuple(self.extensions),
            copy_ahead=min(10_000_000, self.staging_budget or 10_000_000),
        )
        sources = {entry.token.hex(): entry.source for entry in self._overflow}
        results = write_files(self.fs, jobs, _SourcePlanner(sources), opts)  # type: ignore[arg-type]
        self.prewritten = {bytes.fromhex(r.index.fqn): (r.size_in_bytes, r.storage_data) for r in results}

    def synchronize_staging(self) -> None:
        """Staging is blocking: nothing to wait for."""

    def close(self) -> None:
        self.state_dict_cache = None
        self._buffers = {}


def _overflow_jobs(fs: Any, root: Any, overflow: list[_Overflow], threads: int) -> list[Any]:
    """Overflow tensors spread over up to ``threads`` new files, largest first onto the lightest."""
    rank = 0
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
    tag = uuid.uuid4().hex[:8]
    count = max(1, min(threads, len(overflow)))
    buckets: list[list[WriteItem]] = [[] for _ in range(count)]
    loads = [0] * count
    for entry in sorted(overflow, key=lambda e: e.source.numel() * e.source.element_size(), reverse=True):
        j = loads.index(min(loads))
        buckets[j].append(_overflow_item(entry))
        loads[j] += entry.source.numel() * entry.source.element_size()
    jobs = []
    for n, items in enumerate(buckets):
        # numbered far above the per-save files write_data creates (one per thread), so the names never meet
        name = data_file_name(data_file_prefix(rank), 100_000 + n, tag)
        jobs.append(FileJob(name, str(fs.concat_path(root, name)), tuple(items)))
    return jobs
