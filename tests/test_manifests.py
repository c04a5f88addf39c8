"""Agent manifests and their processes, in-process: parsing and validation, the
manager applying manifests to a kernel with the fake backend, the watcher, and the
supervisor's restart, backoff and stop rules with tiny shell commands.

Timing: nothing here asserts how long something took; waits are polls with a
deadline, and the restart waits are made short through `params` so the order and
sizes of the backoff can be checked quickly.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from kernel_helpers import OWNER, ROOT, mkdir, remember, run, submit
from kernel_helpers import running as kernel_running

from kernel import params
from kernel.agents.config import parse_config
from kernel.cores.backends.fake import FakeBackend
from kernel.kernel import Kernel
from kernel.storage.database import Storage
from services.manifestfile import ManifestError, parse_manifest, scan
from services.manifests import ManifestManager
from services.supervisor import AgentProcess, ProcessSpec, Supervisor

ME = pwd.getpwuid(os.getuid())
WATCH_WINDOW = 2.0  # a change in the directory is applied within this long (the contract)
SLACK = 3.0  # scheduling slack on a loaded 2-core machine, on top of the window


def put(directory: Path, file: str, text: str) -> Path:
    """Write a manifest at once (temp file + rename), so the watcher never sees half of it."""
    path = directory / file
    tmp = directory / f".{file}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def manifest(name: str, owner: int | str = ME.pw_uid, **extra: str) -> str:
    """A manifest's TOML: name and owner, then `extra` lines as given (already TOML)."""
    lines = [f'name = "{name}"', f'owner = "{owner}"', *(f"{key} = {value}" for key, value in extra.items())]
    return "\n".join(lines) + "\n"


def audit(kernel: Kernel, event: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, kernel.audit) if e["event"] == event]


