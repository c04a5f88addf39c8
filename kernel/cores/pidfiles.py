"""The engines' pid files, and what /proc says of a process.

A daemon that dies (kill -9, the OOM killer) leaves its engine process behind, and a
stopped engine never reads the EOF that would end it. So each engine's pid is kept in
STATE/engines/NAME.pid, and the next daemon ends the engines recorded there that still
run (`end_leftover_engines`) before it starts its own.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)


def record_pid(pid_file: Path, pid: int) -> None:
    """Keep `pid` in `pid_file` (replaced whole: a reader never sees half of it)."""
    try:
        temporary = pid_file.with_suffix(".tmp")
        temporary.write_text(f"{pid}\n")
        temporary.replace(pid_file)
    except OSError as exc:
        log.warning("cannot record the engine's pid in %s: %s", pid_file, exc)


def end_leftover_engines(directory: Path) -> list[int]:
    """Kill the engines recorded in `directory` (`*.pid`) that still run: a daemon that
    died left them (a stopped engine never sees its daemon go). Returns their pids."""
    ended = []
    for record in directory.glob("*.pid"):
        try:
            pid = int(record.read_text())
            if b"kernel.cores.enginehost" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
                ended.append(pid)
        except (OSError, ValueError):
            pass
        record.unlink(missing_ok=True)
    return ended


def stopped(pid: int, traced: bool = True) -> bool:
    """Is the process stopped by a signal (or, with `traced`, by a debugger)? It would
    never read a request to stop."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] in (("T", "t") if traced else ("T",))
