"""``dcpio convert``: between DCP checkpoints, Hugging Face safetensors folders and single ``torch.save`` files.

Every direction streams, so memory stays bounded:

* DCP -> HF: full tensors are assembled one shard file at a time (at most ``max_shard_size`` bytes held), then
  ``model.safetensors.index.json`` maps each tensor to its file. Non-tensor entries cannot live in
  safetensors and are listed in :attr:`ConvertResult.skipped`.
* HF -> DCP and torch.save file -> DCP: the source tensors are memory-mapped (pages come from the file on use
  and can be dropped again), then saved with dcpio's writer.
* DCP -> torch.save file: the file's skeleton (pickle and record layout) is written first without tensor
  data, then mapped shared and each tensor read from the DCP checkpoint straight into its place in the file,
  one at a time. The result loads with plain ``torch.load`` (``weights_only=True`` included), nested
  structure preserved.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from dcpio.errors import CheckpointError, CheckpointExistsError
from dcpio.tools._sources import DcpSource, HfSource, ProgressFn, Source, TorchFileSource, detect, is_url

__all__ = ["ConvertResult", "convert", "parse_size"]

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"500MiB"`` -> 524_288_000, ``123`` -> 123 (as transformers reads
    them)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "").lower().removesuffix("b")
    if unit not in _UNITS:
        raise ValueError(f"unknown size unit in {text!r}; use B, KB, MB, GB, TB or KiB, MiB, GiB, TiB")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value


@dataclass
class ConvertResult:
    """What :func:`convert` wrote.

    Attributes:
        src: the source checkpoint.
        dst: what was written.
        to: ``"hf"``, ``"dcp"`` or ``"torch"``.
        files: files written, relative to ``dst`` (for a torch file: its name).
        tensors: tensors written.
        bytes: tensor bytes written.
        skipped: entries that the target format cannot hold (non-tensor values in safetensors).
    """

    src: str
    dst: str
    to: str
    files: list[str] = field(default_factory=list)
    tensors: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)


def _prepare_dir(dst: str, overwrite: bool) -> None:
    if os.path.exists(dst):
        if not os.path.isdir(dst):
            if not overwrite:
                raise CheckpointExistsError(f"{dst}: exists and is a file; choose a new DST or pass overwrite")
            os.remove(dst)
        elif os.listdir(dst):
            if not overwrite:
                raise CheckpointExistsError(
                    f"{dst}: exists and is not empty; choose a new DST or pass --overwrite to replace it"
                )
            shutil.rmtree(dst)
    os.makedirs(dst, exist_ok=True)


def _to_hf(src: Source, dst: str, max_shard_size: int, progress: ProgressFn | None, res: ConvertResult) -> None:
    entries = src.entries()
    tensors = [e for e in entries if e.kind == "tensor"]
    res.skipped = [e.name for e in entries if e.kind != "tensor"]
    # plan the shards from the metadata first, so file names can carry the final count (model-00001-of-00003)
    shards: list[list[Any]] = []
    size = 0
    for e in tensors:
        if not shards or (size > 0 and size + e.nbytes > max_shard_size):
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    total = sum(e.nbytes for e in tensors)
    from dcpio.formats.safetensors import write_file
    from dcpio.movers import FileSystem

    fs = FileSystem()
    weight_map: dict[str, str] = {}
    done = 0
    n = len(shards)
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        batch: dict[str, torch.Tensor] = {}
        for e in shard:
            batch[e.name] = src.load(e.name).contiguous()
            weight_map[e.name] = fname
        # written atomically (tmp + rename) and fsynced by the HF engineer's streaming writer
        write_file(fs, os.path.join(dst, fname), batch, metadata={"format": "pt"})
        res.files.append(fname)
        res.tensors += len(batch)
        shard_bytes = sum(t.numel() * t.element_size() for t in batch.values())
        res.bytes += shard_bytes
        done += shard_bytes
        del batch
        if progress is not None:
            progress("convert", done, total)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
    res.files.append("model.safetensors.index.json")


def _make_writer(dst: str, opts: Mapping[str, Any]) -> Any:
    import dcpio

    if is_url(dst):
        writer_cls = getattr(dcpio, "FsspecWriter", None)
        if writer_cls is None:
            raise CheckpointError(f"{dst}: this dcpio build has no fsspec writer (dcpio.FsspecWriter)")
        return writer_cls(dst, **opts)
    writer_cls = getattr(dcpio, "FileSystemWriter", None)
    if writer_cls is None:  # the core has not landed in this checkout: fall back to torch's writer
        from torch.distributed.checkpoint import FileSystemWriter

        return FileSystemWriter(dst)
    return writer_cls(dst)


def _to_dcp(src: Source, dst: str, progress: ProgressFn | None, res: ConvertResult, opts: Mapping[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp

    state: dict[str, Any]
    if isinstance(src, HfSource):
        state = {e.name: src.load_mmap(e.name) for e in src.entries()}
    elif isinstance(src, TorchFileSource):
        if not isinstance(src.obj, dict):
            raise CheckpointError(f"{src.path}: holds a {type(src.obj).__name__}, not a dict; DCP saves dicts only")
        state = src.obj
    else:
        raise ValueError(f"{src.path}: is already a DCP checkpoint; convert it --to hf or --to torch (or copy it)")
    entries = src.entries()
    total = sum(e.nbytes for e in entries)
    if progress is not None:
        progress("convert", 0, total)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: saving in a single process" is what we want
        dcp.save(state, storage_writer=_make_writer(dst, opts), no_dist=True)
    res.tensors = sum(1 for e in entries if e.kind == "tensor")
    res.bytes = total
    res.files = sorted(os.listdir(dst)) if not is_url(dst) else []
    if progress is not None:
        progress("convert", total, total)


def _nest(paths: list[tuple[tuple[Any, ...], Any]]) -> Any:
    """Rebuild the nested dicts and lists a DCP state dict was flattened from (its planner's path mapping)."""
    root: dict[Any, Any] = {}
    for path, value in paths:
        node: Any = root
        for depth, key in enumerate(path):
            last = depth == len(path) - 1
            nxt_is_index = not last and isinstance(path[depth + 1], int)
            if isinstance(node, list):
                while len(node) <= key:
                    node.append(None)
                if last:
                    node[key] = value
                else:
                    if node[key] is None:
                        node[key] = [] if nxt_is_index else {}
                    node = node[key]
            else:
                if last:
                    node[key] = value
                else:
                    if key not in node:
                        node[key] = [] if nxt_is_index else {}
                    node = node[key]
    return root


def _to_torch(src: Source, dst: str, progress: ProgressFn | None, res: ConvertResult) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.serialization import skip_data

    entries = src.entries()
    values: list[tuple[tuple[Any, ...], Any]] = []
    tensor_names: dict[tuple[Any, ...], str] = {}
    # the skeleton: tensors without data (fake ones: no memory) and the small non-tensor values themselves
    with FakeTensorMode():
        fakes = {e.name: torch.empty(e.shape or (), dtype=e.dtype) for e in entries if e.kind == "tensor"}
    for e in entries:
        path = src.object_path(e.name) if isinstance(src, DcpSource) else (e.name,)
        if e.kind == "tensor":
            values.append((path, fakes[e.name]))
            tensor_names[path] = e.name
        else:
            try:
                values.append((path, src.load(e.name)))
            except CheckpointError:
                res.skipped.append(e.name)
    skeleton = _nest(values)
    tmp = os.path.join(os.path.dirname(os.path.abspath(dst)), f".{os.path.basename(dst)}.tmp")
    with skip_data(materialize_fake_tensors=True):
        torch.save(skeleton, tmp)
    del skeleton, fakes
    # map the file shared: what we copy into a tensor lands in the file; pages are written back and dropped
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        mapped = torch.load(tmp, map_location="cpu", weights_only=True, mmap=True)
    total = sum(e.nbytes for e in entries)
    done = 0
    for path, name in tensor_names.items():
        node: Any = mapped
        for key in path:
            node = node[key]
        if isinstance(src, DcpSource):
            src.load_into(name, node)
        else:
            node.copy_(src.load(name))
        res.tensors += 1
        done += node.numel() * node.element_size()
        if progress is not None:
            progress("convert", done, total)
    res.bytes = done
    del mapped, node
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)
    res.files = [os.path.basename(dst)]


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    to: str,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> ConvertResult:
    """Convert the checkpoint at ``src`` into format ``to`` at ``dst``.

    Args:
        src: a DCP checkpoint (local path or fsspec URL), a Hugging Face safetensors folder, or a torch.save file.
        dst: where to write: a directory for ``hf`` and ``dcp`` (a URL too for ``dcp``), a file for ``torch``.
        to: ``"hf"`` (full tensors in safetensors shards plus ``model.safetensors.index.json``), ``"dcp"``
            (written with :class:`dcpio.FileSystemWriter`), or ``"torch"`` (one ``torch.save`` file).
        max_shard_size: largest shard for ``hf`` (bytes or a string like ``"5GB"``); one tensor larger than
            it gets a shard of its own.
        overwrite: replace an existing non-empty ``dst``.
        progress: optional ``progress(description, completed_bytes, total_bytes)`` callback.
        storage_options: fsspec options for a URL source or a URL destination (``--to dcp``).

    Returns:
        A :class:`ConvertResult`.

    Raises:
        dcpio.CheckpointExistsError: ``dst`` exists and ``overwrite`` is False.
        dcpio.CheckpointError: the source cannot be read or converted (e.g. a torch file holding no dict).
        ValueError: an unknown ``to``, an unreadable ``max_shard_size``, or a pointless conversion (DCP to DCP,
            same format, same path).
    """
    to = to.lower()
    if to not in ("hf", "dcp", "torch"):
        raise ValueError(f"--to must be hf, dcp or torch, not {to!r}")
    limit = parse_size(max_shard_size)
    src_s, dst_s = str(src), str(dst)
    found = detect(src_s)
    if found.kind == to and to != "dcp":
        raise ValueError(f"{src_s} is already in {to} format; nothing to convert")
    if os.path.abspath(src_s) == os.path.abspath(dst_s) and not is_url(src_s):
        raise ValueError(f"{src_s}: source and destination are the same; choose another DST")
    source: Source
    if found.kind == "dcp":
        source = DcpSource(found.path, storage_options)
    elif found.kind == "hf":
        source = HfSource(found.path)
    else:
        source = TorchFileSource(found.path)
    res = ConvertResult(src=src_s, dst=dst_s, to=to)
    try:
        if to == "torch":
            if os.path.exists(dst_s) and not overwrite:
                raise CheckpointExistsError(f"{dst_s}: exists; choose a new DST or pass --overwrite to replace it")
            _to_torch(source, dst_s, progress, res)
        elif to == "hf":
            _prepare_dir(dst_s, overwrite)
            _to_hf(source, dst_s, limit, progress, res)
        else:
            if not is_url(dst_s):
                _prepare_dir(dst_s, overwrite)
            _to_dcp(source, dst_s, progress, res, dict(storage_options or {}))
    finally:
        source.close()
    return res
