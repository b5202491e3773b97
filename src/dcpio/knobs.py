"""Every tunable of dcpio in one place, each with an environment override.

Defaults come from measurements on the project's reference machine (2 cores, 24 GiB, virtio disk); see the README's
benchmark table. Read a knob through its function so that an environment change made after import still counts.
"""

from __future__ import annotations

import os

__all__ = [
    "checksum_block_size",
    "coalesce_gap_bytes",
    "coalesce_span_bytes",
    "default_io_threads",
    "max_bytes_in_flight",
    "max_metadata_bytes",
    "max_record_header_bytes",
    "min_bytes_per_file",
    "pause_gc",
    "replicated_reads",
    "retry_attempts",
    "retry_max_seconds",
    "s3_part_size",
    "staging_budget",
    "tile_checksums",
    "verify_read_bytes",
    "whole_item_bytes",
    "write_slice_bytes",
]


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError as err:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer; unset it or give a number") from err
    if value <= 0:
        raise ValueError(f"environment variable {name}={raw!r} must be positive")
    return value


def default_io_threads() -> int:
    """Threads used when ``thread_count`` is left unset (``DCPIO_IO_THREADS``).

    Measured here: two threads saturate both a tmpfs and the virtio disk, since pwrite/pread and the checksum
    release the GIL; more threads add contention on a 2-core machine. On bigger machines we cap at 8.
    """
    cores = os.cpu_count() or 2
    return _int_env("DCPIO_IO_THREADS", max(2, min(8, cores)))


def min_bytes_per_file() -> int:
    """With ``thread_count`` unset, a rank writes one more data file per this many bytes, up to the thread count
    (``DCPIO_MIN_BYTES_PER_FILE``): each file costs a create and an fsync, which small saves cannot amortise."""
    return _int_env("DCPIO_MIN_BYTES_PER_FILE", 128 << 20)


def checksum_block_size() -> int:
    """Bytes covered by one checksum (``DCPIO_CHECKSUM_BLOCK``); a partial read verifies whole blocks.

    1 MiB keeps a resharding read within a few percent of the bytes it needs and costs 8 bytes of metadata a MiB.
    """
    return _int_env("DCPIO_CHECKSUM_BLOCK", 1 << 20)


def _bool_env(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip()
    if raw == "":
        return default
    if raw not in ("0", "1"):
        raise ValueError(f"environment variable {name}={raw!r} must be 0 or 1")
    return raw == "1"


def tile_checksums() -> bool:
    """Also checksum column segments of matrices (``DCPIO_TILE_CHECKSUMS``, default 1; 0 turns it off).

    Lets a resharding load that reads part of each row (``Shard(0)`` saved, ``Shard(1)`` loaded) verify only the
    bytes it reads; costs a gather of each matrix at save time, done slice by slice while it is in cache (a 1 GiB
    tmpfs save measured here, in one process: 1.18 of raw I/O with tiles, 1.46 without).
    """
    return _bool_env("DCPIO_TILE_CHECKSUMS", True)


def pause_gc() -> bool:
    """Pause Python's cyclic collector across torch's planning, from the storage layer's ``prepare_local_plan`` to
    the end of its ``read_data`` / ``write_data`` (``DCPIO_PAUSE_GC``, default 1; 0 turns it off). See
    :class:`dcpio._runtime.GcPause`."""
    return _bool_env("DCPIO_PAUSE_GC", True)


def max_bytes_in_flight() -> int:
    """Upper bound of bytes staged in memory by the I/O engine at once (``DCPIO_MAX_INFLIGHT``)."""
    return _int_env("DCPIO_MAX_INFLIGHT", 256 << 20)


def max_metadata_bytes() -> int:
    """Largest ``.metadata`` file dcpio agrees to parse (``DCPIO_MAX_METADATA_BYTES``)."""
    return _int_env("DCPIO_MAX_METADATA_BYTES", 1 << 30)


def max_record_header_bytes() -> int:
    """Largest per-item header (zip records, pickle, safetensors JSON) dcpio parses (``DCPIO_MAX_HEADER_BYTES``)."""
    return _int_env("DCPIO_MAX_HEADER_BYTES", 100 << 20)


def s3_part_size() -> int:
    """Bytes per ranged GET / multipart chunk on object stores (``DCPIO_S3_PART_SIZE``)."""
    return _int_env("DCPIO_S3_PART_SIZE", 16 << 20)


def retry_attempts() -> int:
    """Attempts for one remote request before a transient failure is final (``DCPIO_RETRY_ATTEMPTS``)."""
    return _int_env("DCPIO_RETRY_ATTEMPTS", 6)


def retry_max_seconds() -> int:
    """Total seconds one remote request may spend in retries (``DCPIO_RETRY_MAX_SECONDS``)."""
    return _int_env("DCPIO_RETRY_MAX_SECONDS", 60)


# ------------------------------------------------------------------------------------------ the read planner
def verify_read_bytes() -> int:
    """Local files: bytes read per request while verifying (``DCPIO_VERIFY_READ_BYTES``): a few checksum blocks,
    hashed while still in the CPU cache instead of streamed from memory a second time."""
    return _int_env("DCPIO_VERIFY_READ_BYTES", 4 << 20)


def whole_item_bytes() -> int:
    """Local files: items up to this size are fetched whole and parsed in memory (``DCPIO_WHOLE_ITEM_BYTES``);
    below it, the system calls and tensor operations per item cost more than its bytes."""
    return _int_env("DCPIO_WHOLE_ITEM_BYTES", 256 << 10)


def coalesce_gap_bytes() -> int:
    """Neighbouring small items this close share one request (``DCPIO_COALESCE_GAP``)."""
    return _int_env("DCPIO_COALESCE_GAP", 64 << 10)


def coalesce_span_bytes() -> int:
    """Local files: most bytes one shared request of small items covers (``DCPIO_COALESCE_SPAN``): cache-sized."""
    return _int_env("DCPIO_COALESCE_SPAN", 1 << 20)


def write_slice_bytes() -> int:
    """Bytes of a record hashed and then written per step (``DCPIO_WRITE_SLICE``): cache-resident between the two."""
    return _int_env("DCPIO_WRITE_SLICE", 2 << 20)


# ------------------------------------------------------------------------------------------ many ranks
def replicated_reads() -> bool:
    """Read each stored byte range that several ranks of a load need on one rank and broadcast it
    (``DCPIO_REPLICATED_READS``, default 1; 0 turns it off). Applies where a reader's ``replicated_reads`` is
    ``"auto"`` (which shares the data itself only on object stores or across hosts); loads in which no two ranks
    need the same bytes never pay for it. See :mod:`dcpio.shared_reads`."""
    return _bool_env("DCPIO_REPLICATED_READS", True)


def staging_budget() -> int | None:
    """Bytes of host memory an async save may hold for its CPU copy (``DCPIO_STAGING_BUDGET``; unset: no bound).

    Applies where a writer's ``staging_budget`` is left at None. A state dict larger than the budget is staged and
    written in waves; see :mod:`dcpio.staging`.
    """
    raw = os.environ.get("DCPIO_STAGING_BUDGET", "").strip()
    return None if raw == "" else _int_env("DCPIO_STAGING_BUDGET", 1)
