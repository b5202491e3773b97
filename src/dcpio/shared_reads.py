"""Replicated bytes read once: each stored byte range several ranks need is read by one of them and broadcast.

Planning runs on the coordinator, in the reader's ``prepare_global_plan``, which sees every rank's load plan. A
*unit* is one box of one stored item (its fqn, chunk offset, and the requested offsets and lengths) or one stored
bytes item. Units asked for by two or more ranks are *shared*: large tensor boxes are first cut along their first
dimension into pieces (so one big replicated tensor is read by several ranks, not one), then every shared unit goes
to the rank that needs it with the fewest bytes assigned so far (largest units first). Small units travel packed,
one transfer per (reader, set of receivers) and bucket. Each rank's plan gets a :class:`SharedReadPlan` with the
transfers it takes part in, in one order all ranks share.

Execution, in the reader's ``read_data``: each rank reads its own items and the shared units it was given (the I/O
engine verifies their checksums there), then all ranks exchange a status (:func:`dcpio.collectives.agree_on_failures`)
so that a failed read (a checksum mismatch, a missing file) raises on every rank instead of leaving the others
waiting, then the transfers run: a broadcast when the whole group needs the unit, point-to-point sends otherwise.
Loads in which no two ranks ask for the same box (sharded loads) get no :class:`SharedReadPlan` and run no
collective at all.

With ``replicated_reads="auto"`` the data is shared where it helps: on object stores (every rank's GET is a download
of its own), and where the ranks run on more than one host (each host's page cache would fetch its own copy from a
network file system). Each rank names its host in its local plan (:class:`RankFacts`), so the coordinator decides
for all at once. On one host with a kernel file system the page cache already turns N ranks' reads of a file into
one read from the device.
"""

from __future__ import annotations

import dataclasses
import io
import math
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem

from dcpio.collectives import GroupInfo, agree_on_failures
from dcpio.errors import PlanMismatchError

__all__ = ["RankFacts", "SharedReadPlan", "Transfer", "Unit", "assign", "rank_facts", "run"]

_SPLIT_BYTES = 64 << 20  # shared boxes are cut into pieces of at least this size: checksum widening stays < 3%
_PACK_BELOW = 1 << 20  # units smaller than this travel packed, one collective for many step counters and biases
_BUCKET_BYTES = 16 << 20  # bytes per packed transfer
_ALIGN = 16  # offsets of units inside a packed transfer, so each can be viewed as its dtype

Key = tuple[Any, ...]


@dataclass(frozen=True)
class Unit:
    """One shared box: what is read once and sent, with the stored dtype and shape the bytes have on the wire."""

    key: Key
    nbytes: int
    dtype: torch.dtype | None  # None for a bytes item
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Transfer:
    """Units read by rank ``src`` and sent to every other rank of ``needers`` (group ranks, ``src`` included)."""

    src: int
    needers: tuple[int, ...]
    units: tuple[Unit, ...]
    packed: bool


@dataclass(frozen=True)
class SharedReadPlan:
    """The coordinator's schedule for one rank, stored in its ``LoadPlan.storage_data``."""

    transfers: tuple[Transfer, ...]


def unit_key(req: ReadItem) -> Key:
    index = req.storage_index
    return (
        req.type.value,
        index.fqn,
        tuple(index.offset or ()),
        tuple(req.storage_offsets),
        tuple(req.lengths),
    )


def _stored_dtype(metadata: Metadata, index: MetadataIndex) -> torch.dtype | None:
    md = metadata.state_dict_metadata.get(index.fqn)
    return md.properties.dtype if isinstance(md, TensorStorageMetadata) else None


