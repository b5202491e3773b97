"""Small runtime helpers shared by the I/O engine and the metadata parser."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["gc_paused"]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for a burst of allocations that creates no reference cycles.

    Measured here: unpickling a 380-item ``.metadata`` takes 9 ms, but 176 ms when its allocations trigger a full
    collection over the ~250k objects a torch process tracks; an I/O plan's memoryviews and futures do the same.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
