"""Jobs a previous daemon left queued or running: it died without ending them (a
clean stop fails them itself). At start, before the mount serves, each is queued
again under its id, in id order, or failed with the reason."""

from __future__ import annotations

import contextlib
import errno
import time
from typing import Any

from .. import params
from ..access import rules as access
from ..errors import KernelError
from ..storage.database import Storage
from ..types import Agent
from .jobs import Job, JobState
from .requests import Requests

RESTARTED = "the kernel restarted before this job finished"


async def recover_jobs(requests: Requests) -> None:
    storage = requests.storage
    rows = storage.unfinished_jobs()
    if not rows:
        return
    requeued: list[Job] = []
    failed: list[tuple[Agent | None, dict[str, Any], KernelError]] = []
    for row in rows:
        agent = requests.agents.by_id(row["agent_id"])
        try:
            if agent is None:
                raise KernelError(errno.EIO, RESTARTED)
            _check_requeue(agent, row)
            request = requests.parse(agent, row["request"])
            config = access.check_request(agent, request.config)
        except KernelError as refusal:
            failed.append((agent, row, refusal))
            continue
        # the output starts over: generation restarts from scratch on today's context and config
        history = None if request.history is None else list(request.history)
        requeued.append(
            Job(row["id"], agent.name, row["uid"], request.message, [], [], config, "prompt", queued_at=row["queued_at"], history=history)
        )
    now = time.time()
    ends = [(row["id"], JobState.ERROR.value, bytes(row["output"]), exc.errno, exc.message, now) for _, row, exc in failed]
    await requests.writer.call(_apply, storage, [job.id for job in requeued], ends)  # every row is requeued or failed, or none is
    for agent, row, exc in failed:
        if agent is not None:
            job = requests.results.job_from_row(agent, row)
            _bind_if_latest(requests, agent, job)
            job.finish(JobState.ERROR, exc.errno, exc.message)
            requests.finished(job, journaled=True)
    for job in requeued:
        agent = requests.agents[job.agent]
        agent.active.add(job)
        agent.next_turns.append(job)
        requests.turn_waiters.add(agent)
        _bind_if_latest(requests, agent, job)
        requests.emit(job, "requeued")
    requests.audit("recovery", requeued=[job.id for job in requeued], failed=[row["id"] for _, row, _ in failed])
    for job in requeued:
        with contextlib.suppress(KernelError):  # e.g. a tool gone since: the turn fails when its loop starts
            job.config, _ = await requests.prepare(requests.job_caller(job), requests.agents[job.agent], job.config, job.user_message)
    for agent in dict.fromkeys(requests.agents[job.agent] for job in requeued):
        await requests.start_next_turn(agent)  # each agent's turns run in order, as after submit


def _apply(storage: Storage, requeue: list[int], ends: list[tuple[int, str, bytes, int, str, float]]) -> None:
    with storage.atomic():
        for job_id in requeue:
            storage.requeue_job(job_id)
        for end in ends:
            storage.finish_job(*end)


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


def _bind_if_latest(requests: Requests, agent: Agent, job: Job) -> None:
    """Make `output`/`status` of the job's uid follow this object if it is the uid's latest job."""
    row = requests.storage.latest_job(agent.row.id, job.uid)
    if row is not None and row["id"] == job.id:
        agent.latest[job.uid] = job
