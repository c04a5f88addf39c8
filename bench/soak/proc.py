"""Processes and the mount, as seen from outside: the soak drives `aiosfs` through its
CLI and its files only, so that it tests what users run, and every wait here is bounded."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .. import child_env

T = TypeVar("T")

MOUNT_TIMEOUT = 300.0  # the embedded model loads and warms up in seconds; a loaded machine is slower
TROUBLE = re.compile(r"^\S+ \S+ (ERROR|CRITICAL) |Traceback \(most recent call last\)|^Fatal Python error")
EXPECTED = re.compile(r"engine of \S+ (crashed|hung)|engine \S+ \(pid \d+\)( hung|:)")  # a fault's report, a dying engine's words
UNMOUNT_TIMEOUT = 60.0  # the criterion is 15 s; past this the soak stops waiting and detaches the mount


def aiosfs(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`aiosfs ARGS` from this repository; a TimeoutExpired when it runs past `timeout`."""
    return subprocess.run([sys.executable, "-m", "aiosfs.cli", *args], capture_output=True, text=True, timeout=timeout, env=child_env())


def mount_accepts(flag: str) -> bool:
    """Does `aiosfs mount` know `flag` (e.g. `--engine-deadline`, which the watchdog adds)?"""
    result = aiosfs("mount", "--help", timeout=60)
    return flag in result.stdout


def proc_state(pid: int) -> str:
    """The state letter of a process (R, S, D, T, Z...), or '' when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    """Running or stopped; a zombie is not (the daemon is nobody's child here)."""
    return proc_state(pid) not in ("", "Z", "X")


def descendants(pid: int) -> dict[int, str]:
    """The live descendants of `pid`, with their command lines."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] not in ("Z", "X"):
                parents[int(entry)] = int(fields[1])
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                try:
                    found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                except OSError:
                    found[child] = "?"
                frontier.append(child)
    return found


@dataclass
class Status:
    """The first line of `kernel/status` as key=value pairs, and the engine's part of it."""

    fields: dict[str, str]
    text: str

    @property
    def engine(self) -> str:
        return self.fields.get("engine", "?")

    @property
    def pid(self) -> int | None:
        value = self.fields.get("pid", "-")
        return int(value) if value.isdigit() else None

    def count(self, key: str) -> int:
        value = self.fields.get(key, "0")
        return int(value) if value.isdigit() else 0

    @property
    def deadline(self) -> float | None:
        """The engine deadline the watchdog shows (a key naming `deadline`), in seconds."""
        for key, value in self.fields.items():
            if "deadline" in key and (match := re.match(r"[\d.]+", value)):
                return float(match.group())
        return None


def read_status(root: Path) -> Status:
    text = (root / "kernel" / "status").read_text()
    first = text.splitlines()[0] if text else ""
    return Status(dict(part.split("=", 1) for part in first.split() if "=" in part), text)


@dataclass
class Mount:
    """One `aiosfs mount` of `root` over `state` (the daemon detaches; its pid is in STATE/lock)."""

    root: Path
    state: Path
    args: list[str]
    daemon: int = 0
    audit_start: int = 0  # where this mount's part of audit.jsonl begins
    log_start: int = 0  # ... and of aiosfs.log
    notes: list[str] = field(default_factory=list)

    def start(self) -> None:
        self.audit_start, self.log_start = (_size(self.state / name) for name in ("audit.jsonl", "aiosfs.log"))
        result = aiosfs("mount", str(self.root), "--state", str(self.state), *self.args, timeout=MOUNT_TIMEOUT)
        if result.returncode != 0:
            raise RuntimeError(f"aiosfs mount failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        self.daemon = int((self.state / "lock").read_text().split()[0])

    def listed(self) -> bool:
        """Is something mounted at root, alive or dead? (`os.path.ismount` is False for a dead FUSE mount.)"""
        with open("/proc/self/mounts") as mounts:
            return any(line.split()[1] == str(self.root) for line in mounts)

    def status(self) -> Status:
        return read_status(self.root)

    def _read(self, name: str, start: int) -> list[str]:
        try:
            with open(self.state / name, "rb") as f:
                f.seek(start)
                return f.read().decode(errors="replace").splitlines()
        except OSError:
            return []

    def log_troubles(self) -> list[str]:
        """This mount's lines of aiosfs.log that show trouble (an ERROR or CRITICAL record, a
        traceback) other than the engine's own crash and hang reports."""
        return [line for line in self._read("aiosfs.log", self.log_start) if TROUBLE.search(line) and not EXPECTED.search(line)]

    def engine_events(self) -> list[dict[str, object]]:
        """This mount's `"event": "engine"` lines of the audit log."""
        events = []
        for line in self._read("audit.jsonl", self.audit_start):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == "engine":
                events.append(event)
        return events

    def engine_event_counts(self) -> dict[str, int]:
        return dict(Counter(str(e.get("what", "?")) for e in self.engine_events()))

    def unmount(self) -> tuple[bool, float, str]:
        """`aiosfs unmount` (it waits for the daemon to end): (finished, seconds, what went wrong).
        A mount that will not go is detached (`fusermount3 -uz`) and its daemon killed, so
        that the soak never leaves one behind."""
        started = time.monotonic()
        try:
            result = aiosfs("unmount", str(self.root), timeout=UNMOUNT_TIMEOUT)
            ok, why = result.returncode == 0, result.stderr.strip()
        except subprocess.TimeoutExpired:
            ok, why = False, f"aiosfs unmount still running after {UNMOUNT_TIMEOUT:.0f} s"
        took = time.monotonic() - started
        if not ok:
            subprocess.run(["fusermount3", "-uz", str(self.root)], capture_output=True, check=False)
            if not wait_until(lambda: not alive(self.daemon), 15):
                os.kill(self.daemon, 9)
                why += f"; the daemon (pid {self.daemon}) was killed"
        return ok, took, why


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def wait_until(predicate: Callable[[], object], timeout: float, step: float = 0.1) -> bool:
    """Poll `predicate()` until it is true (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(step)


def bounded(action: Callable[[], T], timeout: float, what: str) -> T:
    """`action()` in a helper thread, waited for at most `timeout` seconds: a read of the
    mount that never returns raises TimeoutError here instead of hanging the soak."""
    box: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            box.append(action())
        except BaseException as exc:  # handed to the caller
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"soak-{what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{what}: no answer in {timeout:.0f} s")
    if errors:
        raise errors[0]
    return box[0]
