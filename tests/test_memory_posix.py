"""memory/ as a POSIX filesystem, checked against a real one.

The differential suite runs the same syscalls on a fresh directory of the local
disk (ext4 or similar under /tmp) and on a fresh directory inside an agent's
memory/, and compares every outcome: the return value or the errno name. What
may differ by design is left out of the comparison: absolute times (only how
they move), directory sizes, block counts and inode numbers.

The other tests cover what only memory/ has: errnos at the agent boundary,
durability under `kill -9`, the quota, versions and rollback, and permissions
for an unprivileged user.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mounting import Mount, dead, mounted, needs_fuse, needs_root, sh, wait_for
from test_access import MEMBER, OTHER, OWNER, User, as_user

pytestmark = [needs_fuse, pytest.mark.mount]

Step = tuple[Any, ...]
Outcome = tuple[str, Any]  # ("ok", value) or ("err", "ENOENT")

NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
TICK = 0.02  # longer than the coarse clock step of local filesystems, so a change always shows in a time
RW, WO, RO = os.O_RDWR, os.O_WRONLY, os.O_RDONLY
CREAT, EXCL, TRUNC, APPEND = os.O_CREAT, os.O_EXCL, os.O_TRUNC, os.O_APPEND
CHUNK = 64 * 1024  # the store's chunk size: writes across this boundary touch two rows
MIB = 1 << 20
NOW, OMIT = "now", "omit"  # utimensat's UTIME_NOW and UTIME_OMIT


@pytest.fixture(scope="module")
def fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mounted(tmp_path_factory.mktemp("memposix"), "--backend", "fake") as mount:
        yield mount


@pytest.fixture(scope="module")
def posix_memory(fs: Mount) -> Path:
    return fs.agent("posix") / "memory"


# -- the harness ---------------------------------------------------------------------------


def summary(st: os.stat_result) -> dict[str, Any]:
    """The stat fields both filesystems must agree on (a directory's size is the filesystem's own business)."""
    out: dict[str, Any] = {
        "type": stat.filemode(st.st_mode)[0],
        "mode": oct(stat.S_IMODE(st.st_mode)),
        "nlink": st.st_nlink,
        "uid": st.st_uid,
        "gid": st.st_gid,
    }
    if not stat.S_ISDIR(st.st_mode):
        out["size"] = st.st_size
    return out


class Side:
    """One filesystem under test: a root directory, its open descriptors and time marks.
    Each `do_NAME` method is the operation a step `("NAME", *args)` runs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fds: dict[str, int] = {}
        self.marks: dict[str, os.stat_result] = {}
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def p(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def fd(self, handle: str) -> int:
        if handle not in self.fds:
            raise OSError(errno.EBADF, f"handle {handle} is not open")
        return self.fds[handle]

    def close_all(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        for handle in list(self.running):
            self.do_stop(handle)

    # descriptors
    def do_open(self, handle: str, path: str, flags: int, mode: int = 0o644) -> None:
        fd = os.open(self.p(path), flags, mode)
        if handle in self.fds:
            os.close(self.fds.pop(handle))
        self.fds[handle] = fd

    def do_close(self, handle: str) -> None:
        os.close(self.fd(handle))
        del self.fds[handle]

    def do_write(self, handle: str, data: bytes) -> int:
        return os.write(self.fd(handle), data)

    def do_pwrite(self, handle: str, data: bytes, offset: int) -> int:
        return os.pwrite(self.fd(handle), data, offset)

    def do_read(self, handle: str, size: int) -> bytes:
        return os.read(self.fd(handle), size)

    def do_pread(self, handle: str, size: int, offset: int) -> bytes:
        return os.pread(self.fd(handle), size, offset)

    def do_lseek(self, handle: str, offset: int, whence: int) -> int:
        return os.lseek(self.fd(handle), offset, whence)

    def do_ftruncate(self, handle: str, size: int) -> None:
        os.ftruncate(self.fd(handle), size)

    def do_fstat(self, handle: str) -> dict[str, Any]:
        return summary(os.fstat(self.fd(handle)))

    def do_fsync(self, handle: str) -> None:
        os.fsync(self.fd(handle))

    # whole files
    def do_put(self, path: str, data: bytes) -> None:
        fd = os.open(self.p(path), WO | CREAT | TRUNC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def do_writeat(self, path: str, offset: int, data: bytes) -> int:
        fd = os.open(self.p(path), WO)
        try:
            return os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def do_content(self, path: str) -> bytes:
        with open(self.p(path), "rb") as f:
            return f.read()

    def do_truncate(self, path: str, size: int) -> None:
        os.truncate(self.p(path), size)

    # names
    def do_rename(self, old: str, new: str) -> None:
        os.rename(self.p(old), self.p(new))

    def do_unlink(self, path: str) -> None:
        os.unlink(self.p(path))

    def do_mkdir(self, path: str, mode: int = 0o777) -> None:
        os.mkdir(self.p(path), mode)

    def do_rmdir(self, path: str) -> None:
        os.rmdir(self.p(path))

    def do_mknod(self, path: str, mode: int, major: int, minor: int) -> None:
        os.mknod(self.p(path), mode, os.makedev(major, minor))

    def do_rdev(self, path: str) -> tuple[int, int]:
        st = os.lstat(self.p(path))
        return os.major(st.st_rdev), os.minor(st.st_rdev)

    def do_symlink(self, target: str, path: str) -> None:
        os.symlink(target, self.p(path))

    def do_readlink(self, path: str) -> str:
        return os.readlink(self.p(path))

    def do_link(self, old: str, new: str) -> None:
        os.link(self.p(old), self.p(new), follow_symlinks=False)

    def do_listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(self.p(path)))

    # attributes
    def do_stat(self, path: str) -> dict[str, Any]:
        return summary(os.stat(self.p(path)))

    def do_lstat(self, path: str) -> dict[str, Any]:
        return summary(os.lstat(self.p(path)))

    def do_chmod(self, path: str, mode: int) -> None:
        os.chmod(self.p(path), mode)

    def do_chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self.p(path), uid, gid)

    def do_lchown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self.p(path), uid, gid, follow_symlinks=False)

    def do_utime(self, path: str, ns: tuple[int, int] | None, follow: bool = True) -> None:
        if ns is None:
            os.utime(self.p(path), None, follow_symlinks=follow)
        else:
            os.utime(self.p(path), ns=ns, follow_symlinks=follow)

    def do_utimensat(self, path: str, atime: int | str, mtime: int | str, follow: bool = True) -> None:
        utimensat(self.p(path), atime, mtime, follow)

    def do_stamps(self, path: str) -> dict[str, int | str]:
        """atime and mtime: exact, or "now" when set to about now (local clocks are coarse)."""
        st, now = os.lstat(self.p(path)), time.time_ns()
        return {k: NOW if abs(now - ns) < 5 * 10**9 else ns for k, ns in (("atime", st.st_atime_ns), ("mtime", st.st_mtime_ns))}

    def do_as(self, user: User, step: Step) -> Outcome:
        """One step as another user, in a forked child: its outcome, an errno included."""
        return as_user(user, lambda: outcome(self, step))

    def do_times(self, path: str) -> tuple[int, int]:
        st = os.lstat(self.p(path))
        return st.st_atime_ns, st.st_mtime_ns

    def do_recent(self, path: str) -> bool:
        """Were atime and mtime set to now (utime with None)? Local clocks are coarse: allow seconds."""
        st, now = os.lstat(self.p(path)), time.time_ns()
        return abs(now - st.st_mtime_ns) < 5 * 10**9 and abs(now - st.st_atime_ns) < 5 * 10**9

    def do_mark(self, path: str) -> None:
        self.marks[path] = os.lstat(self.p(path))
        time.sleep(TICK)

    def do_changed(self, path: str, mark: str | None = None) -> dict[str, bool] | str:
        """Which times moved since the mark of `path` (or of `mark`: the name it had then)."""
        before, now = self.marks[mark or path], os.lstat(self.p(path))
        if now.st_ino != before.st_ino:
            return "another inode"  # the rename that would have brought it here failed
        return {"mtime": now.st_mtime_ns != before.st_mtime_ns, "ctime": now.st_ctime_ns != before.st_ctime_ns}

    def do_run(self, handle: str, path: str) -> None:
        """Start the program at `path` (it sleeps until `stop`): the kernel keeps it from writers."""
        self.running[handle] = subprocess.Popen([self.p(path), "60"])

    def do_stop(self, handle: str) -> int:
        child = self.running.pop(handle)
        child.kill()
        return child.wait()

    def do_statvfs(self, path: str) -> int:
        return os.statvfs(self.p(path)).f_namemax

    def do_tree(self) -> dict[str, Any]:
        """Every name below the root: its stat summary and content or target."""
        out: dict[str, Any] = {}
        for top, dirs, files in os.walk(self.root):
            for name in sorted(dirs + files):
                path = os.path.join(top, name)
                rel = os.path.relpath(path, self.root)
                st = os.lstat(path)
                entry: dict[str, Any] = summary(st)
                if stat.S_ISLNK(st.st_mode):
                    entry["target"] = os.readlink(path)
                elif stat.S_ISREG(st.st_mode):
                    entry["content"] = self.do_content(rel)
                out[rel] = entry
        return out


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


