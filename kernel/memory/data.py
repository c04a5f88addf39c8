"""File contents in `memory/`: the in-RAM overlay of uncommitted writes (the "dirty"
chunks), the chunk cache, read/write/truncate, the attributes as readers see them
through the overlay (`getattr`, `setattr`), the quota checks on growth and usage,
and `commit`/`flush`, which move the overlay into the database.

`Attr`, the attributes of an inode, lives here because every part of the store
reads it. `DataMixin` is one of `MemoryStore`'s bases: `store.py` owns the state
and the namespace, declared here only as annotations.
"""

from __future__ import annotations

import collections
import errno
import stat
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlite_utils

from .. import params
from ..access.rules import groups_of
from ..errors import KernelError

if TYPE_CHECKING:
    from ..types import Caller

CHUNK = params.MEMORY_CHUNK_BYTES
TIME_NS = (-(2**63), 2**63 - 1)  # the times an inode holds (SQLite's INTEGER): 1677 to 2262


@dataclass
class Attr:
    ino: int
    agent_id: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    rdev: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)


@dataclass
class Dirty:
    """Uncommitted writes of one inode: whole chunks, the size and the times."""

    size: int
    chunks: dict[int, bytes] = field(default_factory=dict)
    cut: int | None = None  # stored chunks from this index on are stale (truncated away)
    mtime_ns: int = 0
    ctime_ns: int = 0


def _now() -> int:
    return time.time_ns()


