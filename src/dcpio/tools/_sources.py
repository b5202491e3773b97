"""What the tools read: a DCP checkpoint (local or fsspec URL), a Hugging Face safetensors folder, a
torch.save file.

Every tool goes through :func:`open_source`, which recognises the kind of checkpoint at a path and returns a
:class:`Source`: a list of entries (name, tensor or object, dtype, shape) and a way to load one entry at a
time. Loading one entry at a time is what keeps ``diff`` and ``convert`` bounded by the largest tensor, not
the checkpoint.

DCP checkpoints and HF folders are read through the library's own readers (``FileSystemReader`` /
``FsspecReader`` and ``HuggingFaceStorageReader``: the classes ``dcp.load`` uses), driven item by item with a
tiny planner. So a command never sees a checkpoint differently from a load: the same index, the same assembly of
sharded tensors, the same confinement to the checkpoint's directory, the same checksums; a damaged file shows up
as a :class:`dcpio.CheckpointError` naming the file and the tensor.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from dcpio._torch_compat import flatten_state_dict as torch_flatten
from dcpio.errors import CheckpointError, CorruptCheckpointError, IncompleteCheckpointError
from dcpio.integrity.extents import check_tiling
from dcpio.names import (
    DATA_SUFFIX,
    HF_INDEX_NAME,
    METADATA_NAME,
    SAFETENSORS_SUFFIX,
    per_rank_metadata_rank,
    rank_prefix,
)

__all__ = [
    "DcpSource",
    "Entry",
    "HfSource",
    "ProgressFn",
    "ReaderSource",
    "Source",
    "TorchFileSource",
    "is_url",
    "open_source",
]

#: ``progress(description, completed, total)``: cumulative units (bytes unless said otherwise).
ProgressFn = Callable[[str, int, int], None]


def is_url(path: str | os.PathLike[str]) -> bool:
    """True for an fsspec URL (``memory://``, ``s3://`` ...); ``file://`` counts as a URL too."""
    return "://" in str(path)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``float32``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Entry:
    """One thing a checkpoint holds.

    Attributes:
        name: the flattened name (``model.layers.0.weight``; optimizer state as ``optim.state.<fqn>.exp_avg``).
        kind: ``"tensor"`` or ``"object"`` (a non-tensor value: a step count, a string, a small dict).
        dtype: the tensor's dtype (``None`` for objects).
        shape: the tensor's global shape (``None`` for objects).
    """

    name: str
    kind: str
    dtype: torch.dtype | None = None
    shape: tuple[int, ...] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the full tensor's elements (0 for objects)."""
        if self.dtype is None or self.shape is None:
            return 0
        numel = 1
        for s in self.shape:
            numel *= s
        return numel * torch.empty((), dtype=self.dtype).element_size()


class Source:
    """A checkpoint opened for reading, one entry at a time."""

    kind: str = ""
    path: str = ""

    def entries(self) -> list[Entry]:
        """Every entry, in the checkpoint's own order."""
        raise NotImplementedError

    def load(self, name: str) -> Any:
        """The full value of entry ``name``: a CPU tensor, or the object for a non-tensor entry."""
        raise NotImplementedError

    def object_path(self, name: str) -> tuple[Any, ...]:
        """Where ``name`` sat in the nested state dict (flat names have a path of one key)."""
        return (name,)

    def close(self) -> None:
        """Release files and handles."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -------------------------------------------------------------------------------------------------------- DCP
class _ItemPlanner(LoadPlanner):
    """A planner that loads exactly the read items it is given into the buffers it is given.

    The reader calls ``resolve_tensor`` / ``commit_tensor`` per tensor piece and ``load_bytes`` per object;
    we keep the destination buffers ourselves, so the reader is driven one item (or one chunk) at a time.
    """

    def __init__(self, dest: dict[str, torch.Tensor]) -> None:
        self.dest = dest
        self.blobs: dict[str, bytes] = {}

    def set_up_planner(self, state_dict: Any, metadata: Metadata | None = None, is_coordinator: bool = False) -> None:
        return None

    def create_local_plan(self) -> LoadPlan:
        return LoadPlan([])

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.blobs[read_item.dest_index.fqn] = value.getvalue()

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        tensor = self.dest[read_item.dest_index.fqn]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            tensor = tensor.narrow(dim, start, length)
        return tensor

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        return None


def url_fs(path: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """``(fsspec filesystem, root path)`` for an fsspec URL, with the caller's storage options."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
    return fs, str(root).rstrip("/")


def make_reader(path: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    """dcpio's reader for ``path`` (checksums on): :class:`dcpio.FsspecReader` for URLs, else the local one.

    ``allow_pickle=True`` lets the raw bytes of every non-tensor value reach our planner, which never unpickles
    them: :func:`decode_object` applies ``weights_only=True`` itself, and ``diff`` compares undecodable values by
    their bytes. Without it the reader would refuse a custom object before ``verify`` could read its bytes.
    """
    import inspect

    import dcpio

    if is_url(path):
        reader_cls = getattr(dcpio, "FsspecReader", None)
        if reader_cls is None:
            raise CheckpointError(
                f"{path}: this dcpio build has no fsspec reader (dcpio.FsspecReader); use a local path"
            )
    else:
        reader_cls = getattr(dcpio, "FileSystemReader", None)
        if reader_cls is None:  # the core has not landed in this checkout: fall back to torch's reader
            from torch.distributed.checkpoint import FileSystemReader

            return FileSystemReader(path)
    try:
        takes_allow = "allow_pickle" in inspect.signature(reader_cls).parameters
    except (TypeError, ValueError):  # a signature Python cannot introspect
        takes_allow = False
    opts = dict(storage_options or {}) if is_url(path) else {}
    return reader_cls(path, allow_pickle=True, **opts) if takes_allow else reader_cls(path, **opts)


class ReaderSource(Source):
    """A checkpoint read through one of dcpio's storage readers, the same classes ``dcp.load`` uses.

    The reader is driven item by item with :class:`_ItemPlanner`, so a command sees exactly what a load sees: the
    same metadata, the same files (confinement checked), the same assembly of chunks and the same checksums. Every
    tensor's stored chunks must tile its shape, which bounds what a command produces by what is stored.
    """

    def __init__(self, path: str, reader: Any) -> None:
        self.path = path
        self.reader = reader
        self.metadata: Metadata = self.reader.read_metadata()
        self.reader.set_up_storage_reader(self.metadata, True)
        self._lock = threading.Lock()  # one read at a time: the readers keep per-load state

    def _check_tiling(self) -> None:
        for name, md in self.metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                check_tiling(
                    name,
                    tuple(md.size),
                    [(c.offsets, c.sizes) for c in md.chunks],
                    self.path,
                    "the metadata is damaged or a part of the checkpoint is missing; restore it or save again",
                )

    # -- structure
    def entries(self) -> list[Entry]:
        out = []
        for name, md in self.metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                out.append(Entry(name, "tensor", md.properties.dtype, tuple(int(s) for s in md.size)))
            else:
                out.append(Entry(name, "object"))
        return out

    def storage_info(self) -> dict[MetadataIndex, Any]:
        """``MetadataIndex -> storage info`` (file, offset, length, and the format's extras such as checksums)."""
        data = self.metadata.storage_data
        return data if isinstance(data, dict) else {}

    def files_of(self, name: str) -> list[str]:
        """Relative paths of the data files holding pieces of ``name``."""
        return sorted({info.relative_path for idx, info in self.storage_info().items() if idx.fqn == name})

    # -- reading
    def _run(self, items: list[ReadItem], planner: _ItemPlanner) -> None:
        with self._lock:
            plan = self.reader.prepare_local_plan(LoadPlan(items))
            plan = self.reader.prepare_global_plan([plan])[0]
            self.reader.read_data(plan, planner).wait()

    def load_chunk(self, name: str, chunk: ChunkStorageMetadata) -> torch.Tensor:
        """One saved chunk of tensor ``name``, as stored (memory: the chunk only)."""
        md = self.metadata.state_dict_metadata[name]
        if not isinstance(md, TensorStorageMetadata):
            raise TypeError(f"{name} is not a tensor")
        buf = torch.empty(tuple(chunk.sizes), dtype=md.properties.dtype)
        local = ChunkStorageMetadata(offsets=torch.Size(chunk.offsets), sizes=torch.Size(chunk.sizes))
        items = create_read_items_for_chunk_list(name, md, [local])
        self._run(items, _ItemPlanner({name: buf}))
        return buf

    def load_blob(self, name: str) -> bytes:
        """The raw stored bytes of a non-tensor entry (a torch.save'd object), not unpickled."""
        idx = MetadataIndex(name)
        item = ReadItem(
            type=LoadItemType.BYTE_IO,
            dest_index=idx,
            dest_offsets=torch.Size((0,)),
            storage_index=idx,
            storage_offsets=torch.Size((0,)),
            lengths=torch.Size((0,)),
        )
        planner = _ItemPlanner({})
        self._run([item], planner)
        if name not in planner.blobs:
            raise CorruptCheckpointError(f"{self.path}: the reader returned nothing for object {name!r}")
        return planner.blobs[name]

    def load(self, name: str) -> Any:
        md = self.metadata.state_dict_metadata[name]
        if isinstance(md, BytesStorageMetadata):
            return decode_object(self.load_blob(name), f"{self.path}:{name}")
        return self.load_into(name, torch.empty(tuple(md.size), dtype=md.properties.dtype))

    def load_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read the full tensor ``name`` into ``out`` (same shape and dtype; e.g. a memory-mapped tensor)."""
        md = self.metadata.state_dict_metadata[name]
        if not isinstance(md, TensorStorageMetadata):
            raise TypeError(f"{name} is not a tensor")
        if tuple(out.shape) != tuple(md.size) or out.dtype != md.properties.dtype:
            raise ValueError(
                f"{name}: destination is {out.dtype} {list(out.shape)}, the checkpoint holds "
                f"{md.properties.dtype} {list(md.size)}"
            )
        if out.numel() == 0:
            return out
        whole = ChunkStorageMetadata(offsets=torch.Size([0] * out.dim()), sizes=torch.Size(out.shape))
        items = create_read_items_for_chunk_list(name, md, [whole])
        self._run(items, _ItemPlanner({name: out}))
        return out


class DcpSource(ReaderSource):
    """A torch.distributed.checkpoint directory read through dcpio's reader (checksums verified)."""

    kind = "dcp"

    def __init__(self, path: str, storage_options: Mapping[str, Any] | None = None, *, check: bool = True) -> None:
        self.storage_options = dict(storage_options or {})
        super().__init__(path, make_reader(path, self.storage_options))
        mapping = self.metadata.planner_data
        self._mapping = mapping if isinstance(mapping, dict) else {}
        if check:
            self._check_tiling()

    def object_path(self, name: str) -> tuple[Any, ...]:
        """Where ``name`` sat in the nested state dict that was saved (from the planner's flatten mapping)."""
        path = self._mapping.get(name)
        if isinstance(path, (tuple, list)) and path and all(isinstance(k, (str, int)) for k in path):
            return tuple(path)
        return (name,)


def decode_object(blob: bytes, where: str) -> Any:
    """Unpickle a DCP object entry with ``weights_only=True``: plain data only, no code runs."""
    try:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or ValueError for refused/odd payloads
        raise CheckpointError(
            f"{where}: this non-tensor value cannot be decoded safely (weights_only=True refused it: "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}); it is left out"
        ) from err


