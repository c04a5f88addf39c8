"""`python -m bench.soak ARGS` (what scripts/soak runs)."""

from __future__ import annotations

import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main())
