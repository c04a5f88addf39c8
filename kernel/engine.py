"""The engine: one thread that alone drives a backend, with continuous batching.

Each step decodes one token for every generating sequence first, then fills the
rest of the token budget with chunks of pending prompts, so a long prompt never
stalls the others; entries are sorted by sequence id. Results go back to the trio
thread once per step through `TrioToken.run_sync_soon`, which never blocks.

Context switches, cheapest first:
1. a paused job, or one the policy holds back for a higher priority, keeps its
   slot and is simply left out of the batch;
2. a preempted job's KV cells are saved with `state_get` and restored later,
   into whatever slot is free, with `state_set` (RAM budget: `swap_budget`);
3. past that budget the state is dropped and its tokens are recomputed on resume.
The last sampled token is never in a saved state: it is decoded on resume, so a
resumed greedy generation is token-identical to an uninterrupted one.

KV reuse: when a job ends its sequence stays cached for its agent; the agent's
next job keeps the longest common token prefix and prefills only the rest. Idle
cached sequences are evicted least recently used first (saved to RAM while the
budget allows) when a job needs their slot.

Locking: `_cond` guards the scheduler, `_parked` and `_stopping`; slots and the
cache belong to the engine thread.
"""

from __future__ import annotations

import codecs
import errno
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from . import params
from .backends import Backend, BatchEntry
from .jobs import Job, JobState
from .scheduler import Running, Scheduler, park

log = logging.getLogger(__name__)


def _utf8() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")("replace")


@dataclass(eq=False)
class Slot:
    """A job's sequence: in a slot (`seq` >= 0) or switched out (`seq` == -1)."""

    job: Job
    sampler: Any
    feed: list[int]  # tokens still to prefill
    seq: int = -1
    kv: list[int] = field(default_factory=list)  # tokens in the KV cells, in order
    sample_after_feed: bool = True  # False while recomputing: the pending token comes next
    pending: int | None = None  # last sampled token, decoded at the next step
    generated: int = 0
    quantum_used: int = 0
    text: str = ""  # generated text not yet published (held for stop strings)
    decoder: codecs.IncrementalDecoder = field(default_factory=_utf8)
    state: Any = None  # saved KV cells while switched out (None: recompute)
    paused: bool = False
    held: bool = False  # left out of this step by the policy (priority), keeps its slot


@dataclass(eq=False)
class Cached:
    """An agent's finished sequence, kept for its next job."""

    agent: str
    kv: list[int]
    seq: int = -1  # -1: saved in RAM as `state`
    state: Any = None
    used: int = 0


# What one step hands to the trio thread for one job: (job, bytes, tokens, end).
# `end` is None while the job goes on, else (state, errno, message).
Delivery = tuple[Job, bytes, int, "tuple[JobState, int, str] | None"]


