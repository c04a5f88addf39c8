"""The way back: a core's results to their jobs, and a job's end to the journal and
the agent's conversation.

A core hands each step's results to the trio thread (`deliver`); an error there
costs one job, never the daemon. A prompt job that ends well adds a turn to its
agent's conversation: the turn and the job's end are written in one transaction
on the journal writer, and only then do readers see the job end, so an answer
that could not be kept ends as EIO, not as a success that the context lacks.
Other ends are journaled in order without waiting.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import time
from typing import Any

import trio

from ..agents.table import AgentTable
from ..storage.database import JobEnd, Storage
from ..storage.writer import Writer
from ..types import Agent, AuditSink, Caller, Delivery
from .events import EventStream, job_event
from .jobmetrics import JobMetrics
from .jobs import Job, JobState

log = logging.getLogger(__name__)
End = tuple[JobState, int, str]


class Results:
    """The way back: what the cores send, handed to the jobs and their readers; each
    end journaled, and a prompt's answer kept in its agent's context. It calls nothing
    of the request path: an agent whose turn is free with turns waiting is sent on
    `turns_free`, which the request path reads."""

    def __init__(self, storage: Storage, writer: Writer, agents: AgentTable, audit: AuditSink) -> None:
        self.storage = storage
        self.writer = writer
        self.agents = agents
        self.audit = audit
        self.events = EventStream()  # kernel/events
        self.nursery: trio.Nursery | None = None  # the commits of turns (set while the request path runs)
        self.deliver_s = 0.0  # trio thread time spent handing steps' results to their jobs
        self.metrics = JobMetrics()  # every job's end, for kernel/metrics
        self._free, self.turns_free = trio.open_memory_channel[Agent](math.inf)

    def emit(self, job: Job, event: str, **extra: Any) -> None:
        """A job event to the agent's `events` and to `kernel/events`."""
        fields = job_event(job, event) | extra
        agent = self.agents.get(job.agent)
        if agent is not None:
            agent.events.emit(**fields)
        self.events.emit(**fields)

    @staticmethod
    def job_caller(job: Job) -> Caller:
        """Whom a job acts for: its uid (no group: the agent's policy decides)."""
        return Caller(job.uid, -1, 0)

    @staticmethod
    def job_from_row(agent: Agent, row: dict[str, Any]) -> Job:
        job = Job(row["id"], agent.name, row["uid"], row["user_message"], [], [], agent.config, row["source"])
        job.data = bytearray(row["output"])
        job.state, job.errno, job.message = JobState(row["state"]), row["errno"], row["message"]
        job.queued_at, job.finished_at = row["queued_at"], row["finished_at"]
        return job

    # -- from the cores (trio thread) ---------------------------------------------------
    async def serve(self, results: trio.MemoryReceiveChannel[list[Delivery]]) -> None:
        """The one reader of the cores' results channel: each batch of deliveries, in
        the order the cores sent them, until the channel closes or the task is cancelled."""
        async for deliveries in results:
            self.deliver(deliveries)

    def deliver(self, deliveries: list[Delivery]) -> None:
        """A step's results, on the trio thread: an error here must cost one job, never the daemon."""
        started = time.perf_counter()
        try:
            self._deliver_all(deliveries)
        finally:
            self.deliver_s += time.perf_counter() - started

    def _deliver_all(self, deliveries: list[Delivery]) -> None:
        for job, chunk, n_tokens, end in deliveries:
            try:
                self._deliver_one(job, chunk, n_tokens, end)
            except Exception:
                log.exception("could not deliver a step's result to job %d; failing it", job.id)
                if not job.state.finished:
                    job.finish(JobState.ERROR, errno.EIO, "internal error while delivering the answer (see the aiosfs log)")
                    try:
                        self.finished(job)
                    except Exception:
                        log.exception("could not record the end of job %d either", job.id)

    def _deliver_one(self, job: Job, chunk: bytes, n_tokens: int, end: End | None) -> None:
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
            self.end(job, *end)

    def _deliver_step(self, step: Job, chunk: bytes, n_tokens: int, end: End | None) -> None:
        """A tool loop's step: its text stays internal; its job is running from the first step."""
        assert step.parent is not None
        if step.parent.state is JobState.QUEUED:
            step.parent.mark_running()
            self.emit(step.parent, "running")
        step.publish(chunk, n_tokens) if chunk or n_tokens else step.mark_running()
        if end is not None:
            step.finish(*end)

    # -- ends ------------------------------------------------------------------------
    def end(self, job: Job, state: JobState, code: int, message: str) -> None:
        """A job ends. A prompt job that succeeded is seen to end once its turn is kept;
        any other is seen to end now and journaled in order."""
        if job.state.finished:
            return
        agent = self.agents.get(job.agent)
        if state is JobState.DONE and job.grammar is not None and job.parent is None and not _is_json(job.text):
            state, code, message = JobState.ERROR, errno.EIO, "the answer ended before its JSON was complete (max_tokens too small?)"
        if state is JobState.DONE:
            job.end_line()
        if state is JobState.DONE and job.source == "prompt" and not job.stateless and agent is not None:
            job.finished_at = time.time()  # the core's end; readers see it once the turn is kept
            if self.nursery is not None:
                self.nursery.start_soon(self._keep_turn, agent, job)
                return
            # the request path has stopped (no task can wait): keep the turn in order, unwaited
            turn, spent = self._turn(job), self._spend(agent, job)
            self.writer.post(self.storage.record_turn, agent.row.id, turn, self._row_end(job, JobState.DONE, 0, "", spent))
            self._kept(agent, job, turn, spent)
            return
        job.finish(state, code, message)
        self.finished(job)

    @staticmethod
    def _turn(job: Job) -> list[dict[str, str]]:
        return [{"role": "user", "content": job.user_message}, *job.tool_messages, {"role": "assistant", "content": job.answer}]

    async def _keep_turn(self, agent: Agent, job: Job) -> None:
        turn, spent = self._turn(job), self._spend(agent, job)
        try:
            await self.writer.call(self.storage.record_turn, agent.row.id, turn, self._row_end(job, JobState.DONE, 0, "", spent))
        except Exception as exc:
            log.exception("could not record the turn of job %d in the context of %s", job.id, agent.name)
            job.finish(
                JobState.ERROR, errno.EIO, f"the answer could not be written to the agent's context ({exc}); the conversation does not include it"
            )
            self.finished(job, journaled=False, spent=spent)
            return
        self._kept(agent, job, turn, spent)

    def _kept(self, agent: Agent, job: Job, turn: list[dict[str, str]], spent: int) -> None:
        """The turn is in the journal: the agent's conversation holds it, and the job is done."""
        agent.messages = agent.messages + turn
        job.finish(JobState.DONE)
        self.finished(job, journaled=True, spent=spent)

    def finished(self, job: Job, journaled: bool = False, spent: int | None = None) -> None:
        """After `job.finish`: journal the end (unless done), free the agent's turn, tell its readers."""
        self.metrics.ended(job)
        agent = self.agents.get(job.agent)
        if spent is None:
            spent = self._spend(agent, job) if agent is not None else 0
        if not journaled:
            self.writer.post(self.storage.finish_job, *self._row_end(job, job.state, job.errno, job.message, spent))
        if agent is None:
            return
        agent.active.discard(job)
        self.emit(job, job.state.value)
        if agent.turn is job:
            agent.turn = None
            if agent.next_turns:
                self._free.send_nowait(agent)
        if job.state is not JobState.DONE and agent.latest.get(job.uid) is job:
            agent.add_error(job.uid, job.error_line())
        self.audit("job", id=job.id, agent=job.agent, uid=job.uid, state=job.state.value, tokens=job.n_generated)

    @staticmethod
    def _spend(agent: Agent | None, job: Job) -> int:
        """Charge the model's work on a job to its agent's budget; the tokens charged."""
        spent = len(job.prompt_tokens) + job.extra_prompt_tokens + job.n_generated if job.started_at else 0
        if agent is not None:
            agent.row.spent_tokens += spent
        return spent

    def _row_end(self, job: Job, state: JobState, code: int, message: str, spent: int) -> JobEnd:
        """finish_job's arguments: the end and, when it spent tokens, the agent's new total."""
        agent = self.agents.get(job.agent)
        total = (agent.row.id, agent.row.spent_tokens) if agent is not None and spent else None
        return (job.id, state.value, bytes(job.data), code, message, job.finished_at or time.time(), total)

    def fail_unfinished(self, message: str) -> None:
        for agent in list(self.agents.values()):
            agent.next_turns.clear()
            for job in sorted(agent.active, key=lambda j: j.id):
                job.finish(JobState.ERROR, errno.EIO, message)
                self.finished(job)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
