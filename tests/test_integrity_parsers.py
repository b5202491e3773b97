"""Every parser of checkpoint bytes, given hostile bytes: nothing outside the result changes, memory follows the
input's size, declared sizes bound what is produced, only regular files are opened, hostile values become
``CheckpointError``; and the errors reach the caller of ``dcp.load`` as dcpio's error objects.

Attacks that could poison the test process (a patched class) or exhaust it (a GiB allocation, a C stack overflow)
run in a child process; memory bounds under an address-space limit (RLIMIT_AS), hangs under a timeout.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import MetadataIndex

import dcpio
from dcpio.cli.main import EXIT_PROBLEM, main
from helpers import dcp_failures, run_stock

SRC_DIR = str(Path(__file__).resolve().parent.parent / "src")
TESTS_DIR = str(Path(__file__).resolve().parent)
_MD = b"torch.distributed.checkpoint.metadata"

# the child's prologue: dcpio importable, and an address-space limit of what it uses now plus a margin
_LIMITED = """
import resource, sys
def _vm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")
_limit = _vm_bytes() + (300 << 20)
resource.setrlimit(resource.RLIMIT_AS, (_limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
"""


def _run_dcpio(code: str, timeout: float = 120, limited: bool = False) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC_DIR, TESTS_DIR, env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    prologue = "import warnings; warnings.simplefilter('ignore')\nimport torch, dcpio\n"
    full = prologue + (_LIMITED if limited else "") + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", full], capture_output=True, text=True, timeout=timeout, env=env, cwd=TESTS_DIR
    )


def _save(sd: dict[str, Any], path: Path, **kw: Any) -> Path:
    dcp.save(sd, storage_writer=dcpio.FileSystemWriter(path, **kw), no_dist=True)
    return path


def _good(path: Path) -> Path:
    return _save({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "step": 4}, path)


def _load_error(path: Path, template: dict[str, Any] | None = None) -> BaseException:
    sd = template if template is not None else {"w": torch.zeros(3, 4), "step": 0}
    with pytest.raises(CheckpointException) as info:
        dcp.load(sd, storage_reader=dcpio.FileSystemReader(path), no_dist=True)
    return info.value


def _short(s: bytes) -> bytes:
    return b"\x8c" + bytes([len(s)]) + s


def _global(module: bytes, name: bytes) -> bytes:
    return b"c" + module + b"\n" + name + b"\n"


def _trusted_metadata(path: Path) -> Any:
    # the test's own file: stock pickle is fine here
    return pickle.loads((path / ".metadata").read_bytes())


def _write_metadata(path: Path, md: Any) -> None:
    (path / ".metadata").write_bytes(pickle.dumps(md))


# ------------------------------------------------------------------------------------------------------------------
# a refused file leaves no trace
# ------------------------------------------------------------------------------------------------------------------

_SLOTSTATE_ON_CHUNK_CLASS = (
    b"\x80\x04"
    + _global(_MD, b"ChunkStorageMetadata")
    + b"N}"
    + _short(b"__setstate__")
    + _global(b"builtins", b"set")
    + b"s\x86b."
)
_SLOTSTATE_ON_PATH_CLASS = (
    b"\x80\x04"
    + _global(b"pathlib", b"PurePosixPath")
    + b"N}"
    + _short(b"__truediv__")
    + _global(b"builtins", b"object")
    + b"s\x86b."
)
_STATE_ON_ENUM_MEMBER = (
    b"\x80\x04" + _global(_MD, b"_MEM_FORMAT_ENCODING") + b"K\x00\x85R}" + _short(b"_value_") + b"K\x05sb."
)


@pytest.mark.parametrize(
    "payload",
    [_SLOTSTATE_ON_CHUNK_CLASS, _SLOTSTATE_ON_PATH_CLASS, _STATE_ON_ENUM_MEMBER],
    ids=["chunk-class-setstate", "purepath-truediv", "enum-member-value"],
)
def test_build_onto_a_shared_object_is_refused_before_it_is_applied(tmp_path: Path, payload: bytes) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / ".metadata").write_bytes(payload)
    good = _good(tmp_path / "good")
    out = _run_dcpio(
        f"""
        import os, pathlib, torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import metadata as md
        chunk_attrs, path_op = dict(vars(md.ChunkStorageMetadata)), vars(pathlib.PurePosixPath).get("__truediv__")
        try:
            dcpio.FileSystemReader({str(bad)!r}).read_metadata()
        except dcpio.CheckpointError as err:
            print("refused", type(err).__name__, {str(bad)!r} in str(err))
        assert dict(vars(md.ChunkStorageMetadata)) == chunk_attrs, "ChunkStorageMetadata was patched"
        assert vars(pathlib.PurePosixPath).get("__truediv__") is path_op, "PurePosixPath was patched"
        member = md._MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT
        assert member._value_ == 0 and member.value == 0, "the enum member was patched"
        sd = {{"w": torch.zeros(3, 4), "step": 0}}
        dcp.load(sd, storage_reader=dcpio.FileSystemReader({str(good)!r}))
        assert torch.equal(sd["w"], torch.arange(12, dtype=torch.float32).reshape(3, 4))
        os.chdir({str(tmp_path)!r})
        dcp.save(sd, storage_writer=dcpio.FileSystemWriter({str(tmp_path / "again")!r}))
        assert os.path.exists({str(tmp_path / "again" / ".metadata")!r}), "the save did not write where asked"
        assert not os.path.exists(".metadata"), "the save wrote into the current directory"
        print("clean")
        """
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "refused" in out.stdout and "True" in out.stdout and "clean" in out.stdout, out.stdout


# ------------------------------------------------------------------------------------------------------------------
# memory follows the file's size
# ------------------------------------------------------------------------------------------------------------------


def _refused_cheaply(path: Path, call: str) -> None:
    """Run ``call`` (which parses ``path``) under RLIMIT_AS; it must raise a CheckpointError naming the file,
    with no MemoryError anywhere (an allocation that failed is not a refusal before allocating)."""
    out = _run_dcpio(
        f"""
        import traceback
        try:
            {call}
        except dcpio.CheckpointError as err:
            chain, e = [], err
            while e is not None:
                chain.append(type(e).__name__ + ": " + str(e)[:300])
                e = e.__cause__ or e.__context__
            print("ERR", type(err).__name__, {str(path)!r} in str(err), "|".join(chain))
        else:
            print("NO ERROR")
        """,
        limited=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ERR ") and " True " in out.stdout, out.stdout
    assert "MemoryError" not in out.stdout, out.stdout


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x04Nr" + struct.pack("<I", 1 << 26) + b".",  # 9 bytes: a memo index of 2**26
        b"\x80\x04Np67108864\n.",  # the same through the text PUT opcode
        b"\x80\x04" + _short(b"builtins") + _short(b"bytearray") + b"\x93J" + struct.pack("<i", 1 << 30) + b"\x85R.",
    ],
    ids=["long-binput-2^26", "put-2^26", "bytearray-1GiB"],
)
def test_tiny_metadata_asking_for_a_gib_is_refused_before_allocating(tmp_path: Path, data: bytes) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / ".metadata").write_bytes(data)
    assert len(data) <= 32
    _refused_cheaply(ckpt / ".metadata", f"dcpio.FileSystemReader({str(ckpt)!r}).read_metadata()")


def test_single_bit_flip_of_real_metadata_asking_for_gibs_is_refused_before_allocating(tmp_path: Path) -> None:
    ckpt = _good(tmp_path / "ckpt")
    data = bytearray((ckpt / ".metadata").read_bytes())
    # a BUILD opcode (0x62) with bit 4 flipped is LONG_BINPUT (0x72); its index is then the next 4 bytes
    for op, _arg, pos in pickletools.genops(bytes(data)):
        if op.name == "BUILD" and pos is not None and int.from_bytes(data[pos + 1 : pos + 5], "little") >= 1 << 28:
            data[pos] ^= 0x10
            break
    else:
        pytest.fail("no BUILD opcode followed by a large index in the metadata")
    (ckpt / ".metadata").write_bytes(bytes(data))
    _refused_cheaply(ckpt / ".metadata", f"dcpio.FileSystemReader({str(ckpt)!r}).read_metadata()")


def test_torch_save_record_with_a_huge_memo_index_is_refused_before_allocating(tmp_path: Path) -> None:
    record = tmp_path / "data.pkl"
    record.write_bytes(b"\x80\x02Nr" + struct.pack("<I", 1 << 27) + b".")
    _refused_cheaply(
        record,
        f"""from dcpio.formats.torch_save import _tensor_record
            _tensor_record(open({str(record)!r}, "rb").read(), lambda key: (0, 0), None, {str(record)!r})""",
    )


def test_nesting_that_would_overflow_the_c_stack_is_refused(tmp_path: Path) -> None:
    # a 200 kB .metadata whose one key is a tuple nested 200000 deep: hashing it recurses in C and used to crash
    deep = b"N" + b"\x85" * 200_000
    state = b"}" + _short(b"state_dict_metadata") + b"}" + deep + b"Nss"
    data = b"\x80\x04" + _global(_MD, b"Metadata") + b")\x81" + state + b"b."
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / ".metadata").write_bytes(data)
    _refused_cheaply(ckpt / ".metadata", f"dcpio.FileSystemReader({str(ckpt)!r}).read_metadata()")


# ------------------------------------------------------------------------------------------------------------------
# declared sizes bound what is produced
# ------------------------------------------------------------------------------------------------------------------


def test_zstd_item_inflating_past_its_recorded_size_is_refused(tmp_path: Path) -> None:
    zstandard = pytest.importorskip("zstandard")
    ckpt = _save({"w": torch.zeros(8)}, tmp_path / "ckpt", _extensions=[dcpio.ZStandard()])
    compressor = zstandard.ZstdCompressor().compressobj()
    zeros = bytes(64 << 20)
    bomb = b"".join(compressor.compress(zeros) for _ in range(16)) + compressor.flush()
    assert len(bomb) < 256 << 10  # 1 GiB of output from a few tens of KiB
    (ckpt / "__bomb.distcp").write_bytes(bomb)
    md = _trusted_metadata(ckpt)
    (index,) = [k for k in md.storage_data if k.fqn == "w"]
    descriptors = md.storage_data[index].transform_descriptors
    md.storage_data[index] = _StorageInfo("__bomb.distcp", 0, len(bomb), transform_descriptors=descriptors)
    _write_metadata(ckpt, md)
    out = _run_dcpio(
        f"""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        try:
            dcp.load({{"w": torch.zeros(8)}}, storage_reader=dcpio.FileSystemReader({str(ckpt)!r}))
        except CheckpointException as exc:
            err = exc.failures[0][0]
            print("ERR", type(err).__name__, repr(str(err)[:600]), type(err.__cause__).__name__)
        else:
            print("NO ERROR")
        """,
        limited=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ERR CorruptCheckpointError"), out.stdout
    assert "MemoryError" not in out.stdout and "decompression bomb" in out.stdout, out.stdout


# ------------------------------------------------------------------------------------------------------------------
# only regular files are opened, never through a link
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", [".metadata", "data"])
def test_fifo_in_place_of_a_checkpoint_file_is_refused_not_waited_on(tmp_path: Path, which: str) -> None:
    ckpt = _good(tmp_path / "ckpt")
    name = which if which == ".metadata" else sorted(p.name for p in ckpt.glob("*.distcp"))[0]
    (ckpt / name).unlink()
    os.mkfifo(ckpt / name)
    out = _run_dcpio(
        f"""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        try:
            dcp.load({{"w": torch.zeros(3, 4), "step": 0}}, storage_reader=dcpio.FileSystemReader({str(ckpt)!r}))
        except CheckpointException as exc:
            err = exc.failures[0][0]
            print("ERR", type(err).__name__, {str(ckpt / name)!r} in str(err))
        """,
        timeout=90,
    )
    assert out.stdout.strip() == "ERR UnsafeCheckpointError True", (out.stdout, out.stderr[-2000:])


class _SwapAfterCheck(dcpio.FileSystemReader):
    """Replaces a data file by a symlink to an outside copy after ``set_up_storage_reader`` checked the paths."""

    outside: Path

    def prepare_local_plan(self, plan: Any) -> Any:
        for data in Path(self.path).glob("*.distcp"):
            copy = self.outside / data.name
            copy.write_bytes(data.read_bytes())  # same bytes: the checksums alone would not notice
            data.unlink()
            data.symlink_to(copy)
        return super().prepare_local_plan(plan)


def test_data_file_swapped_for_a_symlink_after_the_check_is_not_followed(tmp_path: Path) -> None:
    ckpt = _good(tmp_path / "ckpt")
    reader = _SwapAfterCheck(ckpt)
    reader.outside = tmp_path / "outside"
    reader.outside.mkdir()
    with pytest.raises(CheckpointException) as info:
        dcp.load({"w": torch.zeros(3, 4), "step": 0}, storage_reader=reader, no_dist=True)
    (err,) = dcp_failures(info.value)
    assert isinstance(err, dcpio.UnsafeCheckpointError), err
    assert "symbolic link" in str(err) and ".distcp" in str(err)


# ------------------------------------------------------------------------------------------------------------------
# hostile but well-typed values
# ------------------------------------------------------------------------------------------------------------------


def _nested(depth: int, leaf: object) -> object:
    value = leaf
    for _ in range(depth):
        value = (value,)
    return value


def _storage_meta_int(md: Any) -> None:
    md.storage_meta = 7


def _deep_key(md: Any) -> None:
    md.state_dict_metadata[_nested(3000, "w")] = md.state_dict_metadata.pop("step")


def _deep_file_name(md: Any) -> None:
    index = next(k for k in md.storage_data if k.fqn == "w")
    md.storage_data[index].relative_path = _nested(3000, "__0_0.distcp")


def _huge_size(md: Any) -> None:
    md.state_dict_metadata["w"].size = torch.Size([10**5000, 4])


def _huge_offset(md: Any) -> None:
    index = next(k for k in md.storage_data if k.fqn == "w")
    md.storage_data[index].offset = 10**5000


def _no_chunks(md: Any) -> None:
    md.state_dict_metadata["w"].chunks = []


def _chunk_without_storage(md: Any) -> None:
    index = next(k for k in md.storage_data if k.fqn == "w")
    del md.storage_data[index]


_HOSTILE = {
    "storage-meta-int": _storage_meta_int,
    "deep-tuple-key": _deep_key,
    "deep-tuple-file-name": _deep_file_name,
    "5000-digit-size": _huge_size,
    "5000-digit-offset": _huge_offset,
    "tensor-without-chunks": _no_chunks,
    "chunk-without-stored-bytes": _chunk_without_storage,
}


@pytest.fixture
def recursion_room() -> Iterator[None]:
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # to pickle the deep tuples (the test's own pickler recurses)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


@pytest.mark.parametrize("name", list(_HOSTILE))
def test_hostile_but_well_typed_metadata_is_a_checkpoint_error(
    tmp_path: Path, name: str, recursion_room: None, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _good(tmp_path / "ckpt")
    md = _trusted_metadata(ckpt)
    _HOSTILE[name](md)
    _write_metadata(ckpt, md)
    sys.setrecursionlimit(1000)  # the reader must not depend on the test's raised limit
    (err,) = dcp_failures(_load_error(ckpt))
    assert isinstance(err, dcpio.CorruptCheckpointError), f"{type(err).__name__}: {str(err)[:500]}"
    assert str(ckpt / ".metadata") in str(err)
    for command in ("verify", "inspect"):
        assert main([command, str(ckpt)]) == EXIT_PROBLEM, (command, capsys.readouterr())


# ------------------------------------------------------------------------------------------------------------------
# errors users can catch
# ------------------------------------------------------------------------------------------------------------------


def test_unsafe_metadata_reaches_the_caller_of_dcp_load_as_the_dcpio_error(tmp_path: Path) -> None:
    ckpt = _good(tmp_path / "ckpt")
    (ckpt / ".metadata").write_bytes(b"\x80\x04" + _global(b"os", b"system") + _short(b"true") + b"\x85R.")
    exc = _load_error(ckpt)
    assert isinstance(exc, CheckpointException)
    err = exc.failures[0][0]
    assert isinstance(err, dcpio.UnsafeCheckpointError), f"{type(err).__name__}: {err}"
    assert "os.system" in str(err)


def test_missing_metadata_reaches_the_caller_of_dcp_load_as_incomplete(tmp_path: Path) -> None:
    ckpt = _good(tmp_path / "ckpt")
    (ckpt / ".metadata").unlink()
    err = _load_error(ckpt).failures[0][0]  # type: ignore[attr-defined]
    assert isinstance(err, dcpio.IncompleteCheckpointError), f"{type(err).__name__}: {err}"


def test_direct_read_metadata_still_raises(tmp_path: Path) -> None:
    ckpt = _good(tmp_path / "ckpt")
    (ckpt / ".metadata").write_bytes(b"garbage")
    with pytest.raises(dcpio.CorruptCheckpointError):
        dcpio.FileSystemReader(ckpt).read_metadata()


def test_damaged_committed_metadata_says_damaged_not_never_committed(tmp_path: Path) -> None:
    ckpt = _good(tmp_path / "ckpt")
    data = (ckpt / ".metadata").read_bytes()
    (ckpt / ".metadata").write_bytes(data[: len(data) // 2])
    err = _load_error(ckpt).failures[0][0]  # type: ignore[attr-defined]
    assert isinstance(err, dcpio.CorruptCheckpointError), f"{type(err).__name__}: {err}"
    assert "damaged" in str(err) and "there" in str(err)
    assert "never committed" not in str(err)


def test_checkpoint_exists_error_is_torchs_runtime_error_too(tmp_path: Path) -> None:
    ckpt = _good(tmp_path / "ckpt")
    with pytest.raises(CheckpointException) as info:
        dcp.save({"w": torch.ones(2)}, storage_writer=dcpio.FileSystemWriter(ckpt, overwrite=False), no_dist=True)
    (err,) = dcp_failures(info.value)
    assert isinstance(err, dcpio.CheckpointExistsError) and isinstance(err, RuntimeError)
    assert "Checkpoint already exists" in str(err) and str(ckpt) in str(err)
    with pytest.raises(RuntimeError, match="Checkpoint already exists"):
        raise dcpio.CheckpointExistsError("x: exists")


# ------------------------------------------------------------------------------------------------------------------
# plain checkpoint_id calls through dcpio, reversibly
# ------------------------------------------------------------------------------------------------------------------


def test_install_routes_plain_checkpoint_id_calls_and_uninstall_restores_stock(tmp_path: Path) -> None:
    crafted = _good(tmp_path / "crafted")
    marker = tmp_path / "pwned"
    payload = f"open({str(marker)!r}, 'w').close()".encode()
    (crafted / ".metadata").write_bytes(
        b"\x80\x04" + _global(b"builtins", b"exec") + b"X" + struct.pack("<I", len(payload)) + payload + b"\x85R."
    )
    out = _run_dcpio(
        f"""
        import pickle, torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        def framework_save(sd, path):  # what torchtitan's checkpoint manager does: no writer passed
            dcp.save(sd, checkpoint_id=path)

        def by_dcpio(path):
            md = pickle.load(open(path + "/.metadata", "rb"))
            return all(hasattr(info, "dcpio_checksum") for info in md.storage_data.values())

        root = {str(tmp_path)!r}
        dcpio.install()
        framework_save({{"w": torch.ones(4)}}, root + "/a")
        print("installed", by_dcpio(root + "/a"))
        try:
            dcp.load({{"w": torch.zeros(3, 4), "step": 0}}, checkpoint_id={str(crafted)!r})
        except CheckpointException as exc:
            print("refused", type(exc.failures[0][0]).__name__)
        dcpio.uninstall()
        framework_save({{"w": torch.ones(4)}}, root + "/b")
        print("uninstalled", by_dcpio(root + "/b"))
        with dcpio.installed():
            framework_save({{"w": torch.ones(4)}}, root + "/c")
        framework_save({{"w": torch.ones(4)}}, root + "/d")
        print("context", by_dcpio(root + "/c"), by_dcpio(root + "/d"))
        sd = {{"w": torch.zeros(4)}}
        dcp.load(sd, checkpoint_id=root + "/a")  # stock torch reads dcpio's checkpoint
        print("stock-load", sd["w"].tolist())
        """
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines == [
        "installed True",
        "refused UnsafeCheckpointError",
        "uninstalled False",
        "context True False",
        "stock-load [1.0, 1.0, 1.0, 1.0]",
    ], out.stdout
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------------------
# conjugate and negative views
# ------------------------------------------------------------------------------------------------------------------


def _views() -> dict[str, torch.Tensor]:
    z = torch.tensor([1 + 2j, 3 - 4j, -5 + 0.5j], dtype=torch.complex64)
    return {"conj": z.conj(), "neg": torch._neg_view(torch.tensor([1.0, -2.0, 3.0]))}


def test_conjugate_and_negative_views_are_saved_as_their_values(tmp_path: Path) -> None:
    ckpt = _save(_views(), tmp_path / "ckpt")
    out = run_stock(
        f"""
        import torch, torch.distributed.checkpoint as dcp
        sd = {{"conj": torch.zeros(3, dtype=torch.complex64), "neg": torch.zeros(3)}}
        dcp.load(sd, storage_reader=dcp.FileSystemReader({str(ckpt)!r}))
        print(sd["conj"].tolist(), sd["neg"].tolist())
        """
    )
    assert out.strip() == "[(1-2j), (3+4j), (-5-0.5j)] [-1.0, 2.0, -3.0]", out


def test_loading_into_conjugate_and_negative_views_fills_their_values(tmp_path: Path) -> None:
    ckpt = _save({k: v.resolve_conj().resolve_neg() for k, v in _views().items()}, tmp_path / "ckpt")
    conj_base, neg_base = torch.zeros(3, dtype=torch.complex64), torch.zeros(3)
    sd = {"conj": conj_base.conj(), "neg": torch._neg_view(neg_base)}
    dcp.load(sd, storage_reader=dcpio.FileSystemReader(ckpt), no_dist=True)
    assert sd["conj"].is_conj() and sd["neg"].is_neg()
    assert torch.equal(sd["conj"].resolve_conj(), _views()["conj"].resolve_conj())
    assert torch.equal(sd["neg"].resolve_neg(), _views()["neg"].resolve_neg())
    assert torch.equal(conj_base, _views()["conj"].resolve_conj().conj())  # memory holds the conjugate


def test_metadata_with_mutable_indices_still_round_trips(tmp_path: Path) -> None:
    # MetadataIndex keys with an explicit chunk index and offsets survive the stand-in classes as real instances
    ckpt = _good(tmp_path / "ckpt")
    md = dcpio.FileSystemReader(ckpt).read_metadata()
    assert all(type(k) is MetadataIndex for k in md.storage_data)
    assert all(type(v) is _StorageInfo for v in md.storage_data.values())
    props = md.state_dict_metadata["w"].properties
    assert type(props).__name__ == "TensorProperties" and props.memory_format == torch.contiguous_format


# ------------------------------------------------------------------------------------------------------------------
# the opcode scan that admits the C unpickler is sound
# ------------------------------------------------------------------------------------------------------------------


def _valid_pickles() -> list[bytes]:
    from torch.distributed.checkpoint import metadata as md

    sdm: dict[str, Any] = {"step": md.BytesStorageMetadata()}
    storage: dict[Any, Any] = {MetadataIndex("step"): _StorageInfo("__0_0.distcp", 0, 40)}
    for i in range(40):
        fqn = f"layer.{i}.w"
        chunks = [md.ChunkStorageMetadata(torch.Size([r, 0]), torch.Size([1, 3])) for r in range(2)]
        sdm[fqn] = md.TensorStorageMetadata(md.TensorProperties(dtype=torch.float32), torch.Size([2, 3]), chunks)
        for r in range(2):
            info = _StorageInfo(f"__{r}_0.distcp", 64 * i, 64)
            info.dcpio_checksum = ("xxh3-64", 1 << 20, 64 * i, 64, bytes(8))  # type: ignore[attr-defined]
            storage[MetadataIndex(fqn, torch.Size([r, 0]), r)] = info
    meta = md.Metadata(sdm, storage_data=storage, storage_meta=md.StorageMeta(checkpoint_id=Path("/ckpt")))
    return [pickle.dumps(meta, protocol=p) for p in (2, 3, 4, 5)]


_PICKLES = _valid_pickles()


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(_PICKLES),
    st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), min_size=1, max_size=4),
)
def test_scan_admits_no_memo_index_beyond_the_input_size(valid: bytes, flips: list[tuple[int, int]]) -> None:
    from dcpio.integrity import safe_pickle

    data = bytearray(valid)
    for pos, xor in flips:
        data[pos % len(data)] ^= xor
    if not safe_pickle._fast_path_ok(bytes(data)):
        return  # the exact (pure-Python, dict memo) unpickler takes it
    bound = 1 << max(16, min(32, len(data).bit_length() + 1))
    try:
        for op, arg, _pos in pickletools.genops(bytes(data)):
            assert op.name != "PUT", "the scan admitted a text PUT"
            if op.name == "LONG_BINPUT":
                assert arg < bound, f"the scan admitted memo index {arg} for {len(data)} bytes"
    except ValueError:
        pass  # genops stops where the C unpickler would fail too; what it read before is what was checked


def test_scan_admits_what_torch_writes() -> None:
    from dcpio.integrity import safe_pickle

    assert [safe_pickle._fast_path_ok(p) for p in _PICKLES] == [True, True, True, True]


def _outcome(load: Any) -> tuple[str, Any]:
    from dcpio.integrity import safe_pickle

    try:
        return "ok", safe_pickle.validate_metadata(load(), "x")
    except Exception as err:  # both paths must fail, whatever the error's type
        return "error", type(err).__name__


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(_PICKLES),
    st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), min_size=1, max_size=3),
)
def test_c_and_exact_unpicklers_agree_on_what_the_scan_admits(valid: bytes, flips: list[tuple[int, int]]) -> None:
    from dcpio.integrity import safe_pickle

    data = bytearray(valid)
    for pos, xor in flips:
        data[pos % len(data)] ^= xor
    blob = bytes(data)
    if not safe_pickle._fast_path_ok(blob):
        return

    def resolve(module: str, name: str) -> Any:
        return safe_pickle._metadata_class(module, name, "x")

    def refuse(pid: Any) -> Any:
        raise dcpio.UnsafeCheckpointError("persistent id")

    fast = _outcome(lambda: safe_pickle._FastUnpickler(blob, resolve, refuse).load())
    exact = _outcome(lambda: safe_pickle._ExactUnpickler(blob, resolve, refuse).load())
    assert fast[0] == exact[0], (fast, exact)
    if fast[0] == "ok":
        assert fast[1] == exact[1]
