"""The :class:`CheckpointManager` and the one-shot helpers behind ``dcpio ls`` and ``dcpio prune``."""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dcpio.errors import CheckpointError, CheckpointExistsError, CheckpointWriteError, IncompleteCheckpointError
from dcpio.manager import policy
from dcpio.manager.tiers import StepScan, StepWriter, Tier
from dcpio.manager.upload import Uploader, UploadJob
from dcpio.names import METADATA_NAME, data_file_rank

__all__ = ["CheckpointManager", "PruneReport", "StepInfo", "list_steps", "prune"]

DEFAULT_GRACE_S = 3600.0


@dataclass(frozen=True)
class StepInfo:
    """One step directory of one tier, as ``dcpio ls`` lists it.

    Attributes:
        step: the step number.
        tier: ``"local"`` or ``"durable"``.
        committed: its ``.metadata`` exists and parses.
        damaged: its ``.metadata`` exists and does not parse (never swept; recover or delete it by hand).
        size: bytes of every file in it.
        files: how many files.
        mtime: newest modification time of anything in it (seconds since the epoch).
        path: the directory or URL.
    """

    step: int
    tier: str
    committed: bool
    size: int
    files: int
    mtime: float
    path: str
    damaged: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _RankStatus:
    rank: int
    host: str
    local_root: str
    busy: set[int]
    errors: list[tuple[int, str]]


@dataclass
class _Decision:
    """What rank 0 saw and decided; broadcast so every rank acts on the same."""

    durable: dict[int, bool] = field(default_factory=dict)
    local: dict[int, bool] = field(default_factory=dict)
    token: str = ""
    delete_durable: list[int] = field(default_factory=list)
    delete_local: list[int] = field(default_factory=list)
    resume: list[int] = field(default_factory=list)
    failure: str | None = None

    def committed(self) -> list[int]:
        return sorted({s for s, ok in self.durable.items() if ok} | {s for s, ok in self.local.items() if ok})


@dataclass
class _AsyncSave:
    step: int
    writer: StepWriter
    token: str
    future: Future[Any] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class _Comm:
    """The manager's collectives: its own gloo groups, or nothing at all without a process group."""

    def __init__(self, process_group: Any) -> None:
        self.active = dist.is_available() and dist.is_initialized()
        self.rank, self.world = 0, 1
        self.dcp_group: Any = None
        self.ctl_group: Any = None
        if not self.active:
            return
        ranks = dist.get_process_group_ranks(process_group) if process_group is not None else None
        # dcp.async_save runs its collectives on a background thread: they need a group of their own, and the
        # manager's decisions (taken on the caller's thread meanwhile) need another
        self.dcp_group = process_group if process_group is not None else dist.new_group(ranks=ranks, backend="gloo")
        self.ctl_group = dist.new_group(ranks=ranks, backend="gloo")
        self.rank = dist.get_rank(self.ctl_group)
        self.world = dist.get_world_size(self.ctl_group)

    def broadcast(self, obj: Any) -> Any:
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, group=self.ctl_group, group_src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.ctl_group)
        return out


