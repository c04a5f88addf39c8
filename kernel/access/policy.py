"""The `permissions` file: what mode bits cannot say about an agent.

`key value` lines (blank lines and `#` comments skipped), validated as a whole:

    tools         calculator clock memory_search   # allowed tools (default: any)
    max_tokens    2048        # largest max_tokens a request may ask for
    budget_tokens 200000      # tokens (prompt + generated) the agent may spend; EDQUOT after
    max_queue     8           # queued + running jobs; EAGAIN beyond
    priority_max  5           # highest priority a request may ask for
    memory_quota  10485760    # bytes of memory/; EDQUOT beyond
    share_memory  alice bob   # agents whose tools/syscalls may read this agent's memory

Two layers keep a non-root owner from raising their own limits: what root writes
is also the agent's *ceiling*; an owner may write any policy within it (a number
at most the ceiling's, tools a subset of the ceiling's), and a key the owner
leaves out takes the ceiling's value. Without a ceiling, the owner is free.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

from .. import params
from ..errors import KernelError


def _count(lo: int, hi: int) -> Callable[[str], int]:
    def check(text: str) -> int:
        if not text.isdigit() or not lo <= int(text) <= hi:
            raise ValueError(f"{text!r} is not an integer in [{lo}, {hi}]")
        return int(text)

    return check


def _names(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(text.replace(",", " ").split()))


PARSERS: dict[str, Callable[[str], Any]] = {
    "tools": _names,
    "max_tokens": _count(1, params.MAX_TOKENS_LIMIT),
    "budget_tokens": _count(0, 10**15),
    "max_queue": _count(1, params.MAX_QUEUED_PER_AGENT),
    "priority_max": _count(0, 9),
    "memory_quota": _count(0, 2**50),
    "share_memory": _names,
}
LIMITS = ("max_tokens", "budget_tokens", "max_queue", "priority_max", "memory_quota")  # lower is stricter


@dataclass(frozen=True)
class Policy:
    """None: no limit from this key."""

    tools: tuple[str, ...] | None = None
    max_tokens: int | None = None
    budget_tokens: int | None = None
    max_queue: int | None = None
    priority_max: int | None = None
    memory_quota: int | None = None
    share_memory: tuple[str, ...] = ()

    def render(self, ceiling: Policy, spent: int) -> str:
        """The file's text: every key set, with root's limits and the spending as comments."""
        lines = []
        for f in fields(self):
            value, limit = getattr(self, f.name), getattr(ceiling, f.name)
            if value is None or value == ():
                continue
            text = " ".join(value) if isinstance(value, tuple) else str(value)
            notes = []
            if limit is not None and limit != () and f.name != "share_memory":
                notes.append(f"root's limit: {' '.join(limit) if isinstance(limit, tuple) else limit}")
            if f.name == "budget_tokens":
                notes.append(f"spent: {spent}")
            lines.append(f"{f.name:<13} {text}" + (f"  # {'; '.join(notes)}" if notes else ""))
        return "".join(line + "\n" for line in lines)

    def within(self, ceiling: Policy) -> Policy:
        """This policy as an owner's: keys left out take the ceiling's value, and
        EPERM names any key that would go past it."""
        values: dict[str, Any] = {}
        for key in LIMITS:
            mine, limit = getattr(self, key), getattr(ceiling, key)
            if limit is not None and mine is not None and mine > limit:
                raise KernelError(errno.EPERM, f"permissions: {key} {mine} is above root's limit {limit}; only root may raise it")
            values[key] = limit if mine is None else mine
        if ceiling.tools is not None:
            if self.tools is not None and not set(self.tools) <= set(ceiling.tools):
                extra = " ".join(sorted(set(self.tools) - set(ceiling.tools)))
                raise KernelError(errno.EPERM, f"permissions: tools {extra} are not in root's list; only root may add them")
            values["tools"] = ceiling.tools if self.tools is None else self.tools
        return replace(self, **values)


def parse_policy(text: str) -> Policy:
    """The policy of a `permissions` text; EINVAL naming the first bad line."""
    values: dict[str, Any] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, _, value = line.partition(" ")
        parser = PARSERS.get(key)
        if parser is None:
            raise KernelError(errno.EINVAL, f"permissions line {number}: unknown key {key!r} (known: {', '.join(PARSERS)})")
        try:
            values[key] = parser(value.strip())
        except ValueError as exc:
            raise KernelError(errno.EINVAL, f"permissions line {number}: {key}: {exc}") from None
    return Policy(**values)