async def until(predicate: Any, timeout: float = 5.0) -> None:
    """Poll until `predicate()` holds; fail after `timeout`."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


# -- parsing -------------------------------------------------------------------------------
def test_a_full_manifest_parses(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    text = """
name = "summarizer"
owner = "65534"
group = "0"
mode = "0750"
config = { system = "You are terse.\\nVery.", temperature = 0, tools = ["clock", "calculator"], memory_recall = true }
permissions = "tools clock calculator\\nbudget_tokens 100000\\n"
command = ["bash", "agent.sh"]
workdir = "work"
restart = "always"
env = { LOG_LEVEL = "debug", RETRIES = 3 }
"""
    m = parse_manifest("s.toml", text.encode(), tmp_path)
    assert (m.name, m.uid, m.gid, m.mode, m.restart, m.file) == ("summarizer", 65534, 0, 0o750, "always", "s.toml")
    assert m.command == ("bash", "agent.sh") and m.workdir == tmp_path / "work"
    assert m.env == (("LOG_LEVEL", "debug"), ("RETRIES", "3"))
    assert m.permissions == "tools clock calculator\nbudget_tokens 100000\n"
    assert m.config is not None
    config = parse_config(m.config)
    assert config.system == "You are terse.\nVery." and config.temperature == 0
    assert config.tools == ("clock", "calculator") and config.memory_recall


def test_defaults_and_owner_by_name(tmp_path: Path) -> None:
    m = parse_manifest("a.toml", manifest("a", ME.pw_name).encode(), tmp_path)
    assert (m.uid, m.gid, m.home) == (ME.pw_uid, ME.pw_gid, ME.pw_dir or "/")
    assert (m.mode, m.restart, m.command, m.workdir, m.env) == (0o755, "on-failure", (), tmp_path, ())
    assert m.config is None and m.permissions is None  # left out: the agent's files are left alone


def _free_uid() -> int:
    uid = 54321
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('name = "a"\nowner = ', "not valid TOML"),
        ('name = "a"\nowner = "0"\ncolour = "red"\n', "unknown keys colour"),
        ('owner = "0"\n', "name missing"),
        ('name = "a/b"\nowner = "0"\n', "name:"),
        ('name = "a"\nowner = "no-such-user-here"\n', "no user named"),
        ('name = "a"\nowner = true\n', "owner:"),
        (f'name = "a"\nowner = "{_free_uid()}"\n', "give group"),
        ('name = "a"\nowner = "0"\ngroup = "no-such-group-here"\n', "no group named"),
        ('name = "a"\nowner = "0"\nmode = 750\n', "mode:"),
        ('name = "a"\nowner = "0"\nmode = "0999"\n', "mode:"),
        ('name = "a"\nowner = "0"\nconfig = { temperature = 5 }\n', "temperature"),
        ('name = "a"\nowner = "0"\nconfig = { colour = "red" }\n', "unknown key 'colour'"),
        ('name = "a"\nowner = "0"\nconfig = "temperature=0"\n', "not a table"),
        ('name = "a"\nowner = "0"\nconfig = { model = "gpt-9" }\n', "unknown model"),
        ('name = "a"\nowner = "0"\npermissions = "budget lots\\n"\n', "permissions:"),
        ('name = "a"\nowner = "0"\ncommand = "bash agent.sh"\n', "command:"),
        ('name = "a"\nowner = "0"\ncommand = []\n', "command:"),
        ('name = "a"\nowner = "0"\ncommand = ["bash", 1]\n', "command:"),
        ('name = "a"\nowner = "0"\nworkdir = "missing"\n', "is not a directory"),
        ('name = "a"\nowner = "0"\nrestart = "sometimes"\n', "restart:"),
        ('name = "a"\nowner = "0"\nenv = { AIOSFS_AGENT = "b" }\n', "set by the kernel"),
        ('name = "a"\nowner = "0"\nenv = { "A-B" = "x" }\n', "not a variable name"),
        ('name = "a"\nowner = "0"\nenv = { A = true }\n', "env: A"),
    ],
)
def test_bad_manifests_say_why(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest("a.toml", text.encode(), tmp_path, known_model=lambda name: name == "fake")
    assert words in str(info.value)


def test_size_and_encoding_limits(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="over"):
        parse_manifest("a.toml", b"#" * (params.MANIFEST_MAX_BYTES + 1), tmp_path)
    with pytest.raises(ManifestError, match="UTF-8"):
        parse_manifest("a.toml", b'name = "\xff"\n', tmp_path)


def test_scan_reads_toml_files_and_reports_only_changes(tmp_path: Path) -> None:
    put(tmp_path, "a.toml", manifest("a"))
    put(tmp_path, "b.toml", "nonsense = \n")
    (tmp_path / ".a.toml.swp").write_text("junk")
    (tmp_path / "notes.txt").write_text("junk")
    (tmp_path / "sub.toml").mkdir()
    first = scan(tmp_path, {})
    assert sorted(first) == ["a.toml", "b.toml"]
    assert first["a.toml"][1] is not None and getattr(first["a.toml"][1], "name", None) == "a"
    assert isinstance(first["b.toml"][1], str) and "TOML" in first["b.toml"][1]
    again = scan(tmp_path, {file: digest for file, (digest, _) in first.items()})
    assert again == {file: (digest, None) for file, (digest, _) in first.items()}  # unchanged: not parsed again


# -- the manager with a kernel ----------------------------------------------------------------
@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Kernel, Path]]:
    kernel = Kernel(Storage(tmp_path / "aiosfs.db"), FakeBackend(step_delay=0.01))
    directory = tmp_path / "manifests"
    directory.mkdir()
    _managers[id(kernel)] = ManifestManager(kernel, directory, tmp_path / "mnt", tmp_path / "state")
    yield kernel, directory
    del _managers[id(kernel)]
    kernel.close()
    kernel.memory.store.close()


_managers: dict[int, ManifestManager] = {}  # by id(kernel): the service runs beside the kernel, as the mount runs it


def manager(kernel: Kernel) -> ManifestManager:
    return _managers[id(kernel)]


@contextlib.asynccontextmanager
async def running(kernel: Kernel) -> AsyncIterator[Kernel]:
    """The kernel, and the manifest service started after it (as the mount starts it)."""
    async with kernel_running(kernel), trio.open_nursery() as nursery:
        await nursery.start(manager(kernel).run)
        try:
            yield kernel
        finally:
            manager(kernel).stop()


def test_create_update_remove(setup: tuple[Kernel, Path]) -> None:
    kernel, directory = setup

    async def body() -> None:
        put(directory, "w.toml", manifest("worker", 65534, mode='"0750"', config="{ temperature = 0.2 }", permissions='"budget_tokens 500\\n"'))
        async with running(kernel):
            agent = kernel.agents["worker"]  # applied before the kernel was ready
            assert (agent.row.uid, agent.row.gid, agent.row.mode) == (65534, pwd.getpwuid(65534).pw_gid, 0o750)
            assert agent.config.temperature == 0.2
            assert agent.policy.budget_tokens == 500 and agent.ceiling.budget_tokens == 500  # root's write: the ceiling
            put(directory, "w.toml", manifest("worker", 65534, mode='"0700"', config="{ temperature = 0.9 }", permissions='"budget_tokens 50\\n"'))
            await manager(kernel).rescan()
            assert kernel.agents["worker"] is agent
            assert (agent.row.mode, agent.config.temperature, agent.policy.budget_tokens) == (0o700, 0.9, 50)
            (directory / "w.toml").unlink()
            await manager(kernel).rescan()
            assert "worker" not in kernel.agents
            assert [row.trashed_name for row in kernel.agents.trash.values()] == ["worker"]

    run(body)
    actions = [(e["agent"], e["action"]) for e in audit(kernel, "manifest")]
    assert actions == [("worker", "create"), ("worker", "update"), ("worker", "remove")]
    assert [e["agent"] for e in audit(kernel, "rmdir")] == ["worker"]
    assert audit(kernel, "manifest_error") == []


def test_an_existing_agent_is_adopted(setup: tuple[Kernel, Path]) -> None:
    kernel, directory = setup

    async def body() -> None:
        async with running(kernel):
            agent = await mkdir(kernel, "old", OWNER)
            await remember(kernel, agent, "notes.md", "kept")
            put(directory, "old.toml", manifest("old", 65534, config="{ temperature = 0 }"))
            await manager(kernel).rescan()
            assert kernel.agents["old"] is agent  # the same agent, with its memory
            assert (agent.row.uid, agent.config.temperature) == (65534, 0)
            root = await kernel.memory.root(agent)
            attr = await kernel.memory.run(kernel.memory.store.getattr, root)
            assert attr.uid == 65534  # memory/ follows its new owner

    run(body)
    assert [e["action"] for e in audit(kernel, "manifest")] == ["adopt"]


def test_a_bad_manifest_is_reported_and_skipped(setup: tuple[Kernel, Path]) -> None:
    kernel, directory = setup

    async def body() -> None:
        put(directory, "good.toml", manifest("good", config="{ temperature = 0.3 }"))
        put(directory, "bad.toml", manifest("bad", command='"not a list"'))
        async with running(kernel):
            assert "good" in kernel.agents and "bad" not in kernel.agents
            errors = audit(kernel, "manifest_error")
            assert len(errors) == 1 and errors[0]["file"] == str(directory / "bad.toml") and "command" in errors[0]["message"]
            put(directory, "good.toml", manifest("good", config="{ temperature = 9 }"))  # an edit that is invalid
            await manager(kernel).rescan()
            await manager(kernel).rescan()  # unchanged since: not reported again
            assert kernel.agents["good"].config.temperature == 0.3  # the last valid manifest stays in force
            assert len(audit(kernel, "manifest_error")) == 2
            put(directory, "bad.toml", manifest("bad"))
            put(directory, "good.toml", manifest("good", config="{ temperature = 1 }"))
            await manager(kernel).rescan()
            assert "bad" in kernel.agents and kernel.agents["good"].config.temperature == 1

    run(body)


def test_a_change_the_kernel_refuses_is_reported_and_the_rest_applied(setup: tuple[Kernel, Path]) -> None:
    kernel, directory = setup

    async def body() -> None:
        put(directory, "c.toml", manifest("capped", mode='"0700"', permissions='"priority_max 2\\n"', config="{ priority = 5 }"))
        async with running(kernel):
            agent = kernel.agents["capped"]
            assert (agent.row.mode, agent.policy.priority_max, agent.config.priority) == (0o700, 2, 0)
            errors = audit(kernel, "manifest_error")
            assert len(errors) == 1 and "priority 5 is above the priority_max 2" in errors[0]["message"]

    run(body)


def test_two_manifests_for_one_agent(setup: tuple[Kernel, Path]) -> None:
    kernel, directory = setup

    async def body() -> None:
        put(directory, "a.toml", manifest("same", config="{ temperature = 0.1 }"))
        put(directory, "b.toml", manifest("same", config="{ temperature = 0.2 }"))
        async with running(kernel):
            assert kernel.agents["same"].config.temperature == 0.1  # the first file by name
            assert [e["file"] for e in audit(kernel, "manifest_error")] == [str(directory / "b.toml")]
            (directory / "a.toml").unlink()
            await manager(kernel).rescan()
            assert kernel.agents["same"].config.temperature == 0.2  # the other file takes over: no removal
            assert audit(kernel, "rmdir") == []

    run(body)


def test_a_renamed_manifest_keeps_its_agent(setup: tuple[Kernel, Path]) -> None:
    kernel, directory = setup

    async def body() -> None:
        put(directory, "a.toml", manifest("kept"))
        async with running(kernel):
            agent = kernel.agents["kept"]
            os.replace(directory / "a.toml", directory / "b.toml")
            await manager(kernel).rescan()
            assert kernel.agents["kept"] is agent

    run(body)
    assert audit(kernel, "rmdir") == []


def test_removal_cancels_running_jobs(setup: tuple[Kernel, Path]) -> None:
    kernel, directory = setup

    async def body() -> None:
        put(directory, "busy.toml", manifest("busy", 0))
        async with running(kernel):
            agent = kernel.agents["busy"]
            job = await submit(kernel, agent, "x" * 200, ROOT)  # 200 tokens at 10 ms each
            (directory / "busy.toml").unlink()
            await manager(kernel).rescan()
            assert "busy" not in kernel.agents and job.state.value == "cancelled"

    run(body)
    assert any(e.get("command") == "cancel all" for e in audit(kernel, "ctl"))


def test_the_watcher_applies_changes_by_itself(setup: tuple[Kernel, Path]) -> None:
    kernel, directory = setup

    async def body() -> None:
        async with running(kernel):
            deadline = WATCH_WINDOW + SLACK
            put(directory, "w.toml", manifest("watched", config="{ temperature = 0.4 }"))
            await until(lambda: "watched" in kernel.agents, deadline)
            # an editor that truncates, then writes in two steps, in place
            with open(directory / "w.toml", "w") as f:
                f.write(manifest("watched")[:10])
                f.flush()
                f.write(manifest("watched", config="{ temperature = 0.6 }")[10:])
            await until(lambda: kernel.agents["watched"].config.temperature == 0.6, deadline)
            (directory / "w.toml").unlink()
            await until(lambda: "watched" not in kernel.agents, deadline)

    run(body, timeout=30)


def test_processes_follow_their_manifest(setup: tuple[Kernel, Path], tmp_path: Path) -> None:
    kernel, directory = setup
    out = tmp_path / "out"
    env_line = f'echo "$AIOSFS_AGENT $AIOSFS_AGENT_DIR $AIOSFS_MOUNT $HOME $GREETING $(pwd)" >> {out}; exec sleep 1000'
    command = json.dumps(["bash", "-c", env_line])

    async def body() -> None:
        put(directory, "p.toml", manifest("proc", 0, command=command, env='{ GREETING = "hi" }', config="{ temperature = 0.1 }"))
        async with running(kernel):
            proc = manager(kernel).supervisor.processes["proc"]
            await until(lambda: out.exists() and out.read_text().count("\n") == 1 and proc.pid is not None)  # the child may write first
            assert out.read_text().split() == [
                "proc",
                str(tmp_path / "mnt" / "agents" / "proc"),
                str(tmp_path / "mnt"),
                pwd.getpwuid(0).pw_dir,
                "hi",
                str(directory),
            ]
            first = proc.pid
            assert first is not None and "state=running" in _ps(kernel) and f"proc proc pid={first} " in _ps(kernel)
            put(directory, "p.toml", manifest("proc", 0, command=command, env='{ GREETING = "hi" }', config="{ temperature = 0.5 }"))
            await manager(kernel).rescan()
            assert proc.pid == first and manager(kernel).supervisor.processes["proc"] is proc  # config only: not restarted
            put(directory, "p.toml", manifest("proc", 0, command=command, env='{ GREETING = "again" }'))
            await manager(kernel).rescan()
            restarted = manager(kernel).supervisor.processes["proc"]
            await until(lambda: out.read_text().count("\n") == 2 and restarted.pid is not None)
            assert restarted.pid not in (None, first) and out.read_text().split()[-2] == "again"
            assert proc.state == "stopped" and not _alive(first)
            (directory / "p.toml").unlink()
            await manager(kernel).rescan()
            assert restarted.state == "stopped" and "proc" not in manager(kernel).supervisor.processes
            assert "proc proc" not in _ps(kernel)

    run(body, timeout=30)
    assert [e["action"] for e in audit(kernel, "proc")].count("start") == 2


def test_processes_stop_with_the_kernel(setup: tuple[Kernel, Path]) -> None:
    kernel, directory = setup
    pids: list[int | None] = []

    async def body() -> None:
        put(directory, "p.toml", manifest("proc", 0, command='["sleep", "1000"]'))
        async with running(kernel):
            proc = manager(kernel).supervisor.processes["proc"]
            await until(lambda: proc.pid is not None)
            pids.append(proc.pid)

    run(body)
    assert pids[0] is not None and not _alive(pids[0])


def _ps(kernel: Kernel) -> str:
    from aiosfs.render import kernel_ps

    return kernel_ps(kernel, ROOT)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- the supervisor --------------------------------------------------------------------------------
@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short restart waits, so a test sees several restarts in well under a second."""
    monkeypatch.setattr(params, "AGENT_RESTART_MIN_SECONDS", 0.02)
    monkeypatch.setattr(params, "AGENT_RESTART_MAX_SECONDS", 0.08)
    monkeypatch.setattr(params, "AGENT_RESTART_RESET_SECONDS", 1000.0)
    monkeypatch.setattr(params, "AGENT_STOP_SECONDS", 0.3)


