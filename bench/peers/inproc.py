"""The aiosfs-inproc and aiosfs-noreuse peers: the kernel in-process, through its syscall table."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..load import Cell
from ..stats import Record, counter_delta, kernel_counters
from ..workloads import Plan

if TYPE_CHECKING:
    from kernel import Kernel


def envelope(plan: Plan, message: str, max_tokens: int | None = None) -> bytes:
    return json.dumps({"prompt": message, "max_tokens": max_tokens or plan.max_tokens, "temperature": 0, "ignore_eos": True}).encode()


def agent_config(plan: Plan, agent: int, warm: bool = False) -> str:
    """An agent's config: the plan's system prompt (`warm`: the warm-up's)."""
    system = (plan.warm_system if warm else plan.system).replace("\n", "\\n")
    priority = plan.priority_of(agent)
    return f"system={system}\ntemperature=0\nignore_eos=on\n" + ("" if priority is None else f"priority={priority}\n")


def make_backend(cell: Cell) -> Any:
    """The run's llama.cpp backend, or the fake one under --fake."""
    # --slots default (n_slots None): the backend's own number, as `aiosfs mount` without --slots
    if cell.fake:
        from kernel import params
        from kernel.cores.backends.fake import FakeBackend

        return FakeBackend(n_slots=cell.n_slots or params.DEFAULT_SLOTS, n_ctx_seq=cell.plan.ctx)
    from kernel.cores.backends.llama import LlamaBackend

    if cell.n_slots is None:
        return LlamaBackend(cell.model, threads=cell.threads, n_ctx_seq=cell.plan.ctx)
    return LlamaBackend(cell.model, threads=cell.threads, n_slots=cell.n_slots, n_ctx_seq=cell.plan.ctx)


class KernelRun:
    """One run of the in-process peer: N trio clients calling the kernel's syscalls."""

    def __init__(self, cell: Cell, kernel: Kernel) -> None:
        from kernel import Caller

        self.cell, self.plan, self.kernel = cell, cell.plan, kernel
        self.caller = Caller(0, 0)
        self.records: list[Record] = []
        self.started = 0.0

    async def request(self, agent: Any, index: int, number: int, message: str, max_tokens: int | None = None) -> Record:
        """One prompt to an agent, waited for to the end: its record."""
        from kernel.syscall import Sys, syscall

        start = time.time()
        try:
            job = await syscall(self.kernel, Sys.LLM_SUBMIT, self.caller, agent, envelope(self.plan, message, max_tokens))
            while not job.state.finished:
                await job.wait_beyond(len(job.data), 1.0)
        except Exception as exc:
            return Record(number, index, start, time.time(), error=f"{type(exc).__name__}: {exc}")
        record = Record(number, index, start, job.finished_at or time.time(), job.first_token_at or None, job.n_generated, len(job.prompt_tokens))
        if job.state.value != "done":
            record.error = f"job {job.id} {job.state.value}: {job.message}"
        return record

    async def client(self, agent: Any, number: int, go: trio.Event, high_done: trio.Event) -> None:
        """Agent `number`'s closed loop: its requests one after another once `go` is set."""
        from kernel.syscall import Sys, syscall

        plan, cell = self.plan, self.cell
        await go.wait()
        await trio.sleep(plan.start_delay(number))
        try:
            for index, message in enumerate(plan.messages[number]):
                if time.time() > cell.deadline or (plan.busy(number) and high_done.is_set()):
                    break
                record = await self.request(agent, index, number, message)
                self.records.append(record)
                cell.progress.add()
                if record.error:
                    break
                if not plan.workload.multi_turn:
                    await syscall(self.kernel, Sys.CONTEXT_WRITE, self.caller, agent, "")
        finally:
            if number == 0:
                high_done.set()

    async def make_agents(self) -> list[Any]:
        """The agents, configured and warmed up (a request alone, then one per agent at once), their contexts empty."""
        from kernel.syscall import Sys, syscall

        plan, kernel, caller = self.plan, self.kernel, self.caller
        agents = []
        for a in range(plan.n_agents):
            agent = await syscall(kernel, Sys.AGENT_CREATE, caller, f"a{a}", 0o755)
            await syscall(kernel, Sys.CONFIG_WRITE, caller, agent, agent_config(plan, a, warm=True))
            agents.append(agent)
        warm = await self.request(agents[0], 0, 0, plan.warmup[0], 16)
        if warm.error:
            raise RuntimeError(f"warm-up failed: {warm.error}")
        self.cell.extra["warm_prompt_tokens"] = warm.prompt_tokens
        async with trio.open_nursery() as warmers:
            for a, agent in enumerate(agents):
                warmers.start_soon(self.request, agent, 0, a, plan.warmup[a], 8)
        for a, agent in enumerate(agents):
            await syscall(kernel, Sys.CONTEXT_WRITE, caller, agent, "")
            await syscall(kernel, Sys.CONFIG_WRITE, caller, agent, agent_config(plan, a))
        return agents

    async def measure(self, agents: list[Any]) -> None:
        """Release the clients at once; the kernel's counters over the run into the cell's extra."""
        cell, kernel = self.cell, self.kernel
        before = kernel_counters(kernel.statistics())
        go, high_done = trio.Event(), trio.Event()
        with trio.move_on_after(max(1.0, cell.deadline + cell.timeout * 0.5 - time.time())):
            async with trio.open_nursery() as clients:
                for a, agent in enumerate(agents):
                    clients.start_soon(self.client, agent, a, go, high_done)
                cell.cpu_start()
                self.started = time.time()
                go.set()
        cell.cpu_end()
        wall = max((r.end for r in self.records), default=self.started) - self.started
        cell.extra["kernel"] = counter_delta(before, kernel_counters(kernel.statistics()), wall)

    async def main(self) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.kernel.run)
            try:
                await self.measure(await self.make_agents())
            finally:
                self.kernel.stop()


def run_aiosfs_inproc(cell: Cell, kv_reuse: bool = True) -> tuple[list[Record], float]:
    """The kernel in this process, driven through its syscall table; `kv_reuse=False`:
    every turn is prefilled from scratch (the aiosfs-noreuse peer)."""
    from kernel import Kernel, Storage

    backend = make_backend(cell)
    tmp = Path(tempfile.mkdtemp(prefix="aiosfs-bench-"))
    storage = Storage(tmp / "b.db")
    kernel = Kernel(storage, backend, scheduler=cell.scheduler, kv_reuse=kv_reuse)
    cell.extra.update(scheduler=kernel.engine.scheduler.describe(), slots=backend.info.n_slots, kv_reuse=kv_reuse)
    run = KernelRun(cell, kernel)
    try:
        trio.run(run.main)
    finally:
        backend.close()
        kernel.close()  # the journal writer, then the database
        shutil.rmtree(tmp, ignore_errors=True)
    return run.records, run.started


def run_aiosfs_noreuse(cell: Cell) -> tuple[list[Record], float]:
    return run_aiosfs_inproc(cell, kv_reuse=False)
