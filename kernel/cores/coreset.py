"""The LLM cores of one kernel, by model name: the local engine of the mount's model,
the remote servers, and the local models of the mount configuration that root loads
and unloads at run time. It routes a request that names no model, and picks whose
tokenizer builds a prompt.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import trio

from .. import params
from ..agents.config import AgentConfig
from ..errors import KernelError
from ..llm.jobs import Job
from ..types import AuditSink, Core, Delivery
from .backends import Vocabulary
from .client import Runtime
from .engine import Engine
from .enginehost import EngineDied
from .remote import RemoteConfig, RemoteEngine
from .scheduler import make_scheduler

log = logging.getLogger(__name__)
ROUTES = ("default", "least-loaded")
Loader = tuple[Callable[[], Runtime], bool]  # (load the model, load it at start)


class CoreSet(Mapping[str, Core]):
    def __init__(
        self,
        runtime: Runtime,
        scheduler: str,
        audit: AuditSink,
        *,
        remotes: Sequence[RemoteConfig] = (),
        route: str = "default",
        loaders: Mapping[str, Loader] | None = None,
        **engine_options: Any,
    ) -> None:
        """`runtime` runs the local core's model (the default); each of `remotes` is a
        remote OpenAI-compatible core; `route` picks a core for requests that name no
        model: `default` (the local one) or `least-loaded`. `loaders` are more local models
        by name, loaded and unloaded at run time."""
        self.runtime = runtime
        self._audit = audit
        # threads that wait on an engine's vocabulary (tokenize, chat template): a hung
        # engine holds them up to its deadline, and must not hold trio's shared threads
        # that memory/ and the rest need
        self.call_threads = trio.CapacityLimiter(params.ENGINE_CALL_THREADS)
        # the way back: every core's results, in the order they came, for the one task that
        # hands them to their jobs (Requests); unbounded, so a core never waits to send
        self._results, self.results = trio.open_memory_channel[list[Delivery]](math.inf)
        self.default = self._engine(runtime, scheduler, **engine_options)
        self._cores: dict[str, Core] = {runtime.info.name: self.default}
        self._local: dict[str, Engine] = {runtime.info.name: self.default}  # the local engines among them
        for remote in remotes:
            if remote.name in self._cores:
                raise ValueError(f"model name {remote.name!r} is used twice")
            core = RemoteEngine(remote, make_scheduler(scheduler), self._results)
            self._cores[remote.name] = core
        self._loaders = dict(loaders or {})
        for name in self._loaders:
            if name in self._cores:
                raise ValueError(f"model name {name!r} is used twice")
        if route not in ROUTES:
            raise ValueError(f"route {route!r} is not one of {', '.join(ROUTES)}")
        self.route = route
        self._nursery: trio.Nursery | None = None

    def _engine(self, runtime: Runtime, scheduler: str, **engine_options: Any) -> Engine:
        engine = Engine(runtime, make_scheduler(scheduler), results=self._results, **engine_options)
        engine.on_event = lambda fields: self._audit("engine", **fields)
        return engine

    # -- Mapping ---------------------------------------------------------------------
    def __getitem__(self, name: str) -> Core:
        return self._cores[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._cores)

    def __len__(self) -> int:
        return len(self._cores)

    def local(self, name: str) -> Engine | None:
        """The local engine serving `name`, or None (a remote core, or not loaded)."""
        return self._local.get(name)

    # -- life ------------------------------------------------------------------------
    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve every core until `stop()`; the models marked to load at start are loaded
        first (a bad file costs that model, not the mount)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for core in self._cores.values():
                await nursery.start(core.run)
            for name, (_, at_start) in self._loaders.items():
                if at_start:
                    try:
                        await self.load(0, name)
                    except KernelError:  # logged and audited by load
                        continue
            task_status.started()

    def stop(self) -> None:
        for core in self._cores.values():
            core.stop()

    # -- models ----------------------------------------------------------------------
    def known(self, name: str) -> bool:
        return name in self._cores or name in self._loaders

    def require_loaded(self, config: AgentConfig) -> None:
        """EIO for a core that crash-looped; EAGAIN for a request to a local model that is
        unloaded now; EINVAL for a model this mount does not serve (a config kept from a
        mount with other models)."""
        engine = self.local(config.model or self.route_name())
        if engine is not None and engine.failure():
            raise KernelError(errno.EIO, engine.failure())
        if not config.model or config.model in self._cores:
            return
        if config.model in self._loaders:
            raise KernelError(errno.EAGAIN, f"model {config.model!r} is not loaded; root can load it: echo load {config.model} > kernel/ctl")
        raise KernelError(errno.EINVAL, f"model {config.model!r} is not served by this mount (kernel/models lists the models)")

    def unloaded(self) -> list[str]:
        return [name for name in self._loaders if name not in self._cores]

    async def load(self, uid: int, name: str) -> None:
        """Load a declared local model; it serves once this returns."""
        if name not in self._loaders:
            raise KernelError(errno.ENOENT, f"no local model {name!r} in the mount configuration (kernel/models lists them)")
        if name in self._cores:
            raise KernelError(errno.EEXIST, f"model {name!r} is loaded already")
        try:
            runtime = await trio.to_thread.run_sync(self._loaders[name][0])
        except EngineDied as exc:  # a bad GGUF, or a crash while loading: this core only
            log.error("loading model %s failed: %s", name, exc.reason)
            self._audit("engine", model=name, what="load_failed", reason=exc.reason, uid=uid)
            raise KernelError(errno.EIO, f"loading model {name!r} failed: {exc.reason}") from None
        except Exception as exc:
            log.exception("loading model %s failed", name)
            raise KernelError(errno.EIO, f"loading model {name!r} failed: {exc}") from None
        engine = self._engine(runtime, self.default.scheduler.describe())
        assert self._nursery is not None, "models load while the cores run"
        await self._nursery.start(self._serve, engine)
        self._cores[name] = self._local[name] = engine
        self._audit("load", model=name, uid=uid)

    @staticmethod
    async def _serve(engine: Engine, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await engine.run(task_status=task_status)
        finally:
            await trio.to_thread.run_sync(engine.client.close)  # the engine thread has ended

    def unload(self, uid: int, name: str) -> None:
        """Stop a loaded local model from the configuration and free it (EBUSY while it works)."""
        if name not in self._loaders:
            raise KernelError(errno.EINVAL, f"only local models declared in the mount configuration can be unloaded, not {name!r}")
        core = self._cores.get(name)
        if core is None:
            raise KernelError(errno.ENOENT, f"model {name!r} is not loaded")
        if core.queue.queued() or core.running():
            raise KernelError(errno.EBUSY, f"model {name!r} has queued or running jobs; cancel them or wait")
        del self._cores[name]
        self._local.pop(name, None)
        core.stop()
        self._audit("unload", model=name, uid=uid)

    def retry(self, uid: int, name: str) -> None:
        """Start a local core that crash-looped (`failed`) again."""
        engine = self.local(name)
        if engine is None:
            raise KernelError(errno.ENOENT, f"no loaded local model {name!r} (kernel/models lists them)")
        if engine.client.state != "failed":
            raise KernelError(errno.EINVAL, f"the engine of model {name!r} is {engine.client.state}, not failed: nothing to retry")
        engine.retry()
        self._audit("engine", model=name, what="retry", uid=uid)

    def set_scheduler(self, spec: str) -> None:
        """One policy for every core, each with its own queue."""
        for core in self._cores.values():
            core.queue.set_policy(make_scheduler(spec))

    # -- routing ---------------------------------------------------------------------
    def vocabulary(self, config: AgentConfig) -> Vocabulary:
        """Whose tokens and chat template a request's prompt is built with: its local core's;
        a remote core's prompt is sized with the default model's (the server tokenizes it)."""
        engine = self.local(config.model or self.route_name())
        return engine.runtime if engine is not None else self.runtime

    def submit(self, job: Job) -> None:
        """Hand a job to its model's core; one that names no model gets the route's
        choice, kept in its config so that its cancels and pauses find the same core."""
        job.config = self.routed(job.config)
        self._cores[job.config.model].queue.push(job)

    def of(self, job: Job) -> Core:
        """The core that serves a job: its model's (before it is submitted, the one the route would choose)."""
        return self._cores[job.config.model or self.route_name()]

    def routed(self, config: AgentConfig) -> AgentConfig:
        """The config with its model chosen (by the route when it names none)."""
        return config if config.model else dataclasses.replace(config, model=self.route_name())

    def route_name(self) -> str:
        if self.route == "least-loaded":
            return min(self._cores, key=lambda name: len(self._cores[name].queue.queued()) + self._cores[name].running())
        return self.runtime.info.name

    # -- visibility ------------------------------------------------------------------
    def queued(self) -> int:
        return sum(len(core.queue.queued()) for core in self._cores.values())

    def running(self) -> int:
        return sum(core.running() for core in self._cores.values())

    def crashes(self) -> str:
        """One `engine NAME last_crash: …` line per local core that crashed."""
        return "".join(
            f"\nengine {name} last_crash: {engine.last_crash}"
            for name in self._cores
            if (engine := self.local(name)) is not None and engine.last_crash
        )

    def statistics(self) -> dict[str, Any]:
        """The default engine's counters as they are; every other core's prefixed with its name."""
        stats: dict[str, Any] = dict(self.default.statistics())
        for name, core in self._cores.items():
            if core is not self.default:
                stats.update({f"{name}.{key}": value for key, value in core.statistics().items()})
        return stats
