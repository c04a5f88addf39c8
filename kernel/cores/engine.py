"""The engine: the scheduling side of the local LLM core, and its supervisor.

One thread (the engine loop) plans each step under the scheduling policy (which jobs
are cancelled, paused, held back, switched out or admitted), sends that `Plan` to the
runner (kernel/cores/runner.py, in the engine process of kernel/cores/enginehost.py)
through the engine client (kernel/cores/client.py) and sends the step's text to the
way back (the core set's results channel) through `TrioToken.run_sync_soon`.

Words: a *core* is what serves one model's queue (this class, or a remote server:
`kernel.types.Core`); the *engine* is this scheduling side with the process it drives;
a *backend* is what runs the model inside that process (llama.cpp, or the fake model);
the *runtime* handed to this class is either a backend, run in this process, or an
engine process.

When the engine process dies, whatever the cause (a bug in this loop counts as one),
the jobs in it (running, or switched out with their state inside it) end with EIO
and the reason; queued jobs stay queued, and run on a new process started after a
backoff. `ENGINE_CRASH_LOOP` crashes within `ENGINE_CRASH_WINDOW_SECONDS`, with no
engine between them that served `ENGINE_STABLE_SECONDS`, mark the core `failed`
(EIO naming the reason) until `retry()` (kernel/ctl `retry MODEL`).

Locking: `_cond` guards the queue (its scheduler and parked jobs), `_forget`, `_stopping` and the engine
process's state changes; `_slots` belongs to the engine thread.
"""

from __future__ import annotations

import errno
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from .. import params
from ..llm.jobs import Job, JobState
from ..types import Delivery, Discard, Sender
from .client import EngineClient, Runtime, engine_client
from .enginehost import EngineDied
from .scheduler import Queue, Running, Scheduler
from .stepmetrics import StepMetrics
from .wire import STAT_KEYS, Admit, Plan, RunnerOptions, StepResult

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Seat:
    """A job that holds one of the engine's sequences."""

    key: int
    job: Job
    quantum_used: int = 0
    paused: bool = False


