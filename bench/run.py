"""A whole bench: the peers that can run here, a run per (workload, N, repetition, peer)
interleaved, and the results written after every run."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .cli import parse_args, peers_for, quantize_q4_0, requests_for, scheduler_for
from .console import Progress, err
from .load import Cell
from .noise import wait_quiet
from .peers import IN_WORKER, RUNNERS
from .report import machine, markdown, plot, report
from .servers import find_llama_server
from .stats import medians, summarize
from .worker import run_in_worker, worker_main
from .workloads import AIOSFS_PEERS, WORKLOADS, Calibrator, FakeCalibrator, FakeVocab, Texts, Vocab, make_plan

FAKE_MODEL = Path("fake")  # --fake: what stands for the model file


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM ends the bench like Ctrl-C: every server and mount is stopped on the way out."""
    raise KeyboardInterrupt


def find_model(args: argparse.Namespace) -> Path:
    """The GGUF file every peer runs (requantized with --quant); --fake: none."""
    if args.fake:
        return FAKE_MODEL
    from setup.model import default_model_path, shipped_model_path

    # --quant re-encodes the shipped file (not the Q8_0 default), so its Q4_0 stays the one measured before
    model: Path = (args.model or (shipped_model_path() if args.quant else default_model_path())).absolute()
    if not model.is_file():
        raise SystemExit(f"bench: model file {model} not found: run scripts/setup or pass --model")
    if args.quant == "q4_0":
        model = quantize_q4_0(model)
    return model


def _skip(args: argparse.Namespace, skipped: list[str], peer: str, why: str) -> None:
    err(f"skipping {why}")
    skipped.append(why)
    args.peers = [p for p in args.peers if p != peer]


def skip_unavailable(args: argparse.Namespace) -> tuple[list[str], Path | None]:
    """Leave out (from args.peers) the peers this machine cannot run, saying why; (the notes, llama-server's binary)."""
    skipped: list[str] = []
    if args.fake:
        for peer in [p for p in args.peers if p not in AIOSFS_PEERS]:
            _skip(args, skipped, peer, f"{peer}: --fake runs only the aiosfs peers")
    llama_server = None
    if "llama-server" in args.peers:
        llama_server, why = find_llama_server(args)
        if llama_server is None:
            _skip(args, skipped, "llama-server", why)
    for peer in ("aiosfs-mount", "aiosfs-aios-api"):
        if peer in args.peers and not os.path.exists("/dev/fuse"):
            _skip(args, skipped, peer, f"{peer}: /dev/fuse is missing on this machine")
    for module, peer in (("httpx", "llama-server"), ("uvicorn", "llama_cpp.server"), ("httpx", "llama_cpp.server")):
        if peer in args.peers:
            try:
                __import__(module)
            except ImportError:
                _skip(args, skipped, peer, f"{peer}: the Python package {module} is missing (pip install -e '.[bench]')")
    return skipped, llama_server


def make_meta(args: argparse.Namespace, argv: list[str] | None, model: Path, llama_server: Path | None, eog: list[int]) -> dict[str, Any]:
    """What the results say about the bench itself: machine, model, options, versions."""
    meta = {
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine(),
        "model": str(model),
        "model_bytes": 0 if args.fake else model.stat().st_size,
        "threads": args.threads,
        "reps": args.reps,
        "peers": args.peers,
        "peers_by_workload": {w: peers_for(args, WORKLOADS[w]) for w in args.workloads},
        "workloads": args.workloads,
        "agents": args.agents,
        "scheduler": args.scheduler,  # None: the kernel's default (fifo), priority in the priority workload
        "slots": args.slots,  # None: one per agent; 0 (--slots default): the kernel's, each run's extra says how many
        "eog_tokens": eog,
        "command": "scripts/bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "llama_server": str(llama_server) if llama_server else None,
    }
    with contextlib.suppress(Exception):
        import llama_cpp

        meta["llama_cpp_python"] = llama_cpp.__version__
    if llama_server:
        with contextlib.suppress(Exception):
            meta["llama_server_version"] = subprocess.run([str(llama_server), "--version"], capture_output=True, text=True, timeout=30).stderr.strip()
    return meta


