"""Collectives of the load or save in progress: read a file on one rank and hand its bytes to the others.

dcpio's reader and writer are called by ``dcp.load`` / ``dcp.save`` on every rank, but torch hands them neither the
process group nor a way to talk to the other ranks. :func:`resolve_group` finds the group: an explicit one given to
the reader's ``process_group=`` keyword, or, by default (``"auto"``), the group of the ``dcp.load`` / ``dcp.save``
call in progress, found on the call stack (torch's ``_DistWrapper``). A call from anywhere else (a user calling
``read_metadata()`` on one rank, ``dcp.load(..., no_dist=True)``) finds no group and reads locally: a collective
entered by only some ranks would hang.

Tensors for a group's collectives live on the device its backend serves: CPU for gloo, the current CUDA device for
NCCL (whose object collectives need one too, which is why dcpio moves raw bytes in tensors itself).

Errors travel as (type name, message): the receiving rank raises the same dcpio error class (or ``FileNotFoundError``)
with the message prefixed by the rank that failed; nothing is unpickled from a peer.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch

from dcpio import errors
from dcpio._torch_compat import _StoragePrefix, dist_wrapper_type

__all__ = [
    "AUTO",
    "DecidedPrefix",
    "GroupInfo",
    "PeerError",
    "agree_on_failures",
    "read_once",
    "resolve_group",
    "share_blob",
]

AUTO = "auto"
_STACK_DEPTH = 24  # frames searched for torch's _DistWrapper: read_metadata sits about 6 below _load_state_dict


@dataclass(frozen=True)
class GroupInfo:
    """The process group of one load or save, with this rank's place in it."""

    group: Any  # a ProcessGroup; None is torch's default group
    rank: int
    world: int
    cpu: bool  # the backend moves CPU tensors (gloo)
    cuda: bool  # the backend moves CUDA tensors (NCCL)

    def device(self, prefer: torch.device | None = None) -> torch.device:
        """Where a tensor for this group's collectives must live, ``prefer`` when the backend serves it."""
        if prefer is not None and prefer.type == "cuda" and self.cuda:
            return prefer
        if self.cpu:
            return torch.device("cpu")
        return torch.device("cuda", torch.cuda.current_device())


@dataclass
class DecidedPrefix(_StoragePrefix):
    """A save plan's storage data: the rank's file-name prefix, the names the directory held when the coordinator
    looked, once for all ranks (a rank never writes over one of them), and whether the save is refused because a
    checkpoint exists there (``overwrite=False``)."""

    taken: frozenset[str] = frozenset()
    refused: bool = False


class PeerError(errors.CheckpointReadError):
    """Another rank of the load failed; this rank stopped too (the bytes it needed were that rank's to read)."""


def _loader_wrapper() -> Any:
    """torch's ``_DistWrapper`` of the ``dcp.load`` / ``dcp.save`` on the call stack, or None."""
    wrapper_type = dist_wrapper_type()
    if wrapper_type is None:  # a torch without it: behave as if called outside dcp
        return None
    frame: FrameType | None = sys._getframe(2)
    for _ in range(_STACK_DEPTH):
        if frame is None:
            return None
        for name in ("distW", "self"):
            value = frame.f_locals.get(name)
            if isinstance(value, wrapper_type):
                return value
        frame = frame.f_back
    return None


def resolve_group(setting: Any) -> GroupInfo | None:
    """The group to share reads over: None where there is none, or a single rank (then every rank reads itself).

    Args:
        setting: ``None`` (never share), ``"auto"`` (the group of the ``dcp.load`` / ``dcp.save`` in progress), or a
            ``ProcessGroup``.
    """
    if setting is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = setting
    if isinstance(setting, str):
        if setting != AUTO:
            raise ValueError(f"process_group must be a ProcessGroup, 'auto' or None, got {setting!r}")
        wrapper = _loader_wrapper()
        if wrapper is None or not wrapper.use_dist:
            return None
        group = wrapper.group
    world = dist.get_world_size(group)
    if world < 2:
        return None
    backend = str(dist.get_backend(group)).lower()
    has_cuda = "nccl" in backend
    has_cpu = "gloo" in backend or "mpi" in backend or not has_cuda
    return GroupInfo(group, dist.get_rank(group), world, has_cpu, has_cuda)


def _encode_error(err: BaseException) -> bytes:
    return f"{type(err).__name__}\n{err}".encode(errors="replace")


def _rebuild_error(raw: bytes, src: int) -> Exception:
    name, _, message = raw.decode(errors="replace").partition("\n")
    text = f"rank {src}: {message}"
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, errors.CheckpointError) and cls is not PeerError:
        return cls(text)
    if name == "FileNotFoundError":
        return FileNotFoundError(text)
    return PeerError(f"{text} ({name} on that rank)")


def _broadcast(tensor: torch.Tensor, src: int, info: GroupInfo) -> None:
    import torch.distributed as dist

    dist.broadcast(tensor, group=info.group, group_src=src)


def share_blob(info: GroupInfo, src: int, produce: Callable[[], bytes] | None) -> bytes:
    """``produce()`` on rank ``src``, its bytes on every rank; its exception raised on every rank.

    Two broadcasts: a status and length first, so that a failure on ``src`` reaches the others as an error
    instead of leaving them waiting for bytes that never come.
    """
    device = info.device()
    header = torch.zeros(2, dtype=torch.int64, device=device)
    payload = b""
    failure: BaseException | None = None
    if info.rank == src:
        if produce is None:
            raise ValueError("share_blob: the source rank must produce the bytes")
        try:
            payload = produce()
        except Exception as err:  # every rank raises it, after the broadcast below
            failure = err
            payload = _encode_error(err)
        header[0], header[1] = int(failure is not None), len(payload)
    _broadcast(header, src, info)
    status, length = (int(v) for v in header.tolist())
    buf = torch.empty(length, dtype=torch.uint8, device=device)
    if info.rank == src and length:
        buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    if length:
        _broadcast(buf, src, info)
    if failure is not None:
        raise failure
    data = payload if info.rank == src else buf.cpu().numpy().tobytes()
    if status:
        raise _rebuild_error(data, src)
    return data


def read_once(setting: Any, read: Callable[[], bytes], src: int = 0) -> bytes:
    """``read()`` on one rank of the collective call in progress, the bytes on all (``read()`` everywhere
    when there is no group)."""
    info = resolve_group(setting)
    if info is None:
        return read()
    return share_blob(info, src, read if info.rank == src else None)


def agree_on_failures(info: GroupInfo, failure: BaseException | None) -> None:
    """Every rank of the group says whether it failed; if any did, every rank raises.

    A rank that failed re-raises its own error; the others raise the first failed rank's error rebuilt from its
    type and message (:class:`PeerError` when it is not one of dcpio's), naming that rank.
    """
    import torch.distributed as dist

    device = info.device()
    mine = torch.tensor([int(failure is not None)], dtype=torch.int64, device=device)
    flags = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(info.world)]
    dist.all_gather(flags, mine, group=info.group)
    failed = [r for r, flag in enumerate(flags) if int(flag.item())]
    if not failed:
        return
    first = failed[0]
    encoded = _encode_error(failure) if failure is not None else b""
    message = share_blob(info, first, (lambda: encoded) if info.rank == first else None)
    if failure is not None:
        raise failure
    raise _rebuild_error(message, first)