class Engine:
    def __init__(
        self,
        runtime: Runtime,
        scheduler: Scheduler,
        *,
        results: Sender | None = None,
        swap_budget: int = params.SWAP_RAM_BYTES,
        kv_reuse: bool = True,
        kv_share: bool = True,
        slots: int | None = None,
    ) -> None:
        """`runtime`: an engine process (`EngineProcess`), or a backend to run in this
        process. `slots` uses fewer of the backend's sequences than it has; `kv_reuse` and
        `kv_share` keep an agent's cells for its next job and share prefixes within a
        user's jobs (kernel/cores/placement.py)."""
        self.runtime = runtime  # its vocabulary: a prompt's tokens (coreset.py)
        self.client: EngineClient = engine_client(runtime)
        self.client.configure(RunnerOptions(swap_budget, kv_reuse, slots, kv_share))
        self.client.on_exit = self._process_exited
        self._slot_limit = slots
        self._cond = threading.Condition()
        self.queue = Queue(scheduler, self._cond, self._poke, self._refuse)  # the way in, under _cond
        self._slots: dict[int, Seat] = {}  # by key
        self._keys = itertools.count(1)
        self._away: dict[int, Job] = {}  # switched-out jobs by key (the engine thread's, under _cond)
        self._forget: list[int] = []  # keys of switched-out jobs cancelled since the last step
        self._stopping = False
        self._wake = False
        self._token: trio.lowlevel.TrioToken | None = None
        self._crashes: list[float] = []  # times of recent crashes, for the crash-loop limit (cleared by a stable engine)
        self._started_at = time.monotonic()  # when the running engine became ready
        self.restarts = 0
        self.last_crash = ""
        self.results: Sender = results or Discard()  # the way back: the core set's results channel
        self.on_event: Callable[[dict[str, Any]], None] = lambda fields: None  # crashes, restarts: to the audit log
        self.stats: dict[str, float] = dict.fromkeys(["step_s", "preemptions", "held_seq_steps", "engine_crashes", "engine_hangs"], 0)
        self._process_stats: dict[str, float] = dict.fromkeys(STAT_KEYS, 0)  # the running engine process's counters
        self._dead_stats: dict[str, float] = dict.fromkeys(STAT_KEYS, 0)  # those of engine processes that died
        self._last: StepResult | None = None
        self.step_metrics = StepMetrics()  # each step's histograms, for kernel/metrics

    @property
    def info(self) -> Any:
        return self.client.info

    @property
    def n_seqs(self) -> int:
        """Sequences jobs may hold: the engine's (known once it has loaded), or fewer."""
        return min(self._slot_limit or self.info.n_slots, self.info.n_slots)

    # -- trio side ----------------------------------------------------------
    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the engine thread until `stop()`; the thread is never abandoned."""
        self._token = trio.lowlevel.current_trio_token()
        task_status.started()
        await trio.to_thread.run_sync(self._loop, abandon_on_cancel=False)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self.client.interrupt()

    @property
    def scheduler(self) -> Scheduler:
        return self.queue.scheduler

    def pause(self, job: Job, paused: bool) -> None:
        """Leave a job out of the batches, or out of the queue (or take it back)."""
        self.queue.park(job, paused)

    def _refuse(self, job: Job) -> bool:
        """A job for a crash-looped engine ends at once (caller holds _cond)."""
        if self.client.state != "failed":
            return False
        self._hand_over([(job, b"", 0, (JobState.ERROR, errno.EIO, self.failure()))])
        return True

    def cancel(self, job: Job) -> bool:
        """Cancel a job; True when it was waiting and is now finished."""
        with self._cond:
            if self.queue.take(job):
                if job.saved is not None:  # its state is in the engine: drop it at the next step
                    self._forget.append(job.saved)
                    self._away.pop(job.saved, None)
                    job.saved = None
                    self._poke()
                job.finish(JobState.CANCELLED, errno.ECANCELED, "cancelled while queued")
                return True
            job.cancel_requested = True
            self._poke()
        return False

    def retry(self) -> None:
        """Start a `failed` core again (kernel/ctl `retry MODEL`)."""
        with self._cond:
            if self.client.state != "failed":
                return
            self._crashes.clear()
            self._set_state("restarting")
            self._cond.notify()

    def _process_exited(self) -> None:
        with self._cond:
            self._poke()

    def _poke(self) -> None:
        """Caller holds _cond."""
        self._wake = True
        self._cond.notify()

    def running(self) -> int:
        return sum(1 for s in list(self._slots.values()) if not s.paused)

    def failure(self) -> str:
        """Why requests to this core fail now ('' while it serves or restarts)."""
        return self.client.failure if self.client.state == "failed" else ""

    def describe(self) -> str:
        """`engine=STATE pid=N restarts=N hangs=N deadline=S` for kernel/status and kernel/models."""
        pid = self.client.pid if self.client.state in ("ready", "loading") else None
        deadline = self.client.deadline()
        return (
            f"engine={self.client.state} pid={pid or '-'} restarts={self.restarts} hangs={self.client.hangs} "
            f"deadline={'-' if deadline is None else f'{deadline:.1f}s'}"
        )

    def statistics(self) -> dict[str, Any]:
        now = self._process_stats
        s = {k: now[k] + self._dead_stats[k] + self.stats.get(k, 0) for k in STAT_KEYS}
        s["max_seqs"] = max(now["max_seqs"], self._dead_stats["max_seqs"])
        s["prefill_chunk"] = now["prefill_chunk"]  # gauges: the running engine process's current values
        s["kv_disk_bytes"] = now["kv_disk_bytes"]
        steps = s["steps"] or 1
        out: dict[str, Any] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.items()}
        out["mean_batch"] = round(s["batch_tokens"] / steps, 2)
        out["mean_seqs"] = round(s["batch_seqs"] / steps, 2)  # sequences decoded together per step
        out["tokens_per_s"] = round(s["generated"] / s["decode_s"], 1) if s["decode_s"] else 0.0
        out["python_overhead"] = round(1 - s["decode_s"] / s["step_s"], 3) if s["step_s"] else 0.0  # the process boundary included
        # where a step's time goes: llama_decode, sampling, the runner's Python, and the
        # engine thread's planning plus the process boundary (docs/protocol.md §6)
        out["runner_python_s"] = round(max(s["runner_s"] - s["decode_s"] - s["sample_s"], 0.0), 3)
        out["plan_ipc_s"] = round(max(s["step_s"] - s["runner_s"], 0.0), 3)
        out["swap_ms"] = round(s["swap_ms"], 2)
        out["running"] = self.running()
        out["queued"] = len(self.queue.scheduler)
        out["cached_sequences"] = self._last.cached_sequences if self._last else 0
        out["swapped_bytes"] = self._last.swapped_bytes if self._last else 0
        out["engine_restarts"] = self.restarts
        out["engine_hangs"] = int(self.stats["engine_hangs"])
        return out

    # -- engine thread ------------------------------------------------------
    def _loop(self) -> None:
        """Plan, submit, collect, apply. The client takes `depth` plans at a time: an engine
        process gets the next step's plan while it carries out this one, so it never
        waits for the daemon between steps while there is work."""
        inflight = 0  # plans submitted whose results have not come
        while self._ensure_started():
            if not inflight:
                work = self._wait_for_work()
                if work is None:
                    return
                if self.client.hung or not self.client.alive():  # died while idle, or a call found it hung
                    if not self._stopping:
                        self._crashed(self.client.death_reason(), self.client.hung)
                    continue
                if not work:  # idle a while: is it still there? (a hang shows in kernel/status before anyone waits on it)
                    try:
                        self.client.ping()
                    except EngineDied as exc:
                        if not self._stopping:
                            self._crashed(exc.reason, exc.hung)
                        continue
                    self._settled()
                    continue
            started = time.perf_counter()
            try:
                while inflight < self.client.depth and (not inflight or self._more_work()):
                    plan, early = self._plan()
                    if early:  # cancels and admissions now: a job is `running` while its prompt is prefilled
                        self._hand_over(early)
                    self.client.submit(plan)
                    inflight += 1
                result = self.client.collect()
                if not result.free:  # a step the engine took on its own answers no plan
                    inflight -= 1
                before = self._process_stats
                self._apply(result)
            except EngineDied as exc:
                inflight = 0
                if not self._stopping:  # one that dies while the mount stops is no crash
                    self._crashed(exc.reason, exc.hung)
                continue
            except Exception as exc:  # a bug here costs the jobs in the engine, as a crash does, never the mount
                log.exception("internal error in the engine loop of %s; restarting its engine", self.info.name)
                inflight = 0
                self._crashed(f"internal error in the daemon's engine loop: {type(exc).__name__}: {exc}")
                continue
            if self._crashes:
                self._settled()
            elapsed = time.perf_counter() - started
            self.stats["step_s"] += elapsed
            self.step_metrics.observe(elapsed, before, result.stats)

    def _settled(self) -> None:
        """An engine that has served ENGINE_STABLE_SECONDS is healthy: the crashes before it
        were no loop (faults weeks apart must not add up), and the backoff starts over."""
        if self._crashes and time.monotonic() - self._started_at >= params.ENGINE_STABLE_SECONDS:
            with self._cond:
                self._crashes.clear()

    def _ensure_started(self) -> bool:
        """Start (or restart, after a backoff) the engine process; False once stopping."""
        while True:
            with self._cond:
                while self.client.state == "failed" and not self._stopping:
                    self._fail_waiting(self.failure())
                    self._cond.wait()
                if self._stopping:
                    return False
                if self.client.state == "ready":
                    return True
                if self._crashes:
                    delay = min(params.ENGINE_BACKOFF_SECONDS * 2 ** (len(self._crashes) - 1), params.ENGINE_BACKOFF_MAX_SECONDS)
                    self._cond.wait_for(lambda: self._stopping, timeout=delay)
                    if self._stopping:
                        return False
                restart = self.client.state in ("restarting", "hung")
                if restart:
                    self._set_state("restarting")  # a hung engine shows `hung` until its successor starts
            try:
                self.client.start()
            except EngineDied as exc:
                if self._stopping:
                    return False
                self._crashed(exc.reason)
                continue
            self._started_at = time.monotonic()
            if restart:
                self.restarts += 1
                log.warning("engine of %s restarted (pid %s, restart %d)", self.info.name, self.client.pid, self.restarts)
                self._event(what="restarted", pid=self.client.pid, restarts=self.restarts)
            return True

    def _crashed(self, reason: str, hung: bool = False) -> None:
        """The engine process died, or the watchdog killed it (`hung`): fail what was in it, count
        it, and restart or give up."""
        with self._cond:
            self.stats["engine_hangs" if hung else "engine_crashes"] += 1
            self.last_crash = reason
            now = time.monotonic()
            self._crashes = [t for t in self._crashes if now - t < params.ENGINE_CRASH_WINDOW_SECONDS] + [now]
            message = reason if hung else f"the engine crashed ({reason})"
            lost = [seat.job for seat in self._slots.values()]
            self._slots.clear()
            for job in self.queue.scheduler.queued() + self.queue.parked:
                if job.saved is not None:  # switched out: its state was in the dead process
                    self._unqueue(job)
                    lost.append(job)
            self._forget.clear()
            self._away.clear()
            for key in self._process_stats:
                self._dead_stats[key] += self._process_stats[key] if key not in ("max_seqs", "prefill_chunk", "kv_disk_bytes") else 0
            self._dead_stats["max_seqs"] = max(self._dead_stats["max_seqs"], self._process_stats["max_seqs"])
            self._process_stats = dict.fromkeys(STAT_KEYS, 0)
            self._last = None
            failed = len(self._crashes) >= params.ENGINE_CRASH_LOOP
        self._hand_over([(job, b"", 0, (JobState.ERROR, errno.EIO, message)) for job in lost])
        log.error(
            "engine of %s %s: %s; %d jobs in it failed; %s",
            self.info.name,
            "hung" if hung else "crashed",
            reason,
            len(lost),
            f"marked failed after {len(self._crashes)} crashes" if failed else "restarting",
        )
        self._event(what="failed" if failed else "hung" if hung else "crashed", reason=reason, jobs=[job.id for job in lost], restarts=self.restarts)
        with self._cond:  # after the event: whoever sees the new state finds the audit line before theirs
            self._set_state("failed" if failed else "hung" if hung else "restarting")

    def _set_state(self, state: str) -> None:
        failure = ""
        if state == "failed":
            failure = (
                f"the engine of model {self.info.name!r} failed: it crashed {len(self._crashes)} times within "
                f"{params.ENGINE_CRASH_WINDOW_SECONDS:.0f} s (last: {self.last_crash}); root can start it again: echo retry {self.info.name} > kernel/ctl"
            )
        self.client.set_state(state, failure)

    def _fail_waiting(self, message: str) -> None:
        """A failed core: every queued job ends with EIO. Caller holds _cond."""
        jobs = self.queue.scheduler.queued() + self.queue.parked
        for job in jobs:
            self._unqueue(job)
        if jobs:
            self._hand_over([(job, b"", 0, (JobState.ERROR, errno.EIO, message)) for job in jobs])

    def _unqueue(self, job: Job) -> None:
        """Caller holds _cond."""
        self.queue.take(job)
        if job.saved is not None:
            self._away.pop(job.saved, None)
        job.saved = None

    def _wait_for_work(self) -> bool | None:
        """True: there is work (or news); False: idle for a ping interval; None: stopping."""
        deadline = self.client.deadline()
        interval = None if deadline is None else deadline * params.ENGINE_PING_FRACTION
        with self._cond:
            while not (self._stopping or self._wake or self._has_work() or self.client.state != "ready"):
                if not self._cond.wait(interval):
                    return None if self._stopping else False
            self._wake = False
            return None if self._stopping else True

    def _more_work(self) -> bool:
        """Is there work for one more step behind the one in flight?"""
        with self._cond:
            return not self._stopping and self._has_work()

    def _has_work(self) -> bool:
        """Caller holds _cond."""
        if any(not s.job.pause_requested for s in self._slots.values()):
            return True
        return bool(len(self.queue.scheduler)) and (self._available() > 0 or bool(self._slots))

    def _available(self) -> int:
        """Sequences a waiting job could get without preempting anyone (idle cached ones count)."""
        return self.n_seqs - len(self._slots)

    def _plan(self) -> tuple[Plan, list[Delivery]]:
        """This step's decisions: cancels, switch-outs, admissions and who sits out."""
        plan = Plan()
        early: list[Delivery] = []
        with self._cond:
            plan.forget, self._forget = self._forget, []
            for seat in [s for s in self._slots.values() if s.job.cancel_requested]:
                early.append((seat.job, b"", 0, (JobState.CANCELLED, errno.ECANCELED, "cancelled")))
                plan.release.append(seat.key)
                del self._slots[seat.key]
            for seat in self._slots.values():
                seat.paused = seat.job.pause_requested
            scheduler = self.queue.scheduler
            waiting = len(scheduler)
            if waiting:
                for seat in [s for s in self._slots.values() if s.paused]:
                    if waiting <= self._available():
                        break
                    self._switch_out(seat, plan)
                    self.queue.parked.append(seat.job)
                running = [Running(s.job, s.quantum_used) for s in self._slots.values() if not s.paused]
                for job in scheduler.preempt(running, self._available()):
                    self.stats["preemptions"] += 1
                    self._switch_out(next(s for s in self._slots.values() if s.job is job), plan)
                    scheduler.push(job)
            for job in scheduler.pick(self._available()):
                early += self._seat(job, plan)
            held = scheduler.hold([Running(s.job, s.quantum_used) for s in self._slots.values() if not s.paused])
            # nobody waits for a slot: the engine may go on by itself while the next plan is late
            plan.free_steps = 0 if len(scheduler) else params.ENGINE_FREE_STEPS
        held_ids = {id(job) for job in held}
        plan.paused = {s.key for s in self._slots.values() if s.paused}
        plan.held = {s.key for s in self._slots.values() if id(s.job) in held_ids}
        self.stats["held_seq_steps"] += len(plan.held)
        return plan, early

    def _switch_out(self, seat: Seat, plan: Plan) -> None:
        """Caller holds _cond."""
        del self._slots[seat.key]
        plan.switch_out.append(seat.key)
        seat.job.saved = seat.key
        self._away[seat.key] = seat.job  # a step in flight may still bring its tokens, or its end

    def _seat(self, job: Job, plan: Plan) -> list[Delivery]:
        """Give a job a sequence: resume it where it was, or start it. Caller holds _cond."""
        if job.saved is not None:
            key = job.saved
            job.saved = None
            self._away.pop(key, None)
            plan.start.append(key)
            self._slots[key] = Seat(key, job, paused=job.pause_requested)
            return []
        key = next(self._keys)
        seed = job.config.seed if job.config.seed >= 0 else random.getrandbits(32)
        scope = str(job.uid)  # jobs share KV prefixes only with jobs of the same user
        plan.start.append(Admit(key, job.agent, list(job.prompt_tokens), job.config, seed, job.grammar, scope))
        self._slots[key] = Seat(key, job, paused=job.pause_requested)
        return [(job, b"", 0, None)]

    def _apply(self, result: StepResult) -> None:
        deliveries: list[Delivery] = []
        for key, chunk, n_tokens, end in result.outputs:
            seat = self._slots.get(key)
            if seat is None:
                away = self._away.get(key)
                if away is not None:  # switched out by a plan made before this step's results
                    deliveries.append((away, chunk, n_tokens, end))
                    if end is not None:
                        self._ended_away(key, away)
                continue  # else cancelled meanwhile: its output is nobody's
            seat.quantum_used += n_tokens
            if end is not None:
                del self._slots[key]
            deliveries.append((seat.job, chunk, n_tokens, end))
        self._process_stats = result.stats
        self._last = result
        if deliveries:
            self._hand_over(deliveries)

    def _ended_away(self, key: int, job: Job) -> None:
        """A job ended in the step before the one that was to switch it out: it is done,
        not waiting to resume."""
        with self._cond:
            del self._away[key]
            if job.saved == key:
                self._unqueue(job)

    def _hand_over(self, deliveries: list[Delivery]) -> None:
        self._to_trio(self.results.send_nowait, deliveries)

    def _event(self, **fields: Any) -> None:
        """An engine event (crash, restart) for the audit log, on the trio thread."""
        self._to_trio(self.on_event, {"model": self.info.name, **fields})

    def _to_trio(self, callback: Callable[[Any], None], argument: Any) -> None:
        """Run `callback(argument)` on the trio thread, soon; never blocks."""
        if self._token is None:
            return
        try:
            self._token.run_sync_soon(callback, argument)
        except trio.RunFinishedError:
            pass
