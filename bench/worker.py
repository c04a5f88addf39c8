"""In-process peers run in a fresh worker process each.

llama-cpp-python's wheel uses OpenMP: every thread that calls llama_decode gets its own team of
worker threads, and a second model context in the same process (the calibration, the other
in-process peer) measurably slows the one under test. So each in-process peer gets a clean
process: `python -m bench --worker` reads the run on stdin and answers with its records.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import child_env
from .load import Cell
from .peers import RUNNERS
from .servers import stop_process
from .stats import Record
from .workloads import Plan, Workload


class PipeProgress:
    """The worker's progress: a line `+` per finished request, on stdout to the parent."""

    def add(self, n: int = 1) -> None:
        sys.stdout.write("+\n" * n)
        sys.stdout.flush()


def job_of(peer: str, cell: Cell) -> dict[str, Any]:
    """What the worker needs to rebuild the cell (`worker_main`)."""
    return {
        "peer": peer,
        "plan": asdict(cell.plan),
        "model": str(cell.model),
        "threads": cell.threads,
        "deadline": cell.deadline,
        "timeout": cell.timeout,
        "log_dir": str(cell.log_dir),
        "tag": cell.tag,
        "eog": cell.eog,
        "scheduler": cell.scheduler,
        "slots": cell.slots,
        "fake": cell.fake,
    }


def read_worker(proc: subprocess.Popen[str], cell: Cell, result: dict[str, Any]) -> None:
    """The worker's stdout: a `+` per finished request (to the progress), then `RESULT {json}` (into `result`)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("+"):
            cell.progress.add()
        elif line.startswith("RESULT "):
            result.update(json.loads(line[7:]))


def run_in_worker(peer: str, cell: Cell) -> tuple[list[Record], float]:
    """Run an in-process peer in a fresh `python -m bench --worker` (its stderr to the peer's log)."""
    log = cell.log_file(peer)
    with open(log, "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench", "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            start_new_session=True,
            env=child_env(),
        )
    result: dict[str, Any] = {}
    try:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(job_of(peer, cell)) + "\n")
        proc.stdin.close()
        reader = threading.Thread(target=read_worker, args=(proc, cell, result), daemon=True)
        reader.start()
        reader.join(max(10.0, cell.deadline + cell.timeout * 0.5 + 120 - time.time()))
        proc.wait(30)
    finally:
        stop_process(proc)
    if "error" in result:
        raise RuntimeError(result["error"])
    if "records" not in result:
        raise RuntimeError(f"the worker process gave no result (exit {proc.returncode}); see {log}")
    cell.extra.update(result.get("extra", {}))
    return [Record(**r) for r in result["records"]], float(result["started"])


def worker_main() -> int:
    """`--worker`: run one in-process peer for the parent bench process."""
    job = json.loads(sys.stdin.readline())
    p = job["plan"]
    plan = Plan(Workload(**p["workload"]), p["n_agents"], p["requests"], p["system"], p["messages"], p["warmup"], p["ctx"], p["warm_system"])
    cell = Cell(
        plan,
        Path(job["model"]),
        job["threads"],
        job["deadline"],
        job["timeout"],
        Path(job["log_dir"]),
        job["tag"],
        PipeProgress(),
        job["eog"],
        scheduler=job["scheduler"],
        slots=job["slots"],
        fake=job.get("fake", False),
    )
    try:
        records, started = RUNNERS[job["peer"]](cell)
        out = {"records": [asdict(r) for r in records], "started": started, "extra": cell.extra}
    except Exception as exc:
        out = {"error": f"{type(exc).__name__}: {exc}", "extra": cell.extra}
    sys.stdout.write("RESULT " + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0
