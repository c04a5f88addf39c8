"""One MCP server of the mount's config (`[[mcp]]`), supervised: started,
watched and started again, and its tools are served as `SERVER.TOOL` through the
tool manager, so access, policy, validation, timeouts and the audit log apply to
them as to any tool. The protocol is the `mcp` SDK's.

A stdio server is started by a small launcher (the daemon's Python) that gives
it exactly its environment (`McpServerConfig.environment`), enters its `cwd`,
drops to its `user` when one is configured, reports its pid on stderr, and execs
it in a session of its own, whose process group the SDK ends at the unmount. Its
stderr goes to the daemon's log (at most `MCP_STDERR_LINES` lines a minute, at
INFO); the last lines say why it stopped. An HTTP server is reached with the
SDK's streamable HTTP client.

One server's life: `starting` (the first start), `ready` (initialized, tools
listed and served), then, when its connection ends (its process exits, its
stdout closes, an idle ping goes unanswered for `ping` seconds), `restarting`
while it waits and starts again; a start that fails (the command is missing, no
answer to initialize or to the listing within `MCP_START_SECONDS`) makes it
`failed`, and it is tried again all the same. The wait doubles from
`MCP_RESTART_MIN_SECONDS` to `MCP_RESTART_MAX_SECONDS` and starts over after a
run of `MCP_RESTART_RESET_SECONDS`. While it is not ready its tools stay in
`tools/` (their inode numbers never change) and calls fail at once with EIO;
calls in flight when it stops get EIO. A call that outlives its timeout is
ETIMEDOUT and the server is kept: it may still answer the next call.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import mcp_types as types
import trio
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from .. import params
from ..errors import KernelError
from ..types import AuditSink
from .manager import ToolManager
from .mcpconfig import McpServerConfig
from .mcptools import file_name, result_value, tool_specs
from .spec import Runner, ToolCall

log = logging.getLogger(__name__)

SPEC_VARIABLE = "AIOSFS_MCP_SERVER"  # the launcher's instructions (its environment: not shown to other users)
PID_MARK = "aiosfs-mcp-pid "
# Runs as `python -I -c LAUNCHER`; what it reports goes to the server's stderr, which the daemon reads.
LAUNCHER = f"""
import json, os
spec = json.loads(os.environ.pop({SPEC_VARIABLE!r}))
os.write(2, b"{PID_MARK}%d\\n" % os.getpid())
try:
    os.chdir(spec["cwd"])
    if spec["uid"] is not None:
        os.setgroups([])
        os.setgid(spec["gid"])
        os.setuid(spec["uid"])
    os.execve(spec["argv"][0], spec["argv"], spec["env"])
except OSError as exc:
    os.write(2, ("cannot start %s: %s\\n" % (spec["argv"][0], exc.strerror or exc)).encode())
    os._exit(127)
