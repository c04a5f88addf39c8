"""The agents' cached sequences (kernel/cores/placement.py), kept so that no step looks
at each of them.

An engine that served a thousand agents holds a thousand cached sequences: at most
`n_slots` in sequences of the backend (resident), the rest saved in RAM. Each step
used to walk all of them three times: for the sequence that waits longest for the
disk, for the least recently used resident one, and for a donor of a new job's
prefix. Here the resident ones are a table by sequence id, those waiting for the disk
a queue in the order they began to wait, and the saved ones a `PrefixIndex`.

Single-threaded: the runner's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .prefixes import PrefixIndex
from .sequences import Cached


class Cache:
    def __init__(self, tile: int) -> None:
        self._by_agent: dict[str, Cached] = {}
        self._resident: dict[int, Cached] = {}  # by sequence id
        self._unsaved: dict[str, Cached] = {}  # waiting for the disk, longest first
        self.saved: PrefixIndex[Cached] = PrefixIndex(tile)  # seq -1, cells in `state`, by prefix

    def __len__(self) -> int:
        return len(self._by_agent)

    def get(self, agent: str) -> Cached | None:
        return self._by_agent.get(agent)

    def values(self) -> Iterator[Cached]:
        return iter(list(self._by_agent.values()))

    def residents(self) -> Iterator[Cached]:
        return iter(self._resident.values())

    def at(self, seq: int) -> Cached | None:
        """The cached sequence that holds backend sequence `seq`, if one does."""
        return self._resident.get(seq)

    def put(self, cached: Cached) -> None:
        """Keep `cached`, resident (its agent's cached sequence is gone already)."""
        assert cached.agent not in self._by_agent and cached.seq >= 0
        self._by_agent[cached.agent] = cached
        self._resident[cached.seq] = cached
        self.set_unsaved(cached, cached.unsaved)

    def pop(self, agent: str) -> Cached | None:
        cached = self._by_agent.pop(agent, None)
        if cached is not None:
            if self._resident.get(cached.seq) is cached:
                del self._resident[cached.seq]
            self._unsaved.pop(agent, None)
            self.saved.remove(cached)
        return cached

    def move(self, cached: Cached, seq: int) -> None:
        """A resident sequence now in backend sequence `seq`."""
        if self._resident.get(cached.seq) is cached:
            del self._resident[cached.seq]
        cached.seq = seq
        self._resident[seq] = cached

    def save(self, cached: Cached, state: Any) -> None:
        """A resident sequence left its slot; its cells are `state`, in RAM."""
        if self._resident.get(cached.seq) is cached:
            del self._resident[cached.seq]
        cached.seq, cached.state = -1, state
        self.saved.add(cached, cached.scope, cached.kv, cached.tiled)

    def least_used_resident(self) -> Cached | None:
        return min(self._resident.values(), key=lambda c: c.used, default=None)

    def set_unsaved(self, cached: Cached, since: float) -> None:
        """`since` (monotonic seconds) its cells wait for the disk; 0: they do not."""
        cached.unsaved = since
        self._unsaved.pop(cached.agent, None)
        if since and self._by_agent.get(cached.agent) is cached:
            self._unsaved[cached.agent] = cached  # the latest to begin waiting goes last

    def waiting_longest(self) -> Cached | None:
        return next(iter(self._unsaved.values()), None)

    def unsaved(self) -> list[Cached]:
        return list(self._unsaved.values())
