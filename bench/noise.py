"""Noise: what else runs on the machine while a run measures."""

from __future__ import annotations

import os
import time

from .console import err

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
OURS_MARK = "aiosfs-bench-"  # in the paths of every mount daemon this script starts


def _proc_stat() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, steal seconds) from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq = values[:7]
    steal = values[7] if len(values) > 7 else 0
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


def _our_cpu() -> float:
    """CPU seconds used so far by this process, its descendants and the mount daemons it started."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    marked: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2 :].split()
            pid = int(entry)
            parents[pid] = int(fields[1])
            cpu[pid] = (int(fields[11]) + int(fields[12])) / CLK_TCK
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if OURS_MARK.encode() in f.read():
                    marked.add(pid)
        except (OSError, ValueError, IndexError):
            continue
    me = os.getpid()
    total = 0.0
    for pid, seconds in cpu.items():
        p, depth = pid, 0
        while p > 1 and depth < 64:
            if p == me or p in marked:
                total += seconds
                break
            p, depth = parents.get(p, 0), depth + 1
    return total


def cpu_snapshot() -> tuple[float, float, float, float]:
    """(monotonic time, machine busy s, steal s, our s)."""
    try:
        busy, steal = _proc_stat()
        return time.monotonic(), busy, steal, _our_cpu()
    except OSError:
        return time.monotonic(), 0.0, 0.0, 0.0


def wait_quiet(limit: float, threshold: float = 0.10) -> float:
    """Wait (up to `limit` s) for one second in which the machine is almost idle
    (nothing of ours runs between runs); return the busy share last seen."""
    deadline = time.monotonic() + limit
    said = False
    while True:
        t0, busy0, _, _ = cpu_snapshot()
        time.sleep(1.0)
        t1, busy1, _, _ = cpu_snapshot()
        share = (busy1 - busy0) / max(1e-6, (t1 - t0) * (os.cpu_count() or 1))
        if share < threshold or time.monotonic() > deadline:
            if said:
                err(f"  machine {'quiet' if share < threshold else 'still busy'} ({share:.0%} busy)")
            return round(share, 3)
        if not said:
            err(f"  other processes use {share:.0%} of the CPUs: waiting up to {limit:.0f} s for a quiet moment")
            said = True
