"""memory/ and recall in the mount: inode numbers of the memory store, their
attributes, and the handles of memory files and of `recall`.

A memory inode's FUSE number is `MEM_BASE + its store number`, far above every
synthetic inode (`agent_id << 8 | kind`), so one test tells them apart. Memory
files are opened with direct I/O, so each write() reaches the store whole and a
quota refusal writes nothing; attribute timeouts stay 0, so every process sees
sizes at once.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

import pyfuse3
import trio

from kernel import Agent, Attr, Caller, Kernel, Passage
from kernel.syscall import MEMORY_SYS, Sys, checks, syscall

from .files import AskHandle, Handle
from .spaces import Space, caller_of, ownership

MEM_BASE = 1 << 48


def is_mem(ino: int) -> bool:
    return ino >= MEM_BASE


def fuse_ino(store_ino: int) -> int:
    return MEM_BASE + store_ino


def store_ino(ino: int) -> int:
    return ino - MEM_BASE


def entry_attrs(attr: Attr) -> pyfuse3.EntryAttributes:
    out = pyfuse3.EntryAttributes()
    out.st_ino = fuse_ino(attr.ino)
    out.generation = 0
    out.entry_timeout = 0
    out.attr_timeout = 0
    out.st_mode = attr.mode
    out.st_nlink = attr.nlink
    out.st_uid, out.st_gid = attr.uid, attr.gid
    out.st_rdev = attr.rdev
    out.st_size = attr.size
    out.st_blksize = 4096
    out.st_blocks = -(-attr.size // 512)
    out.st_atime_ns, out.st_mtime_ns, out.st_ctime_ns = attr.atime_ns, attr.mtime_ns, attr.ctime_ns
    return out


async def mem(kernel: Kernel, caller: Caller, op: str, *args: object, **kwargs: object) -> Any:
    return await syscall(kernel, MEMORY_SYS[op], caller, *args, **kwargs)


class MemorySpace(Space):
    """memory/: every operation goes to the memory store, as the caller, through the
    syscall of its name (the store checks what the VFS does not)."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel

    async def _call(self, ctx: Any, op: str, *args: object, **kwargs: object) -> Any:
        return await mem(self.kernel, caller_of(ctx), op, *args, **kwargs)

    async def lookup(self, parent: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        return entry_attrs(await self._call(ctx, "lookup", store_ino(parent), name))

    async def getattr(self, ino: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return entry_attrs(await self._call(ctx, "getattr", store_ino(ino)))

    async def setattr(
        self, ino: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, handle: Handle | None, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        values = ownership(attr, fields)
        if not any(getattr(fields, "update_" + f) for f in ("mode", "uid", "gid", "size", "atime", "mtime")):
            values["chown"] = True  # what chown(-1, -1) sends (utimensat with both UTIME_OMIT sends nothing)
        if fields.update_atime:
            values["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            values["mtime_ns"] = attr.st_mtime_ns
        if fields.update_size:
            values["size"] = attr.st_size
            values["commit"] = not isinstance(handle, MemoryHandle)
        return entry_attrs(await self._call(ctx, "setattr", store_ino(ino), **values))

    async def opendir(self, ino: int, ctx: Any) -> None:
        if not (await self._call(ctx, "getattr", store_ino(ino))).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)

    async def readdir(self, ino: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for next_id, name, attr in await self._call(None, "readdir", store_ino(ino), start_id):
            if not pyfuse3.readdir_reply(token, name, entry_attrs(attr), next_id):
                break

    async def mkdir(self, parent: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return entry_attrs(await self._call(ctx, "mkdir", store_ino(parent), name, mode & ~ctx.umask, ctx.uid, ctx.gid))

    async def rmdir(self, parent: int, name: bytes, ctx: Any) -> None:
        await self._call(ctx, "rmdir", store_ino(parent), name)

    async def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: Any) -> tuple[Handle, pyfuse3.EntryAttributes]:
        attr = entry_attrs(await self._call(ctx, "create", store_ino(parent), name, mode & ~ctx.umask, ctx.uid, ctx.gid))
        return await self.open(attr.st_ino, flags & ~os.O_TRUNC, ctx), attr

    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return entry_attrs(await self._call(ctx, "create", store_ino(parent), name, mode & ~ctx.umask, ctx.uid, ctx.gid, rdev))

    async def unlink(self, parent: int, name: bytes, ctx: Any) -> None:
        await self._call(ctx, "unlink", store_ino(parent), name)

    async def rename(self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes, flags: int, ctx: Any) -> None:
        await self._call(ctx, "rename", store_ino(parent_old), name_old, store_ino(parent_new), name_new, flags)

    async def symlink(self, parent: int, name: bytes, target: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        return entry_attrs(await self._call(ctx, "symlink", store_ino(parent), name, target, ctx.uid, ctx.gid))

    async def readlink(self, ino: int, ctx: Any) -> bytes:
        result: bytes = await self._call(ctx, "readlink", store_ino(ino))
        return result

    async def link(self, ino: int, new_parent: int, new_name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        return entry_attrs(await self._call(ctx, "link", store_ino(ino), store_ino(new_parent), new_name))

    async def open(self, ino: int, flags: int, ctx: Any) -> Handle:
        if (await self._call(ctx, "getattr", store_ino(ino))).is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        await self._call(ctx, "open", store_ino(ino), bool(flags & os.O_TRUNC))
        # direct I/O (ops.py opens every file so): each write() reaches the store whole
        # (up to max_write), so a quota refusal writes nothing; through the page cache a
        # write is split at page edges.
        return MemoryHandle(self.kernel, caller_of(ctx), None, flags, store_ino(ino))


class MemoryHandle(Handle):
    """An open memory file: writes go to the store's overlay, each flush (close) and
    fsync commits them; the last release of the inode keeps a version."""

    def __init__(self, kernel: Kernel, caller: Caller, agent: Agent | None, flags: int, ino: int) -> None:
        super().__init__(kernel, caller, agent, flags)
        self.ino = ino
        self.lock = trio.Lock()  # concurrent requests on one handle keep their order

    async def read(self, off: int, size: int) -> bytes:
        return await self._call("read", self.ino, off, size)

    async def write(self, off: int, buf: bytes) -> int:
        if self.flags & os.O_ACCMODE == os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EBADF)
        async with self.lock:
            return await self._call("write", self.ino, off, buf, append=bool(self.flags & os.O_APPEND))

    async def flush(self) -> None:
        if self.flags & os.O_ACCMODE == os.O_RDONLY:
            return  # a reader's close must not make a writer's unfinished data durable
        async with self.lock:
            await self._call("flush", self.ino)

    async def fsync(self) -> None:
        async with self.lock:
            await self._call("fsync", self.ino)

    async def release(self) -> None:
        await self._call("release", self.ino)

    async def _call(self, op: str, *args: object, **kwargs: object) -> Any:
        return await mem(self.kernel, self.caller, op, *args, **kwargs)


class RecallHandle(AskHandle):
    """recall: write a query, read the ranked passages as JSON Lines
    `{"rank", "path", "line", "score", "text"}`; the next write starts a new query.
    Each fd is a private session, like `call`."""

    async def check(self, data: bytes) -> None:
        checks.request_size(len(data), "the query")

    async def answer(self, data: bytes) -> tuple[bytes, int]:
        assert self.agent is not None
        passages: list[Passage] = await syscall(self.kernel, Sys.MEMORY_RECALL, self.caller, self.agent, data, self.agent.config.memory_top_k)
        lines = (json.dumps({"rank": i + 1, "path": p.path, "line": p.line, "score": p.score, "text": p.text}) for i, p in enumerate(passages))
        return b"".join(line.encode() + b"\n" for line in lines), 0