LIBC = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, AT_SYMLINK_NOFOLLOW = -100, 0x100
UTIME_NSEC = {NOW: (1 << 30) - 1, OMIT: (1 << 30) - 2}


def utimensat(path: str, atime: int | str, mtime: int | str, follow: bool = True) -> None:
    """utimensat(2) itself: os.utime cannot say UTIME_NOW or UTIME_OMIT for one of the times."""
    times = (Timespec * 2)(*(Timespec(0, UTIME_NSEC[t]) if isinstance(t, str) else Timespec(*divmod(t, 10**9)) for t in (atime, mtime)))
    if LIBC.utimensat(AT_FDCWD, os.fsencode(path), times, 0 if follow else AT_SYMLINK_NOFOLLOW) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)


def outcome(side: Side, step: Step) -> Outcome:
    name, *args = step
    try:
        return "ok", getattr(side, "do_" + name)(*args)
    except OSError as exc:
        return "err", errno.errorcode.get(exc.errno or 0, str(exc.errno))


def show(value: Any) -> str:
    """A readable form of an outcome or step: long bytes as their length, hash and start."""
    if isinstance(value, bytes) and len(value) > 48:
        return f"<{len(value)} bytes sha1={hashlib.sha1(value).hexdigest()[:10]} {value[:24]!r}...>"
    if isinstance(value, tuple):
        return "(" + ", ".join(show(v) for v in value) + ")"
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str) and len(value) > 48:
        return f"<{len(value)} chars {value[:24]!r}...>"
    if isinstance(value, User):
        return value.name
    return repr(value)


FLAG_NAMES = {"O_WRONLY": WO, "O_RDWR": RW, "O_CREAT": CREAT, "O_EXCL": EXCL, "O_TRUNC": TRUNC, "O_APPEND": APPEND, "O_NOFOLLOW": os.O_NOFOLLOW}


def show_step(step: Step) -> str:
    """A step as text, with open flags by name."""
    if step[0] != "open":
        return show(step)
    flags = "|".join(name for name, bit in FLAG_NAMES.items() if step[3] & bit) or "O_RDONLY"
    return show((*step[:3], flags, *step[4:]))


def difference(expected: Outcome, got: Outcome) -> str:
    """For two trees, only the names whose entries differ; otherwise both outcomes."""
    if expected[0] == got[0] == "ok" and isinstance(expected[1], dict) and isinstance(got[1], dict):
        keys = sorted(set(expected[1]) | set(got[1]), key=str)
        rows = [f"  {k}: local disk {show(expected[1].get(k))}, memory/ {show(got[1].get(k))}" for k in keys if expected[1].get(k) != got[1].get(k)]
        return "differences:\n" + "\n".join(rows)
    return f"local disk gave {show(expected)}, memory/ gave {show(got)}"


def run_both(disk_root: Path, mem_root: Path, steps: list[Step], label: str) -> None:
    """Run each step on the local disk, then on memory/; stop at the first disagreement."""
    disk_root.mkdir()
    mem_root.mkdir()
    disk, mem = Side(disk_root), Side(mem_root)
    try:
        for i, step in enumerate(steps):
            expected, got = outcome(disk, step), outcome(mem, step)
            if got != expected:
                recent = [show_step(s) for s in steps[max(0, i - 12) : i] if s[0] != "tree"]
                pytest.fail(f"{label}, step {i} {show_step(step)}: {difference(expected, got)}\nsteps before: {recent}", pytrace=False)
    finally:
        disk.close_all()
        mem.close_all()


# -- scenarios ------------------------------------------------------------------------------


def watch(step: Step, *names: str | tuple[str, str]) -> list[Step]:
    """`step` between marks of the times of `names` and looks at which of them moved; a pair
    (new, old) is an inode that the step moves from the name old to new."""
    pairs = [(name, name) if isinstance(name, str) else name for name in names]
    return [*(("mark", old) for _, old in pairs), step, *(("changed", new, old) for new, old in pairs)]


LONG = "n" * 256
MAX = "m" * 255

