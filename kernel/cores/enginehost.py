"""The engine process: llama.cpp in a process of its own, and the daemon's handle on it.

Native code may crash (an illegal instruction in a build for another CPU, an abort
in a grammar, a bad GGUF, the OOM killer); when it does, it takes only this process
with it. The daemon (kernel/cores/engine.py) keeps scheduling, storage and the mount, and
starts a new engine process.

`python -m kernel.enginehost STEP_FD CALL_FD` is the child. Two socket pairs join it
to the daemon, each carrying length-prefixed pickles:
- the step channel, strictly one request one answer: the `EngineSpec` first; the
  child answers `("progress", f)`…, `("loaded", BackendInfo)` and `("ready", pid)`
  once a warm-up decode ran (or `("error", errno, message)` and exits 1). Then
  `("configure", RunnerOptions)` and `("step", Plan)` → `("step", StepResult)`, one
  message each way per engine step, never per token; `("stop",)` ends it.
- the call channel, served by a second thread so that it never waits for a step:
  `("tokenize", text)` and `("chat_prompt", messages)` → `("ok", value)` or
  `("error", errno, message)`.
The KV cache, saved states and samplers never leave the child.

`ProcessCore` is the daemon's side: it starts the child, relays its stderr to the
log (keeping the last lines for the crash report), and turns a dead child into
`EngineDied` with the signal or exit status. `InlineCore` runs the same runner in
this process, for tests and the in-process benchmarks.
"""

from __future__ import annotations

import collections
import errno
import faulthandler
import logging
import os
import pickle
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import params
from ..errors import KernelError
from .backends import Backend, BackendInfo
from .runner import Plan, Runner, RunnerOptions, StepResult

log = logging.getLogger(__name__)

CRASH_ENV = "AIOSFS_TEST_ENGINE_CRASH"  # tests only: `load` or `warmup`, optionally `@PATH` (only while PATH exists)
STDERR_LINES = 40  # lines of the engine's stderr kept for a crash report
_STACK_LINE = re.compile(r"^\s+File |^(Current thread|Thread) 0x|^Extension modules:|^\s*$")  # faulthandler's dump: in the log, not the reason


class EngineDied(Exception):
    """The engine process is gone; `reason` says how (signal or status, last stderr lines)."""

    def __init__(self, reason: str, errno_: int = errno.EIO) -> None:
        super().__init__(reason)
        self.reason = reason
        self.errno = errno_


@dataclass(frozen=True)
class EngineSpec:
    """What the child loads: a GGUF file through llama.cpp, or the fake model (tests)."""

    kind: str  # "llama" or "fake"
    model: str = ""
    name: str = ""
    threads: int | None = None
    gpu_layers: int | None = None
    n_slots: int | None = None  # None: as many as kv_budget holds (the fake model: DEFAULT_SLOTS)
    n_ctx_seq: int = params.DEFAULT_CTX_PER_SLOT
    kv_budget: int = params.KV_BUDGET_BYTES
    fake_delay: float = 0.0


