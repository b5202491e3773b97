"""One test class every mover runs: local disk, ``file://``, ``memory://``, S3 (moto), a torch-style backend.

Each backend brings a mover and a *backdoor* that reads and writes the same storage without going through the mover
under test (plain ``open()``, the fsspec filesystem, boto3), so a mover bug cannot hide behind a symmetric bug in its
own reader. Below the class: a fake backend that returns short reads and short writes, golden bytes for the
torch_save record envelope, and a race test for every shared cache of the movers.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import threading
import uuid
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemBase as TorchFileSystemBase

import dcpio
from dcpio.commit import publish_bytes, stage_file
from dcpio.errors import CheckpointError, CheckpointWriteError, CorruptCheckpointError
from dcpio.movers.adapter import as_mover
from dcpio.movers.base import FileSystemBase
from dcpio.movers.fsspec import FsspecFileSystem
from helpers import assert_tree_equal, exception_chain, make_state_dict, template_like, trusted_objects
from s3_server import MotoServer, moto

__all__ = ["moto"]  # fixture used by name below


# ------------------------------------------------------------------------------------------ a torch-style backend
class StreamOnlyFileSystem(TorchFileSystemBase):
    """A third-party backend written against torch's abstract class only: no ``ls``, no dcpio fast paths."""

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Generator[io.IOBase, None, None]:
        with Path(path).open(mode) as stream:
            yield stream  # type: ignore[misc]

    def concat_path(self, path: str | os.PathLike[str], suffix: str) -> str | os.PathLike[str]:
        return Path(path) / suffix

    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        os.replace(path, new_path)

    def init_path(self, path: str | os.PathLike[str]) -> str | os.PathLike[str]:
        return Path(path)

    def mkdir(self, path: str | os.PathLike[str]) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return True

    def exists(self, path: str | os.PathLike[str]) -> bool:
        return Path(path).exists()

    def rm_file(self, path: str | os.PathLike[str]) -> None:
        Path(path).unlink()


# ------------------------------------------------------------------------------------------ backends and backdoors
@dataclass
class Backend:
    name: str
    mover: FileSystemBase
    root: str
    read: Callable[[str], bytes]  # backdoor: the bytes stored under root/rel
    write: Callable[[str, bytes], None]  # backdoor: store bytes under root/rel
    exists: Callable[[str], bool]  # backdoor: is root/rel there

    def path(self, rel: str) -> str:
        return str(self.mover.concat_path(self.root, rel))


def _local_backend(name: str, tmp_path: Path) -> Backend:
    root = tmp_path / "store"
    root.mkdir()
    if name == "local":
        mover: FileSystemBase = dcpio.FileSystem()
        where = str(root)
    elif name == "file":
        mover = FsspecFileSystem(f"file://{root}")
        where = f"file://{root}"
    else:
        mover = as_mover(StreamOnlyFileSystem())
        where = str(root)
    return Backend(
        name,
        mover,
        where,
        lambda rel: (root / rel).read_bytes(),
        lambda rel, data: (root / rel).write_bytes(data),
        lambda rel: (root / rel).exists(),
    )


def _memory_backend() -> Backend:
    import fsspec

    name = f"conformance-{uuid.uuid4().hex[:8]}"
    store = fsspec.filesystem("memory")
    return Backend(
        "memory",
        FsspecFileSystem(f"memory://{name}"),
        f"memory://{name}",
        lambda rel: bytes(store.cat_file(f"/{name}/{rel}")),
        lambda rel, data: store.pipe_file(f"/{name}/{rel}", data),
        lambda rel: bool(store.exists(f"/{name}/{rel}")),
    )


