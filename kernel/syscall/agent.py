"""Syscalls on agents and their own files: mkdir, rmdir, chmod/chown, and the
config, permissions and context files."""

from __future__ import annotations

import errno
from typing import Any

from ..access import rules as access
from ..access.policy import parse_policy
from ..agents.config import parse_config
from ..agents.context import parse_context
from ..errors import KernelError
from ..kernel import Kernel
from ..types import Agent, Caller
from . import checks


async def sys_agent_create(kernel: Kernel, caller: Caller, name: str, mode: int) -> Agent:
    checks.agent_name(name)
    return await kernel.agents.create(caller, name, mode)


async def sys_agent_remove(kernel: Kernel, caller: Caller, name: str) -> None:
    agent = kernel.agents.named(name)
    access.require_owner(caller, agent, "remove it")
    await kernel.agents.remove(caller, agent)


async def sys_agent_setattr(kernel: Kernel, caller: Caller, agent: Agent, **values: Any) -> None:
    await kernel.agents.set_attrs(agent, **values)


async def sys_file_replace(kernel: Kernel, caller: Caller, agent: Agent, name: str, mode: int) -> None:
    """Copy tools replace a file by an exclusive create of it or a rename onto it; the
    VFS checked only the directory for those, so this is the check an open for
    writing makes: `w` in the file's mode bits (`mode`, as the tree shows it)."""
    kernel.agents.require_live(agent)
    if not access.may(caller, agent.row.uid, agent.row.gid, mode, 0o2):
        raise KernelError(errno.EACCES, f"no write permission on {agent.name}/{name}")


async def sys_config_write(kernel: Kernel, caller: Caller, agent: Agent, data: bytes | str) -> None:
    kernel.agents.require_live(agent)
    text = checks.text(data, "config")
    checks.stored_size(len(text.encode()), "config")
    config = parse_config(text, kernel.cores.known)
    access.check_request(agent, config)
    kernel.requests.tool_specs(config)  # EINVAL for a tool nobody serves
    await kernel.agents.set_config(agent, config)


async def sys_config_check(kernel: Kernel, caller: Caller, agent: Agent, data: bytes, first: int = 1) -> None:
    """The complete lines of a config write, from line `first` on, each checked alone
    (key, value, model); the policy and the tools are checked at the commit."""
    parse_config(checks.lines_from(data, first, "config"), kernel.cores.known)


async def sys_permissions_check(kernel: Kernel, caller: Caller, agent: Agent, data: bytes, first: int = 1) -> None:
    """The complete lines of a permissions write, from line `first` on, each checked
    alone (key, value); root's ceiling is checked at the commit."""
    parse_policy(checks.lines_from(data, first, "permissions"))


async def sys_permissions_write(kernel: Kernel, caller: Caller, agent: Agent, data: bytes | str) -> None:
    """The policy: root's text is also the ceiling; an owner's must stay within it."""
    kernel.agents.require_live(agent)
    text = checks.text(data, "permissions")
    checks.stored_size(len(text.encode()), "permissions")
    await kernel.agents.set_policy(caller, agent, parse_policy(text))


async def sys_context_write(kernel: Kernel, caller: Caller, agent: Agent, data: bytes | str) -> None:
    kernel.agents.require_live(agent)
    await kernel.agents.set_messages(agent, parse_context(checks.text(data, "context")))
