"""One small handle class per file class of the protocol.

A handle is created at open() and keeps everything that must not be shared
between clients: the caller (read/write/flush/release get no request context),
the bound job, the pending buffer, the read cursor.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import select
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import trio

from kernel import Agent, Caller, EventStream, Job, JobState, Kernel, params
from kernel.errors import KernelError
from kernel.syscall import LINE_CHECKS, Sys, checks, syscall

log = logging.getLogger(__name__)

Waiter = Callable[[], Awaitable[Any]]


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


class Handle:
    """Base: what every open file knows."""

    def __init__(self, kernel: Kernel, caller: Caller, agent: Agent | None, flags: int) -> None:
        self.kernel = kernel
        self.caller = caller
        self.agent = agent
        self.flags = flags

    async def read(self, off: int, size: int) -> bytes:
        raise pyfuse3.FUSEError(errno.EACCES)

    async def write(self, off: int, buf: bytes) -> int:
        raise pyfuse3.FUSEError(errno.EACCES)

    async def flush(self) -> None:
        return None

    async def fsync(self) -> None:
        await self.flush()

    async def release(self) -> None:
        return None

    def truncate(self) -> None:
        return None

    def poll(self) -> tuple[int, Waiter | None]:
        """(ready mask, an awaitable that returns when readiness may have changed)."""
        return select.POLLIN | select.POLLOUT, None


class SnapshotHandle(Handle):
    """Text rendered at open(), so chunked reads are consistent."""

    def __init__(self, kernel: Kernel, caller: Caller, agent: Agent | None, flags: int, text: str) -> None:
        super().__init__(kernel, caller, agent, flags)
        self.data = text.encode()

    async def read(self, off: int, size: int) -> bytes:
        return self.data[off : off + size]


class StoredHandle(Handle):
    """A whole-file buffer (config, context, permissions, kernel/scheduler) committed
    at flush.

    Without O_APPEND the buffer starts as the content at open() (empty with
    O_TRUNC) and writes land at their offset. With O_APPEND only the appended bytes
    are kept and they are added to the content as it is at flush, so concurrent
    appenders and finishing jobs lose nothing. The complete lines of each write are
    checked at once (files with a line check): a bad one refuses that write, and a
    refused write spoils its commit: later writes are refused too until the flush,
    which reports the errno again and leaves the content as it was at open(). A
    refused commit does the same.
    """

    def __init__(self, kernel: Kernel, caller: Caller, agent: Agent | None, flags: int, current: Callable[[], str], commit: Sys, limit: int) -> None:
        super().__init__(kernel, caller, agent, flags)
        self.current = current
        self.commit_call = commit
        self.check_call = LINE_CHECKS.get(commit)
        self.limit = limit
        self.emptied = bool(flags & os.O_TRUNC)  # the buffer replaces the file, and started empty
        self.appending = bool(flags & os.O_APPEND) and not self.emptied
        self.dirty = self.emptied
        self.data = bytearray() if self.emptied or self.appending else bytearray(current().encode())
        # bash flushes once before it writes: a truncation committed then is undone
        # if what is written afterwards is refused, so EINVAL keeps the old content.
        self.before = current().encode()
        self.replaced = False
        self.refusal: KernelError | None = None  # a refused write: its commit is refused as a whole

    def _view(self) -> bytes:
        return self.current().encode() + self.data if self.appending else bytes(self.data)

    def _target(self) -> list[Agent]:
        return [self.agent] if self.agent is not None else []

    async def read(self, off: int, size: int) -> bytes:
        return self._view()[off : off + size]

    async def write(self, off: int, buf: bytes) -> int:
        if self.refusal is not None:
            raise self.refusal  # recorded once, when it was refused
        head = self.current().encode() if self.appending else b""
        at = len(self.data) if self.flags & os.O_APPEND else off
        try:
            self._check_size(len(head) + at + len(buf))
            data = self.data if self.check_call is None else bytearray(self.data)
            data[len(data) : at] = b"\0" * (at - len(data))
            data[at : at + len(buf)] = buf
            await self._check_lines(head + data, len(head) + at)
        except KernelError as exc:
            self.refusal = exc
            raise
        self.data, self.dirty = data, True
        return len(buf)

    def _check_size(self, size: int) -> None:
        try:
            checks.stored_size(size, "this file", self.limit)
        except KernelError as exc:
            self.kernel.requests.record_error(self.agent, self.caller.uid, exc)
            raise

    async def _check_lines(self, view: bytes, start: int) -> None:
        """The complete lines of the text from the one holding byte `start` on; a line
        without its newline yet waits for the next write or the commit."""
        if self.check_call is None:
            return
        begin, end = view.rfind(b"\n", 0, start) + 1, view.rfind(b"\n") + 1
        if end > begin:
            await syscall(self.kernel, self.check_call, self.caller, *self._target(), view[:end], view.count(b"\n", 0, begin) + 1)

    def truncate(self) -> None:
        self.data = bytearray()
        self.appending = False
        self.emptied = self.dirty = True
        self.refusal = None

    async def flush(self) -> None:
        if self.refusal is not None:
            refusal, self.refusal = self.refusal, None
            await self._start_over()
            raise refusal
        if not self.dirty:
            return
        self.dirty = False
        data, self.data = self._view(), bytearray() if self.appending else self.data
        try:
            await syscall(self.kernel, self.commit_call, self.caller, *self._target(), data)
        except KernelError:
            await self._start_over()
            raise
        self.replaced = True

    async def _start_over(self) -> None:
        """After a refused commit: the content as it was at open() (committed again if
        this handle's own commit had emptied it) and the buffer as at open()."""
        if self.replaced and not self.appending:
            await syscall(self.kernel, self.commit_call, self.caller, *self._target(), self.before)
            self.replaced = False
        self.data = bytearray() if self.emptied or self.appending else bytearray(self.current().encode())
        self.dirty = False

    async def release(self) -> None:
        try:
            await self.flush()
        except KernelError as exc:
            log.info("discarded an invalid write on release: %s", exc)


class SubmitHandle(Handle):
    """prompt: writes collect in the handle; each flush with data pending is one job."""

    def __init__(self, kernel: Kernel, caller: Caller, agent: Agent, flags: int) -> None:
        super().__init__(kernel, caller, agent, flags)
        self.pending = bytearray()
        self.refusal: KernelError | None = None  # after EFBIG or EINVAL the rest of that request is refused too

    async def write(self, off: int, buf: bytes) -> int:
        assert self.agent is not None
        if self.refusal is not None:
            raise self._refused(self.refusal, record=False)
        try:  # its bytes so far; at its first write, the queue limits (audits a denial, records the error)
            await syscall(self.kernel, Sys.LLM_ADMIT, self.caller, self.agent, data=bytes(self.pending + buf), queue=not self.pending)
        except KernelError as exc:
            if exc.errno in (errno.EFBIG, errno.EINVAL):  # the request cannot become valid any more
                self.refusal = exc
                self.pending.clear()
            raise self._refused(exc, record=False) from None
        self.pending += buf
        return len(buf)

    def truncate(self) -> None:
        self.pending.clear()
        self.refusal = None

    async def flush(self) -> None:
        if self.refusal is not None:  # the refused request ends here; the next one may be fine
            self.refusal = None
            self.pending.clear()
            return
        if not self.pending:
            return  # bash sends an empty FLUSH before writing: never a job
        data, self.pending = bytes(self.pending), bytearray()
        try:
            await syscall(self.kernel, Sys.LLM_SUBMIT, self.caller, self.agent, data)  # it writes `error` itself
        except KernelError as exc:
            raise self._refused(exc, record=False) from None

    def _refused(self, exc: KernelError, record: bool = True) -> KernelError:
        """A request that made no job: say why in `error`, and make the uid's next
        `output` open fail with it rather than show an older answer as this one's."""
        assert self.agent is not None
        if record:
            self.kernel.requests.record_error(self.agent, self.caller.uid, exc)
        self.agent.refused[self.caller.uid] = exc
        return exc

    async def release(self) -> None:
        try:
            await self.flush()
        except KernelError as exc:
            log.info("request on release failed: %s", exc)


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
    """output: the caller uid's latest job on this agent, bound at open()."""

    def __init__(self, kernel: Kernel, caller: Caller, agent: Agent, flags: int, job: Job | None, waiting: Waiting) -> None:
        super().__init__(kernel, caller, agent, flags)
        self.stream = Stream(job)
        self.waiting = waiting
        self.refused = agent.refused.get(caller.uid)  # the uid's last prompt made no job

    async def read(self, off: int, size: int) -> bytes:
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
        if self.stream.job is None and self.caller.uid not in self.agent.latest:
            return 0, functools.partial(self.agent.wait_for_job, self.caller.uid, params.POLL_WAIT_SECONDS)
        return stream_poll(self.stream.job or self.agent.latest[self.caller.uid], self.stream.position)


class RpcHandle(Handle):
    """call: a private conversation. Writes collect; the first read after them
    commits one turn and streams its answer to EOF; the next writes start the next
    turn. Closing the file cancels a turn still running."""

    def __init__(self, kernel: Kernel, caller: Caller, agent: Agent, flags: int, waiting: Waiting) -> None:
        super().__init__(kernel, caller, agent, flags)
        self.pending = bytearray()
        self.history: list[dict[str, str]] = []
        self.stream = Stream(None)
        self.cursor = 0
        self.waiting = waiting

    async def write(self, off: int, buf: bytes) -> int:
        assert self.agent is not None
        try:  # the turn's bytes so far (a call turn does not queue until it is read)
            await syscall(self.kernel, Sys.LLM_ADMIT, self.caller, self.agent, data=bytes(self.pending + buf), queue=False)
        except KernelError:
            self.pending.clear()
            raise
        self.pending += buf
        return len(buf)

    async def read(self, off: int, size: int) -> bytes:
        async with self.stream.lock:
            if self.pending:
                data, self.pending = bytes(self.pending), bytearray()
                job = await syscall(self.kernel, Sys.LLM_SUBMIT, self.caller, self.agent, data, self.history)
                self.stream = Stream(job, lock=self.stream.lock)
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
            self.kernel.requests.cancel(self.caller, self.agent, str(job.id))


class CtlHandle(Handle):
    """ctl: the lines of one write are checked together, then applied in order,
    inside write()."""

    async def write(self, off: int, buf: bytes) -> int:
        if self.agent is None:
            await syscall(self.kernel, Sys.KERNEL_CTL, self.caller, buf)
        else:
            await syscall(self.kernel, Sys.AGENT_CTL, self.caller, self.agent, buf)
        return len(buf)


class EventsHandle(Handle):
    """events: JSON Lines of the events after open(); blocks for more, like a pipe."""

    def __init__(self, kernel: Kernel, caller: Caller, agent: Agent | None, flags: int, stream: EventStream, waiting: Waiting) -> None:
        super().__init__(kernel, caller, agent, flags)
        self.stream = stream
        self.position = stream.end
        self.buffer = b""
        self.waiting = waiting
        self.lock = trio.Lock()

    async def read(self, off: int, size: int) -> bytes:
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
        if self.buffer or self.stream.end > self.position:
            return select.POLLIN, None
        return 0, functools.partial(self.stream.wait_past, self.position, params.POLL_WAIT_SECONDS)
