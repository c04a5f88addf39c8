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
import json
from collections.abc import Awaitable, Callable
from typing import Any

from . import access, params
from .errors import KernelError, errno_name
from .kernel import Agent, Caller, Kernel
from .scheduler import make_scheduler


class Sys(enum.Enum):
    AGENT_CREATE = "agent_create"
    AGENT_REMOVE = "agent_remove"
    AGENT_SETATTR = "agent_setattr"
    AGENT_CTL = "agent_ctl"
    LLM_ADMIT = "llm_admit"  # may this caller start a request now? (a prompt write's first bytes)
    LLM_SUBMIT = "llm_submit"
    CONFIG_WRITE = "config_write"
    CONTEXT_WRITE = "context_write"
    PERMISSIONS_WRITE = "permissions_write"
    SCHED_SET = "sched_set"
    KERNEL_CTL = "kernel_ctl"
    MEMORY = "memory"
    MEMORY_RECALL = "memory_recall"
    TOOL_CALL = "tool_call"


Handler = Callable[..., Awaitable[Any]]


async def sys_agent_create(kernel: Kernel, caller: Caller, name: str, mode: int) -> Agent:
    check_agent_name(name)
    return kernel.create_agent(caller, name, mode)


async def sys_agent_remove(kernel: Kernel, caller: Caller, name: str) -> None:
    kernel.remove_agent(caller, name)


async def sys_agent_setattr(kernel: Kernel, caller: Caller, agent: Agent, **values: Any) -> None:
    kernel.set_agent_attrs(caller, agent, **values)


async def sys_llm_admit(kernel: Kernel, caller: Caller, agent: Agent) -> None:
    """The checks a request's first write gets before its text is read: budget, queue policy, queue limits."""
    kernel.check_queue(agent)


async def sys_llm_submit(kernel: Kernel, caller: Caller, agent: Agent, data: bytes, history: Any = None) -> Any:
    if len(data) > params.MAX_REQUEST_BYTES:
        raise KernelError(errno.EFBIG, f"the request is {len(data)} bytes; the limit is {params.MAX_REQUEST_BYTES}")
    return await kernel.submit(caller, agent, data, history)


async def sys_config_write(kernel: Kernel, caller: Caller, agent: Agent, data: bytes | str) -> None:
    kernel.write_config(caller, agent, _text(data, "config"))


async def sys_permissions_write(kernel: Kernel, caller: Caller, agent: Agent, data: bytes | str) -> None:
    kernel.write_permissions(caller, agent, _text(data, "permissions"))


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
        elif verb == "budget":
            kernel.reset_budget(caller, agent)
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
    if verb == "budget" and arg == "reset":
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


CTL_VERBS = "cancel [ID|all], pause, resume, reset, rollback PATH [VERSION|@TIME], budget reset (root)"


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
    text = _text(query, "recall")
    target = None
    if text.lstrip().startswith("{"):  # {"query": ..., "agent": NAME, "k": N}: another agent's shared memory
        try:
            request = json.loads(text)
            text, name, k = str(request["query"]), request.get("agent"), int(request.get("k", k))
        except (ValueError, KeyError, TypeError):
            raise KernelError(errno.EINVAL, 'recall: a JSON query is {"query": TEXT, "agent": NAME, "k": N}') from None
        if not 1 <= k <= params.MAX_MEMORY_TOP_K:
            raise KernelError(errno.EINVAL, f"recall: k must be in [1, {params.MAX_MEMORY_TOP_K}]")
        target = kernel.agent(str(name)) if name is not None else None
    return await kernel.memory.recall(caller, agent, text, k, target)


async def sys_tool_call(kernel: Kernel, caller: Caller, agent: Agent | None, name: str, arguments: Any) -> Any:
    """One call of a tool, for an agent (its policy applies) or for nobody in particular."""
    return await kernel.tools.call(caller, agent, name, arguments)


async def sys_sched_set(kernel: Kernel, caller: Caller, data: bytes | str) -> None:
    """`kernel/scheduler`: one line, `fifo`, `rr [quantum=N]` or `priority`."""
    lines = [line for line in _text(data, "scheduler").splitlines() if line.strip()]
    if not lines:
        return  # `: > kernel/scheduler`, or bash's flush before it writes: no change
    if len(lines) != 1:
        raise KernelError(errno.EINVAL, "scheduler: write one line: fifo | rr [quantum=N] | priority")
    kernel.set_scheduler(caller, lines[0])


