"""The built-in tools, run in the daemon: `calculator` (an `ast` walk, never
`eval`), `clock`, and `memory_search`, `memory_read`, `memory_write`, which act for
an agent on its `memory/` through the memory manager, as its owner."""

import ast
import datetime as dt
import errno
import functools
import logging
import math
import operator
import os
import stat
import time
from collections.abc import Callable
from typing import Any

from .. import params
from ..access.rules import check_share
from ..errors import KernelError
from ..memory.manager import MemoryManager, may_attr
from ..memory.store import Attr, MemoryStore
from ..types import Agent, AgentLookup, Caller
from .spec import ToolCall, ToolSpec

log = logging.getLogger(__name__)


# -- calculator ----------------------------------------------------------------------------------
def _power(base: int | float, exponent: int | float) -> int | float:
    """`**` with bounds checked before the work: the exponent, and the size of an integer result."""
    if abs(exponent) > params.CALC_MAX_EXPONENT:
        raise KernelError(errno.EINVAL, f"calculator: exponent {exponent} is beyond ±{params.CALC_MAX_EXPONENT}")
    if isinstance(base, int) and isinstance(exponent, int) and (abs(base).bit_length() - 1) * exponent > params.CALC_MAX_INT_BITS:
        raise KernelError(errno.EINVAL, f"calculator: the result would have more than {params.CALC_MAX_INT_BITS} bits")
    result: int | float = base**exponent
    return result


BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: _power,
}
UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt,
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
    "floor": math.floor,
    "ceil": math.ceil,
    "log": math.log,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
}
CONSTANTS = {"pi": math.pi, "e": math.e}
ALLOWED = f"numbers, + - * / // % **, parentheses, {' '.join(FUNCTIONS)}, pi, e"


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression, or EINVAL saying what is wrong with it."""
    if len(expression) > params.CALC_MAX_CHARS:
        raise KernelError(errno.EINVAL, f"calculator: an expression is at most {params.CALC_MAX_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise KernelError(errno.EINVAL, f"calculator: {expression!r} is not an arithmetic expression ({ALLOWED})") from None
    try:
        return _evaluate(tree.body)
    except ZeroDivisionError:
        raise KernelError(errno.EINVAL, "calculator: division by zero") from None
    except OverflowError:
        raise KernelError(errno.EINVAL, "calculator: a number is too large") from None
    except (ArithmeticError, ValueError, TypeError, RecursionError) as exc:
        raise KernelError(errno.EINVAL, f"calculator: {exc}") from None


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        return _bounded(BINARY[type(node.op)](_evaluate(node.left), _evaluate(node.right)))
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return _bounded(UNARY[type(node.op)](_evaluate(node.operand)))
    if isinstance(node, ast.Name) and node.id in CONSTANTS:
        return CONSTANTS[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS and not node.keywords:
        return _bounded(FUNCTIONS[node.func.id](*(_evaluate(arg) for arg in node.args)))
    raise KernelError(errno.EINVAL, f"calculator: {ast.unparse(node)[:60]!r} is not allowed ({ALLOWED})")


def _bounded(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise KernelError(errno.EINVAL, "calculator: the result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise KernelError(errno.EINVAL, "calculator: the result is not finite")
    if isinstance(value, int) and value.bit_length() > params.CALC_MAX_INT_BITS:
        raise KernelError(errno.EINVAL, f"calculator: the result has more than {params.CALC_MAX_INT_BITS} bits")
    return value


async def run_calculator(call: ToolCall) -> dict[str, Any]:
    return {"result": calculate(call.arguments["expression"])}


async def run_clock(call: ToolCall) -> dict[str, Any]:
    now = time.time()
    utc = dt.datetime.fromtimestamp(now, dt.UTC)
    return {"utc": utc.isoformat(timespec="seconds"), "unix": round(now, 3), "local": utc.astimezone().isoformat(timespec="seconds")}


# -- memory tools ------------------------------------------------------------------------------
def _owner(agent: Agent) -> Caller:
    """The identity memory tools act with: the agent's owner."""
    return Caller(agent.row.uid, agent.row.gid, 0)


async def run_memory_search(agents: AgentLookup, memory: MemoryManager, call: ToolCall) -> dict[str, Any]:
    assert call.agent is not None
    target = call.agent
    if "agent" in call.arguments:
        target = agents.named(call.arguments["agent"])
        check_share(call.agent, target)
    await memory.root(target)
    k = call.arguments.get("k", params.DEFAULT_MEMORY_TOP_K)
    passages = await memory.run(memory.store.search, target.row.id, call.arguments["query"], k)
    return {"passages": [{"path": p.path, "line": p.line, "score": p.score, "text": p.text} for p in passages]}


async def run_memory_read(memory: MemoryManager, call: ToolCall) -> dict[str, Any]:
    assert call.agent is not None
    path = call.arguments["path"]
    await memory.root(call.agent)
    data, size = await memory.run(read_file, memory.store, call.agent.row.id, _owner(call.agent), path)
    return {"path": path, "content": _text(data, size, path)}


async def run_memory_write(memory: MemoryManager, call: ToolCall) -> dict[str, Any]:
    assert call.agent is not None
    args = call.arguments
    root = await memory.root(call.agent)
    data = args["content"].encode()
    owner = _owner(call.agent)
    await memory.run(write_file, memory.store, root, call.agent.row.id, owner, args["path"], data, args.get("append", False))
    return {"path": args["path"], "bytes": len(data)}


