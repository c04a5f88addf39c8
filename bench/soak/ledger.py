"""One agent's `memory/` writes and what they promise: the soak's record of every write
the mount acknowledged (`write()`s, `fsync()` and `close()` all returned OK; a rename or
an unlink that returned), so that the end can check that none was lost.

A write that failed promises nothing about its file, which then goes unchecked (and the
failure is reported): it may hold the old content or the new one.
"""

from __future__ import annotations

import errno
import os
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

MAX_FILES = 24  # per agent; past it a create becomes a rename over an existing file or an unlink
MAX_APPEND_SIZE = 256 * 1024  # past it an append becomes an overwrite
CHUNK = 128 * 1024  # the FUSE max_write: a larger file takes several write()s
SIZES = (24, 300, 3000, 40_000, 150_000)
SIZE_WEIGHTS = (3, 3, 2, 1, 0.3)
OPS = ("create", "append", "overwrite", "rename", "unlink")
OP_WEIGHTS = (3, 3, 2, 2, 0.5)


class Ledger:
    def __init__(self, memory: Path, agent: str, rng: random.Random) -> None:
        self.memory, self.agent, self.rng = memory, agent, rng
        self.expected: dict[str, bytes] = {}  # name (relative to memory/) -> acknowledged content
        self.absent: set[str] = set()  # names an acknowledged unlink or rename took away
        self.unsure: set[str] = set()  # names a failed operation touched: not checked
        self.acked: Counter[str] = Counter()  # acknowledged operations by kind
        self.failures: list[str] = []
        self._serial = 0

    @property
    def acknowledged(self) -> int:
        return sum(self.acked.values())

    def prepare(self) -> None:
        (self.memory / "d").mkdir(parents=True, exist_ok=True)

    def step(self, tick: Callable[[], None]) -> None:
        """One random operation; `tick()` after each system call that returned (progress)."""
        op = self.rng.choices(OPS, OP_WEIGHTS)[0]
        names = sorted(self.expected)
        if not names or (op == "create" and len(names) < MAX_FILES):
            op = "create"
        elif op == "create":
            op = "unlink"
        name = self.rng.choice(names) if names else ""
        if op == "create":
            self._write(self._new_name(), self._content(op), os.O_WRONLY | os.O_CREAT | os.O_EXCL, tick, op)
        elif op == "append":
            if len(self.expected[name]) > MAX_APPEND_SIZE:
                op = "overwrite"
            self._write(name, self._content(op), os.O_WRONLY | (os.O_APPEND if op == "append" else os.O_TRUNC), tick, op)
        elif op == "overwrite":
            self._write(name, self._content(op), os.O_WRONLY | os.O_TRUNC, tick, op)
        elif op == "rename":
            others = [n for n in names if n != name]
            target = self.rng.choice(others) if others and self.rng.random() < 0.5 else self._new_name()
            self._rename(name, target, tick)
        else:
            self._unlink(name, tick)

    def verify(self) -> list[str]:
        """Every acknowledged write that is not there as acknowledged: a line for each."""
        base = self.memory
        lost = []
        for name, content in sorted(self.expected.items()):
            where = f"{self.agent}/memory/{name}"
            try:
                found = (base / name).read_bytes()
            except OSError as exc:
                lost.append(f"{where}: {errno.errorcode.get(exc.errno or 0, exc.errno)} ({len(content)} bytes acknowledged)")
                continue
            if found != content:
                lost.append(f"{where}: {len(found)} bytes, not the {len(content)} acknowledged ({_first_difference(found, content)})")
        for name in sorted(self.absent):
            try:
                os.lstat(base / name)
            except FileNotFoundError:
                continue
            except OSError as exc:
                lost.append(f"{self.agent}/memory/{name}: {errno.errorcode.get(exc.errno or 0, exc.errno)} (it should be gone)")
                continue
            lost.append(f"{self.agent}/memory/{name}: there, though an acknowledged unlink or rename took it away")
        return lost

    # -- the operations ----------------------------------------------------------------------
    def _write(self, name: str, data: bytes, flags: int, tick: Callable[[], None], op: str) -> None:
        try:
            fd = os.open(self.memory / name, flags, 0o644)
            tick()
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view[:CHUNK]) :]
                    tick()
                os.fsync(fd)
                tick()
            except OSError:
                os.close(fd)
                raise
            os.close(fd)
            tick()
        except OSError as exc:
            self._failed(op, [name], exc)
            return
        self.expected[name] = self.expected.get(name, b"") + data if op == "append" else data
        self.absent.discard(name)
        self.acked[op] += 1

    def _rename(self, source: str, target: str, tick: Callable[[], None]) -> None:
        try:
            os.rename(self.memory / source, self.memory / target)
            tick()
        except OSError as exc:
            self._failed("rename", [source, target], exc)
            return
        self.expected[target] = self.expected.pop(source)
        self.absent.discard(target)
        self.absent.add(source)
        self.acked["rename"] += 1

    def _unlink(self, name: str, tick: Callable[[], None]) -> None:
        try:
            os.unlink(self.memory / name)
            tick()
        except OSError as exc:
            self._failed("unlink", [name], exc)
            return
        del self.expected[name]
        self.absent.add(name)
        self.acked["unlink"] += 1

    def _failed(self, op: str, names: list[str], exc: OSError) -> None:
        self.failures.append(f"{self.agent}: memory {op} {' -> '.join(names)}: {errno.errorcode.get(exc.errno or 0, exc.errno)} {exc.strerror}")
        for name in names:
            self.expected.pop(name, None)
            self.absent.discard(name)
            self.unsure.add(name)

    def _new_name(self) -> str:
        self._serial += 1
        return f"{'d/' if self.rng.random() < 0.3 else ''}f{self._serial}.txt"

    def _content(self, op: str) -> bytes:
        """Text of a random size: a header, then lines of 64 hex digits (recall indexes it)."""
        size = self.rng.choice(SIZES[:3]) if op == "append" else self.rng.choices(SIZES, SIZE_WEIGHTS)[0]
        digits = self.rng.randbytes(size // 2 + 1).hex()[:size]
        body = "\n".join(digits[i : i + 64] for i in range(0, len(digits), 64))
        return f"{self.agent} {op} {self._serial}\n{body}\n".encode()


def _first_difference(a: bytes, b: bytes) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"first difference at byte {i}"
    return f"one is a prefix of the other ({min(len(a), len(b))} bytes alike)"
