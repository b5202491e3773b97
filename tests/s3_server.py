"""A real S3 API server on 127.0.0.1 for the tests, and a fault-injecting HTTP proxy in front of it.

Import the fixtures explicitly from a test module (this file is not a plugin)::

    from s3_server import fault_proxy, moto, s3  # noqa: F401

* :class:`MotoServer` starts moto's standalone server (``moto_server``) in a subprocess on a free port, waits
  until it answers, creates an IAM user with full rights and a real access key, and then turns moto's
  authentication on, so a wrong key is refused exactly as AWS refuses it (``InvalidAccessKeyId``). Stopping it
  terminates the process.
* :class:`FaultProxy` is a small threaded HTTP/1.1 proxy: it forwards every request to moto unchanged (so
  SigV4 signatures still hold), logs each one (method, path, status, bytes each way, start and end times),
  and, on demand, answers ``503 SlowDown`` or drops the connection, for the first N matching requests or for a
  seeded fraction of them. Decisions are drawn from ``random.Random(seed)`` in request order, so a run injects
  the same number of faults.

Both are bounded in time (start waits at most 30 s, every socket has a timeout) and leave nothing running.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

__all__ = [
    "FaultProxy",
    "MotoServer",
    "RequestRecord",
    "S3Endpoint",
    "fault_proxy",
    "moto",
    "s3",
    "s3_via_proxy",
]

_SOCKET_TIMEOUT = 30.0
_REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class S3Endpoint:
    """Where to reach a bucket and with which keys; ``storage_options`` is what fsspec/s3fs take."""

    endpoint_url: str
    key: str
    secret: str
    bucket: str

    @property
    def storage_options(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": _REGION},
        }

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def with_endpoint(self, endpoint_url: str) -> S3Endpoint:
        return S3Endpoint(endpoint_url, self.key, self.secret, self.bucket)


class MotoServer:
    """moto's standalone S3 server in a subprocess, with IAM authentication enforced after set-up."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.key = ""
        self.secret = ""
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        exe = shutil.which("moto_server", path=os.path.dirname(sys.executable))
        cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
        cmd += ["-H", "127.0.0.1", "-p", str(self.port)]
        env = dict(os.environ, AWS_DEFAULT_REGION=_REGION)
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self._proc.returncode} before answering")
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto_server did not answer on {self.endpoint_url} within {timeout} s")
            time.sleep(0.1)
        try:
            self._set_up_auth()
        except BaseException:
            self.stop()
            raise

    def _set_up_auth(self) -> None:
        import boto3

        iam = boto3.client(
            "iam",
            endpoint_url=self.endpoint_url,
            region_name=_REGION,
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        iam.create_user(UserName="dcpio")
        iam.put_user_policy(
            UserName="dcpio",
            PolicyName="all",
            PolicyDocument='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}',
        )
        key = iam.create_access_key(UserName="dcpio")["AccessKey"]
        self.key, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        # from now on every request must be signed with a key moto knows
        req = urllib.request.Request(
            f"{self.endpoint_url}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},  # a form content type would hide the body from moto
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            if resp.status != 200:
                raise RuntimeError("moto refused to enable authentication")

    def client(self, endpoint_url: str | None = None) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint_url,
            region_name=_REGION,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            config=Config(retries={"total_max_attempts": 1}),
        )

    def new_bucket(self) -> S3Endpoint:
        name = f"dcpio-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return S3Endpoint(self.endpoint_url, self.key, self.secret, name)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def __enter__(self) -> MotoServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class RequestRecord:
    """One request seen by the proxy; ``fault`` is ``""`` when it was forwarded."""

    method: str
    target: str
    status: int
    sent: int  # request body bytes from the client
    received: int  # response body bytes to the client
    start: float
    end: float
    fault: str = ""

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""


@dataclass
class _Rule:
    kind: str  # "503", "drop" or "truncate"
    first: int
    fraction: float
    methods: frozenset[str] | None
    match: str | None
    rng: random.Random
    seen: int = 0
    injected: int = 0


_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>proxy</RequestId></Error>"
)


class _Closed(Exception):
    pass


