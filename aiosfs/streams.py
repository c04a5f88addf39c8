"""The stream handles: `output` (growing), `call` (rpc) and the events files, whose
reads wait for what a job or the kernel has not produced yet, like a pipe.

A waiting read wakes every READ_WAKE_SECONDS to answer EINTR when its process has
a signal pending (pyfuse3 does not forward FUSE_INTERRUPT), and counts toward the
uid's blocked readers (`Waiting`).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import select
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import trio

from kernel import Agent, Caller, EventStream, Job, JobState, Kernel, params
from kernel.errors import KernelError
from kernel.syscall import Sys, syscall

from .files import AskHandle, Handle, Waiter, copy_reader

log = logging.getLogger(__name__)


def signal_pending(pid: int) -> bool:
    """True when `pid` has an unblocked signal pending, or is gone.

    pyfuse3 does not forward FUSE_INTERRUPT, so a blocked read looks here
    periodically and answers EINTR, which lets `kill` and Ctrl-C work.
    """
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
    except OSError:
        return True
    pending = int(fields.get("SigPnd", "0"), 16) | int(fields.get("ShdPnd", "0"), 16)
    blocked = int(fields.get("SigBlk", "0"), 16)
    sigkill = 1 << (9 - 1)
    return bool(pending & (~blocked | sigkill))


@dataclass(eq=False)
class Stream:
    """A reader's view of one job: where it is, and whether it reported the error."""

    job: Job | None
    error_reported: bool = False
    position: int = 0
    lock: trio.Lock = field(default_factory=trio.Lock)


class Waiting:
    """Counts readers parked in the daemon per uid (each holds a FUSE task)."""

    def __init__(self) -> None:
        self.by_uid: dict[int, int] = {}

    def enter(self, uid: int) -> None:
        if self.by_uid.get(uid, 0) >= params.MAX_BLOCKED_READERS_PER_UID:
            raise KernelError(errno.EAGAIN, f"uid {uid} has {params.MAX_BLOCKED_READERS_PER_UID} blocked readers already")
        self.by_uid[uid] = self.by_uid.get(uid, 0) + 1

    def leave(self, uid: int) -> None:
        self.by_uid[uid] -= 1


async def read_stream(stream: Stream, off: int, size: int, caller: Caller, flags: int, waiting: Waiting) -> bytes:
    """Growing semantics: bytes of the job; block at the end; EOF when done; one
    read returns the errno of a failed job after its last byte."""
    job = stream.job
    if job is None:
        return b""
    entered = False
    try:
        while True:
            if off < len(job.data):
                chunk = bytes(job.data[off : off + size])
                stream.position = off + len(chunk)
                return chunk
            if job.state.finished:
                if job.state is not JobState.DONE and not stream.error_reported:
                    stream.error_reported = True
                    raise pyfuse3.FUSEError(job.errno or errno.EIO)
                return b""
            if flags & os.O_NONBLOCK:
                raise pyfuse3.FUSEError(errno.EAGAIN)
            if not entered:
                waiting.enter(caller.uid)
                entered = True
            if not await job.wait_beyond(off, params.READ_WAKE_SECONDS) and signal_pending(caller.pid):
                raise pyfuse3.FUSEError(errno.EINTR)
    finally:
        if entered:
            waiting.leave(caller.uid)


def stream_poll(job: Job | None, position: int) -> tuple[int, Waiter | None]:
    if job is None or job.state.finished or position < len(job.data):
        return select.POLLIN, None
    return 0, functools.partial(job.wait_beyond, position, params.POLL_WAIT_SECONDS)


class GrowingHandle(Handle):
    """output: the caller uid's latest job on this agent, bound at open(). A copy
    reader (`copy_reader`) gets the bytes the job has at open() and EOF: no wait, no
    errno, nothing when there is no job."""

    def __init__(self, kernel: Kernel, caller: Caller, agent: Agent, flags: int, job: Job | None, waiting: Waiting) -> None:
        super().__init__(kernel, caller, agent, flags)
        self.stream = Stream(job)
        self.waiting = waiting
        self.refused = agent.refused.get(caller.uid)  # the uid's last prompt made no job
        self.copy = (bytes(job.data) if job is not None else b"") if copy_reader(flags) else None

    async def read(self, off: int, size: int) -> bytes:
        if self.copy is not None:
            return self.copy[off : off + size]
        if self.refused is not None:
            raise pyfuse3.FUSEError(self.refused.errno)
        async with self.stream.lock:
            if self.stream.job is None:
                await self._wait_for_first_job()
            return await read_stream(self.stream, off, size, self.caller, self.flags, self.waiting)

    async def _wait_for_first_job(self) -> None:
        """A reader opened before the uid's first request streams that request."""
        assert self.agent is not None
        self.stream.job = await syscall(self.kernel, Sys.OUTPUT_BIND, self.caller, self.agent)
        if self.stream.job is not None:
            return
        if self.flags & os.O_NONBLOCK:
            raise pyfuse3.FUSEError(errno.EAGAIN)
        self.waiting.enter(self.caller.uid)
        try:
            while self.stream.job is None:  # ENOENT once the agent is removed
                self.stream.job = await syscall(self.kernel, Sys.OUTPUT_BIND, self.caller, self.agent, wait=params.READ_WAKE_SECONDS)
                if self.stream.job is None and signal_pending(self.caller.pid):
                    raise pyfuse3.FUSEError(errno.EINTR)
        finally:
            self.waiting.leave(self.caller.uid)

    def poll(self) -> tuple[int, Waiter | None]:
        assert self.agent is not None
        if self.copy is not None:
            return select.POLLIN, None
        if self.stream.job is None and self.caller.uid not in self.agent.latest:
            return 0, functools.partial(self.agent.wait_for_job, self.caller.uid, params.POLL_WAIT_SECONDS)
        return stream_poll(self.stream.job or self.agent.latest[self.caller.uid], self.stream.position)


