"""Mounting: checks with a fix for every failure, then one trio nursery that runs
the kernel and pyfuse3's main loop, and a clean unmount however it ends.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from kernel import EngineDied, EngineProcess, EngineSpec, Kernel, MemoryStore, Storage, end_leftover_engines, load_api_key, params
from services.manifests import ManifestManager
from setup.model import data_dir

from .metrics import MetricsServer, check_address
from .mountconfig import ConfigError, LocalModel, MountConfig, load_mount_config
from .ops import Operations

log = logging.getLogger(__name__)


class MountError(Exception):
    """A reason the mount cannot happen, worded with what to do about it."""


@dataclass
class MountOptions:
    mountpoint: Path
    state: Path
    model: Path
    backend: str = "llama"  # "llama", or "fake" for tests of the filesystem itself
    threads: int = 0
    gpu_layers: int | None = None
    slots: int | None = None  # None: as many as kv_budget holds (up to params.MAX_AUTO_SLOTS)
    kv_budget: int = params.KV_BUDGET_BYTES // 2**20  # MiB (the --kv-budget flag)
    kv_disk: int | None = None  # MiB of agents' KV sequences on disk per engine (--kv-disk; None: a share of the free space; 0: none)
    ctx: int = params.DEFAULT_CTX_PER_SLOT
    fake_delay: float = 0.0
    engine_deadline: float = params.ENGINE_DEADLINE_SECONDS  # the watchdog's floor (kernel/cores/enginehost.py)
    memory_quota: int = params.MEMORY_QUOTA_BYTES
    agents_dir: Path | None = None  # agent manifests to keep (services/manifests.py)
    tools: Path | None = None  # external tools' manifests (kernel/tools/)
    config: Path | None = None  # remote cores and the route (aiosfs/mountconfig.py)
    metrics: str | None = None  # HOST:PORT to serve kernel/metrics at over HTTP (aiosfs/metrics.py)


def slug(mountpoint: Path) -> str:
    return str(mountpoint.resolve()).strip("/").replace("/", "-") or "root"


def default_state_dir(mountpoint: Path) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "aiosfs" / slug(mountpoint)


def pid_file(mountpoint: Path) -> Path:
    return data_dir() / "run" / f"{slug(mountpoint)}.pid"


def check_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        raise MountError(
            "/dev/fuse is missing: load the module with 'modprobe fuse', or start the container with '--device /dev/fuse --cap-add SYS_ADMIN'"
        )
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):  # a user's mount: fusermount3 opens it as that user
        mode = os.stat("/dev/fuse").st_mode & 0o777
        raise MountError(
            f"/dev/fuse (mode {mode:04o}) is not readable and writable by you, so only root can mount here: "
            "as root, run 'chmod 0666 /dev/fuse' (the mode udev gives it; scripts/setup does this), or mount as root"
        )
    if shutil.which("fusermount3") is None:
        raise MountError("fusermount3 is not installed: run scripts/setup (Debian package fuse3)")


def check_mountpoint(mountpoint: Path, out: Any) -> None:
    """Refuse a missing or busy mountpoint; clean a dead mount left by a crash."""
    try:
        os.stat(mountpoint)
    except FileNotFoundError:
        try:  # as `mount --mkdir` does
            mountpoint.mkdir(parents=True)
        except OSError as exc:
            raise MountError(f"mountpoint {mountpoint} does not exist and cannot be created: {exc.strerror}") from None
        out.write(f"aiosfs: created the mountpoint {mountpoint}\n")
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise MountError(f"cannot use mountpoint {mountpoint}: {exc.strerror}") from None
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False, capture_output=True)
        out.write(f"aiosfs: cleaned a dead mount at {mountpoint} (its daemon had stopped)\n")
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point: run 'aiosfs unmount {mountpoint}' first, or choose another directory")
    if not mountpoint.is_dir():
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if any(mountpoint.iterdir()):
        raise MountError(f"mountpoint {mountpoint} is not empty: mount on an empty directory")


def check_state(state: Path) -> None:
    try:
        state.mkdir(parents=True, exist_ok=True)
        state.chmod(0o700)  # neither tools (run as nobody) nor other users may read the databases or the audit log
        probe = state / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise MountError(f"cannot write the state directory {state}: {exc.strerror}; pass --state DIR with a writable directory") from None


def check_model(options: MountOptions) -> None:
    if options.backend == "llama" and not options.model.is_file():
        raise MountError(f"model file {options.model} not found: run scripts/setup (it installs the default model) or pass --model PATH")


def check_agents_dir(options: MountOptions) -> None:
    directory = options.agents_dir
    if directory is None:
        return
    if not directory.is_dir():
        raise MountError(f"agents directory {directory} is not a directory: create it with 'mkdir -p {directory}' or fix --agents-dir")
    if directory.resolve().is_relative_to(options.mountpoint.resolve()):
        # the daemon would read (and start commands in) its own mount, which it serves itself
        raise MountError(f"agents directory {directory} is inside the mountpoint {options.mountpoint}: keep the manifests outside the mount")


def check_tools_dir(options: MountOptions) -> None:
    if options.tools is not None and not options.tools.is_dir():
        raise MountError(f"tools directory {options.tools} is not a directory: create it with 'mkdir -p {options.tools}' or fix --tools")


def check_config(options: MountOptions) -> MountConfig:
    if options.config is None:
        return MountConfig()
    try:
        config = load_mount_config(options.config)
        for remote in config.remotes:
            load_api_key(remote)  # a missing key stops the mount now, not at the first request
        for server in config.mcp:
            server.request_headers()  # so does an MCP server's unusable key file (it is read again at each start)
    except (ConfigError, ValueError) as exc:
        raise MountError(f"{exc}; fix {options.config} or leave out --config") from None
    return config


def preflight(options: MountOptions, out: Any) -> None:
    check_fuse()
    check_mountpoint(options.mountpoint, out)
    check_state(options.state)
    check_model(options)
    check_agents_dir(options)
    check_tools_dir(options)
    check_config(options)
    check_metrics(options)


def check_metrics(options: MountOptions) -> None:
    if options.metrics is None:
        return
    try:
        check_address(options.metrics)
    except OSError as exc:
        raise MountError(_metrics_advice(options.metrics, exc)) from None


def start_metrics(options: MountOptions, ops: Operations) -> MetricsServer | None:
    if options.metrics is None:
        return None
    try:
        return MetricsServer(ops.metrics, options.metrics)
    except OSError as exc:
        raise MountError(_metrics_advice(options.metrics, exc)) from None


def _metrics_advice(address: str, exc: OSError) -> str:
    return f"cannot serve metrics on {address}: {exc.strerror or exc}; give --metrics another HOST:PORT, or leave it out"


def lock_state(state: Path) -> int:
    """Hold the state directory for this daemon; a second daemon gets a clear error."""
    fd = os.open(state / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        raise MountError(f"the state directory {state} is in use by another aiosfs (pid {holder}); pass --state DIR") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def kv_disk_bytes(options: MountOptions) -> int:
    """Bytes an engine's hibernated KV sequences may take: --kv-disk, or by default
    KV_DISK_SHARE of the state filesystem's free space, at most KV_DISK_MAX_BYTES."""
    if options.kv_disk is not None:
        return options.kv_disk * 2**20
    try:
        free = shutil.disk_usage(options.state).free
    except OSError:
        return 0
    return min(int(free * params.KV_DISK_SHARE), params.KV_DISK_MAX_BYTES)


