"""Framing of the engine's two socket channels: length-prefixed pickles.

Both ends are this project's code (kernel/cores/enginehost.py, the daemon's side, and
kernel/cores/enginechild.py, the engine's). The daemon's end never waits without a
bound: see `Channel`.
"""

from __future__ import annotations

import pickle
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import Any


class Channel:
    """Length-prefixed pickles over a stream socket. Both ends are this project's code.

    The daemon's end never waits without a bound: `send` and `recv` take a deadline
    (`until`, in `time.monotonic()` seconds) and raise TimeoutError past it, and `recv`
    calls `check` every `WAKE_SECONDS` while it waits, which may end the wait by raising.
    A timed-out channel is never used again: the engine behind it is killed."""

    WAKE_SECONDS = 0.25

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()  # bytes received past the message being read

    def send(self, message: Any, until: float | None = None) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.sock.settimeout(None if until is None else max(until - time.monotonic(), 1e-3))
        self.sock.sendall(struct.pack("<Q", len(data)) + data)

    def recv(self, until: float | None = None, check: Callable[[], None] | None = None) -> Any:
        (size,) = struct.unpack("<Q", self._exactly(8, until, check))
        return pickle.loads(self._exactly(size, until, check))

    def _exactly(self, n: int, until: float | None, check: Callable[[], None] | None) -> bytes:
        while len(self._buffer) < n:
            if until is None:
                self.sock.settimeout(None)
            else:
                left = until - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.sock.settimeout(min(left, self.WAKE_SECONDS))
            try:
                chunk = self.sock.recv(max(n - len(self._buffer), 1 << 16))
            except TimeoutError:
                if check is not None:
                    check()
                continue
            if not chunk:
                raise EOFError("the other end closed the channel")
            self._buffer += chunk
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    def waiting(self) -> bool:
        """Whether a message (or its start) has arrived and not been read."""
        return bool(self._buffer) or bool(select.select([self.sock], [], [], 0)[0])

    def close(self) -> None:
        self.sock.close()
