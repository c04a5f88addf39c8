"""The memory manager: each agent's memory/ (the store in store.py) as the kernel
uses it: its root, recall into prompts, the `recall` file, rollback, the copy for
a forked agent, and the permission checks for what the kernel does on an agent's
behalf.

Store methods wait for the disk, so they run on worker threads (`run`); the trio
thread never blocks on a commit.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from .. import params
from ..access.rules import check_share, may
from ..agents.config import AgentConfig
from ..errors import KernelError
from .store import Attr, MemoryStore, Passage, Version

if TYPE_CHECKING:
    from ..types import Agent, Caller

T = TypeVar("T")

RECALL_HEADER = "Notes recalled from your memory (memory/), most relevant first:"


class MemoryManager:
    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self._roots: dict[int, int] = {}  # agent id → store inode of its memory/

    async def run(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A store method on a worker thread."""
        return await trio.to_thread.run_sync(functools.partial(method, *args, **kwargs))

    async def root(self, agent: Agent) -> int:
        """The store inode of the agent's memory/, made on first use and owned like the agent."""
        ino = self._roots.get(agent.row.id)
        if ino is None:
            ino = self._roots[agent.row.id] = await self.run(self.store.root, agent.row.id, agent.row.uid, agent.row.gid)
        return ino

    async def is_empty(self, agent: Agent) -> bool:
        return await self.run(self.store.is_empty, await self.root(agent))

    async def copy(self, caller: Caller, source: Agent, target_id: int) -> None:
        """`fork`: agent `target_id` gets a copy of `source`'s memory/, owned by the caller,
        who must be able to read all of it (EACCES)."""
        await self.root(source)
        await self.run(self.store.copy_agent, source.row.id, target_id, caller, None if caller.is_root else caller)

    async def drop_id(self, agent_id: int) -> None:
        """Forget an agent's memory for good (it was purged from the trash)."""
        self._roots.pop(agent_id, None)
        await self.run(self.store.drop_agent, agent_id)

    async def search(self, caller: Caller, agent: Agent, query: str, k: int) -> list[Passage]:
        """The best `k` passages of the agent's memory that the caller may read: a file
        the caller could not `cat` never reaches it through recall either."""
        store = self.store

        def visible() -> list[Passage]:
            found = store.search(agent.row.id, query, k * params.RECALL_OVERFETCH)
            return [p for p in found if readable(caller, store.lineage(p.ino))][:k]

        return await self.run(visible)

    async def versions(self, caller: Caller, agent: Agent) -> list[Version]:
        """Kept versions of the files the caller may read."""
        await self.root(agent)
        store = self.store

        def visible() -> list[Version]:
            return [v for v in store.versions(agent.row.id) if readable(caller, store.lineage(v.ino))]

        return await self.run(visible)

    async def recall_into(self, caller: Caller, agent: Agent, config: AgentConfig, message: str) -> tuple[AgentConfig, list[str] | None]:
        """With `memory_recall=on`: the config whose system prompt carries the passages
        recalled for `message`, and their `path:line`s (None when recall is off)."""
        if not config.memory_recall:
            return config, None
        await self.root(agent)
        passages = await self.search(caller, agent, message, config.memory_top_k)
        return dataclasses.replace(config, system=with_recall(config.system, passages)), [f"{p.path}:{p.line}" for p in passages]

    async def recall(self, caller: Caller, agent: Agent, query: str, k: int, target: Agent | None = None) -> list[Passage]:
        """The `recall` file: ranked passages of the agent's memory, for callers who may
        read its memory/; or of `target`'s, which its policy decides (share_memory):
        the agent acts for the caller there, as its tools do."""
        target = target or agent
        attr = await self.run(self.store.getattr, await self.root(agent))
        if not may(caller, attr.uid, attr.gid, attr.mode, 0o5):
            raise KernelError(errno.EACCES, f"recall: no read permission on {agent.name}/memory/")
        check_share(agent, target)
        await self.root(target)
        if target is agent:
            return await self.search(caller, agent, query, k)
        return await self.run(self.store.search, target.row.id, query, k)  # shared: the policy decides, not modes

    async def rollback(self, caller: Caller, agent: Agent, path: str, version: str) -> int:
        """`rollback PATH [VERSION|@TIME]`: needs search on memory/ and write on the file."""
        root = await self.root(agent)
        store = self.store

        def checked() -> int:
            if not may_attr(caller, store.getattr(root), 0o1):
                raise KernelError(errno.EACCES, f"rollback: no permission to search {agent.name}/memory/")
            *dirs, target = store.lineage(store.walk(agent.row.id, path))
            if not all(may_attr(caller, d, 0o1) for d in dirs) or not may_attr(caller, target, 0o2):
                raise KernelError(errno.EACCES, f"rollback: no permission to write memory/{path} (every directory on the way needs x)")
            return store.rollback(agent.row.id, path, version)

        return await self.run(checked)


def may_attr(caller: Caller, attr: Attr, bits: int) -> bool:
    return may(caller, attr.uid, attr.gid, attr.mode, bits)


def readable(caller: Caller, lineage: list[Attr]) -> bool:
    """Could the caller open this file for reading: x on every directory, r on it?"""
    *dirs, target = lineage
    return all(may_attr(caller, d, 0o1) for d in dirs) and may_attr(caller, target, 0o4)


def with_recall(system: str, passages: list[Passage]) -> str:
    """The system prompt with recalled passages appended, at most MEMORY_RECALL_MAX_CHARS of them."""
    blocks: list[str] = []
    room = params.MEMORY_RECALL_MAX_CHARS
    for p in passages:
        block = f"--- {p.path}:{p.line}\n{p.text}"
        if len(block) > room:
            break
        blocks.append(block)
        room -= len(block)
    if not blocks:
        return system
    return "\n\n".join(part for part in (system, RECALL_HEADER + "\n" + "\n".join(blocks)) if part)
