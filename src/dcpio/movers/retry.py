"""The retry policy of the remote movers: what is worth retrying, how long, and what a final failure says.

botocore's own retries are switched off (``total_max_attempts=1``) and s3fs's retry loop is set to one attempt (see
:mod:`dcpio.movers.s3`), so a throttled request is not retried 5 x 5 times behind our back: this module is the only
retry loop. Transient failures (HTTP 5xx, 429, ``SlowDown``, connection resets and timeouts) are retried with
exponential backoff and full jitter, at most ``DCPIO_RETRY_ATTEMPTS`` times within ``DCPIO_RETRY_MAX_SECONDS``.
An endpoint that cannot be reached at all (connection refused, no route, unknown host) gets one quick retry: a
server that refuses connections is down or misconfigured, and waiting a minute only delays the message. Permanent
errors (no such bucket, access denied, invalid credentials, other 4xx) fail at once. Every final error names the
URL, the cause and what to do.
"""

from __future__ import annotations

import asyncio
import errno
import random
import socket
import time
from collections.abc import Callable
from typing import TypeVar

from dcpio import knobs
from dcpio.errors import CheckpointError, CheckpointReadError, CheckpointWriteError

__all__ = ["RetryPolicy", "cause_of", "final_error", "http_info", "is_transient", "is_unreachable", "tag"]

T = TypeVar("T")

_BACKOFF_BASE_S = 0.1
_BACKOFF_CAP_S = 10.0
# an endpoint refusing connections: one quick retry (a restarting server), then the error
_UNREACHABLE_ATTEMPTS = 2
_UNREACHABLE_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL})
_UNREACHABLE_NAMES = frozenset({"EndpointConnectionError", "ClientConnectorDNSError"})

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


def http_info(err: BaseException) -> tuple[str, int | None, str]:
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
    code, status, _ = http_info(err)
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


def cause_of(err: BaseException) -> str:
    code, status, message = http_info(err)
    if code or status:
        if code == str(status):
            code = ""  # a HEAD reply has no body: botocore uses the status as the code
        parts = [p for p in (code, f"HTTP {status}" if status else "", message.rstrip(".")) if p]
        return ": ".join(parts)
    return f"{type(err).__name__}: {err}"


def _has(err: BaseException, cls: type[BaseException]) -> bool:
    return any(isinstance(e, cls) for e in _chain(err))


def tag(err: Exception) -> Exception:
    err._dcpio = True  # type: ignore[attr-defined]
    return err


def is_unreachable(err: BaseException) -> bool:
    """True when the endpoint could not be connected to at all: refused, no route, or an unknown host name."""
    for e in _chain(err):
        if type(e).__name__ in _UNREACHABLE_NAMES or isinstance(e, (ConnectionRefusedError, socket.gaierror)):
            return True
        if isinstance(e, OSError) and e.errno in _UNREACHABLE_ERRNOS:
            return True
    return False


class RetryPolicy:
    """Runs one remote request, retrying what is worth retrying (see the module docstring)."""

    def __init__(self) -> None:
        self._rng = random.Random()

    def run(self, fn: Callable[[], T], final: Callable[[Exception, int, float, bool], Exception]) -> T:
        """``fn()``, retried; a last failure becomes ``final(err, attempts, elapsed, transient)``, raised from it.

        ``fn`` must be safe to repeat (every S3 request dcpio sends is). Errors that are already dcpio's (a nested
        call, a truncation) pass through untouched: they name the file and the fix.
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
                    raise
                transient = is_transient(err)
                limit = min(attempts, _UNREACHABLE_ATTEMPTS) if is_unreachable(err) else attempts
                elapsed = time.monotonic() - start
                delay = self._rng.uniform(0, min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2**attempt))
                if not transient or attempt >= limit or elapsed + delay > budget:
                    raise final(err, attempt, elapsed, transient) from err
                time.sleep(delay)


def _unreachable_error(url: str, what: str, cause: str, writing: bool, endpoint: str | None) -> Exception:
    where = f"the endpoint {endpoint}" if endpoint else "the store's default endpoint"
    cls = CheckpointWriteError if writing else CheckpointReadError
    return cls(
        f"{url}: cannot reach {where} while {what} ({cause}). Nothing is listening there or the host is unknown: "
        "check endpoint_url in the storage options (client_kwargs={'endpoint_url': ...}), the network, and that "
        "the server is running." + (" The previous checkpoint is intact." if writing else "")
    )


def final_error(
    url: str,
    what: str,
    err: BaseException,
    *,
    writing: bool,
    attempts: int,
    elapsed: float,
    transient: bool,
    endpoint: str | None = None,
) -> Exception:
    """dcpio's error for a request that failed for good: the URL, the operation, the cause and what to do."""
    code, status, _ = http_info(err)
    cause = cause_of(err)
    if is_unreachable(err):
        return tag(_unreachable_error(url, what, cause, writing, endpoint))
    if transient:
        cls = CheckpointWriteError if writing else CheckpointReadError
        return tag(
            cls(
                f"{url}: {what} failed {attempts} times in {elapsed:.1f} s; last cause: {cause}. "
                "The store kept throttling or dropping connections. Try again later, or allow more with "
                "DCPIO_RETRY_ATTEMPTS / DCPIO_RETRY_MAX_SECONDS."
                + (" The previous checkpoint is intact." if writing else "")
            )
        )
    return tag(_permanent_error(url, what, err, writing, code, status, cause))


def _bucket_of(url: str) -> str:
    rest = url.split("://", 1)[-1]
    return rest.split("/", 1)[0]


def _permanent_error(
    url: str, what: str, err: BaseException, writing: bool, code: str, status: int | None, cause: str
) -> Exception:
    if code == "NoSuchBucket" or (what == "checking the bucket" and status == 404):
        msg = (
            f"{url}: bucket '{_bucket_of(url)}' does not exist ({cause}) while {what}. "
            "Create the bucket or fix the URL (and the endpoint_url in the storage options)."
        )
        return CheckpointWriteError(msg) if writing else FileNotFoundError(errno.ENOENT, msg, url)
    if code in _AUTH_CODES or status in (401, 403) or _has(err, PermissionError):
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
