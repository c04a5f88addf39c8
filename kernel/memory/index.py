"""Recall over `memory/`: committed text files are cut into passages
(`split_passages`) and indexed with FTS5; `search` ranks an agent's passages with
bm25. `IndexMixin` is one of `MemoryStore`'s bases.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from .. import params
from .data import Attr

_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class Passage:
    ino: int
    path: str
    line: int
    score: float
    text: str


class IndexMixin:
    """The recall part of `MemoryStore`."""

    # state, made by MemoryStore.__init__
    db: sqlite_utils.Database
    stats: dict[str, int]
    _lock: threading.RLock
    # methods of MemoryStore and the other mixins
    _q: Callable[..., list[Any]]
    _row: Callable[[int], Attr]
    _path: Callable[[int], str]
    _content: Callable[[int], bytes]

    def _index(self, ino: int) -> None:
        """Re-cut a committed text file into passages for recall (caller is in a transaction)."""
        self.db.execute("DELETE FROM passages WHERE ino = ?", [ino])
        attr = self._row(ino)
        if not attr.is_reg or attr.size > params.MEMORY_INDEX_MAX_BYTES or attr.nlink == 0:
            return
        try:
            text = self._content(ino).decode("utf-8")
        except UnicodeDecodeError:
            return  # binary files are stored, not recalled
        for line, passage in split_passages(text):
            self.db.execute("INSERT INTO passages(text, agent_id, ino, line) VALUES (?, ?, ?, ?)", [passage, attr.agent_id, ino, line])

    def search(self, agent_id: int, query: str, k: int) -> list[Passage]:
        """The `k` passages of the agent's memory that best match the query's words (bm25)."""
        words = list(dict.fromkeys(w.lower() for w in _WORD.findall(query)))[: params.MEMORY_QUERY_WORDS]
        if not words or k <= 0:
            return []
        match = " OR ".join('"' + w.replace('"', '""') + '"' for w in words)
        with self._lock:
            self.stats["recalls"] += 1
            rows = self._q(
                "SELECT ino, line, text, bm25(passages) AS score FROM passages WHERE passages MATCH ? AND agent_id = ? ORDER BY score LIMIT ?",
                [match, agent_id, k],
            )
            return [Passage(int(ino), self._path(int(ino)), int(line), round(-float(score), 4), text) for ino, line, text, score in rows]


def split_passages(text: str) -> list[tuple[int, str]]:
    """Paragraphs (blank-line separated), long ones cut at whitespace; with 1-based start lines."""
    out: list[tuple[int, str]] = []
    line = 1
    for block in re.split(r"(\n[ \t]*\n)", text):
        if block.strip() and not re.fullmatch(r"\n[ \t]*\n", block):
            start = line + (len(block) - len(block.lstrip("\n")))
            body = block.strip()
            while body:
                cut = len(body)
                if cut > params.MEMORY_PASSAGE_CHARS:
                    space = max(body.rfind(c, 0, params.MEMORY_PASSAGE_CHARS) for c in " \n\t")
                    cut = space if space > params.MEMORY_PASSAGE_CHARS // 2 else params.MEMORY_PASSAGE_CHARS
                out.append((start, body[:cut].strip()))
                rest = body[cut:]
                start += body[:cut].count("\n") + rest[: len(rest) - len(rest.lstrip())].count("\n")
                body = rest.strip()
        line += block.count("\n")
    return out
