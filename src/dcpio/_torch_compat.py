"""Every private name of torch that dcpio uses, in one place.

dcpio implements torch's public storage interfaces, but a few of the types and helpers it must share with torch are
private (``_StorageInfo`` is what torch's readers and writers store in ``Metadata.storage_data``, for example). They
are imported here and nowhere else, so a torch upgrade that moves one breaks one module, and the list of what to
check on an upgrade is this file. Optional helpers come back as ``None`` where a torch lacks them.
"""

from __future__ import annotations

from typing import Any

from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint._extension import Extension as _TorchExtension
from torch.distributed.checkpoint._extension import StreamTransformExtension as _TorchStreamTransform
from torch.distributed.checkpoint.filesystem import _StorageInfo, _StoragePrefix

__all__ = [
    "_StorageInfo",
    "_StoragePrefix",
    "_TorchExtension",
    "_TorchStreamTransform",
    "_copy_state_dict",
    "_create_cpu_state_dict",
    "dist_wrapper_type",
    "fake_tensor_mode",
    "flatten_state_dict",
]


def dist_wrapper_type() -> type | None:
    """torch's ``_DistWrapper`` (the collectives helper of ``dcp.save``/``dcp.load``), or None."""
    try:
        from torch.distributed.checkpoint.utils import _DistWrapper
    except ImportError:
        return None
    return _DistWrapper


def flatten_state_dict() -> Any:
    """torch's ``flatten_state_dict`` (how DCP names nested keys), or None."""
    try:
        from torch.distributed.checkpoint._nested_dict import flatten_state_dict as flatten
    except ImportError:
        return None
    return flatten


def fake_tensor_mode() -> Any:
    """torch's ``FakeTensorMode`` (tensors without storage, to write a ``torch.save`` file's skeleton)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode
