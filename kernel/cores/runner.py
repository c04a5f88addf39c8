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

KV sharing across agents: a new job whose prompt begins with the same tokens as
another sequence of the same scope (the same submitting uid: one user's agents
with the same system prompt or tool schemas) starts from a copy of that
sequence's cells, cut at the common prefix, instead of prefilling it again. When
the other sequence is still prefilling that prefix, the new job waits for it, so
16 agents that arrive together with one system prompt prefill it once. A job only
ever gets cells of tokens its own prompt holds, at the same positions, so what it
sees is what it would have computed; sharing never crosses users (its timing
would tell one user what another's prompts begin with). The copy is a sequence
state copy (`state_get`/`state_set`, then a trim), which is immediate and moves
only used cells: with `kv_unified=false` llama.cpp's `seq_cp` between streams
copies whole streams at the next decode. The copies are independent, so a shared
prefix lives as long as any sequence holding it, and idle ones are evicted least
recently used, like any cached sequence.

Prompt chunks are whole tiles (`params.PREFILL_TILE`) in llama_decode calls of
their own, and a prompt's last partial tile goes one row at a time with the
generating tokens: llama.cpp's CPU attention rounds tiles and single rows
differently, and this way a cell is the same however it came to be computed, which
makes shared prefixes exact (docs/scheduling.md). While sequences are generating, a
step carries at most as many prompt tokens as take about as long as the generating
part of the step (`params.PREFILL_STALL`, measured online), so decoding does not
stall. The sequences of a step keep contiguous ids (`_compact`): llama.cpp decodes
each run of consecutive ids as a ubatch of its own.
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
    kv_share: bool = True  # start jobs on another sequence's common prefix, within a scope


@dataclass(frozen=True)
class Admit:
    """A new job's start: its prompt, its sampling settings and its agent (for KV reuse)."""

    key: int
    agent: str
    tokens: list[int]
    config: AgentConfig
    seed: int
    grammar: str | None = None
    scope: str = ""  # jobs of one scope (the submitting uid) may share KV prefixes; "" never shares


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
    scope: str = ""
    donor: Slot | None = None  # waiting for this sequence to compute the prefix it shares
    share: int = 0  # tokens to take from `donor`
    tiled: int = 0  # the first cells, computed in tiles (see _tile_end): what may be shared


@dataclass(eq=False)
class Cached:
    """An agent's finished sequence, kept for its next job."""

    agent: str
    kv: list[int]
    seq: int = -1  # -1: saved in RAM as `state`
    state: Any = None
    used: int = 0
    scope: str = ""
    tiled: int = 0


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
    "shared_prefix_hits",
    "shared_prefix_tokens",
    "sample_s",
    "runner_s",
    "prefill_chunk",
    "seq_moves",
]


