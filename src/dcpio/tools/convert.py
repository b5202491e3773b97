"""``dcpio convert``: between DCP checkpoints, Hugging Face safetensors folders and single ``torch.save`` files.

Sources are read through the library's readers (see :mod:`dcpio.tools._sources`), so a conversion sees exactly
what ``dcp.load`` sees. Every direction streams, so memory stays bounded:

* -> HF: full tensors are assembled one shard file at a time (at most ``max_shard_size`` bytes held), each file
  carrying per-tensor checksums in its header, then ``model.safetensors.index.json`` maps each tensor to its file.
  Non-tensor entries cannot live in safetensors and are listed in :attr:`ConvertResult.skipped`.
* -> DCP: dcpio's writer saves a state dict of placeholder (meta) tensors whose data a planner fetches from the
  source one tensor at a time, as the writer asks for it. Any source works, DCP included (adds dcpio checksums to a
  stock checkpoint, changes its serialization format, compresses it).
* -> torch.save file: the file's skeleton (pickle and record layout) is written first without tensor data, its
  space reserved, then mapped shared and each tensor read from the source straight into its place in the file,
  one at a time. The result loads with plain ``torch.load`` (``weights_only=True`` included), nested structure
  preserved.

Keys can be chosen (``only`` / ``exclude`` by prefix) and renamed (``strip_prefix``, ``rename``) on the way.

Commit: the output is written into a new directory created exclusively beside the destination, made durable, then
swapped in with renames; the previous output stays intact until the new one is complete, and a failed conversion
removes only what it created. Files in a destination directory that the output format does not own
(``config.json``, tokenizer files, ...) are kept. The commit is :class:`dcpio.commit.DirectorySwap`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import MetadataIndex

from dcpio._torch_compat import fake_tensor_mode
from dcpio.commit import DirectorySwap
from dcpio.errors import CheckpointError, CheckpointExistsError, CorruptCheckpointError, StorageFullError
from dcpio.names import owned_by_dcp, owned_by_hf
from dcpio.tools._sources import Entry, ProgressFn, Source, detect, is_url, open_source

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


# ------------------------------------------------------------------------------------------------ key selection
@dataclass(frozen=True)
class Selection:
    """Which entries go out and under which names.

    Attributes:
        only: keep entries whose name starts with one of these prefixes (empty: all).
        exclude: drop entries whose name starts with one of these.
        strip_prefix: remove the first of these prefixes a kept name starts with.
        rename: ``(old, new)`` prefix replacements, the first matching one applied after stripping.
    """

    only: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    strip_prefix: tuple[str, ...] = ()
    rename: tuple[tuple[str, str], ...] = ()

    def out_name(self, name: str) -> str | None:
        """The name ``name`` goes out as, or None when it is left out."""
        if self.only and not name.startswith(self.only):
            return None
        if self.exclude and name.startswith(self.exclude):
            return None
        for prefix in self.strip_prefix:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        for old, new in self.rename:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        return name

    def apply(self, entries: Sequence[Entry], where: str) -> list[tuple[Entry, str]]:
        """``(entry, output name)`` for every entry that goes out; raises ``ValueError`` for an empty selection or
        two entries that would get one name."""
        out: list[tuple[Entry, str]] = []
        taken: dict[str, str] = {}
        for e in entries:
            new = self.out_name(e.name)
            if new is None:
                continue
            if not new:
                raise ValueError(f"{where}: entry {e.name!r} would be renamed to an empty name; adjust the prefixes")
            if new in taken:
                raise ValueError(
                    f"{where}: entries {taken[new]!r} and {e.name!r} would both be written as {new!r}; "
                    "adjust --strip-prefix / --rename"
                )
            taken[new] = e.name
            out.append((e, new))
        if not out:
            raise ValueError(f"{where}: no entry is selected (--only {list(self.only)} --exclude {list(self.exclude)})")
        return out


def parse_rename(pairs: Sequence[str] | Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    """``["old.=new.", ...]`` (or a mapping) as prefix pairs; ``ValueError`` for a pair without ``=``."""
    if pairs is None:
        return ()
    if isinstance(pairs, Mapping):
        return tuple((str(k), str(v)) for k, v in pairs.items())
    out = []
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old:
            raise ValueError(f"--rename expects OLD=NEW (a prefix and its replacement), got {pair!r}")
        out.append((old, new))
    return tuple(out)


# ----------------------------------------------------------------------------------------------------- commit
_OWNS: dict[str, Callable[[str], bool]] = {
    "hf": owned_by_hf,
    "dcp": owned_by_dcp,
}


def _check_paths(src: str, dst: str) -> None:
    """Refuse a destination that is, contains or lies inside the source: replacing it would destroy the source."""
    if is_url(src) or is_url(dst):
        if src.rstrip("/") == dst.rstrip("/"):
            raise ValueError(f"{src}: source and destination are the same; choose another DST")
        return
    s, d = os.path.realpath(src), os.path.realpath(dst)
    if s == d:
        raise ValueError(f"{src}: source and destination are the same; choose another DST")
    common = os.path.commonpath([s, d])
    if common == s:
        raise ValueError(
            f"{dst}: lies inside the source {src}; writing there would change the source. Choose a DST outside it"
        )
    if common == d:
        raise ValueError(f"{dst}: contains the source {src}; replacing it would delete the source. Choose another DST")


def _check_destination(dst: str, directory: bool, overwrite: bool) -> None:
    if is_url(dst) or not os.path.lexists(dst):
        return
    if directory != os.path.isdir(dst):
        kind = "a directory" if os.path.isdir(dst) else "a file"
        raise CheckpointExistsError(
            f"{dst}: exists and is {kind}, which this conversion cannot replace; choose a new DST"
        )
    if directory and not os.listdir(dst):
        return
    if not overwrite:
        what = "is not empty" if directory else "exists"
        raise CheckpointExistsError(
            f"{dst}: {what}; choose a new DST or pass --overwrite to replace it"
            + (" (its weights only: other files such as config.json are kept)" if directory else "")
        )


@contextlib.contextmanager
def _space_errors(dst: str, stage: str) -> Iterator[None]:
    """Report a full device as the destination's lack of space, whichever layer noticed it."""

    def full() -> StorageFullError:
        return StorageFullError(
            f"{dst}: no space left on the device while writing the converted checkpoint. Nothing at {dst} was "
            "changed and the partial output was removed; free space there (or choose another DST) and run again."
        )

    try:
        yield
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise full() from err
        raise
    except StorageFullError as err:
        raise full() from err
    except RuntimeError as err:  # torch.save reports a failed write as RuntimeError, without the errno
        if "write" in str(err).lower() and _no_space(stage):
            raise full() from err
        raise


