"""``python -m benchmarks``: see ``benchmarks/runner.py`` and BENCHMARKS.md.

``python -m benchmarks official ...`` runs a published-format network through the official
``icon_registration`` package and through gradicon_fast (``benchmarks/official.py``).
"""

import sys

if sys.argv[1:2] == ["official"]:
    from .official import main

    sys.exit(main(sys.argv[2:]))

from .runner import main

sys.exit(main())
