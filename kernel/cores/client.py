"""The engine client: one interface to a local engine, in this process or in a process
of its own, chosen once (`engine_client`).

`EngineProcess` (kernel/cores/enginehost.py) runs llama.cpp in a supervised child and
keeps two plans in flight; `InlineEngine` runs the same runner on the caller's thread,
one plan at a time, for tests and in-process benchmarks. The engine loop
(kernel/cores/engine.py) talks to either through the same methods: `start`,
`configure`, `submit` and `collect`, `ping`, `interrupt`, `close`, and
the vocabulary's `chat_tokens`.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable

from .backends import Backend
from .enginehost import EngineProcess
from .runner import Runner
from .wire import Plan, RunnerOptions, StepResult


class InlineEngine:
    """The runner in this process, on the engine thread (tests, in-process benchmarks).
    Nothing watches it: a hang in this process could not be killed anyway."""

    hung = False
    hangs = 0

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.on_exit: Callable[[], None] = lambda: None  # never called: this process does not exit under itself
        self.info = backend.info
        self.state = "loading"
        self.failure = ""
        self.pid = os.getpid()
        self._options: RunnerOptions | None = None
        self._runner = Runner(backend)
        self._plans: collections.deque[Plan] = collections.deque()

    def set_state(self, state: str, failure: str = "") -> None:
        self.state, self.failure = state, failure

    def alive(self) -> bool:
        return True

    def death_reason(self) -> str:
        return ""

    def deadline(self) -> float | None:
        return None

    def configure(self, options: RunnerOptions) -> None:
        self._options = options
        self._runner = Runner(self.backend, options)

    def start(self, progress: Callable[[float], None] | None = None) -> None:
        if self.state in ("restarting", "hung"):  # after an error in the engine loop: a fresh runner, as a new process has
            self._runner.close()
            self._runner = Runner(self.backend, self._options)
            self._plans.clear()
        if self.state != "ready":
            self.backend.warm_up()
            self.state = "ready"

    depth = 1  # plans in flight: one, carried out when collected (on the caller's thread)

    def submit(self, plan: Plan) -> None:
        self._plans.append(plan)

    def collect(self) -> StepResult:
        return self._runner.step(self._plans.popleft())

    def ping(self) -> None:
        return None

    def interrupt(self) -> None:
        return None

    def close(self) -> None:
        self._runner.close()
        self.backend.close()


EngineClient = InlineEngine | EngineProcess
# What runs a model: a backend, which an engine runs in this process, or an engine
# process, which runs one of its own.
Runtime = Backend | EngineProcess


def engine_client(runtime: Runtime) -> EngineClient:
    """The one place where the kind of engine is chosen: an engine process as it is, a
    backend to run in this process behind the same interface."""
    return runtime if isinstance(runtime, EngineProcess) else InlineEngine(runtime)
