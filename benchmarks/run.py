"""Start the dcpio benchmark from a source checkout: ``python benchmarks/run.py [--size 1GiB] [--rounds 3] ...``.

``dcpio bench ...`` runs this same script. ``benchmarks/README.md`` explains every case and figure.
"""

from __future__ import annotations

import sys

# Python puts this script's directory first on sys.path, which is where the dcpio_bench package lives
from dcpio_bench.bench import main

if __name__ == "__main__":
    sys.exit(main())
