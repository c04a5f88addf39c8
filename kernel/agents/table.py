"""The agent table: the kernel's process table. Agents by name and by id, their
creation, fork, removal to the trash, restore and purge, and the files that are an
agent's own state (config, permissions, context, ownership and modes).

Every method here is called by a syscall handler, which has checked the caller's
access; the table keeps the database and its memory in step.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

import trio

from .. import params
from ..access.policy import Policy, parse_policy
from ..access.rules import may
from ..errors import KernelError
from ..memory.manager import MemoryManager
from ..storage.database import AgentRow, Storage
from ..storage.writer import Writer
from ..types import Agent, AuditSink, Caller, Message
from .config import AgentConfig, parse_config

log = logging.getLogger(__name__)

# The files a fork reads, with their modes in the tree (aiosfs/dirtab.py) where chmod left none.
FORK_READS = {"config": 0o640, "context": 0o640, "permissions": 0o640}


class AgentTable(Mapping[str, Agent]):
    def __init__(self, storage: Storage, writer: Writer, memory: MemoryManager, audit: AuditSink) -> None:
        self.storage = storage
        self.writer = writer
        self.memory = memory
        self._audit = audit
        self._by_name: dict[str, Agent] = {}
        self._by_id: dict[int, Agent] = {}  # every FUSE op resolves by id
        self.trash: dict[int, AgentRow] = {}  # removed agents that can still be restored, by id
        self._reserved: set[str] = set()  # names whose row is being written
        for row in storage.agents():
            if row.trashed_at is not None:
                self.trash[row.id] = row
            else:
                self._load(row)

    def _load(self, row: AgentRow) -> Agent:
        config = parse_config(row.config) if row.config else AgentConfig()
        agent = Agent(row, config, self.storage.messages(row.id), policy=parse_policy(row.permissions), ceiling=parse_policy(row.ceiling))
        self._by_name[row.name] = agent
        self._by_id[row.id] = agent
        self._apply_quota(agent)
        return agent

    def _apply_quota(self, agent: Agent) -> None:
        quotas = self.memory.store.quotas
        if agent.policy.memory_quota is None:
            quotas.pop(agent.row.id, None)
        else:
            quotas[agent.row.id] = agent.policy.memory_quota

    # -- lookups ---------------------------------------------------------------
    def __getitem__(self, name: str) -> Agent:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def named(self, name: str) -> Agent:
        """The live agent called `name`; ENOENT when there is none."""
        agent = self._by_name.get(name)
        if agent is None:
            raise KernelError(errno.ENOENT, f"no agent named {name!r}")
        return agent

    def by_id(self, agent_id: int) -> Agent | None:
        return self._by_id.get(agent_id)

    def require_live(self, agent: Agent) -> None:
        """Refuse work for an agent removed while a file of it was open."""
        if self._by_name.get(agent.name) is not agent:
            raise KernelError(errno.ENOENT, f"agent {agent.name!r} was removed")

    # -- life ------------------------------------------------------------------
    async def create(self, caller: Caller, name: str, mode: int) -> Agent:
        if name in self._by_name or name in self._reserved:
            raise KernelError(errno.EEXIST, f"agent {name!r} exists")
        self._reserved.add(name)  # while its row is written: a second mkdir of the name gets EEXIST
        try:
            row = await self.writer.call(self.storage.create_agent, name, caller.uid, caller.gid, mode)
        finally:
            self._reserved.discard(name)
        agent = Agent(row, AgentConfig(), [])
        self._by_name[name] = agent
        self._by_id[row.id] = agent
        self._audit("mkdir", agent=name, uid=caller.uid)
        return agent

    async def fork(self, caller: Caller, source: Agent, name: str) -> Agent:
        """`fork NAME`: a new agent owned by the caller with the source's config, context,
        policy (root's ceiling and the tokens spent included), modes and memory/ with its
        versions. Its first request shares the source's cached KV prefix in the engine
        (jobs of one uid share prefixes), so it starts warm."""
        self.require_live(source)
        check_readable(caller, source)
        if name in self._by_name or name in self._reserved:
            raise KernelError(errno.EEXIST, f"agent {name!r} exists")
        self._reserved.add(name)
        quotas = self.memory.store.quotas
        try:
            state = (source.config.render(), source.policy.render(Policy(), 0), source.ceiling.render(Policy(), 0), list(source.messages))
            row = await self.writer.call(self._fork_row, caller, source.row, name, *state)
            if source.policy.memory_quota is not None:
                quotas[row.id] = source.policy.memory_quota  # the copy is checked against the quota it inherits
            try:
                await self.memory.copy(caller, source, row.id)
            except BaseException:
                quotas.pop(row.id, None)
                await self.writer.call(self.storage.delete_agent, row.id)
                raise
        finally:
            self._reserved.discard(name)
        agent = self._load(row)
        self._audit("fork", agent=name, source=source.name, uid=caller.uid, id=row.id)
        return agent

    def _fork_row(
        self, caller: Caller, source: AgentRow, name: str, config: str, permissions: str, ceiling: str, messages: list[Message]
    ) -> AgentRow:
        """The new agent's row and conversation, in one transaction (on the journal writer)."""
        modes = dict(source.file_modes)
        with self.storage.atomic():
            row = self.storage.create_agent(name, caller.uid, caller.gid, source.mode)
            self.storage.update_agent(row.id, file_modes=modes, config=config, permissions=permissions, ceiling=ceiling)
            self.storage.set_spent(row.id, source.spent_tokens)
            self.storage.replace_messages(row.id, messages)
        return dataclasses.replace(row, file_modes=modes, config=config, permissions=permissions, ceiling=ceiling, spent_tokens=source.spent_tokens)

    async def remove(self, caller: Caller, agent: Agent) -> None:
        """rmdir: the agent, its memory, context and journal go to the trash, from
        which `restore NAME` in kernel/ctl brings them back until they expire."""
        self.require_live(agent)
        if agent.active:
            ids = " ".join(str(j.id) for j in sorted(agent.active, key=lambda j: j.id))
            raise KernelError(errno.EBUSY, f"agent {agent.name!r} has jobs queued or running ({ids}): echo 'cancel all' > ctl first")
        now = time.time()
        del self._by_name[agent.name]  # first, and in the trash at once: no request starts for it while its row is written
        del self._by_id[agent.row.id]
        agent.row.trashed_at, agent.row.trashed_name = now, agent.name
        self.trash[agent.row.id] = agent.row
        try:
            await self.writer.call(self.storage.trash_agent, agent.row.id, agent.name, now)
        except BaseException:
            del self.trash[agent.row.id]
            agent.row.trashed_at = agent.row.trashed_name = None
            self._by_name[agent.name], self._by_id[agent.row.id] = agent, agent
            raise
        self._audit("rmdir", agent=agent.name, uid=caller.uid, id=agent.row.id, restorable_until=round(now + params.TRASH_RETENTION_SECONDS))

    async def restore(self, caller: Caller, name: str, new_name: str = "") -> Agent:
        """Bring the most recently removed agent called `name` back (as `new_name`)."""
        rows = sorted((r for r in self.trash.values() if r.trashed_name == name), key=lambda r: r.trashed_at or 0)
        if not rows:
            raise KernelError(errno.ENOENT, f"no agent {name!r} in the trash (see kernel/trash)")
        row = rows[-1]
        if not caller.is_root and caller.uid != row.uid:
            raise KernelError(errno.EPERM, f"only the owner of {name!r} (uid {row.uid}) or root may restore it")
        target = new_name or name
        if target in self._by_name or target in self._reserved:
            raise KernelError(errno.EEXIST, f"an agent named {target!r} exists: restore {name} NEWNAME")
        del self.trash[row.id]
        self._reserved.add(target)
        try:
            restored = await self.writer.call(self.storage.restore_agent, row.id, target)
        except BaseException:
            self.trash[row.id] = row
            raise
        finally:
            self._reserved.discard(target)
        agent = self._load(restored)
        self._audit("restore", agent=target, uid=caller.uid, id=row.id, was=name)
        return agent

    async def purge_trash(self, now: float | None = None) -> list[int]:
        """Delete for good what stayed in the trash past TRASH_RETENTION_SECONDS."""
        limit = (now or time.time()) - params.TRASH_RETENTION_SECONDS
        expired = [row for row in self.trash.values() if (row.trashed_at or 0) <= limit]
        for row in expired:
            if self.trash.pop(row.id, None) is None:
                continue  # restored meanwhile
            await self.writer.call(self.storage.delete_agent, row.id)
            await self.memory.drop_id(row.id)
            self._audit("purge", agent=row.trashed_name, id=row.id)
        return [row.id for row in expired]

    async def purge_forever(self) -> None:
        while True:  # until the kernel's nursery is cancelled
            try:
                await self.purge_trash()
            except Exception:
                log.exception("could not purge the trash; trying again later")
            await trio.sleep(params.TRASH_PURGE_INTERVAL)

    # -- an agent's own state ------------------------------------------------------
    async def set_attrs(self, agent: Agent, **values: Any) -> None:
        """Persist ownership or modes after chmod/chown (the VFS already checked them)."""
        for key, value in values.items():
            setattr(agent.row, key, value)
        await self.writer.call(lambda: self.storage.update_agent(agent.row.id, **values))

    async def set_config(self, agent: Agent, config: AgentConfig) -> None:
        self.require_live(agent)
        agent.config = config
        await self.writer.call(lambda: self.storage.update_agent(agent.row.id, config=config.render()))

    async def set_policy(self, caller: Caller, agent: Agent, policy: Policy) -> None:
        """The policy: root's is also the ceiling; an owner's must stay within it."""
        self.require_live(agent)
        if caller.is_root:
            agent.ceiling = policy
        else:
            policy = policy.within(agent.ceiling)
        agent.policy = policy
        permissions, ceiling = policy.render(Policy(), 0), agent.ceiling.render(Policy(), 0)
        await self.writer.call(lambda: self.storage.update_agent(agent.row.id, permissions=permissions, ceiling=ceiling))
        self._apply_quota(agent)

    @staticmethod
    def permissions_text(agent: Agent) -> str:
        return agent.policy.render(agent.ceiling, agent.row.spent_tokens)

    async def reset_budget(self, agent: Agent) -> None:
        agent.row.spent_tokens = 0
        await self.writer.call(self.storage.set_spent, agent.row.id, 0)

    async def set_messages(self, agent: Agent, messages: list[Message]) -> None:
        self.require_live(agent)
        agent.messages = messages
        await self.writer.call(self.storage.replace_messages, agent.row.id, messages)


def check_readable(caller: Caller, agent: Agent) -> None:
    """May the caller read the agent as a copy would: r and x on its directory, r on
    the files a fork copies (memory/ is checked file by file as it is copied)."""
    row = agent.row
    if not may(caller, row.uid, row.gid, row.mode, 0o5):
        raise KernelError(errno.EACCES, f"no permission to read agents/{agent.name}/ (a copy needs r and x on it)")
    for file, mode in FORK_READS.items():
        if not may(caller, row.uid, row.gid, row.file_modes.get(file, mode), 0o4):
            raise KernelError(errno.EACCES, f"no permission to read agents/{agent.name}/{file}")