def spec(tmp_path: Path, script: str, restart: str = "on-failure") -> ProcessSpec:
    return ProcessSpec(("sh", "-c", script), tmp_path, (("PATH", os.defpath),), restart=restart)


async def supervised(tmp_path: Path, script: str, restart: str, until_done: Any) -> tuple[AgentProcess, list[dict[str, Any]]]:
    """Run one process under a supervisor until `until_done(proc)`, then stop it."""
    events: list[dict[str, Any]] = []
    supervisor = Supervisor(tmp_path / "logs", lambda kind, **fields: events.append({"event": kind, **fields}))
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        proc = supervisor.start("p", spec(tmp_path, script, restart))
        await until(lambda: until_done(proc))
        pid = proc.pid
        with trio.move_on_after(params.AGENT_STOP_SECONDS + SLACK) as waited:
            await supervisor.stop("p")
        if waited.cancelled_caught and pid is not None:
            os.killpg(pid, signal.SIGKILL)  # the stop is broken: end the process so that the test fails instead of hanging
            pytest.fail("stop() did not end the process")
        nursery.cancel_scope.cancel()
    return proc, events


def test_a_failing_command_restarts_with_a_doubling_wait(tmp_path: Path, quick: None) -> None:
    proc, events = run(lambda: supervised(tmp_path, "echo run >> runs; exit 1", "on-failure", lambda p: p.restarts >= 5))
    assert proc.delays[:5] == [0.02, 0.04, 0.08, 0.08, 0.08]  # doubles, up to the maximum
    assert (tmp_path / "runs").read_text().count("run") >= 5  # one run per restart, at least
    exits = [e for e in events if e["action"] == "exit"]
    assert [e["status"] for e in exits[:5]] == [1] * 5 and [e["restart_in"] for e in exits[:5]] == proc.delays[:5]
    assert "exited with status 1" in (tmp_path / "logs" / "p.log").read_text()


