"""What to keep and what to delete: pure functions of the steps a tier holds (no I/O).

The manager calls these on one rank and broadcasts the answer, so every rank acts on the same decision. Only
committed steps count towards retention, so a save still in flight can never push a durable step out: the newest
committed step is always kept, whatever the rule says.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

__all__ = ["leftovers", "retained", "to_delete"]


def retained(committed: Iterable[int], keep_last: int | None, keep_every: int | None) -> set[int]:
    """The committed steps a retention rule keeps.

    Args:
        committed: steps whose commit is durable.
        keep_last: keep the newest N (None: no count limit).
        keep_every: also keep every step divisible by K (None: none extra).

    Returns:
        The kept steps: with neither rule, all of them; otherwise the union of both rules and the newest step.

    Example::

        >>> sorted(retained([100, 200, 300, 400], keep_last=2, keep_every=200))
        [200, 300, 400]
    """
    steps = sorted(set(committed))
    if not steps:
        return set()
    if keep_last is None and keep_every is None:
        return set(steps)
    keep = {steps[-1]}
    if keep_last is not None:
        keep.update(steps[-keep_last:] if keep_last > 0 else ())
    if keep_every is not None:
        keep.update(s for s in steps if s % keep_every == 0)
    return keep


def to_delete(committed: Iterable[int], keep_last: int | None, keep_every: int | None) -> list[int]:
    """The committed steps the rule lets go, oldest first (never the newest one)."""
    steps = set(committed)
    return sorted(steps - retained(steps, keep_last, keep_every))


def leftovers(uncommitted: Mapping[int, float], now: float, grace_s: float, busy: Collection[int]) -> list[int]:
    """Steps that never committed and may be swept.

    Args:
        uncommitted: step -> newest modification time (seconds since the epoch) of anything in its directory.
        now: the current time, on the same clock.
        grace_s: a step written to within this many seconds may still be in a save's hands: it stays.
        busy: steps a save or an upload of this job is working on: they stay whatever their age.
    """
    return sorted(s for s, mtime in uncommitted.items() if s not in busy and now - mtime >= grace_s)
