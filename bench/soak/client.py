"""One agent of the soak: a thread that prompts in a loop (`prompt`, then `output` read to
its end, then `status`) and writes its `memory/` between jobs, recording the outcome of
every job and every acknowledged write.

A job ends `done` (EOF, status `done`) or `eio` (EIO, status `error`, the agent's `error`
file naming the engine); anything else is a failure with its reason. The thread blocks in
plain system calls, as a user's program would; it is the main loop that watches it (a
`Watch` says since when it has waited without progress), so a read that never returns
is seen as stuck while the soak goes on. Each client's lists are written by its thread
only; the main loop reads them after the thread ends, or as snapshots for progress.
"""

from __future__ import annotations

import errno
import json
import os
import random
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .ledger import Ledger

TOPICS = ("lighthouses", "bees", "glaciers", "trains", "tea", "volcanoes", "owls", "bridges", "rivers", "clocks", "moss", "kites")


@dataclass
class JobRecord:
    agent: str
    index: int
    outcome: str  # "done", "eio" or "failed"
    reason: str  # for eio, the error line; for failed, what went wrong
    seconds: float
    longest_wait: float  # the longest time without progress (a byte, an end, a call returning)
    nbytes: int


@dataclass
class StuckWait:
    agent: str
    what: str  # the operation: "job 12: read output", "memory"
    waited: float  # seconds without progress (until it went on, or so far)
    ended: bool  # did it go on at last?


class Watch:
    """Since when the operation under way has waited without progress; its longest wait.
    Written by the client's thread, read by the main loop (float and str stores are atomic)."""

    def __init__(self) -> None:
        self.what = ""
        self.since: float | None = None
        self.longest = 0.0  # of the operation under way
        self.flagged = False  # the main loop has recorded it as stuck

    def begin(self, what: str) -> None:
        self.what, self.longest, self.flagged = what, 0.0, False
        self.since = time.monotonic()

    def tick(self) -> None:
        now = time.monotonic()
        if self.since is not None:
            self.longest = max(self.longest, now - self.since)
        self.since = now

    def end(self) -> float:
        self.tick()
        self.since = None
        return self.longest

    def pending(self) -> float:
        """Seconds since the last progress of the operation under way (0 when idle)."""
        since = self.since
        return time.monotonic() - since if since is not None else 0.0


