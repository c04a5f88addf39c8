"""What the set-up tools share (the model's fetch and encoding, the llama.cpp check,
the GPU check): child processes run with this project on their path, never waited
for past a deadline, and told apart by how they ended; and files' SHA-256."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent  # the project: aiosfs, kernel, services, bench


def with_path(env: dict[str, str], *first: Path | str | None) -> dict[str, str]:
    """`env` with `first` (this project when none is given) ahead of its PYTHONPATH, so
    that a child imports this checkout, installed or not."""
    paths = [str(p) for p in (first or (ROOT,)) if p is not None]
    return {**env, "PYTHONPATH": os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])}


def module_command(module: str, *args: str) -> list[str]:
    """`python -X faulthandler -m MODULE ARGS`: a native crash leaves its traceback on stderr."""
    return [sys.executable, "-X", "faulthandler", "-m", module, *args]


def death_signal(returncode: int) -> str | None:
    """The name of the signal that killed a child process (None: it exited)."""
    if returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


@dataclass
class Ran:
    """How a child process ended."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False

    @property
    def signal_name(self) -> str | None:
        return None if self.timed_out else death_signal(self.returncode)

    def tail(self, lines: int = 20) -> str:
        """The last lines of its stderr (of its stdout when stderr is empty)."""
        return "\n".join((self.stderr or self.stdout).rstrip().splitlines()[-lines:])

    def last_json(self) -> dict[str, Any] | None:
        """The last line of its stdout that is a JSON object: a child's report."""
        for line in reversed(self.stdout.strip().splitlines()):
            if line.startswith("{"):
                try:
                    data = json.loads(line)
                except ValueError:
                    continue
                return data if isinstance(data, dict) else None
        return None


def run_child(cmd: Sequence[str], *, timeout: float, env: dict[str, str] | None = None, cwd: Path | None = None) -> Ran:
    """Run `cmd` and capture it; never wait past `timeout`: its whole process group is
    stopped then. A signal shows as a negative return code."""
    started = time.monotonic()
    proc = subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace", env=env, cwd=cwd, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout))
        return Ran(proc.returncode, out, err, time.monotonic() - started)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        out, err = proc.communicate()
        return Ran(proc.returncode, out, err, time.monotonic() - started, timed_out=True)
    except BaseException:  # Ctrl-C: its own session would not get the SIGINT
        stop_group(proc, grace=2.0)
        raise


def stop_group(proc: subprocess.Popen[str], grace: float = 15.0) -> None:
    """SIGTERM to the child's process group (so that it can stop what it started), SIGKILL after `grace`."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, read in chunks (models are hundreds of MiB)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def kill_self(name: str, why: str) -> None:
    """Tests: die by the signal called `name`, as a crash in native code would (`why`: the
    setting that asked for it, for the messages)."""
    signum = getattr(signal, name.upper(), None)
    if not isinstance(signum, signal.Signals):
        raise SystemExit(f"{why}: not a signal name")
    print(f"{why}: killing this process with {signum.name}", file=sys.stderr, flush=True)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def fault_if_asked(variable: str, step: str = "") -> None:
    """Tests: die by the signal that the environment `variable` names: "SIGILL" at
    every step, "SIGILL:STEP" only at that one."""
    spec = os.environ.get(variable, "")
    name, _, only = spec.partition(":")
    if name and (not only or only == step):
        kill_self(name, f"{variable}={spec}")
