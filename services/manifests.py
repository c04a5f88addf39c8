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

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from kernel import Agent, Caller, Kernel, params
from kernel.errors import KernelError
from kernel.syscall import Sys, syscall

from .manifestfile import Manifest, Scanned, scan
from .supervisor import AgentProcess, ProcessSpec, Supervisor

log = logging.getLogger(__name__)

ROOT = Caller(0, 0)


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
        attr = await syscall(self.kernel, Sys.MEMORY_GETATTR, ROOT, root)
        if (attr.uid, attr.gid) == old:
            await syscall(self.kernel, Sys.MEMORY_SETATTR, ROOT, root, uid=agent.row.uid, gid=agent.row.gid)

    async def _remove(self, manifest: Manifest) -> None:
        """The manifest is gone: stop the process, cancel the jobs, trash the agent."""
        await self.supervisor.stop(manifest.name)
        agent = self.kernel.agents.get(manifest.name)
        if agent is not None:
            if agent.active:
                await syscall(self.kernel, Sys.AGENT_CTL, ROOT, agent, "cancel all")
                with trio.move_on_after(params.AGENT_STOP_SECONDS):  # a running job ends at the engine's next step
                    for job in list(agent.active):
                        await job.ended()
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
