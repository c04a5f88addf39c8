"""tools/ in the mount: its entries, their inode numbers, and the handles of its
files: `NAME` (rpc: write a call, read its result as one JSON line) and
`NAME.schema` (a snapshot of the tool's name, description and schema).

A tool's files carry its index in the tool manager + 1 where an agent's files
carry the agent id (`inode(index + 1, Kind.TOOL)`). Indexes last as long as the
mount, so an inode never names another tool; the files of a tool that
`tools reload` dropped answer ENOENT.
"""

from __future__ import annotations

import errno
import json
from typing import Any

import pyfuse3

from kernel import Agent, Caller, Kernel, ToolSpec, params
from kernel.errors import KernelError, errno_name
from kernel.syscall import Sys, checks, syscall

from .dirtab import BY_KIND, Entry, Kind, agent_of, inode, kind_of
from .files import AskHandle, Handle, SnapshotHandle

SCHEMA_SUFFIX = ".schema"
TOOL_KINDS = (Kind.TOOL, Kind.TOOL_SCHEMA)
ENVELOPE = '{"agent": NAME, "arguments": {...}}'


def tool_of(kernel: Kernel, ino: int) -> ToolSpec:
    spec = kernel.tools.by_index(agent_of(ino) - 1)
    if spec is None:
        raise pyfuse3.FUSEError(errno.ENOENT)
    return spec


def entry(kernel: Kernel, ino: int) -> Entry:
    """The table entry of a tool's file (ENOENT once the tool is gone)."""
    tool_of(kernel, ino)
    return BY_KIND[kind_of(ino)]


def lookup(kernel: Kernel, name: str) -> int:
    """The inode of `tools/NAME` or `tools/NAME.schema`."""
    schema = name.endswith(SCHEMA_SUFFIX)
    index = kernel.tools.index(name.removesuffix(SCHEMA_SUFFIX) if schema else name)
    if index is None:
        raise pyfuse3.FUSEError(errno.ENOENT)
    return inode(index + 1, Kind.TOOL_SCHEMA if schema else Kind.TOOL)


def listing(kernel: Kernel) -> list[tuple[int, str, int]]:
    """readdir rows (next id, name, inode); ids follow the indexes, so a listing resumes
    at the right place while tools come and go."""
    rows = []
    for index, spec in kernel.tools.served():
        rows.append((2 * index + 1, spec.name, inode(index + 1, Kind.TOOL)))
        rows.append((2 * index + 2, spec.name + SCHEMA_SUFFIX, inode(index + 1, Kind.TOOL_SCHEMA)))
    return rows


def schema_text(kernel: Kernel, ino: int) -> str:
    """`tools/NAME.schema`: the tool's name, description and schema."""
    return json.dumps(tool_of(kernel, ino).describe(), indent=2, ensure_ascii=False) + "\n"


def open_handle(kernel: Kernel, caller: Caller, ino: int, flags: int) -> Handle:
    spec = tool_of(kernel, ino)
    if kind_of(ino) is Kind.TOOL_SCHEMA:
        return SnapshotHandle(kernel, caller, None, flags, schema_text(kernel, ino))
    return ToolHandle(kernel, caller, flags, spec.name)


def parse_call(kernel: Kernel, data: bytes) -> tuple[Agent | None, Any]:
    """(agent or None, arguments) of what was written: the arguments, or an envelope
    `{"agent": NAME, "arguments": {...}}` (exactly those two keys) acting for NAME."""
    try:
        request = checks.loads(data.decode("utf-8"), "the arguments")
    except ValueError as exc:  # UnicodeDecodeError is one
        raise KernelError(errno.EINVAL, f"write the arguments as a JSON object, or {ENVELOPE} ({exc})") from None
    if isinstance(request, dict) and set(request) == {"agent", "arguments"}:
        if not isinstance(request["agent"], str):
            raise KernelError(errno.EINVAL, f"the envelope's agent is an agent's name: {ENVELOPE}")
        return kernel.agents.named(request["agent"]), request["arguments"]
    return None, request


def result_line(result: Any = None, error: KernelError | None = None) -> bytes:
    body = {"ok": True, "result": result} if error is None else {"ok": False, "errno": errno_name(error.errno), "error": error.message}
    return json.dumps(body, ensure_ascii=False).encode() + b"\n"


class ToolHandle(AskHandle):
    """tools/NAME: writes collect; the first read after them runs the call and returns
    one JSON line; after an error line the next read fails with its errno (so `cat`
    exits non-zero); the next write starts the next call. Each fd is its own session."""

    def __init__(self, kernel: Kernel, caller: Caller, flags: int, name: str) -> None:
        super().__init__(kernel, caller, None, flags)
        self.name = name

    async def check(self, data: bytes) -> None:
        if len(data) > params.TOOL_ARGUMENTS_MAX_BYTES:
            raise KernelError(errno.EFBIG, f"a tool call is at most {params.TOOL_ARGUMENTS_MAX_BYTES} bytes")

    async def answer(self, data: bytes) -> tuple[bytes, int]:
        """(the result line, the errno to report after it or 0)."""
        try:
            agent, arguments = parse_call(self.kernel, data)
            result = await syscall(self.kernel, Sys.TOOL_CALL, self.caller, agent, self.name, arguments)
        except KernelError as exc:
            return result_line(error=exc), exc.errno
        return result_line(result), 0
