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

Hibernation (kernel/cores/hibernate.py): with a store, an agent's cached sequence is
also written to disk: at the engine's first idle moment after its job ended (or
`KV_WRITE_DELAY_SECONDS` later on a busy engine), when its agent's next job takes it
first and it grew by `KV_WRITE_MIN_GROWTH` tokens since its file, when it is evicted,
and at close.
A job that finds no cells of its agent in RAM restores the agent's file, and one
whose prompt begins like another agent's file of its scope restores that one, in
whole tiles, as it would copy a cached sequence.

The sequences of a step keep contiguous ids (`_compact`): llama.cpp decodes each
run of consecutive ids as a ubatch of its own.
"""

from __future__ import annotations

import errno
import itertools
import logging
import time
from typing import Any

from .. import params
from ..errors import KernelError
from ..llm.jobs import JobState
from .backends import Backend
from .cache import Cache
from .hibernate import Entry, KvStore
from .sequences import Cached, Slot, common_prefix, prefill_tile, tile_end, whole_tiles
from .wire import Admit, Output, Plan, RunnerOptions

log = logging.getLogger(__name__)


class Placement:
    """The slot table of one backend: the running jobs' sequences (by sequence id and by
    job key), the switched-out jobs, the agents' cached sequences and the free ids.

    Single-threaded: the runner's. `slots` and `keys` are read by the runner as it
    builds a batch; `stats` is the runner's counters, which this adds to."""

    def __init__(self, backend: Backend, options: RunnerOptions, stats: dict[str, float], store: KvStore | None = None) -> None:
        self.backend = backend
        self.options = options
        self.stats = stats
        self.store = store  # agents' sequences on disk (None: hibernation off)
        n = backend.info.n_slots
        self.n_seqs = min(options.slots or n, n)
        self.tile = prefill_tile(backend.info)
        self._free = list(range(self.n_seqs))
        self.slots: dict[int, Slot] = {}  # by sequence id
        self.keys: dict[int, Slot] = {}  # the same slots, by job key
        self._switched: dict[int, Slot] = {}  # switched-out jobs, by key
        self._cache = Cache(self.tile)
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
            unsaved = time.monotonic() if self.store is not None else 0.0
            self._cache.put(Cached(slot.agent, slot.kv, slot.seq, used=next(self._clock), scope=slot.scope, tiled=slot.tiled, unsaved=unsaved))
            return
        self.backend.seq_clear(slot.seq)
        self._free_seq(slot.seq)

    def close(self) -> None:
        """Free every sequence, saved state and sampler; first write to disk what is not
        there yet: cached sequences, and running jobs' cells (a job run again after the
        remount begins with them)."""
        try:
            self._hibernate_all()
        except Exception:  # a bug here costs the disk copies, not the close
            log.exception("writing the sequences to disk at close failed")
        for slot in list(self.slots.values()):
            self.release(slot, keep=False)
        for key in list(self._switched):
            self._forget(key)
        for cached in self._cache.values():
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
        return self._keep(self.backend.state_get(seq)) if kv else None

    def _keep(self, state: Any) -> Any:
        """Hold a state in RAM while the budget allows; None past it."""
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
            victim = self._cache.least_used_resident()
            assert victim is not None, "no free sequence and none cached: more jobs than slots"
            self._evict(victim)
        seq = self._free.pop(0)
        self.backend.seq_clear(seq)
        return seq

    def _evict(self, cached: Cached) -> None:
        """Move an idle cached sequence out of its slot: to RAM, or dropped."""
        self.stats["cache_evictions"] += 1
        state = self.backend.state_get(cached.seq) if cached.kv else None
        if state is not None and cached.unsaved:
            self._to_disk(cached, state)
        state = self._keep(state) if state is not None else None
        self.backend.seq_clear(cached.seq)
        self._free_seq(cached.seq)
        if state is None:
            self._cache.pop(cached.agent)
            cached.seq = -1
        else:
            self._cache.save(cached, state)

    def _reuse_prefix(self, slot: Slot) -> None:
        """Keep the longest common prefix of the agent's cached sequence."""
        cached = self._cache.pop(slot.agent) or self._restore_own(slot)
        if cached is None:
            return
        if cached.unsaved and self._grown(cached):  # its last chance to reach the disk as it is
            self._to_disk(cached, cached.state if cached.seq < 0 else None)
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
        best: Slot | Cached | Entry | None = None
        best_rank = (len(slot.kv) + params.KV_SHARE_MIN_TOKENS - 1, 0, 0)
        for other in self.slots.values():
            if other is slot or other.scope != slot.scope or other.donor is not None or other.idle:
                continue
            reach = tile_end(other, self.tile) if other.tiled == len(other.kv) else other.tiled  # what it will have in tiles
            n = whole_tiles(min(common_prefix(prompt, other.kv + other.feed), limit, reach), self.tile)
            rank = (n, min(n, other.tiled), 1)
            if rank > best_rank:
                best, best_rank = other, rank
        for cached in self._cache.residents():
            if cached.scope == slot.scope:
                n = whole_tiles(min(common_prefix(prompt, cached.kv), limit, cached.tiled), self.tile)
                if (n, n, 2) > best_rank:
                    best, best_rank = cached, (n, n, 2)
        # saved in RAM, then on disk: the last choices among equals, found by prefix
        n, saved = self._cache.saved.longest(slot.scope, prompt, limit)
        if saved is not None and (n, n, 0) > best_rank:
            best, best_rank = saved, (n, n, 0)
        if self.store is not None:
            agent = slot.agent  # its own file was looked at first (_reuse_prefix)
            n, entry = self.store.longest(slot.scope, prompt, limit, self.tile, lambda e: e.agent != agent)
            if entry is not None and (n, n, -1) > best_rank:
                best, best_rank = entry, (n, n, -1)
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

    def _copy_prefix(self, slot: Slot, donor: Slot | Cached | Entry, n: int) -> None:
        """Put the donor's cells into the slot's sequence and keep the first `n`."""
        started = time.perf_counter()
        if isinstance(donor, Cached) and donor.seq < 0:
            state = donor.state
        else:  # one read of the donor's cells (or file) for all its followers of this step
            cells = len(donor.tokens if isinstance(donor, Entry) else donor.kv)
            held = self._states.get(id(donor))
            if held is None or held[0] is not donor or held[1] != cells:
                read = self._load(donor) if isinstance(donor, Entry) else self.backend.state_get(donor.seq)
                held = self._states[id(donor)] = (donor, cells, read)
            state = held[2]
            if state is None:  # a file gone or corrupt: the slot keeps what it has
                return
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
        if isinstance(donor, Entry):
            self.stats["kv_restores"] += 1
            self.stats["kv_restore_tokens"] += n - len(slot.kv)
        slot.kv, slot.feed, slot.tiled = prompt[:n], prompt[n:], n
        self.stats["swap_ms"] += (time.perf_counter() - started) * 1000

    # -- hibernation: sequences on disk ------------------------------------------------
    def hibernate(self, idle: bool) -> bool:
        """Write the cached sequence that waits longest for the disk: when the engine is
        idle, or once it has waited `KV_WRITE_DELAY_SECONDS`. Whether one was written."""
        cached = self._cache.waiting_longest()
        if cached is None:
            return False
        if not idle and time.monotonic() - cached.unsaved < params.KV_WRITE_DELAY_SECONDS:
            return False
        return self._to_disk(cached, cached.state if cached.seq < 0 else None)

    def _hibernate_all(self) -> None:
        if self.store is None:
            return
        for slot in self.slots.values():
            entry = self.store.find(slot.scope, slot.agent)
            if slot.kv and (entry is None or entry.tokens[: len(slot.kv)] != slot.kv):
                self._to_disk(slot, None)
        for cached in self._cache.unsaved():
            self._to_disk(cached, cached.state if cached.seq < 0 else None)

    def _to_disk(self, owner: Slot | Cached, state: Any) -> bool:
        """Queue a sequence's state (read now when not given) for its agent's file, unless
        the file holds it already; False when the writer's queue is full (tried again later)."""
        assert self.store is not None
        written = self.store.holds(owner.scope, owner.agent, owner.kv)
        if not written:
            started = time.perf_counter()
            state = self.backend.state_get(owner.seq) if state is None else state
            written = self.store.put(owner.scope, owner.agent, owner.kv, owner.tiled, state)
            self.stats["swap_ms"] += (time.perf_counter() - started) * 1000
        if isinstance(owner, Cached):
            self._cache.set_unsaved(owner, 0.0 if written else time.monotonic())
        return written

    def _grown(self, cached: Cached) -> bool:
        """Did the sequence grow by `KV_WRITE_MIN_GROWTH` tokens since its agent's file?"""
        assert self.store is not None
        entry = self.store.find(cached.scope, cached.agent)
        return len(cached.kv) - (common_prefix(entry.tokens, cached.kv) if entry is not None else 0) >= params.KV_WRITE_MIN_GROWTH

    def _restore_own(self, slot: Slot) -> Cached | None:
        """The agent's sequence from its file, in the slot's sequence, when it saves
        `KV_RESTORE_MIN_TOKENS` of the prompt's prefill (None otherwise)."""
        entry = self.store.find(slot.scope, slot.agent) if self.store is not None and self.options.kv_reuse else None
        if entry is None:
            return None
        common = min(common_prefix(entry.tokens, slot.feed), len(slot.feed) - 1)
        if common < params.KV_RESTORE_MIN_TOKENS:
            return None
        state = self._load(entry)
        self.backend.seq_clear(slot.seq)
        if state is None or not self.backend.state_set(slot.seq, state):
            self.backend.seq_clear(slot.seq)
            return None
        self.stats["kv_restores"] += 1
        self.stats["kv_restore_tokens"] += common
        return Cached(slot.agent, entry.tokens, slot.seq, scope=entry.scope, tiled=entry.tiled)

    def _load(self, entry: Entry) -> Any:
        started = time.perf_counter()
        assert self.store is not None
        state = self.store.load(entry)
        self.stats["swap_ms"] += (time.perf_counter() - started) * 1000
        return state

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
        other: Slot | Cached | None = self.slots.get(hole) or self._cache.at(hole)
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
            self._cache.move(other, old)
        self.stats["seq_moves"] += 1
        self.stats["swap_ms"] += (time.perf_counter() - started) * 1000

    def _free_seq(self, seq: int) -> None:
        self._free.append(seq)
        self._free.sort()

    def _drop_cache(self, cached: Cached) -> None:
        self._cache.pop(cached.agent)
        if cached.seq >= 0:
            self.backend.seq_clear(cached.seq)
            self._free_seq(cached.seq)
        elif cached.state is not None:
            self.swapped_bytes -= len(cached.state)
