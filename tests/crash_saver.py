"""A fork server that saves checkpoints over and over, for the SIGKILL crash-consistency test.

Importing torch takes seconds on the test machine, so this script imports it once and then forks one saving child
per kill round. It speaks a line protocol on stdin/stdout::

    run <directory> <progress file> <first version>   ->  pid <child pid>
    reap <pid>                                        ->  reaped <raw wait status>
    quit                                              ->  (exits)

The child saves version ``first``, ``first + 1``, ... into ``<directory>`` with ``dcpio.FileSystemWriter`` until it
is killed, and after each save has returned (the new ``.metadata`` is committed) appends ``<version>\\n`` to the
progress file. A save killed mid-way leaves the progress file at the last committed version, or one below it when
the kill landed between the commit and the append.

:func:`version_state_dict` is imported by the test to rebuild what each version holds.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch

# the writer options are varied by version so that kills land in every layout (several files per save, one file
# per item, one thread) and the old and new checkpoints differ in their file sets
_WRITER_OPTIONS: tuple[dict[str, Any], ...] = (
    {},
    {"thread_count": 1},
    {"single_file_per_rank": False},
)


def writer_options(version: int) -> dict[str, Any]:
    """The ``FileSystemWriter`` keywords that version ``version`` is saved with."""
    return dict(_WRITER_OPTIONS[version % len(_WRITER_OPTIONS)])


def version_state_dict(version: int) -> dict[str, Any]:
    """The state dict of ``version``: every tensor filled from seed ``version``, plus the version itself."""
    gen = torch.Generator().manual_seed(1000 + version)

    def bits(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        raw = torch.randint(0, 256, (n * dtype.itemsize,), generator=gen, dtype=torch.uint8)
        return raw.view(dtype).reshape(shape)

    return {
        "model": {
            "embed": bits((512, 512), torch.float32),  # 1 MiB
            "proj": bits((384, 640), torch.bfloat16),
            "bias": bits((1000,), torch.float16),
        },
        "optim": {"exp_avg": bits((200_000,), torch.int64), "step": bits((), torch.float64)},
        "version": version,
        "tag": f"version-{version}",
    }


def _save_forever(directory: str, progress: str, first: int) -> None:
    import torch.distributed.checkpoint as dcp

    import dcpio

    fd = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    version = first
    while True:
        sd = version_state_dict(version)
        dcp.save(sd, storage_writer=dcpio.FileSystemWriter(directory, **writer_options(version)))
        # the save returned: its metadata is committed; the page cache keeps this line across a SIGKILL
        os.write(fd, f"{version}\n".encode())
        version += 1


def main() -> None:
    warnings.simplefilter("ignore")
    import logging

    logging.getLogger("c10d-NullHandler-dcp_logger").setLevel(logging.INFO)
    import torch.distributed.checkpoint  # noqa: F401  (imported before forking, so children start at once)

    import dcpio

    # dcpio imports its modules on first use: load the writer's now, or every child spends ~80 ms importing it and
    # the kills (tens of ms after the fork) never reach a save
    _ = dcpio.FileSystemWriter, dcpio.FileSystemReader
    print("ready", flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "run":
            directory, progress, first = parts[1], parts[2], int(parts[3])
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    sys.stdin.close()
                    _save_forever(directory, progress, first)
                except BaseException as err:  # report why the child stopped; it should only ever be killed
                    print(f"child failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
                    code = 1
                finally:
                    os._exit(code)
            print(f"pid {pid}", flush=True)
        elif parts[0] == "reap":
            _, status = os.waitpid(int(parts[1]), 0)
            print(f"reaped {status}", flush=True)
        elif parts[0] == "quit":
            return
        else:
            print(f"error unknown command {line!r}", flush=True)


if __name__ == "__main__":
    main()
