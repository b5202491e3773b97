"""``dcpio demo`` shows what only dcpio does: a crashed save that left the previous step intact, a load that
reads only what it needs, a flipped byte caught (where torch's stock reader loads it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dcpio.manager import list_steps
from dcpio.tools.demo import run_demo


@pytest.mark.slow
def test_demo_shows_crash_partial_read_and_flipped_byte(tmp_path: Path) -> None:
    lines: list[str] = []
    res = run_demo(tmp_path / "demo", steps=2, log=lines.append)
    assert res.ok and res.bit_exact and res.crash_intact
    assert res.kept_steps == [1, 2] and res.crash_step == 3 and res.crash_latest == 2 and res.crash_files >= 1
    listed = {(i.step, i.committed) for i in list_steps(tmp_path / "demo" / "run")}
    assert listed == {(1, True), (2, True), (3, False)}  # the killed save left an uncommitted step, nothing else
    # the model is a third of model + AdamW state: reading it must not read the optimizer's bytes
    assert 0 < res.partial_read_bytes < 0.5 * res.checkpoint_bytes
    assert res.corrupt_caught and "model.0.weight" in res.corrupt_message and "checksum" in res.corrupt_message
    assert res.torch_loaded_corrupt
    assert any("SIGKILLed" in line for line in lines)
