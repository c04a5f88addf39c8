"""The tool manager: the registry of tools and the one way a tool runs.

A tool has a name, a description, a JSON Schema for its arguments (an object), a
timeout and a concurrency limit. `ToolManager.call` checks the tool exists
(ENOENT), that the agent's policy allows it (EPERM, with a `deny` audit line),
validates the arguments (EINVAL with the validator's message), then runs it under
its semaphore within its timeout (ETIMEDOUT; the wait for a turn counts) and
writes a `tool` audit line. A tool that fails inside is EIO.

Built-in tools run in the daemon: `calculator` (an `ast` walk, never `eval`),
`clock`, and `memory_search`, `memory_read`, `memory_write`, which act for an
agent on its `memory/` through the memory store. External tools come from
`NAME.json` manifests in the tools directory and run as a process: the call as
JSON on stdin, one JSON value expected on stdout, in a fresh empty working
directory with a minimal environment and, when the daemon is root, as nobody.
Tools of MCP servers (`kernel/tools/mcp.py`) are named `SERVER.TOOL`; their
supervisor adds and removes them here as their servers list them, and
`tools reload` leaves them alone.
"""

import errno
import json
import logging
import time
from pathlib import Path
from typing import Any

import jsonschema
import jsonschema.exceptions
import trio

from .. import params
from ..errors import KernelError, errno_name
from ..memory.manager import MemoryManager
from ..types import Agent, AgentLookup, AuditSink, Caller
from .builtin import builtin_tools
from .external import read_manifest
from .spec import ToolCall, ToolSpec

log = logging.getLogger(__name__)


