"""Syscalls of the LLM request path: admission at a request's first write, submit,
and the binding of `output`/`status` to the caller's latest job."""

from __future__ import annotations

from ..kernel import Kernel
from ..llm.jobs import Job
from ..types import Agent, Caller, Message
from . import checks


async def sys_llm_admit(kernel: Kernel, caller: Caller, agent: Agent, size: int = 0, queue: bool = True) -> None:
    """What a request's writes are refused for before its text is read: its size so far
    and, at its first write (`queue`), the budget, the queue policy and the queue limits."""
    checks.request_size(size)
    if queue:
        kernel.agents.require_live(agent)
        kernel.requests.admit(agent)


async def sys_llm_submit(kernel: Kernel, caller: Caller, agent: Agent, data: bytes, history: list[Message] | None = None) -> Job:
    checks.request_size(len(data))
    return await kernel.requests.submit(caller, agent, checks.text(data, "the request"), history)


async def sys_output_bind(kernel: Kernel, caller: Caller, agent: Agent, wait: float = 0.0) -> Job | None:
    """The job the caller's `output` and `status` follow: its latest, from memory or the
    journal; with `wait`, up to that many seconds for a first one."""
    job = kernel.requests.latest_job(agent, caller.uid)
    if job is None and wait > 0:
        kernel.agents.require_live(agent)
        job = await agent.wait_for_job(caller.uid, wait)
    return job