SCENARIOS: dict[str, list[Step]] = {
    "open_flags": [
        ("open", "f", "a", WO | CREAT | EXCL, 0o640),
        ("stat", "a"),
        ("open", "g", "a", WO | CREAT | EXCL, 0o640),
        ("write", "f", b"hello world"),
        ("close", "f"),
        ("open", "r", "a", RO),
        ("write", "r", b"x"),
        ("read", "r", 100),
        ("read", "r", 100),
        ("close", "r"),
        ("open", "w", "a", WO | CREAT, 0o600),  # O_CREAT on an existing file: no truncation, mode kept
        ("stat", "a"),
        ("read", "w", 10),
        ("write", "w", b"HE"),
        ("close", "w"),
        ("content", "a"),
        ("open", "ap", "a", WO | APPEND),
        ("open", "other", "a", RW),
        ("write", "other", b"0123456789abcdef"),  # makes the file longer than the appender knew
        ("write", "ap", b"!"),
        ("lseek", "ap", 0, os.SEEK_CUR),
        ("pwrite", "ap", b"?", 0),  # Linux appends even with an offset when O_APPEND is set
        ("close", "ap"),
        ("close", "other"),
        ("content", "a"),
        ("open", "rw", "a", RW),
        ("read", "rw", 5),
        ("write", "rw", b"_"),
        ("lseek", "rw", 0, os.SEEK_END),
        ("lseek", "rw", -3, os.SEEK_END),
        ("read", "rw", 10),
        ("lseek", "rw", -100, os.SEEK_END),
        ("close", "rw"),
        ("open", "t", "a", WO | TRUNC),
        ("fstat", "t"),
        ("close", "t"),
        ("content", "a"),
        ("open", "rt", "a", RO | TRUNC),
        ("close", "rt"),
        ("open", "c", "new", RW | CREAT | TRUNC, 0o6755),
        ("stat", "new"),
        ("close", "c"),
        ("open", "x", "missing", RO),
        ("open", "x", "missing/sub", WO | CREAT, 0o644),
        ("open", "x", "a/sub", RO),
        ("open", "x", "a/sub", WO | CREAT, 0o644),
        ("mkdir", "d", 0o755),
        ("open", "x", "d", WO),
        ("open", "x", "d", RW),
        ("open", "x", "d", WO | CREAT, 0o644),
        ("open", "dfd", "d", RO),
        ("read", "dfd", 10),
        ("close", "dfd"),
        ("open", "x", LONG, WO | CREAT, 0o644),
        ("stat", LONG),
        ("mkdir", LONG, 0o755),
        ("open", "y", MAX, WO | CREAT, 0o644),
        ("close", "y"),
        ("put", "caf\udce9", b"not UTF-8"),  # names are bytes: any but / and NUL
        ("listdir", "."),
        ("content", "caf\udce9"),
    ],
    "offsets_and_holes": [
        ("open", "f", "f", RW | CREAT, 0o644),
        ("pwrite", "f", b"abc", 10),
        ("fstat", "f"),
        ("pread", "f", 13, 0),
        ("pwrite", "f", b"far", MIB),
        ("fstat", "f"),
        ("pread", "f", 16, 500_000),
        ("pread", "f", 10, MIB - 2),
        ("pread", "f", 10, MIB + 3),
        ("pread", "f", 10, 5 * MIB),
        ("pwrite", "f", b"XYZW", CHUNK - 2),
        ("pread", "f", 8, CHUNK - 4),
        ("lseek", "f", 0, os.SEEK_END),
        ("lseek", "f", 100, os.SEEK_END),
        ("write", "f", b"end"),
        ("fstat", "f"),
        ("pread", "f", 110, MIB),
        ("open", "g", "f", RO),  # a second reader sees the writes not yet closed
        ("pread", "g", 8, CHUNK - 4),
        ("ftruncate", "f", 20),
        ("fstat", "g"),
        ("pread", "g", 100, 0),
        ("ftruncate", "f", 70_000),
        ("pread", "f", 100, 0),
        ("pread", "f", 10, CHUNK - 4),  # what the shrink cut must not come back
        ("pread", "f", 10, 69_995),
        ("close", "f"),
        ("close", "g"),
        ("content", "f"),
        ("truncate", "f", 5),
        ("content", "f"),
        ("truncate", "f", 3 * CHUNK + 7),
        ("stat", "f"),
        ("content", "f"),
        ("writeat", "f", 2 * CHUNK - 1, b"--"),
        ("content", "f"),
        ("open", "r", "f", RO),
        ("ftruncate", "r", 0),
        ("close", "r"),
        ("truncate", "missing", 0),
        ("mkdir", "d", 0o755),
        ("truncate", "d", 0),
        ("open", "big", "big", WO | CREAT, 0o644),
        ("write", "big", bytes(range(256)) * 1024),  # 256 KiB in one write: several chunks and FUSE requests
        ("lseek", "big", 0, os.SEEK_CUR),
        ("close", "big"),
        ("content", "big"),
        ("writeat", "big", CHUNK * 3 - 5, b"#" * (CHUNK + 10)),
        ("content", "big"),
    ],
    "rename": [
        ("put", "a", b"A"),
        ("put", "b", b"B"),
        ("mark", "a"),
        ("rename", "a", "c"),
        ("changed", "c", "a"),
        ("stat", "a"),
        ("content", "c"),
        ("rename", "c", "b"),
        ("content", "b"),
        ("listdir", "."),
        ("mkdir", "d1", 0o755),
        ("mkdir", "d2", 0o755),
        ("mark", "d1"),
        ("rename", "b", "d1/b"),
        ("changed", "d1"),
        ("listdir", "d1"),
        ("stat", "d1"),
        ("mkdir", "e", 0o755),
        ("stat", "."),
        ("rename", "d2", "e"),
        ("stat", "."),
        ("stat", "e"),
        ("stat", "d2"),
        ("mkdir", "f", 0o755),
        ("put", "f/x", b"x"),
        ("rename", "e", "f"),
        ("listdir", "f"),
        ("rename", "d1", "d1/sub"),
        ("mkdir", "d1/sub", 0o755),
        ("rename", "d1", "d1/sub/deeper"),
        ("rename", "d1", "d1/sub"),
        ("put", "g", b"G"),
        ("rename", "g", "d1"),
        ("rename", "d1", "g"),
        ("rename", "missing", "z"),
        ("rename", "g", "missingdir/x"),
        ("rename", "g", "g/x"),
        ("rename", "g", "g"),
        ("link", "g", "h"),
        ("rename", "g", "h"),  # two names of one file: nothing happens
        ("listdir", "."),
        ("stat", "g"),
        ("mkdir", "p", 0o755),
        ("mkdir", "q", 0o755),
        ("mkdir", "p/c", 0o755),
        ("put", "p/c/deep", b"deep"),
        ("rename", "p/c", "q/c"),
        ("stat", "p"),
        ("stat", "q"),
        ("content", "q/c/deep"),
        ("open", "o", "h", RW),
        ("rename", "h", "q/c/moved"),
        ("pwrite", "o", b"g", 0),
        ("close", "o"),
        ("content", "q/c/moved"),
        ("put", "victim", b"victim"),
        ("open", "v", "victim", RO),
        ("rename", "q/c/moved", "victim"),  # replaces a file that is still open
        ("pread", "v", 100, 0),
        ("fstat", "v"),
        ("close", "v"),
        ("content", "victim"),
        ("stat", "g"),
        ("listdir", "."),
    ],
    "unlink_while_open": [
        ("open", "f", "u", RW | CREAT, 0o644),
        ("write", "f", b"data"),
        ("unlink", "u"),
        ("stat", "u"),
        ("listdir", "."),
        ("pwrite", "f", b"MORE", 4),
        ("pread", "f", 100, 0),
        ("fstat", "f"),
        ("put", "u", b"a new file under the old name"),
        ("pread", "f", 100, 0),
        ("ftruncate", "f", 2),
        ("pread", "f", 100, 0),
        ("fsync", "f"),
        ("close", "f"),
        ("content", "u"),
        ("listdir", "."),
        ("unlink", "missing"),
        ("mkdir", "d", 0o755),
        ("unlink", "d"),
        ("unlink", "u/x"),
        ("unlink", "missing/x"),
        ("open", "r", "u", RO),
        ("unlink", "u"),
        ("read", "r", 100),
        ("close", "r"),
        ("listdir", "."),
    ],
    "mkdir_rmdir": [
        ("mark", "."),
        ("mkdir", "d", 0o755),
        ("changed", "."),
        ("mkdir", "d", 0o755),
        ("stat", "d"),
        ("stat", "."),
        ("mkdir", "d/e", 0o700),
        ("stat", "d"),
        ("stat", "d/e"),
        ("mkdir", "s", 0o1777),
        ("stat", "s"),
        ("mkdir", "missing/x", 0o755),
        ("put", "f", b"f"),
        ("mkdir", "f/x", 0o755),
        ("mkdir", "f", 0o755),
        ("rmdir", "d"),
        ("rmdir", "missing"),
        ("rmdir", "f"),
        ("rmdir", "f/x"),
        ("rmdir", "d/e/."),
        ("rmdir", "d/.."),
        ("mark", "d"),
        ("rmdir", "d/e"),
        ("changed", "d"),
        ("stat", "d"),
        ("rmdir", "d"),
        ("rmdir", "s"),
        ("listdir", "."),
        ("stat", "."),
        ("mkdir", "g", 0o2775),  # setgid directories pass their group on
        ("chown", "g", 0, 65534),
        ("chmod", "g", 0o2775),
        ("put", "g/f", b""),
        ("mkdir", "g/sub", 0o755),
        ("stat", "g/f"),
        ("stat", "g/sub"),
    ],
    "symlinks": [
        ("put", "t", b"target data"),
        ("symlink", "t", "s"),
        ("readlink", "s"),
        ("lstat", "s"),
        ("stat", "s"),
        ("content", "s"),
        ("symlink", "nowhere", "dang"),
        ("readlink", "dang"),
        ("stat", "dang"),
        ("lstat", "dang"),
        ("content", "dang"),
        ("open", "x", "dang", WO | CREAT | EXCL, 0o644),
        ("open", "x", "s", RO | os.O_NOFOLLOW),
        ("listdir", "."),
        ("readlink", "t"),
        ("readlink", "missing"),
        ("mkdir", "d", 0o755),
        ("readlink", "d"),
        ("symlink", "x", "t"),
        ("symlink", "/" + "long/" * 200, "longlink"),
        ("readlink", "longlink"),
        ("lstat", "longlink"),
        ("put", "d/f", b"in d"),
        ("symlink", "d", "ld"),
        ("content", "ld/f"),
        ("listdir", "ld"),
        ("put", "dang", b"written through the link"),  # creates the target
        ("content", "nowhere"),
        ("stat", "dang"),
        ("rename", "s", "s2"),
        ("readlink", "s2"),
        ("unlink", "s2"),
        ("content", "t"),
        ("lchown", "dang", 65534, 65534),
        ("lstat", "dang"),
        ("stat", "dang"),
        ("link", "dang", "hardlink-to-link"),
        ("lstat", "hardlink-to-link"),
        ("readlink", "hardlink-to-link"),
        ("rmdir", "ld"),
        ("unlink", "ld"),
        ("listdir", "."),
    ],
    "hard_links": [
        ("put", "a", b"shared"),
        ("mark", "a"),
        ("mark", "."),
        ("link", "a", "b"),
        ("changed", "a"),
        ("changed", "."),
        ("stat", "a"),
        ("stat", "b"),
        ("open", "app", "b", WO | APPEND),
        ("write", "app", b" and more"),
        ("close", "app"),
        ("content", "a"),
        ("mkdir", "d", 0o755),
        ("link", "a", "d/c"),
        ("stat", "d/c"),
        ("mark", "b"),
        ("unlink", "a"),
        ("changed", "b"),
        ("stat", "b"),
        ("content", "b"),
        ("link", "d", "d2"),
        ("link", "a", "z"),
        ("link", "b", "d/c"),
        ("link", "b", "b"),
        ("link", "missing", "x"),
        ("link", "b", "missingdir/x"),
        ("open", "h", "b", RW),
        ("unlink", "b"),
        ("pwrite", "h", b"SHARED", 0),
        ("content", "d/c"),
        ("fstat", "h"),
        ("close", "h"),
        ("unlink", "d/c"),
        ("listdir", "."),
        ("listdir", "d"),
    ],
    "chmod_chown": [
        ("put", "f", b"f"),
        ("mark", "f"),
        ("chmod", "f", 0o600),
        ("changed", "f"),
        ("stat", "f"),
        ("chmod", "f", 0o7777),
        ("stat", "f"),
        ("mark", "f"),
        ("chown", "f", 65534, 65534),
        ("changed", "f"),
        ("stat", "f"),  # chown clears setuid and setgid
        ("chown", "f", -1, 0),
        ("stat", "f"),
        ("chmod", "f", 0o000),
        ("content", "f"),  # root reads anyway
        ("stat", "f"),
        ("mkdir", "d", 0o755),
        ("chmod", "d", 0o1777),
        ("chown", "d", 1, 2),
        ("stat", "d"),
        ("chmod", "missing", 0o644),
        ("chown", "missing", 0, 0),
    ],
    "times": [
        ("put", "f", b"abc"),
        ("mark", "f"),
        ("content", "f"),
        ("changed", "f"),
        ("mark", "f"),
        ("writeat", "f", 1, b"Z"),
        ("changed", "f"),
        ("mark", "f"),
        ("open", "o", "f", RO),
        ("close", "o"),
        ("changed", "f"),
        ("mark", "f"),
        ("open", "o", "f", RW),
        ("pwrite", "o", b"Q", 0),
        ("changed", "f"),
        ("close", "o"),
        ("mark", "f"),
        ("truncate", "f", 2),
        ("changed", "f"),
        ("mark", "f"),
        ("truncate", "f", 2),  # the same size: still a change
        ("changed", "f"),
        ("mark", "f"),
        ("open", "t", "f", WO | TRUNC),
        ("close", "t"),
        ("changed", "f"),
        ("utime", "f", (1_000_000_001, 2_000_000_002)),
        ("times", "f"),
        ("utime", "f", (1_700_000_000_123_456_789, 1_600_000_000_987_654_321)),
        ("times", "f"),
        ("mark", "f"),
        ("utime", "f", (5, 7)),
        ("changed", "f"),
        ("times", "f"),
        ("utime", "f", None),
        ("recent", "f"),
        ("mkdir", "d", 0o755),
        ("utime", "d", (3_000_000_000, 4_000_000_000)),
        ("times", "d"),
        ("mark", "d"),
        ("put", "d/x", b"x"),
        ("changed", "d"),
        ("mark", "d"),
        ("rename", "d/x", "d/y"),
        ("changed", "d"),
        ("mark", "d"),
        ("unlink", "d/y"),
        ("changed", "d"),
        ("symlink", "f", "s"),
        ("utime", "s", (11, 13), False),
        ("times", "s"),
        ("recent", "f"),  # the link's times, not its target's
        ("utime", "missing", None),
    ],
    "o_trunc_of_an_empty_file": [
        ("put", "f", b""),
        ("mark", "f"),
        ("open", "t", "f", WO | TRUNC),  # POSIX: O_TRUNC on an existing file marks mtime and ctime for update
        ("close", "t"),
        ("changed", "f"),
    ],
    "device_nodes": [  # kept with their type and number, as tmpfs keeps them (the mount is nodev)
        ("mknod", "c", stat.S_IFCHR | 0o644, 1, 3),
        ("mknod", "b", stat.S_IFBLK | 0o600, 7, 0),
        ("mknod", "p", stat.S_IFIFO | 0o644, 0, 0),
        ("lstat", "c"),
        ("lstat", "b"),
        ("rdev", "c"),
        ("rdev", "b"),
        ("rdev", "p"),
        ("mknod", "c", stat.S_IFCHR | 0o644, 1, 3),
        ("rename", "c", "c2"),
        ("link", "b", "b2"),
        ("lstat", "b2"),
        ("chmod", "c2", 0o600),
        ("chown", "c2", 65534, 65534),
        ("lstat", "c2"),
        ("rdev", "c2"),
        ("unlink", "b"),
        ("rdev", "b2"),
        ("rename", "b2", "c2"),
        ("rdev", "c2"),
        ("listdir", "."),
    ],
    "past_the_largest_file": [  # EFBIG, not EDQUOT: no quota could ever allow it
        ("put", "f", b"small"),
        ("truncate", "f", 10**18),
        ("open", "f", "f", RW),
        ("ftruncate", "f", 10**18),
        ("pwrite", "f", b"x", 10**18),
        ("close", "f"),
        ("content", "f"),
        ("stat", "f"),
    ],
    "errors_and_limits": [
        ("statvfs", "."),
        ("stat", "missing"),
        ("put", "f", b"f"),
        ("stat", "f/x"),
        ("listdir", "f"),
        ("listdir", "missing"),
        ("mkdir", "d", 0o755),
        ("open", "x", "d", WO),
        ("put", "d", b"x"),
        ("content", "d"),
        ("open", "x", LONG, RO),
        ("put", LONG, b"x"),
        ("rename", "f", LONG),
        ("link", "f", LONG),
        ("symlink", "f", LONG),
        ("put", MAX, b"the longest name"),
        ("content", MAX),
        ("rename", MAX, "short"),
        ("listdir", "."),
        ("stat", "f/"),
        ("stat", "d/"),
        ("rename", "f", "d/"),
    ],
    "times_of_names": [  # every change of a name marks its directory, and the inode whose links it changes
        ("mkdir", "d", 0o755),
        ("mkdir", "e", 0o755),
        *watch(("put", "d/f", b"f"), "d"),
        *watch(("mkdir", "d/sub", 0o755), "d"),
        *watch(("mknod", "d/fifo", stat.S_IFIFO | 0o644, 0, 0), "d"),
        *watch(("mknod", "d/chr", stat.S_IFCHR | 0o644, 1, 3), "d"),
        *watch(("symlink", "f", "d/sl"), "d"),
        *watch(("link", "d/f", "d/f2"), "d", "d/f"),
        *watch(("unlink", "d/f2"), "d", "d/f"),
        *watch(("rmdir", "d/sub"), "d"),
        *watch(("rename", "d/f", "d/g"), "d", ("d/g", "d/f")),
        *watch(("rename", "d/g", "e/g"), "d", "e", ("e/g", "d/g")),
        ("mkdir", "d/m", 0o755),
        *watch(("rename", "d/m", "e/m"), "d", "e", ("e/m", "d/m")),  # a directory to another parent: its ".." changes too
        ("put", "e/victim", b"v"),
        ("link", "e/victim", "e/victim-link"),
        *watch(("rename", "e/g", "e/victim"), "e", "e/victim-link"),  # the replaced inode loses a link: its ctime moves
        ("stat", "e/victim-link"),
        ("link", "e/victim", "e/same"),
        *watch(("rename", "e/victim", "e/same"), "e", "e/same"),  # two names of one inode: nothing at all happens
        ("mark", "e"),
        ("mkdir", "e/m", 0o755),  # what fails changes nothing
        ("rmdir", "e"),
        ("rename", "d", "e/m"),
        ("unlink", "e/missing"),
        ("changed", "e"),
        ("mkdir", "e/m2", 0o755),
        *watch(("rename", "e/m", "e/m2"), ("e/m2", "e/m")),  # over an empty directory of the same parent
        ("stat", "e"),
    ],
    "times_of_data": [
        ("put", "f", b"abc"),
        *watch(("writeat", "f", 0, b"x"), "f", "."),
        ("open", "h", "f", RW),
        *watch(("ftruncate", "h", 3), "f"),  # the same size
        *watch(("ftruncate", "h", 5), "f"),
        *watch(("write", "h", b""), "f"),
        *watch(("read", "h", 10), "f"),
        ("close", "h"),
        *watch(("truncate", "f", 5), "f"),
        *watch(("chmod", "f", 0o644), "f"),  # the same mode: still a change
        *watch(("chown", "f", -1, -1), "f"),  # nothing to change: still a change
        ("chmod", "f", 0o6755),
        ("chown", "f", -1, -1),  # and, as any chown, it clears the set-id bits
        ("stat", "f"),
        ("mkdir", "sgid", 0o2755),
        *watch(("chown", "sgid", -1, -1), "sgid"),  # but not a directory's
        ("stat", "sgid"),
        ("chmod", "f", 0o644),
        *watch(("chown", "f", 0, 0), "f"),
        *watch(("utimensat", "f", 1_000_000_001, OMIT), "f"),
        ("stamps", "f"),
        *watch(("utimensat", "f", OMIT, OMIT), "f"),
        ("utimensat", "f", OMIT, 2_000_000_002),
        ("stamps", "f"),
        ("utimensat", "f", NOW, OMIT),
        ("stamps", "f"),
        ("utimensat", "f", 3_000_000_003, NOW),
        ("stamps", "f"),
        ("utimensat", "f", 4, 5),
        *watch(("utimensat", "f", NOW, NOW), "f"),
        ("stamps", "f"),
        ("symlink", "f", "s"),
        ("utimensat", "s", 6, OMIT, False),
        ("stamps", "s"),
        ("stamps", "f"),
        ("mkdir", "d", 0o755),
        *watch(("utimensat", "d", NOW, 8), "d"),
        ("stamps", "d"),
        ("utimensat", "missing", NOW, NOW),
        ("utimensat", "f", -100 * 10**9 - 5, 2**33 * 10**9 + 7),  # before 1970 and after 2038
        ("stamps", "f"),
        ("utimensat", "f", 0, 0),
        ("stamps", "f"),
        ("open", "n", "new", WO | CREAT, 0o644),
        ("close", "n"),
        ("stamps", "new"),
    ],
    "busy_program": [  # a program that runs cannot be written to (ETXTBSY) but can be renamed and unlinked
        ("put", "sleep", Path(shutil.which("sleep") or "/bin/sleep").read_bytes()),
        ("chmod", "sleep", 0o755),
        ("run", "p", "sleep"),
        ("open", "w", "sleep", WO),
        ("open", "w", "sleep", RW | TRUNC),
        ("truncate", "sleep", 0),
        ("open", "r", "sleep", RO),
        ("close", "r"),
        ("link", "sleep", "sleep2"),
        ("rename", "sleep2", "sleep3"),
        ("unlink", "sleep3"),
        ("stop", "p"),
        ("open", "w", "sleep", WO),
        ("close", "w"),
    ],
    "link_counts": [
        ("mkdir", "a", 0o755),
        ("mkdir", "b", 0o755),
        ("stat", "."),
        ("stat", "a"),
        ("mkdir", "a/1", 0o755),
        ("mkdir", "a/2", 0o755),
        ("mkdir", "a/3", 0o755),
        ("put", "a/f", b"f"),
        ("mknod", "a/p", stat.S_IFIFO | 0o644, 0, 0),
        ("symlink", "f", "a/s"),
        ("stat", "a"),
        ("stat", "a/1"),
        ("lstat", "a/s"),
        ("rename", "a/1", "b/1"),
        ("stat", "a"),
        ("stat", "b"),
        ("mkdir", "b/2", 0o755),
        ("rename", "a/2", "b/2"),  # over an empty directory of another parent
        ("stat", "a"),
        ("stat", "b"),
        ("rename", "b/2", "b/1"),  # and of the same parent
        ("stat", "b"),
        ("mkdir", "b/full", 0o755),
        ("mkdir", "b/full/x", 0o755),
        ("rename", "a/3", "b/full"),
        ("stat", "a"),
        ("stat", "b"),
        ("stat", "b/full"),
        ("rename", "b/full/x", "a/3"),  # a subdirectory back over its old place
        ("stat", "a"),
        ("stat", "b/full"),
        ("rmdir", "b/1"),
        ("stat", "b"),
        ("link", "a/f", "b/g"),
        ("link", "a/f", "g"),
        ("stat", "a/f"),
        ("link", "a/p", "b/p"),
        ("lstat", "b/p"),
        ("link", "a/s", "b/s"),
        ("lstat", "a/s"),
        ("put", "b/h", b"h"),
        ("link", "b/h", "b/h2"),
        ("rename", "a/f", "b/h"),  # over a file with two links: one is left
        ("stat", "b/h2"),
        ("stat", "b/h"),
        ("rename", "b/g", "b/h"),  # two links of one inode: nothing happens
        ("stat", "b/h"),
        ("listdir", "b"),
        ("unlink", "g"),
        ("stat", "b/h"),
        ("unlink", "b/p"),
        ("lstat", "a/p"),
        ("rmdir", "b/full"),
        ("stat", "b"),
        ("stat", "."),
    ],
    "rename_into_itself": [
        ("mkdir", "a", 0o755),
        ("mkdir", "a/b", 0o755),
        ("mkdir", "a/b/c", 0o755),
        ("rename", "a", "a/b/c/d"),
        ("rename", "a", "a/b/c"),
        ("rename", "a/b", "a/b/c"),
        ("rename", "a/b/c", "a"),  # onto its own ancestor, not empty
        ("rename", "a/b/c", "a/b/c"),
        ("rename", "a/b", "a/b/"),
        ("rename", "a/b/c", "a/b"),
        ("rename", "a/./b", "a/b2"),
        ("rename", "a/b/..", "x"),
        ("rename", "a/b2", "."),
        ("tree",),
    ],
}


