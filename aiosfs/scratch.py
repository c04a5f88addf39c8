"""Scratch files: names starting with '.' that an agent directory does not know.

Tools that replace a file safely write a temporary file next to it and rename it
over the file: rsync writes `.config.XXXXXX` and renames it to `config`. An agent
directory holds only its fixed files, so such names live here, in RAM, as plain
files (content, mode, owner, times), until they are renamed onto a fixed name
(`restore.py` says what that does), renamed to another scratch name, unlinked, or
the mount ends. They are the filesystem's, not the agent's: the kernel never sees
them. Other new names are refused (EPERM): files are kept in memory/.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Any

import pyfuse3

from kernel import Caller, Kernel, params

from .files import Handle
from .spaces import Space, caller_of

SCRATCH_BASE = 1 << 47  # inode numbers: above every synthetic one, below memory/'s (1 << 48)
SCRATCH_LIMIT = 1 << 48
SCRATCH_FILES_PER_AGENT = 64  # at once; beyond → ENOSPC
SCRATCH_MAX_BYTES = params.MAX_CONTEXT_BYTES  # the largest file a scratch file can become; beyond → EFBIG
SCRATCH_TOTAL_BYTES = 64 * SCRATCH_MAX_BYTES  # all scratch files of the mount together (RAM); beyond → ENOSPC
READDIR_BASE = 1000  # readdir ids of scratch files start here, after the fixed entries
RENAME_NOREPLACE = 1  # rename(2) flags as FUSE passes them


def is_scratch(ino: int) -> bool:
    return SCRATCH_BASE <= ino < SCRATCH_LIMIT


def is_scratch_name(name: bytes) -> bool:
    return name.startswith(b".") and name not in (b".", b"..")


@dataclass(eq=False)
class ScratchFile:
    ino: int
    agent_id: int
    name: bytes
    mode: int  # permission bits
    uid: int
    gid: int
    data: bytearray = field(default_factory=bytearray)
    atime_ns: int = field(default_factory=time.time_ns)
    mtime_ns: int = field(default_factory=time.time_ns)
    ctime_ns: int = field(default_factory=time.time_ns)
    linked: bool = True  # False once unlinked, or replaced by a rename
    opened: int = 0  # open handles: an unlinked file lives until the last is released

    def attrs(self) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = self.ino
        attr.generation = 0
        attr.entry_timeout = attr.attr_timeout = 0
        attr.st_mode = stat.S_IFREG | self.mode
        attr.st_nlink = 1 if self.linked else 0
        attr.st_uid, attr.st_gid = self.uid, self.gid
        attr.st_size = len(self.data)
        attr.st_blksize = 4096
        attr.st_blocks = -(-len(self.data) // 512)
        attr.st_atime_ns, attr.st_mtime_ns, attr.st_ctime_ns = self.atime_ns, self.mtime_ns, self.ctime_ns
        return attr

    def touch(self) -> None:
        self.mtime_ns = self.ctime_ns = time.time_ns()


class ScratchFiles:
    """Every agent directory's scratch files, by inode and by (agent id, name)."""

    def __init__(self) -> None:
        self.by_ino: dict[int, ScratchFile] = {}
        self.by_name: dict[tuple[int, bytes], ScratchFile] = {}
        self._numbers = itertools.count(SCRATCH_BASE)
        self.size = 0  # bytes of every file still in by_ino

    def resize(self, found: ScratchFile, size: int) -> None:
        """Make room for the file to be `size` bytes (EFBIG, ENOSPC), then make it so."""
        if size > SCRATCH_MAX_BYTES:
            raise pyfuse3.FUSEError(errno.EFBIG)
        if self.size + size - len(found.data) > SCRATCH_TOTAL_BYTES:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        self.size += size - len(found.data)
        del found.data[size:]
        found.data.extend(bytes(size - len(found.data)))

    def get(self, ino: int) -> ScratchFile:
        found = self.by_ino.get(ino)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return found

    def named(self, agent_id: int, name: bytes) -> ScratchFile | None:
        return self.by_name.get((agent_id, name))

    def listing(self, agent_id: int) -> list[ScratchFile]:
        return sorted((f for (a, _), f in self.by_name.items() if a == agent_id), key=lambda f: f.ino)

    def create(self, agent_id: int, name: bytes, mode: int, uid: int, gid: int) -> ScratchFile:
        if (agent_id, name) in self.by_name:
            raise pyfuse3.FUSEError(errno.EEXIST)
        if len(self.listing(agent_id)) >= SCRATCH_FILES_PER_AGENT:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        made = ScratchFile(next(self._numbers), agent_id, name, mode & 0o7777, uid, gid)
        self.by_ino[made.ino] = self.by_name[(agent_id, name)] = made
        return made

    def unlink(self, agent_id: int, name: bytes) -> ScratchFile:
        found = self.by_name.pop((agent_id, name), None)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        self._unlinked(found)
        return found

    def _unlinked(self, found: ScratchFile) -> None:
        found.linked = False
        if not found.opened:
            self._drop(found)

    def _drop(self, found: ScratchFile) -> None:
        if self.by_ino.pop(found.ino, None) is not None:
            self.size -= len(found.data)

    def rename(self, agent_id: int, old: bytes, new: bytes, flags: int) -> None:
        moving = self.by_name.get((agent_id, old))
        if moving is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if flags & ~RENAME_NOREPLACE:
            raise pyfuse3.FUSEError(errno.EINVAL)  # RENAME_EXCHANGE: not for scratch files
        if flags and (agent_id, new) in self.by_name:
            raise pyfuse3.FUSEError(errno.EEXIST)
        if old == new:
            return
        replaced = self.by_name.pop((agent_id, new), None)
        if replaced is not None:
            self._unlinked(replaced)
        del self.by_name[(agent_id, old)]
        moving.name = new
        moving.ctime_ns = time.time_ns()
        self.by_name[(agent_id, new)] = moving

    def released(self, found: ScratchFile) -> None:
        """A handle of the file was released: an unlinked file goes with the last."""
        found.opened -= 1
        if not found.opened and not found.linked:
            self._drop(found)

    def drop_agent(self, agent_id: int) -> None:
        for key in [k for k in self.by_name if k[0] == agent_id]:
            self._unlinked(self.by_name.pop(key))

    def setattr(self, found: ScratchFile, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields) -> None:
        if fields.update_size:
            self.resize(found, attr.st_size)
            found.touch()
        if fields.update_mode:
            found.mode = attr.st_mode & 0o7777
        if fields.update_uid:
            found.uid = attr.st_uid
        if fields.update_gid:
            found.gid = attr.st_gid
        if fields.update_atime:
            found.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            found.mtime_ns = attr.st_mtime_ns
        found.ctime_ns = time.time_ns()


