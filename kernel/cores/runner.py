"""The runner: carries out the scheduler's decisions on one backend, a step at a time.

It lives where llama.cpp lives (the engine process, kernel/cores/enginehost.py; or the
caller's thread for in-process kernels and tests) and owns everything that is the
model's: the sequences' KV cells, saved states, samplers and the agents' cached
sequences. The scheduling side (kernel/cores/engine.py) sends one `Plan` per step, naming
jobs by key; `Runner.step` applies it, decodes once and returns a `StepResult` with
every job's new text for that step.

Each step decodes one token for every generating sequence first, then fills the
rest of the token budget with chunks of pending prompts, so a long prompt never
stalls the others; entries are sorted by sequence id.

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
"""

from __future__ import annotations

import codecs
import errno
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from .. import params
from ..agents.config import AgentConfig
from ..errors import KernelError
from ..llm.jobs import JobState
from .backends import Backend, BatchEntry

log = logging.getLogger(__name__)

# How a job ended in a step: (state, errno, message).
End = tuple[JobState, int, str]
# What one step reports for one job: (job key, bytes, tokens, end or None while it goes on).
Output = tuple[int, bytes, int, "End | None"]


@dataclass(frozen=True)
class RunnerOptions:
    swap_budget: int = params.SWAP_RAM_BYTES  # bytes of saved KV states kept; beyond, recompute
    kv_reuse: bool = True  # keep a finished job's cells for its agent's next job
    slots: int | None = None  # use fewer of the backend's sequences (tests, benchmarks)


@dataclass(frozen=True)
class Admit:
    """A new job's start: its prompt, its sampling settings and its agent (for KV reuse)."""

    key: int
    agent: str
    tokens: list[int]
    config: AgentConfig
    seed: int
    grammar: str | None = None


@dataclass
class Plan:
    """The scheduler's decisions for one step, applied in this order."""

    release: list[int] = field(default_factory=list)  # running jobs cancelled: free their slot, no output
    forget: list[int] = field(default_factory=list)  # switched-out jobs cancelled: drop what was saved
    switch_out: list[int] = field(default_factory=list)  # running jobs to save (or plan to recompute)
    start: list[Admit | int] = field(default_factory=list)  # new jobs, or keys of switched-out jobs to resume
    paused: set[int] = field(default_factory=set)  # jobs that keep their slot but are left out of batches
    held: set[int] = field(default_factory=set)  # the same, by the priority policy for this step


@dataclass
class StepResult:
    outputs: list[Output]
    stats: dict[str, float]  # the runner's counters since it started
    cached_sequences: int
    swapped_bytes: int


def _utf8() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")("replace")


@dataclass(eq=False)
class Slot:
    """A job's sequence: in a slot (`seq` >= 0) or switched out (`seq` == -1)."""

    key: int
    agent: str
    config: AgentConfig
    sampler: Any
    feed: list[int]  # tokens still to prefill
    seq: int = -1
    kv: list[int] = field(default_factory=list)  # tokens in the KV cells, in order
    sample_after_feed: bool = True  # False while recomputing: the pending token comes next
    pending: int | None = None  # last sampled token, decoded at the next step
    generated: int = 0
    text: str = ""  # generated text not yet published (held for stop strings)
    decoder: codecs.IncrementalDecoder = field(default_factory=_utf8)
    state: Any = None  # saved KV cells while switched out (None: recompute)
    idle: bool = False  # paused or held: left out of this step


@dataclass(eq=False)
class Cached:
    """An agent's finished sequence, kept for its next job."""

    agent: str
    kv: list[int]
    seq: int = -1  # -1: saved in RAM as `state`
    state: Any = None
    used: int = 0


# kernel/stats order (docs/protocol.md §6). The scheduling side counts step_s, preemptions,
# held_seq_steps and engine_crashes (kernel/cores/engine.py); they stay 0 here.
STAT_KEYS = [
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
    "swap_bytes",
    "swap_ms",
    "recomputes",
    "prefix_hit_tokens",
    "cache_evictions",
    "engine_crashes",
]


