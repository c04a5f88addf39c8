"""The FUSE operations: one thin method per operation over the dirtab and the kernel.

Each inode is one of three kinds, told apart by its number: a synthetic file or
directory of the dirtab (`tree.py`), a file of an agent's memory/ (`memfiles.py`),
or a scratch file of an agent directory (`scratch.py`, `restore.py`).

Every handler runs inside `_guard`: a KernelError becomes its errno, any other
exception is logged and becomes EIO, so no bug can end `pyfuse3.main()` and take
the mount down.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from kernel import Agent, Caller, Kernel, metrics_registry, params
from kernel.errors import KernelError
from kernel.syscall import Sys, syscall

from . import restore, toolfiles
from .dirtab import MEMORY, TABLES, Cls, Entry, Kind, child, inode
from .files import Handle
from .memfiles import MemoryHandle, entry_attrs, fuse_ino, is_mem, mem, store_ino
from .scratch import READDIR_BASE, RENAME_NOREPLACE, SCRATCH_BASE, ScratchFile, ScratchFiles, ScratchHandle, is_scratch, is_scratch_name
from .streams import Waiting
from .tree import Tree, caller_of

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


_caller = caller_of


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


def _ownership(attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields) -> dict[str, Any]:
    """What a chmod/chown asks for, as keyword values."""
    values: dict[str, Any] = {}
    if fields.update_mode:
        values["mode"] = attr.st_mode & 0o7777
    if fields.update_uid:
        values["uid"] = attr.st_uid
    if fields.update_gid:
        values["gid"] = attr.st_gid
    return values


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
        self.scratch = ScratchFiles()

    # -- names and attributes ---------------------------------------------------
    def _resolve(self, ino: int) -> tuple[Entry, Agent | None]:
        if is_scratch(ino):
            raise pyfuse3.FUSEError(errno.ENOTDIR)  # a scratch file where a directory was expected
        return self.tree.resolve(ino)

    async def _attrs(self, ino: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if is_scratch(ino):
            return self.scratch.get(ino).attrs()
        return await self.tree.attrs(ino, ctx)

    @_guard
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if is_mem(parent_inode):
            return entry_attrs(await mem(self.kernel, _caller(ctx), "lookup", store_ino(parent_inode), name))
        parent, agent = self._resolve(parent_inode)
        text = os.fsdecode(name)
        if parent.kind is Kind.AGENT and agent is not None:
            return await self._agent_lookup(agent, name, ctx)
        if parent.kind is Kind.TOOLS:
            return await self._attrs(toolfiles.lookup(self.kernel, text), ctx)
        if parent.kind is Kind.AGENTS:
            found = self.kernel.agents.get(text)
            if found is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return await self._attrs(inode(found.row.id, Kind.AGENT), ctx)
        entry = child(parent.kind, text)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self._attrs(inode(0, entry.kind), ctx)

    async def _agent_lookup(self, agent: Agent, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        """A name in an agent directory: a fixed file, memory/ or a scratch file. To an
        exclusive create of a fixed name (or a mkdir of memory) the name looks free,
        so that the create reaches `create` (`mkdir`) instead of failing with EEXIST."""
        text = os.fsdecode(name)
        entry = child(Kind.AGENT, text)
        if text == MEMORY:
            if restore.exclusive(ctx, name, "mkdir"):
                raise pyfuse3.FUSEError(errno.ENOENT)
            return await self._mem_attrs(await self.kernel.memory.root(agent), ctx)
        if entry is not None:
            if restore.exclusive(ctx, name, "open"):
                raise pyfuse3.FUSEError(errno.ENOENT)
            return await self._attrs(inode(agent.row.id, entry.kind), ctx)
        found = self.scratch.named(agent.row.id, name)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return found.attrs()

    @_guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if is_mem(inode):
            return await self._mem_attrs(store_ino(inode), ctx)
        return await self._attrs(inode, ctx)

    async def _mem_attrs(self, ino: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return entry_attrs(await mem(self.kernel, _caller(ctx), "getattr", ino))

    @_guard
    async def setattr(
        self, ino: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if is_mem(ino):
            return await self._mem_setattr(ino, attr, fields, fh, ctx)
        if is_scratch(ino):
            self.scratch.setattr(self.scratch.get(ino), attr, fields)
            return await self._attrs(ino, ctx)
        entry, agent = self._resolve(ino)
        caller = _caller(ctx)
        if fields.update_size:
            await self._truncate(entry, agent, fh, attr.st_size, caller)
        if agent is not None and (fields.update_mode or fields.update_uid or fields.update_gid):
            await self._chattr(entry, agent, attr, fields, caller)
        elif fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return await self._attrs(ino, ctx)  # times: accepted and not kept (they follow the agent's changes)

    async def _mem_setattr(
        self, ino: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        values = _ownership(attr, fields)
        if not any(getattr(fields, "update_" + f) for f in ("mode", "uid", "gid", "size", "atime", "mtime")):
            values["chown"] = True  # what chown(-1, -1) sends (utimensat with both UTIME_OMIT sends nothing)
        if fields.update_atime:
            values["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            values["mtime_ns"] = attr.st_mtime_ns
        if fields.update_size:
            values["size"] = attr.st_size
            values["commit"] = not isinstance(self.handles.get(fh) if fh is not None else None, MemoryHandle)
        result = await mem(self.kernel, _caller(ctx), "setattr", store_ino(ino), **values)
        return entry_attrs(result)

    async def _truncate(self, entry: Entry, agent: Agent | None, fh: int | None, size: int, caller: Caller) -> None:
        if size != 0 or entry.cls not in (Cls.SUBMIT, Cls.STORED, Cls.CTL):
            raise pyfuse3.FUSEError(errno.EPERM if entry.cls is Cls.DIR else errno.EINVAL)
        handle = self.handles.get(fh) if fh is not None else None
        if handle is not None:
            handle.truncate()
        elif entry.cls is Cls.STORED and agent is not None:
            await syscall(self.kernel, self.tree.stored_call(entry.kind)[0], caller, agent, b"")

    async def _chattr(self, entry: Entry, agent: Agent, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, caller: Caller) -> None:
        """chmod/chown: the VFS has checked ownership (default_permissions); we persist.
        The files of an agent share its directory's owner: a chown of one is accepted
        and changes nothing (copy tools set every file's owner)."""
        values: dict[str, Any] = {}
        if entry.kind is Kind.AGENT:
            values = _ownership(attr, fields)
        elif fields.update_mode:
            values["file_modes"] = {**agent.row.file_modes, entry.name: attr.st_mode & 0o7777}
        if values:
            await syscall(self.kernel, Sys.AGENT_SETATTR, caller, agent, **values)

    # -- directories --------------------------------------------------------------
    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if is_mem(inode):
            attr = await mem(self.kernel, _caller(ctx), "getattr", store_ino(inode))
            if not attr.is_dir:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            return inode
        entry, _ = self._resolve(inode)
        if entry.cls is not Cls.DIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if is_mem(fh):
            for next_id, name, attr in await mem(self.kernel, _caller(None), "readdir", store_ino(fh), start_id):
                if not pyfuse3.readdir_reply(token, name, entry_attrs(attr), next_id):
                    break
            return
        entry, agent = self._resolve(fh)
        rows: list[tuple[int, str, int]] = []  # (next id, name, inode)
        if entry.kind is Kind.AGENTS:
            for a in sorted(self.kernel.agents.values(), key=lambda a: a.row.id):
                rows.append((a.row.id, a.name, inode(a.row.id, Kind.AGENT)))
        elif entry.kind is Kind.TOOLS:
            rows = toolfiles.listing(self.kernel)
        else:
            table = TABLES[Kind.AGENT if entry.kind is Kind.AGENT else entry.kind]
            base = agent.row.id if agent else 0
            rows = [(i + 1, e.name, inode(base, e.kind)) for i, e in enumerate(table)]
            if agent is not None:
                rows.append((len(table) + 1, MEMORY, fuse_ino(await self.kernel.memory.root(agent))))
                rows += [(READDIR_BASE + f.ino - SCRATCH_BASE, os.fsdecode(f.name), f.ino) for f in self.scratch.listing(agent.row.id)]
        for next_id, name, ino in rows:
            if next_id <= start_id:
                continue
            attrs = await self._mem_attrs(store_ino(ino), None) if is_mem(ino) else await self._attrs(ino)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, next_id):
                break

    @_guard
    async def releasedir(self, fh: int) -> None:
        return None

    @_guard
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if is_mem(parent_inode):
            made = await mem(self.kernel, _caller(ctx), "mkdir", store_ino(parent_inode), name, mode & ~ctx.umask, ctx.uid, ctx.gid)
            return entry_attrs(made)
        parent, agent = self._resolve(parent_inode)
        if parent.kind is Kind.AGENT and agent is not None and name == MEMORY.encode():  # a copy tool recreating it (restore.py)
            return await restore.make_memory(self.kernel, agent, _caller(ctx))
        if parent.kind is not Kind.AGENTS:
            raise pyfuse3.FUSEError(errno.EPERM)
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        agent = await syscall(self.kernel, Sys.AGENT_CREATE, _caller(ctx), text, mode & ~ctx.umask & 0o7777)
        return await self._attrs(inode(agent.row.id, Kind.AGENT), ctx)

    @_guard
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if is_mem(parent_inode):
            await mem(self.kernel, _caller(ctx), "rmdir", store_ino(parent_inode), name)
            return
        parent, agent = self._resolve(parent_inode)
        if parent.kind is not Kind.AGENTS:
            text = os.fsdecode(name)
            if agent is not None and self.scratch.named(agent.row.id, name) is not None:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            structural = child(parent.kind, text) or (parent.kind is Kind.AGENT and text == MEMORY)
            raise pyfuse3.FUSEError(errno.EPERM if structural else errno.ENOENT)
        removed = self.kernel.agents.get(os.fsdecode(name))
        await syscall(self.kernel, Sys.AGENT_REMOVE, _caller(ctx), os.fsdecode(name))
        if removed is not None:
            self.scratch.drop_agent(removed.row.id)

    def _agent_dir(self, parent_inode: int) -> Agent | None:
        """The agent whose directory `parent_inode` is; None for any other directory."""
        if is_mem(parent_inode) or is_scratch(parent_inode):
            return None
        parent, agent = self._resolve(parent_inode)
        return agent if parent.kind is Kind.AGENT else None

    @_guard
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        caller = _caller(ctx)
        if is_mem(parent_inode):
            made = await mem(self.kernel, caller, "create", store_ino(parent_inode), name, mode & ~ctx.umask, ctx.uid, ctx.gid)
            attr = entry_attrs(made)
            return await self._mem_open(attr.st_ino, flags & ~os.O_TRUNC, caller), attr
        agent = self._agent_dir(parent_inode)
        entry = child(Kind.AGENT, os.fsdecode(name))
        if agent is not None and entry is not None and entry.cls is not Cls.DIR:  # an exclusive create (restore.py)
            ino = inode(agent.row.id, entry.kind)
            handle = await restore.open_fixed(self.tree, entry, agent, flags, mode & ~ctx.umask, caller)
            return pyfuse3.FileInfo(fh=self._add_handle(handle), direct_io=True, keep_cache=False), await self._attrs(ino, ctx)
        if agent is not None and entry is None and is_scratch_name(name):
            found = self.scratch.create(agent.row.id, name, mode & ~ctx.umask, ctx.uid, ctx.gid)
            handle = ScratchHandle(self.kernel, caller, flags, found, self.scratch)
            return pyfuse3.FileInfo(fh=self._add_handle(handle), direct_io=True, keep_cache=False), found.attrs()
        raise pyfuse3.FUSEError(errno.EPERM)  # the synthetic tree is fixed: files are made in memory/

    @_guard
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if not is_mem(parent_inode):
            raise pyfuse3.FUSEError(errno.EPERM)
        made = await mem(self.kernel, _caller(ctx), "create", store_ino(parent_inode), name, mode & ~ctx.umask, ctx.uid, ctx.gid, rdev)
        return entry_attrs(made)

    @_guard
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if is_mem(parent_inode):
            await mem(self.kernel, _caller(ctx), "unlink", store_ino(parent_inode), name)
            return
        agent = self._agent_dir(parent_inode)
        if agent is None or not is_scratch_name(name) or child(Kind.AGENT, os.fsdecode(name)) is not None:
            raise pyfuse3.FUSEError(errno.EPERM)
        self.scratch.unlink(agent.row.id, name)

    @_guard
    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes, flags: int, ctx: pyfuse3.RequestContext
    ) -> None:
        if is_mem(parent_inode_old) and is_mem(parent_inode_new):
            await mem(self.kernel, _caller(ctx), "rename", store_ino(parent_inode_old), name_old, store_ino(parent_inode_new), name_new, flags)
            return
        agent = self._agent_dir(parent_inode_old)
        found = self.scratch.named(agent.row.id, name_old) if agent is not None else None
        if found is None or agent is None:
            raise pyfuse3.FUSEError(errno.EXDEV if is_mem(parent_inode_old) or is_mem(parent_inode_new) else errno.EPERM)
        if parent_inode_new != parent_inode_old:
            raise pyfuse3.FUSEError(errno.EXDEV)  # a scratch file stays in its agent directory
        await self._rename_scratch(agent, found, name_new, flags, _caller(ctx))

    async def _rename_scratch(self, agent: Agent, found: ScratchFile, new: bytes, flags: int, caller: Caller) -> None:
        """A scratch file renamed: onto a fixed file (restore.py), or to another scratch name."""
        entry = child(Kind.AGENT, os.fsdecode(new))
        if new == MEMORY.encode():
            raise pyfuse3.FUSEError(errno.EISDIR)
        if entry is None:
            if not is_scratch_name(new):
                raise pyfuse3.FUSEError(errno.EPERM)
            self.scratch.rename(agent.row.id, found.name, new, flags)
            return
        if flags:
            raise pyfuse3.FUSEError(errno.EEXIST if flags == RENAME_NOREPLACE else errno.EINVAL)  # a fixed file always exists
        await restore.rename_onto(self.tree, found, entry, agent, caller)
        self.scratch.unlink(agent.row.id, found.name)

    @_guard
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if not is_mem(parent_inode):
            raise pyfuse3.FUSEError(errno.EPERM)
        made = await mem(self.kernel, _caller(ctx), "symlink", store_ino(parent_inode), name, target, ctx.uid, ctx.gid)
        return entry_attrs(made)

    @_guard
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        if not is_mem(inode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return await mem(self.kernel, _caller(ctx), "readlink", store_ino(inode))

    @_guard
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if is_mem(inode) and is_mem(new_parent_inode):
            made = await mem(self.kernel, _caller(ctx), "link", store_ino(inode), store_ino(new_parent_inode), new_name)
            return entry_attrs(made)
        raise pyfuse3.FUSEError(errno.EXDEV if is_mem(inode) or is_mem(new_parent_inode) else errno.EPERM)

    # -- files ----------------------------------------------------------------------
    @_guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if is_mem(inode):
            return await self._mem_open(inode, flags, _caller(ctx))
        if is_scratch(inode):
            handle: Handle = ScratchHandle(self.kernel, _caller(ctx), flags, self.scratch.get(inode), self.scratch)
            return pyfuse3.FileInfo(fh=self._add_handle(handle), direct_io=True, keep_cache=False)
        entry, agent = self._resolve(inode)
        if entry.cls is Cls.DIR:
            raise pyfuse3.FUSEError(errno.EISDIR)
        handle = await self.tree.make_handle(inode, entry, agent, flags, _caller(ctx))
        info = pyfuse3.FileInfo(fh=self._add_handle(handle), direct_io=True, keep_cache=False)
        info.nonseekable = entry.cls in (Cls.RPC, Cls.EVENTS)
        return info

    def _add_handle(self, handle: Handle) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = handle
        return fh

    async def _mem_open(self, inode: int, flags: int, caller: Caller) -> pyfuse3.FileInfo:
        attr = await mem(self.kernel, caller, "getattr", store_ino(inode))
        if attr.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        await mem(self.kernel, caller, "open", store_ino(inode), bool(flags & os.O_TRUNC))
        handle = MemoryHandle(self.kernel, caller, None, flags, store_ino(inode))
        # direct I/O: each write() reaches the store whole (up to max_write), so a quota
        # refusal writes nothing; through the page cache a write is split at page edges.
        return pyfuse3.FileInfo(fh=self._add_handle(handle), direct_io=True, keep_cache=False)

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
