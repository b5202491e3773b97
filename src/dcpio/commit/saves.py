"""Which save each metadata file belongs to: a save generation recorded in the metadata.

Every dcpio save records ``dcpio.save_generation=<n>`` in ``Metadata.storage_meta.modules`` (a list of strings
that stock torch carries and ignores, so torch still loads the checkpoint). A new save's generation is one more
than the highest generation of the per-rank metadata files in the directory (and, for a per-rank save, of the
global ``.metadata``), read when the save starts.

What it is for:

* A per-rank (``use_collectives=False``) checkpoint whose ranks committed different saves (one rank died before
  its commit) is refused on load, naming the ranks and their generations, instead of mixing old and new state.
* A global ``.metadata`` older than per-rank metadata beside it (a per-rank save over a collective checkpoint) is
  refused, so ``dcp.load`` falls back to the per-rank files (torch tries the global file first). The per-rank
  save therefore never removes the global file or anything it names: if a rank dies, nothing the previous
  checkpoint needs has gone.

The generation is agreed without any collective, from what is on storage when each rank starts (see
:func:`next_generation`): ranks that start from one consistent checkpoint pick the same number whatever order they
commit in. After a rank died, the ranks stay apart (the load keeps refusing, loudly) until a later save in which the
ranks that committed last time commit first, or a collective save; files can never tell a rank whether another
rank's newer metadata is from this save or from the one it missed. The marker is found in the last bytes of
a metadata file, without unpickling it.
"""

from __future__ import annotations

import re
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from dcpio.errors import CheckpointError, IncompleteCheckpointError
from dcpio.movers.base import FileSystemBase
from dcpio.names import METADATA_NAME, per_rank_metadata_rank

__all__ = [
    "GENERATION_PREFIX",
    "check_consistent",
    "generation_of",
    "next_generation",
    "per_rank_metadata",
    "record_generation",
]

GENERATION_PREFIX = "dcpio.save_generation="
_GEN_BYTES = re.compile(rb"dcpio\.save_generation=(\d{1,18})")
GLOBAL_METADATA = METADATA_NAME
# how much of a metadata file's end is searched for the marker (storage_meta holds the checkpoint path, at most a few
# KiB, then the marker and the version)
_TAIL_BYTES = 64 << 10


def record_generation(meta: StorageMeta, generation: int) -> StorageMeta:
    """``meta`` with the generation marker (any earlier marker replaced)."""
    modules = [m for m in (meta.modules or []) if not str(m).startswith(GENERATION_PREFIX)]
    meta.modules = [*modules, f"{GENERATION_PREFIX}{generation}"]
    return meta


def generation_of(metadata: Metadata) -> int | None:
    """The generation recorded in parsed metadata, or None (written by torch, or by an older dcpio)."""
    modules = getattr(getattr(metadata, "storage_meta", None), "modules", None)
    if not isinstance(modules, list):
        return None
    for entry in modules:
        if isinstance(entry, str) and entry.startswith(GENERATION_PREFIX):
            digits = entry[len(GENERATION_PREFIX) :]
            return int(digits) if digits.isdigit() and len(digits) <= 18 else None
    return None


def _names(fs: FileSystemBase, root: Any) -> list[str]:
    try:
        return [str(p).rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root)]
    except (OSError, NotImplementedError, CheckpointError):
        return []


def per_rank_metadata(names: list[str]) -> dict[int, str]:
    """Rank -> file name of every ``__{rank}.metadata`` among ``names``."""
    out: dict[int, str] = {}
    for name in names:
        rank = per_rank_metadata_rank(name)
        if rank is not None:
            out[rank] = name
    return out


def _file_generation(fs: FileSystemBase, root: Any, name: str) -> int | None:
    # storage_meta is pickled after the per-item tables, a few dozen bytes before the end: a tail read finds the
    # marker without reading (or unpickling) a metadata file of many megabytes, once per rank and load
    try:
        handle = fs.open_reader(str(fs.concat_path(root, name)))
        try:
            size = handle.size()
            start = max(0, size - _TAIL_BYTES)
            data = handle.read(start, size - start)
        finally:
            handle.close()
    except (OSError, CheckpointError):
        return None  # unreadable: the load of that file reports it; it votes for no generation
    match = _GEN_BYTES.search(data)
    return int(match.group(1)) if match else None


def next_generation(fs: FileSystemBase, root: Any, rank: int | None) -> int:
    """The generation a save starting now records (see the module docstring).

    A collective save (``rank=None``) takes one more than every per-rank file's. A per-rank save takes one more
    than the largest of its own previous generation, the global file's, and one less than any other rank's: the
    other ranks of this same save may already have committed (one ahead), and must not push this rank further.
    """
    names = _names(fs, root)
    ranks = per_rank_metadata(names)
    if rank is None:
        found = [_file_generation(fs, root, n) for n in ranks.values()]
        return 1 + max((g for g in found if g is not None), default=0)
    candidates = [_file_generation(fs, root, ranks[rank])] if rank in ranks else []
    if GLOBAL_METADATA in names:
        candidates.append(_file_generation(fs, root, GLOBAL_METADATA))
    for k, name in ranks.items():
        other = _file_generation(fs, root, name) if k != rank else None
        candidates.append(other - 1 if other is not None else None)
    return 1 + max((g for g in candidates if g is not None), default=0)


def _describe(gens: dict[int, int]) -> str:
    by_gen: dict[int, list[int]] = {}
    for rank, gen in sorted(gens.items()):
        by_gen.setdefault(gen, []).append(rank)
    return "; ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: save {g}" for g, r in by_gen.items())


def check_consistent(fs: FileSystemBase, root: Any, rank: int | None, metadata: Metadata, where: str) -> None:
    """Refuse metadata that another committed save has superseded, or per-rank metadata from different saves."""
    own = generation_of(metadata)
    if own is None:
        return
    names = _names(fs, root)
    ranks = per_rank_metadata(names)
    if rank is None:
        newer = {k: g for k, n in ranks.items() if (g := _file_generation(fs, root, n)) is not None and g > own}
        if newer:
            raise IncompleteCheckpointError(
                f"{where}: superseded by a later per-rank (use_collectives=False) save ({_describe(newer)}; this "
                f"file is save {own}). dcp.load falls back to the per-rank metadata; load with "
                "read_metadata(rank=...) to read it directly."
            )
        return
    gens = {k: g for k, n in ranks.items() if k != rank and (g := _file_generation(fs, root, n)) is not None}
    gens[rank] = own
    if len(set(gens.values())) > 1:
        behind = sorted(k for k, g in gens.items() if g < max(gens.values()))
        raise IncompleteCheckpointError(
            f"{root}: the ranks' metadata come from different saves ({_describe(gens)}): the last per-rank save did "
            f"not commit on rank{'s' if len(behind) > 1 else ''} {', '.join(map(str, behind))}. Loading would mix "
            "old and new state. Save again on every rank, or restore a complete checkpoint."
        )
