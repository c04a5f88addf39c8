"""The synthetic tree's space: the FUSE operations on the root, kernel/, agents/,
tools/ and each agent's fixed files (what they are and what they hold: `tree.py`).

An agent directory also holds two names of other spaces: `memory`, the root of its
memory/ (`memfiles.py`), and the scratch files that copy tools write beside the fixed
files (`scratch.py`); the operations on those names start here, in the directory's
space, and what they find belongs to the other space from then on.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pyfuse3

from kernel import Agent, Caller, Kernel
from kernel.syscall import Sys, syscall

from . import restore, toolfiles
from .dirtab import MEMORY, TABLES, Cls, Entry, Kind, child, inode
from .files import Handle
from .memfiles import MemorySpace, fuse_ino
from .scratch import READDIR_BASE, RENAME_NOREPLACE, SCRATCH_BASE, ScratchFile, ScratchFiles, ScratchHandle, is_scratch_name
from .spaces import Space, caller_of, ownership
from .tree import Tree

Attrs = Callable[[], Awaitable[pyfuse3.EntryAttributes]]


async def _now(attrs: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
    return attrs


class SyntheticSpace(Space):
    def __init__(self, kernel: Kernel, tree: Tree, memory: MemorySpace, scratch: ScratchFiles) -> None:
        self.kernel = kernel
        self.tree = tree
        self.memory = memory
        self.scratch = scratch

    # -- names ---------------------------------------------------------------------
    async def lookup(self, parent: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        entry, agent = self.tree.resolve(parent)
        text = os.fsdecode(name)
        if entry.kind is Kind.AGENT and agent is not None:
            return await self._agent_lookup(agent, name, ctx)
        if entry.kind is Kind.TOOLS:
            return await self.tree.attrs(toolfiles.lookup(self.kernel, text), ctx)
        if entry.kind is Kind.AGENTS:
            found = self.kernel.agents.get(text)
            if found is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return await self.tree.attrs(inode(found.row.id, Kind.AGENT), ctx)
        named = child(entry.kind, text)
        if named is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.tree.attrs(inode(0, named.kind), ctx)

    async def _agent_lookup(self, agent: Agent, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        """A name in an agent directory: a fixed file, memory/ or a scratch file. To an
        exclusive create of a fixed name (or a mkdir of memory) the name looks free,
        so that the create reaches `create` (`mkdir`) instead of failing with EEXIST."""
        text = os.fsdecode(name)
        entry = child(Kind.AGENT, text)
        if text == MEMORY:
            if restore.exclusive(ctx, name, "mkdir"):
                raise pyfuse3.FUSEError(errno.ENOENT)
            return await self.memory.getattr(fuse_ino(await self.kernel.memory.root(agent)), ctx)
        if entry is not None:
            if restore.exclusive(ctx, name, "open"):
                raise pyfuse3.FUSEError(errno.ENOENT)
            return await self.tree.attrs(inode(agent.row.id, entry.kind), ctx)
        found = self.scratch.named(agent.row.id, name)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return found.attrs()

    async def mkdir(self, parent: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        entry, agent = self.tree.resolve(parent)
        if entry.kind is Kind.AGENT and agent is not None and name == MEMORY.encode():  # a copy tool recreating it (restore.py)
            return await restore.make_memory(self.kernel, agent, caller_of(ctx))
        if entry.kind is not Kind.AGENTS:
            raise pyfuse3.FUSEError(errno.EPERM)
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        made = await syscall(self.kernel, Sys.AGENT_CREATE, caller_of(ctx), text, mode & ~ctx.umask & 0o7777)
        return await self.tree.attrs(inode(made.row.id, Kind.AGENT), ctx)

    async def rmdir(self, parent: int, name: bytes, ctx: Any) -> None:
        entry, agent = self.tree.resolve(parent)
        text = os.fsdecode(name)
        if entry.kind is not Kind.AGENTS:
            if agent is not None and self.scratch.named(agent.row.id, name) is not None:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            structural = child(entry.kind, text) or (entry.kind is Kind.AGENT and text == MEMORY)
            raise pyfuse3.FUSEError(errno.EPERM if structural else errno.ENOENT)
        removed = self.kernel.agents.get(text)
        await syscall(self.kernel, Sys.AGENT_REMOVE, caller_of(ctx), text)
        if removed is not None:
            self.scratch.drop_agent(removed.row.id)

    def _agent_dir(self, parent: int) -> Agent | None:
        """The agent whose directory `parent` is; None for any other directory."""
        entry, agent = self.tree.resolve(parent)
        return agent if entry.kind is Kind.AGENT else None

    async def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: Any) -> tuple[Handle, pyfuse3.EntryAttributes]:
        caller = caller_of(ctx)
        agent = self._agent_dir(parent)
        entry = child(Kind.AGENT, os.fsdecode(name))
        if agent is not None and entry is not None and entry.cls is not Cls.DIR:  # an exclusive create (restore.py)
            handle = await restore.open_fixed(self.tree, entry, agent, flags, mode & ~ctx.umask, caller)
            return handle, await self.tree.attrs(inode(agent.row.id, entry.kind), ctx)
        if agent is not None and entry is None and is_scratch_name(name):
            found = self.scratch.create(agent.row.id, name, mode & ~ctx.umask, ctx.uid, ctx.gid)
            return ScratchHandle(self.kernel, caller, flags, found, self.scratch), found.attrs()
        raise pyfuse3.FUSEError(errno.EPERM)  # the synthetic tree is fixed: files are made in memory/

    async def unlink(self, parent: int, name: bytes, ctx: Any) -> None:
        agent = self._agent_dir(parent)
        if agent is None or not is_scratch_name(name) or child(Kind.AGENT, os.fsdecode(name)) is not None:
            raise pyfuse3.FUSEError(errno.EPERM)
        self.scratch.unlink(agent.row.id, name)

    async def rename(self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes, flags: int, ctx: Any) -> None:
        agent = self._agent_dir(parent_old)
        found = self.scratch.named(agent.row.id, name_old) if agent is not None else None
        if found is None or agent is None:
            raise pyfuse3.FUSEError(errno.EPERM)
        if parent_new != parent_old:
            raise pyfuse3.FUSEError(errno.EXDEV)  # a scratch file stays in its agent directory
        await self._rename_scratch(agent, found, name_new, flags, caller_of(ctx))

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

    # -- inodes --------------------------------------------------------------------
    async def getattr(self, ino: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return await self.tree.attrs(ino, ctx)

    async def setattr(
        self, ino: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, handle: Handle | None, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        entry, agent = self.tree.resolve(ino)
        caller = caller_of(ctx)
        if fields.update_size:
            await self._truncate(entry, agent, handle, attr.st_size, caller)
        if agent is not None and (fields.update_mode or fields.update_uid or fields.update_gid):
            await self._chattr(entry, agent, attr, fields, caller)
        elif fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return await self.tree.attrs(ino, ctx)  # times: accepted and not kept (they follow the agent's changes)

    async def _truncate(self, entry: Entry, agent: Agent | None, handle: Handle | None, size: int, caller: Caller) -> None:
        if size != 0 or entry.cls not in (Cls.SUBMIT, Cls.STORED, Cls.CTL):
            raise pyfuse3.FUSEError(errno.EPERM if entry.cls is Cls.DIR else errno.EINVAL)
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
            values = ownership(attr, fields)
        elif fields.update_mode:
            values["file_modes"] = {**agent.row.file_modes, entry.name: attr.st_mode & 0o7777}
        if values:
            await syscall(self.kernel, Sys.AGENT_SETATTR, caller, agent, **values)

    async def opendir(self, ino: int, ctx: Any) -> None:
        entry, _ = self.tree.resolve(ino)
        if entry.cls is not Cls.DIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)

    async def readdir(self, ino: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entry, agent = self.tree.resolve(ino)
        attrs = self.tree.attrs
        rows: list[tuple[int, str, Attrs]]  # (next id, name, its attributes when listed)
        if entry.kind is Kind.AGENTS:
            rows = [
                (a.row.id, a.name, partial(attrs, inode(a.row.id, Kind.AGENT))) for a in sorted(self.kernel.agents.values(), key=lambda a: a.row.id)
            ]
        elif entry.kind is Kind.TOOLS:
            rows = [(next_id, name, partial(attrs, tool)) for next_id, name, tool in toolfiles.listing(self.kernel)]
        else:
            table = TABLES[Kind.AGENT if entry.kind is Kind.AGENT else entry.kind]
            base = agent.row.id if agent else 0
            rows = [(i + 1, e.name, partial(attrs, inode(base, e.kind))) for i, e in enumerate(table)]
            if agent is not None:  # memory/ and the scratch files: inodes of other spaces
                root = fuse_ino(await self.kernel.memory.root(agent))
                rows.append((len(table) + 1, MEMORY, partial(self.memory.getattr, root, None)))
                rows += [
                    (READDIR_BASE + f.ino - SCRATCH_BASE, os.fsdecode(f.name), partial(_now, f.attrs())) for f in self.scratch.listing(agent.row.id)
                ]
        for next_id, name, attributes in rows:
            if next_id > start_id and not pyfuse3.readdir_reply(token, os.fsencode(name), await attributes(), next_id):
                break

    async def open(self, ino: int, flags: int, ctx: Any) -> Handle:
        entry, agent = self.tree.resolve(ino)
        if entry.cls is Cls.DIR:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return await self.tree.make_handle(ino, entry, agent, flags, caller_of(ctx))
