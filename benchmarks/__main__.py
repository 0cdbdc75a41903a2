"""``python -m benchmarks``: see ``benchmarks/runner.py`` and BENCHMARKS.md.

``python -m benchmarks official ...`` runs a published-format network through the official
``icon_registration`` package and through gradicon_fast (``benchmarks/official.py``);
``python -m benchmarks steps ...`` times whole training and instance-optimisation steps of both
(``benchmarks/whole_step.py``).
"""

import sys

if sys.argv[1:2] == ["official"]:
    from .official import main

    sys.exit(main(sys.argv[2:]))
if sys.argv[1:2] == ["steps"]:
    from .whole_step import main

    sys.exit(main(sys.argv[2:]))

from .runner import main

sys.exit(main())
