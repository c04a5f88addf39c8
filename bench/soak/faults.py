"""The fault injector: every MIN-MAX seconds (random, seeded) a SIGKILL, SIGSEGV or
SIGSTOP (each kind once per round of kinds, in a random order) to the engine process that `kernel/status` names, then a bounded wait for the
engine to be `ready` again with a new pid before the next one.

A SIGSTOP is the fault that matters most (pitfall 36): a frozen engine is not a dead one,
and only the watchdog's deadline can tell. The soak never resumes a stopped engine
itself; `resume_stopped()` is the safety net at the very end, and what it finds is a failure.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from .proc import Mount, alive, descendants, proc_state, wait_until

SIGNALS = {"kill": signal.SIGKILL, "segv": signal.SIGSEGV, "stop": signal.SIGSTOP}


@dataclass
class Fault:
    kind: str
    pid: int
    at: float  # seconds into the soak
    recovered_after: float | None = None  # seconds until `ready` with a new pid; None: never (within the bound)
    new_pid: int | None = None
    states: list[str] = field(default_factory=list)  # engine states seen on the way back, in order
    note: str = ""


class Injector:
    def __init__(
        self,
        mount: Mount,
        kinds: list[str],
        interval: tuple[float, float],
        limit: int | None,
        rng: random.Random,
        recover_timeout: Callable[[], float],
        started: float,
        say: Callable[[str], None],
    ) -> None:
        self.mount, self.kinds, self.interval, self.limit, self.rng = mount, kinds, interval, limit, rng
        self.recover_timeout = recover_timeout  # seconds to wait for a restart: follows the deadline the mount shows
        self.started, self.say = started, say
        self.faults: list[Fault] = []
        self.problems: list[str] = []
        self._deck: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="soak-faults", daemon=True)

    def counts(self) -> dict[str, int]:
        return dict(Counter(f.kind for f in self.faults))

    def _run(self) -> None:
        try:
            while self.limit is None or len(self.faults) < self.limit:
                if self.stop.wait(self.rng.uniform(*self.interval)):
                    return
                self._inject()
        except Exception as exc:  # reported, never silent
            self.problems.append(f"the fault injector died: {type(exc).__name__}: {exc}")

    def _inject(self) -> None:
        status = self.mount.status()
        if status.engine != "ready" or status.pid is None:
            if not wait_until(lambda: self.mount.status().engine == "ready", self.recover_timeout(), 0.2):
                self.problems.append(f"no fault at {self._now():.0f} s: the engine was not ready within {self.recover_timeout():.0f} s")
                return
            status = self.mount.status()
        pid = status.pid
        if pid is None or pid not in descendants(self.mount.daemon):
            self.problems.append(f"kernel/status names engine pid {pid}, which is no child of the daemon {self.mount.daemon}: no fault sent")
            return
        if not self._deck:  # each kind once per round, in a random order: a short soak sees them all
            self._deck = self.rng.sample(self.kinds, len(self.kinds))
        kind = self._deck.pop()
        fault = Fault(kind, pid, self._now())
        os.kill(pid, SIGNALS[kind])
        self.faults.append(fault)
        self.say(f"fault {len(self.faults)}: SIG{kind.upper()} to engine pid {pid} at {fault.at:.0f} s")
        self._await_restart(fault, status.fields.get("model", ""))

    def _await_restart(self, fault: Fault, model: str) -> None:
        sent = time.monotonic()
        bound = self.recover_timeout()
        retried = False
        while time.monotonic() - sent < bound:
            status = self.mount.status()
            seen = f"{status.engine}" + (" (same pid)" if status.pid == fault.pid else "")
            if not fault.states or fault.states[-1] != seen:
                fault.states.append(seen)
            if status.engine == "ready" and status.pid not in (None, fault.pid):
                fault.recovered_after, fault.new_pid = time.monotonic() - sent, status.pid
                break
            if status.engine == "failed" and not retried:
                fault.note = f"the engine was marked failed (a crash loop); the soak wrote 'retry {model}' to kernel/ctl"
                self.problems.append(f"fault {len(self.faults)} ({fault.kind}): {fault.note}")
                self.say(fault.note)
                with open(self.mount.root / "kernel" / "ctl", "w") as ctl:
                    ctl.write(f"retry {model}\n")
                retried = True
            time.sleep(0.2)
        if fault.recovered_after is None:
            self.problems.append(f"fault {len(self.faults)} ({fault.kind}, pid {fault.pid}): no engine ready with a new pid within {bound:.0f} s")
            return
        self.say(f"  back: engine pid {fault.new_pid} ready after {fault.recovered_after:.1f} s ({' -> '.join(fault.states)})")
        if not wait_until(lambda: not alive(fault.pid), 5):
            self.problems.append(
                f"fault {len(self.faults)} ({fault.kind}): the old engine pid {fault.pid} still lives ({proc_state(fault.pid)}) after the restart"
            )

    def resume_stopped(self) -> list[str]:
        """The safety net: SIGCONT to every engine this soak stopped that is still stopped."""
        found = []
        for fault in self.faults:
            if fault.kind == "stop" and proc_state(fault.pid) in ("T", "t"):
                found.append(f"the engine pid {fault.pid} stopped at {fault.at:.0f} s was still stopped at the end: SIGCONT sent")
                os.kill(fault.pid, signal.SIGCONT)
        return found

    def _now(self) -> float:
        return time.monotonic() - self.started
