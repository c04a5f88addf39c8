"""What each MCP tool and resource does in the mount: file operations, as the user
who runs the server.

Every operation runs in a worker thread (through `MountClient`, clients/mountclient.py),
so a read that waits for the model holds a thread, never the trio loop. Failures
are `FileError`s: the errno the mount gave and, when the kernel wrote one for this
operation, the line of the agent's `error` file that says why.

A turn has a bounded wait (`timeout`); when it passes, or when the MCP client
cancels its request, the turn is cancelled in the kernel: a stateless chat's `call`
file is closed, a conversation turn gets `cancel ID` written to the agent's `ctl`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import re
import select
import stat
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import trio

from ..mountclient import FileError, MountClient

READ_CHUNK = 1 << 16
WAKE_SECONDS = 0.25  # a turn's reader looks this often whether it was cancelled
MAX_LISTED = 1000  # entries list_memory returns, and resources the listing names, at most
CONFIG_KEY = re.compile(r"[a-z_]+")


def agent_uri(name: str, tail: str) -> str:
    """The resource URI of an agent's file: aiosfs://agents/NAME/TAIL (both %-escaped)."""
    return f"aiosfs://agents/{quote(name, safe='')}/{quote(tail, safe='/')}"


class Operations:
    def __init__(self, client: MountClient, timeout: float) -> None:
        self.client = client
        self.timeout = timeout
        # This server's conversation turns on one agent go one at a time: `output` binds
        # to the uid's latest job, so two turns of one uid in flight could swap answers.
        self.turn_locks: dict[str, trio.Lock] = {}

    def agent(self, name: str) -> Path:
        """agents/NAME; EINVAL for what cannot be an agent's name."""
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            raise FileError(errno.EINVAL, f"{name!r} is not an agent name (one directory name: no '/', not '.' or '..')")
        return self.client.agents / name

    def memory_path(self, agent: Path, path: str) -> Path:
        """A path under the agent's memory/; EINVAL for one that would leave it."""
        relative = posixpath.normpath(path.lstrip("/")) if path.strip("/") else "."
        if relative == ".." or relative.startswith("../"):
            raise FileError(errno.EINVAL, f"{path!r} leaves the agent's memory/")
        return agent / "memory" / ("" if relative == "." else relative)

    @contextlib.asynccontextmanager
    async def about(self, agent: Path) -> AsyncIterator[None]:
        """What fails inside says why: that the agent does not exist, or the line the
        kernel wrote to the agent's `error` file about it (none: the errno's text)."""
        start = time.time()
        try:
            yield
        except FileError as exc:
            if exc.errno == errno.ENOENT and not await self.client.run(agent.is_dir):
                raise FileError(errno.ENOENT, f"there is no agent {agent.name} (list_agents lists them, create_agent makes one)") from None
            if exc.message != os.strerror(exc.errno):
                raise  # explained already
            raise FileError(exc.errno, await self.client.why(agent, exc, start)) from None

    # -- agents ----------------------------------------------------------------------------
    async def agents(self) -> list[dict[str, Any]]:
        return await self.client.run(_list_agents, self.client.agents)

    async def create(self, name: str, config: dict[str, str], private: bool, exist_ok: bool) -> dict[str, str]:
        """mkdir agents/NAME (0700 when private), then `config` appended (`>>`: other keys keep theirs)."""
        agent = self.agent(name)
        for key in config:
            if not CONFIG_KEY.fullmatch(key):
                raise FileError(errno.EINVAL, f"{key!r} is not a config key (docs/protocol.md §4)")
        made = await self.client.run(_make_agent, agent, 0o700 if private else 0o777, exist_ok)
        if config:
            text = "".join(f"{key}={_escape(value)}\n" for key, value in config.items())
            try:
                async with self.about(agent):
                    await self.client.run(_write_file, agent / "config", text.encode(), os.O_WRONLY | os.O_APPEND)
            except FileError as exc:
                kept = f" (the agent {name} was made, with the default config)" if made else ""
                raise FileError(exc.errno, exc.message + kept) from None
        async with self.about(agent):
            return _config(await self.client.read(agent / "config"))

    async def ask(self, name: str, message: str, overrides: dict[str, Any]) -> tuple[str, int | None]:
        """A turn in the agent's conversation: `prompt`, then `output` (the exchange joins `context`)."""
        agent = self.agent(name)
        request = json.dumps({"prompt": message} | overrides, ensure_ascii=False).encode()
        lock = self.turn_locks.setdefault(agent.name, trio.Lock())
        with trio.move_on_after(self.timeout):
            async with lock, self.about(agent):
                answer, job = await self.client.run_cancellable(_turn, agent, request)
            return answer.removesuffix("\n"), job
        raise self._timed_out()

    async def chat(self, name: str, envelope: dict[str, Any]) -> str:
        """A stateless turn through the agent's `call` file: the envelope's messages are the
        whole conversation; the agent's `context` is neither read nor changed."""
        agent = self.agent(name)
        with trio.move_on_after(self.timeout):
            async with self.about(agent):
                answer = await self.client.call(agent, envelope, since=time.time())
            return answer.removesuffix("\n")
        raise self._timed_out()

    def _timed_out(self) -> FileError:
        return FileError(errno.ETIMEDOUT, f"no answer within {self.timeout:g} s (aiosfs mcp --timeout): the turn was cancelled")

    async def context(self, name: str) -> str:
        """The agent's context: JSON Lines of {"role", "content"}."""
        agent = self.agent(name)
        async with self.about(agent):
            return await self.client.read(agent / "context")

    # -- memory/ -------------------------------------------------------------------------
    async def write_memory(self, name: str, path: str, content: str, append: bool) -> int:
        """Write (or append to) a memory/ file, its directories made as needed; its size after."""
        agent = self.agent(name)
        target = self.memory_path(agent, path)
        if target == agent / "memory":
            raise FileError(errno.EINVAL, "a file's path under memory/ is needed")
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        async with self.about(agent):
            await self.client.run(_write_file, target, content.encode(), flags, True)
            return (await self.client.run(target.stat)).st_size

    async def read_memory(self, name: str, path: str) -> bytes:
        agent = self.agent(name)
        async with self.about(agent):
            return await self.client.run(self.memory_path(agent, path).read_bytes)

    async def list_memory(self, name: str, path: str) -> tuple[list[dict[str, Any]], bool]:
        """The entries under memory/PATH (everything below it, depth first), at most MAX_LISTED."""
        agent = self.agent(name)
        async with self.about(agent):
            return await self.client.run(_list_tree, agent / "memory", self.memory_path(agent, path), MAX_LISTED)

    async def recall(self, name: str, query: str, k: int) -> list[dict[str, Any]]:
        agent = self.agent(name)
        async with self.about(agent):
            return await self.client.recall(agent, query, k)

    # -- tools/ ----------------------------------------------------------------------------
    async def tools(self) -> list[dict[str, Any]]:
        """Each served tool's NAME.schema: {"name", "description", "schema"}."""
        return await self.client.run(_served_tools, self.client.root / "tools")

    async def run_tool(self, tool: str, arguments: dict[str, Any], agent: str | None) -> Any:
        if not tool or "/" in tool or tool.startswith(".") or tool.endswith(".schema"):
            raise FileError(errno.EINVAL, f"{tool!r} is not a tool's name (list_mount_tools lists them)")
        try:
            return await self.client.tool(None if agent is None else self.agent(agent), tool, arguments)
        except FileError as exc:
            if exc.errno == errno.ENOENT and not await self.client.run((self.client.root / "tools" / tool).exists):
                raise FileError(errno.ENOENT, f"the mount serves no tool {tool!r} (list_mount_tools lists them)") from None
            raise

    # -- resources -------------------------------------------------------------------------
    async def resources(self) -> list[tuple[str, str, str]]:
        """(uri, name, kind) of every agent's context and memory/ file this user may read."""
        return await self.client.run(_readable_resources, self.client.agents, MAX_LISTED)