def start_engine(spec: EngineSpec, options: MountOptions, progress: Callable[[float], None] | None = None) -> EngineProcess:
    """An engine process that has loaded its model and decoded once; EngineDied otherwise.
    Its agents' KV sequences hibernate in STATE/kv/NAME (kernel/cores/hibernate.py)."""
    engines = options.state / "engines"  # each engine's pid, for the next daemon if this one dies
    engines.mkdir(exist_ok=True)
    name = slug(Path(spec.name or "default"))
    spec = dataclasses.replace(spec, kv_dir=str(options.state / "kv" / name), kv_disk=kv_disk_bytes(options))
    core = EngineProcess(spec, options.engine_deadline, engines / f"{name}.pid")
    try:
        core.start(progress)
    except BaseException:
        core.close()
        raise
    return core


def load_engine(options: MountOptions, out: Any) -> EngineProcess:
    """The mount's default core, ready: `mount` reports ready only once the model has run."""
    spec = EngineSpec(
        kind="fake" if options.backend == "fake" else "llama",
        model=str(options.model),
        threads=options.threads or None,
        gpu_layers=options.gpu_layers,
        n_slots=options.slots,
        n_ctx_seq=options.ctx,
        kv_budget=options.kv_budget * 2**20,
        fake_delay=options.fake_delay,
    )
    progress = None
    if spec.kind == "llama":
        out.write(f"aiosfs: loading {options.model} ({options.model.stat().st_size / 1e6:.0f} MB) in the engine process\n")
        out.flush()
        progress = ProgressBar(out)
    try:
        core = start_engine(spec, options, progress)
    except EngineDied as exc:
        raise MountError(f"the engine process could not load and run the model: {exc.reason}.\n{_engine_advice(exc.reason, options)}") from None
    out.write(f"aiosfs: engine ready (pid {core.pid}): model loaded and warmed up\n")
    return core


