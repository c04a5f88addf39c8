"""The records of KV placement (kernel/cores/placement.py): a job's sequence (`Slot`),
an agent's cached one (`Cached`), and the token arithmetic both use: common
prefixes and prefill tiles.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Any

from .. import params
from ..agents.config import AgentConfig
from .backends import BackendInfo


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
    unsaved: float = 0.0  # since when its cells wait to be written to disk (0: on disk, or nowhere to write)


def prefill_tile(info: BackendInfo) -> int:
    """The prompt rows llama.cpp computes in tiles: none where a batch cannot hold a tile
    (without tiles every cell can be shared)."""
    return params.PREFILL_TILE if info.n_batch >= params.PREFILL_TILE else 0


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
