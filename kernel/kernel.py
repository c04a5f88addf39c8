"""The kernel: wires the subsystems together and owns their tasks.

It holds no request logic. The parts, each a package named after its role:

- `agents/`: the agent table (the process table), agents' config and context;
- `llm/`: the request path, from a prompt to a job in a core and back;
- `cores/`: the LLM cores (scheduler, engine, remote servers, backends);
- `memory/` and `storage/`: memory/ files, and the journal with its writer thread;
- `access/`: the rules, the permissions policy and the audit log;
- `tools/`: the tool registry, built-in and external tools, MCP servers' tools;
- `syscall/`: the syscall table, the one way in from the filesystem.

Everything runs on the trio thread except the engine loops and the journal writer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from . import params
from .access.audit import AuditLog
from .agents.table import AgentTable
from .cores.client import Runtime
from .cores.coreset import ROUTES, CoreSet, Loader
from .cores.remote import RemoteConfig
from .llm.recovery import recover_jobs
from .llm.requests import Requests
from .memory.manager import MemoryManager
from .memory.store import MemoryStore
from .storage.database import Storage
from .storage.writer import Writer
from .tools.manager import ToolManager
from .tools.mcp import McpServers
from .tools.mcpconfig import McpServerConfig
from .types import Agent, Caller

__all__ = ["ROUTES", "Agent", "Caller", "Kernel"]


class Kernel:
    def __init__(
        self,
        storage: Storage,
        runtime: Runtime,
        scheduler: str | None = None,
        memory: MemoryStore | None = None,
        tools_dir: Path | None = None,
        remotes: Sequence[RemoteConfig] = (),
        route: str = "default",
        loaders: Mapping[str, Loader] | None = None,
        mcp_servers: Sequence[McpServerConfig] = (),
        **engine_options: Any,
    ) -> None:
        """`runtime` (what runs the mount's model: a backend, or an engine process),
        `remotes`, `route`, `loaders` and `engine_options` make the cores
        (`CoreSet`); `scheduler` overrides the policy kept in `storage`; `memory` is the
        memory/ store (beside the database by default); `tools_dir` holds external tools;
        `mcp_servers` are the MCP servers whose tools are served as SERVER.TOOL."""
        self.storage = storage
        self.writer = Writer(conn=storage.db.conn)  # group commits: one fsync for a burst of writes
        self.audit = AuditLog(Path(storage.path).with_name("audit.jsonl"))
        self.log_event = self.audit.write
        self.memory = MemoryManager(memory or MemoryStore(Path(storage.path).with_name("memory.db")))
        policy = scheduler or storage.setting("scheduler", params.DEFAULT_SCHEDULER)
        self.cores = CoreSet(runtime, policy, self.log_event, remotes=remotes, route=route, loaders=loaders, **engine_options)
        self.engine = self.cores.default  # the local core of the mount's model
        self.runtime = runtime
        self.agents = AgentTable(storage, self.writer, self.memory, self.log_event)
        self.tools = ToolManager(self.log_event, self.agents, self.memory, tools_dir)  # built-in tools, and those of the tools directory
        self.mcp = McpServers(mcp_servers, self.tools, self.log_event)  # MCP servers, whose tools come once they have started
        self.requests = Requests(storage, self.writer, self.agents, self.cores, self.memory, self.tools, self.log_event)
        self.events = self.requests.events
        self.started = time.time()
        self._cpu_started = 0.0  # the trio thread's CPU time when `run` began
        self.ps_providers: list[Callable[[], list[str]]] = []  # services' lines for kernel/ps (their processes)
        self._nursery: trio.Nursery | None = None

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `stop()`. Started means: the cores serve, and the jobs a previous
        daemon left unfinished are requeued (readers find them live)."""
        self._cpu_started = time.thread_time()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.requests.run)
                await nursery.start(self.cores.run)
                nursery.start_soon(self.agents.purge_forever)
                nursery.start_soon(self.mcp.run)  # the mount serves before (or without) them
                await recover_jobs(self.requests)
                task_status.started()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                await self.writer.call(lambda: None)  # every write asked for is on disk

    def stop(self) -> None:
        """End the cores and every background task (tool loops, the trash purge)."""
        self.cores.stop()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def close(self) -> None:
        """After `run`: end the journal writer and close the databases."""
        self.writer.close()
        self.storage.close()

    # -- what kernel/status and kernel/stats show ------------------------------------------
    def status_line(self) -> str:
        info = self.runtime.info
        line = (
            f"running={self.cores.running()} queued={self.requests.queued_count()} "
            f"sched={self.engine.scheduler.describe().replace(' ', ',')} "
            f"model={info.name} device={info.device} uptime={int(time.time() - self.started)} {self.engine.describe()}"
        )
        return line + self.mcp.describe() + self.cores.crashes()

    def statistics(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"agents": len(self.agents)}
        stats.update(self.cores.statistics())
        # the trio thread's share: handing results to jobs, and all of its CPU time (the
        # FUSE requests, syscalls, journal); called on that thread
        stats["deliver_s"] = round(self.requests.results.deliver_s, 3)
        stats["trio_cpu_s"] = round(time.thread_time() - self._cpu_started, 3)
        stats.update(self.memory.store.statistics())
        return stats