def _no_space(path: str) -> bool:
    try:
        st = os.statvfs(path if os.path.isdir(path) else os.path.dirname(path))
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def _unwrap(err: CheckpointException) -> BaseException:
    """The first dcpio error inside torch's wrapper (the writer's or the source's), else the wrapper itself."""
    for failure in err.failures.values():
        found = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(found, (CheckpointError, OSError)):
            return found
    return CheckpointError(str(err).splitlines()[0] if str(err) else "the save of the conversion failed")


# -------------------------------------------------------------------------------------------------- writers
def _to_hf(
    src: Source,
    selected: list[tuple[Entry, str]],
    dst: str,
    max_shard_size: int,
    progress: ProgressFn | None,
    res: ConvertResult,
) -> None:
    from dcpio.formats.hf import INDEX_NAME, digests_metadata, tensor_digest
    from dcpio.formats.safetensors import write_file
    from dcpio.movers import FileSystem

    tensors = [(e, new) for e, new in selected if e.kind == "tensor"]
    res.skipped = [e.name for e, _ in selected if e.kind != "tensor"]
    # plan the shards from the metadata first, so file names can carry the final count (model-00001-of-00003)
    shards: list[list[tuple[Entry, str]]] = []
    size = 0
    for e, new in tensors:
        if not shards or (size > 0 and size + e.nbytes > max_shard_size):
            shards.append([])
            size = 0
        shards[-1].append((e, new))
        size += e.nbytes
    total = sum(e.nbytes for e, _ in tensors)
    fs = FileSystem()
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        batch = {new: src.load(e.name).contiguous() for e, new in shard}
        weight_map.update(dict.fromkeys(batch, fname))
        meta = {"format": "pt", **digests_metadata({k: tensor_digest(t) for k, t in batch.items()})}
        write_file(fs, os.path.join(dst, fname), batch, metadata=meta, atomic=False)
        res.files.append(fname)
        res.tensors += len(batch)
        res.bytes += sum(t.numel() * t.element_size() for t in batch.values())
        del batch
        if progress is not None:
            progress("convert", res.bytes, total)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(dst, INDEX_NAME), "x") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    res.files.append(INDEX_NAME)


