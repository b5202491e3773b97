"""``dcpio verify``: read every byte of a checkpoint and report everything that is damaged, not the first only.

DCP checkpoints are read through dcpio's reader with checksum verification on, one stored chunk at a time
(memory is bounded by the largest chunk), catching the error of each chunk so that every damaged file and
tensor is listed. Files referenced by the metadata but missing, and files in the directory that nothing
references, are reported too. Hugging Face folders and torch.save files have no checksums: every tensor is
read in full and the structure checked.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from dcpio.errors import CheckpointError, CorruptCheckpointError
from dcpio.integrity.tiles import TILE_ATTRIBUTE, TileChecksums, hash_tiles
from dcpio.names import HF_INDEX_NAME, METADATA_NAME, is_metadata_name
from dcpio.tools._sources import (
    DcpSource,
    HfSource,
    ProgressFn,
    TorchFileSource,
    detect,
    is_url,
    url_fs,
)

__all__ = ["Problem", "VerifyReport", "verify_checkpoint"]


@dataclass
class Problem:
    """One thing wrong with a checkpoint.

    Attributes:
        kind: ``"corrupt"`` (bytes do not match), ``"missing-file"``, ``"truncated"``, ``"unreadable"``,
            ``"metadata"`` (no or bad ``.metadata``).
        file: the file concerned, relative to the checkpoint (``None`` if none in particular).
        item: the tensor or object concerned (``None`` for a whole-file problem).
        message: what went wrong and what to do.
    """

    kind: str
    file: str | None
    item: str | None
    message: str


@dataclass
class VerifyReport:
    """What :func:`verify_checkpoint` found.

    Attributes:
        path: the checkpoint.
        format: ``"dcp"``, ``"hf"`` or ``"torch"``.
        items_checked: entries read in full.
        bytes_read: stored bytes read.
        checksummed: every item had a dcpio checksum that was verified (``False`` for torch-written
            checkpoints, where only structure can be checked).
        problems: everything damaged; empty means sound.
        unreferenced: files in the directory the metadata does not mention (leftovers; harmless to loading).
    """

    path: str
    format: str
    items_checked: int = 0
    bytes_read: int = 0
    checksummed: bool = False
    problems: list[Problem] = field(default_factory=list)
    unreferenced: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def damaged_files(self) -> list[str]:
        """Files named by a problem."""
        return sorted({p.file for p in self.problems if p.file})

    def damaged_items(self) -> list[str]:
        """Tensors and objects named by a problem."""
        return sorted({p.item for p in self.problems if p.item})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _classify(err: BaseException) -> str:
    text = str(err).lower()
    if "truncat" in text or "ends early" in text or "end of file" in text:
        return "truncated"
    if isinstance(err, CheckpointError):
        return "corrupt"
    return "unreadable"


def _dir_listing(path: str, opts: Mapping[str, Any]) -> tuple[list[str], dict[str, int]]:
    """Plain files directly under the checkpoint directory and their sizes."""
    if is_url(path):
        fs, root = url_fs(path, opts)
        names: list[str] = []
        sizes: dict[str, int] = {}
        for info in fs.ls(root, detail=True):
            if info.get("type") != "file":
                continue
            name = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
            names.append(name)
            sizes[name] = int(info.get("size") or 0)
        return names, sizes
    names = [n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n))]
    return names, {n: os.path.getsize(os.path.join(path, n)) for n in names}


def _verify_dcp(path: str, report: VerifyReport, progress: ProgressFn | None, opts: Mapping[str, Any]) -> None:
    src = _open_dcp(path, report, opts)
    if src is None:
        return
    storage = src.storage_info()
    names, sizes = _dir_listing(path, opts)
    referenced = {info.relative_path for info in storage.values()}
    report.unreferenced = sorted(n for n in names if n not in referenced and not is_metadata_name(n))
    report.checksummed = bool(storage) and all(getattr(i, "dcpio_checksum", None) is not None for i in storage.values())
    # whole-file problems first: a missing or short file explains every item error that follows from it
    bad_files = _check_files(storage, sizes, report)
    total = sum(int(i.length) for i in storage.values() if i.relative_path not in bad_files)
    scan = _Scan(src, report, progress, bad_files, total)
    for idx, info in storage.items():
        scan.by_fqn.setdefault(idx.fqn, []).append(info)
        scan.by_chunk.setdefault((idx.fqn, tuple(idx.offset or ())), []).append(info)
    scan.tick(0)
    for name, md in src.metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            scan.blob(name)
        elif isinstance(md, TensorStorageMetadata):
            for chunk in md.chunks:
                scan.chunk(name, chunk)
        report.items_checked += 1
    scan.tick(total)


def _open_dcp(path: str, report: VerifyReport, opts: Mapping[str, Any]) -> DcpSource | None:
    """The checkpoint's source, or None with the metadata problem reported."""
    try:
        return DcpSource(path, opts)
    except FileNotFoundError as err:
        report.problems.append(
            Problem(
                "metadata",
                METADATA_NAME,
                None,
                f"{path}: .metadata is missing ({_first_line(err)}); "
                "the save never committed. Save again or restore .metadata from a good copy.",
            )
        )
    except CheckpointError as err:
        report.problems.append(Problem("metadata", METADATA_NAME, None, _first_line(err)))
    return None


