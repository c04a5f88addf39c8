"""The synthetic part of the mount: what an inode of the dirtab is, its attributes,
and the handle that an open of it gets.

Sizes are what a read right after the stat would return, so that tools that copy
a file's st_size bytes (tar) copy all of it: the text of stored and snapshot files
rendered for the caller, the length of the caller's latest job for `output`, 0 for
the files that read empty to a copy (prompt, ctl, call, recall, events).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import pyfuse3
from prometheus_client import CollectorRegistry

from kernel import Agent, Caller, Kernel, params, render_context
from kernel.errors import KernelError
from kernel.syscall import Sys, Syscall, syscall

from . import render, toolfiles
from .dirtab import BY_KIND, Cls, Entry, Kind, agent_of, kind_of
from .files import CtlHandle, Handle, SnapshotHandle, StoredHandle, SubmitHandle
from .memfiles import RecallHandle, is_mem
from .spaces import caller_of
from .streams import EventsHandle, GrowingHandle, RpcHandle, Waiting

log = logging.getLogger(__name__)

FIXED_DIRS = (Kind.KERNEL, Kind.AGENTS, Kind.TOOLS)  # root's children: names that never change
# The root's own attributes are never kept: every walk then asks the daemon once, so a
# mount whose daemon died says ENOTCONN at once (to a stat of the mountpoint, as tools
# and `aiosfs mount` test it), not a second later.


class Tree:
    def __init__(self, kernel: Kernel, waiting: Waiting, metrics: CollectorRegistry, mounted_at: float) -> None:
        self.kernel = kernel
        self.waiting = waiting
        self.metrics = metrics
        self.mounted_at = mounted_at

    def resolve(self, ino: int) -> tuple[Entry, Agent | None]:
        if is_mem(ino):
            raise pyfuse3.FUSEError(errno.EXDEV)  # a memory inode where a synthetic one was expected
        try:
            kind = kind_of(ino)
        except ValueError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        if kind in toolfiles.TOOL_KINDS:
            return toolfiles.entry(self.kernel, ino), None
        agent_id = agent_of(ino)
        if agent_id == 0:
            if kind >= Kind.AGENT:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return BY_KIND[kind], None
        agent = self.kernel.agents.by_id(agent_id)
        if agent is None or kind < Kind.AGENT:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return BY_KIND[kind], agent

    async def attrs(self, ino: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        entry, agent = self.resolve(ino)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.generation = 0
        attr.entry_timeout = params.DIR_CACHE_SECONDS if entry.kind in FIXED_DIRS else 0
        attr.attr_timeout = params.DIR_CACHE_SECONDS if entry.cls is Cls.DIR and entry.kind is not Kind.ROOT else 0
        attr.st_blksize = 4096
        attr.st_nlink = 2 if entry.cls is Cls.DIR else 1
        stamp = self.mounted_at
        if agent is None:
            attr.st_mode = entry.st_mode
            attr.st_uid = attr.st_gid = 0
        else:
            mode = agent.row.mode if entry.kind is Kind.AGENT else agent.row.file_modes.get(entry.name, entry.mode)
            attr.st_mode = (entry.st_mode & ~0o7777) | mode
            attr.st_uid, attr.st_gid = agent.row.uid, agent.row.gid
            stamp = agent.row.changed or agent.row.created
        attr.st_size = await self.size(ino, entry, agent, caller_of(ctx))
        attr.st_blocks = -(-attr.st_size // 512)  # not 0: cp would take a file with content but no blocks for a sparse one
        ns = int(stamp * 1e9)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = ns
        return attr

    async def size(self, ino: int, entry: Entry, agent: Agent | None, caller: Caller) -> int:
        if entry.cls is Cls.STORED:
            return len(self.stored_text(entry.kind, agent).encode())
        if entry.cls is Cls.SNAPSHOT:
            try:
                if entry.kind is Kind.TOOL_SCHEMA:
                    return len(toolfiles.schema_text(self.kernel, ino).encode())
                return len((await self.snapshot(entry.kind, agent, caller)).encode())
            except (pyfuse3.FUSEError, KernelError):
                raise
            except Exception:  # a stat must work even when a snapshot's text cannot be made (its open says why)
                log.exception("could not render %s for its size", entry.name)
                return 0
        if entry.cls is Cls.GROWING and agent is not None:
            job = self.kernel.requests.latest_job(agent, caller.uid)  # a stat reads the binding; opens make it (Sys.OUTPUT_BIND)
            return len(job.data) if job is not None else 0
        return 0

    def stored_text(self, kind: Kind, agent: Agent | None) -> str:
        if agent is None:
            return self.kernel.engine.scheduler.describe() + "\n"
        if kind is Kind.CONFIG:
            return agent.config.render()
        if kind is Kind.PERMISSIONS:
            return self.kernel.agents.permissions_text(agent)
        return render_context(agent.messages)

    @staticmethod
    def stored_call(kind: Kind) -> tuple[Syscall[..., Any], int]:
        if kind is Kind.CONFIG:
            return Sys.CONFIG_WRITE, params.MAX_CONFIG_BYTES
        if kind is Kind.CONTEXT:
            return Sys.CONTEXT_WRITE, params.MAX_CONTEXT_BYTES
        if kind is Kind.PERMISSIONS:
            return Sys.PERMISSIONS_WRITE, params.MAX_CONFIG_BYTES
        return Sys.SCHED_SET, params.MAX_CTL_LINE

    def stored_handle(self, entry: Entry, agent: Agent | None, flags: int, caller: Caller) -> StoredHandle:
        call, limit = self.stored_call(entry.kind)
        return StoredHandle(self.kernel, caller, agent, flags, functools.partial(self.stored_text, entry.kind, agent), call, limit)

    @staticmethod
    def check_class(entry: Entry, flags: int) -> None:
        """The class decides what an open may do, for root too (mode bits cannot):
        files whose content the kernel makes are never opened for writing."""
        if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR) and entry.cls in (Cls.SNAPSHOT, Cls.GROWING, Cls.EVENTS):
            raise pyfuse3.FUSEError(errno.EACCES)

    async def make_handle(self, ino: int, entry: Entry, agent: Agent | None, flags: int, caller: Caller) -> Handle:
        self.check_class(entry, flags)
        kernel = self.kernel
        if entry.kind in toolfiles.TOOL_KINDS:
            return toolfiles.open_handle(kernel, caller, ino, flags)
        if entry.cls is Cls.SNAPSHOT:
            return SnapshotHandle(kernel, caller, agent, flags, await self.snapshot(entry.kind, agent, caller))
        if entry.cls is Cls.EVENTS:
            return EventsHandle(kernel, caller, agent, flags, agent.events if agent else kernel.events, self.waiting)
        if entry.cls is Cls.STORED:
            return self.stored_handle(entry, agent, flags, caller)
        if entry.cls is Cls.CTL:
            return CtlHandle(kernel, caller, agent, flags)
        assert agent is not None
        if entry.cls is Cls.SUBMIT:
            return SubmitHandle(kernel, caller, agent, flags)
        if entry.cls is Cls.GROWING:
            return GrowingHandle(kernel, caller, agent, flags, await syscall(kernel, Sys.OUTPUT_BIND, caller, agent), self.waiting)
        if entry.kind is Kind.RECALL:
            return RecallHandle(kernel, caller, agent, flags)
        return RpcHandle(kernel, caller, agent, flags, self.waiting)

    async def snapshot(self, kind: Kind, agent: Agent | None, caller: Caller) -> str:
        k = self.kernel
        if agent is not None:
            if kind is Kind.VERSIONS:
                return await render.versions(k, agent, caller)
            return render.agent_status(k, agent, caller) if kind is Kind.STATUS else render.agent_error(agent, caller)
        renderers: dict[Kind, Callable[[], str]] = {
            Kind.README: lambda: render.README,
            Kind.K_STATUS: lambda: k.status_line() + "\n",
            Kind.K_STATS: lambda: render.kernel_stats(k),
            Kind.K_METRICS: lambda: render.kernel_metrics(self.metrics),
            Kind.K_PS: lambda: render.kernel_ps(k, caller),
            Kind.K_MODELS: lambda: render.kernel_models(k),
            Kind.K_LOG: lambda: render.kernel_log(k),
            Kind.K_TRASH: lambda: render.kernel_trash(k),
        }
        return renderers[kind]()
