"""Which of many token sequences shares the longest prefix with a prompt, in whole tiles,
without looking at each of them.

A new job may start on the cells of any sequence of its scope whose tokens begin like
its prompt (kernel/cores/placement.py, "KV sharing"). An engine that serves many agents
keeps thousands of such sequences: saved in RAM after an eviction, or in files
(kernel/cores/hibernate.py). Comparing the prompt with each of them at every admission
made the admission cost grow with the number of agents the engine ever served.

`PrefixIndex` files each sequence under the hash of its first k tiles, for every k up
to what it holds in tiles (`usable`). A lookup hashes the prompt's tiles and probes
from its longest whole-tile prefix down: a probe per tile of the prompt, whatever the
number of sequences. A hash proves nothing, so a candidate is compared token by token
before it is returned.

Sequences computed without tiles (`tile` 0: every cell may be shared) are filed by
`GRAIN` tokens instead, so such a sequence shares at most GRAIN - 1 tokens less than
the longest common prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

H = TypeVar("H")

GRAIN = 16  # tokens a level when there are no tiles


class PrefixIndex(Generic[H]):
    """Holders (any object; identity is what counts) of token sequences, by scope."""

    def __init__(self, tile: int) -> None:
        self.step = tile or GRAIN
        self._nodes: dict[tuple[str, int, int], dict[int, H]] = {}
        self._keys: dict[int, list[tuple[str, int, int]]] = {}  # id(holder) → its nodes
        self._tokens: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, holder: H) -> bool:
        return id(holder) in self._keys

    def add(self, holder: H, scope: str, tokens: list[int], usable: int) -> None:
        """File `holder`, whose first `usable` tokens may be shared (again: refiled)."""
        self.remove(holder)
        keys = [(scope, k, h) for k, h in self._chain(scope, tokens, min(usable, len(tokens)) // self.step)]
        if not keys:
            return
        for key in keys:
            self._nodes.setdefault(key, {})[id(holder)] = holder
        self._keys[id(holder)] = keys
        self._tokens[id(holder)] = tokens

    def remove(self, holder: H) -> None:
        keys = self._keys.pop(id(holder), None)
        if keys is None:
            return
        del self._tokens[id(holder)]
        for key in keys:
            node = self._nodes[key]
            del node[id(holder)]
            if not node:
                del self._nodes[key]

    def longest(self, scope: str, prompt: list[int], most: int, accept: Callable[[H], bool] = lambda _: True) -> tuple[int, H | None]:
        """(n, holder): a holder that `accept`s, whose first n tokens are the prompt's, for the
        largest n, a multiple of the level, at most `most`; (0, None) when none has one."""
        levels = list(self._chain(scope, prompt, min(most, len(prompt)) // self.step))
        for k, h in reversed(levels):
            n = k * self.step
            for holder in self._nodes.get((scope, k, h), {}).values():
                if accept(holder) and self._tokens[id(holder)][:n] == prompt[:n]:  # not a hash collision
                    return n, holder
        return 0, None

    def _chain(self, scope: str, tokens: list[int], levels: int) -> Iterator[tuple[int, int]]:
        """(k, hash of the first k levels of `tokens`) for k = 1..levels; each hash
        builds on the one before, so all of them cost one pass over the tokens."""
        h = hash(scope)
        for k in range(1, levels + 1):
            h = hash((h, tuple(tokens[(k - 1) * self.step : k * self.step])))
            yield k, h
