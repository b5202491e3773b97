"""The generic fsspec byte mover: checkpoints on any fsspec URL (``s3://`` via s3fs, ``memory://``, ``file://``, ...).

How a save commits here: ``supports_atomic_rename`` is True only for local paths, so :func:`dcpio.commit.strategy_for`
picks the put-last strategy for object stores (the metadata object is written last, by one PUT or ``pipe_file``)
and the atomic-rename strategy for ``file://`` URLs, which go through dcpio's local handles (vectored writes,
positional reads, exclusive creates, fsync, tmp + rename) and keep every local-disk guarantee.

Reads are ranged GETs (``fs.cat_file(path, start, end)``): a large range is split into part-sized GETs fetched in
parallel straight into the caller's buffer, so a resharding load downloads only what it needs. The S3 specifics
(multipart uploads, conditional PUTs, s3fs options) are in :mod:`dcpio.movers.s3`; the retry policy and the final
error messages in :mod:`dcpio.movers.retry`; which mover serves a URL, with install hints, in
:mod:`dcpio.movers.registry`.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

from dcpio import knobs
from dcpio.errors import CheckpointError, CheckpointWriteError, CorruptCheckpointError
from dcpio.movers import s3
from dcpio.movers.base import FileSystemBase, PathLike, ReadHandle, WriteHandle, _truncated
from dcpio.movers.capabilities import Capabilities, object_store_capabilities
from dcpio.movers.local import FileSystem as _LocalFileSystem
from dcpio.movers.registry import check_installed, missing_package_error
from dcpio.movers.retry import RetryPolicy, final_error, is_transient

__all__ = ["FsspecFileSystem", "is_transient"]

T = TypeVar("T")

_LOCAL_PROTOCOLS = frozenset({"file", "local"})
_MAX_WORKERS = 16
_SMALL_READ = 16 << 10  # reads up to this size are served from cached blocks (record headers)
_SMALL_BLOCK = 64 << 10
_SMALL_BLOCKS_KEPT = 8


class FsspecFileSystem(FileSystemBase):
    """A byte mover over any fsspec URL, with multipart uploads, parallel ranged reads and bounded retries.

    Args:
        url: the checkpoint's URL (``s3://bucket/prefix``, ``memory://name``, ``file:///abs/path``, ...).
            Every path this mover hands out is a URL of the same protocol, so messages name what the user
            typed.
        **storage_options: passed to fsspec (for s3fs: ``key``, ``secret``, ``token``, ``endpoint_url`` or
            ``client_kwargs={"endpoint_url": ...}``, ``config_kwargs``, ...).

    Raises:
        CheckpointError: the protocol is unknown, or its package (s3fs for ``s3://``) is not installed.
    """

    supports_parallel_reads = True

    def __init__(self, url: PathLike, **storage_options: Any) -> None:
        self._storage_options = dict(storage_options)
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._bucket_checked: set[str] = set()
        self._retry = RetryPolicy()
        self._connect(str(url))
        inflight_parts = max(2, knobs.max_bytes_in_flight() // max(1, self._part_size))
        self._workers = max(2, min(_MAX_WORKERS, inflight_parts))
        self._slots = threading.BoundedSemaphore(inflight_parts)

    # -- set-up ----------------------------------------------------------------------------------------------
    def _connect(self, url: str) -> None:
        from fsspec.core import split_protocol, url_to_fs

        protocol = split_protocol(url)[0] or "file"
        check_installed(url, protocol)
        options = dict(self._storage_options)
        is_s3 = protocol in ("s3", "s3a")
        if is_s3:
            options = s3.s3_options(options)
        try:
            fs, _ = url_to_fs(url, **options)
        except ImportError as err:
            raise missing_package_error(url, protocol, err) from err
        except ValueError as err:
            raise CheckpointError(
                f"{url}: fsspec cannot open this URL ({err}). Check the protocol and the storage options."
            ) from err
        if is_s3:
            # one attempt inside s3fs: our retry loop below is the only one (see the module docstring)
            fs.retries = 1
        self.fs = fs
        self.protocol = protocol
        self.is_local = protocol in _LOCAL_PROTOCOLS
        self.is_s3 = is_s3
        # capability flags read by dcpio.commit.strategy_for: only local paths rename atomically and create
        # exclusively; object stores commit by putting the metadata last
        self.supports_atomic_rename = self.is_local
        self.supports_exclusive_create = self.is_local
        # an S3 object appears on the upload's completion; other stores (memory://) show a file while it is written
        self.supports_atomic_writes = is_s3
        self.endpoint = s3.endpoint_of(self._storage_options) if is_s3 else None
        part = knobs.s3_part_size()
        self._part_size = max(part, s3.S3_MIN_PART) if is_s3 else part
        self._local = _LocalFileSystem() if self.is_local else None

    def close(self) -> None:
        """Stop the transfer threads (they also stop when the mover is garbage-collected)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="dcpio-fsspec")
            return self._executor

    # -- paths -----------------------------------------------------------------------------------------------
    def _p(self, path: PathLike) -> str:
        """The store's own path for ``path`` (protocol stripped)."""
        return cast(str, self.fs._strip_protocol(str(path)))

    def url(self, path: PathLike) -> str:
        """``path`` as a URL of this mover's protocol, for messages."""
        s = str(path)
        return s if "://" in s else f"{self.protocol}://{s}"

    # -- retries ---------------------------------------------------------------------------------------------
    def call(self, what: str, path: PathLike, fn: Callable[[], T], *, writing: bool) -> T:
        """Run one remote request, retrying transient failures; map a final failure to dcpio's errors.

        Args:
            what: the operation, for the message ("uploading part 3", "reading bytes [0, 10)").
            path: the object it concerns.
            fn: the request; it must be safe to repeat (every S3 request dcpio sends is).
            writing: pick CheckpointWriteError (True) or CheckpointReadError (False) for a final failure.
        """

        def final(err: Exception, attempts: int, elapsed: float, transient: bool) -> Exception:
            return self._final(what, path, err, writing, attempts, elapsed, transient)

        return self._retry.run(fn, final)

    def _final(
        self,
        what: str,
        path: PathLike,
        err: BaseException,
        writing: bool,
        attempts: int,
        elapsed: float,
        transient: bool,
    ) -> Exception:
        return final_error(
            self.url(path),
            what,
            err,
            writing=writing,
            attempts=attempts,
            elapsed=elapsed,
            transient=transient,
            endpoint=self.endpoint,
        )

    def fail(self, what: str, path: PathLike, err: BaseException, *, writing: bool) -> Exception:
        """dcpio's error for a failure that cannot be retried here (a stream write), naming URL and cause."""
        return self._final(what, path, err, writing, 1, 0.0, is_transient(err))

    # -- torch's FileSystemBase interface --------------------------------------------------------------------
    @contextmanager
    def create_stream(self, path: PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        writing = any(ch in mode for ch in "wa+")
        if writing and self.is_local:
            os.makedirs(os.path.dirname(self._p(path)) or ".", exist_ok=True)
        stream = self.call(f"opening ({mode})", path, lambda: self.fs.open(self._p(path), mode), writing=writing)
        try:
            yield cast(io.IOBase, stream)
        except BaseException:
            try:
                stream.close()
            finally:
                if writing:
                    self.remove_quietly_noraise(path)
            raise
        else:
            self.call("closing", path, stream.close, writing=writing)
        finally:
            if writing:
                self.fs.invalidate_cache(self._p(path))

    def concat_path(self, path: PathLike, suffix: str) -> str:
        return f"{str(path).rstrip('/')}/{suffix}"

    def init_path(self, path: PathLike, **kwargs: Any) -> str:
        url = str(path)
        from fsspec.core import split_protocol

        protocol = split_protocol(url)[0] or "file"
        if kwargs or protocol != self.protocol:
            self._storage_options.update(kwargs)
            self._connect(url)
        stripped = url.rstrip("/")
        return url if stripped.endswith(":") else stripped

    def rename(self, path: PathLike, new_path: PathLike) -> None:
        if self.is_local:
            os.replace(self._p(path), self._p(new_path))
            return
        # object stores: a copy then a delete (not atomic; the writer does not rely on it, see the module
        # docstring)
        self.call(
            f"copying to {self.url(new_path)}",
            path,
            lambda: self.fs.copy(self._p(path), self._p(new_path)),
            writing=True,
        )
        self.fs.invalidate_cache(self._p(new_path))
        self.rm_file(path)

    def mkdir(self, path: PathLike) -> None:
        if self.is_s3:
            # no directories on S3; check the bucket once, so a wrong bucket or key fails here, before any upload
            bucket = self._p(path).split("/", 1)[0]
            if bucket not in self._bucket_checked:
                s3.check_bucket(self, str(path))
                self._bucket_checked.add(bucket)
            return
        self.call(
            "creating the directory",
            path,
            lambda: self.fs.makedirs(self._p(path), exist_ok=True),
            writing=True,
        )

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PathLike) -> bool:
        return not isinstance(checkpoint_id, Path) and "://" in str(checkpoint_id)

    def exists(self, path: PathLike) -> bool:
        return bool(self.call("checking whether it exists", path, lambda: self.fs.exists(self._p(path)), writing=False))

    def rm_file(self, path: PathLike) -> None:
        try:
            self.call("removing", path, lambda: self.fs.rm_file(self._p(path)), writing=True)
        finally:
            self.fs.invalidate_cache(self._p(path))

    def ls(self, path: PathLike) -> list[str]:
        p = self._p(path)
        self.fs.invalidate_cache(p)
        entries = self.call("listing", path, lambda: self.fs.ls(p, detail=False), writing=False)
        base = str(path).rstrip("/")
        names = sorted({str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries})
        return [f"{base}/{name}" for name in names if name]

    # -- fast paths ------------------------------------------------------------------------------------------
    def open_writer(self, path: PathLike) -> WriteHandle:
        if self._local is not None:
            return self._local.open_writer(self._p(path))
        if self.is_s3:
            return s3.MultipartWriteHandle(self, str(path))
        return _StreamWriteHandle(self, str(path))

    def open_reader(self, path: PathLike) -> ReadHandle:
        if self._local is not None:
            return self._local.open_reader(self._p(path))
        return _RangedReadHandle(self, str(path))

    def read_file(self, path: PathLike, limit: int) -> bytes:
        if self._local is not None:
            return self._local.read_file(self._p(path), limit)
        # one ranged GET of at most limit + 1 bytes: enough to tell a too-large object without downloading it
        data = self.call(
            "reading", path, lambda: self.fs.cat_file(self._p(path), start=0, end=limit + 1), writing=False
        )
        if len(data) > limit:
            raise CorruptCheckpointError(
                f"{self.url(path)}: more than the {limit}-byte cap for this kind of file; "
                "it is not what dcpio wrote. Raise DCPIO_MAX_METADATA_BYTES only if you trust it."
            )
        return bytes(data)

    def put_bytes(self, path: PathLike, data: bytes) -> None:
        if self._local is not None:
            self._local.put_bytes(self._p(path), data)
            return
        if self.is_s3:
            s3.put_object(self, str(path), data)  # a single PUT is atomic on S3: no temporary object, no rename
        else:
            # pipe_file stores the whole value at once (memory://, and stores whose close() is the commit)
            p = self._p(path)
            self.call("writing", path, lambda: self.fs.pipe_file(p, data), writing=True)
        self.fs.invalidate_cache(self._p(path))

    def create_new_bytes(self, path: PathLike, data: bytes) -> bool:
        if self._local is not None:
            return self._local.create_new_bytes(self._p(path), data)
        if self.is_s3:
            created = s3.put_if_absent(self, str(path), data)
            self.fs.invalidate_cache(self._p(path))
            return created
        return super().create_new_bytes(path, data)

    def replace(self, path: PathLike, new_path: PathLike) -> None:
        self.rename(path, new_path)

    def sync_dir(self, path: PathLike) -> None:
        if self._local is not None:
            self._local.sync_dir(self._p(path))

    def remove_quietly(self, path: PathLike) -> None:
        try:
            self.rm_file(path)
        except FileNotFoundError:
            pass

    def remove_quietly_noraise(self, path: PathLike) -> None:
        """Best-effort removal on an error path that is already being reported."""
        try:
            self.remove_quietly(path)
        except Exception:  # the original error matters more than a failed clean-up
            pass

    def local_root(self, path: PathLike) -> str | None:
        if self._local is not None:
            return os.path.realpath(self._p(path))
        return None

    # -- internals shared by the handles ---------------------------------------------------------------------
    def part_size(self, part_number: int) -> int:
        """Bytes of part ``part_number`` (1-based): grows past 1000 parts so 10,000 parts cover terabytes."""
        return self._part_size << min(4, (part_number - 1) // 1000)


class _StreamWriteHandle(WriteHandle):
    """Append through ``fs.open(path, "wb")`` for stores other than S3 and local disk; ``close()`` commits."""

    def __init__(self, mover: FsspecFileSystem, path: str) -> None:
        self.path = path
        self._mover = mover
        self._stream: Any = mover.call("creating", path, lambda: mover.fs.open(mover._p(path), "wb"), writing=True)
        self._written = 0

    def write(self, buffers: Sequence[memoryview]) -> int:
        if self._stream is None:
            raise CheckpointWriteError(f"{self.path}: write after close (a bug in dcpio; please report it)")
        n = 0
        try:
            for b in buffers:
                view = b.cast("B") if b.format != "B" or b.ndim != 1 else b
                self._stream.write(view)
                n += len(view)
        except Exception as err:
            raise self._mover.fail("writing", self.path, err, writing=True) from err
        self._written += n
        return n

    def tell(self) -> int:
        return self._written

    def sync(self) -> None:
        """A no-op: these streams have no descriptor to fsync; ``close()`` is their durability point."""

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            return
        try:
            stream.close()
        except Exception as err:
            raise self._mover.fail("closing", self.path, err, writing=True) from err
        finally:
            self._mover.fs.invalidate_cache(self._mover._p(self.path))

    def abort(self) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            return
        try:
            discard = getattr(stream, "discard", None)
            if callable(discard):
                discard()
            else:
                stream.close()
        except Exception:  # an abort runs on an error path already being reported
            pass


class _RangedReadHandle(ReadHandle):
    """Ranged GETs via ``fs.cat_file``; a large range is split into parallel part-sized GETs. Thread-safe.

    Small reads (record headers: a zip record's local header, central directory and end record are read in
    pieces of a few bytes each) are served from aligned ``_SMALL_BLOCK`` blocks kept per handle, so parsing one
    record costs one or two requests instead of eight. On an object store a request costs milliseconds whatever
    its size below a few hundred KiB, so a 64 KiB block is nearly free and bounds the extra bytes per record.
    """

    def __init__(self, mover: FsspecFileSystem, path: str) -> None:
        self.path = path
        self._mover = mover
        self._p = mover._p(path)
        self._size: int | None = None
        self._lock = threading.Lock()
        self._blocks: OrderedDict[int, bytes] = OrderedDict()

    def capabilities(self) -> Capabilities:
        return object_store_capabilities()

    def size(self) -> int:
        with self._lock:
            size = self._size
        if size is None:
            info = self._mover.call(
                "looking up its size", self.path, lambda: self._mover.fs.info(self._p), writing=False
            )
            size = int(info["size"])
            with self._lock:
                self._size = size
        return size

    def _get(self, offset: int, want: int) -> bytes:
        data = self._mover.call(
            f"reading bytes [{offset}, {offset + want})",
            self.path,
            lambda: self._mover.fs.cat_file(self._p, start=offset, end=offset + want),
            writing=False,
        )
        if len(data) < want:
            raise _truncated(self.path, offset, want, len(data))
        return bytes(data)

    def _fetch(self, offset: int, view: memoryview) -> None:
        data = self._get(offset, len(view))
        view[:] = memoryview(data)[: len(view)]

    def _block(self, index: int, size: int) -> bytes:
        with self._lock:
            block = self._blocks.get(index)
            if block is not None:
                self._blocks.move_to_end(index)
                return block
        start = index * _SMALL_BLOCK
        block = self._get(start, min(_SMALL_BLOCK, size - start))
        with self._lock:
            self._blocks[index] = block
            while len(self._blocks) > _SMALL_BLOCKS_KEPT:
                self._blocks.popitem(last=False)
        return block

    def readinto_many(self, offset: int, buffers: Sequence[memoryview]) -> None:
        # one ranged GET (or one split read) for consecutive pieces, then scattered: requests cost more than copies
        views = [b.cast("B") if b.format != "B" or b.ndim != 1 else b for b in buffers if len(b)]
        if len(views) <= 1:
            for v in views:
                self.readinto(offset, v)
            return
        whole = memoryview(bytearray(sum(len(v) for v in views)))
        self.readinto(offset, whole)
        pos = 0
        for v in views:
            v[:] = whole[pos : pos + len(v)]
            pos += len(v)

    def readinto(self, offset: int, buf: memoryview) -> None:
        if buf.format != "B" or buf.ndim != 1:
            buf = buf.cast("B")
        want = len(buf)
        if want == 0:
            return
        size = self.size()
        if offset < 0 or offset + want > size:
            raise _truncated(self.path, offset, want, max(0, size - offset))
        if want <= _SMALL_READ:
            pos = 0
            while pos < want:
                index = (offset + pos) // _SMALL_BLOCK
                block = self._block(index, size)
                inner = offset + pos - index * _SMALL_BLOCK
                take = min(want - pos, len(block) - inner)
                buf[pos : pos + take] = block[inner : inner + take]
                pos += take
            return
        step = self._mover.part_size(1)
        if want <= step:
            self._fetch(offset, buf)
            return
        pool = self._mover._pool()
        futures = [pool.submit(self._fetch, offset + s, buf[s : s + step]) for s in range(0, want, step)]
        try:
            for f in futures:
                f.result()
        finally:
            for f in futures:
                f.cancel()
            for f in futures:
                if not f.cancelled():
                    try:
                        f.exception()  # wait: no thread may still write into buf after we return
                    except BaseException:
                        pass

    def close(self) -> None:
        with self._lock:
            self._blocks.clear()
