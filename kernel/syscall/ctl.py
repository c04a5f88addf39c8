"""The `ctl` files as tables of verbs: an agent's `ctl`, `kernel/ctl` and
`kernel/scheduler`.

Each verb has a parser (checks the line, root-only verbs check the caller: every
line of a write is checked before any is applied, so a bad line changes nothing)
and an action. The help that an unknown verb gets is made from the table.
"""

from __future__ import annotations

import datetime as dt
import errno
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .. import params
from ..access import rules as access
from ..cores.scheduler import make_scheduler
from ..errors import KernelError
from ..kernel import Kernel
from ..text import decimal
from ..types import Agent, Caller
from . import checks


@dataclass(frozen=True)
class Verb:
    usage: str  # for the help line, e.g. "cancel [ID|all]"
    parse: Callable[[Caller, str], list[str]]  # the line's argument → the action's arguments; raises to refuse
    apply: Callable[..., Awaitable[str | None]]  # (kernel, caller, [agent,] *args) → what the audit line says, if not the line
    root_only: bool = False


def _help(table: dict[str, Verb]) -> str:
    mine = [v.usage for v in table.values() if not v.root_only]
    root = [v.usage for v in table.values() if v.root_only]
    return ", ".join(mine + ([f"{' | '.join(root)} (root)"] if root else []))


def _root(what: str, parse: Callable[[Caller, str], list[str]]) -> Callable[[Caller, str], list[str]]:
    def check(caller: Caller, arg: str) -> list[str]:
        access.require_root(caller, what)
        return parse(caller, arg)

    return check


def _none(caller: Caller, arg: str) -> list[str]:
    if arg:
        raise ValueError("takes no argument")
    return []


def _one_word(caller: Caller, arg: str) -> list[str]:
    if len(arg.split()) != 1:
        raise ValueError("takes one word")
    return [arg]


# -- an agent's ctl ---------------------------------------------------------------------------
def _cancel_arg(caller: Caller, arg: str) -> list[str]:
    if arg in ("", "all") or decimal(arg) is not None:
        return [arg]
    raise ValueError("cancel [ID|all]: an ID is a job's number")


def split_rollback(arg: str) -> tuple[str, str]:
    """`PATH [VERSION|@TIME]`: the last word is the version when it looks like one,
    so paths may hold spaces."""
    path, _, last = arg.rpartition(" ")
    if path and (decimal(last) is not None or last.startswith("@")):
        return path, last
    return arg, ""


def _rollback_arg(caller: Caller, arg: str) -> list[str]:
    if not arg:
        raise ValueError("rollback PATH [VERSION|@TIME]")
    path, version = split_rollback(arg)
    if version.startswith("@"):
        try:
            dt.datetime.fromisoformat(version[1:])
        except ValueError:
            raise KernelError(errno.EINVAL, f"ctl: rollback: {version[1:]!r} is not an ISO-8601 time (e.g. @2026-11-25T16:00)") from None
    return [path, version]


def _budget_arg(caller: Caller, arg: str) -> list[str]:
    if arg != "reset":
        raise ValueError("budget reset")
    access.require_root(caller, "reset a token budget")
    return []


def _fork_arg(caller: Caller, arg: str) -> list[str]:
    checks.agent_name(arg)  # EINVAL (ENAMETOOLONG) naming what is wrong with it
    return [arg]


async def _cancel(kernel: Kernel, caller: Caller, agent: Agent, which: str) -> None:
    kernel.requests.cancel(caller, agent, which)


async def _pause(kernel: Kernel, caller: Caller, agent: Agent) -> None:
    kernel.requests.pause(caller, agent, True)


async def _resume(kernel: Kernel, caller: Caller, agent: Agent) -> None:
    kernel.requests.pause(caller, agent, False)


async def _reset(kernel: Kernel, caller: Caller, agent: Agent) -> None:
    await kernel.agents.set_messages(agent, [])


async def _budget(kernel: Kernel, caller: Caller, agent: Agent) -> None:
    await kernel.agents.reset_budget(agent)


async def _rollback(kernel: Kernel, caller: Caller, agent: Agent, path: str, version: str) -> str:
    restored = await kernel.memory.rollback(caller, agent, path, version)
    return f"rollback {path} {restored}"


async def _fork(kernel: Kernel, caller: Caller, agent: Agent, name: str) -> str:
    await kernel.agents.fork(caller, agent, name)
    return f"fork {name}"


AGENT_VERBS: dict[str, Verb] = {
    "cancel": Verb("cancel [ID|all]", _cancel_arg, _cancel),
    "pause": Verb("pause", _none, _pause),
    "resume": Verb("resume", _none, _resume),
    "reset": Verb("reset", _none, _reset),
    "rollback": Verb("rollback PATH [VERSION|@TIME]", _rollback_arg, _rollback),
    "fork": Verb("fork NAME", _fork_arg, _fork),
    "budget": Verb("budget reset", _budget_arg, _budget, root_only=True),
}
CTL_VERBS = _help(AGENT_VERBS)


# -- kernel/ctl ---------------------------------------------------------------------------------
def _sched_arg(caller: Caller, arg: str) -> list[str]:
    try:
        return [make_scheduler(arg).describe()]
    except ValueError as exc:
        raise KernelError(errno.EINVAL, f"kernel/ctl: {exc}") from None


def _restore_arg(caller: Caller, arg: str) -> list[str]:
    if not 1 <= len(arg.split()) <= 2:
        raise ValueError("restore NAME [NEWNAME]")
    return arg.split()