def _text(data: bytes, size: int, path: str) -> str:
    """A file's bytes as text; a cut at TOOL_READ_MAX_BYTES may split the last character."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if size > len(data) and exc.start >= len(data) - 3:
            return data[: exc.start].decode("utf-8")
        raise KernelError(errno.EINVAL, f"memory_read: {path} is not UTF-8 text") from None


def _regular(store: MemoryStore, ino: int, path: str) -> Attr:
    attr = store.getattr(ino)
    if stat.S_ISLNK(attr.mode):
        raise KernelError(errno.ELOOP, f"{path} is a symlink: memory tools do not follow symlinks")
    if attr.is_dir:
        raise KernelError(errno.EISDIR, f"{path} is a directory")
    if not attr.is_reg:
        raise KernelError(errno.EINVAL, f"{path} is not a regular file")
    return attr


def read_file(store: MemoryStore, agent_id: int, owner: Caller, path: str) -> tuple[bytes, int]:
    """(the first TOOL_READ_MAX_BYTES of memory/PATH, its size), read as the agent's owner."""
    ino = store.walk(agent_id, path)
    attr = _regular(store, ino, path)
    if not may_attr(owner, attr, 0o4):
        raise KernelError(errno.EACCES, f"memory_read: the agent's owner may not read {path}")
    return store.read(ino, 0, params.TOOL_READ_MAX_BYTES), attr.size


def write_file(store: MemoryStore, root: int, agent_id: int, owner: Caller, path: str, data: bytes, append: bool) -> None:
    """Write memory/PATH as a program would (open, write, close): committed and
    versioned, created 0644 for the owner when missing; unchanged when refused."""
    parent, name = _parent_of(store, root, agent_id, path)
    ino, created = _open_or_create(store, parent, name, owner, path)
    store.open(ino, False)
    try:
        store.write(ino, 0, data, append=append)  # EDQUOT before anything changes
        if not append:
            store.setattr(ino, size=len(data), commit=False)
        store.flush(ino)
    except KernelError:
        store.release(ino)
        if created:
            store.unlink(parent, name)
        raise
    store.release(ino)  # the last close: a new version


def _parent_of(store: MemoryStore, root: int, agent_id: int, path: str) -> tuple[int, bytes]:
    head, _, tail = path.strip("/").rpartition("/")
    if tail in ("", ".", ".."):
        raise KernelError(errno.EINVAL, f"memory_write: {path!r} does not name a file inside memory/")
    parent = store.walk(agent_id, head) if [p for p in head.split("/") if p not in ("", ".")] else root
    attr = store.getattr(parent)
    if stat.S_ISLNK(attr.mode):
        raise KernelError(errno.ELOOP, f"{head} is a symlink: memory tools do not follow symlinks")
    if not attr.is_dir:
        raise KernelError(errno.ENOTDIR, f"{head} is not a directory")
    return parent, os.fsencode(tail)


def _open_or_create(store: MemoryStore, parent: int, name: bytes, owner: Caller, path: str) -> tuple[int, bool]:
    try:
        attr = store.lookup(parent, name)
    except KernelError as exc:
        if exc.errno != errno.ENOENT:
            raise
        if not may_attr(owner, store.getattr(parent), 0o3):
            raise KernelError(errno.EACCES, f"memory_write: the agent's owner may not create files where {path} goes") from None
        return store.create(parent, name, 0o644, owner.uid, owner.gid).ino, True
    _regular(store, attr.ino, path)
    if not may_attr(owner, attr, 0o2):
        raise KernelError(errno.EACCES, f"memory_write: the agent's owner may not write {path}")
    return attr.ino, False


# -- the built-in tools ------------------------------------------------------------------------
CALCULATOR_SCHEMA = {
    "type": "object",
    "properties": {"expression": {"type": "string", "minLength": 1, "maxLength": params.CALC_MAX_CHARS}},
    "required": ["expression"],
    "additionalProperties": False,
}
CLOCK_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
SEARCH_SCHEMA = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "minLength": 1},
        "k": {"type": "integer", "minimum": 1, "maximum": params.MAX_MEMORY_TOP_K},
        "agent": {"type": "string", "minLength": 1},
    },
    "required": ["query"],
    "additionalProperties": False,
}
READ_SCHEMA = {"type": "object", "properties": {"path": {"type": "string", "minLength": 1}}, "required": ["path"], "additionalProperties": False}
WRITE_SCHEMA = {
    "type": "object",
    "properties": {"path": {"type": "string", "minLength": 1}, "content": {"type": "string"}, "append": {"type": "boolean"}},
    "required": ["path", "content"],
    "additionalProperties": False,
}


def builtin_tools(agents: AgentLookup, memory: MemoryManager) -> list[ToolSpec]:
    """The built-in tools; the memory tools act through `memory`, and look other agents up in `agents`."""
    bind = functools.partial
    return [
        ToolSpec("calculator", f"Evaluate an arithmetic expression: {ALLOWED}.", CALCULATOR_SCHEMA, run_calculator),
        ToolSpec("clock", "The current date and time (UTC, local, Unix seconds).", CLOCK_SCHEMA, run_clock),
        ToolSpec(
            "memory_search",
            "Search the agent's memory/ (or, with agent, another agent's memory shared with it) for passages matching a query.",
            SEARCH_SCHEMA,
            bind(run_memory_search, agents, memory),
            needs_agent=True,
        ),
        ToolSpec("memory_read", "Read a text file of the agent's memory/.", READ_SCHEMA, bind(run_memory_read, memory), needs_agent=True),
        ToolSpec(
            "memory_write",
            "Write (or with append, add to) a text file of the agent's memory/.",
            WRITE_SCHEMA,
            bind(run_memory_write, memory),
            needs_agent=True,
        ),
    ]
