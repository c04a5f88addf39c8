"""The store behind every agent's `memory/`: a POSIX tree of inodes, directory
entries and chunked data in SQLite (its own WAL database in the state directory).

Durability and atomicity: writes land in an in-RAM overlay of the inode (the
"dirty" chunks) that readers of the same inode see at once; `commit` moves the
overlay, the size and the times into the database in one transaction with
`synchronous=FULL`. The FUSE layer commits at every `flush` (each `close()`) and
`fsync`, so what a `write()` + `close()` acknowledged survives a `kill -9`, and a
crash leaves every file as of its last commit: never torn. Metadata changes
(create, rename, chmod, …) commit at once.

Versions: when a file's last handle is released (or at `fsync`), its committed
content, if it changed, becomes a new numbered version (at most
`MEMORY_VERSIONS` per file, compressed); `rollback` makes an old version current
again, as a new version. Recall: committed text files are cut into passages and
indexed with FTS5; `search` ranks an agent's passages with bm25.

Every method takes the store's lock: callers run them on worker threads
(`trio.to_thread`), never on the trio thread, because a commit waits for the disk.
Methods raise `KernelError` with the errno a POSIX filesystem would give.

Layout: this module holds `MemoryStore` itself (schema, inodes, names, paths);
its bases hold the rest: `data.DataMixin` the contents, the overlay and the
quotas, `versions.VersionsMixin` versions and rollback, `index.IndexMixin` recall,
`copy.CopyMixin` the copy of a whole memory/ for a forked agent.
"""

from __future__ import annotations

import collections
import errno
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils

from .. import params
from ..errors import KernelError
from ..storage.database import migrate, transaction
from .copy import CopyMixin
from .data import CHUNK, Attr, DataMixin, Dirty, _now
from .index import IndexMixin, Passage, split_passages
from .versions import Version, VersionsMixin

__all__ = ["CHUNK", "MIGRATIONS", "RENAME_EXCHANGE", "RENAME_NOREPLACE", "Attr", "Dirty", "MemoryStore", "Passage", "Version", "split_passages"]

MIGRATIONS = [
    # 1: inodes, directory entries, chunked data, versions and the passage index.
    """
    CREATE TABLE inodes (
        ino INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: it is part of FUSE inode numbers
        agent_id INTEGER NOT NULL,
        mode INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL,
        nlink INTEGER NOT NULL, size INTEGER NOT NULL DEFAULT 0, rdev INTEGER NOT NULL DEFAULT 0,
        atime_ns INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
        target BLOB  -- a symlink's target, stored as given and never followed here
    );
    CREATE INDEX inodes_agent ON inodes(agent_id);
    CREATE TABLE roots (agent_id INTEGER PRIMARY KEY, ino INTEGER NOT NULL);
    CREATE TABLE dentries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- readdir offsets: stable while entries come and go
        parent INTEGER NOT NULL, name BLOB NOT NULL, ino INTEGER NOT NULL,
        UNIQUE (parent, name)
    );
    CREATE INDEX dentries_ino ON dentries(ino);
    CREATE TABLE chunks (ino INTEGER NOT NULL, idx INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (ino, idx)) WITHOUT ROWID;
    CREATE TABLE versions (
        ino INTEGER NOT NULL, n INTEGER NOT NULL, size INTEGER NOT NULL, committed REAL NOT NULL,
        data BLOB NOT NULL,  -- zlib-compressed content
        PRIMARY KEY (ino, n)
    );
    CREATE VIRTUAL TABLE passages USING fts5(text, agent_id UNINDEXED, ino UNINDEXED, line UNINDEXED, tokenize = 'unicode61');
    """,
]

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def _check_name(name: bytes) -> None:
    if len(name) > params.MAX_NAME_BYTES:
        raise KernelError(errno.ENAMETOOLONG, f"a name is at most {params.MAX_NAME_BYTES} bytes")
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise KernelError(errno.EINVAL, f"invalid file name {name!r}")


