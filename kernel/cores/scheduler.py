"""Scheduling policies: which jobs hold the engine's sequence slots.

A policy orders the waiting jobs and, for the preemptive ones, names running
jobs to switch out so that waiting ones get a slot:

- `fifo`: arrival order; a running job keeps its slot until it ends.
- `rr quantum=N`: agents take turns (the agent served least recently goes first);
  a job that generated N tokens since it got its slot yields it to a waiting job.
- `priority`: the highest effective priority gets the next free slot; effective
  priority is the job's `priority` plus one per `PRIORITY_AGING_SECONDS` spent
  waiting, so low priority still progresses. A waiting job whose own priority is
  above a running job's priority preempts it (aging orders admissions, it never
  preempts: that would switch equals back and forth). While jobs of a higher
  priority run, lower ones keep their slots but are left out of the steps (a free
  switch), so the urgent job is not slowed by a batch it outranks, until aging
  lifts them to the top priority among the running jobs.

Fairness between agents: under `rr` and `priority` one agent's flood of jobs
cannot starve the others, because ties go to the agent served least recently.

Policies hold no locks: the engine calls them under its own lock (`Queue`, the way
into a core, holds it).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import params
from ..llm.jobs import Job


@dataclass
class Running:
    """What a policy knows of a job holding a slot."""

    job: Job
    quantum_used: int  # tokens generated since it got the slot


_ARRIVALS = itertools.count()  # shared by all policies, so a switch keeps the order


class Scheduler:
    name = "fifo"

    def __init__(self) -> None:
        self._waiting: list[tuple[int, Job]] = []  # (arrival number, job)
        self._served = itertools.count(1)
        self._last_served: dict[str, int] = {}  # agent → when it last got a slot

    # -- the queue ------------------------------------------------------------
    def push(self, job: Job) -> None:
        """Queue a new job, or one switched out (it keeps its place by arrival)."""
        if job.arrival < 0:
            job.arrival = next(_ARRIVALS)
        self._waiting.append((job.arrival, job))

    def remove(self, job: Job) -> bool:
        for i, (_, waiting) in enumerate(self._waiting):
            if waiting is job:
                del self._waiting[i]
                return True
        return False

    def __len__(self) -> int:
        return len(self._waiting)

    def queued(self) -> list[Job]:
        return [job for _, job in sorted(self._waiting, key=self._key)]

    def pick(self, free_slots: int) -> list[Job]:
        """Take up to `free_slots` jobs, best first."""
        self._waiting.sort(key=self._key)
        picked = [job for _, job in self._waiting[:free_slots]]
        del self._waiting[:free_slots]
        for job in picked:
            self._last_served[job.agent] = next(self._served)
        return picked

    def _key(self, item: tuple[int, Job]) -> tuple[float, ...]:
        return (item[0],)

    # -- preemption ---------------------------------------------------------------
    def preempt(self, running: list[Running], free_slots: int) -> list[Job]:
        """Running jobs to switch out now so that waiting jobs get slots."""
        return []

    def hold(self, running: list[Running]) -> list[Job]:
        """Running jobs to leave out of this step (they keep their slots)."""
        return []

    def describe(self) -> str:
        return self.name


class RoundRobinScheduler(Scheduler):
    name = "rr"

    def __init__(self, quantum: int = params.DEFAULT_QUANTUM) -> None:
        super().__init__()
        self.quantum = quantum

    def _key(self, item: tuple[int, Job]) -> tuple[float, ...]:
        return (self._last_served.get(item[1].agent, 0), item[0])

    def preempt(self, running: list[Running], free_slots: int) -> list[Job]:
        wanting = len(self._waiting) - free_slots
        if wanting <= 0:
            return []
        spent = sorted((r for r in running if r.quantum_used >= self.quantum), key=lambda r: -r.quantum_used)
        return [r.job for r in spent[:wanting]]

    def describe(self) -> str:
        return f"rr quantum={self.quantum}"


class PriorityScheduler(Scheduler):
    name = "priority"

    def effective(self, job: Job, now: float) -> float:
        return job.config.priority + max(0.0, now - job.queued_at) / params.PRIORITY_AGING_SECONDS

    def _key(self, item: tuple[int, Job]) -> tuple[float, ...]:
        return (-self.effective(item[1], self._now), self._last_served.get(item[1].agent, 0), item[0])

    _now = 0.0

    def pick(self, free_slots: int) -> list[Job]:
        self._now = time.time()
        return super().pick(free_slots)

    def queued(self) -> list[Job]:
        self._now = time.time()
        return super().queued()

    def preempt(self, running: list[Running], free_slots: int) -> list[Job]:
        if not self._waiting or free_slots > 0 or not running:
            return []
        best = max(job.config.priority for _, job in self._waiting)
        victim = min(running, key=lambda r: (r.job.config.priority, -r.job.queued_at))
        return [victim.job] if best > victim.job.config.priority else []

    def hold(self, running: list[Running]) -> list[Job]:
        if len(running) < 2:
            return []
        top = max(r.job.config.priority for r in running)
        now = time.time()
        return [r.job for r in running if self.effective(r.job, now) < top]


class Queue:
    """A core's way in: the policy's queue of waiting jobs and, beside it, the paused
    ones (`parked`). Both kinds of core have one, and the core set hands jobs to it
    directly. A local engine's is guarded by the engine's lock, since its loop takes
    jobs from it on another thread; a remote core's lives on the trio thread (no lock).
    `wake` tells the core that its queue changed (called with the lock held); `refuse`
    ends a job the core cannot take now (a crash-looped engine) and says so."""

    def __init__(
        self,
        scheduler: Scheduler,
        lock: threading.Condition | None = None,
        wake: Callable[[], None] = lambda: None,
        refuse: Callable[[Job], bool] = lambda job: False,
    ) -> None:
        self.scheduler = scheduler
        self.parked: list[Job] = []  # paused while waiting (or switched out): back to the queue on resume
        self.lock: contextlib.AbstractContextManager[Any] = lock if lock is not None else contextlib.nullcontext()
        self._wake = wake
        self._refuse = refuse

    def push(self, job: Job) -> None:
        with self.lock:
            if not self._refuse(job):
                self.scheduler.push(job)
                self._wake()

    def set_policy(self, scheduler: Scheduler) -> None:
        """Switch policy at run time; queued jobs move over in their order."""
        with self.lock:
            for job in self.scheduler.queued():
                scheduler.push(job)
            self.scheduler = scheduler
            self._wake()

    def take(self, job: Job) -> bool:
        """Take a waiting job (queued or parked) out; whether it was waiting. Caller holds the lock."""
        if self.scheduler.remove(job):
            return True
        if job in self.parked:
            self.parked.remove(job)
            return True
        return False

    def park(self, job: Job, paused: bool) -> None:
        """Pause or resume a job on the queue side: a waiting job leaves the queue for
        `parked` (or returns, in its old place); the flag tells whoever runs it."""
        with self.lock:
            if not paused and job in self.parked:
                self.parked.remove(job)
                self.scheduler.push(job)
            elif paused and self.scheduler.remove(job):
                self.parked.append(job)
            job.pause_requested = paused
            self._wake()

    def queued(self) -> list[Job]:
        with self.lock:
            return self.scheduler.queued() + list(self.parked)


POLICIES = "fifo | rr [quantum=N] | priority"


def make_scheduler(spec: str) -> Scheduler:
    """Build a policy from its `kernel/scheduler` line; ValueError on a bad one."""
    words = spec.split()
    if words == ["fifo"]:
        return Scheduler()
    if words == ["priority"]:
        return PriorityScheduler()
    if words and words[0] == "rr" and len(words) <= 2:
        quantum = params.DEFAULT_QUANTUM
        if len(words) == 2:
            key, _, value = words[1].partition("=")
            if key != "quantum" or not value.isdigit() or not 1 <= int(value) <= params.MAX_QUANTUM:
                raise ValueError(f"bad rr option {words[1]!r}: expected quantum=N with 1 <= N <= {params.MAX_QUANTUM}")
            quantum = int(value)
        return RoundRobinScheduler(quantum)
    raise ValueError(f"unknown scheduling policy {spec.strip()!r} (known: {POLICIES})")
