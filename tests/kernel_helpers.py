"""Helpers for in-process kernel tests with the deterministic FakeBackend (no FUSE)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio

from kernel.errors import KernelError, errno_name
from kernel.kernel import Agent, Caller, Kernel
from kernel.llm.jobs import Job
from kernel.syscall import Sys, syscall

OWNER = Caller(uid=1000, gid=1000, pid=1)
OTHER = Caller(uid=1001, gid=1001, pid=2)
ROOT = Caller(uid=0, gid=0, pid=3)
TIMEOUT = 10  # seconds a whole test body may take before it fails instead of hanging


def answer(message: str, turn: int = 1) -> str:
    """What FakeBackend says to `message` when it was shown `turn` user messages."""
    return f"turn {turn}: {message.strip().upper()}"


def run(body: Callable[[], Awaitable[Any]], timeout: float = TIMEOUT) -> Any:
    """`trio.run` with a deadline, so a broken kernel fails the test instead of hanging it."""

    async def main() -> Any:
        with trio.fail_after(timeout):
            return await body()

    return trio.run(main)


@contextlib.asynccontextmanager
async def running(kernel: Kernel) -> AsyncIterator[Kernel]:
    """Run the kernel's engine for the duration of the block, then stop it."""
    async with trio.open_nursery() as nursery:
        await nursery.start(kernel.run)
        try:
            yield kernel
        finally:
            kernel.stop()


async def mkdir(kernel: Kernel, name: str, caller: Caller = OWNER, mode: int = 0o755) -> Agent:
    return await syscall(kernel, Sys.AGENT_CREATE, caller, name, mode)


async def submit(kernel: Kernel, agent: Agent, request: str | bytes, caller: Caller = OWNER, **kwargs: Any) -> Job:
    data = request.encode() if isinstance(request, str) else request
    return await syscall(kernel, Sys.LLM_SUBMIT, caller, agent, data, **kwargs)


async def ctl(kernel: Kernel, agent: Agent, line: str, caller: Caller = OWNER) -> None:
    await syscall(kernel, Sys.AGENT_CTL, caller, agent, line)


async def finished(job: Job) -> Job:
    """Wait until the job has finished, the way a blocked `output` reader does."""
    while not job.state.finished:
        await job.wait_beyond(len(job.data), 0.5)
    return job


async def producing(job: Job) -> Job:
    """Wait until the job has published some output (it is running)."""
    while not job.data and not job.state.finished:
        await job.wait_beyond(0, 0.5)
    return job


async def ask(kernel: Kernel, agent: Agent, request: str | bytes, caller: Caller = OWNER, **kwargs: Any) -> Job:
    """Submit and wait for the end."""
    return await finished(await submit(kernel, agent, request, caller, **kwargs))


async def refused(code: int, call: Awaitable[Any]) -> KernelError:
    """Await `call`, require a KernelError with errno `code`, and return it."""
    with pytest.raises(KernelError) as info:
        await call
    assert info.value.errno == code, f"expected {errno_name(code)}, got {info.value}"
    return info.value


async def remember(kernel: Kernel, agent: Agent, name: str, text: str, mode: int = 0o644) -> int:
    """Write a memory file the way `echo text > memory/name` does."""
    store = kernel.memory.store
    root = await kernel.memory.root(agent)
    ino = (await kernel.memory.run(store.create, root, name.encode(), mode, agent.row.uid, agent.row.gid)).ino
    await kernel.memory.run(store.open, ino, True)
    await kernel.memory.run(store.write, ino, 0, text.encode())
    await kernel.memory.run(store.flush, ino)
    await kernel.memory.run(store.release, ino)
    return ino
