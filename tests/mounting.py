"""Real mounts for tests: `aiosfs mount` in its own process, as users run it.

`mounted()` fails the test at teardown when the daemon did not live and stop as it
should: when it exited or was killed during the test, when the mount was left dead
(ENOTCONN) instead of unmounted, when it did not write its clean-exit line after the
unmount, or when its part of `aiosfs.log` holds a traceback or an ERROR/CRITICAL
record. A test that kills or breaks things on purpose says so with
`Mount.expect_death()` (or `Mount.kill()`) and `Mount.allow_log(regex)`.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from aiosfs.cli import CLEAN_EXIT

HAVE_FUSE = os.path.exists("/dev/fuse")
IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")
# Skips where /dev/fuse is missing, fails there in CI (the `require_fuse` fixture in conftest.py).
needs_fuse = pytest.mark.usefixtures("require_fuse")
needs_root = pytest.mark.usefixtures("require_root")  # skipped without root; failed in CI


def aiosfs(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aiosfs.cli", *args], capture_output=True, text=True, timeout=timeout)


def sh(script: str, timeout: float = 120, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a bash script the way a user types it."""
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]


def alive(pid: int) -> bool:
    """Is the process running? A zombie is not: the daemon is nobody's child here, and
    whoever reaps orphans may be slow to do it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def engine_pids(daemon: int) -> list[int]:
    """The daemon's engine processes: its children that run kernel.cores.enginehost."""
    pids: list[int] = []
    for children in Path(f"/proc/{daemon}/task").glob("*/children"):
        try:
            candidates = children.read_text().split()
        except OSError:
            continue
        for pid in candidates:
            try:
                if b"kernel.cores.enginehost" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(int(pid))
            except OSError:
                pass
    return pids


def listed(root: Path) -> bool:
    """Is something mounted at `root`, alive or dead? (`os.path.ismount` is False for a dead FUSE mount.)"""
    target = str(root)
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[1])
            if point == target:
                return True
    return False


# A record of the daemon's log (format of `aiosfs mount --foreground`): its first line, then
# every line up to the next record (a traceback, or output that is not a log record).
RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?P<level>[A-Z]+) ", re.M)
# Unanchored: the engine's stderr is relayed into the log behind a record's prefix
# (`... WARNING kernel.cores.enginehost: engine NAME (pid N): Fatal Python error: ...`).
TROUBLE = re.compile(r"Traceback \(most recent call last\)|Exception in thread|Exception ignored in|Fatal Python error")


def log_records(text: str) -> list[tuple[str | None, str]]:
    """(level, text) of each record; output before the first record has level None."""
    starts = [m.start() for m in RECORD.finditer(text)]
    out: list[tuple[str | None, str]] = []
    if not starts or starts[0] > 0:
        out.append((None, text[: starts[0] if starts else len(text)]))
    for i, start in enumerate(starts):
        chunk = text[start : starts[i + 1] if i + 1 < len(starts) else len(text)]
        match = RECORD.match(chunk)
        out.append((match.group("level") if match else None, chunk))
    return [(level, chunk) for level, chunk in out if chunk.strip()]


def troubles(text: str, allowed: list[re.Pattern[str]]) -> list[str]:
    """The records of a log that show something went wrong, less those a test allowed."""
    bad = []
    for level, chunk in log_records(text):
        if (level in ("ERROR", "CRITICAL") or TROUBLE.search(chunk)) and not any(a.search(chunk) for a in allowed):
            bad.append(chunk.rstrip("\n"))
    return bad


@dataclass
class Daemon:
    pid: int
    expect_death: bool = False


