"""The journal's writer: one thread that runs every SQLite commit of the kernel, in
the order the trio thread asked for them.

A commit waits for fsync (`synchronous=FULL`), which can take milliseconds, or
much longer on a busy disk; the trio thread serves every FUSE request and must
never wait for one. So the kernel hands each write to this thread: `call` when it
needs the result (a new row's id) or must know the write is durable before it goes
on, `post` when it need not wait (a job's end, once readers may see it). One
thread keeps the writes in order, so a job's end is never journaled before its
start. `Storage` refuses a commit on the trio thread (`storage.on_trio_thread`).

Group commit: given the journal's connection, the thread takes every write waiting
(up to GROUP_MAX) into one transaction, each write in a savepoint of its own, and
commits once: one fsync for a burst of 64 agents' prompts instead of 64. A write
that fails rolls back its own savepoint only. Nobody hears of a write before the
commit that holds it is on disk.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import trio

log = logging.getLogger(__name__)
T = TypeVar("T")
Result = tuple[bool, Any]  # (True, the value) or (False, the exception)
_STOP = object()
GROUP_MAX = 256  # writes committed together at most


class Writer:
    def __init__(self, name: str = "journal-writer", conn: sqlite3.Connection | None = None) -> None:
        """`conn`: the connection every write goes through, for group commits; None runs
        each write on its own (its own transaction)."""
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._conn = conn
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        self._closed = False

    def _loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < GROUP_MAX and batch[-1] is not _STOP:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = batch[-1] is _STOP
            items = batch[:-1] if stop else batch
            if items:
                self._run(items)
            if stop:
                return

    def _run(self, items: list[Any]) -> None:
        """Run a group of writes, committed together when the writer has a connection."""
        conn = self._conn
        if conn is None or len(items) == 1 or conn.in_transaction:
            results = [_attempt(fn, args) for fn, args, _ in items]
        else:
            try:
                conn.execute("BEGIN IMMEDIATE")
                results = [self._in_savepoint(conn, fn, args) for fn, args, _ in items]
                conn.execute("COMMIT")
            except sqlite3.Error as exc:  # the commit itself failed: none of them is on disk
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                results = [(False, exc)] * len(items)
        for (fn, _, done), result in zip(items, results, strict=True):
            if done is not None:
                done(result)
            elif not result[0]:
                log.error("a journal write (%s) failed", getattr(fn, "__name__", fn), exc_info=result[1])

    @staticmethod
    def _in_savepoint(conn: sqlite3.Connection, fn: Callable[..., Any], args: tuple[Any, ...]) -> Result:
        conn.execute("SAVEPOINT write")
        result = _attempt(fn, args)
        if not result[0]:
            conn.execute("ROLLBACK TO write")
        conn.execute("RELEASE write")
        return result

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


def _attempt(fn: Callable[..., Any], args: tuple[Any, ...]) -> Result:
    try:
        return (True, fn(*args))
    except Exception as exc:
        return (False, exc)