class RpcHandle(AskHandle):
    """call: a private conversation. Writes collect; the first read after them
    commits one turn and streams its answer to EOF; the next writes start the next
    turn. Closing the file cancels a turn still running."""

    agent: Agent

    def __init__(self, kernel: Kernel, caller: Caller, agent: Agent, flags: int, waiting: Waiting) -> None:
        super().__init__(kernel, caller, agent, flags)
        self.history: list[dict[str, str]] = []
        self.stream = Stream(None)
        self.waiting = waiting
        self.parsed: Any = None  # the turn as its last write's check parsed it

    async def check(self, data: bytes) -> None:
        """The turn's bytes so far (a call turn does not queue until it is read)."""
        self.parsed = await syscall(self.kernel, Sys.LLM_ADMIT, self.caller, self.agent, data=data, queue=False)

    async def read(self, off: int, size: int) -> bytes:
        async with self.stream.lock:
            if self.pending:
                data, self.pending, parsed, self.parsed = bytes(self.pending), bytearray(), self.parsed, None
                submitted = await syscall(self.kernel, Sys.LLM_SUBMIT, self.caller, self.agent, data, self.history, parsed=parsed)
                self.stream = Stream(submitted, lock=self.stream.lock)
                self.cursor = 0
            chunk = await read_stream(self.stream, self.cursor, size, self.caller, self.flags, self.waiting)
            self.cursor += len(chunk)
            job = self.stream.job
            if not chunk and job is not None:
                if job.state is JobState.DONE and not job.stateless:  # a stateless chat brought its own conversation
                    self.history += [{"role": "user", "content": job.user_message}, {"role": "assistant", "content": job.answer}]
                self.stream = Stream(None, lock=self.stream.lock)
            return chunk

    def poll(self) -> tuple[int, Waiter | None]:
        if self.pending:
            return select.POLLIN | select.POLLOUT, None
        mask, waiter = stream_poll(self.stream.job, self.cursor)
        return mask | select.POLLOUT, waiter

    async def release(self) -> None:
        job = self.stream.job
        if job is not None and not job.state.finished and self.agent is not None:
            try:
                await syscall(self.kernel, Sys.LLM_CANCEL, self.caller, self.agent, job.id)
            except KernelError as exc:  # it ended meanwhile
                log.info("cancel of job %d at close: %s", job.id, exc)


class EventsHandle(Handle):
    """events: JSON Lines of the events after open(); blocks for more, like a pipe.
    A copy reader (`copy_reader`) gets EOF: nothing happened since its open()."""

    nonseekable = True

    def __init__(self, kernel: Kernel, caller: Caller, agent: Agent | None, flags: int, stream: EventStream, waiting: Waiting) -> None:
        super().__init__(kernel, caller, agent, flags)
        self.stream = stream
        self.position = stream.end
        self.buffer = b""
        self.waiting = waiting
        self.lock = trio.Lock()

    async def read(self, off: int, size: int) -> bytes:
        if copy_reader(self.flags):
            return b""
        async with self.lock:
            if not self.buffer:
                await self._wait_for_lines()
            chunk, self.buffer = self.buffer[:size], self.buffer[size:]
            return chunk

    async def _wait_for_lines(self) -> None:
        if self.stream.end <= self.position and self.flags & os.O_NONBLOCK:
            raise pyfuse3.FUSEError(errno.EAGAIN)
        self.waiting.enter(self.caller.uid)
        try:
            while not await self.stream.wait_past(self.position, params.READ_WAKE_SECONDS):
                if signal_pending(self.caller.pid):
                    raise pyfuse3.FUSEError(errno.EINTR)
        finally:
            self.waiting.leave(self.caller.uid)
        self.buffer, self.position = self.stream.since(self.position)

    def poll(self) -> tuple[int, Waiter | None]:
        if self.buffer or self.stream.end > self.position or copy_reader(self.flags):
            return select.POLLIN, None
        return 0, functools.partial(self.stream.wait_past, self.position, params.POLL_WAIT_SECONDS)