class Runner:
    """Single-threaded: one caller, the thread that decodes."""

    def __init__(self, backend: Backend, options: RunnerOptions = RunnerOptions()) -> None:
        self.backend = backend
        self.options = options
        n = backend.info.n_slots
        self._free = list(range(min(options.slots or n, n)))
        self._slots: dict[int, Slot] = {}  # by sequence id
        self._keys: dict[int, Slot] = {}  # the same slots, by job key
        self._switched: dict[int, Slot] = {}  # switched-out jobs, by key
        self._cache: dict[str, Cached] = {}
        self._swapped_bytes = 0
        self._clock = itertools.count(1)
        self.stats: dict[str, float] = dict.fromkeys(STAT_KEYS, 0)

    def step(self, plan: Plan) -> StepResult:
        outputs: list[Output] = []
        try:
            self._apply(plan, outputs)
            outputs += self._decode_step()
        except Exception:
            log.exception("engine step failed; failing the jobs in the engine and going on")
            outputs += self._fail_all("internal error in the engine (see the aiosfs log)")
        return StepResult(outputs, dict(self.stats), len(self._cache), self._swapped_bytes)

    def close(self) -> None:
        for slot in list(self._slots.values()):
            self._release(slot, keep=False)
        for key in list(self._switched):
            self._forget(key)
        for cached in list(self._cache.values()):
            self._drop_cache(cached)

    # -- the plan ------------------------------------------------------------------
    def _apply(self, plan: Plan, outputs: list[Output]) -> None:
        for key in plan.release:
            if key in self._keys:
                self._release(self._keys[key], keep=False)
        for key in plan.forget:
            self._forget(key)
        for key in plan.switch_out:
            self._switch_out(self._keys[key])
        for item in plan.start:
            if isinstance(item, Admit):
                try:
                    self._admit(item)
                except KernelError as exc:  # e.g. a grammar llama.cpp cannot parse: this job fails, not the step
                    outputs.append((item.key, b"", 0, (JobState.ERROR, exc.errno, exc.message)))
            else:
                self._switch_in(self._switched.pop(item), self._take_seq(None))
        for slot in self._slots.values():
            slot.idle = slot.key in plan.paused or slot.key in plan.held

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
        del self._slots[slot.seq], self._keys[slot.key]
        slot.seq = -1
        self._switched[slot.key] = slot
        self.stats["swap_ms"] += (time.perf_counter() - started) * 1000

    def _save(self, seq: int, kv: list[int]) -> Any:
        """The sequence's KV state, or None when the RAM budget says recompute."""
        if not kv:
            return None
        state = self.backend.state_get(seq)
        if self._swapped_bytes + len(state) > self.options.swap_budget:
            return None
        self._swapped_bytes += len(state)
        self.stats["swap_bytes"] += len(state)
        return state

    def _admit(self, admit: Admit) -> None:
        """Start a job on its agent's cached prefix, if it has one."""
        sampler = self.backend.new_sampler(admit.config, admit.seed, admit.grammar)
        seq = self._take_seq(admit.agent)
        slot = Slot(admit.key, admit.agent, admit.config, sampler, list(admit.tokens), seq)
        self._reuse_prefix(slot)
        self._slots[seq] = self._keys[admit.key] = slot

    def _switch_in(self, slot: Slot, seq: int) -> None:
        started = time.perf_counter()
        slot.seq = seq
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
        self._slots[seq] = self._keys[slot.key] = slot
        self.stats["swap_ms"] += (time.perf_counter() - started) * 1000

    def _forget(self, key: int) -> None:
        """Free what a switched-out job held."""
        slot = self._switched.pop(key, None)
        if slot is not None:
            if slot.state is not None:
                self._swapped_bytes -= len(slot.state)
            self.backend.free_sampler(slot.sampler)

    def _take_seq(self, agent: str | None) -> int:
        """A free sequence id: the agent's cached one, a free one, or the LRU cache's."""
        cached = self._cache.get(agent) if agent is not None and self.options.kv_reuse else None
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
        cached = self._cache.pop(slot.agent, None)
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

    # -- one decode ----------------------------------------------------------------------
    def _decode_step(self) -> list[Output]:
        entries, batch_slots, samplers = self._build_batch()
        if not entries:
            return []
        started = time.perf_counter()
        rc = self.backend.decode(entries)
        self.stats["decode_s"] += time.perf_counter() - started
        self.stats["steps"] += 1
        self.stats["batch_tokens"] += len(entries)
        self.stats["batch_seqs"] += len(batch_slots)
        self.stats["max_seqs"] = max(self.stats["max_seqs"], len(batch_slots))
        return self._decode_failed(rc, batch_slots) if rc != 0 else self._sample(samplers)

    def _build_batch(self) -> tuple[list[BatchEntry], list[Slot], list[tuple[Slot, int]]]:
        """Decode tokens first, then prompt chunks; sorted by sequence id."""
        budget = self.backend.info.n_batch
        wanted: list[tuple[Slot, list[BatchEntry]]] = []
        active = [s for s in self._slots.values() if not s.idle]
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
                slot.text, slot.decoder = "", _utf8()
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
                self._release(slot, keep=False)
            except Exception:
                log.exception("could not release the slot of job key %d", slot.key)
                self._slots.pop(slot.seq, None)
                self._keys.pop(slot.key, None)
        return failed

    def _end(self, slot: Slot, state: JobState, code: int, message: str) -> Output:
        rest = slot.text + slot.decoder.decode(b"", final=True)
        self._release(slot, keep=state is JobState.DONE)
        if state is JobState.DONE:
            self.stats["jobs_done"] += 1
        return (slot.key, rest.encode(), 0, (state, code, message))

    def _release(self, slot: Slot, keep: bool) -> None:
        """Free a finished job's slot; keep its cells cached for its agent if asked."""
        self.backend.free_sampler(slot.sampler)
        del self._slots[slot.seq], self._keys[slot.key]
        old = self._cache.get(slot.agent)
        if old is not None:
            self._drop_cache(old)
        if keep and self.options.kv_reuse:
            self._cache[slot.agent] = Cached(slot.agent, slot.kv, slot.seq, used=next(self._clock))
            return
        self.backend.seq_clear(slot.seq)
        self._free_seq(slot.seq)


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