# Each kind of name as the source and as the target of a rename, the local disk's answers beside ours.
KINDS: dict[str, Step] = {
    "file": ("put", "{}", b"data"),
    "symlink": ("symlink", "somewhere", "{}"),
    "fifo": ("mknod", "{}", stat.S_IFIFO | 0o644, 0, 0),
    "socket": ("mknod", "{}", stat.S_IFSOCK | 0o644, 0, 0),
    "chardev": ("mknod", "{}", stat.S_IFCHR | 0o644, 1, 3),
    "blockdev": ("mknod", "{}", stat.S_IFBLK | 0o644, 7, 0),
    "dir": ("mkdir", "{}", 0o755),
    "fulldir": ("mkdir", "{}", 0o755),
}


def make(kind: str, path: str) -> list[Step]:
    name, *args = KINDS[kind]
    steps: list[Step] = [(name, *(a.format(path) if a == "{}" else a for a in args))]
    if kind == "fulldir":
        steps.append(("put", path + "/inside", b"x"))
    return steps


def rename_over(source: str) -> list[Step]:
    """A `source` over each kind of target: each rename gives the local disk's answer, leaves the
    same tree and changes the same times."""
    steps: list[Step] = [("mkdir", source, 0o755)]
    for target in KINDS:
        pair = f"{source}/{target}"
        steps += [("mkdir", pair, 0o755), *make(source, pair + "/src"), *make(target, pair + "/dst")]
        steps += [*watch(("rename", pair + "/src", pair + "/dst"), pair, (pair + "/dst", pair + "/src")), ("lstat", pair + "/src"), ("tree",)]
    return steps


