"""The command line: options, and what they mean for each workload."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import bench

from . import ROOT
from .console import err
from .servers import DEFAULT_LLAMA_SERVER
from .workloads import BUSY_FACTOR, KERNEL_SLOTS, PEERS, WORKLOADS, Workload


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/bench", description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="decode-heavy only, N in {1,8}, 1 repetition, few requests (a few minutes)")
    p.add_argument("--workloads", default=None, help=f"comma-separated, from {','.join(WORKLOADS)} (default: all)")
    p.add_argument("--agents", default=None, help="comma-separated agent counts N (default: 1,2,4,8,16)")
    p.add_argument(
        "--requests",
        type=int,
        default=None,
        help=f"requests (turns) per agent; in priority the high-priority agent's, the busy ones get {BUSY_FACTOR}x (default: 4; --quick: 2, 3 at N=1)",
    )
    p.add_argument("--reps", type=int, default=None, help="repetitions, interleaved across peers (default: 3; --quick: 1)")
    p.add_argument(
        "--peers",
        default=None,
        help=f"comma-separated, from {','.join(PEERS)}; each runs every workload asked for (default: all; aiosfs-noreuse in multi-turn only)",
    )
    p.add_argument(
        "--scheduler",
        default=None,
        metavar="SPEC",
        help="aiosfs peers: scheduling policy, fifo | 'rr quantum=N' | priority (default: the kernel's, fifo; priority in the priority workload)",
    )
    p.add_argument(
        "--slots",
        type=slots_arg,
        default=None,
        metavar="K",
        help="aiosfs peers: KV slots, shared by the N agents; `default`: the kernel's own (no --slots to aiosfs mount) (default: N)",
    )
    p.add_argument(
        "--naive-mode",
        choices=["thread", "lock"],
        default="thread",
        help="naive peer: one serving thread in arrival order (default), or every client thread calling the model under a lock",
    )
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every peer (default: 2)")
    p.add_argument("--model", type=Path, default=None, help="GGUF model (default: the embedded model, python3 -m setup.model path)")
    p.add_argument("--quant", choices=["q4_0"], default=None, help="requantize the model once into the data directory and benchmark that file")
    p.add_argument("--llama-server", type=Path, default=None, help=f"llama-server binary (default: {DEFAULT_LLAMA_SERVER})")
    p.add_argument("--build", action="store_true", help="build llama-server with scripts/build-llama-server when it is missing")
    p.add_argument("--run-timeout", type=float, default=None, help="seconds one run may take; no request starts after it (default: 600; --quick: 90)")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=None,
        help="before each run wait up to this many seconds for a moment when other processes leave the CPUs idle (default: 60; --quick: 0)",
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the generated prompts")
    p.add_argument(
        "--report", type=Path, default=None, metavar="DIR", help="only render DIR/results.md and DIR/throughput.png again from DIR/results.json"
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench-results", help="output directory (default: bench-results/)")
    # for the tests: the aiosfs peers on the kernel's fake backend (no model; the other peers are skipped)
    p.add_argument("--fake", action="store_true", help=argparse.SUPPRESS)
    return p


def slots_arg(text: str) -> int:
    """--slots: a count, or `default` (KERNEL_SLOTS)."""
    if text.strip().lower() == "default":
        return KERNEL_SLOTS
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor `default`") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.quick:
        args.workloads = args.workloads or "decode-heavy"
        args.agents = args.agents or "1,8"
        args.reps = args.reps or 1
        args.run_timeout = args.run_timeout or 90
        args.wait_quiet = 0 if args.wait_quiet is None else args.wait_quiet
    args.workloads = [w.strip() for w in (args.workloads or ",".join(WORKLOADS)).split(",") if w.strip()]
    args.agents = [int(n) for n in (args.agents or "1,2,4,8,16").split(",") if n.strip()]
    args.reps = args.reps or 3
    args.run_timeout = args.run_timeout or 600
    args.wait_quiet = 60 if args.wait_quiet is None else args.wait_quiet
    args.peers_given = args.peers is not None
    args.peers = [x.strip() for x in (args.peers or ",".join(PEERS)).split(",") if x.strip()]
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a usage error on an unknown workload or peer, or a bad N, --slots or --scheduler."""
    for w in args.workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r} (known: {', '.join(WORKLOADS)})")
    for peer in args.peers:
        if peer not in PEERS:
            p.error(f"unknown peer {peer!r} (known: {', '.join(PEERS)})")
    if any(n < 1 for n in args.agents):
        p.error("--agents: every N must be at least 1")
    if args.slots is not None and args.slots < 1 and args.slots != KERNEL_SLOTS:
        p.error("--slots: at least 1, or `default`")
    if args.scheduler is not None:
        from kernel import make_scheduler

        try:
            args.scheduler = make_scheduler(args.scheduler).describe()
        except ValueError as exc:
            p.error(f"--scheduler: {exc}")


def peers_for(args: argparse.Namespace, w: Workload) -> list[str]:
    """The peers that run a workload: aiosfs-noreuse only where KV reuse matters, unless asked for."""
    return [peer for peer in args.peers if args.peers_given or peer != "aiosfs-noreuse" or w.multi_turn]


def scheduler_for(args: argparse.Namespace, w: Workload) -> str | None:
    """The aiosfs peers' policy: --scheduler, else `priority` in the priority workload, else the kernel's default."""
    return args.scheduler or ("priority" if w.priority else None)


def requests_for(args: argparse.Namespace, w: Workload, n: int) -> int:
    if args.requests:
        return args.requests
    if args.quick:
        return 3 if n == 1 else 2
    return w.requests


def quantize_q4_0(model: Path) -> Path:
    """Requantize `model` to Q4_0 once, next to the other models in the data directory."""
    import ctypes

    import llama_cpp

    from setup.model import data_dir

    out = data_dir() / "models" / (model.name.split(".")[0] + ".Q4_0-requant.gguf")
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    err(f"requantizing {model.name} to Q4_0 → {out}")
    started = time.monotonic()
    with quiet_fds():  # llama.cpp prints a line per tensor
        rc = llama_cpp.llama_model_quantize(str(model).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"bench: llama_model_quantize failed ({rc})")
    tmp.rename(out)
    err(f"  done in {time.monotonic() - started:.1f} s ({out.stat().st_size / 1e6:.0f} MB)")
    return out


@contextlib.contextmanager
def quiet_fds() -> Iterator[None]:
    """Send what C code writes to stdout and stderr to /dev/null for a while."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)
