"""Event streams: job lifecycle events as JSON Lines, for `events` files.

A stream keeps its newest `params.EVENT_HISTORY` lines; readers hold a position
and wait for lines past it. Events carry ids, states, counts and timings, never a
prompt or an answer, so any reader may see any uid's events.
"""

from __future__ import annotations

import collections
import json
import time
from typing import Any

import trio

from .. import params
from .jobs import Job


class EventStream:
    def __init__(self) -> None:
        self._lines: collections.deque[bytes] = collections.deque(maxlen=params.EVENT_HISTORY)
        self.end = 0  # number of lines ever emitted
        self._changed = trio.Event()

    def emit(self, event: str, **fields: Any) -> None:
        line = json.dumps({"ts": round(time.time(), 3), "event": event, **fields}) + "\n"
        self._lines.append(line.encode())
        self.end += 1
        self._changed.set()
        self._changed = trio.Event()

    def since(self, position: int) -> tuple[bytes, int]:
        """Lines after `position` (older ones may have been dropped) and the new position."""
        first = self.end - len(self._lines)
        start = max(position, first) - first
        return b"".join(list(self._lines)[start:]), self.end

    async def wait_past(self, position: int, timeout: float) -> bool:
        if self.end > position:
            return True
        with trio.move_on_after(timeout):
            await self._changed.wait()
            return True
        return False


def job_event(job: Job, event: str) -> dict[str, Any]:
    """The fields of a job event, with its timings in milliseconds so far."""
    fields: dict[str, Any] = {"job": job.id, "agent": job.agent, "uid": job.uid, "state": job.shown_state, "priority": job.config.priority}
    if job.started_at:
        fields["wait_ms"] = round((job.started_at - job.queued_at) * 1000, 1)
    if job.first_token_at:
        fields["ttft_ms"] = round((job.first_token_at - job.queued_at) * 1000, 1)
    if job.finished_at:
        fields["total_ms"] = round((job.finished_at - job.queued_at) * 1000, 1)
        fields["tokens"] = job.n_generated
        if job.errno:
            fields["errno"] = job.errno
    return {"event": event, **fields}
