"""The kernel's shared types: who calls (`Caller`), an agent's record (`Agent`), a
conversation's `Message`, what a core hands back (`Delivery`) and what every LLM
core offers (`Core`).

A leaf of the import graph: it imports record modules (config, jobs, events,
policy, the storage row) and nothing that imports it back, so every subsystem
can name these types without reaching for the kernel.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from . import params
from .access.policy import Policy
from .agents.config import AgentConfig
from .cores.backends import BackendInfo
from .cores.scheduler import Queue
from .errors import KernelError
from .llm.events import EventStream
from .llm.jobs import Job, JobState
from .storage.database import AgentRow

Message = dict[str, str]  # {"role": ..., "content": ...}
# (job, new output bytes, tokens generated, its end: (state, errno, message) or None)
Delivery = tuple[Job, bytes, int, "tuple[JobState, int, str] | None"]
AuditSink = Callable[..., None]  # audit.write(kind, **fields)


@dataclass(frozen=True)
class Caller:
    uid: int
    gid: int
    pid: int = 0

    @property
    def is_root(self) -> bool:
        return self.uid == 0


@dataclass(eq=False)
class Agent:
    row: AgentRow
    config: AgentConfig
    messages: list[Message]
    latest: dict[int, Job] = field(default_factory=dict)  # uid → the job its output/status follow
    errors: dict[int, collections.deque[str]] = field(default_factory=dict)  # uid → its `error` lines, newest last
    active: set[Job] = field(default_factory=set)  # queued or running
    submitted: trio.Event = field(default_factory=trio.Event, repr=False)  # replaced at every submit
    turn: Job | None = None  # the prompt job now extending the context (in the engine)
    next_turns: collections.deque[Job] = field(default_factory=collections.deque)  # prompt jobs waiting for it
    events: EventStream = field(default_factory=EventStream, repr=False)
    refused: dict[int, KernelError] = field(default_factory=dict)  # uid → why its last prompt made no job
    policy: Policy = field(default_factory=Policy)  # the permissions file in force
    ceiling: Policy = field(default_factory=Policy)  # root's limits for it

    async def wait_for_job(self, uid: int, timeout: float) -> Job | None:
        """The uid's latest job; waits up to `timeout` for a first one."""
        if uid not in self.latest:
            with trio.move_on_after(timeout):
                await self.submitted.wait()
        return self.latest.get(uid)

    @property
    def name(self) -> str:
        return self.row.name

    def add_error(self, uid: int, line: str) -> None:
        """A line of the uid's `error` file; past ERROR_LINES the oldest goes."""
        self.errors.setdefault(uid, collections.deque(maxlen=params.ERROR_LINES)).append(line)


class AgentLookup(Protocol):
    def named(self, name: str) -> Agent:
        """The live agent called `name`; ENOENT when there is none."""
        ...


class Sender(Protocol):
    """Where a core sends its deliveries: the core set's results channel (a trio
    `MemorySendChannel`, unbounded, so a core never waits), which one task reads
    (kernel/llm/results.py). A local engine's thread sends through the trio token."""

    def send_nowait(self, value: list[Delivery]) -> None: ...


class Discard:
    """A `Sender` for a core that no kernel reads (tests of a core's own answers)."""

    def send_nowait(self, value: list[Delivery]) -> None:
        pass


class Core(Protocol):
    """An LLM core: the local engine or a remote server. Jobs come in through its
    `queue`, under the kernel's scheduling policy; their results go out on `results`."""

    queue: Queue
    results: Sender

    @property
    def info(self) -> BackendInfo: ...

    def cancel(self, job: Job) -> bool: ...
    def pause(self, job: Job, paused: bool) -> None: ...
    def running(self) -> int: ...
    def statistics(self) -> dict[str, Any]: ...
    async def run(self, task_status: trio.TaskStatus[None] = ...) -> None: ...
    def stop(self) -> None: ...