def _check_files(storage: Mapping[Any, Any], sizes: Mapping[str, int], report: VerifyReport) -> set[str]:
    """Report data files that are missing or shorter than the metadata needs; return the missing ones."""
    needed: dict[str, int] = {}
    holders_of: dict[str, set[str]] = {}
    for idx, info in storage.items():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), int(info.offset) + int(info.length))
        holders_of.setdefault(info.relative_path, set()).add(idx.fqn)
    bad_files: set[str] = set()
    for rel, need in sorted(needed.items()):
        holders = sorted(holders_of[rel])
        if rel not in sizes:
            bad_files.add(rel)
            more = " ..." if len(holders) > 8 else ""
            fix = "Restore it from a good copy or save again."
            report.problems.append(
                Problem("missing-file", rel, None, f"{rel} is missing; it holds {', '.join(holders[:8])}{more}. {fix}")
            )
        elif sizes[rel] < need:
            report.problems.append(
                Problem(
                    "truncated",
                    rel,
                    None,
                    f"{rel} has {sizes[rel]} bytes but the metadata needs {need}; "
                    "it is truncated. Restore it from a good copy or save again.",
                )
            )
    return bad_files


class _Scan:
    """Reads every item of a checkpoint through its source, reporting each failure and going on."""

    def __init__(
        self, src: DcpSource, report: VerifyReport, progress: ProgressFn | None, bad_files: set[str], total: int
    ) -> None:
        self.src = src
        self.report = report
        self.progress = progress
        self.bad_files = bad_files
        self.total = total
        self.done = 0
        self.by_fqn: dict[str, list[Any]] = {}
        self.by_chunk: dict[tuple[str, tuple[int, ...]], list[Any]] = {}

    def tick(self, done: int) -> None:
        if self.progress is not None:
            self.progress("verify", min(done, self.total), self.total)

    def blob(self, name: str) -> None:
        infos = self.by_fqn.get(name, [])
        item_file = infos[0].relative_path if infos else None
        if item_file in self.bad_files:
            self.report.problems.append(
                Problem("missing-file", item_file, name, f"object {name!r}: {item_file} is missing")
            )
            return
        try:
            self.report.bytes_read += len(self.src.load_blob(name))
        except Exception as err:  # every failure of one item is reported and the scan goes on
            self.report.problems.append(
                Problem(_classify(err), item_file, name, f"object {name!r}: {_first_line(err)}")
            )
        self.done += sum(int(i.length) for i in infos)

    def chunk(self, name: str, chunk: Any) -> None:
        infos = self.by_chunk.get((name, tuple(chunk.offsets)), [])
        item_file = infos[0].relative_path if infos else None
        where = f"chunk at offsets {list(chunk.offsets)}"
        if item_file in self.bad_files:
            self.report.problems.append(Problem("missing-file", item_file, name, f"{where}: {item_file} is missing"))
            return
        try:
            buf = self.src.load_chunk(name, chunk)
            self.report.bytes_read += buf.numel() * buf.element_size()
            if infos:
                _check_tiles(infos[0], buf, f"{item_file}: tensor '{name}' ({where})")
        except Exception as err:  # every failure of one chunk is reported and the scan goes on
            self.report.problems.append(Problem(_classify(err), item_file, name, f"{where}: {_first_line(err)}"))
        self.done += sum(int(i.length) for i in infos)
        self.tick(self.done)


