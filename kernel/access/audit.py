"""The audit log: JSON Lines of what the kernel did and refused, newest last.

Lines go to `audit.jsonl` in the state directory as they happen (append-only; at
`AUDIT_FILE_BYTES` the file becomes `audit.jsonl.1` and a new one starts, so two
files bound it) and to a bounded in-RAM tail that `kernel/log` shows; the tail is
read back from the files at start, so the log survives a remount.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import params

log = logging.getLogger(__name__)


class AuditLog:
    def __init__(self, path: Path | None) -> None:
        """`path` None: in RAM only (tests, benchmarks)."""
        self.path = path
        self.tail: collections.deque[str] = collections.deque(maxlen=params.LOG_LINES)
        if path is not None:
            for old in (path.with_name(path.name + ".1"), path):
                try:
                    self.tail.extend(line for line in old.read_text(errors="replace").splitlines() if line)
                except FileNotFoundError:
                    pass

    def write(self, event: str, **fields: Any) -> None:
        line = json.dumps({"ts": round(time.time(), 3), "event": event, **fields})
        self.tail.append(line)
        if self.path is None:
            return
        try:
            if self.path.exists() and self.path.stat().st_size > params.AUDIT_FILE_BYTES:
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode() + b"\n")
            finally:
                os.close(fd)
        except OSError as exc:  # the log must never stop the kernel; say so once per failure
            log.error("could not write the audit log %s: %s", self.path, exc)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.tail))
