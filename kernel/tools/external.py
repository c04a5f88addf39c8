"""External tools: `NAME.json` manifests in the tools directory, each run as a
process with the call as JSON on stdin and one JSON value expected on stdout, in a
fresh empty working directory with a minimal environment and, when the daemon is
root, as nobody."""

import contextlib
import errno
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .. import params
from ..errors import KernelError
from .spec import MANIFEST_KEYS, ToolCall, ToolSpec

log = logging.getLogger(__name__)


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
