"""Agent processes: the command of a manifest, run as the agent's owner and kept running.

Each process is a task in the supervisor's nursery. It runs in a session of its own,
so a stop reaches everything it started, with stdin from /dev/null and stdout and
stderr appended to `<state>/agents-logs/NAME.log`. When it exits it is started again
per its restart policy (`always`, `on-failure`, `never`) after a wait that doubles
from AGENT_RESTART_MIN_SECONDS up to AGENT_RESTART_MAX_SECONDS and starts over once
a run lasted AGENT_RESTART_RESET_SECONDS. Stopping it is SIGTERM to its process
group, then SIGKILL after AGENT_STOP_SECONDS; whatever a process leaves running in
its group when it ends is killed too.

States, as `kernel/ps` shows them: `running`; `backoff` (waiting to start again);
`exited` (ended, and its policy does not restart it); `stopped` (stopped by the
kernel).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from kernel import params

log = logging.getLogger(__name__)

RESTART_POLICIES = ("always", "on-failure", "never")

Report = Callable[..., None]  # kernel.log_event: (kind, **fields)


@dataclass(frozen=True)
class ProcessSpec:
    """How to run one agent process."""

    argv: tuple[str, ...]
    cwd: Path
    env: tuple[tuple[str, str], ...]
    uid: int | None = None  # None: as the daemon's own user
    gid: int | None = None
    restart: str = "on-failure"

    def launch(self) -> tuple[Any, ...]:
        """What the running process was started with: a change needs a restart (the
        restart policy does not)."""
        return (self.argv, self.cwd, self.env, self.uid, self.gid)


class AgentProcess:
    """One supervised command: started, restarted per its policy, stopped on request."""

    def __init__(self, name: str, spec: ProcessSpec, log_path: Path, report: Report) -> None:
        self.name = name
        self.spec = spec
        self.log_path = log_path
        self.report = report
        self.state = "backoff"  # until the first start
        self.pid: int | None = None
        self.restarts = 0
        self.delays: list[float] = []  # each wait before a restart, in order
        self.returncode: int | None = None  # of the last run; negative: killed by that signal
        self._scope = trio.CancelScope()
        self._done = trio.Event()

    async def run(self) -> None:
        """Supervise until the policy says it is over or stop() is called."""
        try:
            with self._scope:
                await self._supervise()
        finally:
            if self.state != "exited":
                self.state = "stopped"
                self.report("proc", agent=self.name, action="stop", status=self.returncode)
            self.pid = None
            self._done.set()

    async def stop(self) -> None:
        """Terminate the process (SIGTERM, then SIGKILL) and wait until it is gone."""
        self._scope.cancel()
        await self._done.wait()

    async def _supervise(self) -> None:
        delay = params.AGENT_RESTART_MIN_SECONDS
        while True:
            started = trio.current_time()
            self.returncode = await self._run_once()
            if not self._restarts_after(self.returncode):
                self.state = "exited"
                self.report("proc", agent=self.name, action="exit", status=self.returncode, restart_in=None)
                return
            if trio.current_time() - started >= params.AGENT_RESTART_RESET_SECONDS:
                delay = params.AGENT_RESTART_MIN_SECONDS  # it ran well for a while: this is a new failure
            self.state = "backoff"
            self.delays.append(delay)
            self.report("proc", agent=self.name, action="exit", status=self.returncode, restart_in=delay)
            await trio.sleep(delay)
            delay = min(delay * 2, params.AGENT_RESTART_MAX_SECONDS)
            self.restarts += 1

    def _restarts_after(self, returncode: int | None) -> bool:
        if self.spec.restart == "always":
            return True
        return self.spec.restart == "on-failure" and returncode != 0

    async def _run_once(self) -> int | None:
        """Start the command and wait for its end: the exit status (negative: the
        signal that killed it), or None when it could not be started."""
        fd = self._open_log()
        try:
            try:
                proc = await trio.lowlevel.open_process(
                    list(self.spec.argv),
                    stdin=subprocess.DEVNULL,
                    stdout=fd,
                    stderr=fd,
                    cwd=self.spec.cwd,
                    env=dict(self.spec.env),
                    start_new_session=True,  # its own process group: a stop reaches its children
                    **self._identity(),
                )
            except OSError as exc:
                self._note(fd, f"cannot start {list(self.spec.argv)}: {exc}")
                self.report("proc", agent=self.name, action="error", message=f"cannot start {list(self.spec.argv)}: {exc}")
                return None
        finally:
            os.close(fd)
        self.pid, self.state = proc.pid, "running"
        self.report("proc", agent=self.name, action="start", pid=proc.pid, uid=self.spec.uid if self.spec.uid is not None else os.geteuid())
        try:
            await proc.wait()
        finally:
            with trio.CancelScope(shield=True):  # a stop must still end the process
                await self._terminate(proc)
            self.pid, self.returncode = None, proc.returncode
        self._note_exit(proc.returncode)
        return proc.returncode

    def _identity(self) -> dict[str, Any]:
        if self.spec.uid is None:
            return {}
        return {"user": self.spec.uid, "group": self.spec.gid, "extra_groups": []}  # only the owner's rights, not root's groups

    async def _terminate(self, proc: trio.Process) -> None:
        if proc.returncode is None:
            _kill_group(proc.pid, signal.SIGTERM)
            with trio.move_on_after(params.AGENT_STOP_SECONDS):
                await proc.wait()
            if proc.returncode is None:
                _kill_group(proc.pid, signal.SIGKILL)
                await proc.wait()
        _kill_group(proc.pid, signal.SIGKILL)  # what it left running in its group

    def _open_log(self) -> int:
        """The log file, rotated when it grew past AGENT_LOG_BYTES; /dev/null if it cannot be opened."""
        try:
            self.log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if self.log_path.exists() and self.log_path.stat().st_size > params.AGENT_LOG_BYTES:
                os.replace(self.log_path, self.log_path.with_name(self.log_path.name + ".1"))
            return os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.error("cannot open the log %s of agent %s: %s", self.log_path, self.name, exc)
            return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)

    def _note(self, fd: int, text: str) -> None:
        """A line of the supervisor's own in the process's log."""
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        try:
            os.write(fd, f"aiosfs {stamp}: {text}\n".encode())
        except OSError:
            pass

    def _note_exit(self, returncode: int | None) -> None:
        fd = self._open_log()
        try:
            how = f"killed by signal {-returncode}" if returncode is not None and returncode < 0 else f"exited with status {returncode}"
            self._note(fd, f"{' '.join(self.spec.argv)} {how}")
        finally:
            os.close(fd)


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already


class Supervisor:
    """The agent processes, by agent name."""

    def __init__(self, logs: Path, report: Report) -> None:
        self.logs = logs
        self.report = report
        self.processes: dict[str, AgentProcess] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery the processes run in; cancelling it stops every one of them."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def start(self, name: str, spec: ProcessSpec) -> AgentProcess:
        if self._nursery is None:
            raise RuntimeError("the supervisor is not running")
        if name in self.processes:
            raise RuntimeError(f"agent {name!r} already has a process")
        proc = AgentProcess(name, spec, self.logs / f"{name}.log", self.report)
        self.processes[name] = proc
        self._nursery.start_soon(proc.run)
        return proc

    async def stop(self, name: str) -> None:
        proc = self.processes.pop(name, None)
        if proc is not None:
            await proc.stop()

    def get(self, name: str) -> AgentProcess | None:
        return self.processes.get(name)
