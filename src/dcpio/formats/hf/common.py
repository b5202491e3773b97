"""What the Hugging Face writer, reader and consolidation share: file names, the sharding and checksum entries of
a safetensors header, the checksummed file write, index and listing helpers.

Layout (facts as in torch's ``hf_storage``, so torch's reader, ``safetensors`` and ``transformers`` load it):

* ``model-0000i-of-0000N.safetensors`` per file index of ``fqn_to_index_mapping`` (one ``model-00001-of-00001``
  without it) and ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``), written last.
* ``save_distributed=True``: every rank writes ``shard-0000r-model-0000i-of-0000N.safetensors`` with its own chunks;
  each file's ``__metadata__`` carries ``DCP_SHARDING_INFO`` (JSON: fqn -> ``{"saved_offsets": [...]}``),
  ``DCP_VERSION`` and ``format: pt``. With ``enable_consolidation`` those go under ``sharded/`` and the coordinator
  then writes full tensors beside it.
* dcpio adds ``dcpio_checksums`` to ``__metadata__``: an xxh3-64 digest per tensor (other readers ignore it).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import xxhash
from torch.futures import Future

from dcpio import knobs
from dcpio._runtime import raise_first, run_queued
from dcpio.commit import StagedFile
from dcpio.errors import (
    CheckpointWriteError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
)
from dcpio.formats.safetensors import (
    SafetensorsHeader,
    TensorEntry,
    encode_header,
    parse_header,
    write_staged,
)
from dcpio.integrity.paths import check_plain_name
from dcpio.movers.base import FileSystemBase
from dcpio.movers.local import write_error
from dcpio.names import HF_INDEX_NAME, SAFETENSORS_SUFFIX, is_hf_export_file
from dcpio.tensor_bytes import byte_view, is_dense_cpu

__all__ = [
    "CHECKSUMS_KEY",
    "INDEX_NAME",
    "SAVED_OFFSETS_KEY",
    "SHARDED_DIR",
    "SHARDING_INFO_KEY",
    "SUFFIX",
    "digests_metadata",
    "list_files",
    "tensor_digest",
]

INDEX_NAME = HF_INDEX_NAME


SUFFIX = SAFETENSORS_SUFFIX


SHARDED_DIR = "sharded"


SHARDING_INFO_KEY = "DCP_SHARDING_INFO"


SAVED_OFFSETS_KEY = "saved_offsets"


CHECKSUMS_KEY = "dcpio_checksums"  # __metadata__ string: JSON tensor name -> "xxh3-64:<16 hex digits>"


_DIGEST_PREFIX = "xxh3-64:"


_DCP_VERSION = "1.0"


_COPY_BLOCK = 16 << 20  # scratch bytes per strided copy during consolidation


T = TypeVar("T")


R = TypeVar("R")


def _join(fs: FileSystemBase, directory: str, name: str) -> str:
    return str(fs.concat_path(directory, name))


def _parallel(fn: Callable[[T], R], items: Sequence[T], threads: int) -> list[R]:
    """``fn`` over ``items`` on at most ``threads`` threads, results in order; after a failure no new item starts,
    and the first failure is raised with any others attached as notes."""
    results: list[Any] = [None] * len(items)

    def task(i: int) -> None:
        results[i] = fn(items[i])

    raise_first(
        run_queued([functools.partial(task, i) for i in range(len(items))], threads, keep_going=False, name="dcpio-hf")
    )
    return results


def _done(value: Any) -> Future[Any]:
    fut: Future[Any] = Future()
    fut.set_result(value)
    return fut


def _sharding_info(header: SafetensorsHeader) -> dict[str, list[int]]:
    """``saved_offsets`` per tensor from ``DCP_SHARDING_INFO``, validated; all-zero offsets where absent."""
    raw = (header.metadata or {}).get(SHARDING_INFO_KEY)
    out = {name: [0] * len(e.shape) for name, e in header.tensors.items()}
    if raw is None:
        return out
    try:
        info = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise CorruptCheckpointError(f"{header.path}: {SHARDING_INFO_KEY} in the header is not JSON: {err}") from err
    if not isinstance(info, dict):
        raise CorruptCheckpointError(f"{header.path}: {SHARDING_INFO_KEY} is not a JSON object")
    for name, entry in header.tensors.items():
        item = info.get(name)
        offsets = item.get(SAVED_OFFSETS_KEY) if isinstance(item, dict) else None
        ndim = len(entry.shape)
        if (
            not isinstance(offsets, list)
            or len(offsets) != ndim
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        ):
            raise CorruptCheckpointError(
                f"{header.path}: tensor {name!r}: {SHARDING_INFO_KEY} gives saved_offsets {str(offsets)[:80]}, "
                f"expected {ndim} non-negative ints; the shard file is damaged, save it again"
            )
        out[name] = offsets
    return out


def tensor_digest(tensor: torch.Tensor) -> str:
    """The checksum string recorded for a tensor's stored bytes (``xxh3-64:<hex>``)."""
    t = tensor.detach()
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.cpu().contiguous()
    return _DIGEST_PREFIX + xxhash.xxh3_64_hexdigest(byte_view(t))


