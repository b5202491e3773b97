"""dcpio on S3, against a real S3 API server (moto's standalone server on 127.0.0.1) and a fault-injecting proxy.

The byte mover is tested on its own (multipart uploads, ranged reads, retries, permanent errors), then through
``dcp.save`` / ``dcp.load`` with :class:`dcpio.FsspecWriter` / :class:`dcpio.FsspecReader`, and against torch's own
fsspec classes run in a subprocess that never imports dcpio.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

import dcpio
import dcpio.knobs
from dcpio.errors import CheckpointReadError, CheckpointWriteError, CorruptCheckpointError
from dcpio.movers.fsspec import FsspecFileSystem
from helpers import assert_tree_equal, exception_chain, make_state_dict, run_stock, template_like, trusted_objects
from s3_server import FaultProxy, MotoServer, S3Endpoint, fault_proxy, moto, s3, s3_via_proxy

__all__ = ["fault_proxy", "moto", "s3", "s3_via_proxy"]  # fixtures used by name below

pytestmark = pytest.mark.s3

MIB = 1 << 20


@pytest.fixture(autouse=True)
def _small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    # 5 MiB is S3's smallest part: a 12 MiB object becomes three parts, which is what the multipart tests need
    monkeypatch.setenv("DCPIO_S3_PART_SIZE", str(5 * MIB))


def _mover(ep: S3Endpoint, *parts: str) -> FsspecFileSystem:
    return FsspecFileSystem(ep.url(*parts), **ep.storage_options)


def _put(mover: FsspecFileSystem, url: str, data: bytes, piece: int = 777_777) -> None:
    handle = mover.open_writer(url)
    view = memoryview(data)
    for start in range(0, len(data), piece):
        handle.write([view[start : start + piece // 2], view[start + piece // 2 : start + piece]])
    handle.sync()
    handle.close()


def _objects(moto: MotoServer, ep: S3Endpoint) -> dict[str, int]:
    resp = moto.client().list_objects_v2(Bucket=ep.bucket)
    return {o["Key"]: int(o["Size"]) for o in resp.get("Contents", [])}


def _chain_text(exc: BaseException) -> str:
    return "\n".join(f"{type(e).__name__}: {e}" for e in exception_chain(exc))


# ------------------------------------------------------------------------------------------------ the byte mover
def test_multipart_upload_and_ranged_reads(s3_via_proxy: S3Endpoint, fault_proxy: FaultProxy) -> None:
    ep = s3_via_proxy
    mover = _mover(ep, "ck")
    data = os.urandom(12 * MIB + 12345)
    url = ep.url("ck", "big.bin")
    _put(mover, url, data)
    log = fault_proxy.log()
    parts = [r for r in log if r.method == "PUT" and "uploadId=" in r.query]
    assert len(parts) == 3 and sorted(r.sent for r in parts) == [2 * MIB + 12345, 5 * MIB, 5 * MIB]
    assert [r for r in log if r.method == "POST" and r.query == "uploads"]
    assert [r for r in log if r.method == "POST" and "uploadId=" in r.query]  # completed

    reader = mover.open_reader(url)
    assert reader.size() == len(data)
    fault_proxy.reset_log()
    buf = bytearray(1000)
    reader.readinto(7 * MIB + 3, memoryview(buf))
    assert bytes(buf) == data[7 * MIB + 3 : 7 * MIB + 1003]
    got = [r for r in fault_proxy.log() if r.method == "GET"]
    # a small read fetches one 64 KiB block, not the object
    assert len(got) == 1 and got[0].received <= 64 * 1024
    fault_proxy.reset_log()
    whole = bytearray(len(data) - 10)
    reader.readinto(10, memoryview(whole))  # split into parallel part-sized GETs
    assert bytes(whole) == data[10:]
    gets = [r for r in fault_proxy.log() if r.method == "GET"]
    assert len(gets) == 3 and sum(r.received for r in gets) == len(data) - 10
    with pytest.raises(CorruptCheckpointError, match=r"big\.bin"):
        reader.readinto(len(data) - 5, memoryview(bytearray(10)))
    reader.close()


def test_small_file_is_one_put_and_metadata_has_no_temporary(s3_via_proxy: S3Endpoint, fault_proxy: FaultProxy) -> None:
    ep = s3_via_proxy
    mover = _mover(ep, "ck")
    assert mover.supports_atomic_rename is False and mover.supports_parallel_reads is True
    _put(mover, ep.url("ck", "small.bin"), b"x" * 100_000)
    mover.write_file_atomic(ep.url("ck", ".metadata"), b"committed", sync=True)
    writes = [(r.method, r.path, r.query) for r in fault_proxy.log() if r.method in ("PUT", "POST", "DELETE")]
    assert writes == [
        ("PUT", f"/{ep.bucket}/ck/small.bin", ""),
        ("PUT", f"/{ep.bucket}/ck/.metadata", ""),
    ]
    assert mover.read_file(ep.url("ck", ".metadata"), 100) == b"committed"
    with pytest.raises(CorruptCheckpointError, match="cap"):
        mover.read_file(ep.url("ck", "small.bin"), 1000)
    assert mover.ls(ep.url("ck")) == [ep.url("ck", ".metadata"), ep.url("ck", "small.bin")]
    assert mover.exists(ep.url("ck", "small.bin")) and not mover.exists(ep.url("ck", "nope"))
    mover.remove_quietly(ep.url("ck", "small.bin"))
    mover.remove_quietly(ep.url("ck", "small.bin"))
    assert not mover.exists(ep.url("ck", "small.bin"))


def test_concurrent_readers_share_one_handle(s3: S3Endpoint) -> None:
    mover = _mover(s3, "ck")
    data = os.urandom(3 * MIB)
    _put(mover, s3.url("ck", "a.bin"), data)
    reader = mover.open_reader(s3.url("ck", "a.bin"))
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            gen = torch.Generator().manual_seed(seed)
            for _ in range(20):
                off = int(torch.randint(0, len(data) - 1, (1,), generator=gen))
                n = int(torch.randint(1, min(300_000, len(data) - off), (1,), generator=gen))
                buf = bytearray(n)
                reader.readinto(off, memoryview(buf))
                if bytes(buf) != data[off : off + n]:
                    raise AssertionError(f"wrong bytes at [{off}, {off + n})")
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_retries_503_and_dropped_connections(
    s3_via_proxy: S3Endpoint, fault_proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    ep = s3_via_proxy
    mover = _mover(ep, "ck")
    data = os.urandom(11 * MIB)
    for kind in ("503", "drop"):
        fault_proxy.inject(kind, first=3)
        _put(mover, ep.url("ck", f"{kind}.bin"), data)
        assert fault_proxy.injected == 3
        fault_proxy.inject(kind, first=3)
        out = bytearray(len(data))
        mover.open_reader(ep.url("ck", f"{kind}.bin")).readinto(0, memoryview(out))
        assert fault_proxy.injected == 3 and bytes(out) == data
    # responses cut off half-way are retried too
    fault_proxy.inject("truncate", first=2, methods={"GET"})
    out = bytearray(len(data))
    mover.open_reader(ep.url("ck", "503.bin")).readinto(0, memoryview(out))
    assert fault_proxy.injected == 2 and bytes(out) == data
    # a seeded fraction of every kind of request, for a whole multipart upload and its read-back
    monkeypatch.setenv("DCPIO_RETRY_ATTEMPTS", "12")
    fault_proxy.inject("503", fraction=0.3, seed=7)
    _put(mover, ep.url("ck", "frac.bin"), data)
    out = bytearray(len(data))
    mover.open_reader(ep.url("ck", "frac.bin")).readinto(0, memoryview(out))
    assert fault_proxy.injected > 0 and bytes(out) == data


def test_retries_are_bounded_and_botocore_does_not_retry(
    s3_via_proxy: S3Endpoint, fault_proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    ep = s3_via_proxy
    mover = _mover(ep, "ck")
    mover.write_file_atomic(ep.url("ck", ".metadata"), b"m", sync=True)
    monkeypatch.setenv("DCPIO_RETRY_ATTEMPTS", "3")
    fault_proxy.inject("503", first=10**9)
    fault_proxy.reset_log()
    with pytest.raises(CheckpointReadError) as info:
        mover.read_file(ep.url("ck", ".metadata"), 100)
    message = str(info.value)
    assert ep.url("ck", ".metadata") in message and "SlowDown" in message and "DCPIO_RETRY_ATTEMPTS" in message
    # exactly our 3 attempts reached the wire: neither botocore nor s3fs retried behind our back
    assert len(fault_proxy.log()) == 3
    fault_proxy.reset_log()
    with pytest.raises(CheckpointWriteError, match="previous checkpoint is intact"):
        mover.write_file_atomic(ep.url("ck", ".metadata"), b"new", sync=True)
    assert len(fault_proxy.log()) == 3
    fault_proxy.clear()
    assert mover.read_file(ep.url("ck", ".metadata"), 100) == b"m"


def test_failed_multipart_upload_is_aborted(
    moto: MotoServer, s3_via_proxy: S3Endpoint, fault_proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    ep = s3_via_proxy
    mover = _mover(ep, "ck")
    monkeypatch.setenv("DCPIO_RETRY_ATTEMPTS", "2")
    fault_proxy.inject("503", first=10**9, methods={"PUT"})
    handle = mover.open_writer(ep.url("ck", "doomed.bin"))
    with pytest.raises(CheckpointWriteError, match=r"doomed\.bin"):
        handle.write([memoryview(os.urandom(11 * MIB))])
        handle.close()
    handle.abort()
    fault_proxy.clear()
    assert "ck/doomed.bin" not in _objects(moto, ep)
    uploads = moto.client().list_multipart_uploads(Bucket=ep.bucket).get("Uploads", [])
    assert uploads == []


def test_permanent_errors_fail_fast_with_the_url(
    moto: MotoServer, s3_via_proxy: S3Endpoint, fault_proxy: FaultProxy
) -> None:
    ep = s3_via_proxy
    missing = S3Endpoint(ep.endpoint_url, ep.key, ep.secret, "no-such-bucket-dcpio")
    mover = _mover(missing, "ck")
    fault_proxy.reset_log()
    with pytest.raises(CheckpointWriteError, match=r"s3://no-such-bucket-dcpio/ck: bucket .* does not exist"):
        mover.mkdir(missing.url("ck"))
    with pytest.raises(FileNotFoundError, match="no-such-bucket-dcpio"):
        mover.read_file(missing.url("ck", ".metadata"), 100)
    assert len(fault_proxy.log()) == 2  # one request each: not retried

    bad = S3Endpoint(ep.endpoint_url, "AKIADCPIOWRONGKEY000", "wrong-secret", ep.bucket)
    mover = _mover(bad, "ck")
    fault_proxy.reset_log()
    with pytest.raises(PermissionError, match=rf"s3://{ep.bucket}/ck.*access refused"):
        mover.mkdir(bad.url("ck"))
    with pytest.raises(PermissionError, match="InvalidAccessKeyId"):
        mover.write_file_atomic(bad.url("ck", ".metadata"), b"x", sync=True)
    with pytest.raises(PermissionError, match="credentials"):
        mover.read_file(bad.url("ck", ".metadata"), 100)
    assert len(fault_proxy.log()) == 3
    with pytest.raises(FileNotFoundError, match=r"ck/absent.*not found"):
        _mover(ep, "ck").read_file(ep.url("ck", "absent"), 100)


# ------------------------------------------------------------------------------------------------ dcp.save / load
def _state(seed: int) -> dict[str, Any]:
    sd = make_state_dict(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    # one tensor above the part size, so the data file goes out as a multipart upload
    sd["big"] = torch.randn(3 * MIB, generator=gen)
    return sd


def _save(sd: dict[str, Any], ep: S3Endpoint, *parts: str, **kw: Any) -> None:
    dcp.save(sd, storage_writer=dcpio.FsspecWriter(ep.url(*parts), **kw, **ep.storage_options))


def _load(template: dict[str, Any], ep: S3Endpoint, *parts: str) -> dict[str, Any]:
    with trusted_objects():
        dcp.load(template, storage_reader=dcpio.FsspecReader(ep.url(*parts), **ep.storage_options))
    return template


def test_round_trip_metadata_last(s3_via_proxy: S3Endpoint, fault_proxy: FaultProxy) -> None:
    ep = s3_via_proxy
    sd = _state(1)
    _save(sd, ep, "ck", thread_count=3)
    log = fault_proxy.log()
    meta = [r for r in log if r.method == "PUT" and r.path.endswith("/.metadata")]
    data_done = [
        r
        for r in log
        if r.path.endswith(".distcp")
        and ((r.method == "PUT" and "uploadId=" not in r.query) or (r.method == "POST" and "uploadId=" in r.query))
    ]
    assert len(meta) == 1 and len(data_done) == 3
    assert all(r.end <= meta[0].start for r in data_done)  # every data object was complete before the commit
    assert not [r for r in log if ".metadata" in r.path and r.method != "PUT" and r.method != "HEAD"]
    assert_tree_equal(sd, _load(template_like(sd), ep, "ck"))


class _RowsPlanner(DefaultLoadPlanner):
    """Reads rows [first, first + count) of tensor ``fqn`` (saved whole) into a tensor of that many rows.

    This is the request a rank makes when it loads its shard of a tensor that was saved with another sharding.
    """

    def __init__(self, fqn: str, first: int, count: int, cols: int) -> None:
        super().__init__()
        self.fqn, self.first, self.count, self.cols = fqn, first, count, cols

    def create_local_plan(self) -> LoadPlan:
        index = MetadataIndex(self.fqn, torch.Size([0, 0]))
        return LoadPlan(
            [
                ReadItem(
                    type=LoadItemType.TENSOR,
                    dest_index=index,
                    dest_offsets=torch.Size([0, 0]),
                    storage_index=index,
                    storage_offsets=torch.Size([self.first, 0]),
                    lengths=torch.Size([self.count, self.cols]),
                )
            ]
        )


def test_resharding_load_reads_only_the_needed_bytes(s3_via_proxy: S3Endpoint, fault_proxy: FaultProxy) -> None:
    ep = s3_via_proxy
    gen = torch.Generator().manual_seed(3)
    sd = {f"w{i}": torch.randn(2048, 1024, generator=gen) for i in range(4)}  # 8 MiB each
    _save(sd, ep, "ck", thread_count=2)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    block = dcpio.knobs.checksum_block_size()

    # a shard: rows 512..1535 of w1, 4 MiB of its 8
    fault_proxy.reset_log()
    out = {"w1": torch.zeros(1024, 1024)}
    reader = dcpio.FsspecReader(ep.url("ck"), **ep.storage_options)
    dcp.load(out, storage_reader=reader, planner=_RowsPlanner("w1", 512, 1024, 1024))
    assert torch.equal(out["w1"], sd["w1"][512:1536])
    needed = 1024 * 1024 * 4
    read = sum(r.received for r in fault_proxy.log() if r.method == "GET" and r.path.endswith(".distcp"))
    # checksums cover whole blocks, and one small block holds the record's header: nothing more is read
    assert needed <= read <= needed + 2 * block + (64 << 10), (read, needed)

    # two whole tensors of four
    fault_proxy.reset_log()
    out = {"w0": torch.zeros(2048, 1024), "w3": torch.zeros(2048, 1024)}
    dcp.load(out, storage_reader=dcpio.FsspecReader(ep.url("ck"), **ep.storage_options))
    assert torch.equal(out["w0"], sd["w0"]) and torch.equal(out["w3"], sd["w3"])
    read = sum(r.received for r in fault_proxy.log() if r.method == "GET" and r.path.endswith(".distcp"))
    assert total / 2 <= read <= total / 2 + 4 * block + (256 << 10), (read, total)


def test_neighbouring_records_share_requests(s3_via_proxy: S3Endpoint, fault_proxy: FaultProxy) -> None:
    """300 norm-sized vectors and 40 medium matrices: one ranged GET per run of neighbours, not one per record."""
    ep = s3_via_proxy
    gen = torch.Generator().manual_seed(4)
    sd: dict[str, Any] = {f"norm{i}": torch.randn(1440, generator=gen) for i in range(300)}
    sd.update({f"proj{i}": torch.randn(256, 256, generator=gen) for i in range(40)})  # 256 KiB each
    _save(sd, ep, "ck", thread_count=2)
    fault_proxy.reset_log()
    out = _load(template_like(sd), ep, "ck")
    assert_tree_equal(sd, out)
    gets = [r for r in fault_proxy.log() if r.method == "GET" and r.path.endswith(".distcp")]
    total = sum(t.numel() * t.element_size() for t in sd.values())
    # 2 files of ~7 MiB, parts of 5 MiB: a handful of requests (one per record would be 340)
    assert len(gets) <= 12, len(gets)
    assert total <= sum(r.received for r in gets) <= 1.1 * total + (1 << 20)


def test_flip_in_a_batched_record_names_that_tensor(s3: S3Endpoint, moto: MotoServer) -> None:
    gen = torch.Generator().manual_seed(6)
    sd = {f"norm{i}": torch.randn(1440, generator=gen) for i in range(50)}
    _save(sd, s3, "ck", thread_count=1)
    storage = dcpio.FsspecReader(s3.url("ck"), **s3.storage_options).read_metadata().storage_data
    info = next(v for k, v in storage.items() if k.fqn == "norm17")
    client = moto.client()
    key = f"ck/{info.relative_path}"
    body = bytearray(client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    body[info.offset + info.length - 100] ^= 0x10  # inside norm17's data
    client.put_object(Bucket=s3.bucket, Key=key, Body=bytes(body))
    with pytest.raises(BaseException) as caught:
        _load(template_like(sd), s3, "ck")
    text = _chain_text(caught.value)
    assert "checksum mismatch" in text and "norm17" in text, text


def test_overwrite_keeps_old_checkpoint_until_commit(
    moto: MotoServer, s3_via_proxy: S3Endpoint, fault_proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    ep = s3_via_proxy
    old, new = _state(1), _state(2)
    _save(old, ep, "ck")
    before = _objects(moto, ep)
    # the new save writes all its data, then the commit (the metadata PUT) fails for good
    monkeypatch.setenv("DCPIO_RETRY_ATTEMPTS", "2")
    fault_proxy.inject("503", first=10**9, methods={"PUT"}, match="/.metadata")
    with pytest.raises(BaseException) as info:
        _save(new, ep, "ck")
    assert ep.url("ck", ".metadata") in _chain_text(info.value)
    fault_proxy.clear()
    after = _objects(moto, ep)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing of the old checkpoint changed
    assert_tree_equal(old, _load(template_like(old), ep, "ck"))
    # a save that commits replaces it, and removes the superseded data objects afterwards
    _save(new, ep, "ck")
    assert_tree_equal(new, _load(template_like(new), ep, "ck"))
    final = _objects(moto, ep)
    assert not ((set(before) - {"ck/.metadata"}) & set(final))


def test_save_and_load_survive_injected_faults(
    s3_via_proxy: S3Endpoint, fault_proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    ep = s3_via_proxy
    monkeypatch.setenv("DCPIO_RETRY_ATTEMPTS", "12")
    sd = _state(5)
    fault_proxy.inject("503", fraction=0.25, seed=11)
    _save(sd, ep, "ck", thread_count=2)
    first = fault_proxy.injected
    fault_proxy.inject("drop", fraction=0.25, seed=12)
    assert_tree_equal(sd, _load(template_like(sd), ep, "ck"))
    assert first > 0 and fault_proxy.injected > 0


def test_save_to_missing_bucket_or_with_bad_keys_fails_fast(s3_via_proxy: S3Endpoint, fault_proxy: FaultProxy) -> None:
    ep = s3_via_proxy
    fault_proxy.reset_log()
    missing = S3Endpoint(ep.endpoint_url, ep.key, ep.secret, "no-such-bucket-dcpio")
    with pytest.raises(BaseException) as info:
        _save({"a": torch.ones(3)}, missing, "ck")
    text = _chain_text(info.value)
    assert "CheckpointWriteError" in text and "s3://no-such-bucket-dcpio/ck" in text and "does not exist" in text
    bad = S3Endpoint(ep.endpoint_url, "AKIADCPIOWRONGKEY000", "nope", ep.bucket)
    with pytest.raises(BaseException) as info:
        _save({"a": torch.ones(3)}, bad, "ck")
    text = _chain_text(info.value)
    assert "PermissionError" in text and f"s3://{ep.bucket}/ck" in text
    with pytest.raises(BaseException) as info:
        _load({"a": torch.ones(3)}, bad, "ck")
    # torch's loader re-raises a failed metadata read as its own error, carrying our message
    text = _chain_text(info.value)
    assert "access refused" in text and f"s3://{ep.bucket}/ck/.metadata" in text
    assert len(fault_proxy.log()) <= 4  # no retry storm: one refused request per attempt


# ------------------------------------------------------------------------------------------------ torch interop
_STOCK = """
import json, os, traceback
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from helpers import assert_tree_equal, make_state_dict, template_like
opts = json.loads(os.environ["DCPIO_TEST_S3"])
"""


def test_torch_fsspec_interop_both_ways(s3: S3Endpoint) -> None:
    env = {"DCPIO_TEST_S3": json.dumps(s3.storage_options)}
    # torch writes (twice, so its overwrite path runs too), dcpio reads
    run_stock(
        _STOCK
        + f"""
dcp.save(make_state_dict(seed=20), storage_writer=FsspecWriter({s3.url("by_torch")!r}, **opts))
dcp.save(make_state_dict(seed=21), storage_writer=FsspecWriter({s3.url("by_torch")!r}, thread_count=2, **opts))
""",
        env=env,
    )
    expected = make_state_dict(seed=21)
    assert_tree_equal(expected, _load(template_like(expected), s3, "by_torch"))
    # dcpio writes (an overwrite, so its per-save file names are exercised), torch reads
    dcp.save(make_state_dict(seed=30), storage_writer=dcpio.FsspecWriter(s3.url("by_dcpio"), **s3.storage_options))
    dcp.save(
        make_state_dict(seed=31),
        storage_writer=dcpio.FsspecWriter(s3.url("by_dcpio"), thread_count=3, **s3.storage_options),
    )
    run_stock(
        _STOCK
        + f"""
expected = make_state_dict(seed=31)
out = template_like(expected)
dcp.load(out, storage_reader=FsspecReader({s3.url("by_dcpio")!r}, **opts))
assert_tree_equal(expected, out)
""",
        env=env,
    )
