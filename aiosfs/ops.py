"""The FUSE operations: each is routed to the inode space it concerns (spaces.py).

Each inode is in one of three spaces, told apart by its number: the synthetic tree
of the dirtab (`synthetic.py`, over `tree.py`), an agent's memory/ (`memfiles.py`),
or a scratch file of an agent directory (`scratch.py`, `restore.py`). An operation
on an inode goes to its space, one on a name to the space of its directory, one on
two (rename, link) to their common space, or is refused as a move between spaces.
This module keeps the open handles, by file handle number, and what concerns the
whole mount (statfs, poll notifications, the count of requests).

Every handler runs inside `_guard`: a KernelError becomes its errno, any other
exception is logged and becomes EIO, so no bug can end `pyfuse3.main()` and take
the mount down.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from kernel import Kernel, metrics_registry, params
from kernel.errors import KernelError

from .dirtab import TABLES, Kind
from .files import Handle
from .memfiles import MemorySpace, is_mem
from .scratch import ScratchFiles, ScratchSpace, is_scratch
from .spaces import Space
from .streams import Waiting
from .synthetic import SyntheticSpace
from .tree import Tree

log = logging.getLogger(__name__)

DIR_KINDS = (Kind.ROOT, Kind.KERNEL, Kind.AGENTS, Kind.AGENT, Kind.TOOLS)


P = ParamSpec("P")
R = TypeVar("R")


def _guard(method: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    name = method.__name__

    @functools.wraps(method)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        args[0].requests[name] += 1  # type: ignore[attr-defined]
        try:
            return await method(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except KernelError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("bug in %s%r; answering EIO", method.__name__, args[1:])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return guarded


class RequestCollector(Collector):
    """`aiosfs_fuse_requests_total{op}`: what clients ask of the mount, by operation. A
    path walk asks for every directory on its way that the VFS does not hold: a sudden
    rise of lookup and getattr against open says a tool walks paths afresh each time."""

    def __init__(self, requests: collections.Counter[str]) -> None:
        self.requests = requests

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("aiosfs_fuse_requests", "FUSE requests answered, by operation.", labels=["op"])
        for op, count in sorted(self.requests.items()):
            family.add_metric([op], count)
        yield family


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, kernel: Kernel) -> None:
        super().__init__()
        self.kernel = kernel
        self.handles: dict[int, Handle] = {}
        self.next_fh = 1
        self.waiting = Waiting()
        self.nursery: trio.Nursery | None = None  # set by the mount, for poll notifications
        self.mounted_at = time.time()
        self.requests: collections.Counter[str] = collections.Counter()  # FUSE requests answered, by operation
        self.metrics = metrics_registry(kernel)  # kernel/metrics, and mount --metrics
        self.metrics.register(RequestCollector(self.requests))
        self.tree = Tree(kernel, self.waiting, self.metrics, self.mounted_at)
        scratch = ScratchFiles()
        self.memory = MemorySpace(kernel)
        self.scratch = ScratchSpace(kernel, scratch)
        self.synthetic = SyntheticSpace(kernel, self.tree, self.memory, scratch)

    def _space(self, ino: int) -> Space:
        """The space an inode is in: its number says."""
        if is_mem(ino):
            return self.memory
        if is_scratch(ino):
            return self.scratch
        return self.synthetic

    def _across(self, one: int, other: int) -> Space:
        """The one space of an operation on two inodes; EXDEV into or out of memory/,
        EPERM between the others (nothing moves between them)."""
        space = self._space(one)
        if self._space(other) is not space:
            raise pyfuse3.FUSEError(errno.EXDEV if self.memory in (space, self._space(other)) else errno.EPERM)
        return space

    # -- names and attributes ---------------------------------------------------
    @_guard
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._space(parent_inode).lookup(parent_inode, name, ctx)

    @_guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._space(inode).getattr(inode, ctx)

    @_guard
    async def setattr(
        self, ino: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        handle = self.handles.get(fh) if fh is not None else None
        return await self._space(ino).setattr(ino, attr, fields, handle, ctx)

    # -- directories --------------------------------------------------------------
    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        await self._space(inode).opendir(inode, ctx)
        return inode

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        await self._space(fh).readdir(fh, start_id, token)

    @_guard
    async def releasedir(self, fh: int) -> None:
        return None

    @_guard
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._space(parent_inode).mkdir(parent_inode, name, mode, ctx)

    @_guard
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._space(parent_inode).rmdir(parent_inode, name, ctx)

    @_guard
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        handle, attr = await self._space(parent_inode).create(parent_inode, name, mode, flags, ctx)
        return self._file_info(handle), attr

    @_guard
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._space(parent_inode).mknod(parent_inode, name, mode, rdev, ctx)

    @_guard
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._space(parent_inode).unlink(parent_inode, name, ctx)

    @_guard
    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes, flags: int, ctx: pyfuse3.RequestContext
    ) -> None:
        space = self._across(parent_inode_old, parent_inode_new)
        await space.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx)

    @_guard
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._space(parent_inode).symlink(parent_inode, name, target, ctx)

    @_guard
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self._space(inode).readlink(inode, ctx)

    @_guard
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._across(inode, new_parent_inode).link(inode, new_parent_inode, new_name, ctx)

    # -- files ----------------------------------------------------------------------
    @_guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return self._file_info(await self._space(inode).open(inode, flags, ctx))

    def _file_info(self, handle: Handle) -> pyfuse3.FileInfo:
        """Every file is opened with direct I/O: reads see what the kernel has now, and each
        write() reaches its handle whole (a memory file's quota refusal writes nothing)."""
        info = pyfuse3.FileInfo(fh=self._add_handle(handle), direct_io=True, keep_cache=False)
        info.nonseekable = handle.nonseekable
        return info

    def _add_handle(self, handle: Handle) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = handle
        return fh

    def _handle(self, fh: int) -> Handle:
        handle = self.handles.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return handle

    @_guard
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self._handle(fh).read(off, size)

    @_guard
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self._handle(fh).write(off, buf)

    @_guard
    async def flush(self, fh: int) -> None:
        await self._handle(fh).flush()

    @_guard
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._handle(fh).fsync()

    @_guard
    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if handle is not None:
            await handle.release()

    @_guard
    async def poll(self, inode: int, fh: int, poll_handle: pyfuse3.PollHandle | None, ctx: pyfuse3.RequestContext) -> int:
        mask, waiter = self._handle(fh).poll()  # a waiter: not readable yet (`call` is always writable)
        if waiter is not None and poll_handle is not None and self.nursery is not None:
            self.nursery.start_soon(self._notify_when_ready, waiter, poll_handle)
        return mask

    @staticmethod
    async def _notify_when_ready(waiter: Callable[[], Awaitable[Any]], poll_handle: pyfuse3.PollHandle) -> None:
        await waiter()  # returns on a change or after a while: the kernel then polls again
        poll_handle.notify()

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_files = len(self.kernel.agents) * len(TABLES[Kind.AGENT]) + 16
        data.f_namemax = params.MAX_NAME_BYTES
        store = self.kernel.memory.store
        total = max(1, len(self.kernel.agents)) * store.quota
        used = sum(store.usage(a.row.id) for a in self.kernel.agents.values())
        data.f_blocks = total // data.f_frsize
        data.f_bfree = data.f_bavail = max(0, total - used) // data.f_frsize
        return data

    @_guard
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None  # inode numbers are never reused, so there is nothing to free
