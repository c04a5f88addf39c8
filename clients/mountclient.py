"""The gateway's side of the mount: plain file operations, as any agent makes them.

Every operation runs in a worker thread (a read of `call` blocks until the model has
answered; the trio thread must never wait on the mount). Failures are `FileError`s
with the errno the mount gave and, where the kernel wrote one, the line of the
agent's `error` file that says why.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import select
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

T = TypeVar("T")
READ_CHUNK = 1 << 16
WAKE_SECONDS = 0.25  # a turn's reader looks this often whether its query was cancelled
NAME_LIMIT = 255  # bytes of a directory name


class FileError(Exception):
    """An operation on the mount failed: its errno and what the kernel said."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code
        self.message = message

    @property
    def name(self) -> str:
        return errno.errorcode.get(self.errno, str(self.errno))

    def __str__(self) -> str:
        return f"{self.name}: {self.message}"


def dir_name(agent_name: str) -> str:
    """The directory of an AIOS agent name: `/` (as in "author/name"), `%` and NUL are
    %-escaped, and so are the dots of "." and ".."; `unescape` gives the name back."""
    if not agent_name:
        raise FileError(errno.EINVAL, "agent_name is empty")
    name = agent_name.replace("%", "%25").replace("/", "%2F").replace("\0", "%00")
    if name in (".", ".."):
        name = name.replace(".", "%2E")
    if len(name.encode()) > NAME_LIMIT:
        raise FileError(errno.ENAMETOOLONG, f"agent_name {agent_name[:40]!r}... is longer than a directory name may be ({NAME_LIMIT} bytes escaped)")
    return name


def unescape(directory: str) -> str:
    return re.sub(r"%([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), directory)


class MountClient:
    def __init__(self, root: Path, threads: int = 128) -> None:
        self.root = root
        self.agents = root / "agents"
        self.limiter = trio.CapacityLimiter(threads)  # file operations in flight (each blocked read holds one)

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        try:
            return await trio.to_thread.run_sync(function, *args, limiter=self.limiter)
        except OSError as exc:
            raise FileError(exc.errno or errno.EIO, exc.strerror or str(exc)) from None

    async def run_cancellable(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args, stop)` in a thread that a cancel lets go of: `stop` is set,
        and the function closes what it has open (a `call` file: the turn is cancelled)."""
        stop = threading.Event()
        try:
            return await trio.to_thread.run_sync(functools.partial(function, *args, stop), limiter=self.limiter, abandon_on_cancel=True)
        except OSError as exc:
            raise FileError(exc.errno or errno.EIO, exc.strerror or str(exc)) from None
        finally:
            stop.set()

    def check(self) -> str:
        """The kernel's status line; raises when `root` is not a live aiosfs mount."""
        return (self.root / "kernel" / "status").read_text().strip()

    # -- agents -------------------------------------------------------------------------
    async def agent(self, name: str) -> Path:
        """agents/<dir_name(name)>/, made on first use (owned by this process's user)."""
        path = self.agents / dir_name(name)
        await self.run(_make_agent, path)
        return path

    async def call(self, agent: Path, envelope: dict[str, Any], since: float = 0) -> str:
        """One stateless turn through the agent's `call` file: its answer, or FileError
        (with the `error` line about it, one written at or after `since` when given)."""
        data = json.dumps(envelope, ensure_ascii=False).encode()
        try:
            return await self.run_cancellable(_call, agent / "call", data, False)
        except FileError as exc:
            raise FileError(exc.errno, await self.why(agent, exc, since)) from None

    async def why(self, agent: Path, exc: FileError, since: float = 0) -> str:
        """The newest line of the agent's `error` file when it is about this errno
        (and was written at or after the Unix time `since`)."""
        try:
            text = await self.run((agent / "error").read_text)
        except FileError:
            return exc.message
        for line in reversed(text.splitlines()):
            parts = line.split(" ", 3)
            if len(parts) == 4 and parts[0] == exc.name and (not since or parts[2].isdigit() and int(parts[2]) >= int(since)):
                return parts[3]
        return exc.message

    # -- tools, recall, models -------------------------------------------------------------
    async def tool(self, agent: Path | None, name: str, arguments: Any) -> Any:
        """Run tools/NAME for the agent (None: for nobody, with the arguments alone);
        its result, or FileError with the tool's errno."""
        request = json.dumps(arguments if agent is None else {"agent": agent.name, "arguments": arguments}, ensure_ascii=False).encode()
        reply = json.loads(await self.run(_call, self.root / "tools" / name, request, True))
        if not reply.get("ok"):
            raise FileError(getattr(errno, reply.get("errno", "EIO"), errno.EIO), reply.get("error", "the tool failed"))
        return reply["result"]

    async def tools(self) -> list[str]:
        return sorted(n for n in await self.run(os.listdir, self.root / "tools") if not n.endswith(".schema"))

    async def recall(self, agent: Path, query: str, k: int) -> list[dict[str, Any]]:
        """Ranked passages of the agent's memory/ (JSON Lines of `recall`)."""
        request = json.dumps({"query": query, "k": k}, ensure_ascii=False).encode()
        text = await self.run(_call, agent / "recall", request)
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    async def models(self) -> list[tuple[str, str]]:
        """(name, backend) of each core in kernel/models, the default first."""
        text = await self.run((self.root / "kernel" / "models").read_text)
        return [(line.split()[0], line.split()[1]) for line in text.splitlines() if len(line.split()) > 1]

    async def ctl(self, agent: Path, line: str) -> None:
        await self.run(_write, agent / "ctl", (line + "\n").encode(), os.O_WRONLY)

    # -- files ---------------------------------------------------------------------------
    async def read(self, path: Path) -> str:
        return await self.run(path.read_text)

    async def write(self, path: Path, text: str, exclusive: bool = False) -> None:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
        await self.run(_write, path, text.encode(), flags)

    async def mkdir(self, path: Path, parents: bool = True) -> None:
        await self.run(lambda: path.mkdir(parents=parents, exist_ok=parents))


def _make_agent(path: Path) -> None:
    try:
        path.mkdir()
    except FileExistsError:
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write(path: Path, data: bytes, flags: int) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)  # commits: its errors are the kernel's verdict


def _call(path: Path, data: bytes, one_line: bool = False, stop: threading.Event | None = None) -> str:
    """Write a request to an rpc file (`call`, `recall`, tools/NAME) and read its answer
    to EOF (or its first line: a tool's error line is followed by a read that fails with
    its errno): the kernel commits the request at the first read. With `stop`, reads
    do not block: once `stop` is set the file is closed, which cancels the turn."""
    fd = os.open(path, os.O_RDWR | (os.O_NONBLOCK if stop is not None else 0))
    try:
        _write_all(fd, data)
        out = bytearray()
        while True:
            try:
                chunk = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                assert stop is not None
                if stop.is_set():
                    raise FileError(errno.ECANCELED, "the query was cancelled") from None
                select.select([fd], [], [], WAKE_SECONDS)
                continue
            if not chunk:
                break
            out += chunk
            if one_line and b"\n" in out:
                break
        return out.decode("utf-8", errors="replace")
    finally:
        os.close(fd)
