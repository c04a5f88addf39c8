"""Syscalls of the LLM request path: the checks at each write of a request, submit,
the cancel of a turn whose file was closed, and the binding of `output`/`status` to
the caller's latest job.

A `prompt` request refused (at a write or at its commit) makes no job, so the caller's
next `output` open would show an older answer as this one's: the refusal is kept
(`Agent.refused`) and that open fails with it instead."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

from ..agents.config import AgentConfig
from ..agents.request import Request
from ..errors import KernelError
from ..kernel import Kernel
from ..llm.jobs import Job
from ..types import Agent, Caller, Message
from . import checks


async def sys_llm_admit(kernel: Kernel, caller: Caller, agent: Agent, data: bytes = b"", queue: bool = True, prompt: bool = False) -> Parsed | None:
    """What a request's writes are refused for before it is committed, given its bytes
    so far: their size; at its first write (`queue`), the budget, the queue policy and
    the queue limits; UTF-8, but for a last character still incomplete; and, once they
    parse as a JSON object, a valid request, which is returned so that its commit need
    not parse it again. A `prompt` request's refusal is kept."""
    with _kept_refusal(caller, agent, prompt):
        checks.request_size(len(data))
        if queue:
            kernel.agents.require_live(agent)
            kernel.requests.admit(agent)
        text = checks.text(data, "the request", final=False)
        if _complete_object(text):
            return Parsed(data, agent.config, kernel.requests.parse(agent, text))
        return None


@dataclass(frozen=True)
class Parsed:
    """A request parsed at a write: still the request at its commit if neither its bytes
    nor the agent's config changed since."""

    data: bytes
    config: AgentConfig
    request: Request

    def still(self, agent: Agent, data: bytes) -> Request | None:
        return self.request if data == self.data and agent.config is self.config else None


@contextlib.contextmanager
def _kept_refusal(caller: Caller, agent: Agent, prompt: bool) -> Iterator[None]:
    try:
        yield
    except KernelError as exc:
        if prompt:
            agent.refused[caller.uid] = exc
        raise


def _complete_object(text: str) -> bool:
    """A JSON object already whole: a document still arriving in pieces does not parse
    yet and is checked when it is committed."""
    if not text.lstrip().startswith("{") or not text.rstrip().endswith("}"):
        return False
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


async def sys_llm_submit(
    kernel: Kernel, caller: Caller, agent: Agent, data: bytes, history: list[Message] | None = None, parsed: Parsed | None = None
) -> Job:
    """A request committed: a `prompt` job (no `history`), or a `call` turn; `parsed`
    is what its last write's check made of it."""
    with _kept_refusal(caller, agent, history is None):
        checks.request_size(len(data))
        request = parsed.still(agent, data) if parsed is not None else None
        return await kernel.requests.submit(caller, agent, checks.text(data, "the request"), history, request)


async def sys_llm_cancel(kernel: Kernel, caller: Caller, agent: Agent, job_id: int) -> list[int]:
    """The file a turn was read from was closed before its end: that job is cancelled."""
    return kernel.requests.cancel(caller, agent, str(job_id))


async def sys_file_size(kernel: Kernel, caller: Caller, agent: Agent | None, size: int, limit: int) -> None:
    """EFBIG for a stored file (an agent's, or kernel/scheduler) grown past its limit by a write."""
    checks.stored_size(size, "this file", limit)


async def sys_output_bind(kernel: Kernel, caller: Caller, agent: Agent, wait: float = 0.0) -> Job | None:
    """The job the caller's `output` and `status` follow: its latest, from memory or the
    journal; with `wait`, up to that many seconds for a first one."""
    job = kernel.requests.latest_job(agent, caller.uid)
    if job is None and wait > 0:
        kernel.agents.require_live(agent)
        job = await agent.wait_for_job(caller.uid, wait)
    return job
