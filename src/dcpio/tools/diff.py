"""``dcpio diff``: compare two checkpoints entry by entry, holding one tensor of each side at a time.

The two sides may be of different kinds (a DCP checkpoint against the Hugging Face folder converted from it,
or a ``torch.save`` file). Tensors are compared bit for bit first; when their bits differ the maximum
absolute difference is computed in float64 (complex: of the modulus of the difference). Non-tensor values are
compared after decoding them with ``weights_only=True``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dcpio.errors import CheckpointError
from dcpio.tools._sources import DcpSource, ProgressFn, Source, decode_object, dtype_name, open_source

__all__ = ["DiffEntry", "DiffReport", "diff_checkpoints", "tensors_bit_equal"]


@dataclass
class DiffEntry:
    """How one entry compares.

    Attributes:
        name: the entry.
        status: ``"equal"`` (bit for bit), ``"close"`` (within ``atol``), ``"different"``, ``"only-a"``,
            ``"only-b"``, ``"dtype"`` (dtypes differ), ``"shape"`` (shapes differ), ``"unreadable"``.
        max_abs_diff: for tensors whose bits differ (``None`` otherwise; ``nan`` if a NaN is involved).
        detail: a human sentence.
    """

    name: str
    status: str
    max_abs_diff: float | None = None
    detail: str = ""


@dataclass
class DiffReport:
    """What :func:`diff_checkpoints` found. ``match`` is True when every entry is ``equal`` (or ``close``)."""

    a: str
    b: str
    atol: float = 0.0
    entries: list[DiffEntry] = field(default_factory=list)

    @property
    def match(self) -> bool:
        return all(e.status in ("equal", "close") for e in self.entries)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.status] = out.get(e.status, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["match"] = self.match
        for e in d["entries"]:
            if isinstance(e["max_abs_diff"], float) and not math.isfinite(e["max_abs_diff"]):
                e["max_abs_diff"] = str(e["max_abs_diff"])
        return d


def tensors_bit_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaNs with equal bits are equal; ``-0.0`` and ``0.0`` are not)."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if x.numel() == 0:
        return True
    xb = x.detach().contiguous().reshape(-1).view(torch.uint8)
    yb = y.detach().contiguous().reshape(-1).view(torch.uint8)
    return bool(torch.equal(xb, yb))


def _max_abs_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    if x.dtype.is_complex:
        return float((x.to(torch.complex128) - y.to(torch.complex128)).abs().max())
    if x.dtype == torch.bool:
        return float((x != y).any())
    return float((x.to(torch.float64) - y.to(torch.float64)).abs().max())


def _compare_tensors(name: str, x: torch.Tensor, y: torch.Tensor, atol: float) -> DiffEntry:
    if x.dtype != y.dtype:
        return DiffEntry(name, "dtype", None, f"dtype {dtype_name(x.dtype)} vs {dtype_name(y.dtype)}")
    if x.shape != y.shape:
        return DiffEntry(name, "shape", None, f"shape {list(x.shape)} vs {list(y.shape)}")
    if tensors_bit_equal(x, y):
        return DiffEntry(name, "equal", None, "bit for bit")
    m = _max_abs_diff(x, y)
    if atol > 0 and m <= atol:
        return DiffEntry(name, "close", m, f"max abs diff {m:.6g} <= atol {atol:g}")
    return DiffEntry(name, "different", m, f"max abs diff {m:.6g}")


def _objects_equal(x: Any, y: Any) -> bool:
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        return tensors_bit_equal(x, y)
    if type(x) is not type(y):
        return False
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_objects_equal(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_objects_equal(a, b) for a, b in zip(x, y))
    try:
        return bool(x == y)
    except Exception:  # objects whose == raises or is ambiguous are not equal for our purposes
        return False


@dataclass(frozen=True)
class _Opaque:
    """A DCP object entry that ``weights_only=True`` refuses to decode (a custom class): compared by its bytes."""

    blob: bytes


def _load(src: Source, name: str, kind: str) -> tuple[Any, str | None]:
    try:
        if kind == "object" and isinstance(src, DcpSource):
            blob = src.load_blob(name)
            try:
                return decode_object(blob, f"{src.path}:{name}"), None
            except CheckpointError:
                # torch.save of the same value gives the same bytes, so equal bytes mean equal values
                return _Opaque(blob), None
        return src.load(name), None
    except CheckpointError as err:
        return None, str(err).splitlines()[0]


def diff_checkpoints(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    atol: float = 0.0,
    progress: ProgressFn | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> DiffReport:
    """Compare checkpoint ``a`` with checkpoint ``b``, entry by entry.

    Args:
        a: any checkpoint ``dcpio`` reads (DCP directory or URL, HF folder, torch.save file).
        b: likewise; it may be of another kind than ``a``.
        atol: tensors whose maximum absolute difference is at most this count as matching (``close``);
            0 (the default) asks for bit-for-bit equality.
        progress: optional ``progress(description, entries_done, entries_total)`` callback.
        storage_options: fsspec options for whichever side is a URL.

    Returns:
        A :class:`DiffReport`; ``report.match`` tells whether they hold the same values.
    """
    src_a = open_source(a, storage_options)
    src_b = open_source(b, storage_options)
    try:
        ea = {e.name: e for e in src_a.entries()}
        eb = {e.name: e for e in src_b.entries()}
        names = list(ea) + [n for n in eb if n not in ea]
        report = DiffReport(a=str(a), b=str(b), atol=atol)
        for i, name in enumerate(names):
            if name not in eb:
                report.entries.append(DiffEntry(name, "only-a", None, f"only in {a}"))
            elif name not in ea:
                report.entries.append(DiffEntry(name, "only-b", None, f"only in {b}"))
            else:
                x, err_a = _load(src_a, name, ea[name].kind)
                y, err_b = _load(src_b, name, eb[name].kind)
                if err_a or err_b:
                    report.entries.append(
                        DiffEntry(name, "unreadable", None, "; ".join(e for e in (err_a, err_b) if e))
                    )
                elif isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
                    report.entries.append(_compare_tensors(name, x, y, atol))
                elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
                    report.entries.append(DiffEntry(name, "different", None, "a tensor on one side only"))
                elif isinstance(x, _Opaque) or isinstance(y, _Opaque):
                    same = isinstance(x, _Opaque) and isinstance(y, _Opaque) and x.blob == y.blob
                    report.entries.append(
                        DiffEntry(
                            name,
                            "equal" if same else "different",
                            None,
                            "same stored bytes (a custom object, not decoded)"
                            if same
                            else "a custom object that cannot be decoded safely; stored bytes differ",
                        )
                    )
                elif _objects_equal(x, y):
                    report.entries.append(DiffEntry(name, "equal", None, "equal value"))
                else:
                    report.entries.append(DiffEntry(name, "different", None, f"{x!r:.60} vs {y!r:.60}"))
                del x, y
            if progress is not None:
                progress("diff", i + 1, len(names))
        return report
    finally:
        src_a.close()
        src_b.close()
