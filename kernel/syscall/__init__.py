"""The system call table: every request from the filesystem enters here.

One enum, one table from syscall to handler, one `syscall()` entry point and one
gate (`check_access`). The handlers live by subsystem (`agent.py`, `llm.py`,
`ctl.py`, `memory.py`); each checks its arguments (with `checks.py`, where every
check of what callers write lives) and calls the subsystem that does the work.
Refused requests raise `KernelError`; a denial is audited, a refusal that concerns
an agent is mirrored into the caller's `error` file. An unknown syscall is ENOSYS.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Awaitable, Callable
from typing import Any

from ..access import rules as access
from ..errors import KernelError, errno_name
from ..kernel import Kernel
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

__all__ = ["LINE_CHECKS", "TABLE", "Sys", "check_access", "check_agent_name", "syscall"]


class Sys(enum.Enum):
    AGENT_CREATE = "agent_create"
    AGENT_REMOVE = "agent_remove"
    AGENT_SETATTR = "agent_setattr"
    AGENT_CTL = "agent_ctl"
    FILE_REPLACE = "file_replace"  # may the caller replace one of an agent's files, as copy tools do?
    LLM_ADMIT = "llm_admit"  # may this request go on? (each write of a prompt or call turn)
    LLM_SUBMIT = "llm_submit"
    LLM_CANCEL = "llm_cancel"  # a turn's file closed before its end
    FILE_SIZE = "file_size"  # a write that grows one of an agent's stored files
    OUTPUT_BIND = "output_bind"  # the job `output`/`status` follow for the caller
    CONFIG_WRITE = "config_write"
    CONTEXT_WRITE = "context_write"
    PERMISSIONS_WRITE = "permissions_write"
    SCHED_SET = "sched_set"
    CONFIG_CHECK = "config_check"  # the complete lines of a write, before its commit
    PERMISSIONS_CHECK = "permissions_check"
    SCHED_CHECK = "sched_check"
    KERNEL_CTL = "kernel_ctl"
    # memory/: one entry per operation of the store, so each is audited by its name
    MEMORY_LOOKUP = "memory_lookup"
    MEMORY_GETATTR = "memory_getattr"
    MEMORY_READDIR = "memory_readdir"
    MEMORY_CREATE = "memory_create"
    MEMORY_MKDIR = "memory_mkdir"
    MEMORY_SYMLINK = "memory_symlink"
    MEMORY_READLINK = "memory_readlink"
    MEMORY_LINK = "memory_link"
    MEMORY_UNLINK = "memory_unlink"
    MEMORY_RMDIR = "memory_rmdir"
    MEMORY_RENAME = "memory_rename"
    MEMORY_SETATTR = "memory_setattr"
    MEMORY_OPEN = "memory_open"
    MEMORY_RELEASE = "memory_release"
    MEMORY_READ = "memory_read"
    MEMORY_WRITE = "memory_write"
    MEMORY_FLUSH = "memory_flush"
    MEMORY_FSYNC = "memory_fsync"
    MEMORY_RECALL = "memory_recall"
    TOOL_CALL = "tool_call"


Handler = Callable[..., Awaitable[Any]]
TABLE: dict[Sys, Handler] = {
    Sys.AGENT_CREATE: sys_agent_create,
    Sys.AGENT_REMOVE: sys_agent_remove,
    Sys.AGENT_SETATTR: sys_agent_setattr,
    Sys.AGENT_CTL: sys_agent_ctl,
    Sys.FILE_REPLACE: sys_file_replace,
    Sys.LLM_ADMIT: sys_llm_admit,
    Sys.LLM_SUBMIT: sys_llm_submit,
    Sys.LLM_CANCEL: sys_llm_cancel,
    Sys.FILE_SIZE: sys_file_size,
    Sys.OUTPUT_BIND: sys_output_bind,
    Sys.CONFIG_WRITE: sys_config_write,
    Sys.CONTEXT_WRITE: sys_context_write,
    Sys.PERMISSIONS_WRITE: sys_permissions_write,
    Sys.SCHED_SET: sys_sched_set,
    Sys.CONFIG_CHECK: sys_config_check,
    Sys.PERMISSIONS_CHECK: sys_permissions_check,
    Sys.SCHED_CHECK: sys_sched_check,
    Sys.KERNEL_CTL: sys_kernel_ctl,
    Sys.MEMORY_RECALL: sys_memory_recall,
    Sys.TOOL_CALL: sys_tool_call,
}
MEMORY_SYS: dict[str, Sys] = {op: Sys(f"memory_{op}") for op in MEMORY_OPS}  # the store's operation → its syscall
TABLE.update({number: memory_op(op) for op, number in MEMORY_SYS.items()})

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
LINE_CHECKS = {Sys.CONFIG_WRITE: Sys.CONFIG_CHECK, Sys.PERMISSIONS_WRITE: Sys.PERMISSIONS_CHECK, Sys.SCHED_SET: Sys.SCHED_CHECK}


def check_access(kernel: Kernel, number: Sys, caller: Caller, args: tuple[Any, ...]) -> None:
    """The one gate every syscall passes with the caller's identity; the handlers
    apply the finer rules of `access` and the policy."""
    agent = args[0] if args and isinstance(args[0], Agent) else None
    if agent is not None and number in OWNER_ONLY:
        access.require_owner(caller, agent, OWNER_ONLY[number])
    if number in (Sys.SCHED_SET, Sys.SCHED_CHECK):
        access.require_root(caller, "change the scheduling policy")
    if agent is not None and number is Sys.TOOL_CALL:
        access.require_work(caller, agent)


async def syscall(kernel: Kernel, number: Sys, caller: Caller, *args: Any, **kwargs: Any) -> Any:
    handler = TABLE.get(number)
    if handler is None:
        raise KernelError(errno.ENOSYS, f"no syscall {number}")
    agent = args[0] if args and isinstance(args[0], Agent) else None
    try:
        check_access(kernel, number, caller, args)
        result = await handler(kernel, caller, *args, **kwargs)
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
