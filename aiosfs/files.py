"""One small handle class per file class of the protocol; the streams (`output`,
`call`, `events`) are in `streams.py`.

A handle is created at open() and keeps everything that must not be shared
between clients: the caller (read/write/flush/release get no request context),
the bound job, the pending buffer, the read cursor.
"""

from __future__ import annotations

import errno
import logging
import os
import select
from collections.abc import Awaitable, Callable
from typing import Any

import pyfuse3
import trio

from kernel import Agent, Caller, Kernel
from kernel.errors import KernelError
from kernel.syscall import LINE_CHECKS, Sys, Syscall, syscall

log = logging.getLogger(__name__)

Waiter = Callable[[], Awaitable[Any]]


def copy_reader(flags: int) -> bool:
    """Does this open come from a tool that copies files (cp, tar, rsync)? They open
    every file with O_NOFOLLOW (a file, not what a link names); people and programs
    that read a stream do not. Such a reader gets a stream as it is now, and never waits."""
    return bool(flags & os.O_NOFOLLOW)


class Handle:
    """Base: what every open file knows."""

    nonseekable = False  # a stream (`call`, the events files): lseek(2) fails with ESPIPE

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


class AskHandle(Handle):
    """The files where writes collect a question and the first read after them answers
    it (`call`, `recall`, `tools/NAME`): each fd is a private session, and the next
    write starts the next question. `check` refuses what has been written so far (the
    question is then dropped); `answer` makes (the answer's bytes, the errno of the
    read after them or 0) of a question."""

    nonseekable = True

    def __init__(self, kernel: Kernel, caller: Caller, agent: Agent | None, flags: int) -> None:
        super().__init__(kernel, caller, agent, flags)
        self.pending = bytearray()
        self.result = b""
        self.cursor = 0
        self.failure = 0  # the errno the read after the answer returns (0: EOF)
        self.lock = trio.Lock()  # a question is answered once, whatever reads arrive meanwhile

    async def check(self, data: bytes) -> None:
        return None

    async def answer(self, data: bytes) -> tuple[bytes, int]:
        raise NotImplementedError

    async def write(self, off: int, buf: bytes) -> int:
        try:
            await self.check(bytes(self.pending + buf))
        except KernelError:
            self.pending.clear()
            raise
        self.pending += buf
        return len(buf)

    async def read(self, off: int, size: int) -> bytes:
        async with self.lock:
            if self.pending:
                data, self.pending = bytes(self.pending), bytearray()
                self.result, self.failure = await self.answer(data)
                self.cursor = 0
            chunk = self.result[self.cursor : self.cursor + size]
            self.cursor += len(chunk)
            if not chunk and self.failure:
                failure, self.failure = self.failure, 0
                raise pyfuse3.FUSEError(failure)
            return chunk


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

    def __init__(
        self, kernel: Kernel, caller: Caller, agent: Agent | None, flags: int, current: Callable[[], str], commit: Syscall[..., Any], limit: int
    ) -> None:
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
            await self._check_size(len(head) + at + len(buf))
            data = self.data if self.check_call is None else bytearray(self.data)
            data[len(data) : at] = b"\0" * (at - len(data))
            data[at : at + len(buf)] = buf
            await self._check_lines(head + data, len(head) + at)
        except KernelError as exc:
            self.refusal = exc
            raise
        self.data, self.dirty = data, True
        return len(buf)

    async def _check_size(self, size: int) -> None:
        await syscall(self.kernel, Sys.FILE_SIZE, self.caller, self.agent, size, self.limit)  # EFBIG, in `error`

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
    """prompt: writes collect in the handle; each flush with data pending is one job.
    It reads empty, so that tools that copy an agent's files can read it."""

    agent: Agent

    def __init__(self, kernel: Kernel, caller: Caller, agent: Agent, flags: int) -> None:
        super().__init__(kernel, caller, agent, flags)
        self.pending = bytearray()
        self.refusal: KernelError | None = None  # after EFBIG or EINVAL the rest of that request is refused too
        self.parsed: Any = None  # the request as its last write's check parsed it (Sys.LLM_ADMIT)

    async def read(self, off: int, size: int) -> bytes:
        return b""

    async def write(self, off: int, buf: bytes) -> int:
        assert self.agent is not None
        if self.refusal is not None:
            raise self.refusal
        try:  # its bytes so far; at its first write, the queue limits (audits a denial, records the error, keeps the refusal)
            self.parsed = await syscall(
                self.kernel, Sys.LLM_ADMIT, self.caller, self.agent, data=bytes(self.pending + buf), queue=not self.pending, prompt=True
            )
        except KernelError as exc:
            if exc.errno in (errno.EFBIG, errno.EINVAL):  # the request cannot become valid any more
                self.refusal = exc
                self.pending.clear()
            raise
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
        parsed, self.parsed = self.parsed, None
        await syscall(self.kernel, Sys.LLM_SUBMIT, self.caller, self.agent, data, parsed=parsed)  # it writes `error` and keeps the refusal

    async def release(self) -> None:
        try:
            await self.flush()
        except KernelError as exc:
            log.info("request on release failed: %s", exc)


class CtlHandle(Handle):
    """ctl: the lines of one write are checked together, then applied in order,
    inside write()."""

    async def write(self, off: int, buf: bytes) -> int:
        if self.agent is None:
            await syscall(self.kernel, Sys.KERNEL_CTL, self.caller, buf)
        else:
            await syscall(self.kernel, Sys.AGENT_CTL, self.caller, self.agent, buf)
        return len(buf)

    async def read(self, off: int, size: int) -> bytes:
        return b""  # a control file reads empty: a copy of it is an empty file


class DiscardHandle(Handle):
    """A file of an agent opened by an exclusive create or made by a rename, as copy
    tools recreate an agent: the stream, snapshot and control files take what is
    written and keep none of it (their content is the kernel's), so a copied `prompt`
    or `ctl` is never a request."""

    async def read(self, off: int, size: int) -> bytes:
        return b""

    async def write(self, off: int, buf: bytes) -> int:
        return len(buf)
