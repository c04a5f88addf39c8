"""The engine process: llama.cpp in a process of its own, and the daemon's handle on it.

Native code may crash (an illegal instruction in a build for another CPU, an abort
in a grammar, a bad GGUF, the OOM killer) or hang (a stuck driver); either way it
takes only this process with it. The daemon (kernel/cores/engine.py) keeps
scheduling, storage and the mount, and starts a new engine process.

`python -m kernel.cores.enginehost STEP_FD CALL_FD` is the child
(kernel/cores/enginechild.py). Two socket pairs join it to the daemon
(kernel/cores/channel.py), carrying the messages of kernel/cores/wire.py: on the step
channel the spec, then progress, `Loaded` and `Ready`; then plans and their results,
pings, and `Stop`; on the call channel, served by a thread of its own, the
vocabulary's calls. The KV cache, saved states and samplers never leave the child.

`EngineProcess` is the daemon's side: it starts the child, relays its stderr to the
log (keeping the last lines for the crash report), keeps two plans in flight, turns
a dead child into `EngineDied` with the signal or exit status, and is the watchdog:
no wait on the child is without a deadline (docs/engine.md).
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import params
from ..errors import KernelError
from .backends import BackendInfo
from .channel import Channel
from .combine import Combiner
from .pidfiles import record_pid, stopped
from .wire import (
    PING,
    STOP,
    Call,
    CallReply,
    ChatPrompt,
    ChatTokens,
    EngineSpec,
    Error,
    Loaded,
    Plan,
    Progress,
    Ready,
    Reply,
    RunnerOptions,
    StepResult,
    Tokenize,
)

log = logging.getLogger(__name__)

STDERR_LINES = 40  # lines of the engine's stderr kept for a crash report
_STACK_LINE = re.compile(r"^\s+File |^(Current thread|Thread) 0x|^Extension modules:|^\s*$")  # faulthandler's dump: in the log, not the reason


class EngineDied(Exception):
    """The engine process is gone; `reason` says how (signal or status, last stderr lines)."""

    def __init__(self, reason: str, errno_: int = errno.EIO, hung: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.errno = errno_
        self.hung = hung  # the watchdog killed it: no progress within the deadline


# -- the daemon's side -----------------------------------------------------------------------
class StepTimes:
    """The slowest engine step of the last few windows of steps: what "recent" means for
    the watchdog's deadline. O(1) a step: the engine loop runs thousands a second on a GPU."""

    def __init__(self, window: int = params.ENGINE_DEADLINE_WINDOW, windows: int = params.ENGINE_DEADLINE_WINDOWS) -> None:
        self.window = window
        self._maxima: collections.deque[float] = collections.deque(maxlen=windows)
        self._current = 0.0
        self._count = 0

    def add(self, seconds: float) -> None:
        if seconds > self._current:
            self._current = seconds
        self._count += 1
        if self._count >= self.window:
            self._maxima.append(self._current)
            self._current, self._count = 0.0, 0

    def slowest(self) -> float:
        return max(self._current, *self._maxima) if self._maxima else self._current