def _s3_backend(server: MotoServer) -> Backend:
    ep = server.new_bucket()
    client = server.client()

    def exists(rel: str) -> bool:
        listed = client.list_objects_v2(Bucket=ep.bucket, Prefix=f"ck/{rel}").get("Contents", [])
        return any(o["Key"] == f"ck/{rel}" for o in listed)

    return Backend(
        "s3",
        FsspecFileSystem(ep.url("ck"), **ep.storage_options),
        ep.url("ck"),
        lambda rel: client.get_object(Bucket=ep.bucket, Key=f"ck/{rel}")["Body"].read(),
        lambda rel, data: client.put_object(Bucket=ep.bucket, Key=f"ck/{rel}", Body=data),
        exists,
    )


def _torch_fsspec_backend() -> Backend:
    """torch's own fsspec backend (what torch's FsspecWriter assigns to ``self.fs``), adapted, on memory://."""
    from torch.distributed.checkpoint._fsspec_filesystem import FileSystem as TorchFsspecFileSystem

    made = _memory_backend()
    mover = as_mover(TorchFsspecFileSystem())
    mover.init_path(made.root)
    return Backend("torch_fsspec", mover, made.root, made.read, made.write, made.exists)


@pytest.fixture(params=["local", "file", "memory", "s3", "torch_style", "torch_fsspec"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "memory":
        made = _memory_backend()
    elif request.param == "torch_fsspec":
        made = _torch_fsspec_backend()
    elif request.param == "s3":
        made = _s3_backend(request.getfixturevalue("moto"))
    else:
        made = _local_backend(request.param, tmp_path)
    made.mover.mkdir(made.root)
    yield made
    closer = getattr(made.mover, "close", None)
    if callable(closer):
        closer()


PAYLOAD = bytes(range(256)) * 41 + b"tail"  # 10,500 bytes: not a multiple of any block size


class TestMoverConformance:
    """What dcpio needs of every mover, checked through the backdoor."""

    def test_appended_buffers_land_in_order(self, backend: Backend) -> None:
        handle = backend.mover.open_writer(backend.path("a.bin"))
        floats = torch.arange(8, dtype=torch.float32)
        pieces = [memoryview(PAYLOAD[:1000]), memoryview(floats.numpy()), memoryview(PAYLOAD[1000:])]
        assert handle.write(pieces) == len(PAYLOAD) + 32
        assert handle.tell() == len(PAYLOAD) + 32
        handle.sync()
        handle.close()
        assert backend.read("a.bin") == PAYLOAD[:1000] + floats.numpy().tobytes() + PAYLOAD[1000:]

    def test_ranged_reads_of_a_backdoor_file(self, backend: Backend) -> None:
        backend.write("b.bin", PAYLOAD)
        handle = backend.mover.open_reader(backend.path("b.bin"))
        try:
            assert handle.size() == len(PAYLOAD)
            assert handle.read(0, 10) == PAYLOAD[:10]
            assert handle.read(4097, 3000) == PAYLOAD[4097:7097]
            first, second = bytearray(5), bytearray(7000)
            handle.readinto_many(3, [memoryview(first), memoryview(second)])
            assert bytes(first + second) == PAYLOAD[3:7008]
            with pytest.raises(CorruptCheckpointError, match=r"b\.bin"):
                handle.read(len(PAYLOAD) - 4, 10)
        finally:
            handle.close()

    def test_read_handle_declares_what_the_planner_may_assume(self, backend: Backend) -> None:
        # the I/O planner reads these and never the backend's type: object stores want one large request per
        # record, kernel file systems bounded system calls (and memory maps where the handle offers them)
        backend.write("caps.bin", PAYLOAD)
        handle = backend.mover.open_reader(backend.path("caps.bin"))
        try:
            caps = handle.capabilities()
            assert caps.request_bound is (backend.name in ("memory", "s3")), caps
            assert caps.can_map is (handle.mapped() is not None), caps
            assert caps.max_span >= caps.verify_step > 0 and caps.coalesce_span >= caps.whole_item_limit
        finally:
            handle.close()

    def test_read_file_refuses_more_than_its_cap(self, backend: Backend) -> None:
        backend.write("c.bin", PAYLOAD)
        assert backend.mover.read_file(backend.path("c.bin"), len(PAYLOAD)) == PAYLOAD
        with pytest.raises(CorruptCheckpointError):
            backend.mover.read_file(backend.path("c.bin"), len(PAYLOAD) - 1)

    def test_missing_file_is_file_not_found(self, backend: Backend) -> None:
        with pytest.raises(FileNotFoundError):
            handle = backend.mover.open_reader(backend.path("missing.bin"))
            handle.size()

    def test_exists_list_and_remove(self, backend: Backend) -> None:
        backend.write("d.bin", b"d")
        backend.write("e.bin", b"e")
        assert backend.mover.exists(backend.path("d.bin"))
        assert not backend.mover.exists(backend.path("nope.bin"))
        try:
            names = sorted(str(p).rstrip("/").rsplit("/", 1)[-1] for p in backend.mover.ls(backend.root))
        except NotImplementedError:
            assert backend.name == "torch_style", "only a backend without ls may refuse to list"
        else:
            assert names == ["d.bin", "e.bin"]
        backend.mover.rm_file(backend.path("d.bin"))
        assert not backend.exists("d.bin") and backend.exists("e.bin")
        backend.mover.remove_quietly(backend.path("d.bin"))  # already gone: no error

    def test_publish_replaces_whole_and_leaves_no_temporary(self, backend: Backend) -> None:
        publish_bytes(backend.mover, backend.path(".metadata"), b"old" * 100, sync=True)
        publish_bytes(backend.mover, backend.path(".metadata"), b"new", sync=True)
        assert backend.read(".metadata") == b"new"
        assert not backend.exists(".metadata.tmp")

    def test_aborted_stage_keeps_the_committed_file(self, backend: Backend) -> None:
        backend.write("f.safetensors", b"committed")
        staged = stage_file(backend.mover, backend.path("f.safetensors"))
        staged.write([memoryview(b"half of a new file")])
        staged.abort()
        assert backend.read("f.safetensors") == b"committed"
        assert not backend.exists("f.safetensors.tmp")

    def test_create_new_bytes_refuses_an_existing_name(self, backend: Backend) -> None:
        assert backend.mover.create_new_bytes(backend.path(".dcpio.lock"), b"first")
        assert not backend.mover.create_new_bytes(backend.path(".dcpio.lock"), b"second")
        assert backend.read(".dcpio.lock") == b"first"

    def test_checkpoint_round_trip_and_overwrite(self, backend: Backend) -> None:
        old, new = make_state_dict(seed=11), make_state_dict(seed=12)
        for state in (old, new):
            # torch's FsspecWriter pattern: the base class made, then the backend and the path assigned
            writer = dcpio.FileSystemWriter(backend.root, thread_count=2)
            writer.fs = backend.mover
            writer.path = backend.mover.init_path(backend.root)
            dcp.save(state, storage_writer=writer)
        reader = dcpio.FileSystemReader(backend.root)
        reader.fs = backend.mover
        reader.path = backend.mover.init_path(backend.root)
        out = template_like(new)
        with trusted_objects():
            dcp.load(out, storage_reader=reader)
        assert_tree_equal(new, out)
        assert not backend.exists(".dcpio.lock")


# ------------------------------------------------------------------------------------------ short reads and writes
class _ShortStream(io.RawIOBase):
    """A raw stream over a real file that moves at most ``step`` bytes per call, as raw streams may."""

    def __init__(self, path: Path, mode: str, step: int) -> None:
        self._file = path.open(mode.replace("b", "") + "b", buffering=0)
        self._step = step

    def readable(self) -> bool:
        return self._file.readable()

    def writable(self) -> bool:
        return self._file.writable()

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        return self._file.readinto(view[: self._step]) or 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        return self._file.write(view[: self._step]) if self._step else 0

    def close(self) -> None:
        self._file.close()
        super().close()


class ShortIOFileSystem(StreamOnlyFileSystem):
    """A torch-style backend whose streams return short reads and short writes (or none at all)."""

    def __init__(self, read_step: int = 999, write_step: int = 1000) -> None:
        self.read_step = read_step
        self.write_step = write_step

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Generator[io.IOBase, None, None]:
        stream = _ShortStream(Path(path), mode, self.read_step if "r" in mode else self.write_step)
        try:
            yield stream
        finally:
            stream.close()


def _save_load_through(fs: TorchFileSystemBase, path: Path, state: dict[str, Any]) -> dict[str, Any]:
    writer = dcpio.FileSystemWriter(path)
    writer.fs = fs
    dcp.save(state, storage_writer=writer)
    reader = dcpio.FileSystemReader(path)
    reader.fs = fs
    out = template_like(state)
    with trusted_objects():
        dcp.load(out, storage_reader=reader)
    return out


def test_short_reads_and_writes_are_completed(tmp_path: Path) -> None:
    state = make_state_dict(seed=21)
    assert_tree_equal(state, _save_load_through(ShortIOFileSystem(), tmp_path / "ck", state))
    # the bytes on disk are what torch's own reader expects too: the short-write loop lost nothing
    plain = template_like(state)
    with trusted_objects():
        dcp.load(plain, storage_reader=dcpio.FileSystemReader(tmp_path / "ck"))
    assert_tree_equal(state, plain)


def test_a_stream_that_takes_nothing_is_reported(tmp_path: Path) -> None:
    with pytest.raises(BaseException) as info:
        _save_load_through(ShortIOFileSystem(write_step=0), tmp_path / "ck", {"w": torch.ones(64)})
    errors = [e for e in exception_chain(info.value) if isinstance(e, CheckpointWriteError)]
    assert errors and "accepted no bytes" in str(errors[0]) and str(tmp_path / "ck") in str(errors[0])


# ------------------------------------------------------------------------------------------ golden bytes
def test_torch_save_envelope_golden_bytes() -> None:
    from dcpio.formats.torch_save import encode_envelope

    head, tail = encode_envelope(torch.float32, (2,))
    data = torch.tensor([1.5, -2.0]).numpy().tobytes()
    # the facts a torch reader relies on: a zip local header first, tensor data 64-byte aligned, the archive's
    # data.pkl first, the central directory and zip64 end records in the tail
    assert head[:4] == b"PK\x03\x04" and len(head) % 64 == 0 and len(head) == 704
    assert head[30:46] == b"archive/data.pkl"
    assert tail[:4] == b"PK\x01\x02" and tail[-22:-18] == b"PK\x05\x06" and len(tail) == 561
    # and the exact bytes: any change to the envelope must be deliberate (and still load with torch, below)
    assert hashlib.sha256(head).hexdigest() == "9497440ef3fdfc6ddf3ac8630f81146ba1aab6dbffad200eb6596c6cc52bc491"
    assert hashlib.sha256(tail).hexdigest() == "c8749f7008a277383fdfc1cc4b21c6fb13d9b8c8f3b906cc4ec87afc8ec70465"
    loaded = torch.load(io.BytesIO(head + data + tail), weights_only=True)
    assert torch.equal(loaded, torch.tensor([1.5, -2.0]))


# ------------------------------------------------------------------------------------------ races on shared caches
def _race(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run ``fn(i)`` on ``n`` threads released together, with the interpreter switching threads constantly."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as err:  # collected and re-raised below
            errors.append(err)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        sys.setswitchinterval(old)
    if errors:
        raise errors[0]
    return results


def test_race_ranged_read_block_cache() -> None:
    backend = _memory_backend()
    data = os.urandom(300_000)
    backend.write("r.bin", data)
    handle = backend.mover.open_reader(backend.path("r.bin"))
    offsets = [(i * 7919) % (len(data) - 100) for i in range(32)]
    got = _race(32, lambda i: handle.read(offsets[i], 100))
    assert got == [data[o : o + 100] for o in offsets]
    assert len(handle._blocks) <= 8  # type: ignore[attr-defined]


def test_race_fsspec_thread_pool_is_created_once() -> None:
    mover = FsspecFileSystem(f"memory://race-{uuid.uuid4().hex[:8]}")
    pools = _race(16, lambda i: mover._pool())
    assert all(p is pools[0] for p in pools)
    mover.close()


def test_race_local_memory_map_is_shared(tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    (tmp_path / "m.bin").write_bytes(data)
    handle = dcpio.FileSystem().open_reader(str(tmp_path / "m.bin"))
    maps = _race(16, lambda i: handle.mapped())
    assert all(m is maps[0] for m in maps) and bytes(maps[0][:4096].numpy()) == data[:4096]
    handle.close()


def test_race_stream_read_handle_seek_and_read(tmp_path: Path) -> None:
    data = os.urandom(200_000)
    (tmp_path / "s.bin").write_bytes(data)
    handle = as_mover(StreamOnlyFileSystem()).open_reader(tmp_path / "s.bin")
    offsets = [(i * 4099) % (len(data) - 5000) for i in range(24)]
    got = _race(24, lambda i: handle.read(offsets[i], 5000))
    assert got == [data[o : o + 5000] for o in offsets]
    handle.close()


def test_race_safetensors_blob_header_cache(tmp_path: Path) -> None:
    from dcpio.formats import dcp_safetensors
    from dcpio.formats.safetensors import write_file

    write_file(dcpio.FileSystem(), str(tmp_path / "blob.safetensors"), {"a": torch.ones(3), "b": torch.zeros(5)})
    handle = dcpio.FileSystem().open_reader(str(tmp_path / "blob.safetensors"))
    headers = _race(16, lambda i: dcp_safetensors._header_at(handle, 0, "race"))
    assert all(h.tensors == headers[0].tensors for h in headers) and set(headers[0].tensors) == {"a", "b"}
    assert list(dcp_safetensors._headers[handle]) == [0]
    handle.close()


def test_race_save_lock_admits_one_writer(tmp_path: Path) -> None:
    from dcpio.commit import SaveConflictError, SaveLock

    def take(i: int) -> bool:
        lock = SaveLock(_OtherProcessFS(), str(tmp_path), f"save-{i}")
        try:
            lock.acquire()
        except SaveConflictError:
            return False
        return True

    assert sum(_race(12, take)) == 1


class _OtherProcessFS(dcpio.FileSystem):
    """Lock records that claim a live process of another host, so no thread takes another's lock as stale."""

    def create_new_bytes(self, path: str | os.PathLike[str], data: bytes) -> bool:
        return super().create_new_bytes(path, data.replace(b'"host": "', b'"host": "elsewhere-'))


def test_storage_errors_are_checkpoint_errors() -> None:
    assert issubclass(CorruptCheckpointError, CheckpointError)


def test_race_thread_scratch_is_never_shared() -> None:
    from dcpio.tensor_bytes import thread_scratch

    barrier = threading.Barrier(12)

    def fill(i: int) -> bool:
        buf = thread_scratch("race", 4096 + i)
        buf.fill_(i)
        barrier.wait()  # every thread has filled its buffer before any checks: a shared buffer would show
        again = thread_scratch("race", 4096 + i)
        return bool((again == i).all()) and again.data_ptr() == buf.data_ptr()

    assert all(_race(12, fill))


def test_race_engine_source_cache_opens_each_file_once(tmp_path: Path) -> None:
    from dcpio.engine.load import SourceCache
    from dcpio.engine.sources import IOStats

    (tmp_path / "h.bin").write_bytes(PAYLOAD)
    opened: list[str] = []

    class Counting(dcpio.FileSystem):
        def open_reader(self, path: str | os.PathLike[str]) -> Any:
            opened.append(str(path))
            return super().open_reader(path)

    cache = SourceCache(Counting(), IOStats())
    sources = _race(16, lambda i: cache(str(tmp_path / "h.bin")))
    assert all(s is sources[0] for s in sources) and opened == [str(tmp_path / "h.bin")]
    cache.close()
