"""Real mounts for tests: `aiosfs mount` in its own process, as users run it."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

HAVE_FUSE = os.path.exists("/dev/fuse")
needs_fuse = pytest.mark.skipif(not HAVE_FUSE, reason="/dev/fuse is missing: this machine cannot mount FUSE filesystems")


def aiosfs(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aiosfs.cli", *args], capture_output=True, text=True, timeout=timeout)


def sh(script: str, timeout: float = 120, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a bash script the way a user types it."""
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]


class Mount:
    def __init__(self, root: Path, state: Path, args: list[str]) -> None:
        self.root, self.state, self.args = root, state, args

    @property
    def agents(self) -> Path:
        return self.root / "agents"

    def start(self) -> subprocess.CompletedProcess[str]:
        result = aiosfs("mount", str(self.root), "--state", str(self.state), *self.args)
        assert result.returncode == 0, f"mount failed:\n{result.stdout}\n{result.stderr}"
        return result

    def stop(self) -> None:
        if os.path.ismount(self.root):
            result = aiosfs("unmount", str(self.root), timeout=60)
            if result.returncode != 0:
                subprocess.run(["fusermount3", "-uz", str(self.root)], check=False)
                pytest.fail(f"unmount failed: {result.stderr}")

    def daemon_pid(self) -> int:
        return int((self.state / "lock").read_text().split()[0])

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
            if os.path.ismount(root):
                subprocess.run(["fusermount3", "-uz", str(root)], check=False)


def wait_for(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def dead(root: Path) -> bool:
    """Is the mount at `root` left by a daemon that died (ENOTCONN)?"""
    try:
        os.stat(root / "kernel")
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False
