"""Every ``python`` and ``bash`` block of README.md runs as written.

Each block runs in a fresh directory, in its own process, after a short prelude that defines what the README takes
as given: ``model`` (a tiny two-tensor language model), ``state_dict`` and ``state`` (its state dict), and, where a
marker comment right above the block asks for it, a 1-rank gloo process group, a hub-style safetensors folder, a
saved checkpoint, a damaged one, or a local S3 server (moto on 127.0.0.1, authentication on). ``bash`` blocks find a
``dcpio`` command on ``PATH`` that runs this checkout's sources.

Markers (HTML comments, invisible in the rendered README), on the line above the block's fence::

    <!-- readme-test: skip: why it cannot run here -->
    <!-- readme-test: prelude=process_group,checkpoint expect=TEXT s3 -->
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from s3_server import MotoServer

pytestmark = pytest.mark.slow  # a process per block, each importing torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SRC_DIR = str(ROOT / "src")
TESTS_DIR = str(ROOT / "tests")

_MARKER = re.compile(r"^<!-- readme-test: (?P<opts>.*?) -->$")
_FENCE = re.compile(r"^```(?P<lang>\w*)\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of the README that the test runs (or skips, with its reason)."""

    line: int
    lang: str
    code: str
    skip: str | None = None
    preludes: tuple[str, ...] = ()
    expect: str | None = None
    s3: bool = False
    unknown: tuple[str, ...] = field(default_factory=tuple)

    @property
    def id(self) -> str:
        return f"README.md:{self.line}-{self.lang}"


def _options(text: str) -> dict[str, object]:
    if text.startswith("skip:"):
        return {"skip": text.removeprefix("skip:").strip() or "no reason given"}
    out: dict[str, object] = {"unknown": ()}
    for token in text.split():
        key, _, value = token.partition("=")
        if key == "prelude":
            out["preludes"] = tuple(value.split(","))
        elif key == "expect":
            out["expect"] = value
        elif key == "s3" and not value:
            out["s3"] = True
        else:
            out["unknown"] = (*out["unknown"], token)  # type: ignore[misc]
    return out


def readme_blocks(text: str) -> tuple[list[Block], list[int]]:
    """The README's python and bash blocks, and the line numbers of markers that no such block follows."""
    lines = text.splitlines()
    blocks: list[Block] = []
    stray: list[int] = []
    i = 0
    while i < len(lines):
        marker = _MARKER.match(lines[i])
        fence = _FENCE.match(lines[i + 1]) if marker and i + 1 < len(lines) else _FENCE.match(lines[i])
        start = i + 1 if marker else i
        if marker and (fence is None or fence["lang"] not in ("python", "bash")):
            stray.append(i + 1)
        if fence is None:
            i += 1
            continue
        end = next(j for j in range(start + 1, len(lines)) if lines[j].startswith("```"))
        if fence["lang"] in ("python", "bash"):
            opts = _options(marker["opts"]) if marker else {}
            blocks.append(Block(start + 1, fence["lang"], "\n".join(lines[start + 1 : end]) + "\n", **opts))  # type: ignore[arg-type]
        i = end + 1
    return blocks, stray


BLOCKS, STRAY_MARKERS = readme_blocks(README.read_text(encoding="utf-8"))

# ------------------------------------------------------------------------------------------------------ preludes
_BASE = """
import warnings
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
import logging
logging.getLogger("c10d-NullHandler-dcp_logger").setLevel(logging.INFO)
import torch
import torch.distributed.checkpoint as dcp
import dcpio

torch.manual_seed(0)


class TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(32, 8)
        self.lm_head = torch.nn.Linear(8, 32, bias=False)


model = TinyLM()
state_dict = model.state_dict()
state = model.state_dict()
"""