SCENARIOS |= {f"rename_{kind}_over_every_kind": rename_over(kind) for kind in KINDS}

# Enough names that listing them takes several readdir calls, then half of them gone.
SCENARIOS["many_names"] = [
    *[("put", f"entry-with-a-rather-long-name-{i:04d}", str(i).encode()) for i in range(100)],
    ("listdir", "."),
    *[("unlink", f"entry-with-a-rather-long-name-{i:04d}") for i in range(0, 100, 2)],
    ("listdir", "."),
    ("content", "entry-with-a-rather-long-name-0099"),
]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_differential_scenario(name: str, posix_memory: Path, tmp_path: Path) -> None:
    run_both(tmp_path / name, posix_memory / name, SCENARIOS[name], f"scenario {name}")


# -- as other users -------------------------------------------------------------------------------
# ("as", USER, STEP) runs one step as that user in a forked child; root sets up and looks.

USER_SCENARIOS: dict[str, list[Step]] = {
    "sticky_directories": [  # only the owner of the entry, of the directory, or root removes or replaces it
        ("mkdir", "t", 0o777),
        ("chmod", "t", 0o1777),
        ("as", OWNER, ("put", "t/owners", b"o")),
        ("as", OWNER, ("mkdir", "t/ownersdir", 0o777)),
        ("as", OTHER, ("put", "t/others", b"x")),
        ("put", "t/roots", b"r"),
        ("chmod", "t/roots", 0o666),
        ("as", OTHER, ("unlink", "t/owners")),
        ("as", OTHER, ("unlink", "t/roots")),
        ("as", OTHER, ("rmdir", "t/ownersdir")),
        ("as", OTHER, ("rename", "t/owners", "t/mine")),
        ("as", OTHER, ("rename", "t/others", "t/owners")),
        ("as", OTHER, ("rename", "t/others", "t/roots")),
        ("as", OTHER, ("rename", "t/ownersdir", "t/mine")),
        ("as", MEMBER, ("unlink", "t/owners")),
        ("as", OWNER, ("rename", "t/owners", "t/owners2")),
        ("as", OTHER, ("rename", "t/others", "t/others2")),
        ("as", OWNER, ("unlink", "t/others2")),
        ("as", OWNER, ("rename", "t/owners2", "t/others2")),
        ("unlink", "t/others2"),
        ("listdir", "t"),
        ("as", OWNER, ("mkdir", "u", 0o777)),
        ("as", OWNER, ("chmod", "u", 0o1777)),
        ("as", OTHER, ("put", "u/others", b"x")),
        ("as", OTHER, ("mkdir", "u/othersdir", 0o777)),
        ("as", OTHER, ("put", "u/x", b"x")),
        ("as", MEMBER, ("unlink", "u/others")),
        ("as", OWNER, ("unlink", "u/others")),
        ("as", OWNER, ("rmdir", "u/othersdir")),
        ("as", OWNER, ("rename", "u/x", "t/x")),
        ("as", OTHER, ("unlink", "t/x")),
        ("listdir", "u"),
        ("mkdir", "n", 0o777),
        ("chmod", "n", 0o777),
        ("as", OWNER, ("put", "n/owners", b"o")),
        ("as", OTHER, ("unlink", "n/owners")),  # not sticky: write on the directory is enough
        ("as", OWNER, ("mkdir", "n/od", 0o755)),
        ("as", OTHER, ("rename", "n/od", "n/od2")),
        ("mkdir", "n/elsewhere", 0o777),
        ("chmod", "n/elsewhere", 0o777),
        ("as", OTHER, ("rename", "n/od2", "n/elsewhere/od")),  # a directory to another parent: its ".." needs write
        ("tree",),
    ],
    "permissions_of_a_stranger": [
        ("put", "w", b"w"),
        ("chmod", "w", 0o666),
        ("put", "r", b"r"),
        ("chmod", "r", 0o644),
        ("utimensat", "w", 1, 2),
        ("as", OTHER, ("utimensat", "w", NOW, NOW)),  # write permission is enough to touch
        ("stamps", "w"),
        ("utimensat", "w", 1, 2),
        ("mark", "w"),
        ("as", OTHER, ("utime", "w", None)),
        ("changed", "w"),
        ("stamps", "w"),
        ("as", OTHER, ("utimensat", "w", 3, 4)),  # but only the owner sets times
        ("as", OTHER, ("utimensat", "w", NOW, OMIT)),
        ("as", OTHER, ("utimensat", "w", OMIT, OMIT)),
        ("as", OTHER, ("utimensat", "r", NOW, NOW)),
        ("as", OTHER, ("utime", "r", None)),
        ("as", OTHER, ("utimensat", "r", 3, 4)),
        ("stamps", "w"),
        ("as", OTHER, ("chmod", "w", 0o777)),
        ("as", OTHER, ("chown", "w", -1, -1)),
        ("as", OTHER, ("chown", "w", OTHER.uid, -1)),
        ("as", OTHER, ("chown", "w", -1, OTHER.gid)),
        ("as", OTHER, ("truncate", "r", 0)),
        ("as", OTHER, ("truncate", "w", 1)),
        ("as", OTHER, ("open", "x", "r", WO)),
        ("as", OTHER, ("open", "x", "r", RO | TRUNC)),
        ("as", OTHER, ("open", "x", "r", RO)),
        ("chmod", "w", 0o6666),
        ("as", OTHER, ("open", "x", "w", WO | TRUNC)),  # O_TRUNC clears the set-id bits too, even of an empty file
        ("stat", "w"),
        ("chmod", "w", 0o6666),
        ("as", OTHER, ("open", "x", "w", WO | TRUNC)),
        ("stat", "w"),
        ("chmod", "w", 0o6666),
        ("as", OTHER, ("open", "x", "w", WO)),
        ("stat", "w"),
        ("chmod", "w", 0o666),
        ("stat", "r"),
        ("as", OTHER, ("open", "x", "new", WO | CREAT | EXCL, 0o600)),
        ("lstat", "new"),
        ("as", OTHER, ("put", "mine", b"m")),
        ("as", OTHER, ("chmod", "mine", 0o4700)),
        ("stat", "mine"),
        ("as", OTHER, ("chmod", "mine", 0o2755)),
        ("stat", "mine"),
        ("chown", "mine", -1, 0),
        ("stat", "mine"),
        ("as", OTHER, ("chmod", "mine", 0o2755)),  # not in the file's group: set-group-id is dropped
        ("stat", "mine"),
        ("as", OTHER, ("chown", "mine", -1, OTHER.gid)),
        ("as", OTHER, ("chown", "mine", -1, 0)),  # not a member of group 0
        ("as", OTHER, ("chown", "mine", OWNER.uid, -1)),
        ("as", OTHER, ("utimensat", "mine", 5, 6)),
        ("stamps", "mine"),
        ("as", OTHER, ("chmod", "mine", 0o1755)),  # the sticky bit on a file: Linux lets its owner set it
        ("stat", "mine"),
        ("as", OTHER, ("symlink", "t" * 4095, "longest")),
        ("as", OTHER, ("readlink", "longest")),
        ("as", OTHER, ("symlink", "t" * 4096, "too-long")),
        ("mkdir", "ro", 0o755),
        ("as", OTHER, ("put", "ro/x", b"")),
        ("as", OTHER, ("mkdir", "ro/x", 0o755)),
        ("as", OTHER, ("symlink", "x", "ro/x")),
        ("as", OTHER, ("link", "w", "ro/x")),
        ("as", OTHER, ("rename", "w", "ro/x")),
        ("as", OTHER, ("mknod", "ro/p", stat.S_IFIFO | 0o644, 0, 0)),
        ("put", "ro/f", b"f"),
        ("as", OTHER, ("unlink", "ro/f")),
        ("as", OTHER, ("rename", "ro/f", "moved")),
        ("mkdir", "nox", 0o766),
        ("put", "nox/f", b"f"),
        ("as", OTHER, ("stat", "nox/f")),
        ("as", OTHER, ("unlink", "nox/f")),
        ("as", OTHER, ("listdir", "nox")),
        ("as", OTHER, ("mknod", "c", stat.S_IFCHR | 0o644, 1, 3)),  # no CAP_MKNOD
        ("as", OTHER, ("mknod", "p", stat.S_IFIFO | 0o644, 0, 0)),
        ("as", OTHER, ("link", "r", "hl")),  # fs.protected_hardlinks: not theirs, not writable
        ("as", OTHER, ("link", "w", "hl")),
        ("tree",),
    ],
    "set_ids_and_supplementary_groups": [  # the set-group-id bit stays for a member of the file's group
        ("put", "f", b"data"),
        ("chown", "f", MEMBER.uid, OWNER.gid),  # a group of the member's only as a supplementary one
        ("chmod", "f", 0o2745),
        ("as", MEMBER, ("writeat", "f", 0, b"D")),
        ("stat", "f"),
        ("as", MEMBER, ("truncate", "f", 3)),
        ("stat", "f"),
        ("as", MEMBER, ("chown", "f", -1, -1)),
        ("stat", "f"),
        ("as", MEMBER, ("chown", "f", -1, MEMBER.gid)),
        ("stat", "f"),
        ("chown", "f", -1, 0),
        ("chmod", "f", 0o2745),
        ("as", MEMBER, ("chown", "f", -1, -1)),  # not in group 0: set-group-id goes
        ("stat", "f"),
        ("chmod", "f", 0o2745),
        ("as", MEMBER, ("writeat", "f", 0, b"d")),
        ("stat", "f"),
        ("chmod", "f", 0o2745),
        ("as", MEMBER, ("truncate", "f", 2)),
        ("stat", "f"),
        ("chmod", "f", 0o6555),
        ("as", MEMBER, ("chown", "f", -1, OWNER.gid)),
        ("stat", "f"),
        ("mkdir", "d", 0o755),
        ("chown", "d", MEMBER.uid, 0),
        ("chmod", "d", 0o6755),
        ("as", MEMBER, ("chown", "d", -1, OWNER.gid)),  # a directory keeps them
        ("stat", "d"),
    ],
}


