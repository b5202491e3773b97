"""The file names a checkpoint is made of, in one place (torch's DCP layout, Hugging Face folders, dcpio's own).

Formats, commit, tools and the manager all name files through these constants, so the layout is readable here and
stays the same across them.
"""

from __future__ import annotations

import re

__all__ = [
    "DATA_SUFFIX",
    "HF_INDEX_NAME",
    "LOCK_NAME",
    "METADATA_NAME",
    "SAFETENSORS_SUFFIX",
    "TEMP_SUFFIX",
    "data_file_name",
    "data_file_prefix",
    "data_file_rank",
    "hf_file_name",
    "hf_shard_rank",
    "is_dcp_member",
    "is_hf_export_file",
    "is_metadata_name",
    "lock_name",
    "owned_by_dcp",
    "owned_by_hf",
    "per_rank_metadata_name",
    "per_rank_metadata_rank",
    "rank_prefix",
    "step_name",
    "step_of",
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


def lock_name(rank: int | None) -> str:
    """The save lock's name for a collective save (``rank=None``) or a per-rank save (``__<rank>.dcpio.lock``, so
    the ranks of a ``use_collectives=False`` save do not exclude each other)."""
    return LOCK_NAME if rank is None else f"__{rank}{LOCK_NAME}"


def per_rank_metadata_name(rank: int) -> str:
    """The metadata file of ``rank`` in a save without collectives (``use_collectives=False``)."""
    return f"__{rank}{METADATA_NAME}"


def step_name(step: int) -> str:
    """A :class:`dcpio.CheckpointManager` step's directory name (zero-padded so names sort like numbers)."""
    return f"step-{step:08d}"


def step_of(name: str) -> int | None:
    """The step of a :func:`step_name` directory (any number of digits), or None for any other name."""
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


# ------------------------------------------------------------------------------------------ DCP data and metadata
_DATA_FILE = re.compile(r"^__(\d+)_\d+(\.[0-9a-f]{8})?\.distcp$")
_RANK_PREFIX = re.compile(r"^__(\d+)_")
_PER_RANK_METADATA = re.compile(r"^__(\d{1,9})\.metadata$")
# a DCP checkpoint's own files: data files (ours and torch's) and per-rank metadata
_DCP_MEMBER = re.compile(r"^__\d+(_\d+.*)?\.(distcp|metadata)$|\.distcp$")
_STEP_DIR = re.compile(r"^step-(\d+)$")


def data_file_prefix(rank: int) -> str:
    """What every data file of ``rank`` starts with (torch's planner may hand out its own prefix instead)."""
    return f"__{rank}_"


def data_file_name(prefix: str, n: int, save_tag: str | None = None) -> str:
    """``<prefix><n>.distcp`` (``prefix`` is :func:`data_file_prefix` or the one torch's planner gave); with
    ``save_tag`` (8 hex digits of a save id) ``<prefix><n>.<tag>.distcp``, the name a save takes when the plain one
    belongs to an earlier save."""
    return f"{prefix}{n}{'' if save_tag is None else '.' + save_tag}{DATA_SUFFIX}"


def data_file_rank(name: str) -> int | None:
    """The rank of a data file dcpio names (:func:`data_file_name`), or None for any other name."""
    match = _DATA_FILE.match(name)
    return int(match.group(1)) if match else None


def rank_prefix(name: str) -> int | None:
    """The rank of any file named ``__<rank>_...`` (torch's data files included), or None."""
    match = _RANK_PREFIX.match(name)
    return int(match.group(1)) if match else None


def per_rank_metadata_rank(name: str) -> int | None:
    """The rank of a :func:`per_rank_metadata_name` file, or None for any other name."""
    match = _PER_RANK_METADATA.match(name)
    return int(match.group(1)) if match else None


def is_metadata_name(name: str) -> bool:
    """``.metadata`` or a per-rank ``__<rank>.metadata``."""
    return name == METADATA_NAME or per_rank_metadata_rank(name) is not None


def is_dcp_member(name: str) -> bool:
    """A file only a DCP checkpoint holds: a ``.distcp`` data file or a per-rank metadata file."""
    return _DCP_MEMBER.search(name) is not None


def _without_temp(name: str) -> str:
    return name[: -len(TEMP_SUFFIX)] if name.endswith(TEMP_SUFFIX) else name


def owned_by_dcp(name: str) -> bool:
    """A file a DCP save writes (or its temporary): what a conversion into a DCP directory may replace."""
    stem = _without_temp(name)
    return is_metadata_name(stem) or stem.endswith(DATA_SUFFIX)


def owned_by_hf(name: str) -> bool:
    """A file a Hugging Face export writes (or its temporary): safetensors files and the index."""
    stem = _without_temp(name)
    return stem.endswith(SAFETENSORS_SUFFIX) or stem == HF_INDEX_NAME


# ------------------------------------------------------------------------------------------ Hugging Face exports
_HF_SHARD = re.compile(r"^shard-(\d{5})-model-\d{5}-of-\d{5}\.safetensors$")
_HF_EXPORT = re.compile(r"^(shard-\d{5}-)?model-\d{5}-of-\d{5}\.safetensors(\.tmp)?$")


def hf_file_name(index: int, count: int, shard: int | None = None) -> str:
    """``model-0000i-of-0000N.safetensors``; with ``shard`` (a ``save_distributed`` rank, from 1) the rank's
    ``shard-0000r-model-0000i-of-0000N.safetensors``."""
    base = f"model-{index:05d}-of-{count:05d}{SAFETENSORS_SUFFIX}"
    return base if shard is None else f"shard-{shard:05d}-{base}"


def hf_shard_rank(name: str) -> int | None:
    """The shard number of a ``save_distributed`` file (:func:`hf_file_name` with ``shard``), or None."""
    match = _HF_SHARD.match(name)
    return int(match.group(1)) if match else None


def is_hf_export_file(name: str) -> bool:
    """A file named as an HF export names its weights (:func:`hf_file_name`), or its temporary."""
    return _HF_EXPORT.match(name) is not None
