"""Which mover serves a path or URL, and what to install when its package is missing.

A plain path (or a ``pathlib.Path``) is the local disk (:class:`dcpio.movers.local.FileSystem`); a URL goes to the
fsspec mover (:class:`dcpio.movers.fsspec.FsspecFileSystem`), which reaches ``s3://`` through s3fs, ``gs://``
through gcsfs and so on. Protocols whose fsspec implementation lives in a separate package are listed here with the
package and the command that installs it, so a missing package is reported once, in one sentence, before any
request is sent. Other movers can be registered for a protocol (:func:`register`).

Example::

    from dcpio.movers.registry import mover_for
    fs = mover_for("s3://bucket/ckpt", client_kwargs={"endpoint_url": "http://127.0.0.1:9000"})
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dcpio.errors import CheckpointError
from dcpio.movers.base import FileSystemBase

__all__ = [
    "KNOWN_PROTOCOLS",
    "ProtocolInfo",
    "check_installed",
    "missing_package_error",
    "mover_for",
    "protocol_of",
    "register",
]


@dataclass(frozen=True)
class ProtocolInfo:
    """A protocol whose fsspec implementation needs a package of its own."""

    module: str  # the module that must import
    install: str  # what to run to get it


KNOWN_PROTOCOLS: dict[str, ProtocolInfo] = {
    "s3": ProtocolInfo("s3fs", "pip install 'dcpio[s3]'"),
    "s3a": ProtocolInfo("s3fs", "pip install 'dcpio[s3]'"),
    "gs": ProtocolInfo("gcsfs", "pip install gcsfs"),
    "gcs": ProtocolInfo("gcsfs", "pip install gcsfs"),
    "az": ProtocolInfo("adlfs", "pip install adlfs"),
    "abfs": ProtocolInfo("adlfs", "pip install adlfs"),
    "abfss": ProtocolInfo("adlfs", "pip install adlfs"),
    "hf": ProtocolInfo("huggingface_hub", "pip install huggingface_hub"),
}

_FACTORIES: dict[str, Callable[..., FileSystemBase]] = {}


def register(protocol: str, factory: Callable[..., FileSystemBase]) -> None:
    """Serve ``protocol://`` URLs with ``factory(url, **storage_options)`` instead of the fsspec mover."""
    _FACTORIES[protocol] = factory


def protocol_of(path: str | os.PathLike[str]) -> str | None:
    """The URL's protocol (``"s3"``), or None for a plain local path."""
    text = os.fspath(path)
    if not isinstance(text, str) or "://" not in text:
        return None
    return text.split("://", 1)[0].lower() or None


def missing_package_error(url: str, protocol: str, err: BaseException | None = None) -> CheckpointError:
    """One sentence naming the missing package and the command that installs it."""
    info = KNOWN_PROTOCOLS.get(protocol)
    if info is None:
        detail = f" ({err})" if err is not None else ""
        return CheckpointError(
            f"{url}: the {protocol}:// protocol needs a package that is not installed{detail}; install the fsspec "
            "implementation for it and run again."
        )
    return CheckpointError(
        f"{url}: {protocol}:// needs the {info.module} package, which is not installed. Install it with "
        f"{info.install} (or pip install {info.module}) and run again."
    )


def check_installed(url: str, protocol: str) -> None:
    """Raise :func:`missing_package_error` if ``protocol`` needs a package that cannot be imported."""
    info = KNOWN_PROTOCOLS.get(protocol)
    if info is None:
        return
    try:
        found = importlib.util.find_spec(info.module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, or a broken install
        found = False
    if not found:
        raise missing_package_error(url, protocol)


def mover_for(path: str | os.PathLike[str], **storage_options: Any) -> FileSystemBase:
    """The mover for ``path``: the local disk for a plain path, else a registered or the fsspec mover.

    Raises:
        CheckpointError: the URL's protocol needs a package that is not installed (the message says which, and
            the command that installs it), or fsspec does not know the protocol.
    """
    protocol = protocol_of(path)
    if protocol is None:
        if storage_options:
            raise CheckpointError(f"{path}: storage options {sorted(storage_options)} are only for URLs")
        from dcpio.movers.local import FileSystem

        return FileSystem()
    factory = _FACTORIES.get(protocol)
    if factory is not None:
        return factory(os.fspath(path), **storage_options)
    check_installed(os.fspath(path), protocol)
    from dcpio.movers.fsspec import FsspecFileSystem

    return FsspecFileSystem(path, **storage_options)
