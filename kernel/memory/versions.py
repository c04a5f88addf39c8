"""Versions of the files in `memory/`: when a file's last handle is released (or
at `fsync`), its committed content, if it changed, becomes a new numbered,
compressed version; `rollback` makes an old version current again, as a new one.
`VersionsMixin` is one of `MemoryStore`'s bases.
"""

from __future__ import annotations

import datetime as dt
import errno
import threading
import time
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from .. import params
from ..errors import KernelError
from ..text import decimal
from .data import Attr, Dirty


@dataclass(frozen=True)
class Version:
    ino: int
    path: str
    n: int
    size: int
    committed: float


class VersionsMixin:
    """The versions part of `MemoryStore`."""

    # state, made by MemoryStore.__init__
    db: sqlite_utils.Database
    stats: dict[str, int]
    _lock: threading.RLock
    _dirty: dict[int, Dirty]
    _unversioned: set[int]
    # methods of MemoryStore and the other mixins
    _tx: Callable[[], AbstractContextManager[None]]
    _q: Callable[..., list[Any]]
    _row: Callable[[int], Attr]
    _walk: Callable[[int, str], int]
    _path: Callable[[int], str]
    _content: Callable[[int], bytes]
    _charge: Callable[[int, int], None]
    _truncate: Callable[[Attr, int], None]
    write: Callable[[int, int, bytes], int]
    _commit: Callable[[int], None]

    def _version(self, ino: int) -> None:
        """Keep the committed content as a new version if it changed since the last one."""
        if ino not in self._unversioned:
            return
        self._unversioned.discard(ino)
        attr = self._row(ino)
        if not attr.is_reg or attr.size > params.MEMORY_VERSION_MAX_BYTES:
            return
        data = self._content(ino)
        last = self._q("SELECT n, data FROM versions WHERE ino = ? ORDER BY n DESC LIMIT 1", [ino])
        if last and zlib.decompress(last[0][1]) == data:
            return
        n = int(last[0][0]) + 1 if last else 1
        self.db.execute(
            "INSERT INTO versions(ino, n, size, committed, data) VALUES (?, ?, ?, ?, ?)", [ino, n, len(data), time.time(), zlib.compress(data)]
        )
        self.db.execute("DELETE FROM versions WHERE ino = ? AND n <= ?", [ino, n - params.MEMORY_VERSIONS])
        self.stats["versions"] += 1

    def versions(self, agent_id: int) -> list[Version]:
        with self._lock:
            rows = self._q(
                "SELECT v.ino, v.n, v.size, v.committed FROM versions v JOIN inodes i ON i.ino = v.ino WHERE i.agent_id = ? ORDER BY v.ino, v.n",
                [agent_id],
            )
            return [Version(ino, self._path(ino), n, size, committed) for ino, n, size, committed in rows]

    def rollback(self, agent_id: int, path: str, which: str) -> int:
        """Make a version current again (as a new version); returns the version restored.
        `which`: a version number, `@` + an ISO-8601 time (the newest version at or
        before it), or "" for the one before the current content."""
        with self._tx():
            ino = self._walk(agent_id, path)
            attr = self._row(ino)
            if not attr.is_reg:
                raise KernelError(errno.EINVAL, f"{path}: not a regular file")
            if ino in self._dirty:
                raise KernelError(errno.EBUSY, f"{path} has unsaved writes: close it first")
            self._version(ino)
            rows = self._q("SELECT n, committed, data FROM versions WHERE ino = ? ORDER BY n", [ino])
            n, data = self._pick_version(path, rows, which)
            self._charge(agent_id, len(data) - attr.size)  # before anything changes
            self._truncate(attr, 0)
            self.write(ino, 0, data)
            self._commit(ino)
            self._version(ino)
            self.stats["rollbacks"] += 1
            return n

    @staticmethod
    def _pick_version(path: str, rows: list[Any], which: str) -> tuple[int, bytes]:
        if not rows:
            raise KernelError(errno.ENOENT, f"{path} has no versions")
        if which == "":
            if len(rows) < 2:
                raise KernelError(errno.ENOENT, f"{path} has no version before the current one")
            n, _, data = rows[-2]
        elif which.startswith("@"):
            try:
                when = dt.datetime.fromisoformat(which[1:])
            except ValueError:
                raise KernelError(errno.EINVAL, f"rollback: {which[1:]!r} is not an ISO-8601 time (e.g. 2026-11-25T16:00)") from None
            stamp = when.timestamp() if when.tzinfo else when.astimezone().timestamp()
            older = [r for r in rows if r[1] <= stamp]
            if not older:
                raise KernelError(errno.ENOENT, f"{path} has no version from {which[1:]} or before")
            n, _, data = older[-1]
        else:
            number = decimal(which)
            if number is None:
                raise KernelError(errno.EINVAL, f"rollback: {which!r} is not a version number")
            found = [r for r in rows if r[0] == number]
            if not found:
                kept = ", ".join(str(r[0]) for r in rows)
                raise KernelError(errno.ENOENT, f"{path} has no version {which} (kept: {kept})")
            n, _, data = found[0]
        return int(n), zlib.decompress(data)
