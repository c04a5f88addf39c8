"""Scheduling policies: which queued jobs the engine admits into free slots.

A scheduler is plain logic with no locks of its own: the engine calls it while
holding its condition lock, from both threads. Jobs of one agent keep their order.
"""

from __future__ import annotations

import collections
from typing import Protocol

from .jobs import Job


class Scheduler(Protocol):
    name: str

    def push(self, job: Job) -> None: ...

    def pick(self, free_slots: int) -> list[Job]: ...

    def remove(self, job: Job) -> bool: ...

    def __len__(self) -> int: ...

    def describe(self) -> str: ...

    def queued(self) -> list[Job]: ...


class FifoScheduler:
    """First come, first served: jobs enter the batch in arrival order."""

    name = "fifo"

    def __init__(self) -> None:
        self._queue: collections.deque[Job] = collections.deque()

    def push(self, job: Job) -> None:
        self._queue.append(job)

    def pick(self, free_slots: int) -> list[Job]:
        picked: list[Job] = []
        while self._queue and len(picked) < free_slots:
            picked.append(self._queue.popleft())
        return picked

    def remove(self, job: Job) -> bool:
        try:
            self._queue.remove(job)
        except ValueError:
            return False
        return True

    def __len__(self) -> int:
        return len(self._queue)

    def describe(self) -> str:
        return "fifo"

    def queued(self) -> list[Job]:
        return list(self._queue)


def make_scheduler(spec: str) -> Scheduler:
    """Build a policy from its `kernel/scheduler` line."""
    words = spec.split()
    if words == ["fifo"]:
        return FifoScheduler()
    raise ValueError(f"unknown scheduling policy {spec!r} (known: fifo)")