def _reload_arg(caller: Caller, arg: str) -> list[str]:
    if arg != "reload":
        raise ValueError("tools reload")
    return []


async def _sched(kernel: Kernel, caller: Caller, spec: str) -> None:
    await set_scheduler(kernel, caller, spec)


async def _restore(kernel: Kernel, caller: Caller, name: str, new_name: str = "") -> None:
    await kernel.agents.restore(caller, name, new_name)


async def _tools_reload(kernel: Kernel, caller: Caller) -> str:
    kernel.log_event("tools_reload", uid=caller.uid, external=kernel.tools.reload())
    return "tools reload"


async def _load(kernel: Kernel, caller: Caller, name: str) -> None:
    await kernel.cores.load(caller.uid, name)


async def _unload(kernel: Kernel, caller: Caller, name: str) -> None:
    kernel.cores.unload(caller.uid, name)


async def _retry(kernel: Kernel, caller: Caller, name: str) -> None:
    kernel.cores.retry(caller.uid, name)


KERNEL_VERBS: dict[str, Verb] = {
    "restore": Verb("restore NAME [NEWNAME] (owner or root)", _restore_arg, _restore),
    "sched": Verb("sched fifo | sched rr [quantum=N] | sched priority", _root("change the scheduling policy", _sched_arg), _sched, root_only=True),
    "tools": Verb("tools reload", _root("reload the tools", _reload_arg), _tools_reload, root_only=True),
    "load": Verb("load MODEL", _root("load a model", _one_word), _load, root_only=True),
    "unload": Verb("unload MODEL", _root("unload a model", _one_word), _unload, root_only=True),
    "retry": Verb("retry MODEL", _root("retry a model", _one_word), _retry, root_only=True),
}
KERNEL_CTL_VERBS = _help(KERNEL_VERBS)


def parse_lines(table: dict[str, Verb], caller: Caller, text: str, file: str, known: str) -> list[tuple[str, list[str], str]]:
    """Every line of a write, checked: (verb, arguments, the line); the first bad line refuses them all."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise KernelError(errno.EINVAL, f"{file}: no command (known: {known})")
    commands = []
    for line in lines:
        if len(line) > params.MAX_CTL_LINE:
            raise KernelError(errno.EINVAL, f"{file}: a command is over {params.MAX_CTL_LINE} bytes")
        verb, _, arg = line.partition(" ")
        entry = table.get(verb)
        try:
            if entry is None:
                raise ValueError("unknown")
            commands.append((verb, entry.parse(caller, arg.strip()), line))
        except ValueError:
            raise KernelError(errno.EINVAL, f"{file}: unknown command {line!r} (known: {known})") from None
    return commands


async def sys_agent_ctl(kernel: Kernel, caller: Caller, agent: Agent, data: bytes | str) -> None:
    """An agent's `ctl`, one command a line (AGENT_VERBS)."""
    for verb, args, line in parse_lines(AGENT_VERBS, caller, checks.text(data, "ctl"), "ctl", CTL_VERBS):
        said = await AGENT_VERBS[verb].apply(kernel, caller, agent, *args)
        kernel.log_event("ctl", agent=agent.name, uid=caller.uid, command=said or " ".join(line.split()))


async def sys_kernel_ctl(kernel: Kernel, caller: Caller, data: bytes | str) -> None:
    """`kernel/ctl`, one command a line (KERNEL_VERBS)."""
    for verb, args, _ in parse_lines(KERNEL_VERBS, caller, checks.text(data, "kernel/ctl"), "kernel/ctl", KERNEL_CTL_VERBS):
        await KERNEL_VERBS[verb].apply(kernel, caller, *args)


def policy_line(data: bytes | str) -> str | None:
    """The policy of a `kernel/scheduler` text, checked; None when it has no line."""
    lines = [line for line in checks.text(data, "scheduler").splitlines() if line.strip()]
    if not lines:
        return None
    if len(lines) != 1:
        raise KernelError(errno.EINVAL, "scheduler: write one line: fifo | rr [quantum=N] | priority")
    try:
        return make_scheduler(lines[0]).describe()
    except ValueError as exc:
        raise KernelError(errno.EINVAL, f"scheduler: {exc}") from None


async def sys_sched_check(kernel: Kernel, caller: Caller, data: bytes, first: int = 1) -> None:
    """The complete lines of a `kernel/scheduler` write, all of them (whatever `first`
    says): one valid policy line at most."""
    policy_line(data)


async def sys_sched_set(kernel: Kernel, caller: Caller, data: bytes | str) -> None:
    """`kernel/scheduler`: one line, `fifo`, `rr [quantum=N]` or `priority`."""
    policy = policy_line(data)
    if policy is not None:  # none: `: > kernel/scheduler`, or bash's flush before it writes: no change
        await set_scheduler(kernel, caller, policy)


async def set_scheduler(kernel: Kernel, caller: Caller, spec: str) -> None:
    """Switch every core's scheduling policy (root); it is kept across remounts."""
    access.require_root(caller, "change the scheduling policy")
    try:
        policy = make_scheduler(spec).describe()
    except ValueError as exc:
        raise KernelError(errno.EINVAL, str(exc)) from None
    kernel.cores.set_scheduler(policy)
    await kernel.writer.call(kernel.storage.set_setting, "scheduler", policy)
    kernel.log_event("sched", uid=caller.uid, policy=policy)
