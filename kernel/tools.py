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
"""

from __future__ import annotations

import ast
import contextlib
import datetime as dt
import errno
import functools
import json
import logging
import math
import operator
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import jsonschema.exceptions
import trio

from . import params
from .access import check_share
from .errors import KernelError, errno_name
from .memfs import Attr, MemoryStore
from .memory import may_attr

if TYPE_CHECKING:
    from .kernel import Agent, Caller, Kernel

log = logging.getLogger(__name__)

NAME = re.compile(r"[a-z][a-z0-9_]*")
MANIFEST_KEYS = frozenset({"name", "description", "command", "schema", "timeout", "concurrency"})


@dataclass(frozen=True)
class ToolCall:
    """One call as a tool sees it: who asks, for which agent, with what."""

    caller: Caller
    agent: Agent | None
    arguments: dict[str, Any]


Runner = Callable[[ToolCall], Awaitable[Any]]


@dataclass(eq=False)
class ToolSpec:
    name: str
    description: str
    schema: dict[str, Any]
    run: Runner
    timeout: float = params.TOOL_TIMEOUT_SECONDS
    concurrency: int = params.TOOL_CONCURRENCY
    needs_agent: bool = False  # acts on an agent's memory: refused without one
    manifest: Path | None = None  # where an external tool came from; None: built in
    source: str = ""  # what it was made from, so a reload keeps an unchanged tool (and its semaphore)
    validator: jsonschema.Draft202012Validator = field(init=False, repr=False)
    semaphore: trio.Semaphore = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_spec(self.name, self.schema)
        self.validator = jsonschema.Draft202012Validator(self.schema)
        self.semaphore = trio.Semaphore(self.concurrency)

    def describe(self) -> dict[str, Any]:
        """What `tools/NAME.schema` shows and the model is told."""
        return {"name": self.name, "description": self.description, "schema": self.schema}


def check_spec(name: str, schema: Any) -> None:
    """ValueError unless the name is a tool name and the schema a valid schema of an object."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or len(name) > params.TOOL_NAME_BYTES:
        raise ValueError(f"tool name {name!r} must match [a-z][a-z0-9_]* and be at most {params.TOOL_NAME_BYTES} bytes")
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise ValueError('the schema must describe an object: {"type": "object", "properties": {...}}')
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        raise ValueError(f"invalid schema: {exc.message}") from None


