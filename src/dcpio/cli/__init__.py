"""The ``dcpio`` command line: ``dcpio COMMAND`` (console script) or ``python -m dcpio.cli.main COMMAND``.

The entry points live in :mod:`dcpio.cli.main` (``main(argv) -> int`` and ``entry()``); this package does not import
it, so ``python -m dcpio.cli.main`` runs the module once, cleanly.
"""

from __future__ import annotations

__all__: list[str] = []
