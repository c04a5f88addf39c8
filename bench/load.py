"""Load generation: the run's context, and N closed-loop clients released at once."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .noise import cpu_snapshot
from .stats import Record
from .workloads import KERNEL_SLOTS, Plan


class Counter(Protocol):
    """Counts finished requests: `console.Progress`, or the worker's pipe to its parent."""

    def add(self, n: int = 1) -> None: ...


@dataclass
class Cell:
    plan: Plan
    model: Path
    threads: int
    deadline: float  # time.time() after which no new request starts
    timeout: float  # seconds a run may take
    log_dir: Path
    tag: str  # for log file names
    progress: Counter
    eog: list[int]
    llama_server: Path | None = None
    scheduler: str | None = None  # aiosfs peers: the scheduling policy (None: the kernel's default)
    slots: int | None = None  # aiosfs peers: KV slots (None: one per agent; KERNEL_SLOTS: the kernel's default)
    extra: dict[str, Any] = field(default_factory=dict)  # peer counters for the JSON
    fake: bool = False  # --fake: the aiosfs peers run on the fake backend (no model)

    _cpu: tuple[float, float, float, float] | None = None

    def cpu_start(self) -> None:
        self._cpu = cpu_snapshot()

    def cpu_end(self) -> None:
        """How much of the machine others used while this run measured (noise)."""
        if self._cpu is None:
            return
        end = cpu_snapshot()
        t0, busy0, steal0, ours0 = self._cpu
        t1, busy1, steal1, ours1 = end
        capacity = (t1 - t0) * (os.cpu_count() or 1)
        if capacity > 0:
            self.extra["foreign_cpu"] = round(max(0.0, (busy1 - busy0) - (ours1 - ours0)) / capacity, 3)
            self.extra["steal"] = round((steal1 - steal0) / capacity, 3)
            self.extra["our_cpu"] = round((ours1 - ours0) / capacity, 3)

    @property
    def n_slots(self) -> int | None:
        """The aiosfs peers' KV slots; None: the kernel's default (`--slots default`)."""
        if self.slots == KERNEL_SLOTS:
            return None
        return self.slots or max(self.plan.n_agents, 1)

    def log_file(self, peer: str) -> Path:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self.log_dir / f"{self.tag}-{peer.replace('.', '_')}.log"


def chat(system: str, history: list[dict[str, str]], message: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, *history, {"role": "user", "content": message}]


def closed_loop_threads(cell: Cell, one_request: Callable[[int, list[dict[str, str]], int], tuple[Record, str]]) -> tuple[list[Record], float]:
    """N client threads, each a closed loop of M requests, all released at once
    (in the priority workload agent 0 a little later; the busy agents stop when it is done).

    `one_request(agent, messages, max_tokens)` returns (record, answer text)."""
    plan = cell.plan
    records: list[Record] = []
    lock = threading.Lock()
    barrier = threading.Barrier(plan.n_agents + 1)
    high_done = threading.Event()

    def client(agent: int) -> None:
        history: list[dict[str, str]] = []
        barrier.wait()
        time.sleep(plan.start_delay(agent))
        try:
            for index, message in enumerate(plan.messages[agent]):
                if time.time() > cell.deadline or (plan.busy(agent) and high_done.is_set()):
                    break
                try:
                    record, answer = one_request(agent, chat(plan.system, history, message), plan.max_tokens)
                except Exception as exc:  # a failed request is a result, not a crash
                    record, answer = Record(agent, index, time.time(), time.time(), error=f"{type(exc).__name__}: {exc}"), ""
                record.index = index
                with lock:
                    records.append(record)
                cell.progress.add()
                if record.error:
                    break
                if plan.workload.multi_turn:
                    history += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
        finally:
            if agent == 0:
                high_done.set()

    threads = [threading.Thread(target=client, args=(a,), daemon=True) for a in range(plan.n_agents)]
    for t in threads:
        t.start()
    cell.cpu_start()
    started = time.time()
    barrier.wait()
    for t in threads:
        t.join(max(1.0, cell.deadline + cell.timeout * 0.5 - time.time()))
    cell.cpu_end()
    return records, started


def warm_threads(n: int, fn: Callable[[int], object]) -> None:
    threads = [threading.Thread(target=fn, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
