"""The dcpio benchmark: dcpio against stock torch DCP and raw I/O, side by side in one run.

It lives outside the ``dcpio`` package (the library never imports it). Start it from a source checkout with
``python benchmarks/run.py`` or ``dcpio bench``; ``benchmarks/README.md`` explains every case and figure.
"""

from __future__ import annotations

__all__: list[str] = []
