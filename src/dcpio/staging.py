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
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

__all__ = ["DcpioStager"]


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


class DcpioStager:
    """The ``AsyncStager`` half of :class:`dcpio.FileSystemWriter` (torch's protocol: ``stage``,
    ``should_synchronize_after_execute``, ``synchronize_staging``, ``close``)."""

    _synchronize_after_execute: bool = False
    per_thread_copy_ahead: int

    def __init__(self, cache_staged_state_dict: bool = False) -> None:
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
        try:
            staged = self._stage(state_dict, ())
            _copy_all(*self._pending)
        finally:
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

    def _stage_tensor(self, tensor: torch.Tensor, path: tuple[Any, ...]) -> torch.Tensor:
        src = tensor.detach()
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
        holder = {"v": value}
        cached = self._buffers.get(path)
        if cached is None:
            cached = _create_cpu_state_dict(holder, pin_memory=self.cache_staged_state_dict and _accelerator_present())
            if self.cache_staged_state_dict:
                self._buffers[path] = cached
        return _copy_state_dict(holder, cached)["v"]

    def synchronize_staging(self) -> None:
        """Staging is blocking: nothing to wait for."""

    def close(self) -> None:
        self.state_dict_cache = None
        self._buffers = {}