class Runner:
    """Single-threaded: one caller, the thread that decodes."""

    def __init__(self, backend: Backend, options: RunnerOptions = RunnerOptions()) -> None:
        self.backend = backend
        self.options = options
        n = backend.info.n_slots
        self._n_seqs = min(options.slots or n, n)
        # prompt rows computed in tiles by llama.cpp (none where a batch cannot hold a tile; without tiles every cell can be shared)
        self._tile = params.PREFILL_TILE if backend.info.n_batch >= params.PREFILL_TILE else 0
        self._free = list(range(self._n_seqs))
        self._slots: dict[int, Slot] = {}  # by sequence id
        self._keys: dict[int, Slot] = {}  # the same slots, by job key
        self._switched: dict[int, Slot] = {}  # switched-out jobs, by key
        self._cache: dict[str, Cached] = {}
        self._swapped_bytes = 0
        self._clock = itertools.count(1)
        self.stats: dict[str, float] = dict.fromkeys(STAT_KEYS, 0)
        self._cost = StepCost()
        self._states: dict[int, tuple[Any, int, Any]] = {}  # donors' cells read this step: (donor, cells, state)

    def step(self, plan: Plan) -> StepResult:
        started = time.perf_counter()
        outputs: list[Output] = []
        self._states.clear()
        try:
            self._apply(plan, outputs)
            self._states.clear()
            outputs += self._decode_step()
        except Exception:
            log.exception("engine step failed; failing the jobs in the engine and going on")
            outputs += self._fail_all("internal error in the engine (see the aiosfs log)")
        self.stats["runner_s"] += time.perf_counter() - started
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
        self._take_shared()
        self._compact()

    def _switch_out(self, slot: Slot) -> None:
        """Save (or plan to recompute) a running job's sequence and free its slot."""
        started = time.perf_counter()
        state = self._save(slot.seq, slot.kv)
        if state is None:
            slot.feed = slot.kv + slot.feed
            slot.kv, slot.tiled = [], 0
            slot.sample_after_feed = slot.sample_after_feed and slot.pending is None
        else:
            self.stats["swaps_out"] += 1
        slot.state = state
        slot.donor = None
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
        slot = Slot(admit.key, admit.agent, admit.config, sampler, list(admit.tokens), seq, scope=admit.scope)
        self._reuse_prefix(slot)
        self._slots[seq] = self._keys[admit.key] = slot
        self._find_donor(slot)

    def _switch_in(self, slot: Slot, seq: int) -> None:
        started = time.perf_counter()
        slot.seq = seq
        if slot.state is not None:
            if self.backend.state_set(seq, slot.state):
                self.stats["swaps_in"] += 1
            else:  # could not restore: recompute instead
                slot.feed, slot.kv, slot.tiled = slot.kv + slot.feed, [], 0
                slot.sample_after_feed = slot.sample_after_feed and slot.pending is None
            self._swapped_bytes -= len(slot.state)
            slot.state = None
        if slot.feed and not slot.kv and slot.pending is not None:
            self.stats["recomputes"] += 1
        self._slots[seq] = self._keys[slot.key] = slot
        self._find_donor(slot)
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
        common = min(_common(cached.kv, prompt), len(prompt) - 1)  # the last prompt token must be decoded for logits
        tiled = min(cached.tiled, common)
        if self._tile and tiled < common <= params.SHORT_HEAD_TOKENS and common < _tiles(len(prompt), self._tile):
            # a few cells, computed a row at a time where this prompt has a whole tile (the
            # agent's last prompt began otherwise, e.g. with another system prompt): compute
            # them again in tiles, so that the prompt's prefix can be shared
            common = tiled = 0
        self.backend.seq_trim(slot.seq, common)
        slot.kv, slot.feed = prompt[:common], prompt[common:]
        slot.tiled = tiled
        self.stats["prefix_hit_tokens"] += common

    # -- KV sharing across agents ----------------------------------------------------
    def _find_donor(self, slot: Slot) -> None:
        """Start `slot` on the longest prefix another sequence of its scope holds (or is
        prefilling) in tiles, when that saves at least `KV_SHARE_MIN_TOKENS` of prefill."""
        if not (self.options.kv_share and slot.scope and slot.feed):
            return
        prompt = slot.kv + slot.feed
        limit = len(prompt) - 1  # the last prompt token must be decoded for logits
        best: Slot | Cached | None = None
        best_rank = (len(slot.kv) + params.KV_SHARE_MIN_TOKENS - 1, 0, 0)
        for other in self._slots.values():
            if other is slot or other.scope != slot.scope or other.donor is not None or other.idle:
                continue
            reach = _tile_end(other, self._tile) if other.tiled == len(other.kv) else other.tiled  # what it will have in tiles
            n = _tiles(min(_common(prompt, other.kv + other.feed), limit, reach), self._tile)
            rank = (n, min(n, other.tiled), 1)
            if rank > best_rank:
                best, best_rank = other, rank
        for cached in self._cache.values():
            if cached.scope == slot.scope and (cached.seq >= 0 or cached.state is not None):
                n = _tiles(min(_common(prompt, cached.kv), limit, cached.tiled), self._tile)
                rank = (n, n, 2 if cached.seq >= 0 else 0)
                if rank > best_rank:
                    best, best_rank = cached, rank
        if best is None:
            return
        n = best_rank[0]
        if isinstance(best, Slot) and best.tiled < n:
            slot.donor, slot.share = best, n  # wait for it to compute the prefix: decoded once
            return
        self._copy_prefix(slot, best, n)

    def _take_shared(self) -> None:
        """Waiting jobs whose donor has computed their prefix take it; those whose donor
        ended, was switched out, sits this step out or went past the prefix without
        computing it in tiles look again, without waiting."""
        for slot in list(self._slots.values()):
            donor = slot.donor
            if donor is None:
                continue
            running = self._keys.get(donor.key) is donor
            if running and donor.tiled >= slot.share:
                slot.donor = None
                self._copy_prefix(slot, donor, slot.share)
            elif not running or donor.idle or len(donor.kv) >= slot.share:
                slot.donor = None
                self._find_donor(slot)

    def _copy_prefix(self, slot: Slot, donor: Slot | Cached, n: int) -> None:
        """Put the donor's cells into the slot's sequence and keep the first `n`."""
        started = time.perf_counter()
        if isinstance(donor, Cached) and donor.seq < 0:
            state = donor.state
        else:  # one read of the donor's cells for all its followers of this step
            held = self._states.get(id(donor))
            if held is None or held[0] is not donor or held[1] != len(donor.kv):
                held = self._states[id(donor)] = (donor, len(donor.kv), self.backend.state_get(donor.seq))
            state = held[2]
        if isinstance(donor, Cached):
            donor.used = next(self._clock)  # a shared prefix in use is the last to be evicted
        prompt = slot.kv + slot.feed
        self.backend.seq_clear(slot.seq)
        if not self.backend.state_set(slot.seq, state):  # could not restore: prefill it all
            self.backend.seq_clear(slot.seq)
            slot.kv, slot.feed, slot.tiled = [], prompt, 0
            return
        self.backend.seq_trim(slot.seq, n)
        self.stats["shared_prefix_hits"] += 1
        self.stats["shared_prefix_tokens"] += n - len(slot.kv)
        slot.kv, slot.feed, slot.tiled = prompt[:n], prompt[n:], n
        self.stats["swap_ms"] += (time.perf_counter() - started) * 1000

    # -- contiguous sequence ids -------------------------------------------------------
    def _compact(self) -> None:
        """Keep the sequences of this step's batch on contiguous ids. llama.cpp splits a
        batch (kv_unified=false) into one ubatch per run of consecutive sequence ids,
        each a pass over all the weights: 16 sequences with gaps between them decode
        3x slower than 16 in a row. The sequences outside the run of ids that holds most
        of them already move into its gaps, trading places with what is there (an idle
        cached sequence, a job that sits this step out, or nothing), a state copy of a
        few milliseconds each, at most MAX_MOVES_PER_STEP a step."""
        ids = sorted(slot.seq for slot in self._slots.values() if not slot.idle and slot.donor is None)
        if not ids or ids[-1] - ids[0] + 1 == len(ids):
            return
        taken = set(ids)
        width = len(ids)
        # the run of `width` ids that holds most of them already: the fewest moves
        start = max(range(self._n_seqs - width + 1), key=lambda w: sum(1 for seq in range(w, w + width) if seq in taken))
        holes = [seq for seq in range(start, start + width) if seq not in taken]
        outside = [seq for seq in ids if not start <= seq < start + width]
        for seq, hole in list(zip(outside, holes, strict=True))[: params.MAX_MOVES_PER_STEP]:
            self._move(self._slots[seq], hole)

    def _move(self, slot: Slot, hole: int) -> None:
        """Move a running job's cells to sequence `hole`, and what holds `hole` to the job's old one."""
        started = time.perf_counter()
        old = slot.seq
        other: Slot | Cached | None = self._slots.get(hole) or next((c for c in self._cache.values() if c.seq == hole), None)
        mine = self.backend.state_get(old) if slot.kv else None
        theirs = self.backend.state_get(hole) if other is not None and other.kv else None
        self.backend.seq_clear(old)
        self.backend.seq_clear(hole)
        if (mine is not None and not self.backend.state_set(hole, mine)) or (theirs is not None and not self.backend.state_set(old, theirs)):
            raise RuntimeError(f"could not move sequence {old} to {hole}")
        del self._slots[old]
        slot.seq = hole
        self._slots[hole] = slot
        if other is None:
            self._free.remove(hole)
            self._free_seq(old)
        elif isinstance(other, Slot):
            other.seq = old
            self._slots[old] = other
        else:
            other.seq = old
        self.stats["seq_moves"] += 1
        self.stats["swap_ms"] += (time.perf_counter() - started) * 1000

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
        groups, batch_slots = self._build_batch()
        if not groups:
            return []
        out: list[Output] = []
        for entries, samplers, n_generating in groups:
            started = time.perf_counter()
            rc = self.backend.decode(entries)
            elapsed = time.perf_counter() - started
            self._cost.record(elapsed, n_generating, len(entries) - n_generating)
            self.stats["decode_s"] += elapsed
            self.stats["steps"] += 1
            self.stats["batch_tokens"] += len(entries)
            if rc != 0:
                return out + self._decode_failed(rc, [slot for slot in batch_slots if self._slots.get(slot.seq) is slot])
            started = time.perf_counter()
            out += self._sample([(slot, index) for slot, index in samplers if self._slots.get(slot.seq) is slot])
            self.stats["sample_s"] += time.perf_counter() - started
        self.stats["batch_seqs"] += len(batch_slots)
        self.stats["max_seqs"] = max(self.stats["max_seqs"], len(batch_slots))
        return out

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
            tile_end = _tile_end(slot, self._tile)
            if self._tile and base < tile_end:
                size = _tiles(min(tile_end - base, budget, room["tiles"]), self._tile)
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
            self._cache[slot.agent] = Cached(slot.agent, slot.kv, slot.seq, used=next(self._clock), scope=slot.scope, tiled=slot.tiled)
            return
        self.backend.seq_clear(slot.seq)
        self._free_seq(slot.seq)


def _tiles(n: int, tile: int) -> int:
    """`n` rounded down to whole prefill tiles (`tile` 0: no tiles, every row apart)."""
    return n // tile * tile if tile else n


def _tile_end(slot: Slot, tile: int) -> int:
    """Where the part of the slot's prompt computed in tiles ends: whole tiles from its
    first uncomputed token up to the last whole tile of the prompt (without tiles: all
    of it, every row computed apart)."""
    base = len(slot.kv)
    total = base + len(slot.feed)
    if not tile:
        return total
    return base + _tiles(max(_tiles(total, tile) - base, 0), tile)


def _common(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of two token lists (slice compares run in C)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


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
