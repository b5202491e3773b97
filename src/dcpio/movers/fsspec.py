"""The fsspec byte mover: checkpoints on any fsspec URL (``s3://`` via s3fs, ``memory://``, ``file://``, ...).

How a save commits on an object store
-------------------------------------
Object stores have no atomic rename (S3's "rename" is a copy and a delete) and no fsync, but a single PUT of
an object is atomic: readers see the old object or the new one, never a part. dcpio therefore uses the
*commit-marker* scheme Orbax documents: data objects are complete (a multipart upload finishes only in
``close()``) before the writer asks for the metadata, and ``write_file_atomic`` PUTs ``.metadata`` straight to
its final key. That PUT is the commit point; a save that dies before it leaves the previous ``.metadata`` in
place, naming the previous data objects, which the writer only removes after the new metadata is committed.
``supports_atomic_rename`` is False for these stores so the writer never relies on ``rename``. ``file://``
URLs are plain local paths: they go through dcpio's local handles (vectored writes, positional reads, fsync,
tmp + rename) and keep every local-disk guarantee.

Fast paths
----------
* Writes to S3 go out as a multipart upload: ``write`` copies the caller's buffers into part-sized buffers
  (the caller may reuse its memory as soon as ``write`` returns), full parts upload in parallel on a small
  thread pool, and a semaphore bounds the parts in flight (``DCPIO_MAX_INFLIGHT`` / ``DCPIO_S3_PART_SIZE``).
  A file smaller than one part is a single PUT at ``close()``.
* Reads are ranged GETs (``fs.cat_file(path, start, end)``): a large range is split into part-sized GETs
  fetched in parallel straight into the caller's buffer, so a resharding load downloads only what it needs.

Retries
-------
This module owns retrying. botocore's own retries are switched off (``total_max_attempts=1``) and s3fs's
retry loop is set to one attempt, so a throttled request is not retried 5 x 5 times behind our back.
Transient failures (HTTP 5xx, 429, ``SlowDown``, connection resets and timeouts) are retried with exponential
backoff and full jitter, at most ``DCPIO_RETRY_ATTEMPTS`` times within ``DCPIO_RETRY_MAX_SECONDS``; permanent
ones (no such bucket, access denied, invalid credentials, other 4xx) fail at once with the URL, the cause and
what to do.
"""

from __future__ import annotations

import asyncio
import errno
import io
import os
import random
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

from dcpio import knobs
from dcpio.errors import CheckpointError, CheckpointReadError, CheckpointWriteError
from dcpio.movers.base import FileSystemBase, PathLike, ReadHandle, WriteHandle, _truncated
from dcpio.movers.local import FileSystem as _LocalFileSystem

__all__ = ["FsspecFileSystem", "is_transient"]

T = TypeVar("T")

_LOCAL_PROTOCOLS = frozenset({"file", "local"})
_S3_MIN_PART = 5 << 20  # S3 refuses parts below 5 MiB (all but the last)
_S3_MAX_PARTS = 10_000
_BACKOFF_BASE_S = 0.1
_BACKOFF_CAP_S = 10.0
_MAX_WORKERS = 16
_SMALL_READ = 16 << 10  # reads up to this size are served from cached blocks (record headers)
_SMALL_BLOCK = 64 << 10
_SMALL_BLOCKS_KEPT = 8

_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "RequestLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "BadDigest",  # a body damaged in transit: sending it again is the fix
        "XAmzContentSHA256Mismatch",
    }
)
_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidSecurity",
        "AccountProblem",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
    }
)
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EBUSY,
        errno.EAGAIN,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.ETIMEDOUT,
        errno.EPIPE,
        getattr(errno, "EREMOTEIO", errno.EIO),
    }
)


def _transient_types() -> tuple[type[BaseException], ...]:
    """Exception classes that mean "the connection failed", from whichever HTTP stacks are installed."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.timeout, asyncio.TimeoutError]
    try:
        from fsspec.exceptions import FSTimeoutError

        types.append(FSTimeoutError)
    except ImportError:
        pass
    try:
        from botocore.exceptions import HTTPClientError, IncompleteReadError, ResponseStreamingError

        types += [HTTPClientError, IncompleteReadError, ResponseStreamingError]
    except ImportError:
        pass
    try:
        import aiohttp

        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ServerTimeoutError]
    except ImportError:
        pass
    return tuple(types)


_TRANSIENT_TYPES: tuple[type[BaseException], ...] | None = None


def _chain(err: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen and len(out) < 8:
        out.append(cur)
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return out


def _http_info(err: BaseException) -> tuple[str, int | None, str]:
    """(error code, HTTP status, server message) of the first HTTP response in ``err``'s chain."""
    for e in _chain(err):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            error = response.get("Error") or {}
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            return (
                str(error.get("Code") or ""),
                status if isinstance(status, int) else None,
                str(error.get("Message") or ""),
            )
    return "", None, ""