def _engine_advice(reason: str, options: MountOptions) -> str:
    if "SIGILL" in reason:
        return (
            "What to do: llama-cpp-python was built for another CPU (an illegal instruction): run scripts/setup, "
            "which checks the build on this machine and rebuilds it without native tuning when it crashes."
        )
    if "killed by" in reason:
        return f"What to do: the model's native code crashed; check the model file ({options.model}) with another --model, and read {options.state / 'aiosfs.log'}."
    return f"What to do: check the model file ({options.model}) or pass another --model; the engine's output is in {options.state / 'aiosfs.log'}."


def load_local(options: MountOptions, model: LocalModel) -> EngineProcess:
    """A local model of the mount configuration in an engine process of its own, with the
    mount's values where it gives none."""
    log.info("loading model %s from %s", model.name, model.path)
    spec = EngineSpec(
        kind="llama",
        model=str(model.path),
        name=model.name,
        threads=model.threads or options.threads or None,
        gpu_layers=model.gpu_layers if model.gpu_layers is not None else options.gpu_layers,
        n_slots=model.slots or options.slots,
        n_ctx_seq=model.ctx or options.ctx,
        kv_budget=options.kv_budget * 2**20,
    )
    return start_engine(spec, options)


class ProgressBar:
    """A one-line progress bar for model loading, redrawn when it moves."""

    width = 30

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.drawn = -1

    def __call__(self, fraction: float) -> None:
        done = int(fraction * self.width)
        key = done if fraction < 1 else self.width + 1
        if key == self.drawn:
            return
        self.drawn = key
        self.stream.write(f"\r  loading model [{'#' * done}{'.' * (self.width - done)}] {fraction * 100:3.0f}%")
        if fraction >= 1:
            self.stream.write("\n")
        self.stream.flush()


def fuse_options(fsname: str) -> set[str]:
    opts = set(pyfuse3.default_options)  # includes default_permissions: the VFS enforces modes
    opts.add(f"fsname={fsname}")
    opts.add("subtype=aiosfs")
    opts.add("nodev")  # memory/ keeps device nodes (mknod) as data: opening one must reach no device
    if os.geteuid() == 0 or user_allow_other():
        opts.add("allow_other")  # every uid may use the mount; mode bits decide what
    return opts


def user_allow_other() -> bool:
    """Does /etc/fuse.conf let users other than root mount with allow_other?"""
    try:
        return "user_allow_other" in (line.strip() for line in Path("/etc/fuse.conf").read_text().splitlines())
    except OSError:
        return False


