"""The mount's inode spaces, and what a FUSE operation does in each.

An inode number says which space it is in (ops.py routes by it): the synthetic tree
of the dirtab (`tree.py`: the root, kernel/, agents/, each agent's fixed files), an
agent's memory/ (`memfiles.py`: files in the memory store), or a scratch file of an
agent directory (`scratch.py`: what copy tools write before they rename it). An
operation on an inode goes to the inode's space; one on a name goes to the space of
the directory that holds the name. What a space does not offer is refused here, with
the errno a filesystem gives for it.
"""

from __future__ import annotations

import errno
from typing import Any

import pyfuse3

from kernel import Caller

from .files import Handle


def caller_of(ctx: Any) -> Caller:
    """Who asks; root for the filesystem's own lookups (readdir has no request context)."""
    return Caller(0, 0, 0) if ctx is None else Caller(ctx.uid, ctx.gid, ctx.pid)


def ownership(attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields) -> dict[str, Any]:
    """What a chmod/chown asks for, as keyword values."""
    values: dict[str, Any] = {}
    if fields.update_mode:
        values["mode"] = attr.st_mode & 0o7777
    if fields.update_uid:
        values["uid"] = attr.st_uid
    if fields.update_gid:
        values["gid"] = attr.st_gid
    return values


class Space:
    """The operations of one inode space; every one refused unless the space offers it."""

    # -- names (the directory's space) ----------------------------------------------
    async def lookup(self, parent: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def mkdir(self, parent: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rmdir(self, parent: int, name: bytes, ctx: Any) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: Any) -> tuple[Handle, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EPERM)  # the synthetic tree is fixed: files are made in memory/

    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def unlink(self, parent: int, name: bytes, ctx: Any) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rename(self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes, flags: int, ctx: Any) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def symlink(self, parent: int, name: bytes, target: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(self, ino: int, new_parent: int, new_name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    # -- inodes (the inode's space) -------------------------------------------------
    async def getattr(self, ino: int, ctx: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def setattr(
        self, ino: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, handle: Handle | None, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    async def readlink(self, ino: int, ctx: Any) -> bytes:
        raise pyfuse3.FUSEError(errno.EINVAL)

    async def opendir(self, ino: int, ctx: Any) -> None:
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    async def readdir(self, ino: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    async def open(self, ino: int, flags: int, ctx: Any) -> Handle:
        raise pyfuse3.FUSEError(errno.EISDIR)
