"""The S3 specifics of the fsspec mover: s3fs options, multipart uploads, single PUTs, conditional creates.

* Writes go out as a multipart upload: ``write`` copies the caller's buffers into part-sized buffers (the caller may
  reuse its memory as soon as ``write`` returns), full parts upload in parallel on the mover's thread pool, and a
  semaphore bounds the parts in flight (``DCPIO_MAX_INFLIGHT`` / ``DCPIO_S3_PART_SIZE``). A file smaller than one
  part is a single PUT at ``close()``: an object appears whole or not at all, which the put-last commit relies on.
* Lock files use a conditional PUT (``If-None-Match: *``): the store refuses it when the key exists.
* botocore's and s3fs's own retries are switched off: :mod:`dcpio.movers.retry` is the only retry loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, cast

from dcpio.errors import CheckpointWriteError
from dcpio.movers.base import WriteHandle
from dcpio.movers.retry import http_info

if TYPE_CHECKING:
    from dcpio.movers.fsspec import FsspecFileSystem

__all__ = [
    "S3_MAX_PARTS",
    "S3_MIN_PART",
    "MultipartWriteHandle",
    "check_bucket",
    "endpoint_of",
    "put_if_absent",
    "put_object",
    "s3_options",
]

S3_MIN_PART = 5 << 20  # S3 refuses parts below 5 MiB (all but the last)
S3_MAX_PARTS = 10_000


def endpoint_of(options: dict[str, Any]) -> str | None:
    """The endpoint URL the storage options point at, or None for the default AWS endpoint."""
    client = options.get("client_kwargs") or {}
    endpoint = options.get("endpoint_url") or (client.get("endpoint_url") if isinstance(client, dict) else None)
    return str(endpoint) if endpoint else None


def check_bucket(mover: FsspecFileSystem, path: str) -> None:
    """One HEAD of the bucket, so a wrong bucket, key or endpoint fails before any upload."""
    bucket = mover._p(path).split("/", 1)[0]
    mover.call("checking the bucket", path, lambda: mover.fs.call_s3("head_bucket", Bucket=bucket), writing=True)


def put_object(mover: FsspecFileSystem, path: str, data: bytes) -> None:
    """One PUT of the whole object: atomic on S3 (readers see the old object or the new one)."""
    bucket, key, _ = mover.fs.split_path(mover._p(path))
    mover.call("writing", path, lambda: mover.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data), writing=True)


def put_if_absent(mover: FsspecFileSystem, path: str, data: bytes) -> bool:
    """A conditional PUT (``If-None-Match: *``): True if created, False if the key already exists."""
    bucket, key, _ = mover.fs.split_path(mover._p(path))

    def put() -> bool:
        try:
            mover.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except Exception as err:
            code, status, _ = http_info(err)
            if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True

    return mover.call("creating", path, put, writing=True)


def s3_options(options: dict[str, Any]) -> dict[str, Any]:
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


class MultipartWriteHandle(WriteHandle):
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
        if len(self._parts) >= S3_MAX_PARTS:
            raise CheckpointWriteError(
                f"{self.path}: more than {S3_MAX_PARTS} parts; raise DCPIO_S3_PART_SIZE and save again"
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
                if tries > 1 and http_info(err)[0] == "NoSuchUpload":
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
