"""Stream transforms (compression...) applied to each stored item, recorded per item as descriptors.

The classes subclass torch's abstract ``Extension``/``StreamTransformExtension``, so dcpio's writer accepts torch's
extension objects and torch's writer accepts dcpio's. The descriptor ``stream.zstd/1`` is the one torch writes; a
reader rebuilds the chain from the descriptors stored with each item (innermost last, as torch records them).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import IO, Any, cast

from dcpio._torch_compat import _TorchExtension, _TorchStreamTransform
from dcpio.errors import CheckpointReadError, CorruptCheckpointError

__all__ = [
    "Extension",
    "ExtensionRegistry",
    "StreamTransformExtension",
    "ZStandard",
    "apply_decode",
    "decode_limit",
    "encoder_chain",
]

Extension = _TorchExtension
StreamTransformExtension = _TorchStreamTransform


def _zstandard() -> Any:
    try:
        import zstandard
    except ImportError as err:
        raise ImportError("ZStandard compression needs the 'zstandard' package: pip install 'dcpio[zstd]'") from err
    return zstandard


class ZStandard(_TorchStreamTransform):
    """Zstandard compression of each item (descriptor ``stream.zstd/1``, readable by torch's ``ZStandard``).

    Args:
        level: compression level (zstd's default 3 when None).

    Example::

        writer = dcpio.FileSystemWriter(path, _extensions=[dcpio.ZStandard()])
    """

    def __init__(self, level: int | None = None) -> None:
        super().__init__()
        _zstandard()
        self.level = level

    @staticmethod
    def registry_name() -> str:
        return "stream.zstd"

    @staticmethod
    def from_descriptor(version: str) -> ZStandard:
        if version.partition(".")[0] != "1":
            raise CheckpointReadError(f"unknown zstd transform version {version!r}; upgrade dcpio")
        return ZStandard()

    def get_descriptor(self) -> str:
        return f"{self.registry_name()}/1"

    def transform_to(self, output: IO[bytes]) -> IO[bytes]:
        zstd = _zstandard()
        kwargs = {} if self.level is None else {"level": self.level}
        # closefd=False: the caller closes the underlying stream itself
        return cast(IO[bytes], zstd.ZstdCompressor(**kwargs).stream_writer(output, closefd=False))

    def transform_from(self, input: IO[bytes]) -> IO[bytes]:
        zstd = _zstandard()
        return cast(IO[bytes], zstd.ZstdDecompressor().stream_reader(input, closefd=False))


class ExtensionRegistry:
    """Maps descriptor names to extension classes; knows :class:`ZStandard` out of the box.

    Example::

        registry = dcpio.ExtensionRegistry()
        registry.register(MyCipher)
        reader = dcpio.FileSystemReader(path, _extension_registry=registry)
    """

    def __init__(self) -> None:
        self.extensions: dict[str, type[_TorchExtension]] = {ZStandard.registry_name(): ZStandard}

    def register(self, cls: type[_TorchExtension]) -> None:
        self.extensions[cls.registry_name()] = cls

    def from_descriptor_list(self, descriptors: Sequence[str]) -> Sequence[_TorchExtension]:
        out: list[_TorchExtension] = []
        for descriptor in descriptors:
            name, _, version = descriptor.partition("/")
            name = name.partition("@")[0] if name not in self.extensions else name
            cls = self.extensions.get(name)
            if cls is None:
                raise CheckpointReadError(
                    f"the checkpoint uses stream transform {descriptor!r}, which is not registered; register its "
                    "class with ExtensionRegistry.register and pass the registry as _extension_registry"
                )
            out.append(cls.from_descriptor(version))
        return out


class _Sink(io.RawIOBase):
    """Collects transformed output in memory (a transformed item's size is unknown until it is done)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.parts.append(data)
        return len(data)


def encoder_chain(extensions: Sequence[_TorchStreamTransform], sink: IO[bytes]) -> IO[bytes]:
    """Wrap ``sink`` so that bytes written pass through every extension, first one outermost."""
    stream = sink
    for ext in extensions:
        stream = ext.transform_to(stream)
    return stream


def encode(extensions: Sequence[_TorchStreamTransform], pieces: Sequence[memoryview]) -> list[bytes]:
    """Run ``pieces`` through the transforms; returns the stored bytes as a list of chunks."""
    sink = _Sink()
    stream = encoder_chain(extensions, cast(IO[bytes], sink))
    for piece in pieces:
        stream.write(piece)
    stream.flush()
    stream.close()
    return sink.parts


# a torch.save record around a tensor's bytes: zip headers, data.pkl, alignment; generous, yet tiny next to a bomb
_ENVELOPE_SLACK = 1 << 20
# a non-tensor value has no recorded decoded size: allow what no real pickled object needs from a compressed item
_BYTES_RATIO = 64
_BYTES_FLOOR = 256 << 20


def decode_limit(expected: tuple[Any, tuple[int, ...]] | None, stored_length: int) -> int:
    """The most bytes undoing an item's transforms may produce.

    A tensor item holds its recorded chunk (``expected``: dtype and sizes from the metadata) plus a record envelope;
    a value item, at most :data:`_BYTES_RATIO` times its stored size (with a floor).
    """
    if expected is not None:
        dtype, sizes = expected
        numel = 1
        for s in sizes:
            numel *= s
        return numel * int(dtype.itemsize) + _ENVELOPE_SLACK
    return max(_BYTES_FLOOR, _BYTES_RATIO * stored_length)


def apply_decode(
    registry: Any, descriptors: Sequence[str], stored: bytes, limit: int | None = None, where: str = "item"
) -> bytearray:
    """Undo the transforms named by ``descriptors`` (as recorded at save time) on ``stored`` bytes.

    Output is produced in bounded steps and refused once it passes ``limit`` bytes (a decompression bomb is stopped
    there, not after it filled memory). Returns a writable buffer, so tensors can be viewed on it without a copy.
    """
    stream: IO[bytes] = io.BytesIO(stored)
    for ext in registry.from_descriptor_list(descriptors):
        if isinstance(ext, _TorchStreamTransform):
            stream = ext.transform_from(stream)
    out = bytearray()
    cap = limit if limit is not None else max(_BYTES_FLOOR, _BYTES_RATIO * len(stored))
    while True:
        chunk = stream.read(min(4 << 20, cap + 1 - len(out)))
        if not chunk:
            return out
        out += chunk
        if len(out) > cap:
            raise CorruptCheckpointError(
                f"{where}: undoing the stream transforms {list(descriptors)} of a {len(stored)}-byte item produces "
                f"more than the {cap} bytes the metadata allows for it (a decompression bomb, or damaged metadata); "
                "refused. Restore the file or load an earlier checkpoint."
            )
