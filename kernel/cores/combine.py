"""Calls that arrive while one is on the wire go together in the next.

Many agents write prompts at once, and each prompt needs the engine's chat template
and tokenizer (one round trip on the call channel, which serves one call at a time).
`Combiner` turns the calls of many threads into few round trips: the first caller
sends the calls waiting, everyone else waits for its answer; when that round trip
returns, the oldest caller still waiting sends the next batch, with all that came
meanwhile. Nothing waits without a bound: a caller gives up after `patience` seconds
and gets TimeoutError, and its item, if it is still queued, is never sent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Answer = TypeVar("Answer")


class _Ticket(Generic[Item, Answer]):
    __slots__ = ("item", "ready", "answer", "error", "lead", "gone")

    def __init__(self, item: Item) -> None:
        self.item = item
        self.ready = threading.Event()  # set when answered, or when it is this ticket's turn to send
        self.answer: Answer | None = None
        self.error: BaseException | None = None
        self.lead = False  # woken to send the next batch
        self.gone = False  # its caller stopped waiting


class Combiner(Generic[Item, Answer]):
    """`call(item)` from any thread; `send(items)` answers a batch, one answer (or an
    exception, for that item alone) per item, in order; an exception it raises is the
    answer of every item in the batch."""

    def __init__(self, send: Callable[[list[Item]], Sequence[Answer | BaseException]], most: int = 256) -> None:
        self._send = send
        self._most = most  # items in one batch at most
        self._lock = threading.Lock()
        self._queue: list[_Ticket[Item, Answer]] = []
        self._busy = False  # a batch is on the wire, or its sender is about to send one
        self.batches = 0
        self.items = 0

    def call(self, item: Item, patience: float) -> Answer:
        ticket: _Ticket[Item, Answer] = _Ticket(item)
        with self._lock:
            self._queue.append(ticket)
            ticket.lead = not self._busy
            self._busy = True
        if not ticket.lead:
            if not ticket.ready.wait(patience):
                with self._lock:
                    if not ticket.ready.is_set():
                        ticket.gone = True  # still queued: never sent; or in a batch: its answer is dropped
                        raise TimeoutError(f"no answer within {patience:.0f} s")
            if not ticket.lead:
                return _answer_of(ticket)
        self._lead()
        return _answer_of(ticket)

    def _lead(self) -> None:
        """Send what is queued, answer it, then hand the next batch to the oldest waiter."""
        with self._lock:
            batch = [t for t in self._queue[: self._most] if not t.gone]
            del self._queue[: self._most]
        try:
            if batch:
                self._answer(batch)
        finally:
            with self._lock:
                self._queue = [t for t in self._queue if not t.gone]
                if self._queue:
                    self._queue[0].lead = True
                    self._queue[0].ready.set()
                else:
                    self._busy = False

    def _answer(self, batch: list[_Ticket[Item, Answer]]) -> None:
        self.batches += 1
        self.items += len(batch)
        try:
            answers = self._send([t.item for t in batch])
            if len(answers) != len(batch):
                raise RuntimeError(f"{len(answers)} answers to {len(batch)} calls")
        except BaseException as exc:  # noqa: BLE001 - every caller of the batch gets it
            for t in batch:
                t.error = exc
                t.ready.set()
            if not isinstance(exc, Exception):
                raise
            return
        for t, answer in zip(batch, answers, strict=True):
            if isinstance(answer, BaseException):
                t.error = answer
            else:
                t.answer = answer
            t.ready.set()


def _answer_of(ticket: _Ticket[Item, Answer]) -> Answer:
    if ticket.error is not None:
        raise ticket.error
    return ticket.answer  # type: ignore[return-value]