"""
CLIENT = types.Implementation(name="aiosfs", version="0.1.0")


class StartFailed(Exception):
    """A start that cannot go on; the message says why."""


class WatchedStream:
    """The transport's read stream, as the session reads it, noting when it ends: the
    server closed its stdout (it exited) or the transport gave up."""

    def __init__(self, inner: Any, ended: Any, reason: str) -> None:
        self.inner = inner
        self.ended = ended  # called with `reason` once the stream has ended
        self.reason = reason

    @property
    def last_context(self) -> Any:
        return getattr(self.inner, "last_context", None)

    async def receive(self) -> Any:
        try:
            return await self.inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.ended(self.reason)
            raise

    def __aiter__(self) -> WatchedStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self) -> WatchedStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class McpServer:
    """One server of the config: its connection, its state, and its tools."""

    def __init__(self, config: McpServerConfig, tools: ToolManager, audit: AuditSink) -> None:
        self.config = config
        self.name = config.name
        self.tools = tools
        self.audit = audit
        self.state = "starting"
        self.pid: int | None = None
        self.restarts = 0
        self.error = ""  # why it last stopped or failed to start
        self.served: list[str] = []  # the names of its tools in tools/ (SERVER.TOOL)
        self.session: ClientSession | None = None  # while ready
        self.in_flight = 0
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=params.MCP_STDERR_TAIL)
        self._ended = ""  # why the running connection ended, once it has
        self.http_status = ""  # the last HTTP error status of this connection
        self._relist = False  # the server said its tools changed
        self._wake = trio.Event()
        self._logged: collections.deque[float] = collections.deque()  # when stderr lines were logged, the last minute's
        self._dropped = 0

    # -- supervision -------------------------------------------------------------------
    async def run(self) -> None:
        """Start the server, and start it again whenever it stops, until cancelled."""
        wait = params.MCP_RESTART_MIN_SECONDS
        while True:
            ready_for = await self._run_once()
            if ready_for >= params.MCP_RESTART_RESET_SECONDS:
                wait = params.MCP_RESTART_MIN_SECONDS
            action = "exit" if ready_for else "fail"
            self.state = "restarting" if ready_for else "failed"
            tail = "; its last stderr: " + " | ".join(self.stderr_tail) if self.stderr_tail else ""
            verb = "stopped" if ready_for else "could not start"
            log.warning("MCP server %s %s: %s%s; starting it again in %g s", self.name, verb, self.error, tail, wait)
            self.audit("mcp", server=self.name, action=action, pid=self.pid, message=_cut(self.error + tail), restart_in=wait)
            self.pid = None
            await trio.sleep(wait)
            wait = min(wait * 2, params.MCP_RESTART_MAX_SECONDS)
            self.restarts += 1

    async def _run_once(self) -> float:
        """Start the server and serve until its connection ends; how long it was ready
        (0: it never was), with `self.error` saying why it ended."""
        self._ended, self._relist, self._wake, self.http_status = "", False, trio.Event(), ""
        self.stderr_tail.clear()
        ready_at: float | None = None
        try:
            async with self._transport() as (read, write):
                stream = WatchedStream(read, self._end, "its process ended (its stdout closed)" if self.config.command else "its connection closed")
                async with ClientSession(stream, write, message_handler=self._on_message, client_info=CLIENT) as session:
                    await self._start(session)
                    ready_at = time.monotonic()
                    self.error = await self._watch(session)
        except Exception as exc:  # whatever the transport or the server did: the server stopped
            failed = _leaves(exc, StartFailed)
            self.error = str(failed[0]) if failed else self._ended or describe(exc)
            if self.http_status:
                self.error += f" ({self.http_status})"
        finally:
            self.session = None
        return 0.0 if ready_at is None else max(time.monotonic() - ready_at, 1e-3)

    async def _start(self, session: ClientSession) -> None:
        """Initialize, list the tools and serve them, within MCP_START_SECONDS."""
        with trio.move_on_after(params.MCP_START_SECONDS):
            try:
                await session.initialize()
                listed = await self._list(session)
            except MCPError as exc:
                raise StartFailed(self._ended or f"{describe(exc)}") from None
            self._install(listed)
            self.session = session
            self.state = "ready"
            log.info("MCP server %s is ready (pid %s): %d tools", self.name, self.pid or "-", len(self.served))
            self.audit("mcp", server=self.name, action="ready", pid=self.pid, tools=len(self.served))
            return
        raise StartFailed(self._ended or f"no answer to initialize and tools/list within {params.MCP_START_SECONDS:g} s")

    async def _watch(self, session: ClientSession) -> str:
        """Serve until the connection ends; why it did. An idle server is pinged."""
        ping = self.config.ping or math.inf
        while True:
            with trio.move_on_after(ping):
                await self._wake.wait()
            self._wake = trio.Event()
            if self._ended:
                return self._ended
            if self._relist:
                self._relist = False
                with trio.move_on_after(params.MCP_START_SECONDS) as scope:
                    self._install(await self._list(session))
                if scope.cancelled_caught:
                    self._end(f"no answer to tools/list within {params.MCP_START_SECONDS:g} s")
                    self._kill()
                    return self._ended
            elif self.in_flight == 0 and self.config.ping:
                with trio.move_on_after(self.config.ping) as scope:
                    await session.send_ping()
                if scope.cancelled_caught:  # hung (or stopped): it would not end on its own
                    self._end(f"no answer to a ping within {self.config.ping:g} s")
                    self._kill()
                    return self._ended

    def _kill(self) -> None:
        """SIGKILL to a stdio server's process group (its own session)."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)

    def _end(self, reason: str) -> None:
        if not self._ended:
            self._ended = reason
            self.session = None  # calls from now on fail at once
            if self.state == "ready":
                self.state = "restarting"
        self._wake.set()

    async def _on_message(self, message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            self._relist = True
            self._wake.set()
        elif isinstance(message, Exception):
            log.info("MCP server %s: %s", self.name, describe(message))

    async def _list(self, session: ClientSession) -> list[types.Tool]:
        tools: list[types.Tool] = []
        cursor: str | None = None
        for _ in range(params.MCP_LIST_PAGES):
            page = await session.list_tools(params=types.PaginatedRequestParams(cursor=cursor) if cursor else None)
            tools += page.tools
            cursor = page.next_cursor
            if not cursor:
                break
        return tools

    def _install(self, listed: Sequence[types.Tool]) -> None:
        """Serve the listed tools: new ones are added, changed ones replaced, those it no
        longer lists removed (their indexes in tools/ stay theirs)."""
        specs = tool_specs(self.name, listed, self.config.tools, self.config.timeout, self._runner)
        names = [spec.name for spec in specs]
        for name in self.served:
            if name not in names:
                self.tools.remove(name)
        for spec in specs:
            old = self.tools.tools.get(spec.name)
            if old is None or old.source != spec.source:
                self.tools.add(spec)
        self.served = names

    # -- calls -------------------------------------------------------------------------
    def _runner(self, tool: str) -> Runner:
        return functools.partial(self.call, tool)

    async def call(self, tool: str, call: ToolCall) -> Any:
        """One call of the server's tool `tool` (its MCP name), on the tool manager's
        deadline; EIO when the server is not running or stops during the call."""
        name = f"{self.name}.{file_name(tool)}"
        session = self.session
        if session is None:
            why = f"; last error: {self.error}" if self.error else ""
            raise KernelError(errno.EIO, f"MCP server {self.name} is not running ({self.state}{why})")
        self.in_flight += 1
        try:
            result = await session.call_tool(tool, call.arguments, read_timeout_seconds=self.config.timeout)
        except MCPError as exc:
            if exc.code == types.CONNECTION_CLOSED:
                raise KernelError(errno.EIO, f"MCP server {self.name} stopped during the call of {name}") from None
            if exc.code == types.REQUEST_TIMEOUT:
                raise KernelError(errno.ETIMEDOUT, f"{name} did not finish within {self.config.timeout:g} s") from None
            raise KernelError(errno.EIO, f"{name}: {_cut(describe(exc))}") from None
        except Exception as exc:  # the SDK's own checks of the result (an output schema, input it would need)
            raise KernelError(errno.EIO, f"{name}: {_cut(describe(exc))}") from None
        finally:
            self.in_flight -= 1
        if not isinstance(result, types.CallToolResult):
            raise KernelError(errno.EIO, f"{name}: the server answered with a {type(result).__name__}, not a tool result")
        return result_value(name, result)

    # -- transports --------------------------------------------------------------------
    def _transport(self) -> Any:
        return self._stdio() if self.config.command else self._http()

    @asynccontextmanager
    async def _stdio(self) -> AsyncIterator[Any]:
        """The server's process, through the launcher, with its stderr read into the log."""
        config = self.config
        try:
            identity = config.identity()
        except ValueError as exc:
            raise StartFailed(str(exc)) from None
        env = config.environment(identity.home)
        program = _program(config.command, config.cwd, env["PATH"])
        spec = {"argv": [program, *config.args], "env": env, "cwd": config.cwd, "uid": identity.uid, "gid": identity.gid}
        server = StdioServerParameters(command=sys.executable, args=["-I", "-c", LAUNCHER], env={SPEC_VARIABLE: json.dumps(spec)}, cwd="/")
        read_fd, write_fd = os.pipe()
        stderr = trio.lowlevel.FdStream(read_fd)
        errlog = os.fdopen(write_fd, "w")
        self.audit("mcp", server=self.name, action="start", command=program)
        async with trio.open_nursery() as nursery:
            relayed = trio.Event()
            nursery.start_soon(self._relay_stderr, stderr, relayed)
            try:
                async with stdio_client(server, errlog=errlog) as streams:
                    errlog.close()  # the process has it: its end is the pipe's end
                    yield streams
            finally:
                errlog.close()
                with trio.move_on_after(0.5, shield=True):  # its last lines, unless something it left holds the pipe
                    await relayed.wait()
                nursery.cancel_scope.cancel()

    @asynccontextmanager
    async def _http(self) -> AsyncIterator[Any]:
        try:
            headers = self.config.request_headers()
        except ValueError as exc:
            raise StartFailed(str(exc)) from None
        timeout = httpx2.Timeout(params.MCP_HTTP_CONNECT_SECONDS, read=params.TOOL_MAX_TIMEOUT_SECONDS)
        self.audit("mcp", server=self.name, action="start", url=self.config.url)
        async with httpx2.AsyncClient(headers=headers, timeout=timeout, event_hooks={"response": [self._note_status]}) as client:
            async with streamable_http_client(self.config.url, http_client=client) as streams:
                yield streams

    async def _note_status(self, response: httpx2.Response) -> None:
        """An HTTP error status, which the SDK's errors do not name, for the reason of a failure."""
        if response.status_code >= 400:
            self.http_status = f"HTTP {response.status_code} {response.reason_phrase}".strip()

    async def _relay_stderr(self, stream: trio.lowlevel.FdStream, relayed: trio.Event) -> None:
        """The server's stderr, line by line: its pid first (from the launcher), then
        what it writes, to the log within the rate limit. Its end says nothing: a
        server may close its stderr and go on (its stdout's end is what counts)."""
        pending = b""
        try:
            async with stream:
                while chunk := await stream.receive_some(65536):
                    *lines, pending = (pending + chunk).split(b"\n")
                    for line in lines:
                        self._stderr_line(line.decode("utf-8", errors="replace").rstrip())
                    pending = pending[-4096:]
            if pending:
                self._stderr_line(pending.decode("utf-8", errors="replace").rstrip())
        finally:
            relayed.set()

    def _stderr_line(self, line: str) -> None:
        if self.pid is None and line.startswith(PID_MARK) and line.removeprefix(PID_MARK).isdigit():  # the launcher's first line
            self.pid = int(line.removeprefix(PID_MARK))
            log.info("MCP server %s started: pid %d", self.name, self.pid)
            return
        if not line:
            return
        line = _cut(line)
        self.stderr_tail.append(line)
        now = time.monotonic()
        while self._logged and now - self._logged[0] > 60:
            self._logged.popleft()
        if len(self._logged) >= params.MCP_STDERR_LINES:
            self._dropped += 1
            return
        if self._dropped:
            log.info("MCP server %s: %d lines of its stderr were not logged", self.name, self._dropped)
            self._dropped = 0
        self._logged.append(now)
        log.info("MCP server %s (pid %s): %s", self.name, self.pid or "-", line)

    # -- what kernel/ps and kernel/status show -------------------------------------------
    def ps_line(self) -> str:
        return (
            f"mcp {self.name} transport={self.config.transport} pid={self.pid or '-'} state={self.state} "
            f"restarts={self.restarts} tools={len(self.served)} calls={self.in_flight}"
        )


def _program(command: str, cwd: str, path: str) -> str:
    """The program to run: a bare name is looked up in the server's PATH; a relative
    path is relative to cwd (the launcher says why one cannot run)."""
    if "/" in command:
        return os.path.normpath(os.path.join(cwd, command))
    found = shutil.which(command, path=path)
    if found is None:
        raise StartFailed(f"command {command!r} not found in PATH (give its full path, or PATH in env)")
    return found


def _leaves(exc: BaseException, kind: type[BaseException]) -> list[BaseException]:
    """The exceptions of type `kind` in `exc`, looking inside exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner, kind)]
    return [exc] if isinstance(exc, kind) else []


def describe(exc: BaseException) -> str:
    """An exception in a few words, those of a group's members included."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(inner) for inner in exc.exceptions)
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text and not isinstance(exc, MCPError) else text or type(exc).__name__


def _cut(text: str) -> str:
    return text if len(text) <= params.TOOL_ERROR_CHARS else text[: params.TOOL_ERROR_CHARS] + "…"
