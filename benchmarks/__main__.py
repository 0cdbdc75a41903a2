"""``python -m benchmarks``: see ``benchmarks/runner.py`` and BENCHMARKS.md."""

import sys

from .runner import main

sys.exit(main())
