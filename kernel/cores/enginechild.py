"""The engine process's own side: `python -m kernel.cores.enginehost STEP_FD CALL_FD`.

It loads the model the daemon names, warms it up, then serves the step channel on its
main thread (the one that decodes) and the call channel on a second one, until the
daemon says `Stop` or goes away. The daemon's side, and the protocol, are in
kernel/cores/enginehost.py; the messages in kernel/cores/wire.py.
"""

from __future__ import annotations

import errno
import faulthandler
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import params
from ..errors import KernelError
from .backends import Backend
from .channel import Channel
from .hibernate import KvStore
from .kvkey import engine_key
from .runner import Runner
from .wire import (
    PONG,
    Call,
    CallReply,
    ChatPrompt,
    ChatTokens,
    EngineSpec,
    Error,
    Loaded,
    Ok,
    Ping,
    Plan,
    Progress,
    Ready,
    Request,
    RunnerOptions,
    StepResult,
    Stop,
    Tokenize,
)

log = logging.getLogger(__name__)

CRASH_ENV = "AIOSFS_TEST_ENGINE_CRASH"  # tests only: [hang:]`load`|`warmup`|`step`|`tokenize`, optionally `@PATH` (only while PATH exists)


def _crash_here(point: str) -> None:
    """Tests: die with SIGSEGV at `point` when AIOSFS_TEST_ENGINE_CRASH asks for it, or
    stop with SIGSTOP (a hang) when it asks for `hang:POINT`."""
    wanted, _, path = os.environ.get(CRASH_ENV, "").partition("@")
    hang = wanted.startswith("hang:")
    if wanted.removeprefix("hang:") == point and (not path or os.path.exists(path)):
        sys.stderr.write(f"engine: {'hanging' if hang else 'crashing'} at {point} on purpose ({CRASH_ENV})\n")
        sys.stderr.flush()
        # at this thread: os.kill would let the kernel stop the process from another thread,
        # and this one could still answer before the stop reaches it
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP if hang else signal.SIGSEGV)


def _load(spec: EngineSpec, progress: Callable[[float], None]) -> Backend:
    if spec.kind == "fake":
        from .backends.fake import FakeBackend

        return FakeBackend(n_slots=spec.n_slots or params.DEFAULT_SLOTS, n_ctx_seq=spec.n_ctx_seq, step_delay=spec.fake_delay)
    from .backends.llama import LlamaBackend

    return LlamaBackend(
        Path(spec.model),
        threads=spec.threads,
        gpu_layers=spec.gpu_layers,
        n_slots=spec.n_slots,
        n_ctx_seq=spec.n_ctx_seq,
        kv_budget=spec.kv_budget,
        progress=progress,
        name=spec.name,
    )