def _read_head(rfile: Any) -> list[bytes] | None:
    lines: list[bytes] = []
    while True:
        line = rfile.readline(65537)
        if not line:
            if lines:
                raise _Closed("connection closed inside a header")
            return None
        if line in (b"\r\n", b"\n"):
            if not lines:
                continue  # stray CRLF between keep-alive requests
            return lines
        lines.append(line)


def _header(lines: list[bytes], name: bytes) -> bytes | None:
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _read_body(rfile: Any, lines: list[bytes], until_close: bool) -> tuple[bytes, int]:
    """Return the body exactly as framed on the wire, and its payload length."""
    te = _header(lines, b"transfer-encoding")
    if te is not None and b"chunked" in te.lower():
        raw = bytearray()
        payload = 0
        while True:
            size_line = rfile.readline(65537)
            if not size_line:
                raise _Closed("connection closed inside a chunked body")
            raw += size_line
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    trailer = rfile.readline(65537)
                    if not trailer:
                        raise _Closed("connection closed inside trailers")
                    raw += trailer
                    if trailer in (b"\r\n", b"\n"):
                        return bytes(raw), payload
            data = rfile.read(size + 2)
            if len(data) != size + 2:
                raise _Closed("connection closed inside a chunk")
            raw += data
            payload += size
    length = _header(lines, b"content-length")
    if length is not None:
        n = int(length)
        data = rfile.read(n)
        if len(data) != n:
            raise _Closed("connection closed inside a body")
        return data, n
    if until_close:
        data = rfile.read()
        return data, len(data)
    return b"", 0


