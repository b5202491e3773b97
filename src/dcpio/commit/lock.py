"""One save at a time per checkpoint directory: a lock file created exclusively, with stale-lock detection.

Why a lock and not only per-save file names: data files already get fresh names per save, but every save ends by
removing the files its own metadata does not name, so two saves racing in one directory remove each other's
files and both report success. The lock makes the second save fail at its start, before it writes a byte, with an
error naming the holder; the first save and the previous checkpoint are untouched.

The lock is ``.dcpio.lock`` in the checkpoint directory (``__{rank}.dcpio.lock`` for a per-rank save, so the ranks
of one ``use_collectives=False`` save do not exclude each other). It holds JSON: pid, host, save id, start time.
It is created atomically with its content (written to a private file, then hard-linked to the lock name, which
fails if the name exists), so no reader ever sees an empty lock. A lock is stale, and taken over, when its holder
ran on this host and its process is gone (a killed save), or when it is this process's own (an earlier save of
this process that failed on another rank never reached its release). So two saves of one process into one
directory (overlapping ``async_save`` calls) are not excluded: wait for one ``async_save`` future before starting
the next into the same directory. A lock held from another host cannot be checked: the error says which host and
how to remove it. Stores without exclusive creation (object stores) use the
mover's ``create_new_bytes`` (a conditional PUT where the store has one).
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from dcpio.errors import CheckpointError, SaveConflictError
from dcpio.movers.base import FileSystemBase
from dcpio.names import LOCK_NAME, lock_name

__all__ = ["LOCK_NAME", "SaveConflictError", "SaveLock", "lock_name"]

_LOCK_READ_LIMIT = 4096


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return True
    return True


class SaveLock:
    """The lock of one save. ``acquire`` before writing, ``release`` after the commit (or on failure).

    Example::

        lock = SaveLock(dcpio.FileSystem(), "ckpt", save_id)
        lock.acquire()          # SaveConflictError while another live save holds it
        try:
            ...                 # write, commit
        finally:
            lock.release()
    """

    def __init__(self, fs: FileSystemBase, directory: Any, save_id: str, rank: int | None = None) -> None:
        self.fs = fs
        self.path = str(fs.concat_path(directory, lock_name(rank)))
        self.save_id = save_id
        self.held = False

    def _record(self) -> bytes:
        doc = {"pid": os.getpid(), "host": socket.gethostname(), "save_id": self.save_id, "started": time.time()}
        return json.dumps(doc).encode()

    def _holder(self) -> dict[str, Any] | None:
        try:
            raw = self.fs.read_file(self.path, _LOCK_READ_LIMIT)
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw)
        except ValueError:
            return {}
        return doc if isinstance(doc, dict) else {}

    def _stale(self, holder: dict[str, Any]) -> bool:
        pid = holder.get("pid")
        if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
            return False
        return pid == os.getpid() or not _alive(pid)

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; raise :class:`SaveConflictError` while another save holds it."""
        for _ in range(3):
            if self.fs.create_new_bytes(self.path, self._record()):
                self.held = True
                return
            holder = self._holder()
            if holder is None:
                continue  # released between our try and our look: try again
            if not self._stale(holder):
                raise self._conflict(holder)
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass
        raise self._conflict(self._holder() or {})

    def _conflict(self, holder: dict[str, Any]) -> SaveConflictError:
        started = holder.get("started")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, float) else "?"
        return SaveConflictError(
            f"{self.path}: another save is writing this checkpoint (pid {holder.get('pid', '?')} on host "
            f"{holder.get('host', '?')}, save {holder.get('save_id', '?')}, since {when}). This save stopped before "
            "writing anything; the previous checkpoint is intact. Save to another directory, or wait for that save "
            f"to finish. If no save is running there (its host died), remove {self.path} and save again."
        )

    def release(self) -> None:
        """Remove the lock if it is still this save's. Never raises: the save's own outcome is what matters."""
        if not self.held:
            return
        self.held = False
        try:
            holder = self._holder()
            if holder is not None and holder.get("save_id") == self.save_id:
                self.fs.rm_file(self.path)
        except (OSError, CheckpointError):  # a lock left behind is taken over as stale by this host's next save
            pass