def _check_tiles(info: Any, chunk: torch.Tensor, where: str) -> None:
    """The column-segment digests (used by resharding loads) must agree with the data the blocks just verified."""
    record = getattr(info, TILE_ATTRIBUTE, None)
    if record is None or not _tiled(chunk):
        return
    tiles = TileChecksums.from_record(record, where)
    rows = chunk.shape[0]
    if tiles.rows != rows or tiles.row_bytes * rows != chunk.numel() * chunk.element_size():
        raise CorruptCheckpointError(
            f"{where}: the tile checksum record ({tiles.rows} rows of {tiles.row_bytes} bytes) does not match the "
            f"chunk's shape {list(chunk.shape)}; the metadata is damaged. Save the checkpoint again."
        )
    if hash_tiles(chunk.contiguous(), tiles.segments, tiles.group_rows) != tiles.digests:
        raise CorruptCheckpointError(
            f"{where}: the tile checksums in .metadata disagree with the data (which its block checksums vouch for); "
            "the metadata is damaged, and resharding loads of this tensor would fail. Save the checkpoint again."
        )


def _tiled(chunk: torch.Tensor) -> bool:
    return chunk.dim() >= 2 and chunk.device.type == "cpu"


def _hf_listing(path: str, report: VerifyReport) -> tuple[str, list[str], dict[str, str] | None] | None:
    """The folder, the data files to read (the index's when there is one) and the weight map; None after reporting
    an index that cannot be read."""
    from dcpio.formats.hf import list_files
    from dcpio.movers import FileSystem

    if not os.path.isdir(path):
        return os.path.dirname(path) or ".", [os.path.basename(path)], None
    try:
        names, weight_map = list_files(FileSystem(), path)
    except CheckpointError as err:
        report.problems.append(Problem("metadata", HF_INDEX_NAME, None, _first_line(err)))
        return None
    if weight_map is not None:
        listed = set(names)
        report.unreferenced = sorted(
            n for n in os.listdir(path) if n.endswith(".safetensors") and n not in listed and not n.startswith(".")
        )
    return path, names, weight_map


def _verify_hf_file(folder: str, rel: str, report: VerifyReport, bad_files: set[str]) -> bool:
    """Read every chunk of one data file through the reader (checksums verified); False when it has no checksums."""
    try:
        src = HfSource(folder, only_files=[rel])
    except (CheckpointError, OSError) as err:
        report.problems.append(Problem(_classify(err), rel, None, _first_line(err)))
        bad_files.add(rel)
        return False
    for entry in src.entries():
        md = src.metadata.state_dict_metadata[entry.name]
        for chunk in md.chunks if isinstance(md, TensorStorageMetadata) else []:
            try:
                t = src.load_chunk(entry.name, chunk)
                report.bytes_read += t.numel() * t.element_size()
            except Exception as err:  # every failure of one tensor is reported and the scan goes on
                report.problems.append(Problem(_classify(err), rel, entry.name, _first_line(err)))
                bad_files.add(rel)
        report.items_checked += 1
    return src.checksummed