class Client:
    def __init__(self, agent_dir: Path, seed: str, *, model: bool, max_tokens: int, memory_ops: int, reset_every: int, limit: float) -> None:
        self.dir, self.name = agent_dir, agent_dir.name
        self.rng = random.Random(f"{seed}-{self.name}")
        self.model, self.max_tokens, self.memory_ops, self.reset_every = model, max_tokens, memory_ops, reset_every
        self.limit = limit  # a wait longer than this without progress is stuck (deadline + 5 s)
        self.ledger = Ledger(agent_dir / "memory", self.name, random.Random(f"{seed}-{self.name}-memory"))
        self.watch = Watch()
        self.jobs: list[JobRecord] = []
        self.stuck: list[StuckWait] = []
        self.failures: list[str] = []  # besides jobs and memory: a reset refused, the thread's own crash
        self.stop = threading.Event()
        self._lock = threading.Lock()  # `stuck` and `watch.flagged`: the main loop and the thread both write them
        self.thread = threading.Thread(target=self._run, name=f"soak-{self.name}", daemon=True)

    def start(self) -> None:
        self.ledger.prepare()
        self.thread.start()

    def check(self) -> None:
        """The main loop's look (about once a second): a wait past the limit is stuck."""
        with self._lock:
            waited = self.watch.pending()
            if waited > self.limit and not self.watch.flagged:
                self.watch.flagged = True
                self.stuck.append(StuckWait(self.name, self.watch.what, waited, False))

    def current_wait(self) -> float:
        return self.watch.pending()

    # -- the client's thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            index = 0
            while not self.stop.is_set():
                index += 1
                self._job(index)
                for _ in range(self.memory_ops):
                    self._timed("memory", lambda: self.ledger.step(self.watch.tick))
                if self.reset_every and index % self.reset_every == 0:
                    self._timed("reset", self._reset)
        except Exception:  # a bug of the soak or an unexpected error: reported, never silent
            self.failures.append(f"{self.name}: the client thread died: {traceback.format_exc(limit=3)}")

    def _timed(self, what: str, action: Callable[[], None]) -> None:
        self.watch.begin(what)
        try:
            action()
        finally:
            self._ended(self.watch.end())

    def _ended(self, longest: float) -> None:
        with self._lock:
            self._record_end(longest)

    def _record_end(self, longest: float) -> None:
        if longest > self.limit:
            if self.watch.flagged:
                self.stuck[-1].waited, self.stuck[-1].ended = longest, True
            else:
                self.stuck.append(StuckWait(self.name, self.watch.what, longest, True))

    def _reset(self) -> None:
        """Empty the conversation now and then, so prompts stay short (`echo reset > ctl`)."""
        try:
            _put(self.dir / "ctl", b"reset\n", os.O_WRONLY)
        except OSError as exc:
            self.failures.append(f"{self.name}: echo reset > ctl: {_errname(exc)}")

    def _request(self, index: int) -> bytes:
        topic = self.rng.choice(TOPICS)
        text = f"In one sentence, tell me something about {topic}." if self.model else f"soak {self.name} job {index} {topic}"
        return json.dumps({"prompt": text, "max_tokens": self.max_tokens, "temperature": 0.7}).encode()

    def _job(self, index: int) -> None:
        watch = self.watch
        watch.begin(f"job {index}: write prompt")
        started = time.monotonic()
        nbytes = 0
        outcome, reason = "failed", ""
        try:
            _put(self.dir / "prompt", self._request(index), os.O_WRONLY | os.O_TRUNC, watch.tick)
        except OSError as exc:
            outcome, reason = self._judge(exc, "write prompt")
        else:
            watch.what = f"job {index}: read output"
            error: OSError | None = None
            try:
                fd = os.open(self.dir / "output", os.O_RDONLY)
                watch.tick()
                try:
                    while chunk := os.read(fd, 65536):
                        nbytes += len(chunk)
                        watch.tick()
                finally:
                    os.close(fd)
            except OSError as exc:
                error = exc
            watch.tick()
            outcome, reason = self._judge(error, "read output")
        longest = watch.end()
        self._ended(longest)
        self.jobs.append(JobRecord(self.name, index, outcome, reason, time.monotonic() - started, longest, nbytes))

    def _judge(self, error: OSError | None, step: str) -> tuple[str, str]:
        """done, eio or failed, and why, from how the step ended, `status` and `error`."""
        try:
            status = (self.dir / "status").read_text().strip()
            last_error = ((self.dir / "error").read_text().strip().splitlines() or [""])[-1]
        except OSError as exc:
            return "failed", f"{step}: {_errname(error) if error else 'ok'}, then reading status/error: {_errname(exc)}"
        if error is None:
            return ("done", "") if status.startswith("done") else ("failed", f"{step} ended, status {status!r}")
        if error.errno == errno.EIO and "engine" in last_error and last_error.startswith("EIO"):
            if step == "write prompt" or status.startswith("error"):
                return "eio", last_error
        return "failed", f"{step}: {_errname(error)}; status {status!r}; error {last_error!r}"


def _put(path: Path, data: bytes, flags: int, tick: Callable[[], None] | None = None) -> None:
    fd = os.open(path, flags)
    try:
        os.write(fd, data)
        if tick is not None:
            tick()
    finally:
        os.close(fd)


def _errname(exc: OSError) -> str:
    return f"{errno.errorcode.get(exc.errno or 0, exc.errno)} {exc.strerror}"