class MemoryStore(DataMixin, VersionsMixin, IndexMixin, CopyMixin):
    def __init__(self, path: Path | str, quota: int = params.MEMORY_QUOTA_BYTES, cache_bytes: int = params.MEMORY_CACHE_BYTES) -> None:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a commit that returned survives power loss
        migrate(self.db, MIGRATIONS)
        self.quota = quota
        self.quotas: dict[int, int] = {}  # agent id → its own quota (policy), else `quota`
        self._lock = threading.RLock()
        self._dirty: dict[int, Dirty] = {}
        self._open: collections.Counter[int] = collections.Counter()  # ino → open handles
        self._unversioned: set[int] = set()  # committed since its last version
        self._atime: dict[int, int] = {}  # atime updates not yet stored
        self._cache: collections.OrderedDict[tuple[int, int], bytes] = collections.OrderedDict()
        self._cache_limit = cache_bytes
        self._cache_bytes = 0
        self.stats: dict[str, int] = dict.fromkeys(
            ["cache_hits", "cache_misses", "cache_evictions", "commits", "versions", "rollbacks", "recalls"], 0
        )
        self._usage: dict[int, int] = {}
        self._inodes: dict[int, int] = {}  # agent id → its inodes, for MEMORY_MAX_INODES without a count per create
        with self._tx():
            self._collect_orphans()
        self._usage = self._measure_usage()
        self._inodes = {int(a): int(n) for a, n in self._q("SELECT agent_id, COUNT(*) FROM inodes GROUP BY agent_id")}

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()

    # -- transactions and lookups -------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[None]:
        with self._lock, transaction(self.db.conn):
            yield

    def _q(self, sql: str, args: Any = ()) -> list[Any]:
        return self.db.execute(sql, args).fetchall()

    def _row(self, ino: int) -> Attr:
        rows = self._q("SELECT ino, agent_id, mode, uid, gid, nlink, size, rdev, atime_ns, mtime_ns, ctime_ns FROM inodes WHERE ino = ?", [ino])
        if not rows:
            raise KernelError(errno.ENOENT, f"no memory inode {ino}")
        return Attr(*rows[0])

    def _dir(self, ino: int) -> Attr:
        attr = self._row(ino)
        if not attr.is_dir:
            raise KernelError(errno.ENOTDIR, "not a directory")
        return attr

    def _entry(self, parent: int, name: bytes) -> int | None:
        rows = self._q("SELECT ino FROM dentries WHERE parent = ? AND name = ?", [parent, name])
        return int(rows[0][0]) if rows else None

    def lookup(self, parent: int, name: bytes) -> Attr:
        with self._lock:
            self._dir(parent)
            if len(name) > params.MAX_NAME_BYTES:
                raise KernelError(errno.ENAMETOOLONG, f"a name is at most {params.MAX_NAME_BYTES} bytes")
            ino = self._entry(parent, name)
            if ino is None:
                raise KernelError(errno.ENOENT, "no such file")
            return self.getattr(ino)

    def readdir(self, ino: int, after: int) -> list[tuple[int, bytes, Attr]]:
        """Entries with ids above `after`, in id order (the ids are readdir offsets)."""
        with self._lock:
            self._dir(ino)
            rows = self._q("SELECT id, name, ino FROM dentries WHERE parent = ? AND id > ? ORDER BY id", [ino, after])
            return [(int(i), bytes(name), self.getattr(child)) for i, name, child in rows]

    # -- roots -------------------------------------------------------------------
    def root(self, agent_id: int, uid: int, gid: int, mode: int = params.MEMORY_DIR_MODE) -> int:
        """The inode of the agent's `memory/`, made on first use."""
        with self._tx():
            rows = self._q("SELECT ino FROM roots WHERE agent_id = ?", [agent_id])
            if rows:
                return int(rows[0][0])
            ino = self._new_inode(agent_id, stat.S_IFDIR | mode, uid, gid, nlink=2)
            self.db.execute("INSERT INTO roots(agent_id, ino) VALUES (?, ?)", [agent_id, ino])
            return ino

    def drop_agent(self, agent_id: int) -> None:
        """Forget an agent's whole tree (its agent is gone)."""
        with self._tx():
            inos = [r[0] for r in self._q("SELECT ino FROM inodes WHERE agent_id = ?", [agent_id])]
            for ino in inos:
                self._delete_inode(ino)
            self.db.execute("DELETE FROM roots WHERE agent_id = ?", [agent_id])
            self._usage.pop(agent_id, None)
            self._inodes.pop(agent_id, None)

    def is_empty(self, ino: int) -> bool:
        with self._lock:
            return not self._q("SELECT 1 FROM dentries WHERE parent = ? LIMIT 1", [ino])

    # -- creating names -------------------------------------------------------------
    def _new_inode(self, agent_id: int, mode: int, uid: int, gid: int, nlink: int = 1, target: bytes | None = None, rdev: int = 0) -> int:
        now = _now()
        if self._inodes.get(agent_id, 0) >= params.MEMORY_MAX_INODES:
            raise KernelError(errno.ENOSPC, f"memory/ holds at most {params.MEMORY_MAX_INODES} files and directories")
        cursor = self.db.execute(
            "INSERT INTO inodes(agent_id, mode, uid, gid, nlink, size, rdev, atime_ns, mtime_ns, ctime_ns, target) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            [agent_id, mode, uid, gid, nlink, len(target or b""), rdev, now, now, now, target],
        )
        self._inodes[agent_id] = self._inodes.get(agent_id, 0) + 1
        return int(cursor.lastrowid or 0)

    def _add(self, parent: int, name: bytes, mode: int, uid: int, gid: int, target: bytes | None = None, rdev: int = 0) -> Attr:
        _check_name(name)
        with self._tx():
            pattr = self._dir(parent)
            if pattr.nlink == 0:
                raise KernelError(errno.ENOENT, "the directory was removed")
            if self._entry(parent, name) is not None:
                raise KernelError(errno.EEXIST, "file exists")
            if pattr.mode & stat.S_ISGID:  # BSD group semantics in a setgid directory
                gid = pattr.gid
                if stat.S_ISDIR(mode):
                    mode |= stat.S_ISGID
            if target is not None:
                self._charge(pattr.agent_id, len(target))
            ino = self._new_inode(pattr.agent_id, mode, uid, gid, 2 if stat.S_ISDIR(mode) else 1, target, rdev)
            self.db.execute("INSERT INTO dentries(parent, name, ino) VALUES (?, ?, ?)", [parent, name, ino])
            if stat.S_ISDIR(mode):
                self.db.execute("UPDATE inodes SET nlink = nlink + 1 WHERE ino = ?", [parent])
            self._touch_dir(parent)
            if target is not None:
                self._usage[pattr.agent_id] = self._usage.get(pattr.agent_id, 0) + len(target)
            return self.getattr(ino)

    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0) -> Attr:
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise KernelError(errno.EINVAL, f"memory/ cannot make a file of type {kind:o}")
        # device nodes are kept with their number, as tmpfs keeps them: the mount is nodev,
        # so opening one reaches no device (the VFS refuses it); only root may make them (CAP_MKNOD)
        device = kind in (stat.S_IFCHR, stat.S_IFBLK)
        return self._add(parent, name, kind | (mode & 0o7777), uid, gid, rdev=rdev if device else 0)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        return self._add(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        if len(target) > params.MEMORY_MAX_SYMLINK_BYTES:
            raise KernelError(errno.ENAMETOOLONG, f"a symlink target is at most {params.MEMORY_MAX_SYMLINK_BYTES} bytes")
        return self._add(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)

    def readlink(self, ino: int) -> bytes:
        with self._lock:
            rows = self._q("SELECT mode, target FROM inodes WHERE ino = ?", [ino])
            if not rows:
                raise KernelError(errno.ENOENT, "no such file")
            if not stat.S_ISLNK(rows[0][0]):
                raise KernelError(errno.EINVAL, "not a symlink")
            return bytes(rows[0][1])

    def link(self, ino: int, parent: int, name: bytes) -> Attr:
        _check_name(name)
        with self._tx():
            attr, pattr = self._row(ino), self._dir(parent)
            if attr.is_dir:
                raise KernelError(errno.EPERM, "hard links to directories are not allowed")
            if attr.agent_id != pattr.agent_id:
                raise KernelError(errno.EXDEV, "hard links cannot cross agents")
            if self._entry(parent, name) is not None:
                raise KernelError(errno.EEXIST, "file exists")
            if attr.nlink == 0:
                raise KernelError(errno.ENOENT, "the file was removed")
            self.db.execute("INSERT INTO dentries(parent, name, ino) VALUES (?, ?, ?)", [parent, name, ino])
            self.db.execute("UPDATE inodes SET nlink = nlink + 1, ctime_ns = ? WHERE ino = ?", [_now(), ino])
            self._touch_dir(parent)
            return self.getattr(ino)

    def _touch_dir(self, ino: int) -> None:
        now = _now()
        self.db.execute("UPDATE inodes SET mtime_ns = ?, ctime_ns = ? WHERE ino = ?", [now, now, ino])

    # -- removing names -----------------------------------------------------------------
    def unlink(self, parent: int, name: bytes) -> None:
        with self._tx():
            self._dir(parent)
            ino = self._entry(parent, name)
            if ino is None:
                raise KernelError(errno.ENOENT, "no such file")
            if self._row(ino).is_dir:
                raise KernelError(errno.EISDIR, "is a directory: use rmdir")
            self.db.execute("DELETE FROM dentries WHERE parent = ? AND name = ?", [parent, name])
            self._touch_dir(parent)
            self._drop_link(ino)

    def rmdir(self, parent: int, name: bytes) -> None:
        with self._tx():
            self._dir(parent)
            ino = self._entry(parent, name)
            if ino is None:
                raise KernelError(errno.ENOENT, "no such directory")
            if not self._row(ino).is_dir:
                raise KernelError(errno.ENOTDIR, "not a directory")
            if self._q("SELECT 1 FROM dentries WHERE parent = ? LIMIT 1", [ino]):
                raise KernelError(errno.ENOTEMPTY, "directory not empty")
            self.db.execute("DELETE FROM dentries WHERE parent = ? AND name = ?", [parent, name])
            self.db.execute("UPDATE inodes SET nlink = nlink - 1 WHERE ino = ?", [parent])
            self._touch_dir(parent)
            self._delete_inode(ino)

    def _drop_link(self, ino: int) -> None:
        self.db.execute("UPDATE inodes SET nlink = MAX(nlink - 1, 0), ctime_ns = ? WHERE ino = ?", [_now(), ino])
        if self._row(ino).nlink == 0 and not self._open[ino]:
            self._delete_inode(ino)

    def _delete_inode(self, ino: int) -> None:
        """Remove an inode and everything of it (caller is in a transaction)."""
        rows = self._q("SELECT agent_id, size, mode FROM inodes WHERE ino = ?", [ino])
        if rows:
            agent_id, size, mode = rows[0]
            self._inodes[agent_id] = self._inodes.get(agent_id, 1) - 1
            dirty = self._dirty.get(ino)
            used = dirty.size if dirty is not None else size
            if not stat.S_ISDIR(mode):
                self._usage[agent_id] = self._usage.get(agent_id, 0) - used
        for table in ("chunks", "versions"):
            self.db.execute(f"DELETE FROM {table} WHERE ino = ?", [ino])
        self.db.execute("DELETE FROM passages WHERE ino = ?", [ino])
        self.db.execute("DELETE FROM dentries WHERE ino = ?", [ino])
        self.db.execute("DELETE FROM inodes WHERE ino = ?", [ino])
        self._dirty.pop(ino, None)
        self._unversioned.discard(ino)
        self._atime.pop(ino, None)
        for key in [k for k in self._cache if k[0] == ino]:
            self._cache_bytes -= len(self._cache.pop(key))

    def _collect_orphans(self) -> None:
        """Files unlinked while open when the daemon died: nobody can reach them."""
        for (ino,) in self._q("SELECT ino FROM inodes WHERE nlink = 0"):
            self._delete_inode(ino)

    # -- rename --------------------------------------------------------------------------
    def _is_within(self, ino: int, ancestor: int) -> bool:
        """Is directory `ino` `ancestor` or below it?"""
        seen = 0
        while ino != ancestor:
            rows = self._q("SELECT parent FROM dentries WHERE ino = ? LIMIT 1", [ino])
            if not rows or seen > 10_000:
                return False
            ino, seen = int(rows[0][0]), seen + 1
        return True

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int = 0) -> None:
        _check_name(new_name)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise KernelError(errno.EINVAL, "unsupported rename flags")
        with self._tx():
            op, np_ = self._dir(old_parent), self._dir(new_parent)
            if op.agent_id != np_.agent_id:
                raise KernelError(errno.EXDEV, "rename cannot cross agents")
            src = self._entry(old_parent, old_name)
            if src is None:
                raise KernelError(errno.ENOENT, "no such file")
            dst = self._entry(new_parent, new_name)
            sattr = self._row(src)
            if flags & RENAME_EXCHANGE:
                self._exchange(old_parent, old_name, new_parent, new_name, src, dst)
                return
            if dst is not None and flags & RENAME_NOREPLACE:
                raise KernelError(errno.EEXIST, "file exists")
            if dst == src:
                return  # two names of one inode: POSIX says do nothing
            if sattr.is_dir and self._is_within(new_parent, src):
                raise KernelError(errno.EINVAL, "cannot move a directory into itself")
            if dst is not None:
                dattr = self._row(dst)
                if sattr.is_dir and not dattr.is_dir:
                    raise KernelError(errno.ENOTDIR, "not a directory")
                if dattr.is_dir and not sattr.is_dir:
                    raise KernelError(errno.EISDIR, "is a directory")
                if dattr.is_dir and self._q("SELECT 1 FROM dentries WHERE parent = ? LIMIT 1", [dst]):
                    raise KernelError(errno.ENOTEMPTY, "directory not empty")
                self.db.execute("DELETE FROM dentries WHERE parent = ? AND name = ?", [new_parent, new_name])
                if dattr.is_dir:
                    self.db.execute("UPDATE inodes SET nlink = nlink - 1 WHERE ino = ?", [new_parent])
                    self._delete_inode(dst)
                else:
                    self._drop_link(dst)
            self.db.execute("UPDATE dentries SET parent = ?, name = ? WHERE parent = ? AND name = ?", [new_parent, new_name, old_parent, old_name])
            if sattr.is_dir and old_parent != new_parent:
                self.db.execute("UPDATE inodes SET nlink = nlink - 1 WHERE ino = ?", [old_parent])
                self.db.execute("UPDATE inodes SET nlink = nlink + 1 WHERE ino = ?", [new_parent])
            self.db.execute("UPDATE inodes SET ctime_ns = ? WHERE ino = ?", [_now(), src])
            self._touch_dir(old_parent)
            self._touch_dir(new_parent)

    def _exchange(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, src: int, dst: int | None) -> None:
        if dst is None:
            raise KernelError(errno.ENOENT, "no such file to exchange with")
        sattr, dattr = self._row(src), self._row(dst)
        if (sattr.is_dir and self._is_within(new_parent, src)) or (dattr.is_dir and self._is_within(old_parent, dst)):
            raise KernelError(errno.EINVAL, "cannot move a directory into itself")
        self.db.execute("UPDATE dentries SET ino = ? WHERE parent = ? AND name = ?", [dst, old_parent, old_name])
        self.db.execute("UPDATE dentries SET ino = ? WHERE parent = ? AND name = ?", [src, new_parent, new_name])
        if old_parent != new_parent and sattr.is_dir != dattr.is_dir:
            moved_dir_to_new = 1 if sattr.is_dir else -1
            self.db.execute("UPDATE inodes SET nlink = nlink - ? WHERE ino = ?", [moved_dir_to_new, old_parent])
            self.db.execute("UPDATE inodes SET nlink = nlink + ? WHERE ino = ?", [moved_dir_to_new, new_parent])
        now = _now()
        self.db.execute("UPDATE inodes SET ctime_ns = ? WHERE ino IN (?, ?)", [now, src, dst])
        self._touch_dir(old_parent)
        self._touch_dir(new_parent)

    # -- paths ----------------------------------------------------------------------------
    def _root_of(self, agent_id: int) -> int:
        rows = self._q("SELECT ino FROM roots WHERE agent_id = ?", [agent_id])
        if not rows:
            raise KernelError(errno.ENOENT, "the agent has no memory yet")
        return int(rows[0][0])

    def walk(self, agent_id: int, path: str) -> int:
        with self._lock:
            return self._walk(agent_id, path)

    def _walk(self, agent_id: int, path: str) -> int:
        """Resolve a path inside memory/ without following symlinks; `..` stops at memory/."""
        root = ino = self._root_of(agent_id)
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if not parts:
            raise KernelError(errno.EINVAL, "a path inside memory/ is needed")
        for i, part in enumerate(parts):
            attr = self._row(ino)
            if stat.S_ISLNK(attr.mode):
                raise KernelError(errno.ELOOP, f"{'/'.join(parts[:i])} is a symlink: paths here do not follow symlinks")
            if not attr.is_dir:
                raise KernelError(errno.ENOTDIR, f"{'/'.join(parts[:i])} is not a directory")
            if part == "..":
                if ino != root:
                    ino = int(self._q("SELECT parent FROM dentries WHERE ino = ? LIMIT 1", [ino])[0][0])
                continue
            child = self._entry(ino, os.fsencode(part))
            if child is None:
                raise KernelError(errno.ENOENT, f"no {'/'.join(parts[: i + 1])} in memory/")
            ino = child
        return ino

    def lineage(self, ino: int) -> list[Attr]:
        """The attributes of the directories from memory/ down to the inode's parent,
        then the inode's own: what a path lookup checks permissions on."""
        with self._lock:
            chain = [self.getattr(ino)]
            for _ in range(10_000):
                rows = self._q("SELECT parent FROM dentries WHERE ino = ? ORDER BY id LIMIT 1", [ino])
                if not rows:
                    break
                ino = int(rows[0][0])
                chain.append(self.getattr(ino))
            return chain[::-1]

    def _path(self, ino: int) -> str:
        parts: list[str] = []
        for _ in range(10_000):
            rows = self._q("SELECT parent, name FROM dentries WHERE ino = ? ORDER BY id LIMIT 1", [ino])
            if not rows:
                break
            ino = int(rows[0][0])
            parts.append(os.fsdecode(bytes(rows[0][1])))
        return "/".join(reversed(parts))

    # -- visibility ---------------------------------------------------------------------------
    def statistics(self) -> dict[str, int]:
        with self._lock:
            out = {f"memory_{k}": v for k, v in self.stats.items()}
            out["memory_cache_bytes"] = self._cache_bytes
            out["memory_bytes"] = sum(self._usage.values())
            out["memory_dirty_files"] = len(self._dirty)
            return out