# -- framing ---------------------------------------------------------------------------------
class Channel:
    """Length-prefixed pickles over a stream socket. Both ends are this project's code."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.sock.sendall(struct.pack("<Q", len(data)) + data)

    def recv(self) -> Any:
        (size,) = struct.unpack("<Q", self._exactly(8))
        return pickle.loads(self._exactly(size))

    def _exactly(self, n: int) -> bytes:
        parts = bytearray()
        while len(parts) < n:
            chunk = self.sock.recv(min(n - len(parts), 1 << 20))
            if not chunk:
                raise EOFError("the other end closed the channel")
            parts += chunk
        return bytes(parts)

    def close(self) -> None:
        self.sock.close()


# -- the child -------------------------------------------------------------------------------
def _crash_here(point: str) -> None:
    """Tests: die with SIGSEGV at `point` when AIOSFS_TEST_ENGINE_CRASH asks for it."""
    wanted, _, path = os.environ.get(CRASH_ENV, "").partition("@")
    if wanted == point and (not path or os.path.exists(path)):
        sys.stderr.write(f"engine: crashing at {point} on purpose ({CRASH_ENV})\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSEGV)


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


def _serve_calls(channel: Channel, backend: Backend) -> None:
    while True:
        try:
            request = channel.recv()
        except (EOFError, OSError):
            return
        try:
            if request[0] == "tokenize":
                reply: tuple[Any, ...] = ("ok", backend.tokenize(request[1]))
            elif request[0] == "chat_prompt":
                reply = ("ok", backend.chat_prompt(request[1]))
            else:
                reply = ("error", errno.ENOSYS, f"unknown call {request[0]!r}")
        except KernelError as exc:
            reply = ("error", exc.errno, exc.message)
        except Exception as exc:
            log.exception("engine call %s failed", request[0])
            reply = ("error", errno.EIO, f"{type(exc).__name__}: {exc}")
        channel.send(reply)


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
            steps.send(("progress", fraction))

    _crash_here("load")
    try:
        backend = _load(spec, progress)
    except KernelError as exc:
        steps.send(("error", exc.errno, exc.message))
        return 1
    except Exception as exc:
        log.exception("loading the model failed")
        steps.send(("error", errno.EIO, f"{type(exc).__name__}: {exc}"))
        return 1
    steps.send(("loaded", backend.info))
    _crash_here("warmup")
    backend.warm_up()  # on this thread: the one that decodes from now on
    threading.Thread(target=_serve_calls, args=(calls, backend), name="engine-calls", daemon=True).start()
    steps.send(("ready", os.getpid()))
    runner: Runner | None = None
    try:
        while True:
            try:
                message = steps.recv()
            except EOFError:
                return 0  # the daemon is gone
            if message[0] == "configure":
                if runner is not None:
                    runner.close()
                runner = Runner(backend, message[1])
            elif message[0] == "step":
                if runner is None:
                    runner = Runner(backend)
                steps.send(("step", runner.step(message[1])))
            elif message[0] == "stop":
                return 0
    finally:
        if runner is not None:
            runner.close()
        backend.close()


# -- the daemon's side -----------------------------------------------------------------------
class InlineCore:
    """The runner in this process, on the engine thread (tests, in-process benchmarks)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.info = backend.info
        self.state = "loading"
        self.failure = ""
        self.pid = os.getpid()
        self._runner = Runner(backend)

    def set_state(self, state: str, failure: str = "") -> None:
        self.state, self.failure = state, failure

    def alive(self) -> bool:
        return True

    def death_reason(self) -> str:
        return ""

    def configure(self, options: RunnerOptions) -> None:
        self._runner = Runner(self.backend, options)

    def start(self, progress: Callable[[float], None] | None = None) -> None:
        if self.state != "ready":
            self.backend.warm_up()
            self.state = "ready"

    def step(self, plan: Plan) -> StepResult:
        return self._runner.step(plan)

    def interrupt(self) -> None:
        return None

    def close(self) -> None:
        self._runner.close()
        self.backend.close()


