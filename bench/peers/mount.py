"""The aiosfs-mount peer: aiosfs mounted, N processes doing `echo > prompt; cat output`
(`bench.mount_client`)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

from .. import ROOT, child_env
from ..load import Cell, warm_threads
from ..servers import stop_process
from ..stats import Record, counter_delta, kernel_counters
from .inproc import agent_config, envelope


def aiosfs_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aiosfs.cli", *args], capture_output=True, text=True, timeout=timeout, env=child_env(), cwd=ROOT)


def read_stats(path: Path) -> dict[str, float]:
    stats: dict[str, float] = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            stats[key] = float(value)
    return kernel_counters(stats)


def mount_request(agent_dir: Path, data: bytes) -> None:
    fd = os.open(agent_dir / "prompt", os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    fd = os.open(agent_dir / "output", os.O_RDONLY)
    try:
        while os.read(fd, 65536):
            pass
    finally:
        os.close(fd)


def set_mount_scheduler(mountpoint: Path, spec: str | None) -> str:
    """Write the policy to `kernel/scheduler` (root only) and return what the kernel reports."""
    path = mountpoint / "kernel" / "scheduler"
    if spec:
        try:
            path.write_text(spec + "\n")
        except PermissionError:
            raise RuntimeError(f"setting the scheduler {spec!r} through the mount needs uid 0 (kernel/scheduler is root's)") from None
    return path.read_text().strip()


def mount_reset(agent_dir: Path) -> None:
    fd = os.open(agent_dir / "ctl", os.O_WRONLY)
    try:
        os.write(fd, b"reset\n")
    finally:
        os.close(fd)


def start_mount(cell: Cell, mountpoint: Path, state: Path) -> None:
    """`aiosfs mount` with the run's model, threads, slots and context (--fake: the fake backend)."""
    args = ["--state", str(state), "--model", str(cell.model), "--threads", str(cell.threads)]
    if cell.n_slots is not None:  # None (--slots default): the mount's own
        args += ["--slots", str(cell.n_slots)]
    args += ["--ctx", str(cell.plan.ctx)]
    if cell.fake:
        args += ["--backend", "fake"]
    cell.extra["argv"] = " ".join(["aiosfs", "mount", "MOUNTPOINT", *args])
    result = aiosfs_cli("mount", str(mountpoint), *args)
    if result.returncode != 0:
        raise RuntimeError(f"aiosfs mount failed: {result.stderr.strip()[-500:]}")
    slots = mounted_slots(result.stdout + result.stderr, state)
    if slots is None:
        raise RuntimeError(f"aiosfs mount did not say how many slots it runs: {(result.stdout + result.stderr).strip()[-300:]!r}")
    cell.extra.update(scheduler=set_mount_scheduler(mountpoint, cell.scheduler), slots=slots)


def mounted_slots(output: str, state: Path) -> int | None:
    """The KV slots the mounted kernel runs, from its `mounted ...: N slots x C tokens` line
    (the mount's output, else the daemon's log): neither kernel/status nor kernel/stats says."""
    texts = [output]
    with contextlib.suppress(OSError):
        texts.append((state / "aiosfs.log").read_text())
    for text in texts:
        found = re.findall(r"mounted .*?(\d+) slots x \d+ tokens", text)
        if found:
            return int(found[-1])
    return None


def make_agents(cell: Cell, mountpoint: Path) -> list[Path]:
    """The agents' directories, configured and warmed up (a request alone, then one per agent at once), reset."""
    plan = cell.plan
    dirs = []
    for a in range(plan.n_agents):
        d = mountpoint / "agents" / f"a{a}"
        d.mkdir()
        (d / "config").write_text(agent_config(plan, a, warm=True))
        dirs.append(d)
    mount_request(dirs[0], envelope(plan, plan.warmup[0], 16))
    warm_threads(plan.n_agents, lambda a: mount_request(dirs[a], envelope(plan, plan.warmup[a], 8)))
    for a, d in enumerate(dirs):
        mount_reset(d)
        (d / "config").write_text(agent_config(plan, a))
    return dirs


