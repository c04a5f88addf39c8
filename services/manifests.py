"""Agent manifests: `aiosfs mount --agents-dir DIR` keeps one agent per `DIR/*.toml`.

A manifest names an agent, its owner, mode, config and permissions, and optionally a
command to run for it under the supervisor (`supervisor.py`). The manager reads the
directory when the kernel starts and again whenever watchdog reports a change in it
(debounced, since editors write in several steps), and brings the kernel in line:
a new manifest creates its agent (or adopts an agent of that name that exists), an
edited one updates it, a removed one stops its process and moves the agent to the
trash. Changes go through the syscall table as root, so they are validated and
audited like the same change made through the mount; the permissions a manifest
gives are therefore root's ceiling for the agent.

A manifest that does not parse or is invalid is reported with a `manifest_error`
line in the audit log and skipped: the agent keeps what the file last said when it
was valid.
"""

from __future__ import annotations

import grp
import hashlib
import logging
import os
import pwd
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from kernel import VALIDATORS, Agent, Caller, Kernel, escape, params, parse_config, parse_policy
from kernel.errors import KernelError
from kernel.syscall import Sys, check_agent_name, syscall

from .supervisor import RESTART_POLICIES, AgentProcess, ProcessSpec, Supervisor

log = logging.getLogger(__name__)

ROOT = Caller(0, 0)
KEYS = ("name", "owner", "group", "mode", "config", "permissions", "command", "workdir", "restart", "env")
REQUIRED = ("name", "owner")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
KERNEL_ENV = ("AIOSFS_MOUNT", "AIOSFS_AGENT", "AIOSFS_AGENT_DIR")  # set by the kernel; a manifest may not
DEFAULT_MODE = 0o755


class ManifestError(Exception):
    """Why a manifest is skipped, worded for the administrator who wrote it."""


@dataclass(frozen=True)
class Manifest:
    """One agent manifest, validated."""

    name: str
    uid: int
    gid: int
    home: str = "/"  # the owner's home directory, the process's HOME
    mode: int = DEFAULT_MODE
    config: str | None = None  # `key=value` text; None leaves the agent's config as it is
    permissions: str | None = None  # None leaves the agent's policy as it is
    command: tuple[str, ...] = ()  # empty: no process
    workdir: Path = Path("/")
    restart: str = "on-failure"
    env: tuple[tuple[str, str], ...] = ()
    file: str = field(default="", compare=False)  # the file it was read from


