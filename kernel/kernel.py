"""The kernel: agents, their jobs and the managers that serve them.

Everything here runs on the trio thread except the engine loop. Methods that
change state take a `Caller` and raise `KernelError` for refused requests; the
syscall table in `syscall.py` is the public way in.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from . import access, params
from .audit import AuditLog
from .backends import Backend, Vocabulary
from .config import AgentConfig, parse_config, parse_envelope
from .context import Message, build_prompt, parse_context
from .engine import Delivery, Engine
from .enginehost import EngineDied, ProcessCore
from .errors import KernelError, errno_name
from .events import EventStream, job_event
from .jobs import Job, JobState
from .memfs import MemoryStore
from .memory import MemoryManager
from .policy import Policy, parse_policy
from .remote import RemoteConfig, RemoteEngine
from .scheduler import make_scheduler
from .storage import AgentRow, Storage
from .toolloop import run_tool_loop, uses_tools, with_tools
from .tools import ToolManager

if TYPE_CHECKING:
    from .manifests import ManifestManager

log = logging.getLogger(__name__)
Core = Engine | RemoteEngine  # an LLM core: the local engine or a remote server
ROUTES = ("default", "least-loaded")

RESTARTED = "the kernel restarted before this job finished"


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
    errors: dict[int, str] = field(default_factory=dict)  # uid → its `error` line
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


class Kernel:
    def __init__(
        self,
        storage: Storage,
        backend: Backend | ProcessCore,
        scheduler: str | None = None,
        memory: MemoryStore | None = None,
        tools_dir: Path | None = None,
        remotes: Sequence[RemoteConfig] = (),
        route: str = "default",
        loaders: Mapping[str, tuple[Callable[[], Backend | ProcessCore], bool]] | None = None,
        **engine_options: Any,
    ) -> None:
        """`backend` is the local core (its model is the default); each of `remotes` is a
        remote OpenAI-compatible core; `route` picks a core for requests that name no
        model: `default` (the local one) or `least-loaded`. `loaders` are more local models
        by name: (a function that loads the backend, whether to load it at start); they can
        be loaded and unloaded at run time."""
        self.storage = storage
        self.backend = backend
        self.memory = MemoryManager(memory or MemoryStore(Path(storage.path).with_name("memory.db")))
        policy = scheduler or storage.setting("scheduler", params.DEFAULT_SCHEDULER)
        self.engine = Engine(backend, make_scheduler(policy), **engine_options)
        self.cores: dict[str, Core] = {backend.info.name: self.engine}  # every LLM core, by model name
        for remote in remotes:
            if remote.name in self.cores:
                raise ValueError(f"model name {remote.name!r} is used twice")
            self.cores[remote.name] = RemoteEngine(remote, make_scheduler(policy))
        for core in self.cores.values():
            core.on_update = self._deliver
        self.engine.on_event = self._engine_event
        self._loaders = dict(loaders or {})
        for name in self._loaders:
            if name in self.cores:
                raise ValueError(f"model name {name!r} is used twice")
        if route not in ROUTES:
            raise ValueError(f"route {route!r} is not one of {', '.join(ROUTES)}")
        self.route = route
        self.started = time.time()
        self.audit = AuditLog(Path(storage.path).with_name("audit.jsonl"))
        self.agents: dict[str, Agent] = {}
        self.trash: dict[int, AgentRow] = {}  # removed agents that can still be restored, by id
        self.events = EventStream()
        self._nursery: trio.Nursery | None = None
        self.manifests: ManifestManager | None = None  # agents kept from manifest files (mount --agents-dir); run with the kernel
        for row in storage.agents():
            if row.trashed_at is not None:
                self.trash[row.id] = row
            else:
                self._load_agent(row)
        self._by_id = {agent.row.id: agent for agent in self.agents.values()}  # every FUSE op resolves by id
        self.tools = ToolManager(self, tools_dir)  # built-in tools, and those of the tools directory

    def _load_agent(self, row: AgentRow) -> Agent:
        config = parse_config(row.config) if row.config else AgentConfig()
        agent = Agent(row, config, self.storage.messages(row.id), policy=parse_policy(row.permissions), ceiling=parse_policy(row.ceiling))
        self.agents[row.name] = agent
        self._apply_quota(agent)
        return agent

    def _apply_quota(self, agent: Agent) -> None:
        quotas = self.memory.store.quotas
        if agent.policy.memory_quota is None:
            quotas.pop(agent.row.id, None)
        else:
            quotas[agent.row.id] = agent.policy.memory_quota

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for core in self.cores.values():
                    await nursery.start(core.run)
                for name, (_, at_start) in self._loaders.items():
                    if at_start:
                        try:
                            await self.load_model(Caller(0, 0), name)
                        except KernelError:  # logged and audited by load_model: a bad file costs that model, not the mount
                            continue
                nursery.start_soon(self._purge_trash_forever)
                await self._recover_jobs()  # before the mount serves: readers find the requeued jobs live
                if self.manifests is not None:
                    await nursery.start(self.manifests.run)  # the manifests' agents exist when the mount serves
                task_status.started()
        finally:
            self._nursery = None
            self._fail_unfinished("the kernel stopped before this job finished")

    async def _recover_jobs(self) -> None:
        """Requeue or fail, in id order, the jobs a previous daemon left queued or running:
        it died without ending them (a clean stop fails them itself)."""
        rows = self.storage.unfinished_jobs()
        if not rows:
            return
        requeued: list[Job] = []
        failed: list[int] = []
        with self.storage.atomic():  # every row is requeued or failed, or none is
            for row in rows:
                job = self._recover_job(row)
                if job is None:
                    failed.append(row["id"])
                else:
                    requeued.append(job)
        self.log_event("recovery", requeued=[job.id for job in requeued], failed=failed)
        for job in requeued:
            with contextlib.suppress(KernelError):  # e.g. a tool gone since: the turn fails when its loop starts
                job.config, _ = await self._prepare(self.job_caller(job), self.agents[job.agent], job.config, job.user_message)
        for agent in dict.fromkeys(self.agents[job.agent] for job in requeued):
            await self._start_next_turn(agent)  # each agent's turns run in order, as after submit

    def _recover_job(self, row: dict[str, Any]) -> Job | None:
        """Queue one unfinished job again under its id and return it, or fail it (None)."""
        agent = self._by_id.get(row["agent_id"])
        if agent is None:
            self.storage.finish_job(row["id"], JobState.ERROR.value, b"", errno.EIO, RESTARTED, time.time())
            return None
        try:
            self._check_requeue(agent, row)
            message, config = self._parse_request(agent, row["request"])
            config = access.check_request(agent, config)
        except KernelError as exc:
            job = self._job_from_row(agent, row)
            self._bind_if_latest(agent, job)
            job.finish(JobState.ERROR, exc.errno, exc.message)
            self._finished(job)
            return None
        # the output starts over: generation restarts from scratch on today's context and config
        job = Job(row["id"], agent.name, row["uid"], message, [], [], config, "prompt", queued_at=row["queued_at"])
        self.storage.requeue_job(job.id)
        agent.active.add(job)
        agent.next_turns.append(job)
        self._bind_if_latest(agent, job)
        self.emit(job, "requeued")
        return job

    @staticmethod
    def _check_requeue(agent: Agent, row: dict[str, Any]) -> None:
        """Raise the reason why an unfinished job is not requeued, if there is one."""
        if row["source"] == "call":
            raise KernelError(
                errno.EIO, "the kernel restarted before this call turn finished; its session was the open call file, which closed with the old daemon"
            )
        if agent.config.on_restart == "fail" or row["request"] is None:  # None: journaled before requests were kept
            raise KernelError(errno.EIO, RESTARTED)
        if row["restarts"] >= params.MAX_JOB_RESTARTS:
            raise KernelError(
                errno.EIO, f"{RESTARTED}, after {row['restarts']} restarts already: not requeued again (MAX_JOB_RESTARTS={params.MAX_JOB_RESTARTS})"
            )

    def _parse_request(self, agent: Agent, text: str) -> tuple[str, AgentConfig]:
        """A request's message and config (with the agent's config of now), for `submit`
        and for a journaled job queued again after a restart."""
        message, config = parse_envelope(text, agent.config, self.known_model)
        message = message.rstrip("\r\n")  # `echo` adds a newline that is not part of the question
        if not message.strip():
            raise KernelError(errno.EINVAL, "the prompt is empty")
        return message, config

    def _bind_if_latest(self, agent: Agent, job: Job) -> None:
        """Make `output`/`status` of the job's uid follow this object if it is the uid's latest job."""
        row = self.storage.latest_job(agent.row.id, job.uid)
        if row is not None and row["id"] == job.id:
            agent.latest[job.uid] = job

    def _fail_unfinished(self, message: str) -> None:
        for agent in list(self.agents.values()):
            agent.next_turns.clear()
            for job in sorted(agent.active, key=lambda j: j.id):
                job.finish(JobState.ERROR, errno.EIO, message)
                self._finished(job)

    def stop(self) -> None:
        """End the engine and every background task (tool loops, the trash purge)."""
        for core in self.cores.values():
            core.stop()
        if self.manifests is not None:
            self.manifests.stop()  # and with it every agent process
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # -- lookups ---------------------------------------------------------------
    def agent(self, name: str) -> Agent:
        agent = self.agents.get(name)
        if agent is None:
            raise KernelError(errno.ENOENT, f"no agent named {name!r}")
        return agent

    def agent_by_id(self, agent_id: int) -> Agent | None:
        return self._by_id.get(agent_id)

    def latest_job(self, agent: Agent, uid: int) -> Job | None:
        """The job `output`/`status` bind to for this uid, from RAM or the journal."""
        job = agent.latest.get(uid)
        if job is None:
            row = self.storage.latest_job(agent.row.id, uid)
            if row is not None:
                job = self._job_from_row(agent, row)
                agent.latest[uid] = job
        return job

    @staticmethod
    def _job_from_row(agent: Agent, row: dict[str, Any]) -> Job:
        job = Job(row["id"], agent.name, row["uid"], row["user_message"], [], [], agent.config, row["source"])
        job.data = bytearray(row["output"])
        job.state, job.errno, job.message = JobState(row["state"]), row["errno"], row["message"]
        job.queued_at, job.finished_at = row["queued_at"], row["finished_at"]
        return job

    def known_model(self, name: str) -> bool:
        return name in self.cores or name in self._loaders

    def require_loaded(self, config: AgentConfig) -> None:
        """EAGAIN for a request to a local model that is unloaded now; EINVAL for a model
        this mount does not serve (a config kept from a mount with other models)."""
        core = self.cores.get(config.model or self._routed())
        if isinstance(core, Engine) and core.failure():
            raise KernelError(errno.EIO, core.failure())
        if not config.model or config.model in self.cores:
            return
        if config.model in self._loaders:
            raise KernelError(errno.EAGAIN, f"model {config.model!r} is not loaded; root can load it: echo load {config.model} > kernel/ctl")
        raise KernelError(errno.EINVAL, f"model {config.model!r} is not served by this mount (kernel/models lists the models)")

    def unloaded_models(self) -> list[str]:
        return [name for name in self._loaders if name not in self.cores]

    async def load_model(self, caller: Caller, name: str) -> None:
        """Load a declared local model (root); it serves once this returns."""
        access.require_root(caller, "load a model")
        if name not in self._loaders:
            raise KernelError(errno.ENOENT, f"no local model {name!r} in the mount configuration (kernel/models lists them)")
        if name in self.cores:
            raise KernelError(errno.EEXIST, f"model {name!r} is loaded already")
        try:
            backend = await trio.to_thread.run_sync(self._loaders[name][0])
        except EngineDied as exc:  # a bad GGUF, or a crash while loading: this core only
            log.error("loading model %s failed: %s", name, exc.reason)
            self.log_event("engine", model=name, what="load_failed", reason=exc.reason, uid=caller.uid)
            raise KernelError(errno.EIO, f"loading model {name!r} failed: {exc.reason}") from None
        except Exception as exc:
            log.exception("loading model %s failed", name)
            raise KernelError(errno.EIO, f"loading model {name!r} failed: {exc}") from None
        engine = Engine(backend, make_scheduler(self.engine.scheduler.describe()))
        engine.on_update = self._deliver
        engine.on_event = self._engine_event
        assert self._nursery is not None
        await self._nursery.start(self._serve_core, engine)
        self.cores[name] = engine
        self.log_event("load", model=name, uid=caller.uid)

    @staticmethod
    async def _serve_core(engine: Engine, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await engine.run(task_status=task_status)
        finally:
            await trio.to_thread.run_sync(engine.core.close)  # the engine thread has ended

    def unload_model(self, caller: Caller, name: str) -> None:
        """Stop a loaded local model from the configuration and free it (EBUSY while it works)."""
        access.require_root(caller, "unload a model")
        if name not in self._loaders:
            raise KernelError(errno.EINVAL, f"only local models declared in the mount configuration can be unloaded, not {name!r}")
        core = self.cores.get(name)
        if core is None:
            raise KernelError(errno.ENOENT, f"model {name!r} is not loaded")
        if core.queued() or core.running():
            raise KernelError(errno.EBUSY, f"model {name!r} has queued or running jobs; cancel them or wait")
        del self.cores[name]
        core.stop()
        self.log_event("unload", model=name, uid=caller.uid)

    def retry_model(self, caller: Caller, name: str) -> None:
        """Start a local core that crash-looped (`failed`) again (root)."""
        access.require_root(caller, "retry a model")
        core = self.cores.get(name)
        if not isinstance(core, Engine):
            raise KernelError(errno.ENOENT, f"no loaded local model {name!r} (kernel/models lists them)")
        if core.core.state != "failed":
            raise KernelError(errno.EINVAL, f"the engine of model {name!r} is {core.core.state}, not failed: nothing to retry")
        core.retry()
        self.log_event("engine", model=name, what="retry", uid=caller.uid)

    def _engine_event(self, fields: dict[str, Any]) -> None:
        self.log_event("engine", **fields)

    def vocabulary(self, config: AgentConfig) -> Vocabulary:
        """Whose tokens and chat template a request's prompt is built with: its local core's;
        a remote core's prompt is sized with the default model's (the server tokenizes it)."""
        core = self.cores.get(config.model or self._routed())
        return core.backend if isinstance(core, Engine) else self.backend

    def core_of(self, job: Job) -> Core:
        """The core that serves a job: its model's, or the route's choice (kept in the job)."""
        job.config = self.routed(job.config)
        return self.cores[job.config.model]

    def routed(self, config: AgentConfig) -> AgentConfig:
        """The config with its model chosen (by the route when it names none)."""
        return config if config.model else dataclasses.replace(config, model=self._routed())

    def _routed(self) -> str:
        if self.route == "least-loaded":
            return min(self.cores, key=lambda name: len(self.cores[name].queued()) + self.cores[name].running())
        return self.backend.info.name

    # -- agents ------------------------------------------------------------------
    def create_agent(self, caller: Caller, name: str, mode: int) -> Agent:
        if name in self.agents:
            raise KernelError(errno.EEXIST, f"agent {name!r} exists")
        row = self.storage.create_agent(name, caller.uid, caller.gid, mode)
        agent = Agent(row, AgentConfig(), [])
        self.agents[name] = agent
        self._by_id[row.id] = agent
        self.log_event("mkdir", agent=name, uid=caller.uid)
        return agent

    def remove_agent(self, caller: Caller, name: str) -> None:
        """rmdir: the agent, its memory, context and journal go to the trash, from
        which `restore NAME` in kernel/ctl brings them back until they expire."""
        agent = self.agent(name)
        access.require_owner(caller, agent, "remove it")
        if agent.active:
            ids = " ".join(str(j.id) for j in sorted(agent.active, key=lambda j: j.id))
            raise KernelError(errno.EBUSY, f"agent {name!r} has jobs queued or running ({ids}): echo 'cancel all' > ctl first")
        now = time.time()
        self.storage.trash_agent(agent.row.id, name, now)
        agent.row.trashed_at, agent.row.trashed_name = now, name
        self.trash[agent.row.id] = agent.row
        del self.agents[name]
        del self._by_id[agent.row.id]
        self.log_event("rmdir", agent=name, uid=caller.uid, id=agent.row.id, restorable_until=round(now + params.TRASH_RETENTION_SECONDS))

    def restore_agent(self, caller: Caller, name: str, new_name: str = "") -> Agent:
        """Bring the most recently removed agent called `name` back (as `new_name`)."""
        rows = sorted((r for r in self.trash.values() if r.trashed_name == name), key=lambda r: r.trashed_at or 0)
        if not rows:
            raise KernelError(errno.ENOENT, f"no agent {name!r} in the trash (see kernel/trash)")
        row = rows[-1]
        if not caller.is_root and caller.uid != row.uid:
            raise KernelError(errno.EPERM, f"only the owner of {name!r} (uid {row.uid}) or root may restore it")
        target = new_name or name
        if target in self.agents:
            raise KernelError(errno.EEXIST, f"an agent named {target!r} exists: restore {name} NEWNAME")
        restored = self.storage.restore_agent(row.id, target)
        del self.trash[row.id]
        agent = self._load_agent(restored)
        self._by_id[row.id] = agent
        self.log_event("restore", agent=target, uid=caller.uid, id=row.id, was=name)
        return agent

    async def purge_trash(self, now: float | None = None) -> list[int]:
        """Delete for good what stayed in the trash past TRASH_RETENTION_SECONDS."""
        limit = (now or time.time()) - params.TRASH_RETENTION_SECONDS
        expired = [row for row in self.trash.values() if (row.trashed_at or 0) <= limit]
        for row in expired:
            self.storage.delete_agent(row.id)
            del self.trash[row.id]
            await self.memory.drop_id(row.id)
            self.log_event("purge", agent=row.trashed_name, id=row.id)
        return [row.id for row in expired]

    async def _purge_trash_forever(self) -> None:
        while True:  # until stop() cancels the kernel's nursery
            try:
                await self.purge_trash()
            except Exception:
                log.exception("could not purge the trash; trying again later")
            await trio.sleep(params.TRASH_PURGE_INTERVAL)

    def set_agent_attrs(self, caller: Caller, agent: Agent, **values: Any) -> None:
        """Persist ownership or modes after chmod/chown (the VFS already checked them)."""
        for key, value in values.items():
            setattr(agent.row, key, value)
        self.storage.update_agent(agent.row.id, **values)

    # -- config and context ----------------------------------------------------------
    def require_live(self, agent: Agent) -> None:
        """Refuse work for an agent removed while a file of it was open."""
        if self.agents.get(agent.name) is not agent:
            raise KernelError(errno.ENOENT, f"agent {agent.name!r} was removed")

    def write_config(self, caller: Caller, agent: Agent, text: str) -> None:
        self.require_live(agent)
        if len(text.encode()) > params.MAX_CONFIG_BYTES:
            raise KernelError(errno.EFBIG, f"config is over {params.MAX_CONFIG_BYTES} bytes")
        config = parse_config(text, self.known_model)
        access.check_request(agent, config)
        self._tool_specs(config)
        agent.config = config
        self.storage.update_agent(agent.row.id, config=config.render())

    def write_permissions(self, caller: Caller, agent: Agent, text: str) -> None:
        """The policy: root's text is also the ceiling; an owner's must stay within it."""
        self.require_live(agent)
        if len(text.encode()) > params.MAX_CONFIG_BYTES:
            raise KernelError(errno.EFBIG, f"permissions is over {params.MAX_CONFIG_BYTES} bytes")
        policy = parse_policy(text)
        if caller.is_root:
            agent.ceiling = policy
        else:
            policy = policy.within(agent.ceiling)
        agent.policy = policy
        self.storage.update_agent(agent.row.id, permissions=policy.render(Policy(), 0), ceiling=agent.ceiling.render(Policy(), 0))
        self._apply_quota(agent)

    def permissions_text(self, agent: Agent) -> str:
        return agent.policy.render(agent.ceiling, agent.row.spent_tokens)

    def reset_budget(self, caller: Caller, agent: Agent) -> None:
        access.require_root(caller, "reset a token budget")
        agent.row.spent_tokens = 0
        self.storage.set_spent(agent.row.id, 0)

    def write_context(self, caller: Caller, agent: Agent, text: str) -> None:
        self.require_live(agent)
        messages = parse_context(text)
        agent.messages = messages
        self.storage.replace_messages(agent.row.id, messages)

    # -- LLM requests --------------------------------------------------------------
    async def submit(self, caller: Caller, agent: Agent, raw: bytes, history: list[Message] | None = None) -> Job:
        """Queue one request. `history` is a `call` session's conversation; None uses
        the agent's own context (a `prompt` job), which the answer then extends."""
        text = _decode_request(raw)
        message, config = self._parse_request(agent, text)
        self.require_loaded(config)
        config = access.check_request(agent, config)
        self.check_queue(agent)
        config, recalled = await self._prepare(caller, agent, config, message)
        conversation = agent.messages if history is None else history
        config = self.routed(config)  # the route chooses once: the prompt is tokenized by the model that runs it
        messages, tokens = await trio.to_thread.run_sync(build_prompt, self.vocabulary(config), config, list(conversation), message)
        self.require_live(agent)
        self.check_queue(agent)
        source = "prompt" if history is None else "call"
        queued_at = time.time()
        job_id = self.storage.journal_job(agent.row.id, caller.uid, source, message, queued_at, text)
        job = Job(job_id, agent.name, caller.uid, message, messages, tokens, config, source, queued_at=queued_at)
        agent.latest[caller.uid] = job
        agent.errors.pop(caller.uid, None)
        if history is None:
            agent.refused.pop(caller.uid, None)
        agent.active.add(job)
        agent.submitted.set()
        agent.submitted = trio.Event()
        self.emit(job, "queued")
        if recalled is not None:
            agent.events.emit("recall", job=job.id, agent=agent.name, uid=caller.uid, passages=recalled)
        if source == "call":
            self._launch(agent, job)
        elif agent.turn is None:
            agent.turn = job
            self._launch(agent, job)
        else:
            agent.next_turns.append(job)  # it must see the answer of the turn before it
        return job

    async def _start_next_turn(self, agent: Agent) -> None:
        """Prompt jobs of one agent run in order: each is rebuilt on the context that
        the previous one extended, then handed to the engine."""
        while agent.turn is None and agent.next_turns:
            job = agent.next_turns.popleft()
            agent.turn = job
            try:
                job.messages, job.prompt_tokens = await trio.to_thread.run_sync(
                    build_prompt, self.vocabulary(job.config), job.config, list(agent.messages), job.user_message
                )
            except KernelError as exc:
                job.finish(JobState.ERROR, exc.errno, exc.message)
            if job.cancel_requested:
                job.finish(JobState.CANCELLED, errno.ECANCELED, "cancelled while queued")
            if job.state.finished:
                self._finished(job)
                continue
            self._launch(agent, job)

    async def _prepare(self, caller: Caller, agent: Agent, config: AgentConfig, message: str) -> tuple[AgentConfig, list[str] | None]:
        """The config a request runs with: recalled memory and the tools block in its
        system message; EINVAL for a tool nobody serves or a tool_choice not offered."""
        config, recalled = await self.memory.recall_into(caller, agent, config, message)
        if uses_tools(config):
            specs = self._tool_specs(config)
            if config.tool_choice not in ("auto", *config.tools):
                raise KernelError(errno.EINVAL, f"tool_choice {config.tool_choice!r} is not one of this request's tools ({' '.join(config.tools)})")
            config = dataclasses.replace(config, system=with_tools(config.system, specs))
        return config, recalled

    def _tool_specs(self, config: AgentConfig) -> list[Any]:
        """The tools a config offers; EINVAL names one nobody serves."""
        try:
            return [self.tools.spec(name) for name in config.tools]
        except KernelError as exc:
            known = " ".join(spec.name for _, spec in self.tools.served())
            raise KernelError(errno.EINVAL, f"{exc.message} (served: {known})") from None

    def _launch(self, agent: Agent, job: Job) -> None:
        """Hand a job to the engine, or to a tool loop that feeds the engine its steps."""
        if uses_tools(job.config) and self._nursery is not None:
            self._nursery.start_soon(run_tool_loop, self, agent, job)
        else:
            self.core_of(job).submit(job)

    def set_scheduler(self, caller: Caller, spec: str) -> None:
        """Switch the scheduling policy (root only); it is kept across remounts."""
        if not caller.is_root:
            raise KernelError(errno.EPERM, "only root may change the scheduling policy")
        try:
            scheduler = make_scheduler(spec)
        except ValueError as exc:
            raise KernelError(errno.EINVAL, str(exc)) from None
        for core in self.cores.values():
            core.set_scheduler(make_scheduler(scheduler.describe()))  # one queue per core, one policy
        self.storage.set_setting("scheduler", scheduler.describe())
        self.log_event("sched", uid=caller.uid, policy=scheduler.describe())

    def pause(self, caller: Caller, agent: Agent, paused: bool) -> list[int]:
        """Suspend (or resume) the agent's jobs: they keep their place, not the CPU."""
        jobs = [j for j in agent.active if caller.is_root or j.uid == caller.uid or caller.uid == agent.row.uid]
        for job in jobs:
            self.core_of(job).pause(job, paused)
            self.emit(job, "suspended" if paused else "resumed")
        return [job.id for job in jobs]

    def queued_count(self) -> int:
        """Jobs waiting anywhere: in the scheduler, or behind their agent's running turn."""
        return sum(len(core.queued()) for core in self.cores.values()) + sum(len(a.next_turns) for a in self.agents.values())

    def check_queue(self, agent: Agent) -> None:
        """What a prompt write is refused for before the request is read: the agent's
        budget and queue policy, then the kernel's own queue limits."""
        access.check_can_submit(agent)
        if len(agent.active) >= params.MAX_QUEUED_PER_AGENT:
            raise KernelError(errno.EAGAIN, f"agent {agent.name!r} has {len(agent.active)} jobs waiting; try again when one finishes")
        if self.queued_count() >= params.MAX_QUEUED_TOTAL:
            raise KernelError(errno.EAGAIN, "the kernel's queue is full; try again later")

    def cancel(self, caller: Caller, agent: Agent, which: str) -> list[int]:
        """`cancel` (the caller's latest job), `cancel all`, or `cancel ID`."""
        if which == "all":
            targets = [j for j in agent.active if caller.is_root or j.uid == caller.uid or caller.uid == agent.row.uid]
        elif which == "":
            latest = agent.latest.get(caller.uid)
            targets = [latest] if latest is not None and latest in agent.active else []
        else:
            targets = self._job_by_id(caller, agent, which)
        for job in targets:
            if job in agent.next_turns:
                agent.next_turns.remove(job)
                job.finish(JobState.CANCELLED, errno.ECANCELED, "cancelled while queued")
                self._finished(job)
            elif job.step is not None:
                job.cancel_requested = True
                self.core_of(job.step).cancel(job.step)  # the tool loop ends the job when its step ends
            elif self.core_of(job).cancel(job):
                self._finished(job)
        return [job.id for job in targets]

    def _job_by_id(self, caller: Caller, agent: Agent, text: str) -> list[Job]:
        if not text.isdigit():
            raise KernelError(errno.EINVAL, f"cancel: {text!r} is not a job id (cancel [ID|all])")
        for job in agent.active:
            if job.id == int(text):
                if not (caller.is_root or job.uid == caller.uid or caller.uid == agent.row.uid):
                    raise KernelError(errno.EPERM, f"job {text} belongs to another user")
                return [job]
        raise KernelError(
            errno.EBUSY if self._job_existed(agent, int(text)) else errno.ENOENT, f"job {text} is not queued or running on {agent.name!r}"
        )

    def _job_existed(self, agent: Agent, job_id: int) -> bool:
        rows = self.storage.db.execute("SELECT 1 FROM jobs WHERE id = ? AND agent_id = ?", [job_id, agent.row.id]).fetchall()
        return bool(rows)

    def record_error(self, agent: Agent | None, uid: int, exc: KernelError, job_id: int | None = None) -> None:
        """Mirror a refused request into the caller's `error` file and the log."""
        if agent is None:
            return
        agent.errors[uid] = f"{errno_name(exc.errno)} {job_id if job_id is not None else '-'} {int(time.time())} {exc.message}"
        if exc.errno not in (errno.EPERM, errno.EACCES, errno.EDQUOT):  # denials get their own `deny` line
            self.log_event("error", agent=agent.name, uid=uid, errno=errno_name(exc.errno), message=exc.message)

    # -- results from the engine (trio thread) ----------------------------------------
    def emit(self, job: Job, event: str, **extra: Any) -> None:
        """A job event to the agent's `events` and to `kernel/events`."""
        fields = job_event(job, event) | extra
        agent = self.agents.get(job.agent)
        if agent is not None:
            agent.events.emit(**fields)
        self.events.emit(**fields)

    def _deliver(self, deliveries: list[Delivery]) -> None:
        """A step's results, on the trio thread: an error here must cost one job, never the daemon."""
        for job, chunk, n_tokens, end in deliveries:
            try:
                self._deliver_one(job, chunk, n_tokens, end)
            except Exception:
                log.exception("could not deliver a step's result to job %d; failing it", job.id)
                if not job.state.finished:
                    job.finish(JobState.ERROR, errno.EIO, "internal error while delivering the answer (see the aiosfs log)")
                    try:
                        self._finished(job)
                    except Exception:
                        log.exception("could not record the end of job %d either", job.id)

    def _deliver_one(self, job: Job, chunk: bytes, n_tokens: int, end: tuple[JobState, int, str] | None) -> None:
        if job.parent is not None:
            self._deliver_step(job, chunk, n_tokens, end)
            return
        first = not job.first_token_at
        started = job.state is JobState.QUEUED
        if chunk or n_tokens:
            job.publish(chunk, n_tokens)
        else:
            job.mark_running()
        if started and job.state is JobState.RUNNING:
            self.emit(job, "running")
        if first and job.first_token_at:
            self.emit(job, "first_token")
        if end is not None:
            if end[0] is JobState.DONE:
                job.end_line()
            job.finish(*end)
            self._finished(job)

    def _deliver_step(self, step: Job, chunk: bytes, n_tokens: int, end: tuple[JobState, int, str] | None) -> None:
        """A tool loop's step: its text stays internal; its job is running from the first step."""
        assert step.parent is not None
        if step.parent.state is JobState.QUEUED:
            step.parent.mark_running()
            self.emit(step.parent, "running")
        step.publish(chunk, n_tokens) if chunk or n_tokens else step.mark_running()
        if end is not None:
            step.finish(*end)

    def _record_turn(self, agent: Agent, job: Job) -> None:
        """Extend the agent's context with a finished turn; a disk error fails the job instead."""
        turn = [{"role": "user", "content": job.user_message}, *job.tool_messages, {"role": "assistant", "content": job.answer}]
        try:
            self.storage.append_messages(agent.row.id, turn)
        except Exception as exc:
            log.exception("could not record the turn of job %d in the context of %s", job.id, agent.name)
            job.amend(
                JobState.ERROR, errno.EIO, f"the answer could not be written to the agent's context ({exc}); the conversation does not include it"
            )
            return
        agent.messages = agent.messages + turn

    def job_finished(self, job: Job) -> None:
        """A job ended outside the engine (the tool loop): journal it and go on."""
        self._finished(job)

    def job_caller(self, job: Job) -> Caller:
        """Whom a job acts for: its uid (no group: the agent's policy decides)."""
        return Caller(job.uid, -1, 0)

    def _finished(self, job: Job) -> None:
        agent = self.agents.get(job.agent)
        spent = len(job.prompt_tokens) + job.extra_prompt_tokens + job.n_generated if job.started_at else 0  # the model's work on it
        if agent is not None:
            agent.row.spent_tokens += spent
        if agent is not None and job.state is JobState.DONE and job.source == "prompt":
            self._record_turn(agent, job)  # before the journal: it may turn the job into an error
        try:  # the job's end and the agent's spending in one transaction
            self.storage.finish_job(
                job.id,
                job.state.value,
                bytes(job.data),
                job.errno,
                job.message,
                job.finished_at,
                (agent.row.id, agent.row.spent_tokens) if agent and spent else None,
            )
        except Exception:
            log.exception("could not journal the end of job %d", job.id)
        if agent is None:
            return
        agent.active.discard(job)
        self.emit(job, job.state.value)
        if agent.turn is job:
            agent.turn = None
            if agent.next_turns and self._nursery is not None:
                self._nursery.start_soon(self._start_next_turn, agent)
        if job.state is not JobState.DONE and agent.latest.get(job.uid) is job:
            agent.errors[job.uid] = job.error_line()
        self.log_event("job", id=job.id, agent=job.agent, uid=job.uid, state=job.state.value, tokens=job.n_generated)

    # -- visibility ---------------------------------------------------------------------
    def log_event(self, kind: str, **fields: Any) -> None:
        self.audit.write(kind, **fields)

    def status_line(self) -> str:
        info = self.backend.info
        return (
            f"running={sum(c.running() for c in self.cores.values())} queued={self.queued_count()} "
            f"sched={self.engine.scheduler.describe().replace(' ', ',')} "
            f"model={info.name} device={info.device} uptime={int(time.time() - self.started)} {self.engine.describe()}"
        ) + "".join(
            f"\nengine {name} last_crash: {core.last_crash}" for name, core in self.cores.items() if isinstance(core, Engine) and core.last_crash
        )

    def statistics(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"agents": len(self.agents)}
        stats.update(self.engine.statistics())
        for name, core in self.cores.items():
            if core is not self.engine:
                stats.update({f"{name}.{key}": value for key, value in core.statistics().items()})
        stats.update(self.memory.store.statistics())
        return stats


def _decode_request(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KernelError(
            errno.EINVAL, f"the request is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); send UTF-8 text"
        ) from None