# ------------------------------------------------------------------------------------------------ safetensors
class HfSource(ReaderSource):
    """A Hugging Face safetensors folder (or one ``.safetensors`` file) read through
    :class:`dcpio.HuggingFaceStorageReader`: the index honoured, sharded folders assembled, checksums verified.

    ``only_files`` reads just those files of the folder, each on its own (what ``verify`` uses to read every sound
    file of a damaged folder).
    """

    kind = "hf"

    def __init__(self, path: str, only_files: list[str] | None = None) -> None:
        from dcpio.formats.hf import HuggingFaceStorageReader

        if os.path.isdir(path):
            self.folder = path
        else:
            self.folder = os.path.dirname(path) or "."
            only_files = [os.path.basename(path)]
        super().__init__(path, HuggingFaceStorageReader(self.folder, _only_files=only_files))

    @property
    def files(self) -> list[str]:
        """The data files read, relative to the folder."""
        return sorted(self.reader.headers)

    @property
    def header_metadata(self) -> dict[str, dict[str, str]]:
        """Each data file's ``__metadata__`` strings."""
        return {name: dict(h.metadata or {}) for name, h in self.reader.headers.items()}

    @property
    def checksummed(self) -> bool:
        """Every stored tensor carries a dcpio export checksum."""
        infos = self.storage_info().values()
        return bool(infos) and all(getattr(i, "checksum", None) is not None for i in infos)

    def stored_bytes(self, name: str) -> int:
        return sum(int(info.length) for idx, info in self.storage_info().items() if idx.fqn == name)