def _check_count(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


class CheckpointManager:
    """Saves, finds, loads and retires the checkpoints of a training run; one directory per step.

    Use it from every rank of a ``torch.distributed`` job (or from a single process without one). With a process
    group, the manager creates two gloo groups of its own when constructed (a collective call: construct it on
    every rank), and ``save``, ``async_save``, ``load``, ``steps``, ``latest``, ``wait``, ``cleanup`` and ``close``
    are collective too: call them on every rank, in the same order.

    Args:
        root: the durable tier: a directory or an fsspec URL (``s3://bucket/run``). Step N goes to
            ``root/step-0000000N``.
        keep_last: keep the newest N committed steps (None: no limit).
        keep_every: also keep every step divisible by K (None: none extra).
        local_root: an optional fast tier (node-local disk or ``/dev/shm``, a local path). Saves commit there and
            upload to ``root`` in the background.
        local_keep_last: committed steps the local tier keeps (a local step also stays until it is durable).
        leftover_grace_s: a step that never committed is swept once nothing in it changed for this long.
        process_group: the group ``dcp`` runs on (default: a new gloo group over all ranks).
        storage_options: fsspec options for a URL ``root`` (``key``, ``secret``, ``client_kwargs``...).
        writer_options: keywords for :class:`dcpio.FileSystemWriter` (``thread_count``, ``serialization_format``...).
        reader_options: keywords for :class:`dcpio.FileSystemReader` (``thread_count``, ``verify_checksums``...).
        upload_threads: files each rank uploads at once.
        upload_timeout_s: how long rank 0 waits for every rank's upload of a step before giving up on it.

    Example::

        import tempfile, torch, dcpio
        mgr = dcpio.CheckpointManager(tempfile.mkdtemp(), keep_last=2)
        model = torch.nn.Linear(4, 4)
        for step in range(1, 4):
            mgr.save(step, {"model": model.state_dict()})
        assert mgr.steps() == [2, 3]
        mgr.load({"model": model.state_dict()})  # the newest committed step: 3
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        local_root: str | os.PathLike[str] | None = None,
        local_keep_last: int = 1,
        leftover_grace_s: float = DEFAULT_GRACE_S,
        process_group: Any = None,
        storage_options: dict[str, Any] | None = None,
        writer_options: dict[str, Any] | None = None,
        reader_options: dict[str, Any] | None = None,
        upload_threads: int = 4,
        upload_timeout_s: float = 1800.0,
    ) -> None:
        _check_count("keep_last", keep_last)
        _check_count("keep_every", keep_every)
        _check_count("local_keep_last", local_keep_last)
        _check_count("upload_threads", upload_threads)
        if not leftover_grace_s >= 0:
            raise ValueError(f"leftover_grace_s must be 0 or more seconds, got {leftover_grace_s!r}")
        if local_root is not None and "://" in os.fspath(local_root):
            raise ValueError(f"local_root must be a local directory (node-local disk or /dev/shm), got {local_root!r}")
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.local_keep_last = local_keep_last
        self.leftover_grace_s = float(leftover_grace_s)
        self.durable = Tier(root, name="durable", storage_options=storage_options)
        self.local = Tier(local_root, name="local") if local_root is not None else None
        self._writer_options = dict(writer_options or {})
        self._reader_options = dict(reader_options or {})
        self._comm = _Comm(process_group)
        self._lock = threading.Lock()
        self._inflight: set[int] = set()
        self._async: _AsyncSave | None = None
        self._resume_tried: set[int] = set()
        self._closed = False
        self._uploader = (
            Uploader(self.local, self.durable, threads=upload_threads, timeout_s=upload_timeout_s)
            if self.local is not None
            else None
        )

    # -- queries --------------------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Committed steps, oldest first (either tier), as rank 0 sees them."""
        return self._sync(apply=False).committed()

    def latest(self) -> int | None:
        """The newest committed step, or None when there is none."""
        steps = self.steps()
        return steps[-1] if steps else None

    # -- saving ---------------------------------------------------------------------------------------------
    def save(self, step: int, state_dict: dict[str, Any], *, planner: Any = None) -> None:
        """Save ``state_dict`` as ``step`` and return once it is committed (locally, with two tiers).

        Raises:
            dcpio.CheckpointExistsError: ``step`` is already committed.
            dcpio.CheckpointWriteError: an earlier background upload failed (raised once, on every rank).
        """
        self._check_step(step)
        self._finish_async()
        decision = self._sync(apply=True)
        self._refuse_existing(step, decision)
        writer = self._target().writer(step, **self._writer_options)
        with self._lock:
            self._inflight.add(step)
        try:
            dcp.save(state_dict, storage_writer=writer, planner=planner, **self._dcp_kwargs())
        finally:
            with self._lock:
                self._inflight.discard(step)
        self._committed(step, writer, decision.token)
        self._sync(apply=True)

    def async_save(self, step: int, state_dict: dict[str, Any], *, planner: Any = None) -> Any:
        """Stage ``state_dict`` and save it as ``step`` in the background; returns ``dcp.async_save``'s future.

        A previous async save of this manager is waited for first. Retention never counts a step before its
        commit, so the last durable step survives however long this one takes.
        """
        self._check_step(step)
        self._finish_async()
        decision = self._sync(apply=True)
        self._refuse_existing(step, decision)
        record = _AsyncSave(step, self._target().writer(step, **self._writer_options), decision.token)
        with self._lock:
            self._inflight.add(step)
        try:
            response = dcp.async_save(state_dict, storage_writer=record.writer, planner=planner, **self._dcp_kwargs())
        except BaseException:
            with self._lock:
                self._inflight.discard(step)
            raise
        future = cast("Future[Any]", getattr(response, "upload_completion", response))
        record.future = future
        self._async = record
        future.add_done_callback(lambda f: self._async_done(record, f))
        return response

    def wait(self) -> None:
        """Block until the async save and every upload of this rank are done, then apply retention."""
        self._finish_async()
        if self._uploader is not None:
            self._uploader.wait()
        self._sync(apply=True)

    def cleanup(self) -> None:
        """Apply retention and sweep leftovers now (every save does this too)."""
        self._sync(apply=True)

    def close(self) -> None:
        """``wait()``, then stop the upload thread. Call it (or use ``with``) before the job exits."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            if self._uploader is not None:
                self._uploader.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        elif not self._closed:
            # an error path: no collectives (other ranks may be elsewhere) and no waiting for uploads that may wait
            # on ranks that died; what was not committed on the durable tier is resumed by the next run
            self._closed = True
            if self._uploader is not None:
                self._uploader.close(wait=False)

    # -- loading --------------------------------------------------------------------------------------------
    def load(self, state_dict: dict[str, Any], step: int | None = None, *, planner: Any = None) -> int:
        """Load ``step`` (default: the newest committed one) into ``state_dict`` in place; return the step.

        The local tier is used when every rank finds the step's files there complete; otherwise, or when the local
        load fails its checksums, the durable tier.

        Raises:
            FileNotFoundError: no committed step at all.
            dcpio.IncompleteCheckpointError: ``step`` is not committed (the message lists those that are).
        """
        self._finish_async()
        decision = self._sync(apply=False)
        chosen, use_local = self._choose(decision, step)
        tier = self.local if use_local and self.local is not None else self.durable
        kwargs = self._dcp_kwargs()
        try:
            dcp.load(state_dict, storage_reader=tier.reader(chosen, **self._reader_options), planner=planner, **kwargs)
        except (CheckpointException, CheckpointError) as err:
            if tier is self.durable or not decision.durable.get(chosen):
                raise
            warnings.warn(
                f"{tier.step_path(chosen)}: loading from the local tier failed ({_first_line(err)}); loading step "
                f"{chosen} from {self.durable.step_path(chosen)} instead",
                stacklevel=2,
            )
            reader = self.durable.reader(chosen, **self._reader_options)
            dcp.load(state_dict, storage_reader=reader, planner=planner, **kwargs)
        return chosen

    def _choose(self, decision: _Decision, step: int | None) -> tuple[int, bool]:
        committed = decision.committed()
        if step is not None and step not in committed:
            raise IncompleteCheckpointError(
                f"{self.durable.step_path(step)}: step {step} is not committed in any tier (committed steps: "
                f"{_steps_text(committed)}). Load one of those, or omit step= for the newest."
            )
        if not committed:
            raise FileNotFoundError(
                errno.ENOENT, f"{self.durable.root}: no committed checkpoint to load", self.durable.root
            )
        for candidate in [step] if step is not None else committed[::-1]:
            in_local = self.local is not None and decision.local.get(candidate, False)
            flags = self._comm.all_gather(bool(in_local and self._local_holds(candidate)))
            if in_local and all(flags):
                return candidate, True
            if decision.durable.get(candidate):
                return candidate, False
            missing = [r for r, ok in enumerate(flags) if not ok]
            if step is not None:
                raise IncompleteCheckpointError(
                    f"step {step} is committed only in the local tier {self._local_root()}, and rank(s) {missing} "
                    "do not hold all its files there; it has not reached the durable tier. Load an earlier step."
                )
        raise IncompleteCheckpointError(
            f"{self.durable.root}: no committed step is complete on every rank (committed: {_steps_text(committed)})"
        )

    def _local_holds(self, step: int) -> bool:
        """Whether this rank's view of the local tier has every file the step's metadata names, long enough."""
        if self.local is None:
            return False
        try:
            metadata = self.local.read_metadata(step)
            need: dict[str, int] = {}
            for info in (metadata.storage_data or {}).values():
                name = str(getattr(info, "relative_path", ""))
                need[name] = max(need.get(name, 0), int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0)))
            return all(os.path.getsize(self.local.step_path(step, n)) >= size for n, size in need.items())
        except (CheckpointError, OSError, ValueError):
            return False

    # -- the decision, taken once -------------------------------------------------------------------------
    def _sync(self, *, apply: bool) -> _Decision:
        self._check_open()
        mine = self._uploader.take_errors() if self._uploader is not None else []
        status = _RankStatus(
            self._comm.rank,
            socket.gethostname(),
            os.path.realpath(self.local.root) if self.local is not None else "",
            self._busy(),
            [(s, f"{type(e).__name__}: {_first_line(e)}") for s, e in mine],
        )
        statuses: list[_RankStatus] = self._comm.all_gather(status)
        decision: _Decision | None = None
        error: BaseException | None = None
        if self._comm.rank == 0:
            try:
                decision = self._decide(statuses, apply)
            except Exception as err:  # broadcast, so that no rank waits for a decision that never comes
                error = err
                decision = _Decision(failure=f"{type(err).__name__}: {_first_line(err)}")
        decision = self._comm.broadcast(decision)
        if decision is None or decision.failure is not None:
            raise CheckpointError(
                f"{self.durable.root}: rank 0 could not list the checkpoints "
                f"({decision.failure if decision is not None else 'no answer'}); nothing was "
                "saved or deleted. Check the path, the credentials and the store, then retry."
            ) from error
        problems = [(s.rank, step, msg) for s in statuses for step, msg in s.errors]
        if problems:
            detail = "; ".join(f"rank {r}, step {s}: {m}" for r, s, m in problems[:4])
            raise CheckpointWriteError(
                f"{self.durable.root}: a background upload failed ({detail}). Those steps are not durable; their "
                "local copies are kept and the durable tier's previous step is intact. Fix the cause; the next save "
                "uploads as usual."
            ) from (mine[0][1] if mine else None)
        if apply:
            self._act(decision, statuses)
            for step in decision.resume:
                self._upload(step, self._own_files(step), decision.token)
            self._resume_tried.update(decision.resume)
        return decision

    def _decide(self, statuses: Sequence[_RankStatus], apply: bool) -> _Decision:
        busy = set().union(*(s.busy for s in statuses))
        durable = self.durable.scan()
        decision = _Decision(token=uuid.uuid4().hex[:12])
        decision.durable = {s: self.durable.committed(scan) for s, scan in durable.items()}
        local: dict[int, StepScan] = {}
        if self.local is not None:
            local = self.local.scan()
            decision.local = {s: self.local.committed(scan) for s, scan in local.items()}
        if not apply:
            return decision
        done = [s for s, ok in decision.durable.items() if ok]
        if self.local is not None:
            decision.resume = self._to_resume(decision, busy)
            busy |= set(decision.resume)  # their durable leftovers are about to be written again: not swept
            decision.delete_local = self._local_deletions(decision, local, busy)
        decision.delete_durable = policy.to_delete(done, self.keep_last, self.keep_every)
        decision.delete_durable += policy.leftovers(_never_committed(durable), time.time(), self.leftover_grace_s, busy)
        return decision

    def _to_resume(self, decision: _Decision, busy: set[int]) -> list[int]:
        """Local steps newer than every durable one that no upload is working on: a killed or failed upload.

        Each is resumed once per manager (a decision that was not acted on does not count), so a step that cannot
        be uploaded (a node's files lost) is reported once instead of at every save.
        """
        newest = max((s for s, ok in decision.durable.items() if ok), default=-1)
        steps = [s for s, ok in decision.local.items() if ok and s > newest and s not in busy]
        return sorted(s for s in steps if s not in self._resume_tried)

    def _local_deletions(self, decision: _Decision, local: dict[int, StepScan], busy: set[int]) -> list[int]:
        newest_durable = max((s for s, ok in decision.durable.items() if ok), default=None)

        def uploaded(s: int) -> bool:  # its durable copy is committed, or a newer one is
            return decision.durable.get(s, False) or (newest_durable is not None and s < newest_durable)

        local_done = [s for s, ok in decision.local.items() if ok]
        extra = policy.to_delete(local_done, self.local_keep_last, None)
        out = [s for s in extra if s not in busy and uploaded(s)]
        return out + policy.leftovers(_never_committed(local), time.time(), self.leftover_grace_s, busy)

    def _act(self, decision: _Decision, statuses: Sequence[_RankStatus]) -> None:
        if self._comm.rank == 0:
            for step in decision.delete_durable:
                _delete_quietly(self.durable, step)
        if self.local is not None:
            # one rank per node-local directory deletes there: the lowest rank that sees it
            me = statuses[self._comm.rank]
            leader = min(s.rank for s in statuses if (s.host, s.local_root) == (me.host, me.local_root))
            if leader == self._comm.rank:
                for step in decision.delete_local:
                    _delete_quietly(self.local, step)

    # -- helpers --------------------------------------------------------------------------------------------
    def _target(self) -> Tier:
        return self.local if self.local is not None else self.durable

    def _local_root(self) -> str:
        return self.local.root if self.local is not None else "(none)"

    def _dcp_kwargs(self) -> dict[str, Any]:
        if self._comm.active:
            return {"process_group": self._comm.dcp_group}
        return {"no_dist": True}

    def _busy(self) -> set[int]:
        with self._lock:
            busy = set(self._inflight)
        if self._uploader is not None:
            busy |= self._uploader.pending()
        return busy

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"{self.durable.root}: this CheckpointManager was closed; create a new one")

    @staticmethod
    def _check_step(step: int) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")

    def _refuse_existing(self, step: int, decision: _Decision) -> None:
        for tier, seen in ((self.durable, decision.durable), (self.local, decision.local)):
            if tier is not None and seen.get(step):
                raise CheckpointExistsError(
                    f"{tier.step_path(step)}: step {step} is already committed ({tier.name} tier) and a "
                    "checkpoint is written once. Save under a new step number, or delete it first "
                    "(dcpio prune, or remove the directory)."
                )

    def _committed(self, step: int, writer: StepWriter, token: str) -> None:
        """After a local commit: hand this rank's files (and rank 0's metadata) to the uploader."""
        self._upload(step, writer.written, token)

    def _upload(self, step: int, files: Sequence[str], token: str) -> None:
        if self._uploader is None or self.local is None:
            return
        metadata = None
        if self._comm.rank == 0:
            metadata = self.local.mover.read_file(self.local.step_path(step, METADATA_NAME), 1 << 40)
        job = UploadJob(step, token, self._comm.rank, self._comm.world, tuple(files), metadata)
        self._uploader.submit(job)

    def _own_files(self, step: int) -> list[str]:
        """The data files of a committed local step this rank uploads: those of saving rank i, i % world == rank.

        The job may have restarted with fewer ranks than saved the step; every saving rank's files still go up.
        After a commit the directory holds only the files its metadata names.
        """
        names = self.local.names(step) if self.local is not None else set()
        out = []
        for name in names:
            rank = data_file_rank(name)
            if rank is not None and rank % self._comm.world == self._comm.rank:
                out.append(name)
        return sorted(out)

    def _async_done(self, record: _AsyncSave, future: Future[Any]) -> None:
        try:
            if future.exception() is None:
                self._committed(record.step, record.writer, record.token)
        except BaseException as err:  # raised on the caller's thread by _finish_async
            record.error = err
        finally:
            with self._lock:
                self._inflight.discard(record.step)
            record.done.set()

    def _finish_async(self) -> None:
        record, self._async = self._async, None
        if record is None or record.future is None:
            return
        try:
            record.future.result()
        finally:
            record.done.wait()
        if record.error is not None:
            raise record.error


def _never_committed(scans: dict[int, StepScan]) -> dict[int, float]:
    """Steps without a ``.metadata`` (a save that never committed), with their newest mtime.

    A step whose ``.metadata`` is there but does not parse is not committed either, but it is not swept: it was
    committed once and damaged later, and may still be worth recovering (``dcpio ls`` shows it as damaged).
    """
    return {s: scan.newest_mtime for s, scan in scans.items() if METADATA_NAME not in scan.files}


def _existing_root(tier: Tier) -> None:
    if not tier.is_url and not os.path.isdir(tier.root):
        raise FileNotFoundError(errno.ENOENT, f"{tier.root}: no such directory; check the root's path", tier.root)


def _delete_quietly(tier: Tier, step: int) -> None:
    try:
        tier.delete(step)
    except (OSError, CheckpointError) as err:
        # the step is no longer committed (or never was): what is left costs space and is swept later
        warnings.warn(f"{tier.step_path(step)}: deleting step {step} failed part way: {err}", stacklevel=3)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _steps_text(steps: Sequence[int]) -> str:
    if not steps:
        return "none"
    shown = ", ".join(map(str, steps[-8:]))
    return shown if len(steps) <= 8 else f"... {shown}"


# -- one-shot helpers (the CLI) ------------------------------------------------------------------------------
def list_steps(
    root: str | os.PathLike[str],
    *,
    local_root: str | os.PathLike[str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[StepInfo]:
    """Every step directory under ``root`` (and ``local_root``), committed or not, ordered by step then tier.

    Example::

        for info in dcpio.manager.list_steps("/tmp/dcpio-run"):
            print(info.step, info.tier, info.committed, info.size)
    """
    tiers = [Tier(root, name="durable", storage_options=storage_options)]
    if local_root is not None:
        tiers.insert(0, Tier(local_root, name="local"))
    out: list[StepInfo] = []
    for tier in tiers:
        _existing_root(tier)
        for step, scan in tier.scan().items():
            ok = tier.committed(scan)
            damaged = not ok and METADATA_NAME in scan.files
            info = StepInfo(step, tier.name, ok, scan.size, len(scan.files), scan.newest_mtime, scan.path, damaged)
            out.append(info)
    return sorted(out, key=lambda i: (i.step, i.tier))


@dataclass(frozen=True)
class PruneReport:
    """What :func:`prune` deleted (or, with ``dry_run``, would delete)."""

    root: str
    kept: list[int]
    deleted: list[int]
    swept: list[int]
    dry_run: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prune(
    root: str | os.PathLike[str],
    *,
    keep_last: int | None,
    keep_every: int | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    dry_run: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> PruneReport:
    """Apply a retention rule to ``root`` once: delete committed steps beyond it and old uncommitted ones.

    The newest committed step is always kept; uncommitted steps are swept only when untouched for ``grace_s``
    seconds (a save may still be writing a younger one). Run it where no manager is saving to ``root``, or with a
    grace period longer than a save takes.

    Example::

        report = dcpio.manager.prune("/tmp/dcpio-run", keep_last=2, dry_run=True)
        print("would delete", report.deleted + report.swept)
    """
    _check_count("keep_last", keep_last)
    _check_count("keep_every", keep_every)
    tier = Tier(root, name="durable", storage_options=storage_options)
    _existing_root(tier)
    scans = tier.scan()
    committed = {s: tier.committed(scan) for s, scan in scans.items()}
    done = [s for s, ok in committed.items() if ok]
    deleted = policy.to_delete(done, keep_last, keep_every)
    swept = policy.leftovers(_never_committed(scans), time.time(), grace_s, ())
    if not dry_run:
        for step in deleted + swept:
            tier.delete(step)
    return PruneReport(tier.root, sorted(set(done) - set(deleted)), deleted, swept, dry_run)
