"""KV placement: which sequence of the backend holds each job's cells, and what is
kept, saved, recomputed, shared and moved. The runner (kernel/cores/runner.py) hands
each step's `Plan` to `Placement.apply` before it builds the step's batch.

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
recently used, like any cached sequence. Only cells computed in whole tiles are
shared (`tile_end`; kernel/cores/runner.py says why).

The sequences of a step keep contiguous ids (`_compact`): llama.cpp decodes each
run of consecutive ids as a ubatch of its own.
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
from .backends import Backend
from .wire import Admit, Output, Plan, RunnerOptions

log = logging.getLogger(__name__)


def utf8_decoder() -> codecs.IncrementalDecoder:
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
    decoder: codecs.IncrementalDecoder = field(default_factory=utf8_decoder)
    state: Any = None  # saved KV cells while switched out (None: recompute)
    idle: bool = False  # paused or held: left out of this step
    scope: str = ""
    donor: Slot | None = None  # waiting for this sequence to compute the prefix it shares
    share: int = 0  # tokens to take from `donor`
    tiled: int = 0  # the first cells, computed in tiles (see tile_end): what may be shared


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


class Placement:
    """The slot table of one backend: the running jobs' sequences (by sequence id and by
    job key), the switched-out jobs, the agents' cached sequences and the free ids.

    Single-threaded: the runner's. `slots` and `keys` are read by the runner as it
    builds a batch; `stats` is the runner's counters, which this adds to."""

    def __init__(self, backend: Backend, options: RunnerOptions, stats: dict[str, float]) -> None:
        self.backend = backend
        self.options = options
        self.stats = stats
        n = backend.info.n_slots
        self.n_seqs = min(options.slots or n, n)
        # prompt rows computed in tiles by llama.cpp (none where a batch cannot hold a tile; without tiles every cell can be shared)
        self.tile = params.PREFILL_TILE if backend.info.n_batch >= params.PREFILL_TILE else 0
        self._free = list(range(self.n_seqs))
        self.slots: dict[int, Slot] = {}  # by sequence id
        self.keys: dict[int, Slot] = {}  # the same slots, by job key
        self._switched: dict[int, Slot] = {}  # switched-out jobs, by key
        self._cache: dict[str, Cached] = {}
        self.swapped_bytes = 0
        self._clock = itertools.count(1)
        self._states: dict[int, tuple[Any, int, Any]] = {}  # donors' cells read this step: (donor, cells, state)

    @property
    def cached_sequences(self) -> int:
        return len(self._cache)

    # -- the plan ------------------------------------------------------------------
    def apply(self, plan: Plan, outputs: list[Output]) -> None:
        """Carry out the plan's cancels, switches and admissions; a job that cannot start
        (a grammar llama.cpp cannot parse) gets its end in `outputs`."""
        self._states.clear()
        for key in plan.release:
            if key in self.keys:
                self.release(self.keys[key], keep=False)
        for key in plan.forget:
            self._forget(key)
        for key in plan.switch_out:
            if key in self.keys:  # not when it ended in the step before: the plan was made before that step's results
                self._switch_out(self.keys[key])
        for item in plan.start:
            if isinstance(item, Admit):
                try:
                    self._admit(item)
                except KernelError as exc:  # e.g. a grammar llama.cpp cannot parse: this job fails, not the step
                    outputs.append((item.key, b"", 0, (JobState.ERROR, exc.errno, exc.message)))
            elif item in self._switched:
                self._switch_in(self._switched.pop(item), self._take_seq(None))
            else:  # the scheduling side resumes only what it switched out: a bug, which costs this job only
                log.error("resume of job key %d, which is not switched out", item)
                outputs.append((item, b"", 0, (JobState.ERROR, errno.EIO, "internal error: resumed a job the engine does not hold")))
        for slot in self.slots.values():
            slot.idle = slot.key in plan.paused or slot.key in plan.held
        self._take_shared()
        self._compact()
        self._states.clear()

    def release(self, slot: Slot, keep: bool) -> None:
        """Free a finished job's slot; keep its cells cached for its agent if asked."""
        self.backend.free_sampler(slot.sampler)
        del self.slots[slot.seq], self.keys[slot.key]
        old = self._cache.get(slot.agent)
        if old is not None:
            self._drop_cache(old)
        if keep and self.options.kv_reuse:
            self._cache[slot.agent] = Cached(slot.agent, slot.kv, slot.seq, used=next(self._clock), scope=slot.scope, tiled=slot.tiled)
            return
        self.backend.seq_clear(slot.seq)
        self._free_seq(slot.seq)

    def close(self) -> None:
        """Free every sequence, saved state and sampler."""
        for slot in list(self.slots.values()):
            self.release(slot, keep=False)
        for key in list(self._switched):
            self._forget(key)
        for cached in list(self._cache.values()):
            self._drop_cache(cached)

    # -- switches, admissions and cached sequences --------------------------------------
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
        del self.slots[slot.seq], self.keys[slot.key]
        slot.seq = -1
        self._switched[slot.key] = slot
        self.stats["swap_ms"] += (time.perf_counter() - started) * 1000

    def _save(self, seq: int, kv: list[int]) -> Any:
        """The sequence's KV state, or None when the RAM budget says recompute."""
        if not kv:
            return None
        state = self.backend.state_get(seq)
        if self.swapped_bytes + len(state) > self.options.swap_budget:
            return None
        self.swapped_bytes += len(state)
        self.stats["swap_bytes"] += len(state)
        return state

    def _admit(self, admit: Admit) -> None:
        """Start a job on its agent's cached prefix, if it has one."""
        sampler = self.backend.new_sampler(admit.config, admit.seed, admit.grammar)
        seq = self._take_seq(admit.agent)
        slot = Slot(admit.key, admit.agent, admit.config, sampler, list(admit.tokens), seq, scope=admit.scope)
        self._reuse_prefix(slot)
        self.slots[seq] = self.keys[admit.key] = slot
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
            self.swapped_bytes -= len(slot.state)
            slot.state = None
        if slot.feed and not slot.kv and slot.pending is not None:
            self.stats["recomputes"] += 1
        self.slots[seq] = self.keys[slot.key] = slot
        self._find_donor(slot)
        self.stats["swap_ms"] += (time.perf_counter() - started) * 1000

    def _forget(self, key: int) -> None:
        """Free what a switched-out job held."""
        slot = self._switched.pop(key, None)
        if slot is not None:
            if slot.state is not None:
                self.swapped_bytes -= len(slot.state)
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
            self.swapped_bytes -= len(cached.state)
            if not self.backend.state_set(slot.seq, cached.state):
                self.backend.seq_clear(slot.seq)
                return
        elif cached.seq != slot.seq:
            return
        prompt = slot.feed
        common = min(common_prefix(cached.kv, prompt), len(prompt) - 1)  # the last prompt token must be decoded for logits
        tiled = min(cached.tiled, common)
        if self.tile and tiled < common <= params.SHORT_HEAD_TOKENS and common < whole_tiles(len(prompt), self.tile):
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
        for other in self.slots.values():
            if other is slot or other.scope != slot.scope or other.donor is not None or other.idle:
                continue
            reach = tile_end(other, self.tile) if other.tiled == len(other.kv) else other.tiled  # what it will have in tiles
            n = whole_tiles(min(common_prefix(prompt, other.kv + other.feed), limit, reach), self.tile)
            rank = (n, min(n, other.tiled), 1)
            if rank > best_rank:
                best, best_rank = other, rank
        for cached in self._cache.values():
            if cached.scope == slot.scope and (cached.seq >= 0 or cached.state is not None):
                n = whole_tiles(min(common_prefix(prompt, cached.kv), limit, cached.tiled), self.tile)
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
        for slot in list(self.slots.values()):
            donor = slot.donor
            if donor is None:
                continue
            running = self.keys.get(donor.key) is donor
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
        ids = sorted(slot.seq for slot in self.slots.values() if not slot.idle and slot.donor is None)
        if not ids or ids[-1] - ids[0] + 1 == len(ids):
            return
        taken = set(ids)
        width = len(ids)
        # the run of `width` ids that holds most of them already: the fewest moves
        start = max(range(self.n_seqs - width + 1), key=lambda w: sum(1 for seq in range(w, w + width) if seq in taken))
        holes = [seq for seq in range(start, start + width) if seq not in taken]
        outside = [seq for seq in ids if not start <= seq < start + width]
        for seq, hole in list(zip(outside, holes, strict=True))[: params.MAX_MOVES_PER_STEP]:
            self._move(self.slots[seq], hole)

    def _move(self, slot: Slot, hole: int) -> None:
        """Move a running job's cells to sequence `hole`, and what holds `hole` to the job's old one."""
        started = time.perf_counter()
        old = slot.seq
        other: Slot | Cached | None = self.slots.get(hole) or next((c for c in self._cache.values() if c.seq == hole), None)
        mine = self.backend.state_get(old) if slot.kv else None
        theirs = self.backend.state_get(hole) if other is not None and other.kv else None
        self.backend.seq_clear(old)
        self.backend.seq_clear(hole)
        if (mine is not None and not self.backend.state_set(hole, mine)) or (theirs is not None and not self.backend.state_set(old, theirs)):
            raise RuntimeError(f"could not move sequence {old} to {hole}")
        del self.slots[old]
        slot.seq = hole
        self.slots[hole] = slot
        if other is None:
            self._free.remove(hole)
            self._free_seq(old)
        elif isinstance(other, Slot):
            other.seq = old
            self.slots[old] = other
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
            self.swapped_bytes -= len(cached.state)


def whole_tiles(n: int, tile: int) -> int:
    """`n` rounded down to whole prefill tiles (`tile` 0: no tiles, every row apart)."""
    return n // tile * tile if tile else n


def tile_end(slot: Slot, tile: int) -> int:
    """Where the part of the slot's prompt computed in tiles ends: whole tiles from its
    first uncomputed token up to the last whole tile of the prompt (without tiles: all
    of it, every row computed apart)."""
    base = len(slot.kv)
    total = base + len(slot.feed)
    if not tile:
        return total
    return base + whole_tiles(max(whole_tiles(total, tile) - base, 0), tile)


def common_prefix(a: list[int], b: list[int]) -> int:
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
