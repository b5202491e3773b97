"""Hypothesis fuzzing of the parsers that read untrusted checkpoint bytes: the ``torch.save`` tensor record parser,
the restricted metadata unpickler and the checksum record. Only dcpio's own errors may come out; any other
exception (IndexError, struct.error, AttributeError, MemoryError...) is a parser bug."""

from __future__ import annotations

import pickle
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

import dcpio
from dcpio.formats.torch_save import encode_envelope, parse_tensor_item
from dcpio.integrity.checksum import BlockChecksums, BlockHasher
from dcpio.integrity.safe_pickle import load_metadata

_FAST = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
_DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.float8_e4m3fn, torch.complex64]


def _parse(data: bytes, length: int | None = None) -> Any:
    n = len(data) if length is None else length
    return parse_tensor_item(lambda o, k: data[o : o + k], n, "fuzz.distcp: tensor 'x'")


def _record(dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    head, tail = encode_envelope(dtype, shape)
    n = dtype.itemsize
    for s in shape:
        n *= s
    return head + bytes(range(256)) * (n // 256) + bytes(n % 256) + tail


_records = st.builds(
    _record,
    st.sampled_from(_DTYPES),
    st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple),
)


@_FAST
@given(st.binary(max_size=2048))
def test_parse_tensor_item_on_random_bytes(data: bytes) -> None:
    try:
        _parse(data)
    except (dcpio.CorruptCheckpointError, dcpio.UnsafeCheckpointError):
        pass


@_FAST
@given(_records, st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4))
def test_parse_tensor_item_on_flipped_records(record: bytes, flips: list[tuple[int, int]]) -> None:
    assert _parse(record).size is not None  # the unmutated record parses
    data = bytearray(record)
    for pos, xor in flips:
        data[pos % len(data)] ^= xor
    try:
        rec = _parse(bytes(data))
    except (dcpio.CorruptCheckpointError, dcpio.UnsafeCheckpointError):
        return
    # accepted: whatever it describes must lie inside the item
    assert 0 <= rec.data_offset and rec.data_offset + rec.data_length <= len(data)


@_FAST
@given(_records, st.integers(0, 10**6))
def test_parse_tensor_item_on_truncated_records(record: bytes, cut: int) -> None:
    data = record[: cut % len(record)]
    try:
        rec = _parse(data)
    except (dcpio.CorruptCheckpointError, dcpio.UnsafeCheckpointError):
        return
    assert rec.data_offset + rec.data_length <= len(data)


@_FAST
@given(_records, st.integers(0, 10**6))
def test_parse_tensor_item_with_a_lying_length(record: bytes, extra: int) -> None:
    # the metadata claims the item is longer than the bytes really are: reads past the end return short data
    try:
        _parse(record, len(record) + extra % 5000)
    except (dcpio.CorruptCheckpointError, dcpio.UnsafeCheckpointError):
        pass


# ------------------------------------------------------------------------------------------------------------------
# metadata
# ------------------------------------------------------------------------------------------------------------------


def _valid_metadata_pickle(protocol: int) -> bytes:
    size = torch.Size([4, 6])
    md = Metadata(
        state_dict_metadata={
            "w": TensorStorageMetadata(
                TensorProperties(dtype=torch.bfloat16),
                size,
                [
                    ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2, 6])),
                    ChunkStorageMetadata(torch.Size([2, 0]), torch.Size([2, 6])),
                ],
            ),
            "step": BytesStorageMetadata(),
        },
        storage_data={
            MetadataIndex("w", torch.Size([0, 0]), 0): _StorageInfo("__0_0.distcp", 0, 1000),
            MetadataIndex("w", torch.Size([2, 0]), 1): _StorageInfo("__1_0.distcp", 0, 1000),
            MetadataIndex("step"): _StorageInfo("__0_0.distcp", 1000, 77),
        },
    )
    info = md.storage_data[MetadataIndex("step")]
    info.dcpio_checksum = BlockHasher(1000, 64).finish().to_record()
    return pickle.dumps(md, protocol=protocol)


_VALID = [_valid_metadata_pickle(p) for p in (3, 4, 5)]
_OK = (dcpio.CheckpointError,)


def test_valid_metadata_pickles_load() -> None:
    for data in _VALID:
        md = load_metadata(data, "fuzz/.metadata")
        assert set(md.state_dict_metadata) == {"w", "step"}


def test_protocol_2_metadata_with_checksums_loads() -> None:
    load_metadata(_valid_metadata_pickle(2), "fuzz/.metadata")


@_FAST
@given(st.binary(max_size=1024))
def test_load_metadata_on_random_bytes(data: bytes) -> None:
    try:
        load_metadata(data, "fuzz/.metadata")
    except _OK:
        pass


@_FAST
@given(st.sampled_from(_VALID), st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=3))
def test_load_metadata_on_mutated_valid_pickles(valid: bytes, flips: list[tuple[int, int]]) -> None:
    data = bytearray(valid)
    for pos, xor in flips:
        data[pos % len(data)] ^= xor
    try:
        load_metadata(bytes(data), "fuzz/.metadata")
    except _OK:
        pass


@_FAST
@given(st.sampled_from(_VALID), st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=3))
def test_load_metadata_on_mutated_valid_pickles_never_runs_or_leaks_other_errors_than_attribute(
    valid: bytes, flips: list[tuple[int, int]]
) -> None:
    """The same fuzzing, tolerating only the known AttributeError bug, so every other escape still fails CI."""
    data = bytearray(valid)
    for pos, xor in flips:
        data[pos % len(data)] ^= xor
    try:
        load_metadata(bytes(data), "fuzz/.metadata")
    except _OK:
        pass
    except AttributeError as err:
        assert "object has no attribute" in str(err), str(err)


@_FAST
@given(st.sampled_from(_VALID), st.integers(0, 10**6))
def test_load_metadata_on_truncated_pickles(valid: bytes, cut: int) -> None:
    try:
        load_metadata(valid[: cut % len(valid)], "fuzz/.metadata")
    except _OK:
        pass


# ------------------------------------------------------------------------------------------------------------------
# checksum records
# ------------------------------------------------------------------------------------------------------------------

_atoms = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.binary(max_size=64),
    st.text(max_size=10),
    st.just("xxh3-64"),
)


@_FAST
@given(
    st.one_of(
        _atoms,
        st.lists(_atoms, max_size=7).map(tuple),
        st.tuples(st.just("xxh3-64"), _atoms, _atoms, _atoms, _atoms),
        st.tuples(
            st.just("xxh3-64"),
            st.integers(-5, 1 << 21),
            st.integers(-5, 1 << 40),
            st.integers(-5, 1 << 30),
            st.binary(max_size=80),
        ),
    )
)
def test_checksum_record_from_garbage(record: object) -> None:
    try:
        sums = BlockChecksums.from_record(record, "fuzz.distcp: tensor 'x'")
    except dcpio.CorruptCheckpointError:
        return
    # accepted: it must be self-consistent
    assert sums.block_size > 0 and sums.base >= 0 and sums.length >= 0
    assert len(sums.digests) == 8 * (-(-sums.length // sums.block_size))
