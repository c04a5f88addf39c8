"""Jobs: one LLM request each, from submission to its last byte.

A job's output and state change only on the trio thread (the engine hands its
results over with `run_sync_soon`), so readers need no locks: they wait on an
event that is replaced at every change.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from ..agents.config import AgentConfig
from ..errors import errno_name


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    ERROR = "error"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.ERROR, JobState.CANCELLED)


@dataclass(eq=False)
class Job:
    """One request. `prompt_tokens` is what the model sees; `user_message` and
    `assistant text` are what goes back into the conversation when it succeeds."""

    id: int
    agent: str
    uid: int
    user_message: str
    messages: list[dict[str, str]]
    prompt_tokens: list[int]
    config: AgentConfig
    source: str = "prompt"  # "prompt" or "call"
    state: JobState = JobState.QUEUED
    data: bytearray = field(default_factory=bytearray)
    errno: int = 0
    message: str = ""
    n_generated: int = 0
    queued_at: float = field(default_factory=time.time)
    started_at: float = 0.0
    first_token_at: float = 0.0
    finished_at: float = 0.0
    cancel_requested: bool = False  # read by the engine thread between steps
    pause_requested: bool = False  # likewise: leave the job out of the batches
    arrival: int = -1  # the scheduler's arrival number; kept across switches
    saved: Any = None  # the engine's sequence while the job is switched out
    added_newline: bool = False  # output got a final "\n" that is not part of the answer
    grammar: str | None = None  # GBNF that constrains the generation (tool steps)
    parent: Job | None = None  # set on a step of a tool loop: not journaled or shown; its parent shows it
    step: Job | None = None  # the running step of this job's tool loop
    extra_prompt_tokens: int = 0  # prompts of the tool loop's later steps, for the budget
    tool_messages: list[dict[str, str]] = field(default_factory=list)  # the loop's calls and results, for the context
    calls_made: int = 0  # tool calls of this job so far: the N of their ids call_JOB_N
    history: list[dict[str, str]] | None = None  # a stateless chat's conversation (envelope "messages"): no context is read or kept
    _changed: trio.Event = field(default_factory=trio.Event, repr=False)

    # -- trio thread only ---------------------------------------------------
    def publish(self, chunk: bytes, n_tokens: int) -> None:
        if self.state is JobState.QUEUED:
            self.state = JobState.RUNNING
            self.started_at = time.time()
        if chunk and not self.first_token_at:
            self.first_token_at = time.time()
        self.data += chunk
        self.n_generated += n_tokens
        self._notify()

    def mark_running(self) -> None:
        if self.state is JobState.QUEUED:
            self.state = JobState.RUNNING
            self.started_at = time.time()
            self._notify()

    def finish(self, state: JobState, errno: int = 0, message: str = "") -> None:
        if self.state.finished:
            return
        self.state, self.errno, self.message = state, errno, message
        self.finished_at = self.finished_at or time.time()  # set already when its core ended it before its turn was kept
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_beyond(self, offset: int, timeout: float) -> bool:
        """Wait until the output is longer than `offset` or the job has finished.

        Returns False when `timeout` passed first, so callers can look for signals.
        """
        if len(self.data) > offset or self.state.finished:
            return True
        with trio.move_on_after(timeout):
            await self._changed.wait()
            return True
        return False

    async def ended(self) -> None:
        """Wait until the job has finished (bound it with a cancel scope)."""
        while not self.state.finished:
            await self._changed.wait()

    @property
    def stateless(self) -> bool:
        """Its envelope gave the whole conversation: neither the agent's context nor a
        `call` session's history is read or extended."""
        return self.history is not None

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")

    @property
    def answer(self) -> str:
        """The model's text, without the newline added for terminals."""
        text = self.text
        return text[:-1] if self.added_newline else text

    def end_line(self) -> None:
        """End a finished answer with a newline, so `cat output` leaves a clean prompt."""
        if self.data and not self.data.endswith(b"\n"):
            self.data += b"\n"
            self.added_newline = True

    @property
    def shown_state(self) -> str:
        """The state as `status` shows it: a paused running job is "suspended"."""
        if self.pause_requested and not self.state.finished:
            return "suspended"
        return self.state.value

    def error_line(self) -> str:
        """The `error` file's line for a failed job, or ""."""
        if self.state not in (JobState.ERROR, JobState.CANCELLED):
            return ""
        return f"{errno_name(self.errno)} {self.id} {int(self.finished_at)} {self.message}"
