"""The system call table: every request from the filesystem enters here.

One enum, one table from syscall to handler, one `syscall()` entry point and one
gate (`check_access`). The handlers live by subsystem (`agent.py`, `llm.py`,
`ctl.py`, `memory.py`); each checks its arguments (with `checks.py`, where every
check of what callers write lives) and calls the subsystem that does the work.
Refused requests raise `KernelError`; a denial is audited, a refusal that concerns
an agent is mirrored into the caller's `error` file. An unknown syscall is ENOSYS.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

from ..access import rules as access
from ..errors import KernelError, errno_name
from ..kernel import Kernel
from ..memory.store import MemoryStore
from ..types import Agent, Caller
from .agent import (
    sys_agent_create,
    sys_agent_remove,
    sys_agent_setattr,
    sys_config_check,
    sys_config_write,
    sys_context_write,
    sys_file_replace,
    sys_permissions_check,
    sys_permissions_write,
)
from .checks import agent_name as check_agent_name
from .ctl import sys_agent_ctl, sys_kernel_ctl, sys_sched_check, sys_sched_set
from .llm import sys_file_size, sys_llm_admit, sys_llm_cancel, sys_llm_submit, sys_output_bind
from .memory import MEMORY_OPS, memory_op, sys_memory_recall, sys_tool_call

P = ParamSpec("P")
R = TypeVar("R")

__all__ = ["ENTRIES", "LINE_CHECKS", "MEMORY_SYS", "Syscall", "Sys", "check_access", "check_agent_name", "syscall"]


class Syscall(Generic[P, R]):
    """One system call: its name (what the audit log says) and its handler. The handler's
    signature, less the kernel and the caller, is the call's: `syscall(kernel,
    Sys.LLM_SUBMIT, caller, agent, text)` is type-checked against `sys_llm_submit`."""

    __slots__ = ("handler", "value")

    def __init__(self, value: str, handler: Callable[Concatenate[Kernel, Caller, P], Awaitable[R]]) -> None:
        self.value = value
        self.handler = handler

    def __repr__(self) -> str:
        return f"Sys.{self.value.upper()}"


class Sys:
    """The table: every system call, by name."""

    AGENT_CREATE = Syscall("agent_create", sys_agent_create)
    AGENT_REMOVE = Syscall("agent_remove", sys_agent_remove)
    AGENT_SETATTR = Syscall("agent_setattr", sys_agent_setattr)
    AGENT_CTL = Syscall("agent_ctl", sys_agent_ctl)
    FILE_REPLACE = Syscall("file_replace", sys_file_replace)  # may the caller replace one of an agent's files, as copy tools do?
    LLM_ADMIT = Syscall("llm_admit", sys_llm_admit)  # may this request go on? (each write of a prompt or call turn)
    LLM_SUBMIT = Syscall("llm_submit", sys_llm_submit)
    LLM_CANCEL = Syscall("llm_cancel", sys_llm_cancel)  # a turn's file closed before its end
    FILE_SIZE = Syscall("file_size", sys_file_size)  # a write that grows one of an agent's stored files
    OUTPUT_BIND = Syscall("output_bind", sys_output_bind)  # the job `output`/`status` follow for the caller
    CONFIG_WRITE = Syscall("config_write", sys_config_write)
    CONTEXT_WRITE = Syscall("context_write", sys_context_write)
    PERMISSIONS_WRITE = Syscall("permissions_write", sys_permissions_write)
    SCHED_SET = Syscall("sched_set", sys_sched_set)
    CONFIG_CHECK = Syscall("config_check", sys_config_check)  # the complete lines of a write, before its commit
    PERMISSIONS_CHECK = Syscall("permissions_check", sys_permissions_check)
    SCHED_CHECK = Syscall("sched_check", sys_sched_check)
    KERNEL_CTL = Syscall("kernel_ctl", sys_kernel_ctl)
    # memory/: one entry per operation of the store, so each is audited by its name
    MEMORY_LOOKUP = Syscall("memory_lookup", memory_op(MemoryStore.lookup))
    MEMORY_GETATTR = Syscall("memory_getattr", memory_op(MemoryStore.getattr))
    MEMORY_READDIR = Syscall("memory_readdir", memory_op(MemoryStore.readdir))
    MEMORY_CREATE = Syscall("memory_create", memory_op(MemoryStore.create))
    MEMORY_MKDIR = Syscall("memory_mkdir", memory_op(MemoryStore.mkdir))
    MEMORY_SYMLINK = Syscall("memory_symlink", memory_op(MemoryStore.symlink))
    MEMORY_READLINK = Syscall("memory_readlink", memory_op(MemoryStore.readlink))
    MEMORY_LINK = Syscall("memory_link", memory_op(MemoryStore.link))
    MEMORY_UNLINK = Syscall("memory_unlink", memory_op(MemoryStore.unlink))
    MEMORY_RMDIR = Syscall("memory_rmdir", memory_op(MemoryStore.rmdir))
    MEMORY_RENAME = Syscall("memory_rename", memory_op(MemoryStore.rename))
    MEMORY_SETATTR = Syscall("memory_setattr", memory_op(MemoryStore.setattr))
    MEMORY_OPEN = Syscall("memory_open", memory_op(MemoryStore.open))
    MEMORY_RELEASE = Syscall("memory_release", memory_op(MemoryStore.release))
    MEMORY_READ = Syscall("memory_read", memory_op(MemoryStore.read))
    MEMORY_WRITE = Syscall("memory_write", memory_op(MemoryStore.write))
    MEMORY_FLUSH = Syscall("memory_flush", memory_op(MemoryStore.flush))
    MEMORY_FSYNC = Syscall("memory_fsync", memory_op(MemoryStore.fsync))
    MEMORY_RECALL = Syscall("memory_recall", sys_memory_recall)
    TOOL_CALL = Syscall("tool_call", sys_tool_call)


ENTRIES: dict[str, Syscall[..., Any]] = {entry.value: entry for entry in vars(Sys).values() if isinstance(entry, Syscall)}
MEMORY_SYS: dict[str, Syscall[..., Any]] = {op: ENTRIES[f"memory_{op}"] for op in MEMORY_OPS}  # the store's operation → its syscall

# Changes only an agent's owner (or root) may make, whatever the mode bits say.
OWNER_ONLY = {
    Sys.CONFIG_WRITE: "change its config",
    Sys.CONFIG_CHECK: "change its config",
    Sys.PERMISSIONS_WRITE: "change its permissions",
    Sys.PERMISSIONS_CHECK: "change its permissions",
}
# Calls in which root uses its power: each one by root is written to the audit log.
PRIVILEGED = {Sys.SCHED_SET, Sys.KERNEL_CTL, Sys.PERMISSIONS_WRITE, Sys.AGENT_SETATTR, Sys.AGENT_REMOVE, Sys.AGENT_CTL}
DENIALS = (errno.EPERM, errno.EACCES, errno.EDQUOT)
# A stored file's commit → the syscall that checks each complete line as it is written.
LINE_CHECKS: dict[Syscall[..., Any], Syscall[..., Any]] = {
    Sys.CONFIG_WRITE: Sys.CONFIG_CHECK,
    Sys.PERMISSIONS_WRITE: Sys.PERMISSIONS_CHECK,
    Sys.SCHED_SET: Sys.SCHED_CHECK,
}


def check_access(kernel: Kernel, number: Syscall[..., Any], caller: Caller, args: tuple[Any, ...]) -> None:
    """The one gate every syscall passes with the caller's identity; the handlers
    apply the finer rules of `access` and the policy."""
    agent = args[0] if args and isinstance(args[0], Agent) else None
    if agent is not None and number in OWNER_ONLY:
        access.require_owner(caller, agent, OWNER_ONLY[number])
    if number in (Sys.SCHED_SET, Sys.SCHED_CHECK):
        access.require_root(caller, "change the scheduling policy")
    if agent is not None and number is Sys.TOOL_CALL:
        access.require_work(caller, agent)


async def syscall(kernel: Kernel, number: Syscall[P, R], caller: Caller, *args: P.args, **kwargs: P.kwargs) -> R:
    if ENTRIES.get(getattr(number, "value", None)) is not number:  # type: ignore[arg-type]
        raise KernelError(errno.ENOSYS, f"no syscall {number!r}")
    agent = args[0] if args and isinstance(args[0], Agent) else None
    try:
        check_access(kernel, number, caller, args)
        result = await number.handler(kernel, caller, *args, **kwargs)
    except KernelError as exc:
        where = {"agent": agent.name} if agent is not None else {"target": str(args[0]) if args else ""}
        if exc.errno in DENIALS and not exc.audited:
            kernel.log_event("deny", syscall=number.value, uid=caller.uid, pid=caller.pid, errno=errno_name(exc.errno), message=exc.message, **where)
        if agent is not None:
            kernel.requests.record_error(agent, caller.uid, exc)
        elif exc.errno not in DENIALS:
            kernel.log_event("error", syscall=number.value, uid=caller.uid, message=exc.message)
        raise
    if caller.is_root and number in PRIVILEGED:
        kernel.log_event("privileged", syscall=number.value, uid=0, pid=caller.pid, **({"agent": agent.name} if agent is not None else {}))
    return result
