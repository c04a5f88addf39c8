"""`scripts/bench host-ceiling`: what the host costs per engine step, with a model that
costs nothing.

The fake backend decodes in no time (or in `--fake-delay` seconds, a simulated device
step), so what is left of a step is the host's work: the engine loop's planning, the
process boundary, the runner's Python, sampling, and the trio side that hands text to
readers. A GPU step of a small model takes a few milliseconds; host work in series
with it is lost throughput. Three measurements:

- **long**: N agents each ask for ~TOKENS generated tokens at once, through a real mount
  and through an in-process kernel (the same engine process, no FUSE). It reports
  engine steps/s, wall tok/s, and the host's milliseconds per step split into parts
  (kernel/stats: `plan_ipc_s`, `runner_python_s`, `sample_s`, `deliver_s`).
- **simulated device**: the same at `--fake-delay` D, as a fraction of the ideal
  1/D steps/s: the host's work must overlap the device's, not follow it.
- **short jobs**: M agents each answering one short prompt, driven by T client threads
  through the mount: jobs/s, where a job's fixed costs dominate.

Nothing here is asserted: tests/test_bench.py runs the quick form, and the figures go
to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from kernel import Caller, EngineProcess, EngineSpec, Job, Kernel, Storage
from kernel.syscall import Sys, syscall

from . import child_env
from .console import err

PARTS = ("plan_ipc_s", "runner_python_s", "sample_s", "decode_s", "deliver_s")  # kernel/stats: where a step's time goes


@dataclass
class Result:
    kind: str  # long-mount, long-inproc, short-mount
    agents: int
    delay: float
    wall_s: float
    jobs: int
    tokens: int
    steps: int
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.wall_s if self.wall_s else 0.0

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = asdict(self)
        out["steps_per_s"] = round(self.steps_per_s, 1)
        out["tok_per_s"] = round(self.tokens / self.wall_s, 1) if self.wall_s else 0.0
        out["jobs_per_s"] = round(self.jobs / self.wall_s, 1) if self.wall_s else 0.0
        steps = self.steps or 1
        out["host_ms_per_step"] = {part: round(1000 * self.stats.get(part, 0.0) / steps, 4) for part in PARTS}
        out["step_ms"] = round(1000 * self.stats.get("step_s", 0.0) / steps, 4)
        if self.delay:
            out["ideal_ratio"] = round(self.steps_per_s * self.delay, 3)
        return out


def long_request(tokens: int) -> str:
    """A prompt the fake model answers with about `tokens` tokens (it echoes it)."""
    text = ("abcdefghij" * (tokens // 10 + 1))[:tokens]
    return json.dumps({"prompt": text, "max_tokens": tokens + 64, "temperature": 0})


def diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v) - float(before.get(k, 0.0)), 6) for k, v in after.items() if isinstance(v, int | float)}


# -- through a mount --------------------------------------------------------------------------
class Mounted:
    def __init__(self, slots: int, delay: float) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="aiosfs-hostceiling-"))
        self.root = self.base / "mnt"
        env = child_env()
        args = ["mount", str(self.root), "--backend", "fake", "--slots", str(slots), "--fake-delay", str(delay), "--state", str(self.base / "state")]
        subprocess.run([sys.executable, "-m", "aiosfs.cli", *args], check=True, capture_output=True, env=env, timeout=120)

    def stats(self) -> dict[str, float]:
        stats: dict[str, float] = {}
        for line in (self.root / "kernel" / "stats").read_text().splitlines():
            name, _, value = line.partition(" ")
            try:
                stats[name] = float(value)
            except ValueError:
                pass
        return stats

    def close(self) -> None:
        subprocess.run([sys.executable, "-m", "aiosfs.cli", "unmount", str(self.root)], capture_output=True, timeout=60)
        shutil.rmtree(self.base, ignore_errors=True)


def ask(agent: Path, request: str) -> int:
    """One job through the files: write the prompt, read the answer to its end; its bytes."""
    with open(agent / "prompt", "w") as f:
        f.write(request)
    with open(agent / "output", "rb") as f:
        return len(f.read())


def run_mount(kind: str, agents: int, requests: list[str], slots: int, delay: float, threads: int) -> Result:
    mount = Mounted(slots, delay)
    try:
        names = [mount.root / "agents" / f"a{i}" for i in range(agents)]
        for path in names:
            path.mkdir()
        ask(names[0], "warm up")
        before = mount.stats()
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            sizes = list(pool.map(ask, names, requests))
        wall = time.perf_counter() - started
        stats = diff(mount.stats(), before)
    finally:
        mount.close()
    return Result(kind, agents, delay, wall, len(sizes), int(stats.get("generated", 0)), int(stats.get("steps", 0)), stats)


async def finished(job: Job) -> None:
    while not job.state.finished:
        await job.wait_beyond(len(job.data), 1.0)


# -- in-process -------------------------------------------------------------------------------
def run_inproc(agents: int, request: str, slots: int, delay: float) -> Result:
    base = Path(tempfile.mkdtemp(prefix="aiosfs-hostceiling-"))
    core = EngineProcess(EngineSpec("fake", n_slots=slots, n_ctx_seq=4096, fake_delay=delay))
    core.start()
    kernel = Kernel(Storage(base / "aiosfs.db"), core)
    caller = Caller(uid=os.getuid(), gid=os.getgid(), pid=os.getpid())

    async def body() -> tuple[float, dict[str, float], dict[str, float]]:
        async with trio.open_nursery() as nursery:
            await nursery.start(kernel.run)
            made = [await syscall(kernel, Sys.AGENT_CREATE, caller, f"a{i}", 0o755) for i in range(agents)]
            warm = await syscall(kernel, Sys.LLM_SUBMIT, caller, made[0], b"warm up")
            await finished(warm)
            before = kernel.statistics()
            started = time.perf_counter()
            jobs = [await syscall(kernel, Sys.LLM_SUBMIT, caller, agent, request.encode()) for agent in made]
            for job in jobs:
                await finished(job)
            wall = time.perf_counter() - started
            after = kernel.statistics()
            kernel.stop()
        return wall, before, after

    try:
        wall, before, after = trio.run(body)
    finally:
        core.close()
        kernel.close()
        kernel.memory.store.close()
        shutil.rmtree(base, ignore_errors=True)
    stats = diff(after, before)
    return Result("long-inproc", agents, delay, wall, agents, int(stats.get("generated", 0)), int(stats.get("steps", 0)), stats)


# -- the command ------------------------------------------------------------------------------
def table(results: list[dict[str, Any]]) -> str:
    head = "| run | agents | delay ms | steps/s | ideal | tok/s | jobs/s | step ms | plan+ipc ms | runner py ms | sample ms | deliver ms |"
    rows = [head, "|" + "---|" * 12]
    for r in results:
        h = r["host_ms_per_step"]
        rows.append(
            f"| {r['kind']} | {r['agents']} | {r['delay'] * 1000:g} | {r['steps_per_s']:.0f} | {r.get('ideal_ratio', '-')} | "
            f"{r['tok_per_s']:.0f} | {r['jobs_per_s']:.1f} | {r['step_ms']:.3f} | {h['plan_ipc_s']:.3f} | {h['runner_python_s']:.3f} | "
            f"{h['sample_s']:.3f} | {h['deliver_s']:.3f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench host-ceiling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=16, help="agents of the long runs, one slot each (default: 16)")
    p.add_argument("--tokens", type=int, default=1000, help="generated tokens per long job (default: 1000)")
    p.add_argument("--delays", default="0,0.003", help="fake decode step times in seconds, comma-separated (default: 0,0.003)")
    p.add_argument("--short-agents", type=int, default=1000, help="agents of the short-jobs run, one short prompt each (default: 1000; 0: none)")
    p.add_argument("--short-threads", type=int, default=64, help="client threads of the short-jobs run (default: 64)")
    p.add_argument("--reps", type=int, default=1, help="repetitions of everything, interleaved (default: 1)")
    p.add_argument("--quick", action="store_true", help="4 agents x 200 tokens, no delay, 50 short jobs: a smoke run")
    p.add_argument("--json", type=Path, default=None, help="write every result here")
    args = p.parse_args(argv)
    if args.quick:
        args.agents, args.tokens, args.delays, args.short_agents, args.short_threads = 4, 200, "0", 50, 8
    delays = [float(d) for d in args.delays.split(",") if d.strip()]
    results: list[dict[str, Any]] = []
    for rep in range(args.reps):
        for delay in delays:
            requests = [long_request(args.tokens)] * args.agents
            for name in ("long-mount", "long-inproc"):
                err(f"host-ceiling: rep {rep + 1}/{args.reps}, {name}, {args.agents} agents, delay {delay * 1000:g} ms")
                if name == "long-mount":
                    result = run_mount(name, args.agents, requests, args.agents, delay, args.agents)
                else:
                    result = run_inproc(args.agents, requests[0], args.agents, delay)
                results.append(result.summary())
                err(f"  {results[-1]['steps_per_s']:.0f} steps/s, {results[-1]['tok_per_s']:.0f} tok/s")
        if args.short_agents:  # 0: no short jobs
            err(f"host-ceiling: rep {rep + 1}/{args.reps}, short jobs: {args.short_agents} agents by {args.short_threads} threads")
            short = ["Say hi."] * args.short_agents
            results.append(run_mount("short-mount", args.short_agents, short, 16, 0.0, args.short_threads).summary())
            err(f"  {results[-1]['jobs_per_s']:.1f} jobs/s")
    print(table(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
