"""The index of cached sequences by prefix (kernel/cores/prefixes.py) and the cache built
on it (kernel/cores/cache.py): the same choices as a look at every sequence, without it."""

from __future__ import annotations

from collections.abc import Iterator

from hypothesis import given, settings
from hypothesis import strategies as st

from kernel.cores.cache import Cache
from kernel.cores.prefixes import GRAIN, PrefixIndex
from kernel.cores.sequences import Cached, common_prefix


class Held:
    def __init__(self, name: str, scope: str, tokens: list[int], usable: int) -> None:
        self.name, self.scope, self.tokens, self.usable = name, scope, tokens, usable


def brute(held: list[Held], scope: str, prompt: list[int], most: int, step: int) -> int:
    """The longest share by looking at each: whole levels of min(common prefix, most, usable)."""
    best = 0
    for h in held:
        if h.scope == scope:
            n = min(common_prefix(prompt, h.tokens), most, h.usable, len(h.tokens))
            best = max(best, n // step * step)
    return best


# few token values, so that sequences share prefixes often
tokens = st.lists(st.integers(0, 2), min_size=0, max_size=40)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    tile=st.sampled_from([0, 4]),
    seqs=st.lists(st.tuples(st.sampled_from(["1000", "1001"]), tokens, st.integers(0, 40)), max_size=12),
    removed=st.sets(st.integers(0, 11)),
    prompt=tokens,
    most=st.integers(0, 40),
)
def test_the_longest_prefix_is_the_one_a_look_at_every_sequence_finds(tile, seqs, removed, prompt, most) -> None:
    index: PrefixIndex[Held] = PrefixIndex(tile)
    held = [Held(f"h{i}", scope, t, usable) for i, (scope, t, usable) in enumerate(seqs)]
    for h in held:
        index.add(h, h.scope, h.tokens, h.usable)
    kept = [h for i, h in enumerate(held) if i not in removed]
    for i, h in enumerate(held):
        if i in removed:
            index.remove(h)
    step = tile or GRAIN
    n, found = index.longest("1000", prompt, most)
    assert n == brute(kept, "1000", prompt, most, step)
    if n:
        assert found in kept and found.scope == "1000" and found.tokens[:n] == prompt[:n] and n <= found.usable
    else:
        assert found is None


def test_a_hash_collision_never_passes_for_a_shared_prefix() -> None:
    class Colliding(PrefixIndex[Held]):
        def _chain(self, scope: str, tokens: list[int], levels: int) -> Iterator[tuple[int, int]]:
            return ((k, 0) for k in range(1, levels + 1))  # every prefix hashes alike

    index = Colliding(4)
    other = Held("other", "1000", [9, 9, 9, 9, 9, 9, 9, 9], 8)
    right = Held("right", "1000", [1, 2, 3, 4, 7, 7, 7, 7], 8)
    index.add(other, other.scope, other.tokens, other.usable)
    assert index.longest("1000", [1, 2, 3, 4, 5, 6, 7, 8, 9], 8) == (0, None)
    index.add(right, right.scope, right.tokens, right.usable)
    assert index.longest("1000", [1, 2, 3, 4, 5, 6, 7, 8, 9], 8) == (4, right)


def test_accept_skips_a_holder_and_refiling_replaces_its_tokens() -> None:
    index: PrefixIndex[Held] = PrefixIndex(4)
    mine = Held("mine", "1000", list(range(12)), 12)
    theirs = Held("theirs", "1000", list(range(8)), 8)
    for h in (mine, theirs):
        index.add(h, h.scope, h.tokens, h.usable)
    prompt = list(range(20))
    assert index.longest("1000", prompt, 19) == (12, mine)
    assert index.longest("1000", prompt, 19, lambda h: h is not mine) == (8, theirs)
    assert index.longest("1001", prompt, 19) == (0, None)  # never across scopes
    index.add(mine, "1000", [5] * 12, 12)  # filed again with other tokens
    assert index.longest("1000", prompt, 19) == (8, theirs)
    index.remove(theirs)
    index.remove(theirs)  # twice: nothing happens
    assert index.longest("1000", prompt, 19) == (0, None) and len(index) == 1


def test_the_cache_keeps_residents_by_sequence_saved_ones_by_prefix_and_the_disk_queue_in_order() -> None:
    cache = Cache(4)
    a = Cached("a", list(range(8)), seq=0, used=1, scope="1000", tiled=8, unsaved=10.0)
    b = Cached("b", list(range(12)), seq=1, used=2, scope="1000", tiled=12, unsaved=11.0)
    c = Cached("c", [7] * 8, seq=2, used=3, scope="1000", tiled=8)
    for cached in (a, b, c):
        cache.put(cached)
    assert len(cache) == 3 and cache.at(1) is b and cache.least_used_resident() is a
    assert cache.waiting_longest() is a and cache.unsaved() == [a, b]  # c is on disk already
    cache.set_unsaved(a, 12.0)  # its write was refused: it waits again, now the latest
    assert cache.waiting_longest() is b
    cache.save(b, b"cells")  # evicted to RAM: out of the residents, into the prefix index
    assert cache.at(1) is None and b.seq == -1 and b.state == b"cells"
    assert cache.saved.longest("1000", list(range(20)), 19) == (12, b)
    cache.move(c, 5)
    assert cache.at(2) is None and cache.at(5) is c and c.seq == 5
    assert cache.least_used_resident() is a
    assert cache.pop("b") is b and cache.saved.longest("1000", list(range(20)), 19) == (0, None)
    assert cache.unsaved() == [a]
    assert cache.pop("b") is None and cache.pop("a") is a
    assert cache.waiting_longest() is None and [x.agent for x in cache.values()] == ["c"]