def is_transient(err: BaseException) -> bool:
    """True when ``err`` is worth retrying: HTTP 5xx/429/408, throttling, a dropped or timed-out link."""
    global _TRANSIENT_TYPES
    if _TRANSIENT_TYPES is None:
        _TRANSIENT_TYPES = _transient_types()
    code, status, _ = _http_info(err)
    if code in _TRANSIENT_CODES:
        return True
    if status is not None:
        return status >= 500 or status in (408, 429)
    if code:
        return False
    for e in _chain(err):
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        if isinstance(e, _TRANSIENT_TYPES):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
    return False


def _cause(err: BaseException) -> str:
    code, status, message = _http_info(err)
    if code or status:
        if code == str(status):
            code = ""  # a HEAD reply has no body: botocore uses the status as the code
        parts = [p for p in (code, f"HTTP {status}" if status else "", message.rstrip(".")) if p]
        return ": ".join(parts)
    return f"{type(err).__name__}: {err}"


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
        self._rng = random.Random()
        self._connect(str(url))
        inflight_parts = max(2, knobs.max_bytes_in_flight() // max(1, self._part_size))
        self._workers = max(2, min(_MAX_WORKERS, inflight_parts))
        self._slots = threading.BoundedSemaphore(inflight_parts)

    # -- set-up ----------------------------------------------------------------------------------------------
    def _connect(self, url: str) -> None:
        from fsspec.core import split_protocol, url_to_fs

        protocol = split_protocol(url)[0] or "file"
        options = dict(self._storage_options)
        is_s3 = protocol in ("s3", "s3a")
        if is_s3:
            options = _s3_options(options)
        try:
            fs, _ = url_to_fs(url, **options)
        except ImportError as err:
            raise CheckpointError(
                f"{url}: the {protocol}:// protocol needs a package that is not installed ({err}). "
                + ("Install s3fs to access s3:// (pip install s3fs, or pip install 'dcpio[s3]')." if is_s3 else "")
                + " Then run again."
            ) from err
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
        self.supports_atomic_rename = self.is_local
        part = knobs.s3_part_size()
        self._part_size = max(part, _S3_MIN_PART) if is_s3 else part
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
        attempts = knobs.retry_attempts()
        budget = float(knobs.retry_max_seconds())
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except Exception as err:
                if isinstance(err, CheckpointError) or getattr(err, "_dcpio", False):
                    raise  # already ours (a nested call, a truncation): it names the file and the fix
                transient = is_transient(err)
                elapsed = time.monotonic() - start
                delay = self._rng.uniform(0, min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2**attempt))
                if not transient or attempt >= attempts or elapsed + delay > budget:
                    raise self._final(what, path, err, writing, attempt, elapsed, transient) from err
                time.sleep(delay)

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
        return _tag(self._final_untagged(what, path, err, writing, attempts, elapsed, transient))

    def fail(self, what: str, path: PathLike, err: BaseException, *, writing: bool) -> Exception:
        """dcpio's error for a failure that cannot be retried here (a stream write), naming URL and cause."""
        return self._final(what, path, err, writing, 1, 0.0, is_transient(err))

    def _final_untagged(
        self,
        what: str,
        path: PathLike,
        err: BaseException,
        writing: bool,
        attempts: int,
        elapsed: float,
        transient: bool,
    ) -> Exception:
        url = self.url(path)
        code, status, _ = _http_info(err)
        cause = _cause(err)
        if transient:
            cls = CheckpointWriteError if writing else CheckpointReadError
            return cls(
                f"{url}: {what} failed {attempts} times in {elapsed:.1f} s; last cause: {cause}. "
                "The store kept throttling or dropping connections. Try again later, or allow more with "
                "DCPIO_RETRY_ATTEMPTS / DCPIO_RETRY_MAX_SECONDS."
                + (" The previous checkpoint is intact." if writing else "")
            )
        if code == "NoSuchBucket" or (what == "checking the bucket" and status == 404):
            bucket = self._p(path).split("/", 1)[0]
            msg = (
                f"{url}: bucket '{bucket}' does not exist ({cause}) while {what}. "
                "Create the bucket or fix the URL (and the endpoint_url in the storage options)."
            )
            return CheckpointWriteError(msg) if writing else FileNotFoundError(errno.ENOENT, msg, url)
        if code in _AUTH_CODES or status in (401, 403) or any(isinstance(e, PermissionError) for e in _chain(err)):
            return PermissionError(
                errno.EACCES,
                f"{url}: access refused while {what} ({cause}). Check the credentials "
                "(storage options key=/secret=/token= or the AWS_* environment), the endpoint, "
                "and that the policy allows this action",
                url,
            )
        if code in ("NoSuchKey", "NoSuchUpload", "404") or status == 404 or _has(err, FileNotFoundError):
            return FileNotFoundError(
                errno.ENOENT,
                f"{url}: not found while {what} ({cause}). "
                "If this is a data file the checkpoint's metadata names, the checkpoint is incomplete: "
                "restore the object or load another checkpoint",
                url,
            )
        cls = CheckpointWriteError if writing else CheckpointReadError
        return cls(
            f"{url}: {what} failed: {cause}. This is not a transient error; "
            "fix the cause (URL, storage options, bucket policy) and run again."
            + (" The previous checkpoint is intact." if writing else "")
        )

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
            # no directories on S3; check the bucket once, so a wrong bucket or key fails here, before any
            # upload
            bucket = self._p(path).split("/", 1)[0]
            if bucket in self._bucket_checked:
                return
            self.call(
                "checking the bucket",
                path,
                lambda: self.fs.call_s3("head_bucket", Bucket=bucket),
                writing=True,
            )
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
            return _MultipartWriteHandle(self, str(path))
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
            from dcpio.errors import CorruptCheckpointError

            raise CorruptCheckpointError(
                f"{self.url(path)}: more than the {limit}-byte cap for this kind of file; "
                "it is not what dcpio wrote. Raise DCPIO_MAX_METADATA_BYTES only if you trust it."
            )
        return bytes(data)

    def write_file_atomic(self, path: PathLike, data: bytes, sync: bool) -> None:
        if self._local is not None:
            self._local.write_file_atomic(self._p(path), data, sync)
            return
        p = self._p(path)
        if self.is_s3:
            bucket, key, _ = self.fs.split_path(p)
            # a single PUT is atomic on S3: the final key directly, no temporary object, no rename
            self.call(
                "writing",
                path,
                lambda: self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data),
                writing=True,
            )
        else:
            # pipe_file stores the whole value at once (memory://, and stores whose close() is the commit)
            self.call("writing", path, lambda: self.fs.pipe_file(p, data), writing=True)
        self.fs.invalidate_cache(p)

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