class FaultProxy:
    """A threaded HTTP/1.1 proxy on 127.0.0.1 in front of ``upstream_url`` that can inject faults."""

    def __init__(self, upstream_url: str) -> None:
        host_port = upstream_url.split("://", 1)[-1].rstrip("/")
        host, _, port = host_port.rpartition(":")
        self._upstream = (host, int(port))
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.port = int(self._server.getsockname()[1])
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._log: list[RequestRecord] = []
        self._rule: _Rule | None = None
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)
        self._acceptor.start()

    # -- control
    # -----------------------------------------------------------------------------------------------
    def inject(
        self,
        kind: str,
        *,
        first: int = 0,
        fraction: float = 0.0,
        methods: set[str] | None = None,
        match: str | None = None,
        seed: int = 0,
    ) -> None:
        """Fault the first ``first`` matching requests, then a ``fraction`` of the rest (seeded).

        ``kind`` is ``"503"`` (answer SlowDown), ``"drop"`` (close the connection after reading the request,
        without forwarding it) or ``"truncate"`` (forward, then send half the response body and close).
        ``methods`` limits the rule to some HTTP methods, ``match`` to targets containing that string.
        """
        if kind not in ("503", "drop", "truncate"):
            raise ValueError(f"unknown fault kind {kind!r}")
        with self._lock:
            self._rule = _Rule(
                kind, first, fraction, frozenset(methods) if methods else None, match, random.Random(seed)
            )

    def clear(self) -> None:
        with self._lock:
            self._rule = None

    @property
    def injected(self) -> int:
        with self._lock:
            return self._rule.injected if self._rule else 0

    def log(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._log)

    def reset_log(self) -> None:
        with self._lock:
            self._log.clear()

    def close(self) -> None:
        self._stopping.set()
        self._acceptor.join(timeout=5)
        self._server.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- serving
    # -----------------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(_SOCKET_TIMEOUT)
            with self._lock:
                self._conns.add(conn)
                self._threads = [t for t in self._threads if t.is_alive()]
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _decide(self, method: str, target: str) -> str:
        with self._lock:
            rule = self._rule
            if rule is None:
                return ""
            if rule.methods is not None and method not in rule.methods:
                return ""
            if rule.match is not None and rule.match not in target:
                return ""
            rule.seen += 1
            hit = rule.seen <= rule.first or (rule.fraction > 0 and rule.rng.random() < rule.fraction)
            if hit:
                rule.injected += 1
                return rule.kind
            return ""

    def _record(self, rec: RequestRecord) -> None:
        with self._lock:
            self._log.append(rec)

    def _serve(self, conn: socket.socket) -> None:
        upstream: socket.socket | None = None
        up_rfile: Any = None
        rfile = conn.makefile("rb")
        try:
            while not self._stopping.is_set():
                head = _read_head(rfile)
                if head is None:
                    return
                start = time.monotonic()
                method, target = head[0].split(b" ")[:2]
                method_s, target_s = method.decode(), target.decode()
                expect = _header(head, b"expect")
                if expect is not None and expect.lower() == b"100-continue":
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body, sent = _read_body(rfile, head, until_close=False)
                fault = self._decide(method_s, target_s)
                if fault == "drop":
                    self._record(RequestRecord(method_s, target_s, 0, sent, 0, start, time.monotonic(), fault))
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "503":
                    self._record(RequestRecord(method_s, target_s, 503, sent, 0, start, time.monotonic(), fault))
                    conn.sendall(
                        b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                        + f"Content-Length: {len(_SLOWDOWN)}\r\n\r\n".encode()
                        + _SLOWDOWN
                    )
                    continue
                if upstream is None:
                    upstream = socket.create_connection(self._upstream, timeout=_SOCKET_TIMEOUT)
                    up_rfile = upstream.makefile("rb")
                # moto gets the request unchanged except for Expect, which this proxy already answered
                fwd_head = [h for h in head if not h.lower().startswith(b"expect:")]
                upstream.sendall(b"".join(fwd_head) + b"\r\n" + body)
                while True:
                    resp_head = _read_head(up_rfile)
                    if resp_head is None:
                        raise _Closed("upstream closed the connection")
                    status = int(resp_head[0].split(b" ")[1])
                    if status >= 200:
                        break
                no_body = method_s == "HEAD" or status in (204, 304)
                conn_hdr = _header(resp_head, b"connection") or b""
                close_after = conn_hdr.lower() == b"close" or resp_head[0].startswith(b"HTTP/1.0")
                if no_body:
                    resp_body, received = b"", 0
                else:
                    resp_body, received = _read_body(up_rfile, resp_head, until_close=close_after)
                if fault == "truncate" and len(resp_body) > 1:
                    self._record(
                        RequestRecord(method_s, target_s, status, sent, received // 2, start, time.monotonic(), fault)
                    )
                    conn.sendall(b"".join(resp_head) + b"\r\n" + resp_body[: len(resp_body) // 2])
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_RDWR)
                    return
                # logged before the reply: a client holding its answer always finds its request in the log
                self._record(RequestRecord(method_s, target_s, status, sent, received, start, time.monotonic()))
                conn.sendall(b"".join(resp_head) + b"\r\n" + resp_body)
                if close_after:
                    with contextlib.suppress(OSError):
                        upstream.close()
                    upstream, up_rfile = None, None
                    if conn_hdr.lower() == b"close":
                        return
        except (_Closed, OSError, ValueError, IndexError):
            return  # the client or moto went away; the client sees a dropped connection
        finally:
            with contextlib.suppress(OSError):
                rfile.close()
            with contextlib.suppress(OSError):
                conn.close()
            if upstream is not None:
                with contextlib.suppress(OSError):
                    upstream.close()
            with self._lock:
                self._conns.discard(conn)


# -- pytest fixtures (import them explicitly)
# ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    """One moto server per test module (starting one costs about a second)."""
    with MotoServer() as server:
        yield server


@pytest.fixture
def s3(moto: MotoServer) -> S3Endpoint:
    """A fresh, empty bucket on the module's moto server, reached directly."""
    return moto.new_bucket()


@pytest.fixture
def fault_proxy(moto: MotoServer) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the module's moto server (no faults until told)."""
    with FaultProxy(moto.endpoint_url) as proxy:
        yield proxy


@pytest.fixture
def s3_via_proxy(s3: S3Endpoint, fault_proxy: FaultProxy) -> S3Endpoint:
    """The fresh bucket of ``s3``, reached through ``fault_proxy``."""
    return s3.with_endpoint(fault_proxy.endpoint_url)