def _verify_hf(path: str, report: VerifyReport, progress: ProgressFn | None) -> None:
    # one file at a time through the reader, so a broken header costs that file only and every other file is read;
    # then the folder as a whole, as a load sees it (index against files, sharded tensors tiled)
    listing = _hf_listing(path, report)
    if listing is None:
        return
    folder, names, weight_map = listing
    present = [n for n in names if os.path.exists(os.path.join(folder, n))]
    for n in names:
        if n not in present:
            held = sorted(k for k, f in (weight_map or {}).items() if f == n)
            report.problems.append(
                Problem(
                    "missing-file",
                    n,
                    None,
                    f"{n} is missing: model.safetensors.index.json lists it for {len(held)} tensors "
                    f"({', '.join(held[:5])}{' ...' if len(held) > 5 else ''}). Fetch or restore it.",
                )
            )
    total = sum(os.path.getsize(os.path.join(folder, n)) for n in present)
    done = 0
    bad_files: set[str] = set()
    checksummed = bool(present)
    for rel in present:
        checksummed = _verify_hf_file(folder, rel, report, bad_files) and checksummed
        done += os.path.getsize(os.path.join(folder, rel))
        if progress is not None:
            progress("verify", done, total)
    report.checksummed = checksummed and not bad_files
    if not report.problems and os.path.isdir(path):
        try:
            HfSource(path)
        except CheckpointError as err:
            report.problems.append(Problem("metadata", None, None, _first_line(err)))


def _verify_torch(path: str, report: VerifyReport, progress: ProgressFn | None) -> None:
    rel = os.path.basename(path)
    try:
        src = TorchFileSource(path)
    except CheckpointError as err:
        report.problems.append(Problem("corrupt", rel, None, _first_line(err)))
        return
    entries = src.entries()
    total = sum(e.nbytes for e in entries)
    done = 0
    for entry in entries:
        try:
            value = src.load(entry.name)
            if entry.kind == "tensor":
                # touching every byte pulls each mapped page in: a short file fails here
                value.contiguous().view(-1).view(torch.uint8).sum()
                report.bytes_read += entry.nbytes
        except Exception as err:  # every failure of one tensor is reported and the scan goes on
            report.problems.append(Problem(_classify(err), rel, entry.name, f"{entry.name}: {_first_line(err)}"))
        report.items_checked += 1
        done += entry.nbytes
        if progress is not None:
            progress("verify", done, total)


def verify_checkpoint(
    path: str | os.PathLike[str],
    progress: ProgressFn | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> VerifyReport:
    """Read every byte of the checkpoint at ``path`` and report every damaged file and item.

    Args:
        path: a DCP checkpoint (local path or fsspec URL), a Hugging Face safetensors folder, or a torch.save file.
        progress: optional ``progress(description, completed_bytes, total_bytes)`` callback.
        storage_options: fsspec options for a URL (``key``, ``secret``, ``client_kwargs`` ...).

    Returns:
        A :class:`VerifyReport`; ``report.ok`` is True when nothing is wrong.

    Raises:
        FileNotFoundError: nothing at ``path``.
        dcpio.IncompleteCheckpointError: a path that is not a checkpoint at all.
    """
    path = str(path)
    try:
        found = detect(path)
    except CheckpointError as err:
        # a directory with data files but no .metadata is a damaged checkpoint, which verify reports
        if os.path.isdir(path) and "metadata is missing" in str(err):
            report = VerifyReport(path=path, format="dcp")
            report.problems.append(Problem("metadata", METADATA_NAME, None, _first_line(err)))
            return report
        raise
    report = VerifyReport(path=found.path, format=found.kind)
    if found.kind == "dcp":
        _verify_dcp(found.path, report, progress, dict(storage_options or {}))
    elif found.kind == "hf":
        _verify_hf(found.path, report, progress)
    else:
        _verify_torch(found.path, report, progress)
    return report
