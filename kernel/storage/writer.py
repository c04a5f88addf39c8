"""The journal's writer: one thread that runs every SQLite commit of the kernel, in
the order the trio thread asked for them.

A commit waits for fsync (`synchronous=FULL`), which can take milliseconds, or
much longer on a busy disk; the trio thread serves every FUSE request and must
never wait for one. So the kernel hands each write to this thread: `call` when it
needs the result (a new row's id) or must know the write is durable before it goes
on, `post` when it need not wait (a job's end, once readers may see it). One
thread keeps the writes in order, so a job's end is never journaled before its
start. `Storage` refuses a commit on the trio thread (`storage.on_trio_thread`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import trio

log = logging.getLogger(__name__)
T = TypeVar("T")
Result = tuple[bool, Any]  # (True, the value) or (False, the exception)
_STOP = object()


class Writer:
    def __init__(self, name: str = "journal-writer") -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        self._closed = False

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            fn, args, done = item
            try:
                result: Result = (True, fn(*args))
            except Exception as exc:
                result = (False, exc)
            if done is not None:
                done(result)
            elif not result[0]:
                log.error("a journal write (%s) failed", getattr(fn, "__name__", fn), exc_info=result[1])

    def _put(self, item: Any) -> None:
        if self._closed:
            raise RuntimeError("the journal writer is closed")
        self._queue.put(item)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the writer thread after every write asked for before it, and
        return its result (or raise its exception). Cancellation waits for the write: a
        commit that started is never abandoned half-known."""
        token = trio.lowlevel.current_trio_token()
        finished = trio.Event()
        box: list[Result] = []

        def done(result: Result) -> None:
            box.append(result)
            try:
                token.run_sync_soon(finished.set)
            except trio.RunFinishedError:  # the run ended while we wrote: nobody waits
                pass

        self._put((fn, args, done))
        with trio.CancelScope(shield=True):
            await finished.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on the writer thread, in order, without waiting; a failure is logged."""
        self._put((fn, args, None))

    def close(self) -> None:
        """Run what was asked for, then end the thread."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()
