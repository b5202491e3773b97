"""overwrite semantics and the error contract: CheckpointError subclasses that name the path, worker exceptions
that reach the caller, and a failed save that leaves the previous checkpoint intact."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dcpio
import dcpio.errors
from helpers import (
    assert_tree_equal,
    exception_chain,
    make_state_dict,
    rand_tensor,
    template_like,
    trusted_objects,
)


class InjectedFault(Exception):
    """Raised on purpose inside a save; the test looks for it in the caller's exception chain."""


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def _save(sd: dict[str, Any], path: Path, **kw: Any) -> None:
    dcp.save(sd, storage_writer=dcpio.FileSystemWriter(path, **kw))


def _load(sd: Any, path: Path, **kw: Any) -> Any:
    with trusted_objects():
        dcp.load(sd, storage_reader=dcpio.FileSystemReader(path, **kw))
    return sd


def _find(chain: list[BaseException], cls: type[BaseException]) -> BaseException:
    found = [e for e in chain if isinstance(e, cls)]
    assert found, f"no {cls.__name__} in the exception chain: {[f'{type(e).__name__}: {e}'[:300] for e in chain]}"
    return found[0]


def _data_files_and_metadata(path: Path) -> tuple[set[str], set[str]]:
    md = dcpio.FileSystemReader(path).read_metadata()
    named = {info.relative_path for info in md.storage_data.values()}
    on_disk = {p.name for p in path.iterdir()}
    return named, on_disk


# ------------------------------------------------------------------------------------------------------------------
# overwrite
# ------------------------------------------------------------------------------------------------------------------


def test_overwrite_false_refuses_existing_checkpoint_and_keeps_it(ckpt_dir: Path) -> None:
    old = make_state_dict(seed=1)
    _save(old, ckpt_dir, thread_count=2)
    before = _snapshot(ckpt_dir)

    with pytest.raises(BaseException) as info:  # dcp.save wraps it in torch's CheckpointException (a BaseException)
        _save(make_state_dict(seed=2), ckpt_dir, overwrite=False)
    err = _find(exception_chain(info.value), dcpio.CheckpointExistsError)
    assert isinstance(err, dcpio.CheckpointError)
    assert str(ckpt_dir) in str(err), f"the message does not name the checkpoint: {err}"

    assert _snapshot(ckpt_dir) == before, "a refused save changed files of the existing checkpoint"
    assert_tree_equal(old, _load(template_like(old), ckpt_dir))


def test_overwrite_false_into_fresh_or_empty_directory_works(tmp_path: Path) -> None:
    sd = make_state_dict(seed=3, views=False)
    _save(sd, tmp_path / "fresh", overwrite=False)
    (tmp_path / "empty").mkdir()
    _save(sd, tmp_path / "empty", overwrite=False)
    for name in ("fresh", "empty"):
        assert_tree_equal(sd, _load(template_like(sd), tmp_path / name))


@pytest.mark.parametrize(
    ("first_kw", "second_kw"),
    [
        pytest.param({"single_file_per_rank": False, "thread_count": 3}, {"thread_count": 1}, id="many_files_to_one"),
        pytest.param({"thread_count": 1}, {"thread_count": 1}, id="same_names"),
        pytest.param({"thread_count": 2}, {"single_file_per_rank": False, "thread_count": 2}, id="one_to_many"),
    ],
)
def test_overwrite_true_replaces_and_leaves_no_stale_files(
    ckpt_dir: Path, first_kw: dict[str, Any], second_kw: dict[str, Any]
) -> None:
    first = make_state_dict(seed=4)
    _save(first, ckpt_dir, **first_kw)
    gen = torch.Generator().manual_seed(5)
    second = {"only": rand_tensor((40, 3), torch.float32, gen), "model": {"w": rand_tensor((7,), torch.int8, gen)}}
    _save(second, ckpt_dir, overwrite=True, **second_kw)

    assert_tree_equal(second, _load(template_like(second), ckpt_dir))
    named, on_disk = _data_files_and_metadata(ckpt_dir)
    assert on_disk == named | {".metadata"}, f"stale or temporary files left: {sorted(on_disk - named - {'.metadata'})}"
    md = dcpio.FileSystemReader(ckpt_dir).read_metadata()
    assert set(md.state_dict_metadata) == {"only", "model.w"}