def digests_metadata(digests: Mapping[str, str]) -> dict[str, str]:
    """The ``__metadata__`` entry carrying per-tensor checksums (safetensors and transformers ignore it)."""
    return {CHECKSUMS_KEY: json.dumps(dict(sorted(digests.items())), separators=(",", ":"))}


def _checksums(header: SafetensorsHeader) -> dict[str, str]:
    """Per-tensor checksums from ``__metadata__`` (empty for files without them), validated."""
    raw = (header.metadata or {}).get(CHECKSUMS_KEY)
    if raw is None:
        return {}
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise CorruptCheckpointError(f"{header.path}: {CHECKSUMS_KEY} in the header is not JSON: {err}") from err
    ok = isinstance(doc, dict) and all(
        isinstance(v, str) and v.startswith(_DIGEST_PREFIX) and len(v) == len(_DIGEST_PREFIX) + 16 for v in doc.values()
    )
    if not ok or set(doc) - set(header.tensors):
        raise CorruptCheckpointError(
            f"{header.path}: {CHECKSUMS_KEY} in the header is damaged (not a map of this file's tensors to "
            f"{_DIGEST_PREFIX} digests); restore the file from a good copy or export it again"
        )
    return dict(doc)


def _check_digest(data: memoryview | Any, want: str | None, path: str, key: str) -> None:
    """Compare bytes (a buffer, or a finished ``xxh3_64`` hasher) with the checksum recorded for them."""
    if want is None:
        return
    got = _DIGEST_PREFIX + (data.hexdigest() if hasattr(data, "hexdigest") else xxhash.xxh3_64_hexdigest(data))
    if got != want:
        raise CorruptCheckpointError(
            f"{path}: tensor {key!r}: its bytes do not match the checksum recorded when it was exported ({want}, "
            f"read {got}); the file is damaged. Restore it from a good copy or export it again"
        )


def _cpu_dense(tensor: torch.Tensor) -> torch.Tensor:
    t = tensor.detach()
    return t if is_dense_cpu(t) else t.cpu().contiguous()


def _write_checksummed(
    fs: FileSystemBase,
    staged: StagedFile,
    entries: Sequence[TensorEntry],
    get: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str],
    *,
    sync: bool,
    publish: bool,
) -> int:
    """Write a safetensors file whose header carries every tensor's checksum into ``staged``; return its length.

    The header comes first in the file but the checksums are known only once each tensor has been fetched. Where the
    file is local, the header is written with placeholder digests of the same length, each tensor hashed as it is
    streamed (fetched, and copied off an accelerator, once), and the header overwritten in place before the file is
    synced. Elsewhere every tensor is fetched and hashed first. ``publish``: commit the staged file under its final
    name; otherwise only finish it, for a :class:`dcpio.commit.GroupCommit` to publish with the others.
    """
    if fs.local_root(_dirname(staged.temp)) is None:
        meta = {**metadata, **digests_metadata({e.name: tensor_digest(get(e.name)) for e in entries})}
        return write_staged(staged, entries, get, meta, sync=sync, publish=publish)
    digests: dict[str, str] = {}

    def hashed(name: str) -> torch.Tensor:
        t = _cpu_dense(get(name))
        digests[name] = tensor_digest(t)
        return t

    placeholder = digests_metadata({e.name: _DIGEST_PREFIX + "0" * 16 for e in entries})
    size = write_staged(staged, entries, hashed, {**metadata, **placeholder}, sync=False, publish=False)
    try:
        _patch_head(staged.temp, encode_header(entries, {**metadata, **digests_metadata(digests)}), sync)
        if publish:
            staged.commit(sync)
    except BaseException:
        staged.abort()
        raise
    return size