@pytest.fixture(scope="module")
def shared_roots(fs: Mount) -> Iterator[tuple[Path, Path]]:
    """A local directory and a memory/ that every user can reach."""
    local = Path(tempfile.mkdtemp(prefix="aiosfs-users-", dir="/tmp"))
    memory = fs.agent("posix-users") / "memory"
    for path in (local, memory):
        os.chmod(path, 0o755)
    yield local, memory
    shutil.rmtree(local)


@needs_root
@pytest.mark.parametrize("name", list(USER_SCENARIOS))
def test_differential_scenario_as_users(name: str, shared_roots: tuple[Path, Path]) -> None:
    local, memory = shared_roots
    run_both(local / name, memory / name, [("chmod", ".", 0o777), *USER_SCENARIOS[name]], f"scenario {name}")


def test_times_past_what_an_inode_holds_are_clamped(posix_memory: Path) -> None:
    """memory/ holds times from 1677 to 2262 (nanoseconds in 64 bits; ext4 reaches 2446): a time
    beyond is clamped, as Linux clamps times to a filesystem's range, and the mount stays up."""
    far = posix_memory / "far-times"
    far.write_bytes(b"")
    utimensat(str(far), -(2**40) * 10**9, 2**40 * 10**9)
    st = os.stat(far)
    assert (st.st_atime_ns, st.st_mtime_ns) == (-(2**63), 2**63 - 1)


# -- the randomized scenario ------------------------------------------------------------------

SEED = 20261125
RANDOM_STEPS = 300
TREE_EVERY = 10  # a tree reads every file (about 4 ms each in memory/): often enough to place a difference
FILES = ["a", "b", "c", "x/a", "x/b", "y/c", "x/z/a"]
DIRS = ["x", "y", "x/z", "w"]
HANDLES = ["h0", "h1"]


def _offset(rng: random.Random) -> int:
    """Offsets and sizes near the interesting places: the start, a chunk boundary, far away."""
    return rng.choice([0, rng.randrange(0, 5000), CHUNK - rng.randrange(1, 64), rng.randrange(0, 3 * CHUNK)])


def _data(rng: random.Random) -> bytes:
    return rng.randbytes(rng.choice([rng.randrange(0, 3000), rng.randrange(0, 3000), rng.randrange(CHUNK - 100, CHUNK + 100)]))


def random_operation(rng: random.Random) -> list[Step]:
    """One random operation (creating with open is followed by its close)."""
    name, other, handle = rng.choice(FILES + DIRS), rng.choice(FILES + DIRS), rng.choice(HANDLES)
    choices: list[list[Step]] = [
        [("put", name, _data(rng))],
        [("open", "t", name, WO | CREAT | rng.choice([0, EXCL, TRUNC]), 0o644), ("close", "t")],
        [("writeat", name, _offset(rng), _data(rng))],
        [("truncate", name, _offset(rng))],
        [("rename", name, other)],
        [("unlink", name)],
        [("mkdir", name, 0o755)],
        [("rmdir", name)],
        [("link", name, other)],
        [("symlink", other, name)],
        [("content", name)],
        [("stat", name)],
        [("open", handle, name, RW | rng.choice([0, 0, APPEND, CREAT, TRUNC]))],
        [("pwrite", handle, _data(rng), _offset(rng))],
        [("write", handle, _data(rng))],
        [("pread", handle, rng.randrange(0, 2 * CHUNK), _offset(rng))],
        [("ftruncate", handle, _offset(rng))],
        [("fstat", handle)],
        [("fsync", handle)],
        [("close", handle)],
    ]
    return rng.choice(choices)


def random_steps(seed: int, count: int) -> list[Step]:
    """`count` random operations, with a look at the whole tree every TREE_EVERY of them and at the end."""
    rng = random.Random(seed)
    steps: list[Step] = []
    for i in range(1, count + 1):
        steps += random_operation(rng)
        if i % TREE_EVERY == 0 or i == count:
            steps.append(("tree",))
    return steps


def test_differential_random_sequence(posix_memory: Path, tmp_path: Path) -> None:
    steps = random_steps(SEED, RANDOM_STEPS)
    run_both(tmp_path / "random", posix_memory / "random", steps, f"random sequence, seed {SEED}")


# -- across the memory/ boundary -----------------------------------------------------------------


def attempt(action: Any) -> Any:
    """What a call gave: its errno name, or its result (None for most)."""
    try:
        return action()
    except OSError as exc:
        return errno.errorcode[exc.errno or 0]