class ScratchHandle(Handle):
    """An open scratch file: reads and writes of its bytes in RAM."""

    def __init__(self, kernel: Kernel, caller: Caller, flags: int, found: ScratchFile, scratch: ScratchFiles) -> None:
        super().__init__(kernel, caller, None, flags)
        self.file = found
        self.scratch = scratch
        found.opened += 1
        if flags & os.O_TRUNC:
            scratch.resize(found, 0)
            found.touch()

    async def read(self, off: int, size: int) -> bytes:
        return bytes(self.file.data[off : off + size])

    async def write(self, off: int, buf: bytes) -> int:
        if self.flags & os.O_ACCMODE == os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EBADF)
        data = self.file.data
        at = len(data) if self.flags & os.O_APPEND else off
        if at + len(buf) > len(data):
            self.scratch.resize(self.file, at + len(buf))
        data[at : at + len(buf)] = buf
        self.file.touch()
        return len(buf)

    def truncate(self) -> None:
        self.scratch.resize(self.file, 0)
        self.file.touch()

    async def release(self) -> None:
        self.scratch.released(self.file)


class ScratchSpace(Space):
    """The scratch files' inodes: their attributes and their opens. Their names are in
    agent directories, whose space (tree.py) creates, renames and unlinks them here."""

    def __init__(self, kernel: Kernel, files: ScratchFiles) -> None:
        self.kernel = kernel
        self.files = files

    async def lookup(self, parent: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.ENOTDIR)  # a scratch file where a directory was expected

    async def mkdir(self, parent: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    async def rmdir(self, parent: int, name: bytes, ctx: Any) -> None:
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    async def getattr(self, ino: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return self.files.get(ino).attrs()

    async def setattr(
        self, ino: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, handle: Handle | None, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        found = self.files.get(ino)
        self.files.setattr(found, attr, fields)
        return found.attrs()

    async def open(self, ino: int, flags: int, ctx: Any) -> Handle:
        return ScratchHandle(self.kernel, caller_of(ctx), flags, self.files.get(ino), self.files)