class EngineProcess:
    """A supervised engine process. `start` (re)spawns it and returns once it is warm;
    `step` and `ping` are called by one thread, the engine loop; `tokenize` and
    `chat_prompt` by any.

    Every wait on the process has a deadline (`deadline()`): FACTOR x the slowest recent
    step, no less than the floor and no more than CAP_FACTOR floors; loading and warming up get START_FACTOR deadlines between two
    signs of progress. An engine that misses one is hung: the watchdog kills it with
    SIGKILL and the waiter gets `EngineDied` (hung=True) or EIO, whose reason says so.
    The engine loop then handles it as a crash (kernel/cores/engine.py)."""

    def __init__(self, spec: EngineSpec, deadline: float = params.ENGINE_DEADLINE_SECONDS, pid_file: Path | None = None) -> None:
        """`pid_file` keeps the running engine's pid, so that the next daemon can end an
        engine that outlived a daemon that died (a stopped one never reads the EOF)."""
        self.spec = spec
        self.floor = deadline
        self.pid_file = pid_file
        self.info = BackendInfo(spec.name or Path(spec.model).name, spec.kind, spec.model, "cpu", 0, 0, spec.n_slots or 0, spec.n_ctx_seq, 0)
        self.state = "loading"  # loading, ready, hung, restarting, failed, stopped (the engine loop sets hung's successors)
        self.pid: int | None = None
        self.options = RunnerOptions()
        self.hangs = 0  # processes the watchdog killed
        self._hung = ""  # why this process was declared hung ('' while it is not)
        self._abort_at: float | None = None  # the mount stops: a wait still going at this time kills the engine
        self._times = StepTimes()
        self._submitted: collections.deque[float] = collections.deque()  # when each step in flight was sent
        self._collected = 0.0  # when the last step's result came
        self._proc: subprocess.Popen[bytes] | None = None
        self._steps: Channel | None = None
        self._calls: Channel | None = None
        self._configured = False
        self._relay: threading.Thread | None = None
        self._call_lock = threading.Lock()
        self._prompts: Combiner[list[dict[str, str]], list[int]] = Combiner(self._chat_tokens_many)
        self._ready = threading.Condition()
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self.failure = ""  # why the engine is `failed`, for callers
        self.on_exit: Callable[[], None] = lambda: None  # called from the stderr relay when the process ends
        self._left_behind: list[subprocess.Popen[bytes]] = []  # engines that outlived SIGKILL (reaped when they go)

    @property
    def hung(self) -> bool:
        return bool(self._hung)

    def deadline(self) -> float:
        """Seconds an engine may take to answer a step, a call or a ping before it is hung:
        FACTOR x the slowest recent step, within [floor, CAP_FACTOR x floor]."""
        measured = params.ENGINE_DEADLINE_FACTOR * self._times.slowest()
        return min(max(self.floor, measured), params.ENGINE_DEADLINE_CAP_FACTOR * self.floor)

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
        self._hung, self._abort_at = "", None
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
        if self.pid_file is not None:
            record_pid(self.pid_file, self.pid)
        self._steps, self._calls = Channel(step_parent), Channel(call_parent)
        self._relay = threading.Thread(target=self._relay_stderr, args=(self._proc,), name=f"engine-{self.pid}-stderr", daemon=True)
        self._relay.start()
        self._configured = False
        self._submitted.clear()
        self._collected = 0.0
        patience = params.ENGINE_START_DEADLINE_FACTOR * self.floor
        phase = "loading the model"
        warming = time.monotonic()
        try:
            self._send(self._steps, self.spec, patience, phase, time.monotonic())
            while True:
                message: Reply = self._wait(self._steps, patience, phase)
                match message:
                    case Progress(fraction) if progress is not None:
                        progress(fraction)
                    case Loaded(info):
                        self.info = info
                        phase = "warming up"
                        warming = time.monotonic()
                    case Error(code, text):
                        self._reap()
                        raise EngineDied(text, code)
                    case Ready():
                        # the warm-up decode, first-run costs and all, is the first measure of a
                        # step: a large model on a CPU gets a deadline to match before any step
                        self._times.add(time.monotonic() - warming)
                        break
        except (EOFError, OSError):
            reason = self._death_reason()
            self._reap()
            raise EngineDied(reason) from None
        except EngineDied:
            self._reap()
            raise
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

    # Two plans in flight: the engine finds the next plan waiting when it ends a step, so
    # it steps back to back while the daemon applies one step's results and plans the
    # step after next. The daemon's decisions thus reach the engine one step late, which
    # the runner allows for (a key that ended meanwhile is skipped) and so does the
    # engine loop (output of a job it has switched out meanwhile still reaches it).
    depth = 2

    def submit(self, plan: Plan) -> None:
        """Queue a step behind those in flight (within the deadline: a stopped engine
        stops reading)."""
        assert self._steps is not None
        now = time.monotonic()
        try:
            if not self._configured:
                self._send(self._steps, self.options, self.deadline(), "a step", now)
                self._configured = True
            self._send(self._steps, plan, self.deadline(), "a step", now)
        except (EOFError, OSError):
            raise EngineDied(self._death_reason(), hung=self.hung) from None
        self._submitted.append(now)

    def collect(self) -> StepResult:
        """The next step's result: the oldest step in flight, or one the engine took on its
        own before it (`free`). Its deadline runs from when the engine could start it: the
        oldest submission, or the end of the step before it."""
        assert self._steps is not None
        since = max(self._submitted[0], self._collected)
        try:
            result: StepResult = self._wait(self._steps, self.deadline(), "a step", since)
        except (EOFError, OSError):
            raise EngineDied(self._death_reason(), hung=self.hung) from None
        if not result.free:  # one the engine took on its own (Plan.free_steps) answers no plan
            self._submitted.popleft()
        self._collected = time.monotonic()
        self._times.add(self._collected - since)
        return result

    def ping(self) -> None:
        """Ask an idle engine for a sign of life; EngineDied (hung) when none comes in time."""
        assert self._steps is not None
        started = time.monotonic()
        try:
            self._send(self._steps, PING, self.deadline(), "an idle look", started)
            self._wait(self._steps, self.deadline(), "an idle look", started)
        except (EOFError, OSError):
            raise EngineDied(self._death_reason(), hung=self.hung) from None

    def _send(self, channel: Channel, message: Any, seconds: float, what: str, since: float) -> None:
        """Send within the deadline (a stopped engine stops reading, and a large plan fills
        the socket's buffer); EngineDied (hung=True) past it."""
        try:
            channel.send(message, since + seconds)
        except TimeoutError:
            self.declare_hung(what, time.monotonic() - since)
            raise EngineDied(self._hung, hung=True) from None

    def _wait(self, channel: Channel, seconds: float, what: str, since: float | None = None) -> Any:
        """The next message, or EngineDied (hung=True) once `seconds` passed without one:
        the engine is killed first. A stopping mount's wait ends sooner (`interrupt`), and
        so does one on a process stopped by a signal, once the floor has passed: a stopped
        process is not slow, whatever the recent steps say."""
        since = time.monotonic() if since is None else since

        def check() -> None:
            now = time.monotonic()
            if self._abort_at is not None and now >= self._abort_at:
                self._kill()
                raise EngineDied("stopped with the mount: it did not finish its step in time")
            if now - since >= self.floor and self.pid is not None and stopped(self.pid, traced=False):
                self.declare_hung(what, now - since, "its process is stopped")
                raise EngineDied(self._hung, hung=True)

        try:
            return channel.recv(since + seconds, check)
        except TimeoutError:
            self.declare_hung(what, time.monotonic() - since)
            raise EngineDied(self._hung, hung=True) from None

    def declare_hung(self, what: str, seconds: float, why: str = "") -> None:
        """The watchdog's verdict: no progress for `seconds` while waiting for `what`. The
        engine is killed now (SIGKILL: a stopped or stuck process ignores anything else)."""
        with self._ready:
            if self._hung or self._proc is None:
                return
            self._hung = f"the engine hung: no progress for {seconds:.0f} s ({what}); killed"
            self.hangs += 1
            self.state, self.failure = "hung", ""
            self._ready.notify_all()
            pid = self._proc.pid
        log.error("engine %s (pid %d) hung: no progress for %.1f s (%s%s); killing it", self.info.name, pid, seconds, what, f"; {why}" if why else "")
        self._kill()

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def interrupt(self) -> None:
        """The mount stops: end a start-up now, and a step still running after a grace."""
        if self.state != "ready":
            self._kill()
        else:
            self._abort_at = time.monotonic() + params.ENGINE_STOP_GRACE_SECONDS

    def close(self) -> None:
        """Stop the engine: ask, then wait, then kill (a stopped one at once)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None and self._steps is not None and not stopped(proc.pid):
            try:
                self._steps.send(STOP, time.monotonic() + params.ENGINE_STOP_SECONDS)
                proc.wait(timeout=params.ENGINE_STOP_SECONDS)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._reap()
        if self.pid_file is not None and not self._left_behind:
            self.pid_file.unlink(missing_ok=True)
        self.set_state("stopped")

    def _reap(self) -> None:
        for channel in (self._steps, self._calls):
            if channel is not None:
                channel.close()
        self._steps = self._calls = None
        self._left_behind = [p for p in self._left_behind if p.poll() is None]
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=params.ENGINE_KILL_WAIT_SECONDS)
        except subprocess.TimeoutExpired:  # in the kernel (a driver): it goes when it can; we do not wait for it
            log.error(
                "engine %s (pid %d) is still there %.0f s after SIGKILL; left behind", self.info.name, proc.pid, params.ENGINE_KILL_WAIT_SECONDS
            )
            self._left_behind.append(proc)
            return
        if self._relay is not None:
            self._relay.join(timeout=5)  # it reads the last lines before the pipe is closed under it
        if proc.stderr is not None:
            proc.stderr.close()

    # -- the vocabulary (any thread) ------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self._call(Tokenize(text))

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        return self._call(ChatPrompt([dict(m) for m in messages]))

    def chat_tokens(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Prompts that come while one is on the wire go in one round trip (many agents
        write prompts at once). A caller waits for the batch before its own and its own,
        two calls of at most two deadlines each."""
        try:
            return self._prompts.call([dict(m) for m in messages], 4 * self.deadline() + 1)
        except TimeoutError:
            raise KernelError(errno.EIO, f"the engine of model {self.info.name!r} answered no prompt's tokens in time; try again shortly") from None

    def _chat_tokens_many(self, prompts: list[list[dict[str, str]]]) -> list[list[int] | KernelError]:
        answers: list[list[int] | Error] = self._call(ChatTokens(prompts))
        return [KernelError(a.errno, a.message) if isinstance(a, Error) else a for a in answers]

    def _call(self, call: Call) -> Any:
        """A call on the call channel: a restarting engine is waited for (one deadline at
        most), and a call that the engine died in is made again on the next one; a failed
        engine is EIO now, and so is one that does not answer within a deadline (it is
        hung). So a call takes at most two deadlines, one only when the engine serves."""
        deadline = self.deadline()
        until = time.monotonic() + deadline
        dead: int | None = None  # the pid of an engine that died under this call
        while True:
            with self._ready:
                while self.state != "ready" or self.pid == dead:
                    if self.state in ("failed", "stopped"):
                        raise KernelError(errno.EIO, self.failure or f"the engine of model {self.info.name!r} is {self.state}")
                    left = until - time.monotonic()
                    if left <= 0:
                        raise KernelError(
                            errno.EIO, f"the engine of model {self.info.name!r} is {self.state} (waited {deadline:.0f} s); try again shortly"
                        )
                    self._ready.wait(left)
                calls, pid = self._calls, self.pid
            if not self._call_lock.acquire(timeout=max(until - time.monotonic(), 0)):
                raise KernelError(errno.EIO, f"the engine of model {self.info.name!r} answered no call for {deadline:.0f} s; try again shortly")
            started = time.monotonic()
            try:
                if calls is None:
                    raise EOFError
                # the engine gets a whole deadline to answer, however long this call waited
                # for it to be ready: the verdict "hung" is about the engine, not the caller
                self._send(calls, call, deadline, f"a {call.name} call", started)
                reply: CallReply = self._wait(calls, deadline, f"a {call.name} call", started)
            except EngineDied as exc:
                raise KernelError(errno.EIO, exc.reason) from None
            except (EOFError, OSError):
                dead = pid
                continue
            finally:
                self._call_lock.release()
            if isinstance(reply, Error):
                raise KernelError(reply.errno, reply.message)
            return reply.value

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
        """How the engine ended: hung (the watchdog killed it), or its signal or exit
        status, and its last stderr lines."""
        if self._hung:
            return self._hung
        proc = self._proc
        if proc is None:
            return "the engine process is gone"
        try:
            code = proc.wait(timeout=params.ENGINE_KILL_WAIT_SECONDS)
        except subprocess.TimeoutExpired:  # the channel broke but it lives: end it
            proc.kill()
            try:
                code = proc.wait(timeout=params.ENGINE_KILL_WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                return "the engine's channel broke and it outlived SIGKILL"
        if self._relay is not None:
            self._relay.join(timeout=2)  # what it wrote last is in the tail
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        tail = " | ".join([line for line in self.stderr_tail if not _STACK_LINE.match(line)][-3:])
        return how + (f"; its last words: {tail}" if tail else "")


def main(argv: list[str] | None = None) -> int:
    """The engine process (kernel/cores/enginechild.py): its command line names this module."""
    from .enginechild import main as child

    return child(argv)


if __name__ == "__main__":
    sys.exit(main())