def _split(req: ReadItem, dtype: torch.dtype, world: int) -> list[ReadItem]:
    """``req`` cut along dimension 0 into up to ``world`` pieces of at least ``_SPLIT_BYTES``."""
    lengths = list(req.lengths)
    nbytes = math.prod(lengths) * dtype.itemsize
    pieces = min(world, nbytes // _SPLIT_BYTES, lengths[0] if lengths else 1)
    if pieces < 2:
        return [req]
    rows = -(-lengths[0] // pieces)
    out = []
    for start in range(0, lengths[0], rows):
        n = min(rows, lengths[0] - start)
        out.append(
            dataclasses.replace(
                req,
                dest_offsets=torch.Size([req.dest_offsets[0] + start, *req.dest_offsets[1:]]),
                storage_offsets=torch.Size([req.storage_offsets[0] + start, *req.storage_offsets[1:]]),
                lengths=torch.Size([n, *lengths[1:]]),
            )
        )
    return out


def _needers(plans: Sequence[LoadPlan]) -> dict[Key, set[int]]:
    needers: dict[Key, set[int]] = {}
    for rank, plan in enumerate(plans):
        for req in plan.items:
            needers.setdefault(unit_key(req), set()).add(rank)
    return needers


def _unit(req: ReadItem, metadata: Metadata, storage_data: dict[Any, Any]) -> Unit:
    if req.type == LoadItemType.BYTE_IO:
        info = storage_data.get(req.storage_index)
        return Unit(unit_key(req), int(getattr(info, "length", 0) or 0), None, ())
    dtype = _stored_dtype(metadata, req.storage_index)
    if dtype is None:
        raise PlanMismatchError(
            f"'{req.storage_index.fqn}': the load asks for a tensor the checkpoint metadata does not describe as one"
        )
    shape = tuple(int(n) for n in req.lengths)
    return Unit(unit_key(req), math.prod(shape) * dtype.itemsize, dtype, shape)


@dataclass(frozen=True)
class RankFacts:
    """What a rank tells the coordinator in its local plan's ``storage_data``: the host it runs on."""

    host: str


def rank_facts() -> RankFacts:
    return RankFacts(socket.gethostname())


def _without_facts(plans: list[LoadPlan]) -> list[LoadPlan]:
    if not any(isinstance(p.storage_data, RankFacts) for p in plans):
        return plans
    return [dataclasses.replace(p, storage_data=None) if isinstance(p.storage_data, RankFacts) else p for p in plans]


def assign(
    plans: list[LoadPlan],
    metadata: Metadata,
    storage_data: dict[Any, Any],
    world: int,
    *,
    always: bool = True,
) -> list[LoadPlan]:
    """The coordinator's step: plans with each shared unit given to one rank and the transfers scheduled.

    Returns the plans unchanged (less their :class:`RankFacts`) when no two ranks ask for the same box, when the
    plans carry storage data of someone else's, or when ``always`` is False and every rank runs on one host: there
    the kernel's page cache already serves all ranks' reads of a file from one read, and broadcasts only add copies
    (4 ranks, 256 MiB, cold cache on local disk: 1.24x the time of every rank reading).
    """
    hosts = {p.storage_data.host for p in plans if isinstance(p.storage_data, RankFacts)}
    plans = _without_facts(plans)
    if len(plans) != world or len(plans) < 2 or any(p.storage_data is not None for p in plans):
        return plans
    if not always and len(hosts) <= 1:
        return plans
    shared = {k for k, ranks in _needers(plans).items() if len(ranks) > 1}
    if not shared:
        return plans
    new_items: list[list[ReadItem]] = []
    for plan in plans:
        items: list[ReadItem] = []
        for req in plan.items:
            dtype = _stored_dtype(metadata, req.storage_index) if req.type != LoadItemType.BYTE_IO else None
            big = dtype is not None and unit_key(req) in shared and len(req.lengths) > 0
            items.extend(_split(req, dtype, world) if big and dtype is not None else [req])
        new_items.append(items)
    units: dict[Key, Unit] = {}
    needers: dict[Key, set[int]] = {}
    for rank, items in enumerate(new_items):
        for req in items:
            key = unit_key(req)
            needers.setdefault(key, set()).add(rank)
            if key not in units:
                units[key] = _unit(req, metadata, storage_data)
    transfers = _schedule([units[k] for k in units if len(needers[k]) > 1], needers, world)
    return [
        dataclasses.replace(
            plan,
            items=new_items[rank],
            storage_data=SharedReadPlan(tuple(t for t in transfers if rank in t.needers)),
        )
        for rank, plan in enumerate(plans)
    ]


def _schedule(units: list[Unit], needers: dict[Key, set[int]], world: int) -> list[Transfer]:
    """Give each unit to its least-loaded needer (largest first), then group small units into packed transfers."""
    load = [0] * world
    transfers: list[Transfer] = []
    packs: dict[tuple[int, tuple[int, ...]], list[Unit]] = {}
    for unit in sorted(units, key=lambda u: (-u.nbytes, repr(u.key))):
        ranks = sorted(needers[unit.key])
        src = min(ranks, key=lambda r: (load[r], r))
        load[src] += unit.nbytes
        if unit.dtype is not None and unit.nbytes >= _PACK_BELOW:
            transfers.append(Transfer(src, tuple(ranks), (unit,), packed=False))
        else:
            packs.setdefault((src, tuple(ranks)), []).append(unit)
    for (src, group), members in packs.items():
        bucket: list[Unit] = []
        size = 0
        for unit in members:
            if bucket and size + unit.nbytes > _BUCKET_BYTES:
                transfers.append(Transfer(src, group, tuple(bucket), packed=True))
                bucket, size = [], 0
            bucket.append(unit)
            size += unit.nbytes
        transfers.append(Transfer(src, group, tuple(bucket), packed=True))
    return transfers


class _Capture:
    """The planner the I/O engine sees on a rank that reads shared units: it keeps what those units read.

    Tensor units are committed to the real planner only after they were sent (the tensor is the send buffer);
    bytes units are delivered at once and their bytes kept for the transfer.
    """

    def __init__(self, planner: LoadPlanner, send_keys: set[Key]) -> None:
        self.planner = planner
        self.send_keys = send_keys
        self.tensors: dict[Key, torch.Tensor] = {}
        self.blobs: dict[Key, bytes] = {}
        self.deferred: list[tuple[ReadItem, torch.Tensor]] = []

    def resolve_tensor(self, req: ReadItem) -> torch.Tensor:
        return self.planner.resolve_tensor(req)

    def commit_tensor(self, req: ReadItem, tensor: torch.Tensor) -> None:
        key = unit_key(req)
        if key in self.send_keys:
            self.tensors.setdefault(key, tensor)
            self.deferred.append((req, tensor))
        else:
            self.planner.commit_tensor(req, tensor)

    def load_bytes(self, req: ReadItem, value: io.BytesIO) -> None:
        key = unit_key(req)
        if key in self.send_keys:
            self.blobs.setdefault(key, value.getvalue())
        self.planner.load_bytes(req, value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.planner, name)


def run(
    shared: SharedReadPlan,
    info: GroupInfo,
    items: Sequence[ReadItem],
    planner: LoadPlanner,
    read: Callable[[Sequence[ReadItem], Any], None],
    check_bytes: Callable[[ReadItem, bytes], None],
) -> None:
    """Read this rank's share, agree on failures with every rank, then move the shared units.

    Args:
        shared: this rank's schedule from :func:`assign`.
        info: the load's group.
        items: this rank's read items.
        planner: torch's load planner.
        read: the I/O engine on a list of items and a planner.
        check_bytes: the reader's safety check of a bytes value, run on the receiving rank too.
    """
    receive = {u.key for t in shared.transfers if t.src != info.rank for u in t.units}
    send = {u.key for t in shared.transfers if t.src == info.rank for u in t.units}
    capture = _Capture(planner, send)
    failure: BaseException | None = None
    try:
        read([req for req in items if unit_key(req) not in receive], capture)
    except Exception as err:  # every rank learns of it below, then raises
        failure = err
    agree_on_failures(info, failure)
    wanted: dict[Key, list[ReadItem]] = {}
    for req in items:
        if unit_key(req) in receive:
            wanted.setdefault(unit_key(req), []).append(req)
    for transfer in shared.transfers:
        if transfer.packed:
            _move_packed(transfer, info, capture, wanted, check_bytes)
        else:
            _move_one(transfer, info, capture, wanted)
    for req, tensor in capture.deferred:
        planner.commit_tensor(req, tensor)


def _send_recv(tensor: torch.Tensor, transfer: Transfer, info: GroupInfo) -> None:
    import torch.distributed as dist

    if len(transfer.needers) == info.world:
        dist.broadcast(tensor, group=info.group, group_src=transfer.src)
    elif info.rank == transfer.src:
        for dst in transfer.needers:
            if dst != transfer.src:
                dist.send(tensor, group=info.group, group_dst=dst)
    else:
        dist.recv(tensor, group=info.group, group_src=transfer.src)


def _flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def _direct(target: torch.Tensor, unit: Unit, device: torch.device) -> bool:
    """Whether ``target`` can be the wire buffer itself (no copy in or out)."""
    return (
        target.dtype == unit.dtype
        and tuple(target.shape) == unit.shape
        and target.device == device
        and target.is_contiguous()
        and target.layout == torch.strided
    )


def _wire_of(tensor: torch.Tensor, unit: Unit, device: torch.device) -> torch.Tensor:
    if _direct(tensor, unit, device):
        return tensor
    assert unit.dtype is not None
    out = torch.empty(unit.shape, dtype=unit.dtype, device=device)
    out.copy_(tensor)
    return out


def _move_one(transfer: Transfer, info: GroupInfo, capture: _Capture, wanted: dict[Key, list[ReadItem]]) -> None:
    (unit,) = transfer.units
    assert unit.dtype is not None
    if info.rank == transfer.src:
        source = capture.tensors[unit.key]
        _send_recv(_flat_bytes(_wire_of(source, unit, info.device(source.device))), transfer, info)
        return
    reqs = wanted[unit.key]
    targets = [capture.planner.resolve_tensor(req).detach() for req in reqs]
    device = info.device(targets[0].device)
    wire = targets[0] if _direct(targets[0], unit, device) else torch.empty(unit.shape, dtype=unit.dtype, device=device)
    _send_recv(_flat_bytes(wire), transfer, info)
    for req, target in zip(reqs, targets):
        if target is not wire:
            target.copy_(wire)
        capture.planner.commit_tensor(req, target)


def _bytes_tensor(data: bytes) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _aligned(lengths: Sequence[int]) -> list[int]:
    offsets, pos = [], 0
    for n in lengths:
        offsets.append(pos)
        pos += -(-n // _ALIGN) * _ALIGN
    return [*offsets, pos]


def _move_packed(
    transfer: Transfer,
    info: GroupInfo,
    capture: _Capture,
    wanted: dict[Key, list[ReadItem]],
    check_bytes: Callable[[ReadItem, bytes], None],
) -> None:
    device = info.device()
    sending = info.rank == transfer.src
    header = torch.zeros(len(transfer.units), dtype=torch.int64, device=device)
    pieces: list[torch.Tensor] = []
    if sending:
        for unit in transfer.units:
            if unit.dtype is None:
                pieces.append(_bytes_tensor(capture.blobs[unit.key]))
            else:
                pieces.append(_flat_bytes(_wire_of(capture.tensors[unit.key], unit, torch.device("cpu"))))
        header.copy_(torch.tensor([p.numel() for p in pieces], dtype=torch.int64))
    _send_recv(header, transfer, info)
    offsets = _aligned([int(n) for n in header.tolist()])
    payload = torch.zeros(offsets[-1], dtype=torch.uint8, device=device)
    if sending:
        for piece, at in zip(pieces, offsets):
            payload.narrow(0, at, piece.numel()).copy_(piece)
    if payload.numel():  # only empty tensors: nothing more to move (the header said so on every rank)
        _send_recv(payload, transfer, info)
    if sending:
        return
    host = payload.cpu()
    for i, unit in enumerate(transfer.units):
        raw = host.narrow(0, offsets[i], int(header[i]))
        for req in wanted.get(unit.key, []):
            if unit.dtype is None:
                data = raw.numpy().tobytes()
                check_bytes(req, data)
                capture.planner.load_bytes(req, io.BytesIO(data))
            else:
                target = capture.planner.resolve_tensor(req).detach()
                target.copy_(raw.view(unit.dtype).view(unit.shape) if raw.numel() else target.new_empty(unit.shape))
                capture.planner.commit_tensor(req, target)
