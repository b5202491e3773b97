"""What a mover declares about reading its files; the I/O planner chooses its operations from these alone.

A mover's read handle answers :meth:`dcpio.movers.base.ReadHandle.capabilities`. Local files (and any handle that
does not say otherwise) get :func:`local_capabilities`; object stores, where a request costs milliseconds whatever its
size, get :func:`object_store_capabilities`. The planner never asks which backend it is reading from.
"""

from __future__ import annotations

from dataclasses import dataclass

from dcpio import knobs

__all__ = ["MAX_IO", "UNBOUNDED", "Capabilities", "local_capabilities", "object_store_capabilities"]

MAX_IO = 1 << 30  # below the most one system call moves on Linux
UNBOUNDED = 1 << 62


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a mover declares about reading one file; the planner chooses operations from these alone.

    Attributes:
        max_span: most bytes one read request may cover.
        verify_step: bytes read and hashed per request when verifying, so each slice is hashed while in cache
            (``max_span`` where one large request is cheaper than several, as on object stores).
        coalesce_gap: neighbouring whole items this close are fetched with one request.
        coalesce_span: most bytes one coalesced fetch of whole items may cover.
        whole_item_limit: items up to this size are fetched whole and served from memory.
        can_map: the file can be viewed in memory (a memory map), so strided boxes are copied out without scratch.
        request_bound: each request costs far more than its bytes (object stores): the planner prefers one request
            for a record's head, data and tail over two.
    """

    max_span: int
    verify_step: int
    coalesce_gap: int
    coalesce_span: int
    whole_item_limit: int
    can_map: bool
    request_bound: bool


def local_capabilities(can_map: bool) -> Capabilities:
    """A kernel file system: bounded system calls, verification in cache-sized steps, memory maps where offered."""
    return Capabilities(
        MAX_IO,
        knobs.verify_read_bytes(),
        knobs.coalesce_gap_bytes(),
        knobs.coalesce_span_bytes(),
        knobs.whole_item_bytes(),
        can_map,
        request_bound=False,
    )


def object_store_capabilities() -> Capabilities:
    """An object store: one request per record (head, data and tail together) and per part of neighbours."""
    part = knobs.s3_part_size()
    return Capabilities(UNBOUNDED, UNBOUNDED, knobs.coalesce_gap_bytes(), part, part // 4, False, request_bound=True)
