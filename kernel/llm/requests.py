"""The LLM request path: from a prompt's text to a job in a core, and from the
core's results back to the job and the agent's conversation.

    submit: parse → policy → recall → tools → route → prompt (by the serving core's
    tokenizer) → journal → launch (a core, or a tool loop that feeds one)

An agent's prompt jobs run in order (`turn`, `next_turns`): each is built on the
context the previous one extended. A finished prompt job's turn and its end are
written in one transaction before readers see it end (`results.py`). Everything
here runs on the trio thread; SQLite writes go through the journal writer.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import time

import trio

from .. import params
from ..access import rules as access
from ..agents.config import AgentConfig, Function
from ..agents.context import build_prompt
from ..agents.request import Request, parse_request
from ..agents.table import AgentTable
from ..cores.coreset import CoreSet
from ..errors import KernelError, errno_name
from ..memory.manager import MemoryManager
from ..storage.database import Storage
from ..storage.writer import Writer
from ..text import decimal
from ..tools.manager import ToolManager, ToolSpec
from ..types import Agent, AuditSink, Caller, Message
from .jobs import Job, JobState
from .results import Results
from .toolloop import calls_per_reply, run_tool_loop, uses_tools, with_tools

log = logging.getLogger(__name__)


class Requests:
    """The way in: a request parsed, checked, prepared and handed to its core (or to a
    tool loop), an agent's prompt turns in order, cancels and pauses. The way back is
    `results`, which it reads from and never is called back by."""

    def __init__(
        self, storage: Storage, writer: Writer, agents: AgentTable, cores: CoreSet, memory: MemoryManager, tools: ToolManager, audit: AuditSink
    ) -> None:
        self.storage = storage
        self.writer = writer
        self.agents = agents
        self.audit = audit
        self.cores = cores
        self.memory = memory
        self.tools = tools
        self.results = Results(storage, writer, agents, audit)
        self.events = self.results.events  # kernel/events
        self.nursery: trio.Nursery | None = None  # tool loops and turns
        self.turn_waiters: set[Agent] = set()  # agents that may have prompt turns waiting (a superset; see queued_count)
        # what tool loops and recovery use of the way back
        self.emit, self.end, self.finished = self.results.emit, self.results.end, self.results.finished
        self.job_caller = Results.job_caller

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve tool loops and turns until cancelled; then fail what is unfinished."""
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = self.results.nursery = nursery
                nursery.start_soon(self._free_turns)
                task_status.started()
                await self.results.serve(self.cores.results)  # the way back, one way: the cores only send
        finally:
            self.nursery = self.results.nursery = None
            self.results.fail_unfinished("the kernel stopped before this job finished")

    async def _free_turns(self) -> None:
        """Agents whose turn the way back freed, with prompt turns waiting: the next one starts."""
        assert self.nursery is not None
        async for agent in self.results.turns_free:
            self.nursery.start_soon(self.start_next_turn, agent)

    # -- submit ----------------------------------------------------------------------
    def parse(self, agent: Agent, text: str) -> Request:
        """A request's message, config (with the agent's config of now) and, for a
        stateless chat, conversation; for `submit` and for a journaled job queued again
        after a restart."""
        request = parse_request(text, agent.config, self.cores.known)
        message = request.message.rstrip("\r\n")  # `echo` adds a newline that is not part of the question
        if not message.strip():
            raise KernelError(errno.EINVAL, "the prompt is empty")
        return dataclasses.replace(request, message=message)

    async def submit(self, caller: Caller, agent: Agent, text: str, history: list[Message] | None = None, parsed: Request | None = None) -> Job:
        """Queue one request. `history` is a `call` session's conversation; None uses
        the agent's own context (a `prompt` job), which the answer then extends. A
        stateless chat brings its own conversation and extends nothing. `parsed` is
        `text` parsed already, at its last write. Admission runs once, at the commit."""
        request = parsed or self.parse(agent, text)
        message, config = request.message, request.config
        stateless = None if request.history is None else list(request.history)
        self.cores.require_loaded(config)
        config = access.check_request(agent, config)
        config, recalled = await self.prepare(caller, agent, config, message)
        conversation = stateless if stateless is not None else agent.messages if history is None else history
        config = self.cores.routed(config)  # the route chooses once: the prompt is tokenized by the model that runs it
        messages, tokens = await trio.to_thread.run_sync(
            build_prompt, self.cores.vocabulary(config), config, list(conversation), message, limiter=self.cores.call_threads
        )
        self.agents.require_live(agent)
        self.admit(agent)
        source = "prompt" if history is None else "call"
        queued_at = time.time()
        job_id = await self.writer.call(self.storage.journal_job, agent.row.id, caller.uid, source, message, queued_at, text)
        self.agents.require_live(agent)  # removed while journaled: the job's row goes with the agent
        job = Job(job_id, agent.name, caller.uid, message, messages, tokens, config, source, queued_at=queued_at, history=stateless)
        job.grammar = config.grammar or None
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
        if source == "call" or job.stateless:  # no turn of the agent's context to wait for
            self.launch(agent, job)
        elif agent.turn is None:
            agent.turn = job
            self.launch(agent, job)
        else:
            agent.next_turns.append(job)  # it must see the answer of the turn before it
            self.turn_waiters.add(agent)
        return job

    def admit(self, agent: Agent) -> None:
        """What a prompt write is refused for before the request is read: the agent's
        budget and queue policy, then the kernel's own queue limits."""
        access.check_can_submit(agent)
        if len(agent.active) >= params.MAX_QUEUED_PER_AGENT:
            raise KernelError(errno.EAGAIN, f"agent {agent.name!r} has {len(agent.active)} jobs waiting; try again when one finishes")
        if self.queued_count() >= params.MAX_QUEUED_TOTAL:
            raise KernelError(errno.EAGAIN, "the kernel's queue is full; try again later")

    def queued_count(self) -> int:
        """Jobs waiting anywhere: in a core's scheduler, or behind their agent's running turn."""
        return self.cores.queued() + self.waiting_turns()

    def waiting_turns(self) -> int:
        """Prompt turns waiting behind their agents' running turns. Each admission asks,
        so this looks only at agents that queued turns, never at every agent."""
        self.turn_waiters = {a for a in self.turn_waiters if a.next_turns and self.agents.get(a.name) is a}
        return sum(len(a.next_turns) for a in self.turn_waiters)

    async def prepare(self, caller: Caller, agent: Agent, config: AgentConfig, message: str) -> tuple[AgentConfig, list[str] | None]:
        """The config a request runs with: recalled memory and the tools block in its
        system message; EINVAL for a tool nobody serves or a tool_choice not offered."""
        config, recalled = await self.memory.recall_into(caller, agent, config, message)
        if uses_tools(config):
            specs = self.tool_specs(config)
            names = [spec.name for spec in specs]
            if config.tool_choice not in ("auto", "required", *names):
                raise KernelError(
                    errno.EINVAL, f"tool_choice {config.tool_choice!r} is not auto, required or one of this request's tools ({' '.join(names)})"
                )
            config = dataclasses.replace(config, system=with_tools(config.system, specs, calls_per_reply(config)))
        return config, recalled

    def tool_specs(self, config: AgentConfig) -> list[ToolSpec] | list[Function]:
        """The tools a config offers (declared, or served); EINVAL names one nobody serves."""
        if config.functions:
            return list(config.functions)
        try:
            return [self.tools.spec(name) for name in config.tools]
        except KernelError as exc:
            known = " ".join(spec.name for _, spec in self.tools.served())
            raise KernelError(errno.EINVAL, f"{exc.message} (served: {known})") from None

    def launch(self, agent: Agent, job: Job) -> None:
        """Hand a job to its core, or to a tool loop that feeds the core its steps."""
        if uses_tools(job.config) and self.nursery is not None:
            self.nursery.start_soon(run_tool_loop, self, agent, job)
        else:
            self.cores.submit(job)

    async def start_next_turn(self, agent: Agent) -> None:
        """Prompt jobs of one agent run in order: each is rebuilt on the context that
        the previous one extended, then handed to its core."""
        while agent.turn is None and agent.next_turns:
            job = agent.next_turns.popleft()
            agent.turn = job
            try:
                conversation = list(agent.messages) if job.history is None else job.history
                job.messages, job.prompt_tokens = await trio.to_thread.run_sync(
                    build_prompt, self.cores.vocabulary(job.config), job.config, conversation, job.user_message, limiter=self.cores.call_threads
                )
                job.grammar = job.config.grammar or None
            except KernelError as exc:
                job.finish(JobState.ERROR, exc.errno, exc.message)
            if job.cancel_requested:
                job.finish(JobState.CANCELLED, errno.ECANCELED, "cancelled while queued")
            if job.state.finished:
                self.finished(job)
                continue
            self.launch(agent, job)

    # -- cancel and pause --------------------------------------------------------------
    @staticmethod
    def may_act_on(caller: Caller, agent: Agent, job: Job) -> bool:
        """Root, the job's user and the agent's owner may cancel or pause a job."""
        return caller.is_root or job.uid == caller.uid or caller.uid == agent.row.uid

    def pause(self, caller: Caller, agent: Agent, paused: bool) -> list[int]:
        """Suspend (or resume) the agent's jobs: they keep their place, not the CPU."""
        jobs = [j for j in agent.active if self.may_act_on(caller, agent, j)]
        for job in jobs:
            self.cores.of(job).pause(job, paused)
            self.emit(job, "suspended" if paused else "resumed")
        return [job.id for job in jobs]

    def cancel(self, caller: Caller, agent: Agent, which: str) -> list[int]:
        """`cancel` (the caller's latest job), `cancel all`, or `cancel ID`."""
        if which == "all":
            targets = [j for j in agent.active if self.may_act_on(caller, agent, j)]
        elif which == "":
            latest = agent.latest.get(caller.uid)
            targets = [latest] if latest is not None and latest in agent.active else []
        else:
            targets = self._job_by_id(caller, agent, which)
        for job in targets:
            if job in agent.next_turns:
                agent.next_turns.remove(job)
                job.finish(JobState.CANCELLED, errno.ECANCELED, "cancelled while queued")
                self.finished(job)
            elif job.step is not None:
                job.cancel_requested = True
                self.cores.of(job.step).cancel(job.step)  # the tool loop ends the job when its step ends
            elif self.cores.of(job).cancel(job):
                self.finished(job)
        return [job.id for job in targets]

    def _job_by_id(self, caller: Caller, agent: Agent, text: str) -> list[Job]:
        number = decimal(text)
        if number is None:
            raise KernelError(errno.EINVAL, f"cancel: {text!r} is not a job id (cancel [ID|all])")
        for job in agent.active:
            if job.id == number:
                if not self.may_act_on(caller, agent, job):
                    raise KernelError(errno.EPERM, f"job {text} belongs to another user")
                return [job]
        raise KernelError(
            errno.EBUSY if self.storage.job_exists(agent.row.id, number) else errno.ENOENT,
            f"job {text} is not queued or running on {agent.name!r}",
        )

    # -- what callers see --------------------------------------------------------------
    def latest_job(self, agent: Agent, uid: int) -> Job | None:
        """The job `output`/`status` bind to for this uid, from RAM or the journal."""
        job = agent.latest.get(uid)
        if job is None:
            row = self.storage.latest_job(agent.row.id, uid)
            if row is not None:
                job = Results.job_from_row(agent, row)
                agent.latest[uid] = job
        return job

    def record_error(self, agent: Agent | None, uid: int, exc: KernelError, job_id: int | None = None) -> None:
        """Add a refusal to the caller's `error` file and the log."""
        if agent is None:
            return
        agent.add_error(uid, f"{errno_name(exc.errno)} {job_id if job_id is not None else '-'} {int(time.time())} {exc.message}")
        if exc.errno not in (errno.EPERM, errno.EACCES, errno.EDQUOT):  # denials get their own `deny` line
            self.audit("error", agent=agent.name, uid=uid, errno=errno_name(exc.errno), message=exc.message)
