"""Library functions behind the ``dcpio`` command: inspect, verify, convert, diff, demo.

Each is usable in-process (the CLI is a thin layer over them)::

    from dcpio.tools import inspect_checkpoint, verify_checkpoint, diff_checkpoints, convert
"""

from __future__ import annotations

from dcpio.tools.convert import ConvertResult, convert, parse_size
from dcpio.tools.diff import DiffEntry, DiffReport, diff_checkpoints
from dcpio.tools.inspect import CheckpointSummary, ItemSummary, inspect_checkpoint
from dcpio.tools.verify import Problem, VerifyReport, verify_checkpoint

__all__ = [
    "CheckpointSummary",
    "ConvertResult",
    "DiffEntry",
    "DiffReport",
    "ItemSummary",
    "Problem",
    "VerifyReport",
    "convert",
    "diff_checkpoints",
    "inspect_checkpoint",
    "parse_size",
    "verify_checkpoint",
]