def _has(err: BaseException, cls: type[BaseException]) -> bool:
    return any(isinstance(e, cls) for e in _chain(err))


def _s3_options(options: dict[str, Any]) -> dict[str, Any]:
    """s3fs options with botocore's retries off, a pool that fits our threads, and no listings cache."""
    out = dict(options)
    config = dict(out.get("config_kwargs") or {})
    config["retries"] = {"mode": "standard", "total_max_attempts": 1}
    config.setdefault("max_pool_connections", 64)
    out["config_kwargs"] = config
    out.setdefault("use_listings_cache", False)
    # our own instance: we change its retry count, which must not leak into other users of the same options
    out["skip_instance_cache"] = True
    return out


def _tag(err: Exception) -> Exception:
    err._dcpio = True  # type: ignore[attr-defined]
    return err


class _MultipartWriteHandle(WriteHandle):
    """Append to an S3 object by a multipart upload; parts upload in parallel, bounded by the slots."""

    def __init__(self, mover: FsspecFileSystem, path: str) -> None:
        self.path = path
        self._mover = mover
        self._bucket, self._key, _ = mover.fs.split_path(mover._p(path))
        self._upload_id: str | None = None
        self._parts: list[Future[dict[str, Any]]] = []
        # the part being filled: allocated once at its full size, filled by slice assignment (one copy, no
        # realloc)
        self._buf: bytearray | None = None
        self._fill = 0
        self._written = 0
        self._closed = False

    def write(self, buffers: Sequence[memoryview]) -> int:
        if self._closed:
            raise CheckpointWriteError(f"{self.path}: write after close (a bug in dcpio; please report it)")
        n = 0
        for b in buffers:
            view = b.cast("B") if b.format != "B" or b.ndim != 1 else b
            pos = 0
            while pos < len(view):
                if self._buf is None:
                    self._buf = bytearray(self._mover.part_size(len(self._parts) + 1))
                    self._fill = 0
                take = min(len(self._buf) - self._fill, len(view) - pos)
                self._buf[self._fill : self._fill + take] = view[pos : pos + take]
                self._fill += take
                pos += take
                if self._fill == len(self._buf):
                    self._submit_part()
            n += len(view)
        self._written += n
        return n

    def _take_buffer(self) -> bytearray:
        body = self._buf if self._buf is not None else bytearray()
        if len(body) > self._fill:
            del body[self._fill :]
        self._buf, self._fill = None, 0
        return body

    def _submit_part(self) -> None:
        mover = self._mover
        if self._upload_id is None:
            resp = mover.call(
                "starting a multipart upload",
                self.path,
                lambda: mover.fs.call_s3("create_multipart_upload", Bucket=self._bucket, Key=self._key),
                writing=True,
            )
            self._upload_id = cast(str, resp["UploadId"])
        if len(self._parts) >= _S3_MAX_PARTS:
            raise CheckpointWriteError(
                f"{self.path}: more than {_S3_MAX_PARTS} parts; raise DCPIO_S3_PART_SIZE and save again"
            )
        body = self._take_buffer()
        number = len(self._parts) + 1
        upload_id = self._upload_id
        mover._slots.acquire()  # bounds the bytes in flight; an upload always finishes and frees its slot

        def upload() -> dict[str, Any]:
            try:
                resp = mover.call(
                    f"uploading part {number}",
                    self.path,
                    lambda: mover.fs.call_s3(
                        "upload_part",
                        Bucket=self._bucket,
                        Key=self._key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=body,
                    ),
                    writing=True,
                )
                return {"PartNumber": number, "ETag": resp["ETag"]}
            finally:
                mover._slots.release()

        try:
            self._parts.append(mover._pool().submit(upload))
        except BaseException:
            mover._slots.release()
            raise

    def tell(self) -> int:
        return self._written

    def sync(self) -> None:
        """Nothing to do: an S3 object becomes durable and visible as a whole in ``close()``."""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        mover = self._mover
        try:
            if self._upload_id is None:
                body = self._take_buffer()
                mover.call(
                    "writing",
                    self.path,
                    lambda: mover.fs.call_s3("put_object", Bucket=self._bucket, Key=self._key, Body=body),
                    writing=True,
                )
                return
            if self._fill:
                self._submit_part()
            parts = [f.result() for f in self._parts]  # re-raises the first failed part's error
            self._complete(self._upload_id, parts)
            self._upload_id = None
        except BaseException:
            self._abort_upload()
            raise
        finally:
            mover.fs.invalidate_cache(mover._p(self.path))

    def _complete(self, upload_id: str, parts: list[dict[str, Any]]) -> None:
        mover = self._mover
        tries = 0

        def complete() -> Any:
            nonlocal tries
            tries += 1
            try:
                return mover.fs.call_s3(
                    "complete_multipart_upload",
                    Bucket=self._bucket,
                    Key=self._key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
            except Exception as err:
                # a retried completion whose first attempt did complete (the reply was lost) sees
                # NoSuchUpload:
                # the object is there with our size, so the upload did succeed
                if tries > 1 and _http_info(err)[0] == "NoSuchUpload":
                    info = mover.fs.info(mover._p(self.path))
                    if int(info.get("size", -1)) == self._written:
                        return None
                raise

        mover.call("completing the multipart upload", self.path, complete, writing=True)

    def _abort_upload(self) -> None:
        for f in self._parts:
            f.cancel()
        for f in self._parts:
            try:
                f.exception()
            except BaseException:  # cancelled or failed: we are on an error path already
                pass
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is None:
            return
        try:
            self._mover.fs.call_s3("abort_multipart_upload", Bucket=self._bucket, Key=self._key, UploadId=upload_id)
        except Exception:  # best effort: a lifecycle rule cleans leftovers; the original error is what matters
            pass

    def abort(self) -> None:
        self._closed = True
        self._buf, self._fill = None, 0
        self._abort_upload()


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
                self._stream.write(b)
                n += len(b)
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

    prefers_large_reads = True

    def __init__(self, mover: FsspecFileSystem, path: str) -> None:
        self.path = path
        self._mover = mover
        self._p = mover._p(path)
        self._size: int | None = None
        self._lock = threading.Lock()
        self._blocks: OrderedDict[int, bytes] = OrderedDict()

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
