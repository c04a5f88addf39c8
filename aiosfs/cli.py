"""`aiosfs mount|unmount|status|top|aios-api|mcp`.

`mount` runs in the background by default: the command starts the daemon, relays
its start-up output (model loading progress included) and returns once the mount
is ready, so the next command can use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from kernel import params
from setup.kit import with_path
from setup.model import default_model_path

from .metrics import address_argument

READY = b"\0aiosfs-ready\n"
CLEAN_EXIT = "aiosfs: daemon stopped cleanly"


def _whole(least: int, unit: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number (of `unit`) of at least `least`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number{' of ' + unit if unit else ''}: {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, not {value}" if least else f"must be 0 or more, not {value}")
        return value

    return parse


_positive = _whole(1)
_mebibytes = _whole(0, "MiB")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.5 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be between 0.5 and 3600 seconds, not {value:g}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aiosfs", description="An operating system for LLM agents, in the filesystem.")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mount", help="mount aiosfs (in the background unless --foreground)")
    m.add_argument("mountpoint", type=Path)
    m.add_argument("-f", "--foreground", action="store_true", help="stay attached; log to stderr")
    m.add_argument("--model", type=Path, default=None, help=f"GGUF model file (default: {default_model_path()})")
    m.add_argument("--state", type=Path, default=None, help="state directory (default: ~/.local/state/aiosfs/<mountpoint>)")
    m.add_argument("--threads", type=int, default=0, help="CPU threads for llama.cpp (default: all cores)")
    m.add_argument("--gpu-layers", type=int, default=None, help="layers to offload to a GPU (default: all when llama.cpp has GPU support)")
    m.add_argument(
        "--slots",
        type=_positive,
        default=None,
        help=f"sequences decoded together (default: as many as --kv-budget holds, up to {params.MAX_AUTO_SLOTS})",
    )
    m.add_argument(
        "--kv-budget",
        type=_positive,
        default=params.KV_BUDGET_BYTES // 2**20,
        metavar="MIB",
        help="MiB of KV cache the default slots may take (default: %(default)s)",
    )
    m.add_argument(
        "--kv-disk",
        type=_mebibytes,
        default=None,
        metavar="MIB",
        help="MiB of disk each local model's engine may fill with agents' KV caches in STATE/kv, so that a turn after an unmount, "
        f"a reboot or an engine crash reads its conversation back instead of recomputing it (default: {params.KV_DISK_SHARE * 100:.0f}%% of "
        f"the state directory's free space, at most {params.KV_DISK_MAX_BYTES // 2**30} GiB; 0: off; docs/engine.md)",
    )
    m.add_argument("--ctx", type=int, default=params.DEFAULT_CTX_PER_SLOT, help="context tokens per agent")
    m.add_argument("--memory-quota", type=int, default=params.MEMORY_QUOTA_BYTES, help="bytes of memory/ files per agent (EDQUOT beyond)")
    m.add_argument(
        "--agents-dir",
        type=Path,
        default=None,
        help="a directory of agent manifests (NAME.toml): each one's agent is kept in agents/ and its command run as its owner; "
        "watched for changes (docs/tools.md)",
    )
    m.add_argument("--config", type=Path, default=None, help="a TOML file with remote OpenAI-compatible cores and the route (docs/scale-out.md)")
    m.add_argument("--tools", type=Path, default=None, help="a directory of external tools (NAME.json manifests) served in tools/ (docs/tools.md)")
    m.add_argument(
        "--engine-deadline",
        type=_seconds,
        default=params.ENGINE_DEADLINE_SECONDS,
        metavar="SECONDS",
        help=f"an engine that answers no step or call for this long, or {params.ENGINE_DEADLINE_FACTOR}x its slowest recent step "
        f"when that is longer (up to {params.ENGINE_DEADLINE_CAP_FACTOR}x this), is hung: it is killed and restarted, and the jobs "
        "in it fail with EIO (default: %(default)s)",
    )
    m.add_argument(
        "--metrics",
        type=address_argument,
        default=None,
        metavar="HOST:PORT",
        help="also serve kernel/metrics (Prometheus text format) over HTTP at http://HOST:PORT/metrics, e.g. 127.0.0.1:9464; "
        "any address is allowed: whoever reaches it reads the metrics (docs/metrics.md)",
    )
    m.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    m.add_argument("--backend", default="llama", choices=["llama", "fake"], help=argparse.SUPPRESS)
    m.add_argument("--fake-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    m.add_argument("--ready-fd", type=int, default=-1, help=argparse.SUPPRESS)
    u = sub.add_parser("unmount", help="unmount and wait for the daemon to stop")
    u.add_argument("mountpoint", type=Path)
    u.add_argument("--lazy", action="store_true", help="detach now even if files are open")
    s = sub.add_parser("status", help="print the kernel status line of a mount")
    s.add_argument("mountpoint", type=Path)
    t = sub.add_parser("top", help="a live view of the kernel: status, throughput, jobs")
    t.add_argument("mountpoint", type=Path)
    t.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    t.add_argument("--once", action="store_true", help="print one frame and exit")
    g = sub.add_parser("aios-api", help="serve the AIOS kernel's HTTP protocol (/query) through a mount")
    g.add_argument("mountpoint", type=Path)
    g.add_argument("--listen", default="127.0.0.1:8000", metavar="HOST:PORT", help="address to serve on (default: %(default)s)")
    g.add_argument("--token", type=Path, default=None, metavar="FILE", help="require 'Authorization: Bearer TOKEN', TOKEN read from FILE")
    g.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    c = sub.add_parser(
        "mcp",
        help="serve the mount to MCP hosts (Model Context Protocol): on stdio, or on streamable HTTP with --listen",
        description="Serve the mount as an MCP server: tools to list, create and ask agents, read their context, "
        "write and search their memory and run the mount's tools; resources for contexts and memory files. "
        "Everything is done through the mount's files as the user who runs it (docs/mcp.md).",
    )
    c.add_argument("mountpoint", type=Path)
    c.add_argument(
        "--listen",
        type=address_argument,
        default=None,
        metavar="HOST:PORT",
        help="serve streamable HTTP at http://HOST:PORT/mcp instead of stdio; an address that is not loopback needs --token",
    )
    c.add_argument(
        "--token", type=Path, default=None, metavar="FILE", help="with --listen: require 'Authorization: Bearer TOKEN', TOKEN read from FILE"
    )
    c.add_argument(
        "--timeout",
        type=_seconds,
        default=300.0,
        metavar="SECONDS",
        help="the longest an answer is waited for; then the turn is cancelled and the tool fails with ETIMEDOUT (default: %(default)g)",
    )
    c.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "aios-api":  # a client of a mount: it needs neither FUSE nor llama.cpp
        return cmd_aios_api(args)
    if args.command == "mcp":  # the same
        return cmd_mcp(args)
    from .mount import MountError

    try:
        if args.command == "mount":
            return cmd_mount(args)
        if args.command == "unmount":
            return cmd_unmount(args)
        if args.command == "top":
            return cmd_top(args)
        return cmd_status(args)
    except MountError as exc:
        sys.stderr.write(f"aiosfs: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130


def cmd_aios_api(args: argparse.Namespace) -> int:
    from clients.aios.server import serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(args.mountpoint.absolute(), args.listen, args.token)


def cmd_mcp(args: argparse.Namespace) -> int:
    from clients.mcp.serve import serve

    if args.token is not None and args.listen is None:
        sys.stderr.write("aiosfs mcp: --token guards --listen HOST:PORT; over stdio the host that starts the server is its only client\n")
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(args.mountpoint.absolute(), args.listen, args.token, args.timeout)


def _options(args: argparse.Namespace) -> object:
    from .mount import MountOptions, default_state_dir

    mountpoint = args.mountpoint.absolute()
    return MountOptions(
        mountpoint=mountpoint,
        state=(args.state or default_state_dir(mountpoint)).absolute(),
        model=(args.model or default_model_path()).absolute(),
        backend=args.backend,
        threads=args.threads,
        gpu_layers=args.gpu_layers,
        slots=args.slots,
        kv_budget=args.kv_budget,
        kv_disk=args.kv_disk,
        ctx=args.ctx,
        fake_delay=args.fake_delay,
        engine_deadline=args.engine_deadline,
        memory_quota=args.memory_quota,
        agents_dir=args.agents_dir.absolute() if args.agents_dir is not None else None,
        tools=args.tools.absolute() if args.tools is not None else None,
        config=args.config.absolute() if args.config is not None else None,
        metrics=args.metrics,
    )


def cmd_mount(args: argparse.Namespace) -> int:
    from .mount import MountOptions, preflight, serve

    options = _options(args)
    assert isinstance(options, MountOptions)
    if not args.foreground:
        preflight(options, sys.stderr)
        return _spawn_daemon(args, options)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = os.fdopen(args.ready_fd, "wb", buffering=0) if args.ready_fd >= 0 else None
    out = _Tee(report)

    def ready(line: str) -> None:
        out.write(line + "\n")
        if report is not None:
            report.write(READY)
            report.close()
            out.report = None

    serve(options, out, ready)
    sys.stderr.write(f"{CLEAN_EXIT} (pid {os.getpid()})\n")  # the last line of a daemon that was not killed
    return 0


class _Tee:
    """Start-up output: to stderr, and to the parent's pipe while it listens."""

    def __init__(self, report: object) -> None:
        self.report = report

    def write(self, text: str) -> int:
        sys.stderr.write(text)
        if self.report is not None:
            try:
                self.report.write(text.encode())  # type: ignore[attr-defined]
            except OSError:
                self.report = None
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _spawn_daemon(args: argparse.Namespace, options: object) -> int:
    from .mount import MountOptions

    assert isinstance(options, MountOptions)
    read_end, write_end = os.pipe()
    log_path = options.state / "aiosfs.log"
    argv = [sys.executable, "-m", "aiosfs.cli", *_daemon_argv(args, options), "--ready-fd", str(write_end)]
    env = with_path(dict(os.environ))  # the daemon runs the same code as this command, wherever it was imported from
    with open(log_path, "ab") as log_file:
        subprocess.Popen(
            argv, env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, pass_fds=(write_end,), start_new_session=True
        )
    os.close(write_end)
    received = b""
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while chunk := pipe.read(4096):
            received += chunk
            sys.stderr.buffer.write(chunk.replace(READY, b""))
            sys.stderr.flush()
    if READY in received:
        return 0
    sys.stderr.write(f"aiosfs: the daemon stopped during start-up; its log is {log_path}:\n")
    try:
        sys.stderr.write("".join(open(log_path, errors="replace").readlines()[-15:]))
    except OSError:
        pass
    return 1