def test_cross_agent_and_synthetic_boundaries(fs: Mount) -> None:
    a, b = fs.agent("xa"), fs.agent("xb")
    (a / "memory" / "f").write_text("mine")
    (a / "memory" / "dir").mkdir()
    assert attempt(lambda: os.rename(a / "memory" / "f", b / "memory" / "f")) == "EXDEV"
    assert attempt(lambda: os.rename(a / "memory" / "dir", b / "memory" / "dir")) == "EXDEV"
    assert attempt(lambda: os.link(a / "memory" / "f", b / "memory" / "f")) == "EXDEV"
    assert attempt(lambda: os.rename(a / "memory" / "f", a / "newname")) == "EXDEV"
    assert attempt(lambda: os.rename(a / "memory" / "f", a / "prompt")) == "EXDEV"
    assert attempt(lambda: os.rename(a / "config", a / "memory" / "config")) == "EXDEV"
    assert attempt(lambda: os.link(a / "config", a / "memory" / "config")) == "EXDEV"
    assert attempt(lambda: os.rmdir(a / "memory")) == "EPERM"
    assert (a / "memory" / "f").read_text() == "mine" and os.listdir(b / "memory") == []
    assert (a / "prompt").exists() and sorted(os.listdir(a / "memory")) == ["dir", "f"]


def test_rmdir_of_an_agent_with_memory_loses_nothing(fs: Mount) -> None:
    """rmdir moves the agent, memory included, to the trash; `restore` brings it all back."""
    agent = fs.agent("gone")
    (agent / "memory" / "sub").mkdir()
    (agent / "memory" / "sub" / "keep.md").write_text("precious")
    os.rmdir(agent)
    assert "gone" not in os.listdir(fs.agents)
    assert any(line.split()[0] == "gone" for line in (fs.root / "kernel" / "trash").read_text().splitlines()[1:])
    assert sh(f'echo "restore gone" > {fs.root}/kernel/ctl').returncode == 0
    assert (agent / "memory" / "sub" / "keep.md").read_text() == "precious"


# -- durability under kill -9 -------------------------------------------------------------------
# One daemon is killed while three agents' files are in three states; each test checks one.

PIECE = "{name} piece {k}|"  # one write() of a file: this, repeated
REPEAT, PIECES = 120, 4  # about 2.3 KiB per write, 9 KiB per file

WRITER = """
import os, sys
root, count, piece, repeat, pieces = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
for i in range(count):
    name = f"f{i:05d}"
    fd = os.open(os.path.join(root, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    for k in range(pieces):
        os.write(fd, (piece.format(name=name, k=k) * repeat).encode())
    os.close(fd)
    print(name, flush=True)
"""

PENDING = """
import os, sys
root = sys.argv[1]
fd = os.open(os.path.join(root, "old.txt"), os.O_WRONLY | os.O_TRUNC)
os.write(fd, b"NEW CONTENT, NEVER CLOSED")
synced = os.open(os.path.join(root, "synced.txt"), os.O_WRONLY | os.O_CREAT, 0o644)
os.write(synced, b"durable after fsync\\n")
os.fsync(synced)
os.write(synced, b"written after the fsync, never closed\\n")
print("ready", flush=True)
sys.stdin.read()  # keep the descriptors open until the daemon is gone
"""

HALF_WRITER = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_TRUNC)
os.write(fd, b"the first half of a new text, ")
print("ready", flush=True)
sys.stdin.read()  # the second half never comes: the daemon dies first
"""


HALF_WRITTEN = b"the first half of a new text, "
OLD = b"OLD CONTENT"


def expected_content(name: str) -> bytes:
    return b"".join((PIECE.format(name=name, k=k) * REPEAT).encode() for k in range(PIECES))


def kill_daemon(mount: Mount) -> None:
    mount.kill()
    assert dead(mount.root)


def _holder(code: str, root: Path) -> subprocess.Popen[str]:
    """A child that writes without closing, says `ready`, then waits on stdin."""
    child = subprocess.Popen([sys.executable, "-c", code, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    return child


@dataclass
class Crash:
    mount: Mount
    printed: list[str]  # files the writer reported closed
    writer_rc: int | None
    pending_size: int  # old.txt's size before the kill, with the uncommitted overwrite
    seen_by_reader: bytes  # notes.txt as a reader saw it before the kill


@pytest.fixture(scope="module")
def crash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crash]:
    with mounted(tmp_path_factory.mktemp("crash"), "--backend", "fake") as mount:
        writer_dir, pending, reader = (mount.agent(name) / "memory" for name in ("writer", "pending", "reader"))
        (pending / "old.txt").write_bytes(OLD)
        (reader / "notes.txt").write_bytes(OLD)
        holders = [_holder(PENDING, pending), _holder(HALF_WRITER, reader / "notes.txt")]
        seen = (reader / "notes.txt").read_bytes()  # a reader opens and closes the half-written file
        args = [sys.executable, "-c", WRITER, str(writer_dir), "100000", PIECE, str(REPEAT), str(PIECES)]
        writer = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert writer.stdout is not None
        printed = [writer.stdout.readline().strip() for _ in range(40)]
        size = os.stat(pending / "old.txt").st_size  # stat, not read: a reader's close would commit
        kill_daemon(mount)
        rest, _ = writer.communicate(timeout=60)
        for child in holders:
            child.kill()
            child.communicate(timeout=30)
        assert "cleaned a dead mount" in mount.start().stderr
        # a close that returned before the kill may be reported after it
        yield Crash(mount, printed + rest.split(), writer.returncode, size, seen)


def test_kill9_keeps_closed_files_whole_and_none_torn(crash: Crash) -> None:
    memory = crash.mount.agents / "writer" / "memory"
    assert crash.writer_rc != 0, "the writer finished: the kill did not land in the middle"
    names = sorted(os.listdir(memory))
    assert set(crash.printed) <= set(names), f"closed but lost: {sorted(set(crash.printed) - set(names))}"
    for name in crash.printed:
        assert (memory / name).read_bytes() == expected_content(name), f"{name} was closed before the kill but is not whole"
    for name in names:
        # Created (size 0, committed) at open, its whole content committed at close: nothing in between survives.
        data = (memory / name).read_bytes()
        assert data in (b"", expected_content(name)), f"{name} is torn: {len(data)} of {len(expected_content(name))} bytes"


def test_kill9_before_close_keeps_the_last_commit(crash: Crash) -> None:
    memory = crash.mount.agents / "pending" / "memory"
    assert crash.pending_size == len(b"NEW CONTENT, NEVER CLOSED")
    assert (memory / "old.txt").read_bytes() == OLD  # the truncation was uncommitted too
    assert (memory / "synced.txt").read_bytes() == b"durable after fsync\n"


def test_kill9_after_a_reader_closed_keeps_the_writers_file_whole(crash: Crash) -> None:
    """Another process reading a file (and closing it) must not make a half-written content the durable one."""
    assert crash.seen_by_reader == HALF_WRITTEN  # readers see the writes at once
    assert (crash.mount.agents / "reader" / "memory" / "notes.txt").read_bytes() == OLD, "a half-written file survived the crash"


# -- quota ---------------------------------------------------------------------------------------

QUOTA = 100_000


@pytest.fixture(scope="module")
def quota_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mounted(tmp_path_factory.mktemp("quota"), "--backend", "fake", "--memory-quota", str(QUOTA)) as mount:
        yield mount


def _memory_bytes(mount: Mount) -> int:
    """What the quota counts: the sizes of every file and symlink in every agent's memory/."""
    return sum(os.lstat(os.path.join(top, n)).st_size for a in mount.agents.iterdir() for top, _, files in os.walk(a / "memory") for n in files)