# ------------------------------------------------------------------------------------------------- torch.save
def flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield ``(dotted.name, leaf)`` for nested dicts and lists, the way DCP names flattened entries."""
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            yield from flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)) and obj and not isinstance(obj, torch.Size):
        for i, v in enumerate(obj):
            yield from flatten(v, f"{prefix}.{i}" if prefix else str(i))
    else:
        yield prefix, obj


def dcp_names(obj: Any) -> dict[str, Any]:
    """Flatten ``obj`` exactly as DCP's default planner does, so a torch.save file and a DCP checkpoint of the
    same state dict name their entries alike (lists without tensors stay one value, for instance)."""
    return dcp_flatten(obj)[0]


def dcp_flatten(obj: Any) -> tuple[dict[str, Any], dict[str, tuple[Any, ...]]]:
    """:func:`dcp_names` and, per name, the path of keys it sat at in ``obj``."""
    if not isinstance(obj, dict):
        flat = dict(flatten(obj))
        return flat, {k: (k,) for k in flat}
    flatten_state_dict = torch_flatten()
    if flatten_state_dict is None:  # a torch without that helper: our own dotted names
        flat = dict(flatten(obj))
        return flat, {k: (k,) for k in flat}
    flat_sd, mapping = flatten_state_dict(obj)
    return dict(flat_sd), {k: tuple(v) for k, v in mapping.items()}


class TorchFileSource(Source):
    """A file written by ``torch.save``, opened with ``weights_only=True`` and ``mmap=True`` (no copy, no
    code)."""

    kind = "torch"

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch raises RuntimeError / UnpicklingError for damaged or unsafe files
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CorruptCheckpointError(
                f"{path}: torch.load(weights_only=True) cannot read this file: {first}"
            ) from err
        self._leaves, self._paths = dcp_flatten(self.obj)

    def object_path(self, name: str) -> tuple[Any, ...]:
        return self._paths.get(name, (name,))

    def entries(self) -> list[Entry]:
        out = []
        for name, v in self._leaves.items():
            if isinstance(v, torch.Tensor):
                out.append(Entry(name, "tensor", v.dtype, tuple(v.shape)))
            else:
                out.append(Entry(name, "object"))
        return out

    def load(self, name: str) -> Any:
        return self._leaves[name]


# ----------------------------------------------------------------------------------------------------- detect
@dataclass
class Detected:
    """What :func:`detect` found at a path."""

    kind: str  # "dcp", "hf", "torch"
    path: str
    notes: list[str] = field(default_factory=list)


def detect(path: str) -> Detected:
    """Decide what kind of checkpoint ``path`` is, or raise ``FileNotFoundError`` /
    ``IncompleteCheckpointError``."""
    if is_url(path):
        return Detected("dcp", path)
    if not os.path.exists(path):
        raise FileNotFoundError(2, f"{path}: no such file or directory", path)
    if os.path.isdir(path):
        names = os.listdir(path)
        if METADATA_NAME in names:
            return Detected("dcp", path)
        if any(n.endswith(SAFETENSORS_SUFFIX) for n in names) or HF_INDEX_NAME in names:
            return Detected("hf", path)
        if any(n.endswith(DATA_SUFFIX) or per_rank_metadata_rank(n) is not None for n in names):
            raise IncompleteCheckpointError(
                f"{path}: data files are here but .metadata is missing: the save never committed, or the "
                "file was deleted. Save the checkpoint again, or restore .metadata from a good copy."
            )
        raise IncompleteCheckpointError(
            f"{path}: not a checkpoint (no .metadata, no *.safetensors); point at a DCP directory, a "
            "Hugging Face folder or a torch.save file"
        )
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return Detected("torch", path)
    if path.endswith(".safetensors"):
        return Detected("hf", path)
    if os.path.basename(path) == METADATA_NAME:
        return Detected("dcp", os.path.dirname(path) or ".")
    raise IncompleteCheckpointError(
        f"{path}: not a recognised checkpoint file (neither a torch.save zip nor a .safetensors file)"
    )


def open_source(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> Source:
    """Open whatever checkpoint lives at ``path`` for entry-by-entry reading (``storage_options`` for URLs)."""
    found = detect(str(path))
    if found.kind == "dcp":
        return DcpSource(found.path, storage_options)
    if found.kind == "hf":
        return HfSource(found.path)
    return TorchFileSource(found.path)


def rank_of(relative_path: str) -> int | None:
    """The rank encoded in a DCP data file name (``__3_0.distcp`` -> 3)."""
    return rank_prefix(os.path.basename(relative_path))