class ProcessCore:
    """A supervised engine process. `start` (re)spawns it and returns once it is warm;
    `step` is called by one thread, the engine loop; `tokenize` and `chat_prompt` by any."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.info = BackendInfo(spec.name or Path(spec.model).name, spec.kind, spec.model, "cpu", 0, 0, spec.n_slots or 0, spec.n_ctx_seq, 0)
        self.state = "loading"  # loading, ready, restarting, failed (the engine loop sets the last two)
        self.pid: int | None = None
        self.options = RunnerOptions()
        self._proc: subprocess.Popen[bytes] | None = None
        self._steps: Channel | None = None
        self._calls: Channel | None = None
        self._configured = False
        self._relay: threading.Thread | None = None
        self._call_lock = threading.Lock()
        self._ready = threading.Condition()
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self.failure = ""  # why the engine is `failed`, for callers
        self.on_exit: Callable[[], None] = lambda: None  # called from the stderr relay when the process ends

    # -- life cycle ---------------------------------------------------------------------
    def start(self, progress: Callable[[float], None] | None = None) -> None:
        """Spawn the engine and wait until it has loaded the model and decoded once."""
        self._reap()
        step_parent, step_child = socket.socketpair()
        call_parent, call_child = socket.socketpair()
        argv = [sys.executable, "-m", "kernel.cores.enginehost", str(step_child.fileno()), str(call_child.fileno())]
        source_root = str(Path(__file__).resolve().parents[2])  # the directory that holds the kernel package
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source_root, os.environ.get("PYTHONPATH")]))}
        self.stderr_tail.clear()
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=(step_child.fileno(), call_child.fileno()),
            env=env,
        )
        step_child.close()
        call_child.close()
        self.pid = self._proc.pid
        self._steps, self._calls = Channel(step_parent), Channel(call_parent)
        self._relay = threading.Thread(target=self._relay_stderr, args=(self._proc,), name=f"engine-{self.pid}-stderr", daemon=True)
        self._relay.start()
        self._configured = False
        try:
            self._steps.send(self.spec)
            while True:
                message = self._steps.recv()
                if message[0] == "progress" and progress is not None:
                    progress(message[1])
                elif message[0] == "loaded":
                    self.info = message[1]
                elif message[0] == "error":
                    self._reap()
                    raise EngineDied(message[2], message[1])
                elif message[0] == "ready":
                    break
        except (EOFError, OSError):
            reason = self._death_reason()
            self._reap()
            raise EngineDied(reason) from None
        with self._ready:
            self.state = "ready"
            self._ready.notify_all()

    def set_state(self, state: str, failure: str = "") -> None:
        with self._ready:
            self.state, self.failure = state, failure
            self._ready.notify_all()

    def configure(self, options: RunnerOptions) -> None:
        self.options = options
        self._configured = False

    def step(self, plan: Plan) -> StepResult:
        assert self._steps is not None
        try:
            if not self._configured:
                self._steps.send(("configure", self.options))
                self._configured = True
            self._steps.send(("step", plan))
            return self._steps.recv()[1]
        except (EOFError, OSError):
            raise EngineDied(self._death_reason()) from None

    def interrupt(self) -> None:
        """End a start-up in progress (unmount while the model loads)."""
        if self.state != "ready" and self._proc is not None and self._proc.poll() is None:
            self._proc.kill()

    def close(self) -> None:
        """Stop the engine: ask, then wait, then kill."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None and self._steps is not None:
            try:
                self._steps.send(("stop",))
                proc.wait(timeout=params.ENGINE_STOP_SECONDS)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
        self._reap()
        self.set_state("stopped")

    def _reap(self) -> None:
        for channel in (self._steps, self._calls):
            if channel is not None:
                channel.close()
        self._steps = self._calls = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            if self._relay is not None:
                self._relay.join(timeout=5)  # it reads the last lines before the pipe is closed under it
            if self._proc.stderr is not None:
                self._proc.stderr.close()
            self._proc = None

    # -- the vocabulary (any thread) ------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self._call("tokenize", text)

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        return self._call("chat_prompt", [dict(m) for m in messages])

    def _call(self, name: str, argument: Any) -> Any:
        """A call on the call channel. A restarting engine is waited for, and a call that
        the engine died in is made again on the next one; a failed engine is EIO now."""
        deadline = time.monotonic() + params.ENGINE_CALL_WAIT_SECONDS
        dead: int | None = None  # the pid of an engine that died under this call
        while True:
            with self._ready:
                while self.state != "ready" or self.pid == dead:
                    if self.state in ("failed", "stopped"):
                        raise KernelError(errno.EIO, self.failure or f"the engine of model {self.info.name!r} is {self.state}")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise KernelError(errno.EIO, f"the engine of model {self.info.name!r} is {self.state}; try again shortly")
                    self._ready.wait(left)
                calls, pid = self._calls, self.pid
            try:
                with self._call_lock:
                    if calls is None:
                        raise EOFError
                    calls.send((name, argument))
                    reply = calls.recv()
            except (EOFError, OSError):
                dead = pid
                continue
            if reply[0] == "error":
                raise KernelError(reply[1], reply[2])
            return reply[1]

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def death_reason(self) -> str:
        return self._death_reason()

    # -- crash reports ----------------------------------------------------------------------
    def _relay_stderr(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.stderr_tail.append(line)
                level = logging.ERROR if line.startswith(("ERROR ", "CRITICAL ")) else logging.WARNING  # the child's own records keep their weight
                log.log(level, "engine %s (pid %d): %s", self.info.name, proc.pid, line)
        if proc is self._proc:  # it exited (or closed stderr): the supervisor looks now, not at the next step
            self.on_exit()

    def _death_reason(self) -> str:
        """How the engine ended: its signal or exit status, and its last stderr lines."""
        proc = self._proc
        if proc is None:
            return "the engine process is gone"
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # the channel broke but it lives: end it
            proc.kill()
            code = proc.wait()
        if self._relay is not None:
            self._relay.join(timeout=2)  # what it wrote last is in the tail
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        tail = " | ".join([line for line in self.stderr_tail if not _STACK_LINE.match(line)][-3:])
        return how + (f"; its last words: {tail}" if tail else "")


Core = InlineCore | ProcessCore


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    return child_main(int(args[0]), int(args[1]))


if __name__ == "__main__":
    sys.exit(main())
