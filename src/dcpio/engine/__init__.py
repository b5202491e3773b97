"""The I/O engine: one way to read and one way to write the bytes of every item of a save or a load.

* :mod:`~dcpio.engine.requests`: typed byte requests and a mover's declared capabilities.
* :mod:`~dcpio.engine.planner`: pure functions that turn what is stored and what is wanted into I/O operations.
* :mod:`~dcpio.engine.executor` and :mod:`~dcpio.engine.sources`: run those operations on a file or on bytes
  already in memory, verifying what they read, and count what they did (:class:`IOStats`).
* :mod:`~dcpio.engine.load` and :mod:`~dcpio.engine.save`: a DCP load plan or a save's data files, end to end.

Formats (:mod:`dcpio.formats`) say where a stored item's bytes are; movers (:mod:`dcpio.movers`) move them. The
engine knows neither a format nor a backend beyond their declared capabilities.
"""

from __future__ import annotations

from dcpio.engine.load import ReadOptions, read_plan
from dcpio.engine.save import FileJob, WriteOptions, write_files
from dcpio.engine.sources import IOStats

__all__ = ["FileJob", "IOStats", "ReadOptions", "WriteOptions", "read_plan", "write_files"]