def test_the_wait_starts_over_after_a_long_run(tmp_path: Path, quick: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(params, "AGENT_RESTART_RESET_SECONDS", 0.1)
    proc, _ = run(lambda: supervised(tmp_path, "sleep 0.15; exit 1", "on-failure", lambda p: p.restarts >= 3))
    assert proc.delays[:3] == [0.02, 0.02, 0.02]


@pytest.mark.parametrize(("script", "restart", "restarts"), [("exit 1", "never", False), ("exit 0", "on-failure", False), ("exit 0", "always", True)])
def test_restart_policies(tmp_path: Path, quick: None, script: str, restart: str, restarts: bool) -> None:
    async def body() -> AgentProcess:
        proc, _ = await supervised(tmp_path, f"echo run >> runs; {script}", restart, lambda p: p.state == "exited" or p.restarts >= 2)
        return proc

    proc = run(body)
    runs = (tmp_path / "runs").read_text().count("run")
    if restarts:
        assert proc.restarts >= 2 and runs >= 2
    else:
        assert proc.state == "exited" and proc.restarts == 0 and runs == 1


def test_a_command_that_cannot_start_is_retried(tmp_path: Path, quick: None) -> None:
    async def body() -> tuple[AgentProcess, list[dict[str, Any]]]:
        events: list[dict[str, Any]] = []
        supervisor = Supervisor(tmp_path / "logs", lambda kind, **fields: events.append(fields))
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            proc = supervisor.start("p", ProcessSpec(("/no/such/program",), tmp_path, ()))
            await until(lambda: proc.restarts >= 2)
            nursery.cancel_scope.cancel()
        return proc, events

    proc, events = run(body)
    assert proc.state == "stopped"
    assert sum(e["action"] == "error" and "/no/such/program" in e["message"] for e in events) >= 2


def test_stop_sends_sigterm_then_sigkill(tmp_path: Path, quick: None) -> None:
    ready = tmp_path / "ready"
    stubborn = f"trap '' TERM; touch {ready}; while :; do sleep 0.05; done"
    proc, events = run(lambda: supervised(tmp_path, stubborn, "always", lambda p: ready.exists()))
    assert proc.returncode == -signal.SIGKILL and proc.state == "stopped" and proc.restarts == 0
    assert events[-1]["action"] == "stop" and events[-1]["status"] == -signal.SIGKILL
    ready.unlink()
    proc, _ = run(lambda: supervised(tmp_path, f"touch {ready}; sleep 1000", "always", lambda p: ready.exists()))
    assert proc.returncode == -signal.SIGTERM  # a process that obeys SIGTERM is not killed


def test_stop_reaches_the_whole_process_group(tmp_path: Path, quick: None) -> None:
    pidfile = tmp_path / "child"
    proc, _ = run(
        lambda: supervised(tmp_path, f"sleep 1000 & echo $! > {pidfile}; wait", "always", lambda p: pidfile.exists() and pidfile.read_text())
    )
    child = int(pidfile.read_text())
    run(lambda: until(lambda: not _alive(child) or _zombie(child)))  # a signalled process takes a moment to end


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False