class Mount:
    def __init__(self, root: Path, state: Path, args: list[str]) -> None:
        self.root, self.state, self.args = root, state, args
        self.daemons: list[Daemon] = []  # one per start(): a test may kill one and mount again
        self.log_start: int | None = None  # where this mount's part of aiosfs.log begins
        self.allowed: list[re.Pattern[str]] = []

    @property
    def agents(self) -> Path:
        return self.root / "agents"

    @property
    def log(self) -> Path:
        return self.state / "aiosfs.log"

    def start(self) -> subprocess.CompletedProcess[str]:
        if self.log_start is None:
            self.log_start = self.log.stat().st_size if self.log.exists() else 0
        result = aiosfs("mount", str(self.root), "--state", str(self.state), *self.args)
        assert result.returncode == 0, f"mount failed:\n{result.stdout}\n{result.stderr}"
        self.daemons.append(Daemon(self.daemon_pid()))
        return result

    def daemon_pid(self) -> int:
        return int((self.state / "lock").read_text().split()[0])

    def expect_death(self) -> None:
        """The running daemon is about to be killed on purpose: its death is no failure."""
        self.daemons[-1].expect_death = True

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the daemon on purpose and wait until its mount is dead."""
        self.expect_death()
        os.kill(self.daemons[-1].pid, sig)
        wait_for(lambda: not alive(self.daemons[-1].pid) and self.is_dead(), what=f"the daemon to die of signal {sig}")

    def allow_log(self, pattern: str) -> None:
        """A log record (with its traceback) that matches `pattern` (re.search) is expected: no failure.
        Keep it narrow: name the message, not just its level."""
        self.allowed.append(re.compile(pattern))

    def log_text(self) -> str:
        """This mount's part of aiosfs.log (the file is appended to across mounts)."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self.log_start or 0)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def command(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run `aiosfs ARGS` as the mount's user (here: this process's)."""
        return aiosfs(*args, timeout=timeout)

    def is_dead(self) -> bool:
        """Is the mount left dead (ENOTCONN)? Asked as a user the mount lets in."""
        return dead(self.root)

    def stop(self) -> None:
        """Unmount, then fail the test if the daemon did not live and end as it should."""
        problems: list[str] = []
        current = self.daemons[-1] if self.daemons else None
        if current is not None and not current.expect_death:
            if not alive(current.pid):
                problems.append(f"the daemon (pid {current.pid}) stopped during the test")
            if self.is_dead():
                problems.append(f"the mount at {self.root} was dead (ENOTCONN), not unmounted")
        engines = engine_pids(current.pid) if current is not None and alive(current.pid) else []
        if listed(self.root) and not self.is_dead():
            result = self.command("unmount", str(self.root), timeout=90)
            if result.returncode != 0:
                problems.append(f"aiosfs unmount failed ({result.returncode}): {result.stderr.strip()}")
        for daemon in self.daemons:
            if not gone(daemon.pid, timeout=15):
                problems.append(f"the daemon (pid {daemon.pid}) was still running after the unmount: killed")
                os.kill(daemon.pid, signal.SIGKILL)
        for pid in engines:
            if not gone(pid, timeout=5):
                problems.append(f"the engine process (pid {pid}) was still running after the unmount: killed")
                os.kill(pid, signal.SIGKILL)
        if listed(self.root):
            subprocess.run(["fusermount3", "-uz", str(self.root)], check=False, capture_output=True)
        text = self.log_text()
        for daemon in self.daemons:
            if not daemon.expect_death and f"{CLEAN_EXIT} (pid {daemon.pid})" not in text:
                problems.append(f"the daemon (pid {daemon.pid}) never wrote '{CLEAN_EXIT}': it was killed or crashed")
        for record in troubles(text, self.allowed):
            problems.append(f"unexpected in {self.log}:\n{record}")
        if problems:
            tail = "\n".join(text.splitlines()[-40:])
            pytest.fail("\n".join(problems) + f"\n--- the end of this mount's log ---\n{tail}", pytrace=False)

    def agent(self, name: str) -> Path:
        path = self.agents / name
        path.mkdir()
        return path


@contextmanager
def mounted(base: Path, *args: str) -> Iterator[Mount]:
    """Mount at a path every uid can reach (tests switch to other users); state in `base`."""
    state = base / "state"
    marker = base / "mountpoint"
    if marker.exists():
        root = Path(marker.read_text())
    else:
        root = Path(tempfile.mkdtemp(prefix="aiosfs-test-", dir="/tmp")) / "mnt"
        root.mkdir()
        os.chmod(root.parent, 0o755)
        marker.write_text(str(root))
    mount = Mount(root, state, list(args))
    mount.start()
    try:
        yield mount
    finally:
        try:
            mount.stop()
        finally:
            if listed(root):
                subprocess.run(["fusermount3", "-uz", str(root)], check=False, capture_output=True)


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what or 'condition'} not reached in {timeout:g} s")


def has_open(pid: int, path: Path) -> bool:
    """Has process `pid` opened `path` (its open() has returned)?"""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                return True
        except OSError:
            pass
    return False


def blocked_reading(pid: int, path: Path) -> bool:
    """Is process `pid` waiting for the daemon's answer to a request on `path` it opened (a blocked read)?"""
    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    if wchan in ("", "0"):  # hidden by this kernel: asleep is the best it tells
        return state == "S" and has_open(pid, path)
    return wchan == "request_wait_answer" and has_open(pid, path)


def dead(root: Path) -> bool:
    """Is the mount at `root` left by a daemon that died (ENOTCONN)?"""
    try:
        os.stat(root / "kernel")
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False