def serve(options: MountOptions, out: Any, ready: Callable[[str], None]) -> None:
    """Mount and serve until unmounted or signalled (blocks)."""
    preflight(options, out)
    lock = lock_state(options.state)
    for pid in end_leftover_engines(options.state / "engines"):
        log.warning("killed engine process %d, left running by a daemon of this state directory that died", pid)
    try:
        backend = load_engine(options, out)
    except BaseException:
        os.close(lock)
        raise
    storage = Storage(options.state / "aiosfs.db")
    memory = MemoryStore(options.state / "memory.db", quota=options.memory_quota)
    config = check_config(options)
    loaders = {m.name: (functools.partial(load_local, options, m), m.load) for m in config.locals}
    kernel = Kernel(
        storage, backend, memory=memory, tools_dir=options.tools, remotes=config.remotes, route=config.route, loaders=loaders, mcp_servers=config.mcp
    )
    manifests = ManifestManager(kernel, options.agents_dir, options.mountpoint, options.state) if options.agents_dir is not None else None
    ops = Operations(kernel)
    opts = fuse_options("aiosfs")
    pids = pid_file(options.mountpoint)  # before init: resolving the path stats the mountpoint
    os.chdir("/")  # never hold a directory busy, nor look things up in our own mount
    pyfuse3.init(ops, str(options.mountpoint), opts)
    metrics = None
    try:
        metrics = start_metrics(options, ops)
        pids.parent.mkdir(parents=True, exist_ok=True)
        pids.write_text(f"{os.getpid()}\n")
        info = backend.info
        ready(
            f"aiosfs: mounted {options.mountpoint}: model {info.name} ({info.backend}), device {info.device}, "
            f"threads {info.threads}, {info.n_slots} slots x {info.n_ctx_seq} tokens; state {options.state}"
            + ("" if "allow_other" in opts else "; only this user can use it (no allow_other)")
            + (f"; metrics at {metrics.url}" if metrics is not None else "")
        )
        trio.run(_main, kernel, ops, manifests, metrics)
    finally:
        if metrics is not None:
            metrics.close()
        pyfuse3.close(unmount=True)
        kernel.stop()
        kernel.close()
        memory.close()
        backend.close()
        pids.unlink(missing_ok=True)
        os.close(lock)


async def _main(kernel: Kernel, ops: Operations, manifests: ManifestManager | None, metrics: MetricsServer | None = None) -> None:
    if metrics is not None:
        metrics.token = trio.lowlevel.current_trio_token()  # scrapes are rendered on this thread from now on
    async with trio.open_nursery() as nursery:
        ops.nursery = nursery
        await nursery.start(kernel.run)
        if manifests is not None:  # userland: keeps the manifests' agents through the syscall table
            await nursery.start(manifests.run)  # its agents exist when the mount serves
        nursery.start_soon(_terminate_on_signal)
        try:
            await pyfuse3.main(min_tasks=1, max_tasks=params.FUSE_MAX_TASKS)
        finally:
            if manifests is not None:
                manifests.stop()  # and with it every agent process
            kernel.stop()
            nursery.cancel_scope.cancel()


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return


def unmount(mountpoint: Path, lazy: bool, out: Any, timeout: float = 30.0) -> None:
    """Unmount and wait for the daemon to finish writing its state; MountError when it
    is still running after `timeout` seconds."""
    import time

    if not os.path.ismount(mountpoint):
        try:
            os.stat(mountpoint)
            raise MountError(f"{mountpoint} is not mounted")
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise MountError(f"{mountpoint} is not mounted") from None
    try:  # before the unmount: a daemon that stops at once removes its pid file
        pid: int | None = int(pid_file(mountpoint).read_text())
    except (OSError, ValueError):
        pid = None
    args = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [str(mountpoint)]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        reason = result.stderr.strip()
        hint = "; close the shells and files using it, or use 'aiosfs unmount --lazy'" if "busy" in reason.lower() else ""
        raise MountError(f"could not unmount {mountpoint}: {reason}{hint}")
    if pid is None:
        return

    def running() -> bool:  # a zombie has stopped: the daemon is nobody's child, its reaper may be slow
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")

    deadline = time.monotonic() + timeout
    while running():
        if time.monotonic() > deadline:
            raise MountError(
                f"unmounted {mountpoint}, but its daemon (pid {pid}) is still running after {timeout:.0f} s and may not have saved "
                f"its state yet; wait for it, or see its aiosfs.log"
            )
        time.sleep(0.05)


def print_err(message: str) -> None:
    sys.stderr.write(message + "\n")
