"""Syscalls of the LLM request path: the checks at each write of a request, submit,
and the binding of `output`/`status` to the caller's latest job."""

from __future__ import annotations

import json

from ..kernel import Kernel
from ..llm.jobs import Job
from ..types import Agent, Caller, Message
from . import checks


async def sys_llm_admit(kernel: Kernel, caller: Caller, agent: Agent, data: bytes = b"", queue: bool = True) -> None:
    """What a request's writes are refused for before it is committed, given its bytes
    so far: their size; at its first write (`queue`), the budget, the queue policy and
    the queue limits; UTF-8, but for a last character still incomplete; and, once they
    parse as a JSON object, a valid request."""
    checks.request_size(len(data))
    if queue:
        kernel.agents.require_live(agent)
        kernel.requests.admit(agent)
    text = checks.text(data, "the request", final=False)
    if _complete_object(text):
        kernel.requests.parse(agent, text)


def _complete_object(text: str) -> bool:
    """A JSON object already whole: a document still arriving in pieces does not parse
    yet and is checked when it is committed."""
    if not text.lstrip().startswith("{") or not text.rstrip().endswith("}"):
        return False
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


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
