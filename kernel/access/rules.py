"""The access manager's rules: who may do what to an agent beyond the mode bits
the VFS already checked (`default_permissions`), and the agent's policy limits.

Every syscall passes `syscall.check_access` with the caller's identity; the rules
it applies live here as plain functions. A refusal is a KernelError (EPERM,
EACCES, EDQUOT, EAGAIN); the syscall entry point writes every denial and every
privileged action to the audit log.
"""

from __future__ import annotations

import dataclasses
import errno
from typing import TYPE_CHECKING

from ..agents.config import AgentConfig
from ..errors import KernelError

if TYPE_CHECKING:
    from ..types import Agent, Caller


def require_owner(caller: Caller, agent: Agent, what: str) -> None:
    if not caller.is_root and caller.uid != agent.row.uid:
        raise KernelError(errno.EPERM, f"only the owner of {agent.name!r} (uid {agent.row.uid}) or root may {what}")


def require_root(caller: Caller, what: str) -> None:
    if not caller.is_root:
        raise KernelError(errno.EPERM, f"only root may {what}")


def groups_of(caller: Caller) -> set[int]:
    """The caller's primary and supplementary groups (from /proc while it lives)."""
    groups = {caller.gid}
    if caller.pid > 0:
        try:
            with open(f"/proc/{caller.pid}/status") as status:
                for line in status:
                    if line.startswith("Groups:"):
                        groups.update(int(g) for g in line.split()[1:])
                        break
        except (OSError, ValueError):
            pass
    return groups


def may(caller: Caller, uid: int, gid: int, mode: int, bits: int) -> bool:
    """The Unix permission check of `bits` (r=4 w=2 x=1) on a file; root passes."""
    if caller.is_root:
        return True
    shift = 6 if caller.uid == uid else 3 if gid in groups_of(caller) else 0
    return (mode >> shift) & bits == bits


def require_work(caller: Caller, agent: Agent) -> None:
    """Acting for an agent (a tool call in its name) needs the right to make it work:
    `w` on its prompt, with the prompt's mode as chmod left it."""
    mode = agent.row.file_modes.get("prompt", 0o620)  # 0o620: the prompt's mode in the tree
    if not may(caller, agent.row.uid, agent.row.gid, mode, 0o2):
        raise KernelError(errno.EACCES, f"acting for agent {agent.name!r} needs write permission on its prompt")


def check_can_submit(agent: Agent) -> None:
    """What a prompt write can be refused for before the request is read: the budget
    (EDQUOT) and the queue limit (EAGAIN)."""
    policy = agent.policy
    if policy.budget_tokens is not None and agent.row.spent_tokens >= policy.budget_tokens:
        raise KernelError(
            errno.EDQUOT,
            f"agent {agent.name!r} has spent its budget of {policy.budget_tokens} tokens ({agent.row.spent_tokens} used); "
            "root can reset it: echo 'budget reset' > ctl",
        )
    if policy.max_queue is not None and len(agent.active) >= policy.max_queue:
        raise KernelError(errno.EAGAIN, f"agent {agent.name!r} allows {policy.max_queue} queued or running jobs; try again when one finishes")


def check_request(agent: Agent, config: AgentConfig) -> AgentConfig:
    """A parsed request (or config) under the policy: EPERM past the priority cap or
    for a tool not allowed; max_tokens is cut to the policy's (a length limit, like
    the window's, not a right)."""
    policy = agent.policy
    if policy.priority_max is not None and config.priority > policy.priority_max:
        raise KernelError(errno.EPERM, f"priority {config.priority} is above the priority_max {policy.priority_max} of {agent.name!r}")
    if policy.tools is not None and not set(config.tools) <= set(policy.tools):
        extra = " ".join(sorted(set(config.tools) - set(policy.tools)))
        raise KernelError(errno.EPERM, f"tools {extra} are not allowed for {agent.name!r} (permissions: tools {' '.join(policy.tools)})")
    if policy.max_tokens is not None and config.max_tokens > policy.max_tokens:
        return dataclasses.replace(config, max_tokens=policy.max_tokens)
    return config


def check_share(reader: Agent, target: Agent) -> None:
    """May `reader`'s tools and syscalls read `target`'s memory? Only if target shares it."""
    if reader is not target and reader.name not in target.policy.share_memory:
        raise KernelError(errno.EACCES, f"agent {target.name!r} does not share its memory with {reader.name!r} (permissions: share_memory)")