class _SourcePlanner(DefaultSavePlanner):
    """torch's default save planner over a state dict of placeholder tensors: each tensor's data is read from the
    source only when the writer asks for it, so memory holds a few tensors, not the checkpoint."""

    def __init__(self, src: Source, names: Mapping[str, str], progress: ProgressFn | None, total: int) -> None:
        super().__init__()
        self._src, self._names, self._progress, self._total, self._done = src, names, progress, total, 0

    def lookup_object(self, index: MetadataIndex) -> Any:
        name = self._names.get(index.fqn)
        if name is None:
            return super().lookup_object(index)
        value = self._src.load(name)
        self._done += value.numel() * value.element_size()
        if self._progress is not None:
            self._progress("convert", self._done, self._total)
        return value


def _make_writer(dst: str, opts: Mapping[str, Any], fmt: str | None, compress: str | None) -> Any:
    import dcpio

    kw: dict[str, Any] = {}
    if fmt is not None:
        kw["serialization_format"] = fmt
    if compress is not None:
        kw["_extensions"] = [dcpio.ZStandard()]
    if is_url(dst):
        return dcpio.FsspecWriter(dst, **kw, **opts)
    return dcpio.FileSystemWriter(dst, **kw)


def _to_dcp(
    src: Source,
    selected: list[tuple[Entry, str]],
    dst: str,
    progress: ProgressFn | None,
    res: ConvertResult,
    writer: Any,
) -> None:
    import torch.distributed.checkpoint as dcp

    values: list[tuple[tuple[Any, ...], Any]] = []
    names: dict[str, str] = {}
    for e, new in selected:
        path = src.object_path(e.name) if new == e.name else (new,)
        if e.kind == "tensor":
            values.append((path, torch.empty(e.shape or (), dtype=e.dtype, device="meta")))
            names[new] = e.name
        else:
            try:
                values.append((path, src.load(e.name)))
            except CheckpointError:
                res.skipped.append(e.name)
    total = sum(e.nbytes for e, _ in selected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: saving in a single process" is what we want
        try:
            dcp.save(
                _nest(values, src.path),
                storage_writer=writer,
                planner=_SourcePlanner(src, names, progress, total),
                no_dist=True,
            )
        except CheckpointException as err:
            raise _unwrap(err) from err
    res.tensors = len(names)
    res.bytes = total
    res.files = sorted(os.listdir(dst)) if not is_url(dst) else []


_MAX_DEPTH = 64  # nesting of a saved state dict; a deeper path is damaged metadata, and would overflow torch.save


class _Leaf:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _nest(paths: list[tuple[tuple[Any, ...], Any]], where: str) -> Any:
    """Rebuild the nested dicts and lists a DCP state dict was flattened from (its planner's path mapping).

    A node becomes a list only when its keys are exactly ``0..n-1``; any other keys stay a dict. So the result
    holds what the checkpoint holds and no more, whatever indices its (untrusted) mapping gives.
    """
    root: dict[Any, Any] = {}
    for path, value in paths:
        if not path or len(path) > _MAX_DEPTH:
            raise CorruptCheckpointError(
                f"{where}: a state-dict path of depth {len(path)} in the metadata; it is damaged"
            )
        node = root
        for key in path[:-1]:
            child = node.setdefault(key, {})
            if isinstance(child, _Leaf):
                raise CorruptCheckpointError(f"{where}: the metadata places a value both at and under {path[:-1]!r}")
            node = child
        if path[-1] in node:
            raise CorruptCheckpointError(f"{where}: the metadata places two values at {path!r}; it is damaged")
        node[path[-1]] = _Leaf(value)
    return _finish(root)


def _finish(node: Any) -> Any:
    if isinstance(node, _Leaf):
        return node.value
    out = {k: _finish(v) for k, v in node.items()}
    keys = list(out)
    if keys and all(type(k) is int for k in keys) and sorted(keys) == list(range(len(keys))):
        return [out[i] for i in range(len(keys))]
    return out


def _to_torch(
    src: Source, selected: list[tuple[Entry, str]], dst: str, progress: ProgressFn | None, res: ConvertResult
) -> None:
    fake_mode = fake_tensor_mode()
    from torch.serialization import skip_data

    values: list[tuple[tuple[Any, ...], Any]] = []
    tensor_names: dict[tuple[Any, ...], str] = {}
    # the skeleton: tensors without data (fake ones: no memory) and the small non-tensor values themselves
    with fake_mode():
        fakes = {e.name: torch.empty(e.shape or (), dtype=e.dtype) for e, _ in selected if e.kind == "tensor"}
    for e, new in selected:
        path = src.object_path(e.name) if new == e.name else (new,)
        if e.kind == "tensor":
            values.append((path, fakes[e.name]))
            tensor_names[path] = e.name
        else:
            try:
                values.append((path, src.load(e.name)))
            except CheckpointError:
                res.skipped.append(e.name)
    skeleton = _nest(values, src.path)
    with skip_data(materialize_fake_tensors=True):
        torch.save(skeleton, dst)
    del skeleton, fakes
    # reserve the file's blocks now: a full disk is then an error here, not a SIGBUS while filling the mapping
    with open(dst, "rb+") as f:
        os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    # map the file shared: what we copy into a tensor lands in the file; pages are written back and dropped
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        mapped = torch.load(dst, map_location="cpu", weights_only=True, mmap=True)
    total = sum(e.nbytes for e, _ in selected)
    for path, name in tensor_names.items():
        node: Any = mapped
        for key in path:
            node = node[key]
        load_into = getattr(src, "load_into", None)
        if load_into is not None:
            load_into(name, node)
        else:
            node.copy_(src.load(name))
        res.tensors += 1
        res.bytes += node.numel() * node.element_size()
        if progress is not None:
            progress("convert", res.bytes, total)
    del mapped
    res.files = [os.path.basename(dst)]


# ------------------------------------------------------------------------------------------------------ convert
def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    to: str,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    storage_options: Mapping[str, Any] | None = None,
    *,
    only: Sequence[str] = (),
    exclude: Sequence[str] = (),
    strip_prefix: Sequence[str] = (),
    rename: Sequence[str] | Mapping[str, str] | None = None,
    serialization_format: str | None = None,
    compress: str | None = None,
) -> ConvertResult:
    """Convert the checkpoint at ``src`` into format ``to`` at ``dst``.

    Args:
        src: a DCP checkpoint (local path or fsspec URL), a Hugging Face safetensors folder, or a torch.save file.
        dst: where to write: a directory for ``hf`` and ``dcp`` (a URL too for ``dcp``), a file for ``torch``.
        to: ``"hf"`` (full tensors in safetensors shards plus ``model.safetensors.index.json``), ``"dcp"``
            (written with :class:`dcpio.FileSystemWriter`), or ``"torch"`` (one ``torch.save`` file).
        max_shard_size: largest shard for ``hf`` (bytes or a string like ``"5GB"``); one tensor larger than
            it gets a shard of its own.
        overwrite: replace an existing non-empty ``dst`` (only what the output format owns: other files in a
            destination directory, such as ``config.json``, are kept).
        progress: optional ``progress(description, completed_bytes, total_bytes)`` callback.
        storage_options: fsspec options for a URL source or a URL destination (``--to dcp``).
        only: keep only entries whose name starts with one of these prefixes.
        exclude: leave out entries whose name starts with one of these prefixes.
        strip_prefix: remove the first of these prefixes from each name that starts with it.
        rename: ``OLD=NEW`` prefix replacements (or a mapping), applied after ``strip_prefix``.
        serialization_format: for ``dcp``: ``"torch_save"`` (default) or ``"safetensors"``.
        compress: for ``dcp``: ``"zstd"`` compresses every item (``ZStandard``).

    Returns:
        A :class:`ConvertResult`.

    Raises:
        dcpio.CheckpointExistsError: ``dst`` exists and ``overwrite`` is False.
        dcpio.StorageFullError: the destination's device ran out of space (nothing at ``dst`` changed).
        dcpio.CheckpointError: the source cannot be read or converted (e.g. a torch file holding no dict).
        ValueError: an unknown ``to``, an unreadable ``max_shard_size``, a selection that keeps nothing, or a
            destination that is, contains or lies inside the source.

    Example::

        from dcpio.tools import convert
        convert("ckpt/step-100", "export/", to="hf", only=["model."], strip_prefix=["model."], overwrite=True)
    """
    to = to.lower()
    _check_options(to, serialization_format, compress)
    limit = parse_size(max_shard_size)
    selection = Selection(tuple(only), tuple(exclude), tuple(strip_prefix), parse_rename(rename))
    src_s, dst_s = str(src), str(dst)
    found = detect(src_s)
    if found.kind == to == "torch":
        raise ValueError(f"{src_s} is already a torch.save file; nothing to convert")
    _check_paths(found.path, dst_s)
    _check_destination(dst_s, to != "torch", overwrite)
    source = open_source(found.path, storage_options)
    res = ConvertResult(src=src_s, dst=dst_s, to=to)
    try:
        selected = selection.apply(source.entries(), src_s)
        if is_url(dst_s):
            writer = _make_writer(dst_s, dict(storage_options or {}), serialization_format, compress)
            _to_dcp(source, selected, dst_s, progress, res, writer)
        else:
            _write_staged(source, selected, dst_s, to, limit, progress, res, (serialization_format, compress))
    finally:
        source.close()
    return res


def _check_options(to: str, serialization_format: str | None, compress: str | None) -> None:
    if to not in ("hf", "dcp", "torch"):
        raise ValueError(f"--to must be hf, dcp or torch, not {to!r}")
    if (serialization_format is not None or compress is not None) and to != "dcp":
        raise ValueError("--format and --compress apply to --to dcp only")
    if compress not in (None, "zstd"):
        raise ValueError(f"--compress supports zstd only, not {compress!r}")


def _write_staged(
    source: Source,
    selected: list[tuple[Entry, str]],
    dst: str,
    to: str,
    limit: int,
    progress: ProgressFn | None,
    res: ConvertResult,
    dcp_opts: tuple[str | None, str | None],
) -> None:
    stage = DirectorySwap(dst, directory=to != "torch", owns=_OWNS.get(to))
    try:
        with _space_errors(dst, stage.root):
            if to == "torch":
                _to_torch(source, selected, stage.path, progress, res)
            elif to == "hf":
                _to_hf(source, selected, stage.path, limit, progress, res)
            else:
                _to_dcp(source, selected, stage.path, progress, res, _make_writer(stage.path, {}, *dcp_opts))
            stage.commit()
    except BaseException:
        stage.abort()
        raise
