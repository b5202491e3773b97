"""The file names a checkpoint is made of, in one place (torch's DCP layout, Hugging Face folders, dcpio's own).

Formats, commit, tools and the manager all name files through these constants, so the layout is readable here and
stays the same across them.
"""

from __future__ import annotations

__all__ = [
    "DATA_SUFFIX",
    "HF_INDEX_NAME",
    "LOCK_NAME",
    "METADATA_NAME",
    "SAFETENSORS_SUFFIX",
    "TEMP_SUFFIX",
    "per_rank_metadata_name",
    "step_name",
]

# torch's DCP directory: one global metadata file (per-rank ``__<rank>.metadata`` for saves without collectives)
# and data files ``__<rank>_<n>.distcp``
METADATA_NAME = ".metadata"
DATA_SUFFIX = ".distcp"
# what a file is written as before its commit renames it into place (local disks)
TEMP_SUFFIX = ".tmp"
# dcpio's save lock in a checkpoint directory (one save at a time)
LOCK_NAME = ".dcpio.lock"
# Hugging Face folders
SAFETENSORS_SUFFIX = ".safetensors"
HF_INDEX_NAME = "model.safetensors.index.json"


def per_rank_metadata_name(rank: int) -> str:
    """The metadata file of ``rank`` in a save without collectives (``use_collectives=False``)."""
    return f"__{rank}{METADATA_NAME}"


def step_name(step: int) -> str:
    """A :class:`dcpio.CheckpointManager` step's directory name (zero-padded so names sort like numbers)."""
    return f"step-{step:08d}"
