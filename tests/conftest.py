"""Shared fixtures. Helpers live in ``helpers.py`` (importable by stock-torch subprocesses); the most used
ones are re-exported here and offered as fixtures."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import assert_tree_equal, bitwise_equal

__all__ = ["assert_tree_equal", "bitwise_equal"]


@pytest.fixture(autouse=True)
def _quiet_dcp() -> Iterator[None]:
    # dcp.save/load without a process group warn on every call; the tests do that on purpose
    # torch's DCP logs every step at DEBUG; on a failure that buries the traceback
    logging.getLogger("c10d-NullHandler-dcp_logger").setLevel(logging.INFO)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*Detected an existing checkpoint.*")
        yield


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    """A not-yet-existing checkpoint directory under the test's tmp dir."""
    return tmp_path / "ckpt"


@pytest.fixture
def bitwise() -> Callable[[object, object], bool]:
    """The :func:`helpers.bitwise_equal` comparison as a fixture."""
    return bitwise_equal
