"""Movers as backends: the registry and its install hints, the retry policy's messages for unreachable stores."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import dcpio
from dcpio.errors import CheckpointError, CheckpointWriteError
from dcpio.movers.fsspec import FsspecFileSystem
from dcpio.movers.registry import mover_for, register
from helpers import free_port


def test_registry_picks_the_mover_for_a_path_or_url(tmp_path: Path) -> None:
    assert type(mover_for(tmp_path)) is dcpio.FileSystem
    assert type(mover_for(str(tmp_path / "x"))) is dcpio.FileSystem
    mem = mover_for("memory://registry-test")
    assert isinstance(mem, FsspecFileSystem) and not mem.supports_atomic_rename
    local_url = mover_for(f"file://{tmp_path}")
    assert isinstance(local_url, FsspecFileSystem) and local_url.supports_atomic_rename
    with pytest.raises(CheckpointError, match="only for URLs"):
        mover_for(tmp_path, key="k")


def test_registered_factory_serves_its_protocol(tmp_path: Path) -> None:
    made: list[str] = []

    def factory(url: str, **options: object) -> dcpio.FileSystem:
        made.append(url)
        return dcpio.FileSystem()

    register("dcpiotest", factory)
    assert type(mover_for("dcpiotest://a/b")) is dcpio.FileSystem
    assert made == ["dcpiotest://a/b"]


def test_missing_s3fs_is_one_clear_sentence() -> None:
    code = """
import sys
sys.modules["s3fs"] = None  # as if s3fs were not installed
from dcpio.movers.registry import mover_for
from dcpio.errors import CheckpointError
for make in (lambda: mover_for("s3://bucket/ckpt"), lambda: __import__("dcpio").FsspecWriter("s3://bucket/ckpt")):
    try:
        make()
    except CheckpointError as err:
        print("ERR", err)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    lines = [line for line in out.splitlines() if line.startswith("ERR ")]
    assert len(lines) == 2, out
    for line in lines:
        assert line.startswith("ERR s3://bucket/ckpt: s3:// needs the s3fs package"), line
        # once each: the package, one way to install it, one alternative (fsspec's own hint is not repeated)
        assert line.count("pip install 'dcpio[s3]'") == 1 and line.count("s3fs") == 2, line
        assert "to access" not in line, line


def test_refused_endpoint_is_named_and_not_retried_for_long(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCPIO_RETRY_ATTEMPTS", "6")
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there: every connection is refused
    mover = FsspecFileSystem("s3://bucket/ck", key="k", secret="s", client_kwargs={"endpoint_url": endpoint})
    with pytest.raises(CheckpointWriteError) as info:
        mover.mkdir("s3://bucket/ck")
    text = str(info.value)
    assert f"cannot reach the endpoint {endpoint}" in text and "s3://bucket/ck" in text, text
    assert "throttling" not in text

    calls = 0

    def refused() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(CheckpointWriteError, match="cannot reach"):
        mover.call("writing", "s3://bucket/ck/x", refused, writing=True)
    assert calls == 2, f"a refused connection was tried {calls} times (6 allowed for transient errors)"


def test_dropped_connections_still_retry_up_to_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCPIO_RETRY_ATTEMPTS", "4")
    mover = FsspecFileSystem("memory://retry-test")
    calls = 0

    def reset() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionResetError(104, "Connection reset by peer")

    with pytest.raises(CheckpointWriteError, match="failed 4 times"):
        mover.call("writing", "memory://retry-test/x", reset, writing=True)
    assert calls == 4