def _daemon_argv(args: argparse.Namespace, options: object) -> list[str]:
    """The daemon's command line: every mount option, so none is lost on the way
    (each MountOptions field is the flag of the same name)."""
    from .mount import MountOptions

    assert isinstance(options, MountOptions)
    argv = ["mount", str(options.mountpoint), "--foreground", "--log-level", args.log_level]
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if f.name != "mountpoint" and value is not None:
            argv += ["--" + f.name.replace("_", "-"), str(value)]
    return argv


def cmd_unmount(args: argparse.Namespace) -> int:
    from .mount import unmount

    unmount(args.mountpoint.absolute(), args.lazy, sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    path = args.mountpoint / "kernel" / "status"
    try:
        sys.stdout.write(path.read_text())
    except OSError as exc:
        sys.stderr.write(f"aiosfs: {args.mountpoint} is not an aiosfs mount ({exc.strerror})\n")
        return 1
    return 0


TOP_STATS = [
    "tokens_per_s",
    "mean_batch",
    "steps",
    "generated",
    "prompt_tokens",
    "preemptions",
    "swaps_out",
    "swap_ms",
    "recomputes",
    "prefix_hit_tokens",
    "shared_prefix_tokens",
]


def top_frame(mountpoint: Path) -> str:
    """One screen of `aiosfs top`: the status line, key counters and the job table."""
    kernel = mountpoint / "kernel"
    stats = dict(line.split(" ", 1) for line in (kernel / "stats").read_text().splitlines() if " " in line)
    counters = "  ".join(f"{key}={stats[key]}" for key in TOP_STATS if key in stats)
    return f"{(kernel / 'status').read_text().strip()}\n{counters}\n\n{(kernel / 'ps').read_text()}"


def cmd_top(args: argparse.Namespace) -> int:
    import time

    try:
        while True:
            frame = top_frame(args.mountpoint)
            if args.once:
                sys.stdout.write(frame)
                return 0
            sys.stdout.write("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S  ") + frame)
            sys.stdout.flush()
            time.sleep(args.interval)
    except OSError as exc:
        sys.stderr.write(f"aiosfs: {args.mountpoint} is not an aiosfs mount ({exc.strerror})\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