# -- parsing -------------------------------------------------------------------------------
def parse_manifest(file: str, data: bytes, directory: Path, known_model: Callable[[str], bool] | None = None) -> Manifest:
    """A manifest file's bytes as a Manifest; ManifestError says what is wrong."""
    if len(data) > params.MANIFEST_MAX_BYTES:
        raise ManifestError(f"the file is over {params.MANIFEST_MAX_BYTES} bytes")
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ManifestError(f"not valid UTF-8 (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"not valid TOML: {exc}") from None
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise ManifestError(f"unknown keys {', '.join(unknown)} (known: {', '.join(KEYS)})")
    missing = [key for key in REQUIRED if key not in table]
    if missing:
        raise ManifestError(f"{' and '.join(missing)} missing (required: {', '.join(REQUIRED)})")
    uid, gid, home = _owner(table["owner"])
    if "group" in table:
        gid = _group(table["group"])
    if gid is None:
        raise ManifestError(f"owner: uid {uid} has no passwd entry, so it has no primary group: give group")
    return Manifest(
        name=_name(table["name"]),
        uid=uid,
        gid=gid,
        home=home,
        mode=_mode(table.get("mode", f"{DEFAULT_MODE:o}")),
        config=_config(table["config"], known_model) if "config" in table else None,
        permissions=_permissions(table["permissions"]) if "permissions" in table else None,
        command=_command(table["command"]) if "command" in table else (),
        workdir=_workdir(table.get("workdir", "."), directory),
        restart=_restart(table.get("restart", "on-failure")),
        env=_env(table.get("env", {})),
        file=file,
    )


def _name(value: Any) -> str:
    if not isinstance(value, str):
        raise ManifestError(f"name: {value!r} is not a string")
    try:
        check_agent_name(value)
    except KernelError as exc:
        raise ManifestError(f"name: {exc.message}") from None
    return value


def _id_number(value: Any, what: str) -> int | None:
    """A uid/gid given as a number (or a string of digits); None for a name."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ManifestError(f"{what}: {value!r} is neither a number nor a name")
    if isinstance(value, str) and not value.isdigit():
        return None
    number = int(value)
    if not 0 <= number < 2**32 - 1:  # (uid_t)-1 means "no change" to the system calls
        raise ManifestError(f"{what}: {number} is not a valid id")
    return number


def _owner(value: Any) -> tuple[int, int | None, str]:
    """The owner's uid, primary gid (None when the uid has no passwd entry) and home."""
    uid = _id_number(value, "owner")
    try:
        entry = pwd.getpwuid(uid) if uid is not None else pwd.getpwnam(value)
    except KeyError:
        if uid is None:
            raise ManifestError(f"owner: no user named {value!r}") from None
        return uid, None, "/"
    return entry.pw_uid, entry.pw_gid, entry.pw_dir or "/"


def _group(value: Any) -> int:
    gid = _id_number(value, "group")
    if gid is not None:
        return gid
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise ManifestError(f"group: no group named {value!r}") from None


def _mode(value: Any) -> int:
    # A string only: a TOML integer 750 would silently be decimal.
    if not isinstance(value, str) or not re.fullmatch(r"[0-7]{1,4}", value):
        raise ManifestError(f'mode: {value!r} is not octal digits in a string, e.g. "0750"')
    return int(value, 8)


def _config(value: Any, known_model: Callable[[str], bool] | None) -> str:
    """The config table as the text of a `config` file, checked by the kernel's parser."""
    if not isinstance(value, dict):
        raise ManifestError(f"config: {value!r} is not a table, e.g. config = {{ temperature = 0 }}")
    lines = []
    for key, item in value.items():
        if key not in VALIDATORS:
            raise ManifestError(f"config: unknown key {key!r} (known: {', '.join(VALIDATORS)})")
        lines.append(f"{key}={_config_value(key, item)}\n")
    text = "".join(lines)
    try:
        parse_config(text, known_model)
    except KernelError as exc:
        raise ManifestError(f"config: {exc.message}") from None
    return text


def _config_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return " ".join(value)
    raise ManifestError(f"config: {key}: {value!r} is not a string, a number, a boolean or a list of strings")


def _permissions(value: Any) -> str:
    if not isinstance(value, str):
        raise ManifestError(f"permissions: {value!r} is not a string of `key value` lines")
    try:
        parse_policy(value)
    except KernelError as exc:
        raise ManifestError(f"permissions: {exc.message}") from None
    return value


def _command(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(arg, str) and arg and "\0" not in arg for arg in value):
        raise ManifestError(f'command: {value!r} is not a list of non-empty strings, e.g. ["bash", "agent.sh"]')
    return tuple(value)


def _workdir(value: Any, directory: Path) -> Path:
    if not isinstance(value, str):
        raise ManifestError(f"workdir: {value!r} is not a string")
    path = Path(os.path.normpath(directory / value))
    if not path.is_dir():
        raise ManifestError(f"workdir: {path} is not a directory")
    return path


def _restart(value: Any) -> str:
    if value not in RESTART_POLICIES:
        raise ManifestError(f"restart: {value!r} is not one of {', '.join(RESTART_POLICIES)}")
    return str(value)


def _env(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ManifestError(f'env: {value!r} is not a table, e.g. env = {{ LOG_LEVEL = "debug" }}')
    pairs = []
    for key, item in value.items():
        if not ENV_NAME.match(key):
            raise ManifestError(f"env: {key!r} is not a variable name")
        if key in KERNEL_ENV:
            raise ManifestError(f"env: {key} is set by the kernel")
        if isinstance(item, bool) or not isinstance(item, str | int | float) or "\0" in str(item):
            raise ManifestError(f"env: {key}: {item!r} is not a string or a number")
        pairs.append((key, str(item)))
    return tuple(sorted(pairs))


# -- reading the directory ---------------------------------------------------------------------
Scanned = dict[str, tuple[str, "Manifest | str | None"]]


def scan(directory: Path, digests: dict[str, str], known_model: Callable[[str], bool] | None = None) -> Scanned:
    """Every manifest file in `directory` (`*.toml`, not hidden): its digest and, when it
    differs from `digests`, the manifest or why it is invalid (None: unchanged).
    Raises OSError when the directory cannot be read. Runs in a worker thread."""
    found: Scanned = {}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.name.endswith(".toml"):
            continue  # editors' swap, backup and lock files
        try:
            if not entry.is_file():
                continue
            with open(entry.path, "rb") as f:
                data = f.read(params.MANIFEST_MAX_BYTES + 1)
        except OSError as exc:
            found[entry.name] = (f"error:{exc.errno}", f"cannot read it: {exc.strerror}")
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digests.get(entry.name) == digest:
            found[entry.name] = (digest, None)
            continue
        try:
            found[entry.name] = (digest, parse_manifest(entry.name, data, directory, known_model))
        except ManifestError as exc:
            found[entry.name] = (digest, str(exc))
    return found


@dataclass
class _Source:
    """A manifest file as last read."""

    digest: str
    manifest: Manifest | None  # its last valid content (kept while the file is invalid)


# -- the manager -------------------------------------------------------------------------------
class ManifestManager:
    """Keeps the agents of the manifests in DIR, and their processes, in line with the files."""

    def __init__(self, kernel: Kernel, directory: Path, mountpoint: Path, state: Path) -> None:
        self.kernel = kernel
        self.directory = Path(directory)
        self.mountpoint = Path(mountpoint)
        self.supervisor = Supervisor(Path(state) / "agents-logs", kernel.log_event)
        self._sources: dict[str, _Source] = {}  # by file name
        self._applied: dict[str, Manifest] = {}  # by agent name: what the kernel was last brought to
        self._scope = trio.CancelScope()
        self._changed = trio.Event()
        self._pokes = 0  # changes reported by the watcher, for the debounce
        self._lock = trio.Lock()  # one rescan at a time
        self._dir_error = ""  # the last reason the directory could not be read (reported once)
        self._warned: set[int] = set()  # owners the daemon cannot switch to, reported once each

    # -- running ---------------------------------------------------------------------------
    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Apply every manifest, then follow the directory until stop(); the processes end with it."""
        self.kernel.ps_providers.append(self.ps_lines)
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.supervisor.run)
                    await self.rescan()
                    task_status.started()
                    await self._watch()
        finally:
            self.kernel.ps_providers.remove(self.ps_lines)

    def stop(self) -> None:
        self._scope.cancel()

    def processes(self) -> list[AgentProcess]:
        return sorted(self.supervisor.processes.values(), key=lambda p: p.name)

    def ps_lines(self) -> list[str]:
        """kernel/ps's lines for the agent processes."""
        return [f"proc {p.name} pid={p.pid or '-'} state={p.state} restarts={p.restarts}" for p in self.processes()]

    def poke(self) -> None:
        """Something changed in the directory (on the trio thread)."""
        self._pokes += 1
        self._changed.set()

    async def _watch(self) -> None:
        observer = self._start_observer()
        try:
            while True:
                with trio.move_on_after(params.MANIFEST_RESCAN_SECONDS):  # also catches what the watcher missed
                    await self._changed.wait()
                await self._settle()
                self._changed = trio.Event()  # before the rescan: a change during it triggers another one
                await self.rescan()
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=params.AGENT_STOP_SECONDS)

    async def _settle(self) -> None:
        """Wait until no change came for MANIFEST_DEBOUNCE_SECONDS (an editor's write is
        often several events), but no longer than MANIFEST_SETTLE_MAX_SECONDS."""
        deadline = trio.current_time() + params.MANIFEST_SETTLE_MAX_SECONDS
        while True:
            seen = self._pokes
            await trio.sleep(params.MANIFEST_DEBOUNCE_SECONDS)
            if self._pokes == seen or trio.current_time() >= deadline:
                return

    def _start_observer(self) -> Any:
        observer = Observer()
        observer.daemon = True
        try:
            observer.schedule(_Poke(trio.lowlevel.current_trio_token(), self.poke), str(self.directory), recursive=False)
            observer.start()
        except OSError as exc:
            self._error(str(self.directory), f"cannot watch the directory ({exc}); it is read every {params.MANIFEST_RESCAN_SECONDS:g} s instead")
            return None
        return observer

    # -- rescanning ------------------------------------------------------------------------
    async def rescan(self) -> None:
        """Read the directory and apply what changed since the last time."""
        async with self._lock:
            digests = {file: source.digest for file, source in self._sources.items()}
            try:
                found = await trio.to_thread.run_sync(scan, self.directory, digests, self.kernel.cores.known)
            except OSError as exc:
                message = f"cannot read the directory: {exc.strerror}; its agents are left as they are"
                if message != self._dir_error:
                    self._dir_error = message
                    self._error(str(self.directory), message)
                return
            self._dir_error = ""
            reread = self._update_sources(found)
            await self._converge(self._desired(reread))

    def _update_sources(self, found: Scanned) -> set[str]:
        """Record what the scan found; return the files read again (new or changed)."""
        reread = set()
        for file, (digest, result) in found.items():
            if result is None:
                continue
            reread.add(file)
            previous = self._sources.get(file)
            if isinstance(result, Manifest):
                self._sources[file] = _Source(digest, result)
            else:
                self._error(file, result)
                self._sources[file] = _Source(digest, previous.manifest if previous else None)
        for file in set(self._sources) - set(found):
            del self._sources[file]
        return reread

    def _desired(self, reread: set[str]) -> dict[str, Manifest]:
        """The manifest in force for each agent; of two files naming one agent, the first by name wins."""
        desired: dict[str, Manifest] = {}
        for file in sorted(self._sources):
            manifest = self._sources[file].manifest
            if manifest is None:
                continue
            if manifest.name in desired:
                if file in reread:
                    self._error(file, f"agent {manifest.name!r} is already defined by {desired[manifest.name].file}; this file is skipped")
                continue
            desired[manifest.name] = manifest
        return desired

    async def _converge(self, desired: dict[str, Manifest]) -> None:
        for name in [name for name in self._applied if name not in desired]:
            await self._guarded(self._remove, self._applied.pop(name))
        for name, manifest in desired.items():
            previous = self._applied.get(name)
            self._applied[name] = manifest  # even if the kernel refuses part of it: reported once, not at every rescan
            if previous != manifest:  # (a renamed file compares equal: only its file name is new)
                await self._guarded(self._apply, manifest, previous)

    async def _guarded(self, step: Callable[..., Any], manifest: Manifest, *args: Any) -> None:
        """One agent's change; what goes wrong is reported and the others go on."""
        try:
            await step(manifest, *args)
        except KernelError as exc:
            self._error(manifest.file, exc.message)
        except Exception as exc:
            log.exception("applying the manifest %s failed", manifest.file)
            self._error(manifest.file, f"could not be applied: {exc!r}")

    def _error(self, file: str, message: str) -> None:
        path = file if os.path.isabs(file) else str(self.directory / file)
        log.warning("manifest %s: %s", path, message)
        self.kernel.log_event("manifest_error", file=path, message=message)

    # -- applying ---------------------------------------------------------------------------
    async def _apply(self, manifest: Manifest, previous: Manifest | None) -> None:
        """Create, adopt or update the agent of a manifest, then its process."""
        agent = self.kernel.agents.get(manifest.name)
        created = agent is None
        if agent is None:
            agent = await syscall(self.kernel, Sys.AGENT_CREATE, ROOT, manifest.name, manifest.mode)
            action = "create"
        else:
            action = "adopt" if previous is None else "update"
        try:  # all of it, every time: the manifest is the administrator's word (and a refused part gets another try)
            await self._set_attrs(agent, manifest, chown_memory=not created)
            if manifest.permissions is not None:  # first: the config is checked against this policy
                await syscall(self.kernel, Sys.PERMISSIONS_WRITE, ROOT, agent, manifest.permissions)
            if manifest.config is not None:
                await syscall(self.kernel, Sys.CONFIG_WRITE, ROOT, agent, manifest.config)
        except KernelError as exc:  # reported; the agent exists, so the rest (its process) still applies
            self._error(manifest.file, exc.message)
        self.kernel.log_event("manifest", file=str(self.directory / manifest.file), agent=manifest.name, action=action, uid=manifest.uid)
        await self._sync_process(manifest)

    async def _set_attrs(self, agent: Agent, manifest: Manifest, chown_memory: bool) -> None:
        """Owner, group and mode, as chown/chmod of the agent directory would set them."""
        old = (agent.row.uid, agent.row.gid)
        wanted = {"uid": manifest.uid, "gid": manifest.gid, "mode": manifest.mode}
        changes = {key: value for key, value in wanted.items() if getattr(agent.row, key) != value}
        if not changes:
            return
        await syscall(self.kernel, Sys.AGENT_SETATTR, ROOT, agent, **changes)
        if chown_memory and old != (manifest.uid, manifest.gid):
            await self._chown_memory(agent, old)

    async def _chown_memory(self, agent: Agent, old: tuple[int, int]) -> None:
        """memory/ itself follows a new owner when it still had the old one (the files in it keep theirs)."""
        root = await self.kernel.memory.root(agent)
        attr = await syscall(self.kernel, Sys.MEMORY, ROOT, "getattr", root)
        if (attr.uid, attr.gid) == old:
            await syscall(self.kernel, Sys.MEMORY, ROOT, "setattr", root, uid=agent.row.uid, gid=agent.row.gid)

    async def _remove(self, manifest: Manifest) -> None:
        """The manifest is gone: stop the process, cancel the jobs, trash the agent."""
        await self.supervisor.stop(manifest.name)
        agent = self.kernel.agents.get(manifest.name)
        if agent is not None:
            if agent.active:
                await syscall(self.kernel, Sys.AGENT_CTL, ROOT, agent, "cancel all")
                with trio.move_on_after(params.AGENT_STOP_SECONDS):  # a running job ends at the engine's next step
                    while agent.active:
                        await trio.sleep(0.05)
            await syscall(self.kernel, Sys.AGENT_REMOVE, ROOT, manifest.name)
        self.kernel.log_event("manifest", file=str(self.directory / manifest.file), agent=manifest.name, action="remove")

    # -- processes ---------------------------------------------------------------------------
    async def _sync_process(self, manifest: Manifest) -> None:
        """Start, restart or stop the agent's process to match the manifest."""
        current = self.supervisor.get(manifest.name)
        spec = self._spec(manifest) if manifest.command else None
        if current is not None and spec is not None and current.spec.launch() == spec.launch():
            current.spec = spec  # only the restart policy changed: it applies from the next exit
            return
        if current is not None:
            await self.supervisor.stop(manifest.name)
        if spec is not None:
            self.supervisor.start(manifest.name, spec)

    def _spec(self, manifest: Manifest) -> ProcessSpec:
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": manifest.home, "LANG": os.environ.get("LANG", "C.UTF-8")}
        env.update(manifest.env)
        env.update(AIOSFS_MOUNT=str(self.mountpoint), AIOSFS_AGENT=manifest.name, AIOSFS_AGENT_DIR=str(self.mountpoint / "agents" / manifest.name))
        uid: int | None = manifest.uid
        gid: int | None = manifest.gid
        if os.geteuid() != 0:  # only root can switch users: run as ourselves, and say so
            if manifest.uid != os.geteuid() and manifest.uid not in self._warned:
                self._warned.add(manifest.uid)
                message = f"the daemon is not root: the command runs as uid {os.geteuid()}, not as the owner {manifest.uid}"
                log.warning("manifest %s: %s", manifest.file, message)
                self.kernel.log_event("manifest_warning", file=str(self.directory / manifest.file), message=message)
            uid = gid = None
        return ProcessSpec(manifest.command, manifest.workdir, tuple(sorted(env.items())), uid, gid, manifest.restart)


class _Poke(FileSystemEventHandler):
    """watchdog's handler (in its thread): tell the trio thread that the directory changed."""

    IGNORED = frozenset({"opened", "closed_no_write"})  # our own reads of the manifests

    def __init__(self, token: trio.lowlevel.TrioToken, poke: Callable[[], None]) -> None:
        super().__init__()
        self.token = token
        self.poke = poke

    def dispatch(self, event: FileSystemEvent) -> None:
        if event.event_type in self.IGNORED:
            return
        try:
            self.token.run_sync_soon(self.poke)
        except trio.RunFinishedError:
            pass  # the kernel has stopped
