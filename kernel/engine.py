"""The engine: one thread that alone drives a backend, with continuous batching.

Each step decodes one token for every generating sequence first, then fills the
rest of the token budget with chunks of pending prompts, so a long prompt never
stalls the others. Results go back to the trio thread once per step through
`TrioToken.run_sync_soon`, which never blocks the engine thread.

Locking: `_cond` guards the scheduler, the free-slot list and `_stopping`; the
slots themselves belong to the engine thread.
"""

from __future__ import annotations

import codecs
import errno
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .backends import Backend, BatchEntry
from .jobs import Job, JobState
from .scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Slot:
    """A sequence in the batch: the job it serves and how far it has got."""

    seq: int
    job: Job
    sampler: Any
    n_past: int = 0  # tokens of this sequence already in the KV cache
    pending: int | None = None  # last sampled token, decoded at the next step
    generated: int = 0  # tokens sampled for this job
    text: str = ""  # generated text not yet published (held for stop strings)
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.job.prompt_tokens)


# What one step hands to the trio thread for one job: (job, bytes, tokens, end).
# `end` is None while the job goes on, else (state, errno, message).
Delivery = tuple[Job, bytes, int, "tuple[JobState, int, str] | None"]


class Engine:
    def __init__(self, backend: Backend, scheduler: Scheduler) -> None:
        self.backend = backend
        self.scheduler = scheduler
        self._cond = threading.Condition()
        self._free = list(range(backend.info.n_slots))
        self._slots: dict[int, Slot] = {}
        self._stopping = False
        self._token: trio.lowlevel.TrioToken | None = None
        self.on_update: Callable[[list[Delivery]], None] = lambda deliveries: None
        self.stats = {"steps": 0, "decode_s": 0.0, "batch_tokens": 0, "generated": 0, "prompt_tokens": 0, "jobs_done": 0, "decode_errors": 0}

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

    def cancel(self, job: Job) -> bool:
        """Cancel a job; True when it was still queued and is now finished."""
        with self._cond:
            if self.scheduler.remove(job):
                job.finish(JobState.CANCELLED, errno.ECANCELED, "cancelled while queued")
                return True
            job.cancel_requested = True
            self._cond.notify()
        return False

    def queued(self) -> list[Job]:
        with self._cond:
            return self.scheduler.queued()

    def running(self) -> int:
        return len(self._slots)

    def statistics(self) -> dict[str, float]:
        steps = self.stats["steps"] or 1
        out = dict(self.stats)
        out["mean_batch"] = round(self.stats["batch_tokens"] / steps, 2)
        out["decode_s"] = round(self.stats["decode_s"], 3)
        out["tokens_per_s"] = round(self.stats["generated"] / self.stats["decode_s"], 1) if self.stats["decode_s"] else 0.0
        out["running"] = len(self._slots)
        out["queued"] = len(self.scheduler)
        return out

    # -- engine thread ------------------------------------------------------
    def _loop(self) -> None:
        try:
            while self._wait_for_work():
                self._step()
        finally:
            for slot in list(self._slots.values()):
                self._release(slot)
            self._fail_queued()

    def _wait_for_work(self) -> bool:
        with self._cond:
            while not self._stopping and not self._slots and not (self._free and len(self.scheduler)):
                self._cond.wait()
            if self._stopping:
                return False
            for job in self.scheduler.pick(len(self._free)):
                seq = self._free.pop(0)
                seed = job.config.seed if job.config.seed >= 0 else random.getrandbits(32)
                self.backend.seq_clear(seq)
                self._slots[seq] = Slot(seq, job, self.backend.new_sampler(job.config, seed))
        return True

    def _step(self) -> None:
        deliveries: list[Delivery] = []
        for slot in [s for s in self._slots.values() if s.job.cancel_requested]:
            deliveries.append((slot.job, b"", 0, (JobState.CANCELLED, errno.ECANCELED, "cancelled")))
            self._release(slot)
        entries, batch_slots, samplers = self._build_batch()
        if entries:
            started = time.perf_counter()
            rc = self.backend.decode(entries)
            self.stats["decode_s"] += time.perf_counter() - started
            self.stats["steps"] += 1
            self.stats["batch_tokens"] += len(entries)
            if rc != 0:
                deliveries += self._decode_failed(rc, batch_slots)
            else:
                deliveries += self._sample(samplers)
        if deliveries:
            self._hand_over(deliveries)

    def _build_batch(self) -> tuple[list[BatchEntry], list[Slot], list[tuple[Slot, int]]]:
        """Decode tokens first, then prompt chunks; sorted by sequence id."""
        budget = self.backend.info.n_batch
        wanted: list[tuple[Slot, list[BatchEntry]]] = []
        for slot in self._slots.values():
            if not slot.prefilling and slot.pending is not None:
                wanted.append((slot, [BatchEntry(slot.seq, slot.pending, slot.n_past, True)]))
                budget -= 1
        for slot in self._slots.values():
            if budget <= 0:
                break
            if slot.prefilling:
                tokens = slot.job.prompt_tokens
                chunk = tokens[slot.n_past : slot.n_past + budget]
                last = slot.n_past + len(chunk) == len(tokens)
                batch = [BatchEntry(slot.seq, t, slot.n_past + i, last and i == len(chunk) - 1) for i, t in enumerate(chunk)]
                wanted.append((slot, batch))
                budget -= len(chunk)
                self.stats["prompt_tokens"] += len(chunk)
        wanted.sort(key=lambda item: item[0].seq)
        entries: list[BatchEntry] = []
        samplers: list[tuple[Slot, int]] = []
        for slot, batch in wanted:
            entries += batch
            slot.n_past += len(batch)
            slot.pending = None
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
            self.stats["generated"] += 1
            slot.text += slot.decoder.decode(self.backend.piece(token))
            chunk, stopped = _cut_at_stop(slot, slot.job.config.stop)
            if not (stopped or slot.generated >= slot.job.config.max_tokens or slot.n_past >= n_ctx):
                slot.pending = token
                out.append((slot.job, chunk.encode(), 1, None))
                continue
            if stopped:
                slot.text, slot.decoder = "", codecs.getincrementaldecoder("utf-8")("replace")
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
        self._release(slot)
        if state is JobState.DONE:
            self.stats["jobs_done"] += 1
        return (slot.job, rest.encode(), 0, (state, code, message))

    def _release(self, slot: Slot) -> None:
        self.backend.free_sampler(slot.sampler)
        self.backend.seq_clear(slot.seq)
        with self._cond:
            self._slots.pop(slot.seq, None)
            self._free.append(slot.seq)
            self._free.sort()

    def _fail_queued(self) -> None:
        with self._cond:
            jobs = self.scheduler.pick(len(self.scheduler))
        if jobs:
            self._hand_over([(job, b"", 0, (JobState.ERROR, errno.EIO, "the kernel stopped")) for job in jobs])

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