class DataMixin:
    """The contents part of `MemoryStore`."""

    # state, made by MemoryStore.__init__
    db: sqlite_utils.Database
    quota: int
    quotas: dict[int, int]
    stats: dict[str, int]
    _lock: threading.RLock
    _dirty: dict[int, Dirty]
    _open: collections.Counter[int]
    _unversioned: set[int]
    _atime: dict[int, int]
    _cache: collections.OrderedDict[tuple[int, int], bytes]
    _cache_limit: int
    _cache_bytes: int
    _usage: dict[int, int]
    # methods of MemoryStore and the other mixins
    _tx: Callable[[], AbstractContextManager[None]]
    _q: Callable[..., list[Any]]
    _row: Callable[[int], Attr]
    _delete_inode: Callable[[int], None]
    _version: Callable[[int], None]
    _index: Callable[[int], None]

    # -- attributes as readers see them ------------------------------------------------
    def getattr(self, ino: int) -> Attr:
        with self._lock:
            attr = self._row(ino)
            dirty = self._dirty.get(ino)
            if dirty is not None:
                attr.size = dirty.size
                attr.mtime_ns = dirty.mtime_ns or attr.mtime_ns
                attr.ctime_ns = dirty.ctime_ns or attr.ctime_ns
            attr.atime_ns = self._atime.get(ino, attr.atime_ns)
            return attr

    def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        commit: bool = True,
        writer: Caller | None = None,
        chown: bool = False,
    ) -> Attr:
        """chmod/chown/utimens/truncate. A truncate through an open handle
        (`commit=False`) stays uncommitted until that handle's flush, like a write.
        As in Linux, a chown of a file that is not a directory, and a truncate by a
        user without privilege (`writer`; None for root), clear its set-id bits
        (_without_set_ids), unless the mode is set in the same call.
        `chown` is a chown that names neither owner nor group (chown(-1, -1)): it
        still clears them and marks the ctime."""
        with self._tx():
            attr = self._row(ino)
            now = _now()
            truncated_by_user = size is not None and writer is not None
            chowned = (chown or uid is not None or gid is not None) and not attr.is_dir
            if mode is None and (truncated_by_user or chowned):
                mode = _without_set_ids(attr, writer)
            if size is not None:
                if attr.is_dir:
                    raise KernelError(errno.EISDIR, "is a directory")
                if not attr.is_reg:
                    raise KernelError(errno.EINVAL, "not a regular file")
                self._truncate(attr, size)
                if commit:
                    self._commit(ino)
            values: dict[str, Any] = {}
            if mode is not None:
                values["mode"] = stat.S_IFMT(attr.mode) | (mode & 0o7777)
            if uid is not None:
                values["uid"] = uid
            if gid is not None:
                values["gid"] = gid
            if atime_ns is not None:
                values["atime_ns"] = atime_ns = _clamp_time(atime_ns)
                self._atime.pop(ino, None)
            if mtime_ns is not None:
                values["mtime_ns"] = mtime_ns = _clamp_time(mtime_ns)
                dirty = self._dirty.get(ino)
                if dirty is not None:
                    dirty.mtime_ns = mtime_ns
            if values or size is not None or chown:
                values["ctime_ns"] = now
                dirty = self._dirty.get(ino)
                if dirty is not None:
                    dirty.ctime_ns = now
            if values:
                sets = ", ".join(f"{k} = ?" for k in values)
                self.db.execute(f"UPDATE inodes SET {sets} WHERE ino = ?", [*values.values(), ino])
            return self.getattr(ino)

    # -- data ------------------------------------------------------------------------------
    def open(self, ino: int, truncate: bool, writer: Caller | None = None) -> None:
        with self._lock:
            attr = self._row(ino)
            self._open[ino] += 1
            if truncate and attr.is_reg:  # also when empty: O_TRUNC sets mtime and ctime, and clears set-id bits
                self._drop_set_ids(attr, writer)
                self._truncate(attr, 0)
                dirty = self._dirty[ino]
                dirty.mtime_ns = dirty.ctime_ns = _now()

    def release(self, ino: int) -> None:
        """The last close of a handle: commit what is left, version, drop an orphan."""
        with self._tx():
            self._open[ino] -= 1
            if self._open[ino] > 0:
                return
            del self._open[ino]
            rows = self._q("SELECT nlink FROM inodes WHERE ino = ?", [ino])
            if not rows:
                return
            if rows[0][0] == 0:
                self._delete_inode(ino)
                return
            self._commit(ino)
            self._version(ino)
            atime = self._atime.pop(ino, None)
            if atime is not None:
                self.db.execute("UPDATE inodes SET atime_ns = ? WHERE ino = ?", [atime, ino])

    def _dirty_of(self, attr: Attr) -> Dirty:
        dirty = self._dirty.get(attr.ino)
        if dirty is None:
            dirty = self._dirty[attr.ino] = Dirty(attr.size)
        return dirty

    def _stored_chunk(self, ino: int, idx: int) -> bytes:
        key = (ino, idx)
        data = self._cache.get(key)
        if data is not None:
            self._cache.move_to_end(key)
            self.stats["cache_hits"] += 1
            return data
        self.stats["cache_misses"] += 1
        rows = self._q("SELECT data FROM chunks WHERE ino = ? AND idx = ?", [ino, idx])
        data = bytes(rows[0][0]) if rows else b""
        self._remember(key, data)
        return data

    def _remember(self, key: tuple[int, int], data: bytes) -> None:
        old = self._cache.pop(key, None)
        if old is not None:
            self._cache_bytes -= len(old)
        self._cache[key] = data
        self._cache_bytes += len(data)
        while self._cache_bytes > self._cache_limit and self._cache:
            _, dropped = self._cache.popitem(last=False)
            self._cache_bytes -= len(dropped)
            self.stats["cache_evictions"] += 1

    def _chunk(self, ino: int, idx: int, size: int) -> bytes:
        """Chunk `idx` as readers see it now, padded with zeros up to the size."""
        dirty = self._dirty.get(ino)
        if dirty is not None and idx in dirty.chunks:
            data = dirty.chunks[idx]
        elif dirty is not None and dirty.cut is not None and idx >= dirty.cut:
            data = b""
        else:
            data = self._stored_chunk(ino, idx)
        want = max(0, min(CHUNK, size - idx * CHUNK))
        return data[:want] + bytes(want - len(data)) if len(data) < want else data[:want]

    def read(self, ino: int, offset: int, length: int) -> bytes:
        with self._lock:
            attr = self.getattr(ino)
            if attr.is_dir:
                raise KernelError(errno.EISDIR, "is a directory")
            end = min(attr.size, offset + length)
            out = bytearray()
            pos = offset
            while pos < end:
                idx = pos // CHUNK
                data = self._chunk(ino, idx, attr.size)
                out += data[pos - idx * CHUNK : end - idx * CHUNK]
                pos = (idx + 1) * CHUNK
            self._touch_atime(attr)
            return bytes(out)

    def _touch_atime(self, attr: Attr) -> None:
        """relatime: record a read when atime is older than the last change or a day."""
        now = _now()
        if attr.atime_ns <= max(attr.mtime_ns, attr.ctime_ns) or now - attr.atime_ns > 86400 * 10**9:
            self._atime[attr.ino] = now

    def write(self, ino: int, offset: int, data: bytes, append: bool = False, writer: Caller | None = None) -> int:
        """Write into the overlay; EDQUOT (nothing written) past the agent's quota. A write by a
        user without privilege (`writer`) clears the set-id bits."""
        with self._lock:
            attr = self.getattr(ino)
            if attr.is_dir:
                raise KernelError(errno.EISDIR, "is a directory")
            if append:
                offset = attr.size
            end = offset + len(data)
            _check_file_size(end)
            self._drop_set_ids(attr, writer)
            if end > attr.size:
                self._charge(attr.agent_id, end - attr.size)
            if not data:
                return 0
            dirty = self._dirty_of(attr)
            pos = offset
            while pos < end:
                idx = pos // CHUNK
                lo = pos - idx * CHUNK
                hi = min(CHUNK, end - idx * CHUNK)
                current = self._chunk(ino, idx, dirty.size)
                if len(current) < lo:
                    current += bytes(lo - len(current))
                dirty.chunks[idx] = current[:lo] + data[pos - offset : pos - offset + hi - lo] + current[hi:]
                pos = (idx + 1) * CHUNK
            if end > dirty.size:
                self._usage[attr.agent_id] = self._usage.get(attr.agent_id, 0) + end - dirty.size
                dirty.size = end
            dirty.mtime_ns = dirty.ctime_ns = _now()
            return len(data)

    def _drop_set_ids(self, attr: Attr, writer: Caller | None) -> None:
        """A write or truncate by a user without privilege (`writer`; None for root, who keeps
        them: CAP_FSETID) clears the set-id bits."""
        kept = _without_set_ids(attr, writer) if writer is not None else None
        if kept is not None:
            self.setattr(attr.ino, mode=kept)

    def _truncate(self, attr: Attr, size: int) -> None:
        _check_file_size(size)
        dirty = self._dirty_of(attr)
        if size > dirty.size:
            self._charge(attr.agent_id, size - dirty.size)
        self._usage[attr.agent_id] = self._usage.get(attr.agent_id, 0) + size - dirty.size
        keep = -(-size // CHUNK)  # chunks that still hold data
        if size < dirty.size:
            last = size // CHUNK
            if size % CHUNK:
                dirty.chunks[last] = self._chunk(attr.ino, last, dirty.size)[: size % CHUNK]
            for idx in [i for i in dirty.chunks if i >= keep]:
                del dirty.chunks[idx]
            dirty.cut = keep if dirty.cut is None else min(dirty.cut, keep)
        dirty.size = size
        dirty.mtime_ns = dirty.ctime_ns = _now()

    def _charge(self, agent_id: int, extra: int) -> None:
        quota = self.quotas.get(agent_id, self.quota)
        used = self._usage.get(agent_id, 0)
        if used + extra > quota:
            raise KernelError(errno.EDQUOT, f"memory quota of {quota} bytes reached ({used} used, {extra} more asked)")

    def usage(self, agent_id: int) -> int:
        with self._lock:
            return self._usage.get(agent_id, 0)

    def _measure_usage(self) -> dict[int, int]:
        rows = self._q(f"SELECT agent_id, SUM(size) FROM inodes WHERE (mode & {0o170000}) != {stat.S_IFDIR} GROUP BY agent_id")
        return {int(a): int(s or 0) for a, s in rows}

    # -- commits -------------------------------------------------------------------------
    def flush(self, ino: int) -> None:
        """Make the inode's writes durable (every close())."""
        with self._tx():
            self._commit(ino)

    def fsync(self, ino: int) -> None:
        with self._tx():
            self._commit(ino)
            self._version(ino)

    def _commit(self, ino: int) -> None:
        """Caller is in a transaction."""
        dirty = self._dirty.pop(ino, None)
        if dirty is None:
            return
        keep = -(-dirty.size // CHUNK)
        cut = keep if dirty.cut is None else min(dirty.cut, keep)
        self.db.execute("DELETE FROM chunks WHERE ino = ? AND idx >= ?", [ino, cut])
        for key in [k for k in self._cache if k[0] == ino and k[1] >= cut]:
            self._cache_bytes -= len(self._cache.pop(key))
        for idx, data in dirty.chunks.items():
            if idx < keep:
                self.db.execute("INSERT OR REPLACE INTO chunks(ino, idx, data) VALUES (?, ?, ?)", [ino, idx, data])
                self._remember((ino, idx), data)
        now = _now()
        self.db.execute(
            "UPDATE inodes SET size = ?, mtime_ns = ?, ctime_ns = ? WHERE ino = ?", [dirty.size, dirty.mtime_ns or now, dirty.ctime_ns or now, ino]
        )
        self._unversioned.add(ino)
        self.stats["commits"] += 1
        self._index(ino)

    def _content(self, ino: int) -> bytes:
        attr = self.getattr(ino)
        return b"".join(self._chunk(ino, idx, attr.size) for idx in range(-(-attr.size // CHUNK)))


def _clamp_time(ns: int) -> int:
    """A time set past what an inode holds becomes the nearest it holds, as Linux clamps
    times to a filesystem's range (timestamp_truncate)."""
    return min(max(ns, TIME_NS[0]), TIME_NS[1])


def _check_file_size(size: int) -> None:
    """EFBIG past the largest file memory/ can hold (the quota is EDQUOT, for real growth)."""
    if size > params.MEMORY_MAX_FILE_BYTES:
        raise KernelError(errno.EFBIG, f"{size} bytes is past the largest file size, {params.MEMORY_MAX_FILE_BYTES} bytes")


def _without_set_ids(attr: Attr, writer: Caller | None) -> int | None:
    """The permission bits without set-user-id, and without set-group-id when group-execute is set
    or the user (`writer`; None for root) is not in the file's group, as a primary or supplementary
    member (Linux's setattr_should_drop_sgid); None when nothing changes."""
    mode = attr.mode & 0o7777
    kept = mode & ~stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or (writer is not None and attr.gid not in groups_of(writer))):
        kept &= ~stat.S_ISGID
    return kept if kept != mode else None
