"""``python -m dcpio_bench`` (with ``benchmarks/`` on ``sys.path``)."""

from __future__ import annotations

import sys

from dcpio_bench.bench import main

if __name__ == "__main__":
    sys.exit(main())