def _open_store(spec: EngineSpec, backend: Backend, alive: Callable[[], None]) -> KvStore | None:
    """The agents' sequences on disk (kernel/cores/hibernate.py), indexed; None when the
    spec asks for none, or the directory cannot serve (the engine then runs without)."""
    if not spec.kv_dir or spec.kv_disk <= 0:
        return None
    directory = Path(spec.kv_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        store = KvStore(directory, engine_key(spec.kind, spec.model, backend.info, directory, alive), spec.kv_disk)
        store.open()
    except Exception as exc:  # hibernation is an optimization: the engine serves without it
        log.warning("hibernation is off: cannot use %s: %s: %s", directory, type(exc).__name__, exc)
        return None
    return store


def _serve_calls(channel: Channel, backend: Backend) -> None:
    def tokenize(call: Tokenize) -> list[int]:
        _crash_here("tokenize")
        return backend.tokenize(call.text)

    def chat_prompt(call: ChatPrompt) -> str:
        return backend.chat_prompt(call.messages)

    def chat_tokens(call: ChatTokens) -> list[list[int] | Error]:
        _crash_here("tokenize")
        answers: list[list[int] | Error] = []
        for messages in call.prompts:
            try:
                answers.append(backend.chat_tokens(messages))
            except KernelError as exc:
                answers.append(Error(exc.errno, exc.message))
            except Exception as exc:  # one prompt's failure is its own, not its batch's
                log.exception("a chat template failed")
                answers.append(Error(errno.EIO, f"{type(exc).__name__}: {exc}"))
        return answers

    handlers: dict[type, Callable[[Any], Any]] = {Tokenize: tokenize, ChatPrompt: chat_prompt, ChatTokens: chat_tokens}
    while True:
        try:
            request: Call = channel.recv()
        except (EOFError, OSError):
            return
        handler = handlers.get(type(request))
        try:
            reply: CallReply = Ok(handler(request)) if handler is not None else Error(errno.ENOSYS, f"unknown call {request!r}")
        except KernelError as exc:
            reply = Error(exc.errno, exc.message)
        except Exception as exc:
            log.exception("engine call %s failed", type(request).__name__)
            reply = Error(errno.EIO, f"{type(exc).__name__}: {exc}")
        channel.send(reply)


class _Serving:
    """The child's step channel once it is ready: one handler per message type.

    A step's result goes back while the next step runs on the device, when the next
    plan is already there: `Runner.launch` returns with the last batch queued, the
    result before is sent, then `finish` samples. A result is held only on a device
    that decodes while the host goes on (`queues_decodes`: a GPU; on the CPU,
    llama.cpp decodes before it returns, and holding would delay the daemon's next
    plan by a whole step); only while a plan waits to be read, so the daemon, which
    plans two steps ahead, never waits for one the engine sits on; and never when a
    job ended in it, so a crash in the next step loses no finished job.

    When a step ends and no plan has come, the engine goes on by itself, up to the
    plan's `free_steps` steps, with the same jobs left out: the daemon allows that only
    while nobody waits for a slot, so no decision of the policy is late because of it,
    and a daemon slowed down (a trio thread busy with readers) costs the device nothing.
    Such a step's result says `free`; the daemon applies it like any other.

    With a store, finished sequences go to disk between steps, after the step's result
    has gone: all of them while no plan waits, an overdue one a step while busy."""

    def __init__(self, backend: Backend, steps: Channel, store: KvStore | None = None) -> None:
        self.backend = backend
        self.steps = steps
        self.store = store
        self.runner: Runner | None = None
        self.held: StepResult | None = None
        self.free = 0  # steps the last plan lets this engine take on its own (Plan.free_steps)
        self.left_out: tuple[set[int], set[int]] = (set(), set())  # its paused and held jobs
        self.handlers: dict[type, Callable[[Any], None]] = {RunnerOptions: self.configure, Plan: self.step, Ping: self.ping}

    def serve(self) -> int:
        """Until the daemon says `Stop` or goes; the exit status."""
        while True:
            while self.free and self.runner is not None and self.runner.busy() and not self.steps.waiting():
                self.free -= 1  # the daemon's next plan is late: go on with the same jobs
                self.step(Plan(paused=set(self.left_out[0]), held=set(self.left_out[1])), free=True)
            while self.runner is not None and not self.steps.waiting() and self.runner.hibernate(idle=True):
                pass
            try:
                message: Request = self.steps.recv()
            except EOFError:
                return 0  # the daemon is gone
            if type(message) is not Plan:
                self.send_held()
            if type(message) is Stop:
                return 0
            handler = self.handlers.get(type(message))
            if handler is not None:
                handler(message)

    def configure(self, options: RunnerOptions) -> None:
        self.free = 0
        if self.runner is not None:
            self.runner.close()
        self.runner = Runner(self.backend, options, self.store)

    def step(self, plan: Plan, free: bool = False) -> None:
        _crash_here("step")
        if self.runner is None:
            self.runner = Runner(self.backend, store=self.store)
        if free:
            self.runner.stats["free_steps"] += 1
        else:
            self.free, self.left_out = plan.free_steps, (plan.paused, plan.held)
        self.runner.launch(plan)
        self.send_held()  # while the device works
        result = self.runner.finish()
        result.free = free
        if self.backend.queues_decodes and self.steps.waiting() and not any(end is not None for *_, end in result.outputs):
            self.held = result
        else:
            self.steps.send(result)
        self.runner.hibernate(idle=False)

    def send_held(self) -> None:
        if self.held is not None:
            held, self.held = self.held, None
            self.steps.send(held)

    def ping(self, _: Ping) -> None:  # the watchdog's look at an idle engine
        self.steps.send(PONG)

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()  # with a store: what is not on disk yet goes there
        if self.store is not None:
            self.store.close(params.KV_CLOSE_SECONDS)
        self.backend.close()


def child_main(step_fd: int, call_fd: int) -> int:
    faulthandler.enable()  # a native crash prints the Python stack to stderr, which the daemon keeps
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C at a foreground mount is the daemon's to handle: it stops us
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    steps = Channel(socket.socket(fileno=step_fd))
    calls = Channel(socket.socket(fileno=call_fd))
    spec: EngineSpec = steps.recv()
    last = [-1.0]

    def progress(fraction: float) -> None:
        if fraction - last[0] >= 0.05 or fraction >= 1:
            last[0] = fraction
            steps.send(Progress(fraction))

    _crash_here("load")
    try:
        backend = _load(spec, progress)
    except KernelError as exc:
        steps.send(Error(exc.errno, exc.message))
        return 1
    except Exception as exc:
        log.exception("loading the model failed")
        steps.send(Error(errno.EIO, f"{type(exc).__name__}: {exc}"))
        return 1
    steps.send(Loaded(backend.info))
    store = _open_store(spec, backend, lambda: steps.send(Progress(1.0)))  # hashing a large model: signs of life
    _crash_here("warmup")
    backend.warm_up()  # on this thread: the one that decodes from now on
    threading.Thread(target=_serve_calls, args=(calls, backend), name="engine-calls", daemon=True).start()
    steps.send(Ready(os.getpid()))
    serving = _Serving(backend, steps, store)
    try:
        return serving.serve()
    finally:
        serving.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    return child_main(int(args[0]), int(args[1]))
