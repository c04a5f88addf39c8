"""The runner: carries out the scheduler's decisions on one backend, a step at a time.

It lives where llama.cpp lives (the engine process, kernel/cores/enginehost.py; or the
caller's thread for in-process kernels and tests) and owns everything that is the
model's: the sequences' KV cells, saved states, samplers and the agents' cached
sequences. The scheduling side (kernel/cores/engine.py) sends one `Plan` per step, naming
jobs by key (the types that cross: kernel/cores/wire.py); `Runner.step` applies it,
decodes once and returns a `StepResult` with every job's new text for that step.

Where each job's cells are (slots, switches, cached sequences, KV sharing, moves) is
kernel/cores/placement.py; this module builds each step's batch, decodes, samples
and ends jobs.

Each step decodes one token for every generating sequence first, then fills the
rest of the token budget with chunks of pending prompts, so a long prompt never
stalls the others; entries are sorted by sequence id.

Prompt chunks are whole tiles (`params.PREFILL_TILE`) in llama_decode calls of
their own, and a prompt's last partial tile goes one row at a time with the
generating tokens: llama.cpp's CPU attention rounds tiles and single rows
differently, and this way a cell is the same however it came to be computed, which
makes shared prefixes exact (docs/scheduling.md). While sequences are generating, a
step carries at most as many prompt tokens as take about as long as the generating
part of the step (`params.PREFILL_STALL`, measured online), so decoding does not
stall.

Generated text is published token by token, less what could still be the start of
a stop string or of an incomplete UTF-8 character, which waits for the next token.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass

from .. import params
from ..llm.jobs import JobState
from .backends import Backend, BatchEntry
from .hibernate import KvStore
from .placement import Placement
from .sequences import Slot, tile_end, utf8_decoder, whole_tiles
from .wire import STAT_KEYS, Output, Plan, RunnerOptions, StepResult

log = logging.getLogger(__name__)


class Runner:
    """Single-threaded: one caller, the thread that decodes."""

    def __init__(self, backend: Backend, options: RunnerOptions | None = None, store: KvStore | None = None) -> None:
        """`store`: the agents' sequences on disk (kernel/cores/hibernate.py), or None."""
        self.backend = backend
        self.options = options = options or RunnerOptions()
        self.stats: dict[str, float] = dict.fromkeys(STAT_KEYS, 0)
        self.store = store
        self.placement = Placement(backend, options, self.stats, store)
        self._slots = self.placement.slots  # the same dict, never rebound: read at every step
        self._tile = self.placement.tile
        self._cost = StepCost()
        self._outputs: list[Output] = []  # the step's, between launch and finish
        self._last: _Queued | None = None  # its last batch, on the device

    def step(self, plan: Plan) -> StepResult:
        self.launch(plan)
        return self.finish()

    def busy(self) -> bool:
        """Is there a job that a step would decode (running, not left out)?"""
        return any(not slot.idle for slot in self.placement.slots.values())

    def launch(self, plan: Plan) -> None:
        """Apply the plan and queue the step's decodes. On a device that decodes
        asynchronously this returns while the last batch runs: the engine sends the step
        before's results meanwhile, and `finish` samples."""
        started = time.perf_counter()
        self._outputs, self._last = [], None
        try:
            self.placement.apply(plan, self._outputs)
            self._last = self._decode_step(self._outputs)
        except Exception:
            self._failed()
        self.stats["runner_s"] += time.perf_counter() - started

    def finish(self) -> StepResult:
        """Wait for the device, sample the last batch: the step's result."""
        started = time.perf_counter()
        try:
            if self._last is not None:
                self._outputs += self._sample_queued(self._last)
        except Exception:
            self._failed()
        self._last = None
        self.stats["runner_s"] += time.perf_counter() - started
        if self.store is not None:
            self.stats.update(self.store.statistics())
        return StepResult(self._outputs, dict(self.stats), self.placement.cached_sequences, self.placement.swapped_bytes)

    def _failed(self) -> None:
        log.exception("engine step failed; failing the jobs in the engine and going on")
        self._last = None
        self._outputs += self._fail_all("internal error in the engine (see the aiosfs log)")

    def hibernate(self, idle: bool) -> bool:
        """Write a finished sequence to disk (kernel/cores/placement.py says which, and when);
        whether one was. Between steps, after the step's result has gone."""
        try:
            return self.store is not None and self.placement.hibernate(idle)
        except Exception:  # hibernation is an optimization: a bug in it costs the disk copy, not the engine
            log.exception("writing a sequence to disk failed")
            return False

    def close(self) -> None:
        self.placement.close()

    # -- one decode ----------------------------------------------------------------------
    def _decode_step(self, out: list[Output]) -> _Queued | None:
        """Decode every batch of the step; sample all but the last, which is returned
        queued (None when there is nothing to decode, or a decode failed)."""
        groups, batch_slots = self._build_batch()
        if not groups:
            return None
        self.stats["batch_seqs"] += len(batch_slots)
        self.stats["max_seqs"] = max(self.stats["max_seqs"], len(batch_slots))
        for number, (entries, samplers, n_generating) in enumerate(groups, 1):
            started = time.perf_counter()
            rc = self.backend.decode(entries)
            queued = _Queued(samplers, n_generating, len(entries), time.perf_counter() - started)
            self.stats["steps"] += 1
            self.stats["batch_tokens"] += len(entries)
            if rc != 0:
                self._measure(queued)
                out += self._decode_failed(rc, [slot for slot in batch_slots if self._slots.get(slot.seq) is slot])
                return None
            if number == len(groups):
                return queued
            out += self._sample_queued(queued)
        return None

    def _sample_queued(self, queued: _Queued) -> list[Output]:
        started = time.perf_counter()
        self.backend.synchronize()
        queued.blocked += time.perf_counter() - started
        self._measure(queued)
        started = time.perf_counter()
        out = self._sample([(slot, index) for slot, index in queued.samplers if self._slots.get(slot.seq) is slot])
        self.stats["sample_s"] += time.perf_counter() - started
        return out

    def _measure(self, queued: _Queued) -> None:
        """A batch's cost to the host: its decode call and the wait for the device (the
        device's time less what the host did meanwhile)."""
        self._cost.record(queued.blocked, queued.n_generating, queued.n_tokens - queued.n_generating)
        self.stats["decode_s"] += queued.blocked

    def _build_batch(self) -> tuple[list[tuple[list[BatchEntry], list[tuple[Slot, int]], int]], list[Slot]]:
        """This step's llama_decode calls: the generating sequences' tokens with prompt
        tails, then prompt chunks computed in tiles; each sorted by sequence id.

        llama.cpp's CPU attention computes a sequence's prompt rows in tiles when a
        ubatch holds at least PREFILL_TILE of them, else one row at a time, and the two
        round differently. A prompt's cells are computed the same way however it is
        chunked, shared or batched with others: its first `len - len % PREFILL_TILE`
        tokens in chunks of whole tiles, alone in their call (with other sequences'
        tokens in one ubatch, llama.cpp would cut them to one row each), and the rest
        one row at a time, with the generating tokens. While sequences generate, the
        prompt tokens of a step are limited so that they do not stall them."""
        n_batch = self.backend.info.n_batch
        rows: list[tuple[Slot, list[BatchEntry]]] = []
        tiles: list[tuple[Slot, list[BatchEntry]]] = []
        active = [s for s in self._slots.values() if not s.idle and s.donor is None]
        for slot in active:
            if not slot.feed and slot.pending is not None:
                rows.append((slot, [BatchEntry(slot.seq, slot.pending, len(slot.kv), True)]))
        generating = len(rows)
        budget = n_batch
        if generating:
            budget = min(budget, self._cost.prefill_budget(n_batch))
            self.stats["prefill_chunk"] = budget
        room = {"rows": n_batch - generating, "tiles": n_batch}
        for slot in sorted((s for s in active if s.feed), key=lambda s: s.seq):
            base = len(slot.kv)
            end = tile_end(slot, self._tile)
            if self._tile and base < end:
                size = whole_tiles(min(end - base, budget, room["tiles"]), self._tile)
                kind, into = "tiles", tiles
            else:
                size = min(len(slot.feed), budget, room["rows"])
                kind, into = "rows", rows
            if size <= 0:
                continue
            chunk = slot.feed[:size]
            last = size == len(slot.feed) and slot.sample_after_feed
            into.append((slot, [BatchEntry(slot.seq, t, base + i, last and i == size - 1) for i, t in enumerate(chunk)]))
            budget -= size
            room[kind] -= size
            self.stats["prompt_tokens"] += size
            if (kind == "tiles" or not self._tile) and slot.tiled == base:
                slot.tiled = base + size
        groups = []
        for wanted, n_generating in ((rows, generating), (tiles, 0)):
            if not wanted:
                continue
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
            groups.append((entries, samplers, n_generating))
        return groups, [slot for slot, _ in rows + tiles]

    def _sample(self, samplers: list[tuple[Slot, int]]) -> list[Output]:
        out: list[Output] = []
        n_ctx = self.backend.info.n_ctx_seq
        for slot, index in samplers:
            token = self.backend.sample(slot.sampler, index)
            if self.backend.is_eog(token):
                out.append(self._end(slot, JobState.DONE, 0, ""))
                continue
            slot.generated += 1
            self.stats["generated"] += 1
            slot.text += slot.decoder.decode(self.backend.piece(token))
            chunk, stopped = _cut_at_stop(slot, slot.config.stop)
            if not (stopped or slot.generated >= slot.config.max_tokens or len(slot.kv) >= n_ctx):
                slot.pending = token
                out.append((slot.key, chunk.encode(), 1, None))
                continue
            if stopped:
                slot.text, slot.decoder = "", utf8_decoder()
            key, rest, _, end = self._end(slot, JobState.DONE, 0, "")
            out.append((key, chunk.encode() + rest, 1, end))
        return out

    def _decode_failed(self, rc: int, batch_slots: list[Slot]) -> list[Output]:
        """A failed step fails the jobs in it; the others go on."""
        self.stats["decode_errors"] += 1
        log.error("llama_decode returned %d; failing the %d jobs of this step", rc, len(batch_slots))
        reason = "no KV cache slot left" if rc == 1 else f"llama_decode failed with code {rc}"
        return [self._end(slot, JobState.ERROR, errno.EIO, reason) for slot in batch_slots]

    def _fail_all(self, message: str) -> list[Output]:
        """After a bug: end every job holding a slot with EIO, so nothing hangs."""
        self.stats["engine_errors"] += 1
        failed: list[Output] = []
        for slot in list(self._slots.values()):
            failed.append((slot.key, b"", 0, (JobState.ERROR, errno.EIO, message)))
            try:
                self.placement.release(slot, keep=False)
            except Exception:
                log.exception("could not release the slot of job key %d", slot.key)
                self.placement.slots.pop(slot.seq, None)
                self.placement.keys.pop(slot.key, None)
        return failed

    def _end(self, slot: Slot, state: JobState, code: int, message: str) -> Output:
        rest = slot.text + slot.decoder.decode(b"", final=True)
        self.placement.release(slot, keep=state is JobState.DONE)
        if state is JobState.DONE:
            self.stats["jobs_done"] += 1
        return (slot.key, rest.encode(), 0, (state, code, message))