@dataclass
class Bench:
    """One bench under way: what every run needs, and the runs so far."""

    args: argparse.Namespace
    model: Path
    llama_server: Path | None
    vocab: Texts
    calibrator: Calibrator | FakeCalibrator
    out_dir: Path
    meta: dict[str, Any]
    skipped: list[str]
    progress: Progress
    started: float
    runs: list[dict[str, Any]] = field(default_factory=list)

    def save(self) -> list[dict[str, Any]]:
        """Write results.json (every run so far and the medians); return the medians."""
        rows = medians(self.runs)
        meta = self.meta
        calibs = [r["calib_tok_s"] for r in self.runs if r.get("calib_tok_s")]
        if calibs:
            meta["calib_median"], meta["calib_min"], meta["calib_max"] = round(statistics.median(calibs), 1), min(calibs), max(calibs)
        meta["wall_s"] = round(time.monotonic() - self.started, 1)
        out = {"meta": meta, "skipped": self.skipped, "runs": self.runs, "medians": rows}
        (self.out_dir / "results.json").write_text(json.dumps(out, indent=1))
        return rows

    def cells(self) -> list[tuple[str, int, int]]:
        args = self.args
        return [(w, n, rep) for w in args.workloads for n in args.agents for rep in range(args.reps)]

    def run_all(self) -> None:
        """Every (workload, N, repetition), each peer in turn; the results saved after every run."""
        args = self.args
        for w_name, n, rep in self.cells():
            w = WORKLOADS[w_name]
            m = requests_for(args, w, n)
            plan = make_plan(self.vocab, w, n, m, args.seed)
            for peer in peers_for(args, w):
                label = f"{w_name} N={n} rep {rep + 1}/{args.reps} {peer}"
                with self.progress.run(label, plan.total_requests):
                    cell = Cell(
                        plan,
                        self.model,
                        args.threads,
                        0.0,
                        args.run_timeout,
                        self.out_dir / "logs",
                        f"{w_name}-N{n}-r{rep + 1}",
                        self.progress,
                        self.vocab.eog,
                        self.llama_server,
                        scheduler=scheduler_for(args, w),
                        slots=args.slots,
                        fake=args.fake,
                    )
                    run = self.run_one(peer, cell, rep, m)
                self.runs.append(run)
                self.progress.finish(run.get("summary"), run.get("failure", ""), run["calib_tok_s"])
                self.save()

    def run_one(self, peer: str, cell: Cell, rep: int, m: int) -> dict[str, Any]:
        """One peer on one cell: calibration, the measured run, and its summary (or failure)."""
        args, plan = self.args, cell.plan
        w, n = plan.workload, plan.n_agents
        if peer in AIOSFS_PEERS:  # what was asked for; the peer records what the kernel ran
            cell.extra.update(scheduler=cell.scheduler, slots=cell.n_slots)
        run: dict[str, Any] = {"workload": w.name, "agents": n, "rep": rep + 1, "peer": peer, "requests_per_agent": m, "ctx": plan.ctx}
        if args.wait_quiet > 0:
            run["idle_busy_share"] = wait_quiet(args.wait_quiet)
        run["calib_tok_s"] = self.calibrator.measure()
        run["loadavg"] = round(os.getloadavg()[0], 2)
        t0 = time.monotonic()
        try:
            # the deadline counts from now: start-up and warm-up are inside it too
            cell.deadline = time.time() + args.run_timeout
            if peer in IN_WORKER:
                records, started = run_in_worker(peer, cell)
            else:
                records, started = RUNNERS[peer](cell)
            run["summary"] = summarize(records, started, n, m if w.priority else n * m, w.priority)
            if cell.extra.get("tok_s") is not None:  # raw-batched: over its decode phases only
                run["summary"]["wall_tok_s"] = run["summary"]["tok_s"]
                run["summary"]["tok_s"] = cell.extra["tok_s"]
            run["records"] = [asdict(r) for r in records]
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            run["failure"] = f"{type(exc).__name__}: {exc}"
        run["extra"] = cell.extra
        run["elapsed_s"] = round(time.monotonic() - t0, 2)
        return run

    def finish(self, interrupted: bool) -> int:
        """Write the results, print the table; the exit status."""
        self.calibrator.close()
        rows = self.save()
        out_dir = self.out_dir
        table = markdown(rows, self.meta, self.skipped)
        (out_dir / "results.md").write_text(table)
        plotted = plot(rows, out_dir / "throughput.png")
        print(table)
        err(f"results: {out_dir / 'results.json'}, {out_dir / 'results.md'}" + (f", {out_dir / 'throughput.png'}" if plotted else ""))
        err(f"wall time: {time.monotonic() - self.started:.0f} s")
        failures = [r for r in self.runs if "failure" in r]
        for r in failures:
            err(f"failed: {r['workload']} N={r['agents']} rep {r['rep']} {r['peer']}: {r['failure']}")
        return 130 if interrupted else (1 if failures else 0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        return report(args.report)
    os.environ["AIOSFS_BENCH_NAIVE_MODE"] = args.naive_mode  # read by the naive peer's worker process
    started = time.monotonic()

    signal.signal(signal.SIGTERM, _interrupt)

    model = find_model(args)
    skipped, llama_server = skip_unavailable(args)
    vocab: Texts = FakeVocab() if args.fake else Vocab(model)
    calibrator = FakeCalibrator() if args.fake else Calibrator(model, args.threads, vocab.eog)
    out_dir = args.out.absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = make_meta(args, argv, model, llama_server, vocab.eog)
    n_runs = sum(len(peers_for(args, WORKLOADS[w])) for w in args.workloads) * len(args.agents) * args.reps
    bench = Bench(args, model, llama_server, vocab, calibrator, out_dir, meta, skipped, Progress(n_runs), started)
    interrupted = False
    try:
        bench.run_all()
    except KeyboardInterrupt:
        interrupted = True
        err("\ninterrupted: writing what was measured so far")
    return bench.finish(interrupted)


def worker_entry() -> int:
    """`--worker` (bench.worker): SIGTERM stops the peer like Ctrl-C."""
    signal.signal(signal.SIGTERM, _interrupt)
    return worker_main()
