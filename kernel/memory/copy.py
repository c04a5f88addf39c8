"""A copy of an agent's whole `memory/` for another agent (`fork NAME` in an agent's
ctl): every inode with its committed content, mode, times, hard links and symlink
target, its kept versions and its recall passages, in one transaction. `CopyMixin`
is one of `MemoryStore`'s bases.

Only what is committed is copied, as a crash would keep it: writes of a file still
open and not yet closed are not. The copies belong to the new agent's owner.
"""

from __future__ import annotations

import errno
import stat
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import sqlite_utils

from .. import params
from ..access.rules import may
from ..errors import KernelError
from .data import _now

if TYPE_CHECKING:
    from ..types import Caller

COLUMNS = "ino, mode, uid, gid, nlink, size, rdev, atime_ns, mtime_ns, target"
SET_IDS = stat.S_ISUID | stat.S_ISGID


class CopyMixin:
    """The copy part of `MemoryStore`."""

    # state, made by MemoryStore.__init__
    db: sqlite_utils.Database
    _lock: threading.RLock
    _unversioned: set[int]
    _usage: dict[int, int]
    _inodes: dict[int, int]
    # methods of MemoryStore and the other mixins
    _tx: Callable[[], AbstractContextManager[None]]
    _q: Callable[..., list[Any]]
    _path: Callable[[int], str]
    _root_of: Callable[[int], int]
    _charge: Callable[[int, int], None]
    _new_inode: Callable[..., int]

    def copy_agent(self, source: int, target: int, owner: Caller, reader: Caller | None) -> None:
        """Copy agent `source`'s memory/ as agent `target`'s (which has none yet), owned
        by `owner`. `reader`: who asks (None: root), who must be able to read all of
        it: r and x on every directory, r on every file (EACCES names the first that
        is not), and only root copies device nodes (EPERM)."""
        with self._tx():
            rows = self._q(f"SELECT {COLUMNS} FROM inodes WHERE agent_id = ? AND nlink > 0 ORDER BY ino", [source])
            if reader is not None:
                self._check_readable(rows, reader)
            if len(rows) > params.MEMORY_MAX_INODES - self._inodes.get(target, 0):
                raise KernelError(errno.ENOSPC, f"memory/ holds at most {params.MEMORY_MAX_INODES} files and directories")
            used = sum(int(r[5]) for r in rows if not stat.S_ISDIR(r[1]))
            self._charge(target, used)
            copies = {int(r[0]): self._copy_inode(r, target, owner, reader is not None) for r in rows}
            self.db.execute("INSERT INTO roots(agent_id, ino) VALUES (?, ?)", [target, copies[self._root_of(source)]])
            for parent, name, ino in self._q(
                "SELECT d.parent, d.name, d.ino FROM dentries d JOIN inodes i ON i.ino = d.ino WHERE i.agent_id = ?", [source]
            ):
                self.db.execute("INSERT INTO dentries(parent, name, ino) VALUES (?, ?, ?)", [copies[parent], name, copies[ino]])
            for old, new in copies.items():
                self.db.execute("INSERT INTO chunks(ino, idx, data) SELECT ?, idx, data FROM chunks WHERE ino = ?", [new, old])
                self.db.execute(
                    "INSERT INTO versions(ino, n, size, committed, data) SELECT ?, n, size, committed, data FROM versions WHERE ino = ?", [new, old]
                )
                self.db.execute(
                    "INSERT INTO passages(text, agent_id, ino, line) SELECT text, ?, ?, line FROM passages WHERE ino = ?", [target, new, old]
                )
                if old in self._unversioned:  # committed since its last version: so is the copy
                    self._unversioned.add(new)
            self._usage[target] = self._usage.get(target, 0) + used

    def _copy_inode(self, row: Any, target: int, owner: Caller, unprivileged: bool) -> int:
        old, mode, _, _, nlink, size, rdev, atime_ns, mtime_ns, link_target = row
        if unprivileged and not stat.S_ISDIR(mode):
            mode &= ~SET_IDS  # as a copy by a user without privilege makes them
        new = int(self._new_inode(target, mode, owner.uid, owner.gid, nlink, link_target, rdev))
        self.db.execute("UPDATE inodes SET size = ?, atime_ns = ?, mtime_ns = ?, ctime_ns = ? WHERE ino = ?", [size, atime_ns, mtime_ns, _now(), new])
        return new

    def _check_readable(self, rows: list[Any], reader: Caller) -> None:
        for ino, mode, uid, gid, *_ in rows:
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                raise KernelError(errno.EPERM, f"memory/{self._path(ino)} is a device node: only root may copy one")
            bits = 0o5 if stat.S_ISDIR(mode) else 0o4 if stat.S_ISREG(mode) else 0
            if bits and not may(reader, uid, gid, mode, bits):
                where = self._path(ino) or "."
                raise KernelError(errno.EACCES, f"no permission to read memory/{where} (a copy reads every file and lists every directory)")
