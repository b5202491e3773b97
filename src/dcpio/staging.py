"""Staging for ``dcp.async_save``: a CPU copy of the state dict that training can no longer change.

``dcp.async_save`` calls ``stage(state_dict)`` on the caller's thread and writes the returned copy in the
background, so the time spent here is the time training is blocked. The copy reuses torch's state-dict traversal
(which understands DTensor and ShardedTensor) for structure and does the byte copies itself. With
``cache_staged_state_dict=True`` the buffers of the first copy are kept and refilled by later saves (pinned when an
accelerator is present), so from the second save on staging is one memcpy into warm memory, without allocating.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

__all__ = ["DcpioStager"]


def _accelerator_present() -> bool:
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver install must not break CPU checkpointing
        return False


class DcpioStager:
    """The ``AsyncStager`` half of :class:`dcpio.FileSystemWriter` (torch's protocol: ``stage``,
    ``should_synchronize_after_execute``, ``synchronize_staging``, ``close``)."""

    _synchronize_after_execute: bool = False

    def __init__(self, cache_staged_state_dict: bool = False) -> None:
        self.cache_staged_state_dict = cache_staged_state_dict
        self.state_dict_cache: dict[str, Any] | None = None

    @property
    def should_synchronize_after_execute(self) -> bool:
        return self._synchronize_after_execute

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Return a CPU copy of ``state_dict`` that later changes to the original cannot reach."""
        # the copy is already on the CPU: nothing to copy ahead of the writes
        self.per_thread_copy_ahead = 0
        if not self.cache_staged_state_dict:
            staged = _create_cpu_state_dict(state_dict)
            return _copy_state_dict(state_dict, staged)
        if self.state_dict_cache is None:
            self.state_dict_cache = _create_cpu_state_dict(state_dict, pin_memory=_accelerator_present())
        return _copy_state_dict(state_dict, self.state_dict_cache)

    def synchronize_staging(self) -> None:
        """Staging is blocking: nothing to wait for."""

    def close(self) -> None:
        self.state_dict_cache = None