def _patch_head(path: str, head: bytes, sync: bool) -> None:
    """Overwrite the start of a just-written file (a header of unchanged length), then make the file durable."""
    try:
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
        try:
            if os.pwrite(fd, head, 0) != len(head):
                raise CheckpointWriteError(f"{path}: short write of the header; export again")
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        raise write_error(path, err, "writing the header") from err


def _dirname(path: str) -> str:
    return os.path.dirname(str(path)) or "."


def _read_header(fs: FileSystemBase, path: str) -> SafetensorsHeader:
    handle = fs.open_reader(path)
    try:
        return parse_header(handle, handle.size(), path)
    finally:
        handle.close()


def _list_safetensors(fs: FileSystemBase, directory: str) -> list[str]:
    return sorted(
        p for p in fs.ls(directory) if os.path.basename(p).endswith(SUFFIX) and not os.path.basename(p).startswith(".")
    )


def _write_index(fs: FileSystemBase, directory: str, weight_map: Mapping[str, str], total: int, sync: bool) -> None:
    doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    fs.write_file_atomic(_join(fs, directory, INDEX_NAME), (json.dumps(doc, indent=2) + "\n").encode(), sync)


def _remove_stale(fs: FileSystemBase, directory: str, keep: set[str]) -> None:
    """After a commit, drop data files of this layout that the new index does not name (an older save's)."""
    try:
        names = [os.path.basename(p) for p in fs.ls(directory)]
    except FileNotFoundError:
        return
    for name in names:
        if is_hf_export_file(name) and name not in keep:
            fs.remove_quietly(_join(fs, directory, name))


def list_files(fs: FileSystemBase, path: str) -> tuple[list[str], dict[str, str] | None]:
    """The data files of an HF folder and its weight map: those ``model.safetensors.index.json`` names when there is
    one (other ``*.safetensors`` beside it are an older export's and are ignored), else every ``*.safetensors``.

    Raises:
        CorruptCheckpointError: the index is not valid JSON or has no weight map.
        UnsafeCheckpointError: the index names something that is not a plain file name in the folder.
        IncompleteCheckpointError: no data files at all.
    """
    index_path = _join(fs, path, INDEX_NAME)
    if fs.exists(index_path):
        raw = fs.read_file(index_path, knobs.max_metadata_bytes())
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            raise CorruptCheckpointError(f"{index_path}: not valid JSON ({err}); restore or re-download it") from err
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CorruptCheckpointError(f"{index_path}: no weight_map of tensor name -> file name")
        names = sorted({check_plain_name(v, path, index_path) for v in weight_map.values()})
        return names, weight_map
    names = [os.path.basename(p) for p in _list_safetensors(fs, path)]
    if not names:
        raise IncompleteCheckpointError(
            f"{path}: no {SUFFIX} files and no {INDEX_NAME}; this is not a Hugging Face checkpoint folder "
            "(or the save never finished)"
        )
    return names, None


def _check_present(fs: FileSystemBase, path: str, names: Sequence[str], weight_map: Mapping[str, str]) -> None:
    missing = [n for n in names if not fs.exists(_join(fs, path, n))]
    if missing:
        held = sorted(k for k, f in weight_map.items() if f in set(missing))
        raise IncompleteCheckpointError(
            f"{path}/{INDEX_NAME} lists {', '.join(missing[:5])}"
            + (" ..." if len(missing) > 5 else "")
            + f", which the folder lacks ({len(held)} tensors, e.g. {held[:3]}); the download or copy is incomplete "
            "(transformers cannot load it either). Fetch the missing files again"
        )
