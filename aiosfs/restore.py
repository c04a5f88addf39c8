"""How copy tools recreate an agent directory: `cp -r`, `tar -x`, `rsync -a` into
`agents/`.

An agent's files exist from its mkdir on, so the tools find them there:
- an exclusive create of a fixed name (`cp -r` into the directory it made, `tar -x`)
  opens the existing file instead of failing with EEXIST (`intent.py` tells the
  lookup that it belongs to one), and `mkdir memory` gives the existing memory/;
- a rename of a scratch file (`scratch.py`: rsync's `.config.XXXXXX`) onto a fixed
  name replaces the file.
Either way `config`, `context` and `permissions` take the new content, checked
and committed as a write of the file would be, after the check that the caller may
write the file (its mode bits: the VFS checked only the directory's); every other
file (`prompt`, `ctl`, `output`, `status`, …) keeps what is written to it nowhere,
so a copied control file is never a request and a copied stream changes nothing.
The file takes the mode of the create, or the scratch file's mode, when the caller
owns the agent (or is root), as a new file would on a disk.
"""

from __future__ import annotations

import os
from typing import Any

import pyfuse3

from kernel import Agent, Caller, Kernel
from kernel.syscall import Sys, syscall

from . import intent
from .dirtab import Cls, Entry
from .files import DiscardHandle, Handle
from .memfiles import entry_attrs, mem
from .scratch import ScratchFile
from .tree import Tree


def exclusive(ctx: Any, name: bytes, what: str) -> bool:
    """Is this lookup part of an exclusive create ("open") or a mkdir ("mkdir") of `name`?"""
    return ctx is not None and intent.creating(ctx.pid, name) == what


def file_mode(agent: Agent, entry: Entry) -> int:
    return agent.row.file_modes.get(entry.name, entry.mode)


async def open_fixed(tree: Tree, entry: Entry, agent: Agent, flags: int, mode: int, caller: Caller) -> Handle:
    """The handle of an exclusive create of a fixed file: a stored file emptied (the
    copy's content replaces it at close), any other a sink. The file takes the mode
    of the create (`mode`, the umask applied), as a new file would: tar sets no other."""
    if entry.cls is Cls.STORED:
        await syscall(tree.kernel, Sys.FILE_REPLACE, caller, agent, entry.name, file_mode(agent, entry))
        handle: Handle = tree.stored_handle(entry, agent, (flags | os.O_TRUNC) & ~os.O_APPEND, caller)
    else:
        handle = DiscardHandle(tree.kernel, caller, agent, flags)
    await set_mode(tree, entry, agent, mode, caller)
    return handle


async def rename_onto(tree: Tree, found: ScratchFile, entry: Entry, agent: Agent, caller: Caller) -> None:
    """A scratch file renamed onto a fixed file: its content replaces a stored file's
    (refused as a write would be: the scratch file then stays), and is dropped
    otherwise; the file takes the scratch file's mode."""
    kernel = tree.kernel
    if entry.cls is Cls.STORED:
        await syscall(kernel, Sys.FILE_REPLACE, caller, agent, entry.name, file_mode(agent, entry))
        await syscall(kernel, tree.stored_call(entry.kind)[0], caller, agent, bytes(found.data))
    await set_mode(tree, entry, agent, found.mode, caller)


async def set_mode(tree: Tree, entry: Entry, agent: Agent, mode: int, caller: Caller) -> None:
    """The mode a replaced file takes, when the caller may chmod it (its owner, root)."""
    mode &= 0o7777
    if mode != file_mode(agent, entry) and (caller.is_root or caller.uid == agent.row.uid):
        await syscall(tree.kernel, Sys.AGENT_SETATTR, caller, agent, file_modes={**agent.row.file_modes, entry.name: mode})


async def make_memory(kernel: Kernel, agent: Agent, caller: Caller) -> pyfuse3.EntryAttributes:
    """`mkdir memory` in an agent directory: its memory/ as it is. Its mode stays: a
    `mkdir -p` or makedirs(exist_ok=True) of it must not open it to others (tools that
    keep modes chmod it afterwards)."""
    return entry_attrs(await mem(kernel, caller, "getattr", await kernel.memory.root(agent)))