class Engine:
    def __init__(
        self, backend: Backend, scheduler: Scheduler, *, swap_budget: int = params.SWAP_RAM_BYTES, kv_reuse: bool = True, slots: int | None = None
    ) -> None:
        """`slots` uses fewer of the backend's sequences than it has (tests, benchmarks)."""
        self.backend = backend
        self.scheduler = scheduler
        self.swap_budget = swap_budget
        self.kv_reuse = kv_reuse
        self._cond = threading.Condition()
        self._free = list(range(min(slots or backend.info.n_slots, backend.info.n_slots)))
        self._slots: dict[int, Slot] = {}
        self._cache: dict[str, Cached] = {}
        self._parked: list[Job] = []  # paused and switched out: back to the queue on resume
        self._swapped_bytes = 0
        self._clock = itertools.count(1)
        self._stopping = False
        self._wake = False
        self._token: trio.lowlevel.TrioToken | None = None
        self.on_update: Callable[[list[Delivery]], None] = lambda deliveries: None
        self.stats: dict[str, float] = dict.fromkeys(
            [
                "steps",
                "decode_s",
                "step_s",
                "batch_tokens",
                "batch_seqs",
                "max_seqs",
                "engine_errors",
                "generated",
                "prompt_tokens",
                "jobs_done",
                "decode_errors",
                "preemptions",
                "swaps_out",
                "swaps_in",
                "held_seq_steps",
            ]
            + ["swap_bytes", "swap_ms", "recomputes", "prefix_hit_tokens", "cache_evictions"],
            0,
        )

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

    def submit(self, job: Job) -> None:
        with self._cond:
            self.scheduler.push(job)
            self._cond.notify()

    def set_scheduler(self, scheduler: Scheduler) -> None:
        """Switch policy at run time; queued jobs move over in their order."""
        with self._cond:
            for job in self.scheduler.queued():
                scheduler.push(job)
            self.scheduler = scheduler
            self._cond.notify()

    def cancel(self, job: Job) -> bool:
        """Cancel a job; True when it was waiting and is now finished."""
        with self._cond:
            waiting = self.scheduler.remove(job)
            if not waiting and job in self._parked:
                self._parked.remove(job)
                waiting = True
            if waiting:
                self._forget_saved(job)
                job.finish(JobState.CANCELLED, errno.ECANCELED, "cancelled while queued")
                return True
            job.cancel_requested = True
            self._poke()
        return False

    def pause(self, job: Job, paused: bool) -> None:
        """Leave a job out of the batches, or out of the queue (or take it back)."""
        with self._cond:
            park(self.scheduler, self._parked, job, paused)
            self._poke()

    def _poke(self) -> None:
        """Caller holds _cond."""
        self._wake = True
        self._cond.notify()

    def queued(self) -> list[Job]:
        with self._cond:
            return self.scheduler.queued() + list(self._parked)

    def running(self) -> int:
        return sum(1 for s in list(self._slots.values()) if not s.paused)

    def statistics(self) -> dict[str, Any]:
        s = self.stats
        steps = s["steps"] or 1
        out: dict[str, Any] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.items()}
        out["mean_batch"] = round(s["batch_tokens"] / steps, 2)
        out["mean_seqs"] = round(s["batch_seqs"] / steps, 2)  # sequences decoded together per step
        out["tokens_per_s"] = round(s["generated"] / s["decode_s"], 1) if s["decode_s"] else 0.0
        out["python_overhead"] = round(1 - s["decode_s"] / s["step_s"], 3) if s["step_s"] else 0.0
        out["swap_ms"] = round(s["swap_ms"], 2)
        out["running"] = self.running()
        out["queued"] = len(self.scheduler)
        out["cached_sequences"] = len(self._cache)
        out["swapped_bytes"] = self._swapped_bytes
        return out

    # -- engine thread ------------------------------------------------------
    def _loop(self) -> None:
        try:
            self.backend.warm_up()  # on this thread: the one that decodes from now on
            while self._wait_for_work():
                started = time.perf_counter()
                try:
                    self._step()
                except Exception:
                    log.exception("engine step failed; failing the jobs in the engine and going on")
                    self._fail_all("internal error in the engine (see the aiosfs log)")
                self.stats["step_s"] += time.perf_counter() - started
        finally:
            for slot in list(self._slots.values()):
                self._release(slot, keep=False)
            for cached in list(self._cache.values()):
                self._drop_cache(cached)

    def _fail_all(self, message: str) -> None:
        """After a bug: end every job holding a slot with EIO, so nothing hangs."""
        self.stats["engine_errors"] += 1
        failed: list[Delivery] = []
        for slot in list(self._slots.values()):
            failed.append((slot.job, b"", 0, (JobState.ERROR, errno.EIO, message)))
            try:
                self._release(slot, keep=False)
            except Exception:
                log.exception("could not release the slot of job %d", slot.job.id)
                self._slots.pop(slot.seq, None)
        self._hand_over(failed)

    def _wait_for_work(self) -> bool:
        with self._cond:
            while not (self._stopping or self._wake or self._has_work()):
                self._cond.wait()
            self._wake = False
            return not self._stopping

    def _has_work(self) -> bool:
        """Caller holds _cond."""
        if any(not s.job.pause_requested for s in self._slots.values()):
            return True
        return bool(len(self.scheduler)) and (self._available() > 0 or bool(self._slots))

    def _available(self) -> int:
        """Sequence ids a waiting job could get without preempting anyone."""
        return len(self._free) + sum(1 for c in self._cache.values() if c.seq >= 0)

    def _step(self) -> None:
        deliveries: list[Delivery] = []
        for slot in [s for s in self._slots.values() if s.job.cancel_requested]:
            deliveries.append((slot.job, b"", 0, (JobState.CANCELLED, errno.ECANCELED, "cancelled")))
            self._release(slot, keep=False)
        for slot in self._slots.values():
            slot.paused = slot.job.pause_requested
        deliveries += self._schedule()
        if deliveries:  # cancels and admissions now: a job is `running` while its prompt is prefilled
            self._hand_over(deliveries)
            deliveries = []
        entries, batch_slots, samplers = self._build_batch()
        if entries:
            started = time.perf_counter()
            rc = self.backend.decode(entries)
            self.stats["decode_s"] += time.perf_counter() - started
            self.stats["steps"] += 1
            self.stats["batch_tokens"] += len(entries)
            self.stats["batch_seqs"] += len(batch_slots)
            self.stats["max_seqs"] = max(self.stats["max_seqs"], len(batch_slots))
            deliveries += self._decode_failed(rc, batch_slots) if rc != 0 else self._sample(samplers)
        if deliveries:
            self._hand_over(deliveries)

    # -- scheduling and context switches -----------------------------------------
    def _schedule(self) -> list[Delivery]:
        """Switch out what the policy (or a pause) says, then admit waiting jobs."""
        with self._cond:
            waiting = len(self.scheduler)
            if waiting:
                for slot in [s for s in self._slots.values() if s.paused]:
                    if waiting <= self._available():
                        break
                    self._switch_out(slot)
                    self._parked.append(slot.job)
                running = [Running(s.job, s.quantum_used) for s in self._slots.values() if not s.paused]
                for job in self.scheduler.preempt(running, self._available()):
                    self.stats["preemptions"] += 1
                    self._switch_out(next(s for s in self._slots.values() if s.job is job))
                    self.scheduler.push(job)
            admitted = self.scheduler.pick(self._available())
        out: list[Delivery] = []
        for job in admitted:
            if self._admit(job):
                out.append((job, b"", 0, None))
        with self._cond:
            held = {id(job) for job in self.scheduler.hold([Running(s.job, s.quantum_used) for s in self._slots.values() if not s.paused])}
        for slot in self._slots.values():
            slot.held = id(slot.job) in held
        self.stats["held_seq_steps"] += len(held)
        return out

    def _switch_out(self, slot: Slot) -> None:
        """Save (or plan to recompute) a running job's sequence and free its slot."""
        started = time.perf_counter()
        state = self._save(slot.seq, slot.kv)
        if state is None:
            slot.feed = slot.kv + slot.feed
            slot.kv = []
            slot.sample_after_feed = slot.sample_after_feed and slot.pending is None
        else:
            self.stats["swaps_out"] += 1
        slot.state = state
        self.backend.seq_clear(slot.seq)
        self._free_seq(slot.seq)
        del self._slots[slot.seq]
        slot.seq = -1
        slot.quantum_used = 0
        slot.job.saved = slot
        self.stats["swap_ms"] += (time.perf_counter() - started) * 1000

    def _save(self, seq: int, kv: list[int]) -> Any:
        """The sequence's KV state, or None when the RAM budget says recompute."""
        if not kv:
            return None
        state = self.backend.state_get(seq)
        if self._swapped_bytes + len(state) > self.swap_budget:
            return None
        self._swapped_bytes += len(state)
        self.stats["swap_bytes"] += len(state)
        return state

    def _admit(self, job: Job) -> bool:
        """Give a job a slot: resume it, or start it on its agent's cached prefix."""
        slot: Slot | None = job.saved
        job.saved = None
        seq = self._take_seq(job.agent if slot is None else None)
        if slot is not None:
            self._switch_in(slot, seq)
            return False
        seed = job.config.seed if job.config.seed >= 0 else random.getrandbits(32)
        slot = Slot(job, self.backend.new_sampler(job.config, seed, job.grammar), list(job.prompt_tokens), seq, paused=job.pause_requested)
        self._reuse_prefix(slot)
        self._slots[seq] = slot
        return True

    def _switch_in(self, slot: Slot, seq: int) -> None:
        started = time.perf_counter()
        slot.seq = seq
        slot.paused = slot.job.pause_requested
        if slot.state is not None:
            if self.backend.state_set(seq, slot.state):
                self.stats["swaps_in"] += 1
            else:  # could not restore: recompute instead
                slot.feed, slot.kv = slot.kv + slot.feed, []
                slot.sample_after_feed = slot.sample_after_feed and slot.pending is None
            self._swapped_bytes -= len(slot.state)
            slot.state = None
        if slot.feed and not slot.kv and slot.pending is not None:
            self.stats["recomputes"] += 1
        self._slots[seq] = slot
        self.stats["swap_ms"] += (time.perf_counter() - started) * 1000

    def _take_seq(self, agent: str | None) -> int:
        """A free sequence id: the agent's cached one, a free one, or the LRU cache's."""
        cached = self._cache.get(agent) if agent is not None and self.kv_reuse else None
        if cached is not None and cached.seq >= 0:
            return cached.seq
        if not self._free:
            victim = min((c for c in self._cache.values() if c.seq >= 0), key=lambda c: c.used)
            self._evict(victim)
        seq = self._free.pop(0)
        self.backend.seq_clear(seq)
        return seq

    def _evict(self, cached: Cached) -> None:
        """Move an idle cached sequence out of its slot: to RAM, or dropped."""
        self.stats["cache_evictions"] += 1
        state = self._save(cached.seq, cached.kv)
        self.backend.seq_clear(cached.seq)
        self._free_seq(cached.seq)
        cached.seq = -1
        if state is None:
            del self._cache[cached.agent]
        else:
            cached.state = state

    def _reuse_prefix(self, slot: Slot) -> None:
        """Keep the longest common prefix of the agent's cached sequence."""
        cached = self._cache.pop(slot.job.agent, None)
        if cached is None:
            return
        if cached.seq < 0 and cached.state is not None:
            self._swapped_bytes -= len(cached.state)
            if not self.backend.state_set(slot.seq, cached.state):
                self.backend.seq_clear(slot.seq)
                return
        elif cached.seq != slot.seq:
            return
        prompt = slot.feed
        common = 0
        for a, b in zip(cached.kv, prompt, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt) - 1)  # the last prompt token must be decoded for logits
        self.backend.seq_trim(slot.seq, common)
        slot.kv, slot.feed = prompt[:common], prompt[common:]
        self.stats["prefix_hit_tokens"] += common

    def _free_seq(self, seq: int) -> None:
        self._free.append(seq)
        self._free.sort()

    def _drop_cache(self, cached: Cached) -> None:
        self._cache.pop(cached.agent, None)
        if cached.seq >= 0:
            self.backend.seq_clear(cached.seq)
            self._free_seq(cached.seq)
        elif cached.state is not None:
            self._swapped_bytes -= len(cached.state)

    def _forget_saved(self, job: Job) -> None:
        """Free what a switched-out job held. Caller holds _cond."""
        slot: Slot | None = job.saved
        job.saved = None
        if slot is not None:
            if slot.state is not None:
                self._swapped_bytes -= len(slot.state)
            self.backend.free_sampler(slot.sampler)

    # -- batches ---------------------------------------------------------------------
    def _build_batch(self) -> tuple[list[BatchEntry], list[Slot], list[tuple[Slot, int]]]:
        """Decode tokens first, then prompt chunks; sorted by sequence id."""
        budget = self.backend.info.n_batch
        wanted: list[tuple[Slot, list[BatchEntry]]] = []
        active = [s for s in self._slots.values() if not (s.paused or s.held)]
        for slot in active:
            if not slot.feed and slot.pending is not None:
                wanted.append((slot, [BatchEntry(slot.seq, slot.pending, len(slot.kv), True)]))
                budget -= 1
        for slot in active:
            if budget <= 0:
                break
            if slot.feed:
                chunk = slot.feed[:budget]
                last = len(chunk) == len(slot.feed) and slot.sample_after_feed
                base = len(slot.kv)
                wanted.append((slot, [BatchEntry(slot.seq, t, base + i, last and i == len(chunk) - 1) for i, t in enumerate(chunk)]))
                budget -= len(chunk)
                self.stats["prompt_tokens"] += len(chunk)
        wanted.sort(key=lambda item: item[0].seq)
        entries: list[BatchEntry] = []
        samplers: list[tuple[Slot, int]] = []
        for slot, batch in wanted:
            entries += batch
            if slot.feed:
                slot.feed = slot.feed[len(batch) :]
                if not slot.feed:
                    slot.sample_after_feed = True
            else:
                slot.pending = None
            slot.kv += [e.token for e in batch]
            if batch[-1].logits:
                samplers.append((slot, len(entries) - 1))
        return entries, [slot for slot, _ in wanted], samplers

    def _sample(self, samplers: list[tuple[Slot, int]]) -> list[Delivery]:
        out: list[Delivery] = []
        n_ctx = self.backend.info.n_ctx_seq
        for slot, index in samplers:
            token = self.backend.sample(slot.sampler, index)
            if self.backend.is_eog(token):
                out.append(self._end(slot, JobState.DONE, 0, ""))
                continue
            slot.generated += 1
            slot.quantum_used += 1
            self.stats["generated"] += 1
            slot.text += slot.decoder.decode(self.backend.piece(token))
            chunk, stopped = _cut_at_stop(slot, slot.job.config.stop)
            if not (stopped or slot.generated >= slot.job.config.max_tokens or len(slot.kv) >= n_ctx):
                slot.pending = token
                out.append((slot.job, chunk.encode(), 1, None))
                continue
            if stopped:
                slot.text, slot.decoder = "", _utf8()
            job, rest, _, end = self._end(slot, JobState.DONE, 0, "")
            out.append((job, chunk.encode() + rest, 1, end))
        return out

    def _decode_failed(self, rc: int, batch_slots: list[Slot]) -> list[Delivery]:
        """A failed step fails the jobs in it; the others go on."""
        self.stats["decode_errors"] += 1
        log.error("llama_decode returned %d; failing the %d jobs of this step", rc, len(batch_slots))
        reason = "no KV cache slot left" if rc == 1 else f"llama_decode failed with code {rc}"
        return [self._end(slot, JobState.ERROR, errno.EIO, reason) for slot in batch_slots]

    def _end(self, slot: Slot, state: JobState, code: int, message: str) -> Delivery:
        rest = slot.text + slot.decoder.decode(b"", final=True)
        self._release(slot, keep=state is JobState.DONE)
        if state is JobState.DONE:
            self.stats["jobs_done"] += 1
        return (slot.job, rest.encode(), 0, (state, code, message))

    def _release(self, slot: Slot, keep: bool) -> None:
        """Free a finished job's slot; keep its cells cached for its agent if asked."""
        self.backend.free_sampler(slot.sampler)
        del self._slots[slot.seq]
        old = self._cache.get(slot.job.agent)
        if old is not None:
            self._drop_cache(old)
        if keep and self.kv_reuse:
            self._cache[slot.job.agent] = Cached(slot.job.agent, slot.kv, slot.seq, used=next(self._clock))
            return
        self.backend.seq_clear(slot.seq)
        self._free_seq(slot.seq)

    def _hand_over(self, deliveries: list[Delivery]) -> None:
        if self._token is None:
            return
        try:
            self._token.run_sync_soon(self.on_update, deliveries)
        except trio.RunFinishedError:
            pass


def _cut_at_stop(slot: Slot, stops: tuple[str, ...]) -> tuple[str, bool]:
    """Take what may be published from `slot.text`; True when a stop string ended it.

    A tail that could still grow into a stop string is held back for the next token.
    """
    text = slot.text
    if not stops:
        slot.text = ""
        return text, False
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        slot.text = ""
        return text[:cut], True
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    slot.text = text[len(text) - hold :]
    return text[: len(text) - hold], False