@dataclass
class _Queued:
    """A batch given to the device, not yet sampled."""

    samplers: list[tuple[Slot, int]]
    n_generating: int
    n_tokens: int
    blocked: float  # seconds the host waited on it: the decode call, then the wait for the device


class StepCost:
    """How long a step's generating part and its prompt tokens take, measured online
    (moving averages of llama_decode's times), to size prompt chunks."""

    WEIGHT = 0.2

    def __init__(self) -> None:
        self.decode_s = 0.0  # a step with generating sequences only
        self.per_prompt_token_s = 0.0  # what one more prompt token adds to a step

    def record(self, elapsed: float, generating: int, prompt: int) -> None:
        if not prompt:
            self.decode_s = self._average(self.decode_s, elapsed)
        elif not generating:
            self.per_prompt_token_s = self._average(self.per_prompt_token_s, elapsed / prompt)
        elif self.decode_s:
            self.per_prompt_token_s = self._average(self.per_prompt_token_s, max(elapsed - self.decode_s, 0.0) / prompt)

    def _average(self, old: float, new: float) -> float:
        return new if not old else old + self.WEIGHT * (new - old)

    def prefill_budget(self, n_batch: int) -> int:
        """Prompt tokens a step with generating sequences may carry."""
        if not (self.decode_s and self.per_prompt_token_s):
            return min(n_batch, params.PREFILL_MIN_CHUNK * 4)  # not measured yet
        tokens = int(params.PREFILL_STALL * self.decode_s / self.per_prompt_token_s)
        return min(max(params.PREFILL_MIN_CHUNK, tokens), n_batch)


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