class ToolManager:
    def __init__(self, audit: AuditSink, agents: AgentLookup, memory: MemoryManager, directory: Path | None = None) -> None:
        self.log_event = audit
        self.directory = directory
        self.tools: dict[str, ToolSpec] = {}
        # Every name ever served, in order: a tool's position is its index in tools/
        # (its inode numbers), kept for the manager's life even if the tool goes away.
        self.order: list[str] = []
        for spec in builtin_tools(agents, memory):
            self.add(spec)
        self.reload()

    # -- the registry ------------------------------------------------------------------
    def add(self, spec: ToolSpec) -> None:
        self.tools[spec.name] = spec
        if spec.name not in self.order:
            self.order.append(spec.name)

    def remove(self, name: str) -> None:
        """Stop serving a tool; its index stays reserved for it (its files answer ENOENT)."""
        self.tools.pop(name, None)

    def spec(self, name: str) -> ToolSpec:
        spec = self.tools.get(name)
        if spec is None:
            raise KernelError(errno.ENOENT, f"no tool named {name!r} (see tools/)")
        return spec

    def index(self, name: str) -> int | None:
        """The tool's index in tools/, None when it is not served."""
        return self.order.index(name) if name in self.tools else None

    def by_index(self, index: int) -> ToolSpec | None:
        if not 0 <= index < len(self.order):
            return None
        return self.tools.get(self.order[index])

    def served(self) -> list[tuple[int, ToolSpec]]:
        """(index, spec) of every tool served now, in index order."""
        return [(i, self.tools[name]) for i, name in enumerate(self.order) if name in self.tools]

    def reload(self) -> list[str]:
        """Read the tools directory again: new tools get new indexes, changed ones are
        replaced, those whose manifest went away are dropped. Returns the external names."""
        loaded = self._read_directory()  # only external tools come and go here: built-in and MCP tools stay
        for name in [n for n, s in self.tools.items() if s.manifest is not None and n not in loaded]:
            del self.tools[name]
        for name, spec in loaded.items():
            old = self.tools.get(name)
            if old is None or old.source != spec.source:
                self.add(spec)
        return sorted(loaded)

    def _read_directory(self) -> dict[str, ToolSpec]:
        if self.directory is None:
            return {}
        if not self.directory.is_dir():
            self._bad_manifest(self.directory, "the tools directory is missing")
            return {}
        specs: dict[str, ToolSpec] = {}
        for path in sorted(self.directory.glob("*.json")):
            try:
                spec = read_manifest(path, self.directory)
                if spec.name in self.tools and self.tools[spec.name].manifest is None:
                    raise ValueError(f"{spec.name!r} is the name of a built-in tool")
                specs[spec.name] = spec
            except (OSError, ValueError) as exc:
                self._bad_manifest(path, str(exc))
        return specs

    def _bad_manifest(self, path: Path, message: str) -> None:
        log.warning("tool manifest %s skipped: %s", path, message)
        self.log_event("tool_error", manifest=str(path), message=message)

    # -- calls -------------------------------------------------------------------------
    async def call(self, caller: Caller, agent: Agent | None, name: str, arguments: Any) -> Any:
        """Run one call; every call, refused or not, is a `tool` line in the audit log."""
        started = time.monotonic()
        try:
            result = await self._call(caller, agent, name, arguments)
        except KernelError as exc:
            self._audit(caller, agent, name, arguments, started, errno=errno_name(exc.errno), error=_cut(exc.message))
            raise
        self._audit(caller, agent, name, arguments, started, result=_cut(json.dumps(result, ensure_ascii=False)))
        return result

    async def _call(self, caller: Caller, agent: Agent | None, name: str, arguments: Any) -> Any:
        spec = self.spec(name)
        if agent is not None:
            self._check_policy(caller, agent, spec)
        self._validate(spec, arguments)
        if spec.needs_agent and agent is None:
            raise KernelError(errno.EINVAL, f'{name} acts for an agent: call it with {{"agent": NAME, "arguments": {{...}}}}')
        with trio.move_on_after(spec.timeout):  # the wait for a turn counts too
            async with spec.semaphore:
                return await self._invoke(spec, ToolCall(caller, agent, arguments))
        raise KernelError(errno.ETIMEDOUT, f"tool {name} did not finish within {spec.timeout:g} s")

    def _check_policy(self, caller: Caller, agent: Agent, spec: ToolSpec) -> None:
        """EPERM for a tool the agent's `permissions` leave out; the denial is audited
        here, since calls by the model do not pass through a syscall."""
        allowed = agent.policy.tools
        if allowed is None or spec.name in allowed:
            return
        exc = KernelError(errno.EPERM, f"tool {spec.name} is not allowed for {agent.name!r} (permissions: tools {' '.join(allowed)})")
        self.log_event("deny", syscall="tool_call", uid=caller.uid, pid=caller.pid, errno="EPERM", message=exc.message, agent=agent.name)
        exc.audited = True
        raise exc

    @staticmethod
    def _validate(spec: ToolSpec, arguments: Any) -> None:
        error = jsonschema.exceptions.best_match(spec.validator.iter_errors(arguments))
        if error is not None:
            where = "/".join(str(part) for part in error.absolute_path)
            raise KernelError(errno.EINVAL, f"{spec.name}: {error.message}" + (f" (at {where})" if where else ""))

    @staticmethod
    async def _invoke(spec: ToolSpec, call: ToolCall) -> Any:
        """The tool's own run; a bug inside a built-in is the tool's failure (EIO), not the kernel's."""
        try:
            return await spec.run(call)
        except KernelError:
            raise
        except Exception as exc:
            log.exception("tool %s failed", spec.name)
            raise KernelError(errno.EIO, f"tool {spec.name} failed: {exc}") from None

    def _audit(self, caller: Caller, agent: Agent | None, name: str, arguments: Any, started: float, **outcome: Any) -> None:
        self.log_event(
            "tool",
            name=name,
            agent=agent.name if agent is not None else None,
            uid=caller.uid,
            arguments=_cut(json.dumps(arguments, ensure_ascii=False, default=str)),
            duration_ms=round((time.monotonic() - started) * 1000, 1),
            **outcome,
        )


def _cut(text: str) -> str:
    return text if len(text) <= params.TOOL_ERROR_CHARS else text[: params.TOOL_ERROR_CHARS] + "…"
