"""What the bench says on the terminal while it runs."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any


class Progress:
    """One line per run; while a run goes on, a live count of finished requests on a terminal."""

    def __init__(self, total_runs: int) -> None:
        self.total_runs = total_runs
        self.done_runs = 0
        self.tty = sys.stderr.isatty()
        self.requests_done = 0
        self.requests_total = 0
        self.label = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.bench_started = time.monotonic()

    def add(self, n: int = 1) -> None:
        self.requests_done += n

    @contextlib.contextmanager
    def run(self, label: str, total_requests: int) -> Iterator[None]:
        self.done_runs += 1
        self.label = f"[{self.done_runs:>3}/{self.total_runs}] {label}"
        self.requests_done, self.requests_total = 0, total_requests
        self.started = time.monotonic()
        if self.tty:
            self._stop.clear()
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()
        else:
            err(f"{self.label} ...")
        try:
            yield
        finally:
            if self._thread is not None:
                self._stop.set()
                self._thread.join()
                self._thread = None
                sys.stderr.write("\r\033[K")

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            elapsed = time.monotonic() - self.started
            sys.stderr.write(f"\r\033[K{self.label}  {self.requests_done}/{self.requests_total} requests  {elapsed:5.1f} s")
            sys.stderr.flush()

    def finish(self, summary: dict[str, Any] | None, note: str = "", calib: float | None = None) -> None:
        elapsed = time.monotonic() - self.started
        total = time.monotonic() - self.bench_started
        tail = f"(calibration {fmt(calib, 0)} tok/s; {elapsed:.1f} s, total {total:.0f} s)"
        if summary is None:
            err(f"{self.label}  FAILED: {note}  {tail}")
            return
        errors = f"  {summary['n_errors']} errors" if summary["n_errors"] else ""
        if "high_lat_p50" in summary:
            err(
                f"{self.label}  high-priority p50 {fmt(summary['high_lat_p50'])} s ({summary['high_requests']} requests)  "
                f"busy {fmt(summary['busy_tok_s'], 1)} tok/s ({summary['busy_requests']} requests){errors}  {tail}"
            )
            return
        err(
            f"{self.label}  {fmt(summary['tok_s'], 1)} tok/s  p50 {fmt(summary['lat_p50'])} s  p99 {fmt(summary['lat_p99'])} s  "
            f"jain {fmt(summary['jain'], 3)}{errors}  {tail}"
        )


def err(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"
