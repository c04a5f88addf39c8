"""The system call table: every request from the filesystem enters here.

One enum, one table from syscall to handler, one `syscall()` entry point. Handlers
check their arguments and call one kernel method; refused requests raise
`KernelError` and, when they concern an agent, are mirrored into the caller's
`error` file. An unknown syscall is ENOSYS.
"""

from __future__ import annotations

import datetime as dt
import enum
import errno
from collections.abc import Awaitable, Callable
from typing import Any

from . import params
from .errors import KernelError
from .kernel import Agent, Caller, Kernel
from .scheduler import make_scheduler


class Sys(enum.Enum):
    AGENT_CREATE = "agent_create"
    AGENT_REMOVE = "agent_remove"
    AGENT_SETATTR = "agent_setattr"
    AGENT_CTL = "agent_ctl"
    LLM_SUBMIT = "llm_submit"
    CONFIG_WRITE = "config_write"
    CONTEXT_WRITE = "context_write"
    SCHED_SET = "sched_set"
    KERNEL_CTL = "kernel_ctl"
    MEMORY = "memory"
    MEMORY_RECALL = "memory_recall"


Handler = Callable[..., Awaitable[Any]]


async def sys_agent_create(kernel: Kernel, caller: Caller, name: str, mode: int) -> Agent:
    check_agent_name(name)
    return kernel.create_agent(caller, name, mode)


async def sys_agent_remove(kernel: Kernel, caller: Caller, name: str) -> None:
    await kernel.remove_agent(caller, name)


async def sys_agent_setattr(kernel: Kernel, caller: Caller, agent: Agent, **values: Any) -> None:
    kernel.set_agent_attrs(caller, agent, **values)


async def sys_llm_submit(kernel: Kernel, caller: Caller, agent: Agent, data: bytes, history: Any = None) -> Any:
    if len(data) > params.MAX_REQUEST_BYTES:
        raise KernelError(errno.EFBIG, f"the request is {len(data)} bytes; the limit is {params.MAX_REQUEST_BYTES}")
    return await kernel.submit(caller, agent, data, history)


async def sys_config_write(kernel: Kernel, caller: Caller, agent: Agent, data: bytes | str) -> None:
    kernel.write_config(caller, agent, _text(data, "config"))


async def sys_context_write(kernel: Kernel, caller: Caller, agent: Agent, data: bytes | str) -> None:
    kernel.write_context(caller, agent, _text(data, "context"))


async def sys_agent_ctl(kernel: Kernel, caller: Caller, agent: Agent, data: bytes | str) -> None:
    """`ctl` commands, one a line: `cancel [ID|all]`, `pause`, `resume`, `reset`. Every line is
    checked before any is applied, so a bad line changes nothing."""
    commands = [parse_ctl(line) for line in _text(data, "ctl").splitlines() if line.strip()]
    if not commands:
        raise KernelError(errno.EINVAL, f"ctl: no command (known: {CTL_VERBS})")
    for verb, arg in commands:
        if verb == "cancel":
            kernel.cancel(caller, agent, arg)
        elif verb in ("pause", "resume"):
            kernel.pause(caller, agent, verb == "pause")
        elif verb == "rollback":
            path, version = split_rollback(arg)
            restored = await kernel.memory.rollback(caller, agent, path, version)
            arg = f"{path} {restored}"
        else:
            kernel.write_context(caller, agent, "")
        kernel.log_event("ctl", agent=agent.name, uid=caller.uid, command=f"{verb} {arg}".strip())


def parse_ctl(line: str) -> tuple[str, str]:
    if len(line) > params.MAX_CTL_LINE:
        raise KernelError(errno.EINVAL, f"ctl: a command is over {params.MAX_CTL_LINE} bytes")
    verb, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if (verb == "cancel" and (arg in ("", "all") or arg.isdigit())) or (verb in ("reset", "pause", "resume") and not arg):
        return verb, arg
    if verb == "rollback" and arg:
        _, version = split_rollback(arg)
        if version.startswith("@"):
            try:
                dt.datetime.fromisoformat(version[1:])
            except ValueError:
                raise KernelError(errno.EINVAL, f"ctl: rollback: {version[1:]!r} is not an ISO-8601 time (e.g. @2026-11-25T16:00)") from None
        return verb, arg
    raise KernelError(errno.EINVAL, f"ctl: unknown command {line.strip()!r} (known: {CTL_VERBS})")


CTL_VERBS = "cancel [ID|all], pause, resume, reset, rollback PATH [VERSION|@TIME]"


def split_rollback(arg: str) -> tuple[str, str]:
    """`PATH [VERSION|@TIME]`: the last word is the version when it looks like one,
    so paths may hold spaces."""
    path, _, last = arg.rpartition(" ")
    if path and (last.isdigit() or last.startswith("@")):
        return path, last
    return arg, ""


