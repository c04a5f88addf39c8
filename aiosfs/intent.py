"""Why a lookup is asked: the system call its caller is blocked in.

A FUSE lookup does not say what it is for, but an exclusive create of a name that
exists (`open` with O_CREAT|O_EXCL, `mkdir`) fails with EEXIST in the VFS before
the filesystem hears of it. Copy tools make every file that way when they recreate
a directory (`cp -r` into a directory it made, `tar -x`), so the agent directory
must know, at the lookup, that the name is being created: the caller waits in that
system call for the lookup's answer, and /proc/PID/syscall names it with its
arguments; the path it creates is read from /proc/PID/mem. Where /proc does not
tell (another architecture, a process the daemon may not trace), the answer is
"no", and the VFS answers EEXIST as before.
"""

from __future__ import annotations

import os
import platform

# system call number → (what it does, index of its path argument, index of its flags argument or None)
SYSCALLS: dict[str, dict[int, tuple[str, int, int | None]]] = {
    "x86_64": {2: ("open", 0, 1), 257: ("open", 1, 2), 83: ("mkdir", 0, None), 258: ("mkdir", 1, None)},
    "aarch64": {56: ("open", 1, 2), 34: ("mkdir", 1, None)},
}
TABLE = SYSCALLS.get(platform.machine(), {})
EXCLUSIVE = os.O_CREAT | os.O_EXCL
PATH_MAX = 4096


def creating(pid: int, name: bytes) -> str | None:
    """ "open" when process (thread) `pid` is blocked in an exclusive create of a path
    whose last component is `name`, "mkdir" when in a mkdir of one; else None."""
    if pid <= 0 or not TABLE:
        return None
    try:
        with open(f"/proc/{pid}/syscall", "rb") as f:
            fields = f.read().split()
        number, args = int(fields[0]), [int(x, 16) for x in fields[1:7]]
    except (OSError, ValueError, IndexError):
        return None  # gone, not in a system call ("running", -1), or not ours to read
    spec = TABLE.get(number)
    if spec is None:
        return None
    what, path_arg, flags_arg = spec
    if flags_arg is not None and args[flags_arg] & EXCLUSIVE != EXCLUSIVE:
        return None
    path = read_string(pid, args[path_arg])
    return what if path is not None and last_component(path) == name else None


def read_string(pid: int, address: int) -> bytes | None:
    """The NUL-terminated string at `address` in the process's memory (at most PATH_MAX bytes)."""
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    except OSError:
        return None
    try:
        data = b""
        while len(data) < PATH_MAX:
            chunk = os.pread(fd, 256, address + len(data))  # small reads: a string may end just before an unmapped page
            if not chunk:
                return None
            end = chunk.find(b"\0")
            if end >= 0:
                return data + chunk[:end]
            data += chunk
        return None
    except OSError:
        return None
    finally:
        os.close(fd)


def last_component(path: bytes) -> bytes:
    return path.rstrip(b"/").rsplit(b"/", 1)[-1]