def start_clients(cell: Cell, base: Path, dirs: list[Path], stop_file: Path, children: list[subprocess.Popen[str]]) -> None:
    """One `bench.mount_client` process per agent (appended to `children`), each ready and waiting for go."""
    plan = cell.plan
    for a, d in enumerate(dirs):
        plan_file = base / f"plan-{a}.json"
        child_plan = {
            "requests": [envelope(plan, m).decode() for m in plan.messages[a]],
            "reset": not plan.workload.multi_turn,
            "deadline": cell.deadline,
            "delay": plan.start_delay(a),
            "stop": str(stop_file) if plan.busy(a) else "",
        }
        plan_file.write_text(json.dumps(child_plan))
        argv = [sys.executable, "-m", "bench.mount_client", str(d), str(plan_file)]
        pipe = subprocess.PIPE
        children.append(subprocess.Popen(argv, stdin=pipe, stdout=pipe, stderr=pipe, text=True, start_new_session=True, env=child_env()))
    for child in children:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("a client process did not start")


def drive_clients(cell: Cell, children: list[subprocess.Popen[str]], stop_file: Path) -> tuple[dict[int, str], float]:
    """Release the clients at once and collect what each printed; (outputs by agent, start time)."""
    outputs: dict[int, str] = {}

    def count_marks(stream: IO[str]) -> None:
        while stream.read(1):  # one mark per finished request
            cell.progress.add()

    def collect(i: int, child: subprocess.Popen[str]) -> None:
        assert child.stdout is not None and child.stderr is not None
        marks = threading.Thread(target=count_marks, args=(child.stderr,), daemon=True)
        marks.start()
        outputs[i] = child.stdout.read()
        if i == 0:
            stop_file.touch()  # the busy agents start no new request
        marks.join(5)

    readers = [threading.Thread(target=collect, args=(i, c), daemon=True) for i, c in enumerate(children)]
    for r in readers:
        r.start()
    cell.cpu_start()
    started = time.time()
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    for r in readers:
        r.join(max(1.0, cell.deadline + cell.timeout * 0.5 - time.time()))
    cell.cpu_end()
    for child in children:
        stop_process(child, grace=5)
    return outputs, started


def client_records(cell: Cell, outputs: dict[int, str], started: float) -> list[Record]:
    """The clients' records (every request runs to max_tokens: end-of-generation is suppressed)."""
    plan = cell.plan
    records: list[Record] = []
    for a in range(plan.n_agents):
        text = outputs.get(a, "").strip()
        if not text:
            records.append(Record(a, 0, started, time.time(), error="client process gave no result (timed out?)"))
            continue
        for rec in json.loads(text.splitlines()[-1]):
            tokens = plan.max_tokens if not rec["error"] else 0
            records.append(Record(a, rec["index"], rec["start"], rec["end"], rec["first"], tokens, None, rec["error"]))
    return records


def stop_mount(cell: Cell, mountpoint: Path, state: Path) -> None:
    """Unmount (lazily when that fails) and keep the daemon's log with the bench's logs."""
    if os.path.ismount(mountpoint):
        try:
            result = aiosfs_cli("unmount", str(mountpoint), timeout=60)
            ok = result.returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
        if not ok or os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False, capture_output=True)
    with contextlib.suppress(OSError):
        shutil.copy(state / "aiosfs.log", cell.log_file("aiosfs-mount"))


def run_aiosfs_mount(cell: Cell) -> tuple[list[Record], float]:
    if not os.path.exists("/dev/fuse"):
        raise RuntimeError("/dev/fuse is missing: this machine cannot mount FUSE filesystems")
    base = Path(tempfile.mkdtemp(prefix="aiosfs-bench-", dir="/tmp"))
    os.chmod(base, 0o755)
    mountpoint, state = base / "mnt", base / "state"
    mountpoint.mkdir()
    children: list[subprocess.Popen[str]] = []
    stop_file = base / "high-done"  # priority workload: made once agent 0's client has finished
    try:
        start_mount(cell, mountpoint, state)
        dirs = make_agents(cell, mountpoint)
        start_clients(cell, base, dirs, stop_file, children)
        before = read_stats(mountpoint / "kernel" / "stats")
        outputs, started = drive_clients(cell, children, stop_file)
        records = client_records(cell, outputs, started)
        wall = max((r.end for r in records), default=started) - started
        cell.extra["kernel"] = counter_delta(before, read_stats(mountpoint / "kernel" / "stats"), wall)
        return records, started
    finally:
        for child in children:
            stop_process(child, grace=5)
        stop_mount(cell, mountpoint, state)
        shutil.rmtree(base, ignore_errors=True)