MEMORY_OPS = frozenset(
    "lookup getattr readdir create mkdir symlink readlink link unlink rmdir rename setattr open release read write flush fsync".split()
)


async def sys_memory(kernel: Kernel, caller: Caller, op: str, *args: Any, **kwargs: Any) -> Any:
    """One operation on the memory store (memory/ files); the VFS has checked the mode bits."""
    if op not in MEMORY_OPS:
        raise KernelError(errno.ENOSYS, f"no memory operation {op!r}")
    return await kernel.memory.run(getattr(kernel.memory.store, op), *args, **kwargs)


async def sys_memory_recall(kernel: Kernel, caller: Caller, agent: Agent, query: bytes, k: int = params.DEFAULT_MEMORY_TOP_K) -> Any:
    if len(query) > params.MAX_REQUEST_BYTES:
        raise KernelError(errno.EFBIG, f"the query is {len(query)} bytes; the limit is {params.MAX_REQUEST_BYTES}")
    return await kernel.memory.recall(caller, agent, _text(query, "recall"), k)


async def sys_sched_set(kernel: Kernel, caller: Caller, data: bytes | str) -> None:
    """`kernel/scheduler`: one line, `fifo`, `rr [quantum=N]` or `priority`."""
    lines = [line for line in _text(data, "scheduler").splitlines() if line.strip()]
    if not lines:
        return  # `: > kernel/scheduler`, or bash's flush before it writes: no change
    if len(lines) != 1:
        raise KernelError(errno.EINVAL, "scheduler: write one line: fifo | rr [quantum=N] | priority")
    kernel.set_scheduler(caller, lines[0])


async def sys_kernel_ctl(kernel: Kernel, caller: Caller, data: bytes | str) -> None:
    """`kernel/ctl` (root): `sched POLICY`. Every line is checked before any is applied."""
    if not caller.is_root:
        raise KernelError(errno.EPERM, "kernel/ctl is for root")
    lines = [line.strip() for line in _text(data, "kernel/ctl").splitlines() if line.strip()]
    if not lines:
        raise KernelError(errno.EINVAL, f"kernel/ctl: no command (known: {KERNEL_CTL_VERBS})")
    policies = []
    for line in lines:
        verb, _, arg = line.partition(" ")
        if verb != "sched":
            raise KernelError(errno.EINVAL, f"kernel/ctl: unknown command {line!r} (known: {KERNEL_CTL_VERBS})")
        try:
            policies.append(make_scheduler(arg).describe())
        except ValueError as exc:
            raise KernelError(errno.EINVAL, f"kernel/ctl: {exc}") from None
    for policy in policies:
        kernel.set_scheduler(caller, policy)


KERNEL_CTL_VERBS = "sched fifo | sched rr [quantum=N] | sched priority"


def _text(data: bytes | str, what: str) -> str:
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KernelError(errno.EINVAL, f"{what}: not valid UTF-8 (byte {exc.start})") from None


TABLE: dict[Sys, Handler] = {
    Sys.AGENT_CREATE: sys_agent_create,
    Sys.AGENT_REMOVE: sys_agent_remove,
    Sys.AGENT_SETATTR: sys_agent_setattr,
    Sys.AGENT_CTL: sys_agent_ctl,
    Sys.LLM_SUBMIT: sys_llm_submit,
    Sys.CONFIG_WRITE: sys_config_write,
    Sys.CONTEXT_WRITE: sys_context_write,
    Sys.SCHED_SET: sys_sched_set,
    Sys.KERNEL_CTL: sys_kernel_ctl,
    Sys.MEMORY: sys_memory,
    Sys.MEMORY_RECALL: sys_memory_recall,
}


async def syscall(kernel: Kernel, number: Sys, caller: Caller, *args: Any, **kwargs: Any) -> Any:
    handler = TABLE.get(number)
    if handler is None:
        raise KernelError(errno.ENOSYS, f"no syscall {number}")
    try:
        return await handler(kernel, caller, *args, **kwargs)
    except KernelError as exc:
        agent = args[0] if args and isinstance(args[0], Agent) else None
        if agent is not None:
            kernel.record_error(agent, caller.uid, exc)
        else:
            kernel.log_event("error", syscall=number.value, uid=caller.uid, message=exc.message)
        raise


def check_agent_name(name: str) -> None:
    """Agent names are directory names: no '/', NUL, '.' or '..', at most 255 bytes."""
    size = len(name.encode("utf-8", errors="surrogateescape"))
    if size > params.MAX_NAME_BYTES:
        raise KernelError(errno.ENAMETOOLONG, f"agent names are at most {params.MAX_NAME_BYTES} bytes")
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise KernelError(errno.EINVAL, f"{name!r} is not a valid agent name")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise KernelError(errno.EINVAL, "agent names must be valid UTF-8") from None