class ToolManager:
    def __init__(self, kernel: Kernel, directory: Path | None = None) -> None:
        self.kernel = kernel
        self.directory = directory
        self.tools: dict[str, ToolSpec] = {}
        # Every name ever served, in order: a tool's position is its index in tools/
        # (its inode numbers), kept for the manager's life even if the tool goes away.
        self.order: list[str] = []
        for spec in builtin_tools(kernel):
            self.add(spec)
        self.reload()

    # -- the registry ------------------------------------------------------------------
    def add(self, spec: ToolSpec) -> None:
        self.tools[spec.name] = spec
        if spec.name not in self.order:
            self.order.append(spec.name)

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
        loaded = self._read_directory()
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
        self.kernel.log_event("tool_error", manifest=str(path), message=message)

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
        self.kernel.log_event("deny", syscall="tool_call", uid=caller.uid, pid=caller.pid, errno="EPERM", message=exc.message, agent=agent.name)
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
        self.kernel.log_event(
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


# -- external tools --------------------------------------------------------------------------
def read_manifest(path: Path, directory: Path) -> ToolSpec:
    """The tool a `NAME.json` manifest describes; ValueError (or OSError) says why not."""
    raw = _manifest_object(path)
    name = raw.get("name", path.stem)
    if name != path.stem:
        raise ValueError(f"the manifest of {name!r} must be named {name}.json")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ValueError("description must be a string")
    argv = resolve_command(raw.get("command"), directory)
    timeout, concurrency = _limits(raw)
    run = functools.partial(run_external, name, argv)
    source = json.dumps([raw, argv], sort_keys=True)
    return ToolSpec(name, description, raw.get("schema", {"type": "object"}), run, timeout, concurrency, manifest=path, source=source)


def _manifest_object(path: Path) -> dict[str, Any]:
    raw = json.loads(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError("a manifest is a JSON object")
    unknown = sorted(set(raw) - MANIFEST_KEYS)
    if unknown:  # most likely a typo, which would otherwise be ignored silently
        raise ValueError(f"unknown keys {', '.join(unknown)} (known: {', '.join(sorted(MANIFEST_KEYS))})")
    return raw


def _limits(raw: dict[str, Any]) -> tuple[float, int]:
    """(timeout, concurrency) of a manifest, within the kernel's bounds."""
    timeout = raw.get("timeout", params.TOOL_TIMEOUT_SECONDS)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= params.TOOL_MAX_TIMEOUT_SECONDS:
        raise ValueError(f"timeout must be a number of seconds in (0, {params.TOOL_MAX_TIMEOUT_SECONDS:g}]")
    concurrency = raw.get("concurrency", params.TOOL_CONCURRENCY)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= params.TOOL_MAX_CONCURRENCY:
        raise ValueError(f"concurrency must be an integer in [1, {params.TOOL_MAX_CONCURRENCY}]")
    return float(timeout), concurrency


def resolve_command(command: Any, directory: Path) -> list[str]:
    """The argv to run: a relative first element is relative to the tools directory;
    a bare name not found there is looked up in the tools' PATH."""
    if not isinstance(command, list) or not command or not all(isinstance(part, str) and part for part in command):
        raise ValueError('command must be a non-empty list of strings, e.g. ["./weather.py"]')
    first = command[0]
    if os.path.isabs(first):
        path = Path(first)
    elif "/" in first or (directory / first).exists():
        path = Path(os.path.normpath(directory.absolute() / first))
    else:
        found = shutil.which(first, path=params.TOOL_PATH)
        path = Path(found or directory / first)
    if not path.is_file() or not os.access(path, os.X_OK):
        raise ValueError(f"command {first!r} is not an executable file ({path})")
    return [str(path), *command[1:]]


async def run_external(name: str, argv: list[str], call: ToolCall) -> Any:
    """Run the tool's process for one call and return the JSON value it printed."""
    payload = {"tool": name, "arguments": call.arguments, "agent": call.agent.name if call.agent else None, "uid": call.caller.uid}
    workdir = await trio.to_thread.run_sync(make_workdir)
    try:
        code, out, err = await run_command(argv, json.dumps(payload).encode() + b"\n", workdir)
    finally:
        with trio.CancelScope(shield=True):  # a timed-out call cleans up too
            await trio.to_thread.run_sync(functools.partial(shutil.rmtree, workdir, ignore_errors=True))
    return parse_output(name, code, out, err)


def make_workdir() -> str:
    """A fresh empty directory for one run, owned by the identity the tool runs as."""
    path = tempfile.mkdtemp(prefix="aiosfs-tool-")
    if os.geteuid() == 0:
        os.chown(path, params.TOOL_UID, params.TOOL_GID)
    return path


def identity() -> dict[str, Any]:
    """Popen arguments that drop root: uid and gid nobody, and no supplementary groups
    (without `extra_groups` the child would keep root's)."""
    if os.geteuid() != 0:
        return {}
    return {"user": params.TOOL_UID, "group": params.TOOL_GID, "extra_groups": []}


@dataclass
class Capture:
    """A pipe read to its end: at most `limit` bytes, or the last `limit` bytes."""

    limit: int
    keep_tail: bool = False
    data: bytearray = field(default_factory=bytearray)
    overflow: bool = False

    async def collect(self, stream: trio.abc.ReceiveStream | None, proc: trio.Process) -> None:
        assert stream is not None
        async for chunk in stream:
            self.data += chunk
            if len(self.data) <= self.limit:
                continue
            if self.keep_tail:
                del self.data[: -self.limit]
            else:
                self.overflow = True
                kill(proc)
                return


async def run_command(argv: list[str], payload: bytes, workdir: str) -> tuple[int, bytes, bytes]:
    """(exit status, stdout, stderr tail) of one run; the process group is killed when
    the run ends for any reason (a timeout cancels it here)."""
    env = {"PATH": params.TOOL_PATH, "HOME": workdir, "LANG": "C.UTF-8"}
    try:
        proc = await trio.lowlevel.open_process(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir, env=env, start_new_session=True, **identity()
        )
    except OSError as exc:
        raise KernelError(errno.EIO, f"could not start {argv[0]}: {exc.strerror or exc}") from None
    out, err = Capture(params.TOOL_OUTPUT_MAX_BYTES), Capture(params.TOOL_ERROR_CHARS * 4, keep_tail=True)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_feed, proc.stdin, payload)
            nursery.start_soon(out.collect, proc.stdout, proc)
            nursery.start_soon(err.collect, proc.stderr, proc)
            await proc.wait()
            kill(proc)  # what it left running would keep the pipes open
    finally:
        kill(proc)
        with trio.CancelScope(shield=True):
            await proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    await pipe.aclose()
    if out.overflow:
        raise KernelError(errno.EIO, f"{argv[0]} printed more than {params.TOOL_OUTPUT_MAX_BYTES} bytes")
    return proc.returncode or 0, bytes(out.data), bytes(err.data)


def kill(proc: trio.Process) -> None:
    """The tool and everything it started: its own session is its process group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode is None:
        proc.kill()


async def _feed(stream: trio.abc.SendStream | None, data: bytes) -> None:
    if stream is None:
        return
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(data)  # a tool that does not read its input may exit first
        await stream.aclose()


def parse_output(name: str, code: int, out: bytes, err: bytes) -> Any:
    """The JSON value a run printed; EIO with what it said when it failed."""
    tail = err.decode("utf-8", errors="replace").strip()[-params.TOOL_ERROR_CHARS :]
    if code != 0:
        how = f"exited with status {code}" if code > 0 else f"was killed by signal {-code}"
        raise KernelError(errno.EIO, f"tool {name} {how}" + (f": {tail}" if tail else ""))
    try:
        return json.loads(out, parse_constant=_no_constant)
    except ValueError:
        start = out[: params.TOOL_ERROR_CHARS].decode("utf-8", errors="replace")
        raise KernelError(errno.EIO, f"tool {name} did not print one JSON value: {start!r}") from None


def _no_constant(word: str) -> Any:
    raise ValueError(f"{word} is not JSON")


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
    from .kernel import Caller

    return Caller(agent.row.uid, agent.row.gid, 0)


async def run_memory_search(kernel: Kernel, call: ToolCall) -> dict[str, Any]:
    assert call.agent is not None
    target = call.agent
    if "agent" in call.arguments:
        target = kernel.agent(call.arguments["agent"])
        check_share(call.agent, target)
    await kernel.memory.root(target)
    k = call.arguments.get("k", params.DEFAULT_MEMORY_TOP_K)
    passages = await kernel.memory.run(kernel.memory.store.search, target.row.id, call.arguments["query"], k)
    return {"passages": [{"path": p.path, "line": p.line, "score": p.score, "text": p.text} for p in passages]}


async def run_memory_read(kernel: Kernel, call: ToolCall) -> dict[str, Any]:
    assert call.agent is not None
    path = call.arguments["path"]
    await kernel.memory.root(call.agent)
    data, size = await kernel.memory.run(read_file, kernel.memory.store, call.agent.row.id, _owner(call.agent), path)
    return {"path": path, "content": _text(data, size, path)}


async def run_memory_write(kernel: Kernel, call: ToolCall) -> dict[str, Any]:
    assert call.agent is not None
    args = call.arguments
    root = await kernel.memory.root(call.agent)
    data = args["content"].encode()
    owner = _owner(call.agent)
    await kernel.memory.run(write_file, kernel.memory.store, root, call.agent.row.id, owner, args["path"], data, args.get("append", False))
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


def builtin_tools(kernel: Kernel) -> list[ToolSpec]:
    memory = functools.partial  # the memory tools need the kernel
    return [
        ToolSpec("calculator", f"Evaluate an arithmetic expression: {ALLOWED}.", CALCULATOR_SCHEMA, run_calculator),
        ToolSpec("clock", "The current date and time (UTC, local, Unix seconds).", CLOCK_SCHEMA, run_clock),
        ToolSpec(
            "memory_search",
            "Search the agent's memory/ (or, with agent, another agent's memory shared with it) for passages matching a query.",
            SEARCH_SCHEMA,
            memory(run_memory_search, kernel),
            needs_agent=True,
        ),
        ToolSpec("memory_read", "Read a text file of the agent's memory/.", READ_SCHEMA, memory(run_memory_read, kernel), needs_agent=True),
        ToolSpec(
            "memory_write",
            "Write (or with append, add to) a text file of the agent's memory/.",
            WRITE_SCHEMA,
            memory(run_memory_write, kernel),
            needs_agent=True,
        ),
    ]