# ------------------------------------------------------------------------------------------------------------------
# the error hierarchy
# ------------------------------------------------------------------------------------------------------------------


def test_errors_are_checkpoint_error_subclasses_of_exception() -> None:
    assert issubclass(dcpio.CheckpointError, Exception)
    names = list(dcpio.errors.__all__)
    for expected in ("CheckpointExistsError", "IncompleteCheckpointError", "CorruptCheckpointError"):
        assert expected in names
    for name in names:
        cls = getattr(dcpio, name)
        assert cls is getattr(dcpio.errors, name), f"dcpio.{name} is not dcpio.errors.{name}"
        assert issubclass(cls, dcpio.CheckpointError), name
        assert issubclass(cls, Exception), name
        # an ordinary ``except Exception`` catches it
        try:
            raise cls("x")
        except Exception as caught:
            assert type(caught) is cls


# ------------------------------------------------------------------------------------------------------------------
# exceptions inside the save reach the caller; the failed save publishes nothing
# ------------------------------------------------------------------------------------------------------------------


class _FailingFileSystem(dcpio.FileSystem):
    """The real local mover, except that creating the second data file fails."""

    def __init__(self) -> None:
        super().__init__()
        self.opened_from: list[str] = []

    def open_writer(self, path: Any) -> Any:
        name = os.path.basename(str(path))
        self.opened_from.append(threading.current_thread().name)
        if name.startswith("__0_1."):
            raise InjectedFault(f"injected failure creating {path}")
        return super().open_writer(path)


def test_exception_in_byte_mover_reaches_caller(ckpt_dir: Path) -> None:
    fs = _FailingFileSystem()
    sd = make_state_dict(seed=6, views=False)
    with pytest.raises(BaseException) as info:
        dcp.save(
            sd,
            storage_writer=dcpio.FileSystemWriter(ckpt_dir, thread_count=3, single_file_per_rank=False, _fs=fs),
        )
    err = _find(exception_chain(info.value), InjectedFault)
    assert "__0_1." in str(err)
    assert not (ckpt_dir / ".metadata").exists(), "a failed save committed metadata"


class _ExplodesWhenPickled:
    def __reduce__(self) -> Any:
        raise InjectedFault("this object refuses to be pickled")


@pytest.mark.parametrize("threads", [1, 3])
def test_exception_while_serializing_an_item_reaches_caller(ckpt_dir: Path, threads: int) -> None:
    sd = make_state_dict(seed=7, views=False)
    sd["objects"]["bad"] = _ExplodesWhenPickled()
    with pytest.raises(BaseException) as info:
        _save(sd, ckpt_dir, thread_count=threads, single_file_per_rank=False)
    _find(exception_chain(info.value), InjectedFault)
    assert not (ckpt_dir / ".metadata").exists(), "a failed save committed metadata"


def test_failed_overwrite_leaves_previous_checkpoint_loadable(ckpt_dir: Path) -> None:
    old = make_state_dict(seed=8)
    _save(old, ckpt_dir, thread_count=3, single_file_per_rank=False)
    before = _snapshot(ckpt_dir)
    with pytest.raises(BaseException) as info:
        dcp.save(
            make_state_dict(seed=9),
            storage_writer=dcpio.FileSystemWriter(
                ckpt_dir, thread_count=3, single_file_per_rank=False, _fs=_FailingFileSystem()
            ),
        )
    _find(exception_chain(info.value), InjectedFault)
    assert_tree_equal(old, _load(template_like(old), ckpt_dir))
    after = _snapshot(ckpt_dir)
    for name, data in before.items():
        assert after.get(name) == data, f"{name} of the previous checkpoint changed after a failed overwrite"