def test_quota_is_what_df_shows(quota_fs: Mount) -> None:
    memory = quota_fs.agent("df") / "memory"
    (memory / "f").write_bytes(b"x" * 40_000)
    # statfs names no directory, so the mount's size is its agents' quotas together
    total = len(os.listdir(quota_fs.agents)) * QUOTA
    vfs = os.statvfs(memory)
    shown = (vfs.f_blocks, vfs.f_bavail)
    assert shown == (total // vfs.f_frsize, (total - _memory_bytes(quota_fs)) // vfs.f_frsize), f"--memory-quota {QUOTA} is not in force"
    df = sh(f"df -B1 --output=size {memory}")
    assert df.returncode == 0 and int(df.stdout.split()[-1]) == total // vfs.f_frsize * vfs.f_frsize


def test_quota_refuses_whole_writes_and_frees_on_delete(quota_fs: Mount) -> None:
    memory = quota_fs.agent("quota") / "memory"
    (memory / "a").write_bytes(b"a" * 60_000)
    fd = os.open(memory / "b", WO | CREAT, 0o644)
    try:
        assert attempt(lambda: os.write(fd, b"b" * 50_000)) == "EDQUOT"
        assert os.fstat(fd).st_size == 0
        assert os.write(fd, b"c" * 32_768) == 32_768
        assert os.pwrite(fd, b"d" * 20_000, 0) == 20_000  # rewriting inside the file costs nothing
        assert attempt(lambda: os.write(fd, b"e" * 8_192)) == "EDQUOT"
        assert attempt(lambda: os.ftruncate(fd, 200_000)) == "EDQUOT"
        assert os.fstat(fd).st_size == 32_768
    finally:
        os.close(fd)
    assert (memory / "b").read_bytes() == b"d" * 20_000 + b"c" * 12_768
    assert attempt(lambda: os.truncate(memory / "b", 80_000)) == "EDQUOT"
    (memory / "c").write_bytes(b"c" * 4_000)
    assert attempt(lambda: os.symlink("t" * 4_000, memory / "link")) == "EDQUOT"  # a target counts too
    assert not os.path.lexists(memory / "link")
    (memory / "c").unlink()
    (memory / "a").unlink()
    with open(memory / "b", "ab") as f:
        f.write(b"f" * 50_000)
    assert os.stat(memory / "b").st_size == 82_768


def test_quota_refuses_a_write_that_starts_inside_a_page(quota_fs: Mount) -> None:
    memory = quota_fs.agent("quota-unaligned") / "memory"
    (memory / "a").write_bytes(b"a" * 60_000)
    fd = os.open(memory / "b", WO | CREAT, 0o644)
    try:
        assert os.write(fd, b"c" * 30_000) == 30_000  # 92 KB of 100 KB used; the file ends inside a page
        written = attempt(lambda: os.write(fd, b"e" * 20_000))
        assert (written, os.fstat(fd).st_size) == ("EDQUOT", 30_000), "a write past the quota was partly done (write returned a count)"
    finally:
        os.close(fd)
    assert (memory / "b").read_bytes() == b"c" * 30_000


# -- versions and rollback -----------------------------------------------------------------------


def versions_of(agent: Path, path: str) -> list[tuple[int, int]]:
    """(version, bytes) of one memory file, from the agent's `versions` file."""
    lines = (agent / "versions").read_text().splitlines()
    assert lines[0] == "version bytes time path"
    rows = [line.split(" ", 3) for line in lines[1:]]
    return [(int(n), int(size)) for n, size, _, p in rows if p == path]


def wait_versions(agent: Path, path: str, count: int) -> list[tuple[int, int]]:
    # the kernel sends release (which keeps the version) just after close() returns
    wait_for(lambda: len(versions_of(agent, path)) == count, timeout=10)
    return versions_of(agent, path)


def test_versions_and_rollback_through_ctl(fs: Mount) -> None:
    agent = fs.agent("vers")
    notes = agent / "memory" / "notes.md"
    texts = ["first draft\n", "second, longer draft\n", "third\n"]
    for text in texts:
        notes.write_text(text)
    assert wait_versions(agent, "notes.md", 3) == [(1, 12), (2, 21), (3, 6)]
    assert sh(f'echo "rollback notes.md 1" > {agent}/ctl').returncode == 0
    assert notes.read_text() == texts[0]
    assert wait_versions(agent, "notes.md", 4)[-1] == (4, 12)
    missing = sh(f'echo "rollback notes.md 9" > {agent}/ctl')
    assert missing.returncode != 0 and "No such file" in missing.stderr
    assert (agent / "error").read_text().startswith("ENOENT ")
    assert notes.read_text() == texts[0] and len(versions_of(agent, "notes.md")) == 4


def test_rollback_paths_stay_inside_memory(fs: Mount) -> None:
    agent, other = fs.agent("jail"), fs.agent("jail-other")
    target = other / "memory" / "x"
    for text in ("one\n", "two\n"):
        target.write_text(text)
    wait_versions(other, "x", 2)
    (agent / "memory" / "sub").mkdir()
    for path in ["../../x", "../jail-other/memory/x", "../../../agents/jail-other/memory/x", "/x", "sub/../../x"]:
        result = sh(f'echo "rollback {path} 1" > {agent}/ctl')
        assert result.returncode != 0, f"rollback {path} was accepted"
        assert (agent / "error").read_text().split()[0] in ("ENOENT", "EINVAL"), path
    assert target.read_text() == "two\n" and len(versions_of(other, "x")) == 2


# -- an unprivileged user ------------------------------------------------------------------------

PROBE = """
import errno, os, sys
memory = sys.argv[1]
def attempt(action):
    try:
        action()
        return "ok"
    except OSError as exc:
        return errno.errorcode[exc.errno]
def create():
    fd = os.open(os.path.join(memory, "mine"), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"by nobody")
    os.close(fd)
print(attempt(lambda: os.listdir(memory)), attempt(create), attempt(lambda: os.mkdir(os.path.join(memory, "mydir"))),
      attempt(lambda: os.open(os.path.join(memory, "roots"), os.O_WRONLY)), attempt(lambda: os.chmod(memory, 0o700)))
"""


def as_nobody(memory: Path) -> list[str]:
    result = subprocess.run([*NOBODY, sys.executable, "-c", PROBE, str(memory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_unprivileged_user_needs_the_mode_bits(fs: Mount) -> None:
    agent = fs.agent("shared")
    memory = agent / "memory"
    st = os.stat(memory)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 0, 0)
    (memory / "roots").write_text("root's file")
    assert as_nobody(memory) == ["EACCES", "EACCES", "EACCES", "EACCES", "EPERM"]
    os.chmod(memory, 0o777)
    assert as_nobody(memory) == ["ok", "ok", "ok", "EACCES", "EPERM"]
    for name in ("mine", "mydir"):
        st = os.stat(memory / name)
        assert (st.st_uid, st.st_gid) == (65534, 65534), name
    assert (memory / "mine").read_bytes() == b"by nobody"
    assert stat.S_IMODE(os.stat(memory / "mine").st_mode) == 0o644 and stat.S_IMODE(os.stat(memory).st_mode) == 0o777


def nobodys_agent(fs: Mount, name: str) -> Path:
    """An agent made by uid 65534, who so owns its ctl, recall and memory/."""
    made = subprocess.run([*NOBODY, "mkdir", str(fs.agents / name)], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    return fs.agents / name


def test_rollback_needs_search_on_every_directory_of_the_path(fs: Mount) -> None:
    agent = nobodys_agent(fs, "nobodys-rollback")
    private = agent / "memory" / "private"
    private.mkdir(mode=0o700)  # root's corner inside nobody's memory/
    secret = private / "secret.md"
    for text in ("first\n", "second\n"):
        secret.write_text(text)
    os.chmod(secret, 0o666)
    wait_versions(agent, "private/secret.md", 2)
    denied = subprocess.run([*NOBODY, "cat", str(secret)], capture_output=True, text=True, timeout=60)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr  # the VFS keeps nobody out of private/
    rollback = subprocess.run(
        [*NOBODY, "bash", "-c", f'echo "rollback private/secret.md 1" > {agent}/ctl'], capture_output=True, text=True, timeout=60
    )
    assert rollback.returncode != 0, "rollback changed a file its caller cannot reach"
    assert secret.read_text() == "second\n"


RECALL = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
os.write(fd, sys.argv[2].encode())
print(os.read(fd, 1 << 16).decode())
"""


def test_recall_shows_only_what_its_caller_may_read(fs: Mount) -> None:
    agent = nobodys_agent(fs, "nobodys-recall")
    memory = agent / "memory"
    (memory / "open.md").write_text("the weather is sunny today\n")
    (memory / "rootonly.md").write_text("the launch code is swordfish\n")
    os.chmod(memory / "rootonly.md", 0o600)
    (memory / "private").mkdir(mode=0o700)
    (memory / "private" / "code.md").write_text("swordfish opens the vault\n")
    result = subprocess.run(
        [*NOBODY, sys.executable, "-c", RECALL, str(agent / "recall"), "swordfish sunny"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "sunny" in result.stdout
    assert "swordfish" not in result.stdout, f"recall gave text its caller cannot read:\n{result.stdout}"


SETID_PROBE = r"""
import os, sys
root = sys.argv[1]
with open(os.path.join(root, "w"), "r+b") as f:
    f.write(b"user")
os.truncate(os.path.join(root, "t"), 1)
with open(os.path.join(root, "g"), "r+b") as f:
    f.write(b"user")
"""


def test_set_id_bits_are_cleared_as_linux_clears_them(fs: Mount) -> None:
    """A write or truncate by a user clears set-user-id, and set-group-id where group-execute is
    set or the user is not in the file's group; root's write keeps them; a chown clears them
    whoever does it. The same outcome as the local disk's."""
    modes = {}
    local_dir = Path(tempfile.mkdtemp(prefix="aiosfs-setid-", dir="/tmp"))  # a path the other user can reach
    os.chmod(local_dir, 0o755)
    memory = fs.agent("setid") / "memory"
    os.chmod(memory, 0o777)
    for base in (local_dir / "local", memory / "setid"):
        base.mkdir()
        os.chmod(base, 0o777)
        for name, mode in (("w", 0o6777), ("t", 0o6777), ("g", 0o2766), ("r", 0o6777), ("c", 0o6777)):
            (base / name).write_bytes(b"original")
            os.chmod(base / name, mode)
        result = subprocess.run([*NOBODY, sys.executable, "-c", SETID_PROBE, str(base)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        with open(base / "r", "r+b") as f:  # root: CAP_FSETID keeps the bits
            f.write(b"root")
        os.chown(base / "c", 65534, 65534)
        modes[base] = {name: oct(stat.S_IMODE(os.stat(base / name).st_mode)) for name in "wtgrc"}
    shutil.rmtree(local_dir)
    local, memory = modes.values()
    assert memory == local
    assert local == {"w": "0o777", "t": "0o777", "g": "0o766", "r": "0o6777", "c": "0o777"}  # g: not in the file's group
