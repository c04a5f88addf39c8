"""`python -m bench ...` (what scripts/bench runs); `python -m bench --worker` is a peer's worker process."""

from __future__ import annotations

import sys

from .run import main, worker_entry

if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        sys.exit(worker_entry())
    if sys.argv[1:2] == ["host-ceiling"]:
        from .hostceiling import main as host_ceiling

        sys.exit(host_ceiling(sys.argv[2:]))
    if sys.argv[1:2] == ["resume"]:
        from .resume import main as resume

        sys.exit(resume(sys.argv[2:]))
    sys.exit(main())
