"""Background upload from the fast local tier to the durable tier, with the durable tier's commit rules.

Every rank runs one uploader thread. For each step committed locally, a rank copies the data files *it* wrote
(bounded concurrency: ``threads`` files at once, each a multipart upload on S3), then writes a small marker
``.upload-<token>-rank<r>.json``. The coordinator waits until every rank's marker for this save's token is there,
checks that every file the metadata names arrived, and only then publishes ``.metadata`` (conditionally, see
:mod:`dcpio.manager.tiers`). A rank that dies mid-upload never writes its marker, so the step never commits and the
durable tier's previous step stays the newest loadable one. The token is chosen per save, so markers left by an
earlier, killed attempt at the same step cannot stand in for this one's.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from dcpio.errors import CheckpointError, CheckpointWriteError, IncompleteCheckpointError
from dcpio.integrity.safe_pickle import load_metadata
from dcpio.manager.tiers import Tier
from dcpio.names import METADATA_NAME

__all__ = ["UploadJob", "Uploader", "marker_name"]

_POLL_S = 0.1


def marker_name(token: str, rank: int) -> str:
    return f".upload-{token}-rank{rank}.json"


@dataclass(frozen=True)
class UploadJob:
    """One rank's share of uploading one step.

    Attributes:
        step: the step, committed in the local tier.
        token: the save's identity, the same on every rank.
        rank: this rank.
        world_size: ranks that take part (the coordinator waits for all their markers).
        files: the data files this rank wrote, by name in the local step directory.
        metadata: the committed ``.metadata`` bytes (coordinator only; None elsewhere).
    """

    step: int
    token: str
    rank: int
    world_size: int
    files: tuple[str, ...]
    metadata: bytes | None = None


class Uploader:
    """A rank's upload thread: jobs run in submission order; failures are kept for the caller to raise.

    Args:
        local: the tier to copy from.
        durable: the tier to copy to.
        threads: files uploaded at once.
        timeout_s: how long the coordinator waits for the other ranks' markers before giving up on a step.
    """

    def __init__(self, local: Tier, durable: Tier, *, threads: int, timeout_s: float) -> None:
        self.local = local
        self.durable = durable
        self.threads = max(1, threads)
        self.timeout_s = timeout_s
        self._queue: queue.Queue[UploadJob | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending: dict[int, int] = {}
        self._errors: list[tuple[int, BaseException]] = []
        self._idle = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._run, name="dcpio-upload", daemon=True)
        self._thread.start()

    def submit(self, job: UploadJob) -> None:
        with self._lock:
            self._pending[job.step] = self._pending.get(job.step, 0) + 1
        self._queue.put(job)

    def pending(self) -> set[int]:
        """Steps queued or being uploaded by this rank."""
        with self._lock:
            return set(self._pending)

    def take_errors(self) -> list[tuple[int, BaseException]]:
        """Failures since the last call, as (step, exception)."""
        with self._lock:
            errors, self._errors = self._errors, []
        return errors

    def wait(self, timeout: float | None = None) -> bool:
        """Block until nothing is pending; False when ``timeout`` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, wait: bool = True) -> None:
        """Stop the thread after the queued uploads; ``wait=False`` returns at once (the thread is a daemon)."""
        self._queue.put(None)
        if wait:
            self._thread.join()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                self._upload(job)
            except BaseException as err:  # kept and raised on the caller's thread at its next manager call
                with self._lock:
                    self._errors.append((job.step, err))
            finally:
                with self._idle:
                    self._pending[job.step] -= 1
                    if not self._pending[job.step]:
                        del self._pending[job.step]
                    self._idle.notify_all()

    def _upload(self, job: UploadJob) -> None:
        self.durable.mkdir(job.step)
        sizes = self._copy_files(job)
        marker = json.dumps({"rank": job.rank, "files": sizes}).encode()
        self.durable.put_bytes(job.step, marker_name(job.token, job.rank), marker)
        if job.metadata is not None:
            self._commit(job)

    def _copy_files(self, job: UploadJob) -> dict[str, int]:
        sizes: dict[str, int] = {}
        with ThreadPoolExecutor(self.threads, thread_name_prefix="dcpio-upload-file") as pool:
            futures = {
                name: pool.submit(self.durable.put_file, job.step, name, self.local.step_path(job.step, name))
                for name in job.files
            }
            failures: list[tuple[str, BaseException]] = []
            for name, future in futures.items():
                try:
                    sizes[name] = future.result()
                except Exception as err:  # every file's failure is named, the first is chained
                    failures.append((name, err))
        if failures:
            names = ", ".join(f"{n} ({type(e).__name__}: {e})" for n, e in failures[:4])
            raise CheckpointWriteError(
                f"{self.durable.step_path(job.step)}: uploading {len(failures)} of {len(job.files)} file(s) from the "
                f"local tier failed: {names}. The step was not committed there; its local copy is kept."
            ) from failures[0][1]
        return sizes

    def _commit(self, job: UploadJob) -> None:
        if job.metadata is None:
            return
        wanted = {marker_name(job.token, r) for r in range(job.world_size)}
        deadline = time.monotonic() + self.timeout_s
        while not wanted <= (present := self.durable.names(job.step)):
            if time.monotonic() > deadline:
                missing = sorted(wanted - present)
                raise CheckpointWriteError(
                    f"{self.durable.step_path(job.step)}: {len(missing)} rank(s) did not finish uploading within "
                    f"{self.timeout_s:.0f} s ({', '.join(missing[:4])}); the step was not committed there, the "
                    "previous durable step is intact and the local copy is kept."
                )
            time.sleep(_POLL_S)
        where = self.durable.step_path(job.step, METADATA_NAME)
        metadata = load_metadata(job.metadata, where)
        named = {str(getattr(i, "relative_path", "")) for i in (metadata.storage_data or {}).values()}
        absent = sorted(n for n in named if n and n not in present)
        if absent:
            raise IncompleteCheckpointError(
                f"{self.durable.step_path(job.step)}: every rank reported its upload done, but "
                f"{', '.join(absent[:4])} named by the metadata is missing; not committed. Save the step again."
            )
        self.durable.commit(job.step, job.metadata)
        for name in present - named - {METADATA_NAME}:
            try:  # markers and files of earlier, failed attempts at this step: not part of the commit
                self.durable.remove(job.step, name)
            except (OSError, CheckpointError):
                continue