async def sys_kernel_ctl(kernel: Kernel, caller: Caller, data: bytes | str) -> None:
    """`kernel/ctl`: `sched POLICY` (root), `restore NAME [NEWNAME]` (root or the agent's
    owner), `tools reload` (root). Every line is checked before any is applied."""
    lines = [line.strip() for line in _text(data, "kernel/ctl").splitlines() if line.strip()]
    if not lines:
        raise KernelError(errno.EINVAL, f"kernel/ctl: no command (known: {KERNEL_CTL_VERBS})")
    commands: list[tuple[str, list[str]]] = []
    for line in lines:
        verb, _, arg = line.partition(" ")
        if verb == "sched":
            access.require_root(caller, "change the scheduling policy")
            try:
                commands.append((verb, [make_scheduler(arg).describe()]))
            except ValueError as exc:
                raise KernelError(errno.EINVAL, f"kernel/ctl: {exc}") from None
        elif verb == "restore" and 1 <= len(arg.split()) <= 2:
            commands.append((verb, arg.split()))
        elif verb in ("load", "unload", "retry") and len(arg.split()) == 1:
            access.require_root(caller, f"{verb} a model")
            commands.append((verb, [arg.strip()]))
        elif verb == "tools" and arg.strip() == "reload":
            access.require_root(caller, "reload the tools")
            commands.append((verb, []))
        else:
            raise KernelError(errno.EINVAL, f"kernel/ctl: unknown command {line!r} (known: {KERNEL_CTL_VERBS})")
    for verb, args in commands:
        if verb == "sched":
            kernel.set_scheduler(caller, args[0])
        elif verb == "tools":
            kernel.log_event("tools_reload", uid=caller.uid, external=kernel.tools.reload())
        elif verb == "load":
            await kernel.load_model(caller, args[0])
        elif verb == "unload":
            kernel.unload_model(caller, args[0])
        elif verb == "retry":
            kernel.retry_model(caller, args[0])
        else:
            kernel.restore_agent(caller, *args)


KERNEL_CTL_VERBS = "sched fifo | sched rr [quantum=N] | sched priority, tools reload, load MODEL, unload MODEL, retry MODEL (root); restore NAME [NEWNAME] (owner or root)"


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
    Sys.LLM_ADMIT: sys_llm_admit,
    Sys.LLM_SUBMIT: sys_llm_submit,
    Sys.CONFIG_WRITE: sys_config_write,
    Sys.CONTEXT_WRITE: sys_context_write,
    Sys.PERMISSIONS_WRITE: sys_permissions_write,
    Sys.SCHED_SET: sys_sched_set,
    Sys.KERNEL_CTL: sys_kernel_ctl,
    Sys.MEMORY: sys_memory,
    Sys.MEMORY_RECALL: sys_memory_recall,
    Sys.TOOL_CALL: sys_tool_call,
}


# Changes only an agent's owner (or root) may make, whatever the mode bits say.
OWNER_ONLY = {Sys.CONFIG_WRITE: "change its config", Sys.PERMISSIONS_WRITE: "change its permissions"}
# Calls in which root uses its power: each one by root is written to the audit log.
PRIVILEGED = {Sys.SCHED_SET, Sys.KERNEL_CTL, Sys.PERMISSIONS_WRITE, Sys.AGENT_SETATTR, Sys.AGENT_REMOVE, Sys.AGENT_CTL}
DENIALS = (errno.EPERM, errno.EACCES, errno.EDQUOT)


def check_access(kernel: Kernel, number: Sys, caller: Caller, args: tuple[Any, ...]) -> None:
    """The one gate every syscall passes with the caller's identity; the handlers
    apply the finer rules of `access` and the policy."""
    agent = args[0] if args and isinstance(args[0], Agent) else None
    if agent is not None and number in OWNER_ONLY:
        access.require_owner(caller, agent, OWNER_ONLY[number])
    if number is Sys.SCHED_SET:
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
            kernel.record_error(agent, caller.uid, exc)
        elif exc.errno not in DENIALS:
            kernel.log_event("error", syscall=number.value, uid=caller.uid, message=exc.message)
        raise
    if caller.is_root and number in PRIVILEGED:
        kernel.log_event("privileged", syscall=number.value, uid=0, pid=caller.pid, **({"agent": agent.name} if agent is not None else {}))
    return result


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
