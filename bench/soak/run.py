"""`scripts/soak`: the command line and the order of things (mount, clients and faults for
the duration, a bounded wind-down, checks on the live mount, unmount, remount, report)."""

from __future__ import annotations

import argparse
import random
import shlex
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from . import __doc__ as ABOUT
from .client import Client
from .faults import SIGNALS, Injector
from .proc import Mount, Status, alive, bounded, descendants, mount_accepts, read_status
from .report import Report

STATUS_TIMEOUT = 10.0  # a read of kernel/status that takes longer is a failure in itself
VERIFY_TIMEOUT = 300.0  # reading back every agent's memory files


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/soak", description=ABOUT, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=16, help="agents prompting at once (default: %(default)s)")
    p.add_argument("--duration", type=float, default=600, help="seconds of prompting and faults (default: %(default)s)")
    p.add_argument("--backend", choices=["llama", "fake"], default="llama", help="the embedded model, or the test backend (default: %(default)s)")
    p.add_argument("--model", type=Path, default=None, help="a GGUF file for the llama backend (default: the mount's default model)")
    p.add_argument("--threads", type=int, default=0, help="llama.cpp threads (default: the mount's)")
    p.add_argument("--slots", type=int, default=None, help="KV slots (default: the mount's)")
    p.add_argument("--fake-delay", type=float, default=0.01, help="seconds per decode step of the fake backend (default: %(default)s)")
    p.add_argument("--engine-deadline", type=float, default=15.0, help="the watchdog's deadline floor, passed to the mount (default: %(default)s)")
    p.add_argument(
        "--fault-interval", type=float, nargs=2, default=[20.0, 40.0], metavar=("MIN", "MAX"), help="seconds between faults (default: 20 40)"
    )
    p.add_argument("--faults", type=int, default=None, help="inject at most this many faults (default: as many as the duration holds)")
    p.add_argument("--kinds", default="kill,segv,stop", help="fault kinds to draw from: kill, segv, stop (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="seed of the faults and the clients (default: random, printed)")
    p.add_argument("--max-tokens", type=int, default=48, help="max_tokens of each request (default: %(default)s)")
    p.add_argument("--memory-ops", type=int, default=1, help="memory/ operations after each job (default: %(default)s)")
    p.add_argument("--reset-every", type=int, default=4, help="empty an agent's conversation every N jobs (default: %(default)s)")
    p.add_argument("--progress", type=float, default=10.0, help="seconds between progress lines (default: %(default)s)")
    p.add_argument("--dir", type=Path, default=None, help="where the mountpoint and the state go (default: a new directory in /tmp)")
    p.add_argument("--keep", action="store_true", help="keep that directory (the state, aiosfs.log, audit.jsonl) at the end")
    p.add_argument("--json", type=Path, default=None, help="write the report here as JSON")
    args = p.parse_args(argv)
    args.kinds = [k for k in args.kinds.split(",") if k]
    if not args.kinds or set(args.kinds) - set(SIGNALS):
        p.error(f"--kinds: a comma-separated list of {', '.join(SIGNALS)}")
    if not 0 < args.fault_interval[0] <= args.fault_interval[1]:
        p.error("--fault-interval: 0 < MIN <= MAX")
    return args


def say(text: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    command = "scripts/soak " + shlex.join(sys.argv[1:] if argv is None else argv)
    mount_args = ["--backend", args.backend] + (["--fake-delay", str(args.fake_delay)] if args.backend == "fake" else [])
    mount_args += (["--model", str(args.model)] if args.model else []) + (["--threads", str(args.threads)] if args.threads else [])
    mount_args += ["--slots", str(args.slots)] if args.slots else []
    report = Report(command, args.backend, args.agents, args.duration, engine_deadline_s=args.engine_deadline, faults_asked=args.faults)
    if mount_accepts("--engine-deadline"):
        mount_args += ["--engine-deadline", str(args.engine_deadline)]
    elif "stop" in args.kinds:
        say(
            "aiosfs mount does not accept --engine-deadline: the watchdog is not in, and a SIGSTOP would freeze the engine for good. Use --kinds kill,segv"
        )
        return 2
    else:
        say("note: aiosfs mount does not accept --engine-deadline (no watchdog yet); mounting without it")
    base = args.dir or Path(tempfile.mkdtemp(prefix="aiosfs-soak-", dir="/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    mount = Mount(base / "mnt", base / "state", mount_args)
    mount.root.mkdir(parents=True, exist_ok=True)
    say(f"seed {seed}; mounting {mount.root} (state {mount.state}): aiosfs mount {' '.join(mount_args)}")
    try:
        mount.start()
        try:
            clients = soak(args, seed, mount, report)
        finally:
            if mount.listed():  # an error or ^C before the unmount, a dead daemon: never leave a mount behind
                mount.unmount()
        remount(mount, clients, report)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    report.judge()
    print(report.summary())
    if args.json:
        report.write_json(args.json)
    if args.keep:
        say(f"kept {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if report.ok else 1


def soak(args: argparse.Namespace, seed: int, mount: Mount, report: Report) -> list[Client]:
    rng = random.Random(seed)
    report.daemon_pid = mount.daemon
    shown = read_status(mount.root).deadline
    report.deadline_shown_s = shown

    def limit() -> float:
        return max(args.engine_deadline, report.deadline_shown_s or 0) + 5

    clients = []
    for i in range(args.agents):
        agent = mount.root / "agents" / f"soak{i:02d}"
        agent.mkdir()
        clients.append(
            Client(
                agent,
                str(seed),
                model=args.backend == "llama",
                max_tokens=args.max_tokens,
                memory_ops=args.memory_ops,
                reset_every=args.reset_every,
                limit=limit(),
            )
        )
    started = time.monotonic()
    injector = Injector(mount, args.kinds, tuple(args.fault_interval), args.faults, rng, lambda: 2 * limit() + 60, started, say)
    for client in clients:
        client.start()
    injector.thread.start()
    say(
        f"{args.agents} agents prompting for {args.duration:.0f} s; faults {'/'.join(args.kinds)} every {args.fault_interval[0]:g}-{args.fault_interval[1]:g} s"
    )
    next_progress = started + args.progress
    while time.monotonic() - started < args.duration:
        time.sleep(1)
        status = read_or_fail(mount, report, f"at {time.monotonic() - started:.0f} s")
        if status is None:
            break
        if status.deadline is not None and status.deadline != (report.deadlines[-1][1] if report.deadlines else shown):
            report.deadlines.append((round(time.monotonic() - started), status.deadline))
            if status.deadline > (report.deadline_shown_s or 0):
                report.deadline_shown_s = status.deadline
                for client in clients:
                    client.limit = limit()
        for client in clients:
            client.check()
        if not alive(mount.daemon):
            say(f"the daemon (pid {mount.daemon}) is gone: ending the run")
            break
        if time.monotonic() >= next_progress:
            next_progress += args.progress
            say(progress(time.monotonic() - started, clients, injector, status.engine, status.count("restarts")))
    # the wind-down: no new jobs; one under way has until the stuck limit (plus a margin) to end
    injector.stop.set()
    for client in clients:
        client.stop.set()
    wind_down = time.monotonic() + limit() + 30
    while any(c.thread.is_alive() for c in clients) and time.monotonic() < wind_down:
        time.sleep(0.5)
        for client in clients:
            client.check()
    injector.thread.join(2 * limit() + 70)
    report.elapsed_s = round(time.monotonic() - started, 1)
    report.stuck_limit_s = limit()
    if injector.thread.is_alive():
        report.fault_problems.append("the fault injector was still waiting for the engine at the end")
    report.fault_problems += injector.problems + injector.resume_stopped()
    report.faults = [vars(f).copy() for f in injector.faults]
    report.faults_by_kind = injector.counts()
    collect(clients, report)
    status = read_or_fail(mount, report, "at the end")
    if status is not None:
        report.restarts = status.count("restarts")
        report.hangs = status.count("hangs") if "hangs" in status.fields else None
    report.daemon_pid_end = int((mount.state / "lock").read_text().split()[0]) if alive(mount.daemon) else None
    report.engine_processes = {str(pid): cmd for pid, cmd in descendants(mount.daemon).items()}
    say("checking every acknowledged memory write on the live mount")
    report.lost_live = verify(clients)
    say("unmounting")
    report.unmount_finished, unmount_s, report.unmount_error = mount.unmount()
    report.unmount_s = round(unmount_s, 2)
    report.left_behind = [int(pid) for pid in report.engine_processes if alive(int(pid))]
    report.audit_engine_events = mount.engine_event_counts()
    report.log_troubles = mount.log_troubles()
    report.memory_acknowledged = dict(sum((c.ledger.acked for c in clients), Counter()))
    report.memory_unverified = sum(len(c.ledger.unsure) for c in clients)
    return clients


def read_or_fail(mount: Mount, report: Report, when: str) -> Status | None:
    """kernel/status, or None (and a failure in the report) when the mount does not answer."""
    try:
        return bounded(lambda: read_status(mount.root), STATUS_TIMEOUT, "kernel/status")
    except (OSError, TimeoutError) as exc:
        report.failures.append(f"reading kernel/status {when}: {exc}")
        return None


def verify(clients: list[Client]) -> list[str]:
    """Every acknowledged memory write that is not there as acknowledged (bounded)."""
    try:
        return bounded(lambda: [line for c in clients for line in c.ledger.verify()], VERIFY_TIMEOUT, "the memory check")
    except TimeoutError as exc:
        return [str(exc)]


def collect(clients: list[Client], report: Report) -> None:
    """The jobs, stuck waits and failures of every client (those still blocked included)."""
    jobs = [job for c in clients for job in list(c.jobs)]
    report.jobs = {k: sum(1 for j in jobs if j.outcome == k) for k in ("done", "eio", "failed")}
    report.mean_job_s = round(sum(j.seconds for j in jobs) / len(jobs), 3) if jobs else 0.0
    pending = [c.current_wait() for c in clients]
    report.longest_wait_s = round(max([j.longest_wait for j in jobs] + pending + [0.0]), 2)
    report.stuck = [vars(s).copy() for c in clients for s in list(c.stuck)]
    report.failures += [f"{j.agent} job {j.index}: {j.reason}" for j in jobs if j.outcome == "failed"]
    report.failures += [f for c in clients for f in list(c.ledger.failures) + list(c.failures)]
    report.failures += [f"{c.name}: its client thread never ended" for c in clients if c.thread.is_alive()]


def remount(mount: Mount, clients: list[Client], report: Report) -> None:
    """Mount the same state again and check every acknowledged write once more."""
    again = Mount(mount.root, mount.state, mount.args)
    say("remounting the same state to check the memory writes again")
    try:
        again.start()
    except (RuntimeError, OSError) as exc:
        report.remount = f"the remount failed: {exc}"
        return
    try:
        report.lost_remount = verify(clients)
    finally:
        finished, took, why = again.unmount()
        if not finished:
            report.remount += f" the second unmount failed after {took:.1f} s: {why}"


def progress(elapsed: float, clients: list[Client], injector: Injector, engine: str, restarts: int) -> str:
    jobs = [job for c in clients for job in list(c.jobs)]
    count = {k: sum(1 for j in jobs if j.outcome == k) for k in ("done", "eio", "failed")}
    stuck = sum(len(c.stuck) for c in clients)
    acked = sum(c.ledger.acknowledged for c in clients)
    waiting = max((c.current_wait() for c in clients), default=0.0)
    return (
        f"{elapsed:5.0f} s: jobs {len(jobs)} ({count['done']} done, {count['eio']} EIO, {count['failed']} failed), stuck {stuck}, "
        f"memory writes {acked}; faults {len(injector.faults)}, restarts {restarts}, engine={engine}; longest wait now {waiting:.1f} s"
    )
