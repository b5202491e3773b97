"""``python -m dcpio ARGS``: the ``dcpio`` command (see :mod:`dcpio.cli.main`)."""

from __future__ import annotations

from dcpio.cli.main import entry

if __name__ == "__main__":
    entry()
