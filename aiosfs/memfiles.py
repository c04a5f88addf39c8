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