_PRELUDES = {
    "process_group": """
import socket
import torch.distributed as dist
with socket.socket() as _s:
    _s.bind(("127.0.0.1", 0))
    _port = _s.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_port}", rank=0, world_size=1)
""",
    "hub_folder": """
import os
from safetensors.torch import save_file
os.makedirs("hub-folder")
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, "hub-folder/model.safetensors")
""",
    "checkpoint": """
dcp.save(model.state_dict(), storage_writer=dcpio.FileSystemWriter("ckpt/step-1000"))
""",
    "training_checkpoint": """
import json, os
from torch.distributed.checkpoint import FileSystemWriter as _StockWriter
dcp.save(
    {"model": model.state_dict(), "optim": {"lr": torch.tensor(1e-3), "step": 7}},
    storage_writer=dcpio.FileSystemWriter("ckpt/step-1000"),
)
dcp.save(model.state_dict(), storage_writer=_StockWriter("stock-ckpt"))
os.makedirs("my-model")
with open("my-model/config.json", "w") as _f:
    json.dump({"model_type": "tiny"}, _f)
""",
    "damaged_checkpoint": """
dcp.save(model.state_dict(), storage_writer=dcpio.FileSystemWriter("ckpt/step-1000"))
_md = dcpio.FileSystemReader("ckpt/step-1000").read_metadata()
(_info,) = [i for idx, i in _md.storage_data.items() if idx.fqn == "embed.weight"]
with open(f"ckpt/step-1000/{_info.relative_path}", "r+b") as _f:
    _f.seek(_info.offset + _info.length // 2)
    _byte = _f.read(1)
    _f.seek(-1, 1)
    _f.write(bytes([_byte[0] ^ 0xFF]))
""",
}

_EPILOGUES = {
    "process_group": """
import torch.distributed as dist
if dist.is_initialized():
    dist.destroy_process_group()
""",
}


def _script(block: Block, body: str) -> str:
    parts = [_BASE, *(_PRELUDES[name] for name in block.preludes), body]
    parts += [_EPILOGUES[name] for name in block.preludes if name in _EPILOGUES]
    return "\n".join(textwrap.dedent(p) for p in parts)


def _env(tmp_path: Path, extra: dict[str, str]) -> dict[str, str]:
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "dcpio"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m dcpio "$@"\n')
    shim.chmod(0o755)
    env = dict(os.environ, NO_COLOR="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC_DIR, TESTS_DIR, env.get("PYTHONPATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(bin_dir), env.get("PATH", "")))
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _run_block(block: Block, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if block.lang == "python":
        (cwd / "block.py").write_text(_script(block, block.code))
        return _run([sys.executable, "block.py"], cwd, env)
    if block.preludes:  # a bash block's files come from a python prelude run first
        (cwd / "prelude.py").write_text(_script(block, ""))
        done = _run([sys.executable, "prelude.py"], cwd, env)
        assert done.returncode == 0, done.stderr
    return _run(["bash", "-euo", "pipefail", "-c", block.code], cwd, env)


# --------------------------------------------------------------------------------------------------------- tests
def test_readme_has_blocks_and_every_marker_belongs_to_one() -> None:
    assert len([b for b in BLOCKS if b.lang == "python"]) >= 8
    assert any(b.lang == "bash" and b.skip is None for b in BLOCKS)
    assert STRAY_MARKERS == [], f"markers not followed by a python/bash block at README lines {STRAY_MARKERS}"
    for block in BLOCKS:
        assert block.unknown == (), f"{block.id}: unknown marker options {block.unknown}"
        assert set(block.preludes) <= set(_PRELUDES), f"{block.id}: unknown prelude in {block.preludes}"


def test_block_parser_reads_markers() -> None:
    text = (
        "<!-- readme-test: skip: needs a GPU -->\n```python\nx = 1\n```\n"
        "<!-- readme-test: prelude=checkpoint,process_group expect=OK s3 -->\n```bash\necho OK\n```\n"
        "```text\nnot run\n```\n<!-- readme-test: s3 -->\nprose\n"
    )
    blocks, stray = readme_blocks(text)
    assert [(b.line, b.lang, b.code) for b in blocks] == [(2, "python", "x = 1\n"), (6, "bash", "echo OK\n")]
    assert blocks[0].skip == "needs a GPU"
    assert blocks[1].preludes == ("checkpoint", "process_group") and blocks[1].expect == "OK" and blocks[1].s3
    assert stray == [12]


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    # moto with authentication on, and the bucket the README names
    with MotoServer() as server:
        server.client().create_bucket(Bucket="bucket")
        yield {
            "AWS_ACCESS_KEY_ID": server.key,
            "AWS_SECRET_ACCESS_KEY": server.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "S3_ENDPOINT": server.endpoint_url,
        }


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if block.skip is not None:
        pytest.skip(f"{block.id}: {block.skip}")
    extra: dict[str, str] = request.getfixturevalue("s3_env") if block.s3 else {}
    proc = _run_block(block, tmp_path, _env(tmp_path, extra))
    shown = f"{block.id} exited with {proc.returncode}\n--- block\n{block.code}--- stdout\n{proc.stdout}--- stderr\n"
    assert proc.returncode == 0, shown + proc.stderr[-4000:]
    if block.expect is not None:
        assert block.expect in proc.stdout, shown + proc.stderr[-4000:]