# ------------------------------------------------------------------------------------------------------------------
# reading broken or missing checkpoints
# ------------------------------------------------------------------------------------------------------------------


def test_missing_metadata_is_incomplete_checkpoint_naming_the_path(ckpt_dir: Path) -> None:
    sd = make_state_dict(seed=10, views=False)
    _save(sd, ckpt_dir)
    (ckpt_dir / ".metadata").unlink()

    with pytest.raises(dcpio.IncompleteCheckpointError) as info:
        dcpio.FileSystemReader(ckpt_dir).read_metadata()
    assert str(ckpt_dir) in str(info.value), str(info.value)

    # through dcp.load, torch's loader reports it (as text) inside its own exception
    with pytest.raises(BaseException) as load_info:
        _load(template_like(sd), ckpt_dir)
    assert str(ckpt_dir) in str(load_info.value)


def test_nonexistent_directory_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "never_saved"
    with pytest.raises((dcpio.IncompleteCheckpointError, FileNotFoundError)) as info:
        dcpio.FileSystemReader(missing).read_metadata()
    assert str(missing) in str(info.value)


def test_truncated_metadata_is_a_checkpoint_error_naming_the_file(ckpt_dir: Path) -> None:
    _save(make_state_dict(seed=11, views=False), ckpt_dir)
    meta = ckpt_dir / ".metadata"
    meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2])
    with pytest.raises(dcpio.CheckpointError) as info:
        dcpio.FileSystemReader(ckpt_dir).read_metadata()
    assert str(ckpt_dir) in str(info.value), str(info.value)


def test_truncated_data_file_error_names_file_and_tensor(ckpt_dir: Path) -> None:
    gen = torch.Generator().manual_seed(12)
    sd = {"encoder.weight": rand_tensor((256, 256), torch.float32, gen)}
    _save(sd, ckpt_dir)
    (data,) = [p for p in ckpt_dir.iterdir() if p.name.endswith(".distcp")]
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(BaseException) as info:
        _load(template_like(sd), ckpt_dir)
    chain = exception_chain(info.value)
    err = _find(chain, dcpio.CheckpointError)
    assert data.name in str(err), f"the error does not name the data file: {err}"
    assert "encoder.weight" in str(err), f"the error does not name the tensor: {err}"


def test_missing_data_file_error_names_the_file(ckpt_dir: Path) -> None:
    sd = make_state_dict(seed=13, views=False)
    _save(sd, ckpt_dir, single_file_per_rank=False)
    named, _ = _data_files_and_metadata(ckpt_dir)
    victim = sorted(named)[0]
    (ckpt_dir / victim).unlink()
    with pytest.raises(BaseException) as info:
        _load(template_like(sd), ckpt_dir)
    chain = exception_chain(info.value)
    relevant = [e for e in chain if isinstance(e, (FileNotFoundError, dcpio.CheckpointError))]
    assert relevant, f"expected FileNotFoundError or a CheckpointError, got {[type(e).__name__ for e in chain]}"
    assert any(victim in str(e) for e in relevant), [str(e) for e in relevant]


def test_overwrite_without_collectives_over_a_collective_checkpoint(ckpt_dir: Path) -> None:
    # a per-rank (use_collectives=False) save into a directory holding a committed global checkpoint: dcp.load
    # tries the global .metadata first, so the result must load as the *new* checkpoint
    gen = torch.Generator().manual_seed(14)
    old = {"x": rand_tensor((3, 4), torch.float32, gen)}
    new = {"x": rand_tensor((3, 4), torch.float32, gen)}
    _save(old, ckpt_dir)
    dcp.save(new, storage_writer=dcpio.FileSystemWriter(ckpt_dir), use_collectives=False)
    assert (ckpt_dir / "__0.metadata").is_file()
    assert_tree_equal(new, _load(template_like(new), ckpt_dir))
