"""``FsspecWriter`` / ``FsspecReader``: dcpio's writer and reader on any fsspec URL (``s3://``, ...).

They are the local-disk classes with a different byte mover (:class:`dcpio.movers.fsspec.FsspecFileSystem`),
so everything the local classes guarantee (checksums, restricted metadata unpickling, per-save file names, the
metadata object written last as the commit point) holds on object stores too. Storage options pass through to
fsspec as keywords, exactly as with torch's classes::

    writer = dcpio.FsspecWriter("s3://bucket/step-100", key=..., secret=...,
                                client_kwargs={"endpoint_url": "http://127.0.0.1:9000"})
    dcp.save(state_dict, storage_writer=writer)
    dcp.load(state_dict, storage_reader=dcpio.FsspecReader("s3://bucket/step-100", key=..., secret=..., ...))
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from dcpio.movers.base import FileSystemBase
from dcpio.movers.fsspec import FsspecFileSystem
from dcpio.movers.registry import mover_for, protocol_of
from dcpio.reader import FileSystemReader
from dcpio.writer import FileSystemWriter, SerializationFormat

__all__ = ["FsspecBenchResult", "FsspecReader", "FsspecWriter", "bench_against_torch"]


def _mover(path: str | os.PathLike[str], storage_options: dict[str, Any]) -> FileSystemBase:
    """The mover the registry picks for a URL (install hints included); plain paths go through fsspec's local."""
    if protocol_of(path) is None:
        return FsspecFileSystem(path, **storage_options)
    return mover_for(path, **storage_options)


class FsspecWriter(FileSystemWriter):
    """A :class:`dcpio.FileSystemWriter` writing to an fsspec URL.

    The positional order is that of torch's ``FsspecWriter`` (``overwrite`` sixth), so it is a drop-in
    replacement; ``cache_staged_state_dict`` (a ``FileSystemWriter`` keyword torch's class lacks) comes after.
    Every other keyword is a storage option for fsspec (``key``, ``secret``, ``token``, ``client_kwargs``).

    Call order (as DCP drives it): ``reset`` → ``set_up_storage_writer`` → ``prepare_local_plan`` →
    ``prepare_global_plan`` → ``write_data`` → ``finish``; ``finish`` PUTs the metadata object (the commit).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        single_file_per_rank: bool = True,
        sync_files: bool = True,
        thread_count: int | None = None,
        per_thread_copy_ahead: int = 10_000_000,
        overwrite: bool = True,
        _extensions: Sequence[Any] | None = None,
        serialization_format: SerializationFormat = SerializationFormat.TORCH_SAVE,
        cache_staged_state_dict: bool = False,
        **storage_options: Any,
    ) -> None:
        super().__init__(
            path,
            single_file_per_rank=single_file_per_rank,
            sync_files=sync_files,
            thread_count=thread_count,
            per_thread_copy_ahead=per_thread_copy_ahead,
            cache_staged_state_dict=cache_staged_state_dict,
            overwrite=overwrite,
            _extensions=_extensions,
            serialization_format=serialization_format,
            _fs=_mover(path, storage_options),
        )

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return FsspecFileSystem.validate_checkpoint_id(checkpoint_id)


class FsspecReader(FileSystemReader):
    """A :class:`dcpio.FileSystemReader` reading from an fsspec URL with ranged GETs.

    Args:
        path: the checkpoint's URL.
        _extension_registry: stream transforms to recognise (as for ``FileSystemReader``).
        verify_checksums: check every item's checksum while loading (default True).
        thread_count: parallel reads; None picks the default from :mod:`dcpio.knobs`.
        allow_pickle: let non-tensor values that need arbitrary classes reach torch's planner (as for
            ``FileSystemReader``; off by default because unpickling them can run code).
        **storage_options: passed to fsspec, as with torch's ``FsspecReader``.

    Call order: ``reset`` → ``read_metadata`` → ``set_up_storage_reader`` → ``prepare_local_plan`` →
    ``prepare_global_plan`` → ``read_data``. Only the byte ranges the load plan needs are downloaded.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        _extension_registry: Any = None,
        *,
        verify_checksums: bool = True,
        thread_count: int | None = None,
        allow_pickle: bool = False,
        **storage_options: Any,
    ) -> None:
        super().__init__(
            path,
            _extension_registry,
            verify_checksums=verify_checksums,
            thread_count=thread_count,
            allow_pickle=allow_pickle,
            _fs=_mover(path, storage_options),
        )

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return FsspecFileSystem.validate_checkpoint_id(checkpoint_id)


