"""Hibernation: the agents' cached KV sequences on disk, so that an unmount, a reboot
or an engine crash costs an agent's next turn a read of its cells instead of a
prefill of its whole conversation.

One file per agent (and scope) in the engine's directory (STATE/kv/ENGINE/), holding
its latest finished sequence: llama.cpp's sequence state (`state_get`), its tokens,
how many of them were computed in tiles (what may be shared), its agent and its
scope. The placement (kernel/cores/placement.py) hands states over; this module
keeps the files, an index of them in memory, and a thread that writes them, so
that the engine's decode loop never waits for the disk.

The file: a fixed prefix (`PREFIX`: magic, the header's length and CRC-32, the
payload's length and CRC-32), a JSON header (the key, scope, agent, tiled, tokens),
then the payload. A file is written to a temporary name in the same directory and
renamed over the agent's file: a reader sees the old file or the new one, never a
part. It is not fsynced: the files are a cache, and one that a power loss leaves torn
or empty fails its checks and is discarded like any corrupt file. At start the index is rebuilt from the
headers alone; a file of another key (kernel/cores/kvkey.py), a truncated file or a
corrupt header is discarded with a log line, and a payload whose checksum fails is
discarded when it is read. A restore also checks that the file holds the very
tokens the index says.

The files take at most `budget` bytes; past it the least recently used go (a
restore counts as a use; the file's mtime keeps the order across starts).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .. import params
from .prefixes import GRAIN, PrefixIndex

log = logging.getLogger(__name__)

MAGIC = b"AIOSKV\x00\x01"
PREFIX = struct.Struct("<8sIIQI4x")  # magic, header length, header CRC-32, payload length, payload CRC-32
SUFFIX = ".kv"
MAX_HEADER = 16 * 1024 * 1024  # a header longer than this is corrupt: tokens of any real window fit many times


class Corrupt(Exception):
    """A file that cannot be used, and why."""


@dataclass(eq=False)
class Entry:
    """One file: an agent's sequence, its scope, its tokens and how many of them were
    computed in tiles (what may be shared with other agents)."""

    name: str
    scope: str
    agent: str
    tokens: list[int]
    tiled: int
    size: int = 0  # bytes of the file
    used: float = 0.0  # when it was last written or restored (time.time())


def file_name(scope: str, agent: str) -> str:
    return hashlib.sha256(f"{scope}\0{agent}".encode()).hexdigest()[:32] + SUFFIX


class KvStore:
    """The files of one engine. `find`, `of_scope`, `longest`, `holds`, `put` and `load` are the
    engine thread's; the writer thread writes and evicts; `_cond` guards the index,
    the queue and the counters."""

    def __init__(self, directory: Path, key: str, budget: int) -> None:
        self.directory = directory
        self.key = key
        self.budget = budget
        self._cond = threading.Condition()
        self._entries: dict[str, Entry] = {}  # by file name, least recently used first
        self._by_prefix: PrefixIndex[Entry] | None = None  # the entries by prefix, once `longest` is asked
        self._pending: dict[str, tuple[Entry, Any]] = {}  # states to write, oldest first; a newer one replaces its agent's
        self._pending_bytes = 0
        self._writing = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._bytes = 0  # the entries' total size
        self.counters = {"kv_hibernated": 0, "kv_disk_discarded": 0}

    # -- start and stop ---------------------------------------------------------------------
    def open(self) -> None:
        """Index the files from their headers, drop what a dead writer left, and start the writer."""
        self.directory.mkdir(parents=True, exist_ok=True)
        other_key = 0
        found: list[Entry] = []
        for path in sorted(self.directory.iterdir()):
            if path.name.endswith(".tmp"):  # a writer that died before its rename
                self._unlink([path])
            elif path.suffix == SUFFIX:
                try:
                    entry = self._index(path)
                except OSError as exc:
                    log.warning("cannot read the KV file %s: %s", path, exc)
                    continue
                except Corrupt as exc:
                    if str(exc) == "another key":
                        other_key += 1
                        self._discard(path, None)
                    else:
                        self._discard(path, str(exc))
                    continue
                found.append(entry)
        for entry in sorted(found, key=lambda e: e.used):
            self._set(entry)
        if other_key:
            log.warning("discarded %d KV files of %s: made by another model, llama.cpp build or context size", other_key, self.directory)
        self._unlink(self._over_budget(None))
        self._thread = threading.Thread(target=self._run, name="kv-writer", daemon=True)
        self._thread.start()

    def flush(self, seconds: float) -> bool:
        """Wait until every queued state is on disk, `seconds` at most; whether it is."""
        until = time.monotonic() + seconds
        with self._cond:
            while self._pending or self._writing:
                left = until - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, seconds: float) -> None:
        """Write what is queued (within `seconds`), then stop the writer. A write still
        running then is left to end with the process: its temporary file is removed at
        the next start."""
        if not self.flush(seconds):
            log.warning("KV files still being written after %.0f s at close: left unwritten", seconds)
        with self._cond:
            self._stopping = True
            self._pending.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=0.5)

    # -- the engine thread ----------------------------------------------------------------------
    def find(self, scope: str, agent: str) -> Entry | None:
        with self._cond:
            entry = self._entries.get(file_name(scope, agent))
            return entry if entry is not None and entry.scope == scope and entry.agent == agent else None

    def of_scope(self, scope: str) -> list[Entry]:
        with self._cond:
            return [entry for entry in self._entries.values() if entry.scope == scope]

    def longest(self, scope: str, prompt: list[int], most: int, tile: int, accept: Callable[[Entry], bool]) -> tuple[int, Entry | None]:
        """The file of `scope` that `accept`s whose tokens share the most whole tiles with
        `prompt` (at most `most` tokens), and how many: `PrefixIndex.longest`."""
        with self._cond:
            if self._by_prefix is None or self._by_prefix.step != (tile or GRAIN):
                self._by_prefix = PrefixIndex(tile)
                for entry in self._entries.values():
                    self._by_prefix.add(entry, entry.scope, entry.tokens, entry.tiled)
            return self._by_prefix.longest(scope, prompt, most, accept)

    def holds(self, scope: str, agent: str, tokens: list[int]) -> bool:
        """Is this agent's file (or the state queued for it) exactly these tokens?"""
        name = file_name(scope, agent)
        with self._cond:
            queued = self._pending.get(name)
            if queued is not None:
                return queued[0].tokens == tokens
            entry = self._entries.get(name)
            return entry is not None and entry.tokens == tokens

    def put(self, scope: str, agent: str, tokens: list[int], tiled: int, state: Sized) -> bool:
        """Queue an agent's state for the writer (replacing one of the agent's not written
        yet); False when the queue is full (the caller tries again later)."""
        if len(state) + PREFIX.size > self.budget:
            return True  # it would never fit: as good as written
        name = file_name(scope, agent)
        with self._cond:
            old = self._pending.pop(name, None)
            if old is not None:
                self._pending_bytes -= len(old[1])
            if self._pending_bytes + len(state) > params.KV_WRITE_QUEUE_BYTES:
                return False
            self._pending[name] = (Entry(name, scope, agent, list(tokens), tiled), state)
            self._pending_bytes += len(state)
            self._cond.notify_all()
        return True

    def load(self, entry: Entry) -> bytearray | None:
        """The entry's state, read and checked; None when the file is gone, changed or
        corrupt (a corrupt one is discarded with a log line)."""
        path = self.directory / entry.name
        try:
            with open(path, "rb") as f:
                header, length, crc = self._header(f, path)
                if header["tokens"] != entry.tokens or header["scope"] != entry.scope or header["agent"] != entry.agent:
                    self._forget(entry)  # replaced under the index: never restore what the index did not promise
                    return None
                payload = bytearray(length)
                if f.readinto(payload) != length:
                    raise Corrupt("truncated payload")
            if zlib.crc32(payload) != crc:
                raise Corrupt("payload checksum mismatch")
        except FileNotFoundError:
            self._forget(entry)
            return None
        except OSError as exc:
            log.warning("cannot read the KV file %s: %s", path, exc)
            return None
        except Corrupt as exc:
            self._discard(path, str(exc))
            return None
        with self._cond:
            entry.used = time.time()
            if self._entries.get(entry.name) is entry:
                self._entries[entry.name] = self._entries.pop(entry.name)  # the most recently used, last
        try:
            os.utime(path)  # the LRU order survives a restart
        except OSError:
            pass
        return payload

    def statistics(self) -> dict[str, int]:
        """Read at every engine step: the total is summed again only after a change."""
        with self._cond:
            return {**self.counters, "kv_disk_bytes": self._bytes}

    # -- files ---------------------------------------------------------------------------------
    def _header(self, f: BinaryIO, path: Path) -> tuple[dict[str, Any], int, int]:
        """A file's header, checked: (header, payload length, payload CRC-32)."""
        prefix = f.read(PREFIX.size)
        if len(prefix) < PREFIX.size:
            raise Corrupt("truncated prefix")
        magic, header_length, header_crc, length, crc = PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise Corrupt("not a KV file of this format")
        if header_length > MAX_HEADER or os.fstat(f.fileno()).st_size != PREFIX.size + header_length + length:
            raise Corrupt("truncated, or lengths that do not add up")
        raw = f.read(header_length)
        if zlib.crc32(raw) != header_crc:
            raise Corrupt("header checksum mismatch")
        try:
            header = json.loads(raw)
            fields = (header["key"], header["scope"], header["agent"], header["tiled"], header["tokens"])
        except (ValueError, KeyError, TypeError) as exc:
            raise Corrupt(f"unreadable header: {exc}") from None
        if fields[0] != self.key:
            raise Corrupt("another key")
        if path.name != file_name(header["scope"], header["agent"]):
            raise Corrupt("a header of another agent")
        return header, length, crc

    def _index(self, path: Path) -> Entry:
        with open(path, "rb") as f:
            header, _, _ = self._header(f, path)
            stat = os.fstat(f.fileno())
        return Entry(path.name, header["scope"], header["agent"], header["tokens"], header["tiled"], stat.st_size, stat.st_mtime)

    def _discard(self, path: Path, reason: str | None) -> None:
        if reason is not None:
            log.warning("discarding the KV file %s: %s", path, reason)
        self._unlink([path])
        with self._cond:
            self._drop(path.name)
            self.counters["kv_disk_discarded"] += 1

    def _forget(self, entry: Entry) -> None:
        with self._cond:
            if self._entries.get(entry.name) is entry:
                self._drop(entry.name)

    def _over_budget(self, keep: str | None) -> list[Path]:
        """Take the least recently used entries out of the index until the rest fit the
        budget; their paths, to unlink. Caller holds _cond or is the only thread."""
        victims: list[Path] = []
        for entry in list(self._entries.values()):
            if self._bytes <= self.budget:
                break
            if entry.name != keep:
                self._drop(entry.name)
                victims.append(self.directory / entry.name)
        return victims

    def _set(self, entry: Entry) -> None:
        """Index `entry` as the most recently used (caller holds _cond or is the only thread)."""
        self._drop(entry.name)
        self._entries[entry.name] = entry
        self._bytes += entry.size
        if self._by_prefix is not None:
            self._by_prefix.add(entry, entry.scope, entry.tokens, entry.tiled)

    def _drop(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is not None:
            self._bytes -= entry.size
            if self._by_prefix is not None:
                self._by_prefix.remove(entry)

    @staticmethod
    def _unlink(paths: list[Path]) -> None:
        for path in paths:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:  # out of the index all the same: it is never read again
                log.warning("cannot remove the KV file %s: %s", path, exc)

    # -- the writer thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                name = next(iter(self._pending))
                entry, state = self._pending.pop(name)
                self._pending_bytes -= len(state)
                self._writing = True
            try:
                self._write(entry, state)
            except Exception:  # a bug here costs hibernation, never the engine
                log.exception("writing the KV file of agent %r failed", entry.agent)
            finally:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()

    def _write(self, entry: Entry, state: Any) -> None:
        """Write atomically: a temporary file, then a rename. No fsync: this is a cache,
        and a file that a power loss leaves torn or empty fails its CRCs when read and
        is discarded (`read`), so a sync would buy nothing but a disk wait per file."""
        header = json.dumps({"key": self.key, "scope": entry.scope, "agent": entry.agent, "tiled": entry.tiled, "tokens": entry.tokens}).encode()
        prefix = PREFIX.pack(MAGIC, len(header), zlib.crc32(header), len(state), zlib.crc32(state))
        path = self.directory / entry.name
        temporary = self.directory / f"{entry.name}.{os.getpid()}.tmp"
        try:
            with open(temporary, "wb") as f:
                f.write(prefix)
                f.write(header)
                f.write(state)
            os.replace(temporary, path)
        except OSError as exc:  # a full disk, a read-only one: this sequence stays in RAM only
            log.warning("cannot write the KV file %s: %s", path, exc)
            temporary.unlink(missing_ok=True)
            return
        with self._cond:
            entry.size, entry.used = len(prefix) + len(header) + len(state), time.time()
            self._set(entry)
            self.counters["kv_hibernated"] += 1
            victims = self._over_budget(entry.name)
        self._unlink(victims)
