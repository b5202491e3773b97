"""Single-process round trips through dcp.save / dcp.load with dcpio's writer and reader, bit for bit."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import dcpio
from helpers import (
    SmallObject,
    all_dtypes,
    assert_tree_equal,
    exception_chain,
    make_state_dict,
    rand_tensor,
    template_like,
    trusted_objects,
)

FORMATS = [dcpio.SerializationFormat.TORCH_SAVE, dcpio.SerializationFormat.SAFETENSORS]


def _fmt_id(fmt: object) -> str:
    return "torch_save" if fmt == dcpio.SerializationFormat.TORCH_SAVE else "safetensors"


def _state_dict_for(fmt: object, **kw: Any) -> dict[str, Any]:
    # complex dtypes only where the format has them (safetensors has no complex128)
    return make_state_dict(complex_=fmt == dcpio.SerializationFormat.TORCH_SAVE, **kw)


def _save(sd: dict[str, Any], path: Path, **writer_kw: Any) -> None:
    dcp.save(sd, storage_writer=dcpio.FileSystemWriter(path, **writer_kw))


def _load(sd: dict[str, Any], path: Path, **reader_kw: Any) -> dict[str, Any]:
    with trusted_objects():
        dcp.load(sd, storage_reader=dcpio.FileSystemReader(path, **reader_kw))
    return sd


def _roundtrip_cases() -> list[Any]:
    cases = []
    for fmt, threads, single, sync, zstd in itertools.product(
        FORMATS, (1, 3), (True, False), (True, False), (False, True)
    ):
        cid = f"{_fmt_id(fmt)}-t{threads}-{'single' if single else 'per_item'}-{'sync' if sync else 'nosync'}" + (
            "-zstd" if zstd else ""
        )
        cases.append(pytest.param(fmt, threads, single, sync, zstd, id=cid))
    return cases


@pytest.mark.parametrize(("fmt", "threads", "single_file", "sync", "zstd"), _roundtrip_cases())
def test_roundtrip_every_dtype_shape_view_and_object(
    ckpt_dir: Path, fmt: Any, threads: int, single_file: bool, sync: bool, zstd: bool
) -> None:
    seed = threads * 16 + single_file * 8 + sync * 4 + zstd * 2
    sd = _state_dict_for(fmt, seed=seed)
    before = _state_dict_for(fmt, seed=seed)
    _save(
        sd,
        ckpt_dir,
        thread_count=threads,
        single_file_per_rank=single_file,
        sync_files=sync,
        serialization_format=fmt,
        _extensions=[dcpio.ZStandard()] if zstd else None,
    )
    assert_tree_equal(before, sd)  # saving must not touch the caller's tensors

    assert (ckpt_dir / ".metadata").is_file()
    assert not list(ckpt_dir.glob("*.tmp")), "a temporary file was left behind"
    loaded = _load(template_like(sd), ckpt_dir, thread_count=threads)
    assert_tree_equal(sd, loaded)

    md = dcpio.FileSystemReader(ckpt_dir).read_metadata()
    rel_paths = {info.relative_path for info in md.storage_data.values()}
    for rel in rel_paths:
        assert (ckpt_dir / rel).is_file(), f"metadata names {rel}, which is not on disk"
        assert re.fullmatch(r"__0_\d+(\.[^/]+)?\.distcp", rel), f"unexpected data file name {rel!r}"
    if single_file:
        assert len(rel_paths) <= threads, f"single_file_per_rank=True with {threads} threads wrote {sorted(rel_paths)}"
    else:
        assert len(rel_paths) == len(md.storage_data), "single_file_per_rank=False must write one file per item"
    if zstd and fmt == dcpio.SerializationFormat.TORCH_SAVE:
        # (in the SAFETENSORS format the tensor blob stays raw, as in torch's writer; only the round trip counts)
        descriptors = {tuple(info.transform_descriptors or ()) for info in md.storage_data.values()}
        assert all("stream.zstd/1" in d for d in descriptors), f"items without the zstd descriptor: {descriptors}"


def test_zstd_actually_compresses(tmp_path: Path) -> None:
    sd = {"zeros": torch.zeros(1 << 20, dtype=torch.float32)}  # 4 MiB that compress to almost nothing
    _save(sd, tmp_path / "z", _extensions=[dcpio.ZStandard()])
    data_bytes = sum(p.stat().st_size for p in (tmp_path / "z").glob("*.distcp"))
    assert data_bytes < (1 << 20), f"ZStandard left {data_bytes} bytes for 4 MiB of zeros"
    loaded = _load({"zeros": torch.ones(1 << 20)}, tmp_path / "z")
    assert_tree_equal(sd, loaded)


def test_exotic_dtypes_torch_save(ckpt_dir: Path) -> None:
    exotic = [d for d in all_dtypes(exotic=True) if d not in all_dtypes()]
    if not exotic:
        pytest.skip("this torch build has neither complex32 nor float4_e2m1fn_x2")
    gen = torch.Generator().manual_seed(5)
    sd = {str(d): rand_tensor((4, 6), d, gen) for d in exotic}
    sd.update({f"{d}_t": rand_tensor((6, 4), d, gen).t() for d in exotic})
    _save(sd, ckpt_dir, thread_count=2)
    assert_tree_equal(sd, _load(template_like(sd), ckpt_dir))


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
def test_load_into_non_contiguous_destinations(ckpt_dir: Path, fmt: Any) -> None:
    gen = torch.Generator().manual_seed(11)
    sd = {
        "a": rand_tensor((5, 7), torch.float32, gen),
        "b": rand_tensor((4, 6), torch.bfloat16, gen),
        "c": rand_tensor((9,), torch.int64, gen),
    }
    _save(sd, ckpt_dir, serialization_format=fmt)
    # destinations are views into bigger buffers: the reader must honour their strides and offsets
    buf_a = torch.zeros(7, 5, dtype=torch.float32)
    buf_b = torch.zeros(8, 12, dtype=torch.bfloat16)
    buf_c = torch.zeros(20, dtype=torch.int64)
    dest = {"a": buf_a.t(), "b": buf_b[::2, ::2], "c": buf_c[2:20:2]}
    dcp.load(dest, storage_reader=dcpio.FileSystemReader(ckpt_dir))
    assert_tree_equal(sd, dest)
    # the views are the caller's own tensors: the values must land in the caller's buffers, not in copies
    assert_tree_equal(sd["a"], buf_a.t())
    assert_tree_equal(sd["b"], buf_b[::2, ::2])
    assert torch.equal(buf_b[1::2], torch.zeros(4, 12, dtype=torch.bfloat16)), "bytes outside the view changed"
    assert torch.equal(buf_c[:2], torch.zeros(2, dtype=torch.int64)), "bytes before the view changed"


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
def test_partial_load_of_some_items(ckpt_dir: Path, fmt: Any) -> None:
    sd = _state_dict_for(fmt, seed=3)
    _save(sd, ckpt_dir, serialization_format=fmt, thread_count=2)
    wanted = {
        "dtypes": {"bfloat16": sd["dtypes"]["bfloat16"], "uint64": sd["dtypes"]["uint64"]},
        "shapes": {"big_1d": sd["shapes"]["big_1d"]},
        "objects": {"obj": sd["objects"]["obj"]},
    }
    loaded = _load(template_like(wanted), ckpt_dir)
    assert_tree_equal(wanted, loaded)


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
def test_resave_loaded_checkpoint_is_identical(tmp_path: Path, fmt: Any) -> None:
    # save -> load -> save again -> load: the second generation is bit-identical to the first
    sd = _state_dict_for(fmt, seed=9, views=False)
    _save(sd, tmp_path / "g1", serialization_format=fmt)
    gen1 = _load(template_like(sd), tmp_path / "g1")
    _save(gen1, tmp_path / "g2", serialization_format=fmt, thread_count=3, single_file_per_rank=False)
    gen2 = _load(template_like(sd), tmp_path / "g2", thread_count=1)
    assert_tree_equal(sd, gen2)


def test_untrusted_pickled_object_is_refused_unless_allowed(ckpt_dir: Path) -> None:
    gen = torch.Generator().manual_seed(4)
    sd = {"w": rand_tensor((3,), torch.float32, gen), "cfg": SmallObject("x", [1]), "step": 3}
    _save(sd, ckpt_dir)
    # by default a value that needs a class outside torch's weights_only allow-list is refused, by name
    with pytest.raises(BaseException) as info:
        dcp.load(template_like(sd), storage_reader=dcpio.FileSystemReader(ckpt_dir))
    unsafe = [e for e in exception_chain(info.value) if isinstance(e, dcpio.UnsafeCheckpointError)]
    assert unsafe, f"expected UnsafeCheckpointError, got {info.value!r}"
    assert "cfg" in str(unsafe[0]) and str(ckpt_dir) in str(unsafe[0])
    # the explicit opt-in loads it
    dest = template_like(sd)
    dcp.load(dest, storage_reader=dcpio.FileSystemReader(ckpt_dir, allow_pickle=True))
    assert_tree_equal(sd, dest)


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
def test_large_tensor_crossing_buffer_boundaries(tmp_path: Path, fmt: Any) -> None:
    # 24 MiB of incompressible bits plus odd-sized neighbours: crosses any chunk, part or copy-ahead boundary
    gen = torch.Generator().manual_seed(31)
    sd = {
        "big": rand_tensor((6 * (1 << 20) + 3,), torch.float32, gen),
        "odd": rand_tensor((1001, 7), torch.bfloat16, gen),
        "tail": rand_tensor((3,), torch.uint8, gen),
    }
    _save(sd, tmp_path / "c", serialization_format=fmt, thread_count=3, per_thread_copy_ahead=1 << 20)
    _save(sd, tmp_path / "z", serialization_format=fmt, thread_count=3, _extensions=[dcpio.ZStandard()])
    for name in ("c", "z"):
        assert_tree_equal(sd, _load(template_like(sd), tmp_path / name, thread_count=2))


def test_default_arguments_and_str_paths(tmp_path: Path) -> None:
    sd = make_state_dict(seed=41)
    path = str(tmp_path / "defaults")
    dcp.save(sd, storage_writer=dcpio.FileSystemWriter(path))  # thread_count=None: the knob's default
    dest = template_like(sd)
    with trusted_objects():
        dcp.load(dest, storage_reader=dcpio.FileSystemReader(path))
    assert_tree_equal(sd, dest)
    # checkpoint_id given to dcp.save/load overrides the path the classes were built with
    dcp.save(sd, checkpoint_id=tmp_path / "by_id", storage_writer=dcpio.FileSystemWriter(tmp_path / "unused"))
    assert not (tmp_path / "unused" / ".metadata").exists()
    dest = template_like(sd)
    with trusted_objects():
        dcp.load(dest, checkpoint_id=tmp_path / "by_id", storage_reader=dcpio.FileSystemReader(tmp_path / "nope"))
    assert_tree_equal(sd, dest)


_HYP_DTYPES = all_dtypes(complex_=False)


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=3),
    dtype_index=st.integers(0, len(_HYP_DTYPES) - 1),
    view=st.sampled_from(["none", "transpose", "step", "offset"]),
    fmt_index=st.integers(0, 1),
    seed=st.integers(0, 2**31 - 1),
)
@example(shape=[1], dtype_index=0, view="step", fmt_index=0, seed=0)  # size-1 dim with stride 2
@example(shape=[], dtype_index=0, view="none", fmt_index=1, seed=1)  # 0-dim in the safetensors format
def test_hypothesis_random_tensor_roundtrip(
    tmp_path: Path, shape: list[int], dtype_index: int, view: str, fmt_index: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    t = rand_tensor(shape, _HYP_DTYPES[dtype_index], gen)
    if view == "transpose" and t.dim() >= 2:
        t = t.transpose(0, t.dim() - 1)
    elif view == "step" and t.dim() >= 1:
        t = t[::2]
    elif view == "offset" and t.dim() >= 1 and t.shape[0] > 1:
        t = t[1:]
    sd = {"t": t, "pad": rand_tensor((3,), torch.int16, gen)}
    path = tmp_path / f"h{seed}_{fmt_index}_{view}_{dtype_index}_{'x'.join(map(str, shape))}"
    _save(sd, path, serialization_format=FORMATS[fmt_index], thread_count=2, overwrite=True)
    assert_tree_equal(sd, _load(template_like(sd), path))


def _edge_state_dicts() -> dict[str, dict[str, Any]]:
    gen = torch.Generator().manual_seed(51)
    base = rand_tensor((5, 4), torch.float32, gen)
    return {
        "empty": {},
        "only_objects": {"a": 1, "b": "x", "c": None},
        "only_empty_tensors": {"e": torch.empty(0), "f": torch.empty(2, 0, 3, dtype=torch.int8)},
        "odd_keys": {
            "../../escape": rand_tensor((2,), torch.float32, gen),
            "ü ñ/ x": rand_tensor((3,), torch.int64, gen),
            'quote"back\\slash': rand_tensor((1,), torch.bfloat16, gen),
        },
        "parameter": {"p": torch.nn.Parameter(rand_tensor((3, 2), torch.float32, gen))},
        "shared_storage": {"x": base, "y": base[1:], "z": base.t()},
    }


@pytest.mark.parametrize("fmt", FORMATS, ids=_fmt_id)
@pytest.mark.parametrize("case", sorted(_edge_state_dicts()))
def test_edge_case_state_dicts(tmp_path: Path, fmt: Any, case: str) -> None:
    sd = _edge_state_dicts()[case]
    _save(sd, tmp_path / "c", serialization_format=fmt, thread_count=2)
    loaded = _load(template_like(sd), tmp_path / "c")
    expected = {k: (v.detach() if isinstance(v, torch.nn.Parameter) else v) for k, v in sd.items()}
    assert_tree_equal(expected, loaded)
    # nothing escaped the checkpoint directory
    assert {p.name for p in tmp_path.iterdir()} == {"c"}
