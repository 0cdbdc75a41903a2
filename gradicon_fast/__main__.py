"""``python -m gradicon_fast COMMAND`` — the same as the ``gradicon-fast`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