def _escape(value: str) -> str:
    """A config value on one line: `\\` and newlines escaped as config reads them (protocol.md §4)."""
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _config(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


# -- in worker threads -----------------------------------------------------------------------
def _make_agent(path: Path, mode: int, exist_ok: bool) -> bool:
    """Made now (True) or there already (False, with exist_ok)."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not exist_ok:
            raise FileError(errno.EEXIST, f"the agent {path.name} exists (with exist_ok, the config given is set on it)") from None
        return False
    return True


def _write_file(path: Path, data: bytes, flags: int, parents: bool = False) -> None:
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)  # commits: its error is the kernel's verdict


def _turn(agent: Path, request: bytes, stop: threading.Event) -> tuple[str, int | None]:
    """Write the request to `prompt` (its close queues the job), then read `output`,
    which binds to this uid's latest job: that one. Once `stop` is set the job is
    cancelled through `ctl`."""
    _write_file(agent / "prompt", request, os.O_WRONLY)
    fd = os.open(agent / "output", os.O_RDONLY | os.O_NONBLOCK)
    try:
        job = _job((agent / "status").read_text())
        waiting = select.poll()
        waiting.register(fd, select.POLLIN)
        out = bytearray()
        while True:
            try:
                chunk = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                if stop.is_set():
                    _cancel(agent, job)
                    raise FileError(errno.ECANCELED, "the request was cancelled") from None
                waiting.poll(WAKE_SECONDS * 1000)
                continue
            if not chunk:
                return out.decode("utf-8", errors="replace"), job
            out += chunk
    finally:
        os.close(fd)


def _job(status: str) -> int | None:
    """The job id of a `status` line, "<state> <job-id|->"."""
    parts = status.split()
    return int(parts[1]) if len(parts) == 2 and parts[1].isdigit() else None


def _cancel(agent: Path, job: int | None) -> None:
    try:
        _write_file(agent / "ctl", f"cancel {job if job is not None else ''}".rstrip().encode() + b"\n", os.O_WRONLY)
    except OSError:
        pass  # nothing more can be done from here: the job runs to its end


def _list_agents(agents: Path) -> list[dict[str, Any]]:
    """The agents this user may enter (x on the directory), by name."""
    found = []
    with os.scandir(agents) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            path = Path(entry.path)
            try:
                info = entry.stat()
            except OSError:
                continue
            if not stat.S_ISDIR(info.st_mode) or not os.access(path, os.X_OK):
                continue
            try:
                state, _, job = (path / "status").read_text().strip().partition(" ")
            except OSError:
                state, job = "unknown", "-"
            found.append(
                {
                    "name": entry.name,
                    "owner_uid": info.st_uid,
                    "mode": f"{stat.S_IMODE(info.st_mode):04o}",
                    "state": state,
                    "job": int(job) if job.isdigit() else None,
                    "can_ask": os.access(path / "prompt", os.W_OK),
                    "can_read": os.access(path / "context", os.R_OK),
                }
            )
    return found


def _list_tree(memory: Path, top: Path, limit: int) -> tuple[list[dict[str, Any]], bool]:
    entries: list[dict[str, Any]] = []
    for path, info in _walk(top, error=True):
        if len(entries) == limit:
            return entries, True
        kind = "dir" if stat.S_ISDIR(info.st_mode) else "symlink" if stat.S_ISLNK(info.st_mode) else "file"
        entries.append({"path": str(path.relative_to(memory)), "kind": kind, "bytes": info.st_size})
    return entries, False


def _walk(top: Path, error: bool = False) -> Iterator[tuple[Path, os.stat_result]]:
    """Everything below `top` (or `top` itself, when it is not a directory), depth first,
    sorted; what this user may not read is passed over (an error only for `top`)."""
    info = top.lstat()
    if not stat.S_ISDIR(info.st_mode):
        yield top, info
        return
    try:
        names = sorted(os.listdir(top))
    except OSError:
        if error:
            raise
        return
    for name in names:
        path = top / name
        try:
            info = path.lstat()
        except OSError:
            continue
        yield path, info
        if stat.S_ISDIR(info.st_mode):
            try:
                yield from _walk(path)
            except OSError:
                continue  # gone meanwhile


def _served_tools(tools: Path) -> list[dict[str, Any]]:
    return [json.loads((tools / name).read_text()) for name in sorted(os.listdir(tools)) if name.endswith(".schema")]


def _readable_resources(agents: Path, limit: int) -> list[tuple[str, str, str]]:
    found: list[tuple[str, str, str]] = []
    for agent in _list_agents(agents):
        name = agent["name"]
        if agent["can_read"]:
            found.append((agent_uri(name, "context"), f"{name}/context", "context"))
        memory = agents / name / "memory"
        try:
            for path, info in _walk(memory):
                if len(found) >= limit:
                    return found
                if stat.S_ISREG(info.st_mode) and os.access(path, os.R_OK):
                    relative = str(path.relative_to(memory))
                    found.append((agent_uri(name, f"memory/{relative}"), f"{name}/memory/{relative}", "memory"))
        except OSError:
            continue  # memory/ this user may not enter
    return found[:limit]
