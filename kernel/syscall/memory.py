"""Syscalls of memory/ and tools: one operation on the memory store, a recall
query, one tool call."""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from .. import params
from ..errors import KernelError
from ..kernel import Kernel
from ..memory.store import MemoryStore
from ..text import loads
from ..types import Agent, Caller
from . import checks

P = ParamSpec("P")
R = TypeVar("R")

MEMORY_OPS = frozenset(
    "lookup getattr readdir create mkdir symlink readlink link unlink rmdir rename setattr open release read write flush fsync".split()
)


def memory_op(method: Callable[Concatenate[MemoryStore, P], R]) -> Callable[Concatenate[Kernel, Caller, P], Awaitable[R]]:
    """The handler of one operation of the memory store (memory/ files), with the
    operation's own signature: the VFS has checked the mode bits; a write by someone
    other than root clears set-id bits."""
    sets_ids = method.__name__ in ("open", "write", "setattr")

    async def handler(kernel: Kernel, caller: Caller, *args: P.args, **kwargs: P.kwargs) -> R:
        if sets_ids and caller.uid != 0:  # root keeps the set-id bits when it writes (CAP_FSETID)
            kwargs["writer"] = caller
        return await kernel.memory.run(method, kernel.memory.store, *args, **kwargs)

    handler.__name__ = f"sys_memory_{method.__name__}"
    return handler


async def sys_memory_recall(kernel: Kernel, caller: Caller, agent: Agent, query: bytes, k: int = params.DEFAULT_MEMORY_TOP_K) -> Any:
    checks.request_size(len(query), "the query")
    text = checks.text(query, "recall")
    target = None
    if text.lstrip().startswith("{"):  # {"query": ..., "agent": NAME, "k": N}: another agent's shared memory
        try:
            request = loads(text, "recall")
            text, name, k = str(request["query"]), request.get("agent"), int(request.get("k", k))
        except (ValueError, KeyError, TypeError):
            raise KernelError(errno.EINVAL, 'recall: a JSON query is {"query": TEXT, "agent": NAME, "k": N}') from None
        if not 1 <= k <= params.MAX_MEMORY_TOP_K:
            raise KernelError(errno.EINVAL, f"recall: k must be in [1, {params.MAX_MEMORY_TOP_K}]")
        target = kernel.agents.named(str(name)) if name is not None else None
    return await kernel.memory.recall(caller, agent, text, k, target)


async def sys_tool_call(kernel: Kernel, caller: Caller, agent: Agent | None, name: str, arguments: Any) -> Any:
    """One call of a tool, for an agent (its policy applies) or for nobody in particular."""
    return await kernel.tools.call(caller, agent, name, arguments)