@dataclass(frozen=True)
class FsspecBenchResult:
    """Seconds per save and load for dcpio's and torch's fsspec classes on the same store, same state dict."""

    bytes: int
    dcpio_save_s: float
    torch_save_s: float
    dcpio_load_s: float
    torch_load_s: float

    @property
    def save_speedup(self) -> float:
        """torch's save time over dcpio's (above 1: dcpio is faster)."""
        return self.torch_save_s / self.dcpio_save_s

    @property
    def load_speedup(self) -> float:
        return self.torch_load_s / self.dcpio_load_s

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {k: float(v) for k, v in asdict(self).items()}
        out["save_speedup"] = self.save_speedup
        out["load_speedup"] = self.load_speedup
        out["dcpio_save_MBps"] = self.bytes / 1e6 / self.dcpio_save_s
        out["torch_save_MBps"] = self.bytes / 1e6 / self.torch_save_s
        out["dcpio_load_MBps"] = self.bytes / 1e6 / self.dcpio_load_s
        out["torch_load_MBps"] = self.bytes / 1e6 / self.torch_load_s
        return out


def bench_against_torch(
    url: str,
    *,
    total_bytes: int = 256 << 20,
    n_tensors: int = 16,
    thread_count: int = 4,
    repeats: int = 1,
    **storage_options: Any,
) -> FsspecBenchResult:
    """Save and load one state dict with dcpio's and torch's ``FsspecWriter``/``FsspecReader``; best of N.

    Both write under ``url`` (``<url>/dcpio`` and ``<url>/torch``) with the same ``thread_count`` and storage
    options, and every load is checked bit for bit. For an S3 server on this machine start moto
    (``moto_server -H 127.0.0.1 -p PORT``), create a bucket and pass ``key``, ``secret`` and
    ``client_kwargs={"endpoint_url": "http://127.0.0.1:PORT"}``.

    Returns:
        The best time of ``repeats`` runs for each of the four operations.
    """
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader as TorchReader
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter as TorchWriter

    per = max(1, total_bytes // n_tensors // 4)
    gen = torch.Generator().manual_seed(0)
    state = {f"w{i}": torch.randn(per, generator=gen) for i in range(n_tensors)}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    base = url.rstrip("/")

    def timed(fn: Any) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def check(loaded: dict[str, torch.Tensor], who: str) -> None:
        for k, v in state.items():
            if not torch.equal(loaded[k].view(torch.uint8), v.view(torch.uint8)):
                raise AssertionError(f"bench: {who} loaded different bytes for {k}")

    def save(writer_cls: Any, where: str, **kw: Any) -> float:
        writer = writer_cls(where, thread_count=thread_count, **kw, **storage_options)
        return timed(lambda: dcp.save(state, storage_writer=writer))

    def load(reader: Any, who: str) -> float:
        out = {k: torch.empty_like(v) for k, v in state.items()}
        seconds = timed(lambda: dcp.load(out, storage_reader=reader))
        check(out, who)
        return seconds

    best = {"ds": float("inf"), "ts": float("inf"), "dl": float("inf"), "tl": float("inf")}
    d_url, t_url = f"{base}/dcpio", f"{base}/torch"
    for _ in range(repeats):
        best["ds"] = min(best["ds"], save(FsspecWriter, d_url))
        best["ts"] = min(best["ts"], save(TorchWriter, t_url))
        reader = FsspecReader(d_url, thread_count=thread_count, **storage_options)
        best["dl"] = min(best["dl"], load(reader, "dcpio"))
        best["tl"] = min(best["tl"], load(TorchReader(t_url, **storage_options), "torch"))
    return FsspecBenchResult(nbytes, best["ds"], best["ts"], best["dl"], best["tl"])
