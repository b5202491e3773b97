"""Zero-copy views of tensor memory as bytes, for every dtype torch has.

``memoryview`` over a CPU tensor's storage lets ``os.writev``/``os.preadv``, checksums and compressors work on tensor
memory directly: no ``.numpy()`` (which refuses bfloat16 and the float8 types) and no ``bytes(...)`` copy.
The tensor must outlive the view; callers keep a reference for as long as they use it.
"""

from __future__ import annotations

import ctypes
import threading

import torch

__all__ = ["byte_view", "empty_like_bytes", "is_dense_cpu", "thread_scratch"]


def is_dense_cpu(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` is a C-contiguous CPU tensor whose bytes can be viewed directly."""
    return tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.layout == torch.strided


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a C-contiguous CPU tensor's elements (not the whole storage)."""
    if not is_dense_cpu(tensor):
        raise ValueError(
            f"byte_view needs a contiguous CPU tensor, got device={tensor.device} "
            f"contiguous={tensor.is_contiguous()}; call .contiguous().cpu() first"
        )
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray(0))
    array = (ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())
    return memoryview(array).cast("B")


def empty_like_bytes(nbytes: int) -> tuple[torch.Tensor, memoryview]:
    """A fresh uint8 CPU tensor of ``nbytes`` and its byte view (the tensor keeps the memory alive)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    return buf, byte_view(buf)


_scratch = threading.local()


def thread_scratch(key: str, nbytes: int) -> torch.Tensor:
    """A per-thread reusable uint8 buffer of ``nbytes`` (one per ``key``, so two users in one thread never share).

    Fresh memory costs a page fault per 4 KiB on first use, which for a resharding load (a scratch copy of every
    stored chunk) cost as much as the reads themselves. The buffer grows at least twofold when it must grow; what it
    returns is valid until the same thread asks for the same ``key`` again.
    """
    buffers: dict[str, torch.Tensor] | None = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buf = buffers.get(key)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(max(nbytes, 2 * (0 if buf is None else buf.numel())), dtype=torch.uint8)
        buffers[key] = buf
    return buf[:nbytes]
