"""Agent manifests on a real mount: `aiosfs mount --agents-dir DIR` with the fake backend.

The contract is that a change in DIR is applied within 2 seconds; the polls below
allow that window plus a few seconds of scheduling slack, because the test machine
is small and may be busy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from mounting import Mount, aiosfs, mounted, needs_fuse, wait_for

pytestmark = [needs_fuse, pytest.mark.mount]

WATCH_WINDOW = 2.0  # the contract: add, edit and remove are applied within this long
SLACK = 3.0  # scheduling slack on a loaded machine, on top of the window
NOBODY = 65534

AGENT_SCRIPT = 'echo hi > "$AIOSFS_AGENT_DIR/prompt"; cat "$AIOSFS_AGENT_DIR/output" > "$AIOSFS_AGENT_DIR/memory/out.txt"; exec sleep 1000'


def put(directory: Path, file: str, text: str) -> None:
    """Write a manifest the way a careful tool does: a temp file renamed into place."""
    tmp = directory / f".{file}.tmp"
    tmp.write_text(text)
    os.replace(tmp, directory / file)


def manifest(name: str, temperature: float, command: str = AGENT_SCRIPT) -> str:
    return (
        f'name = "{name}"\nowner = "{NOBODY}"\nmode = "0750"\n'
        f"config = {{ temperature = {temperature} }}\n"
        f"command = {json.dumps(['bash', '-c', command])}\n"
    )


def within_window(predicate: object) -> None:
    wait_for(predicate, timeout=WATCH_WINDOW + SLACK)


def proc_line(mount: Mount, name: str) -> dict[str, str]:
    """The `proc NAME ...` line of kernel/ps as a dict ({} when there is none)."""
    for line in (mount.root / "kernel" / "ps").read_text().splitlines():
        words = line.split()
        if words[:2] == ["proc", name]:
            return dict(word.split("=", 1) for word in words[2:])
    return {}


def running_pid(mount: Mount, name: str) -> int | None:
    line = proc_line(mount, name)
    return int(line["pid"]) if line.get("state") == "running" else None


def uids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(n) for n in line.split()[1:]]
    raise AssertionError("no Uid line")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def log_events(mount: Mount, event: str) -> list[dict[str, object]]:
    lines = (mount.root / "kernel" / "log").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == event]


def test_manifests_create_update_and_remove_agents(tmp_path: Path) -> None:
    directory = tmp_path / "manifests"
    directory.mkdir()
    with mounted(tmp_path, "--backend", "fake", "--agents-dir", str(directory)) as mount:
        agent = mount.agents / "helper"
        put(directory, "helper.toml", manifest("helper", 0.3))
        within_window(agent.exists)
        assert (os.stat(agent).st_uid, os.stat(agent).st_mode & 0o7777) == (NOBODY, 0o750)
        wait_for(lambda: running_pid(mount, "helper") is not None)
        pid = running_pid(mount, "helper")
        assert pid is not None and uids(pid) == [NOBODY] * 4  # real, effective, saved and fs uid
        assert proc_line(mount, "helper")["restarts"] == "0"
        wait_for(lambda: (agent / "memory" / "out.txt").exists() and (agent / "memory" / "out.txt").read_text() == "turn 1: HI\n")
        assert os.stat(agent / "memory" / "out.txt").st_uid == NOBODY

        put(directory, "helper.toml", manifest("helper", 1.5))
        within_window(lambda: "temperature=1.5" in (agent / "config").read_text())
        assert running_pid(mount, "helper") == pid  # a config edit does not restart the process

        (directory / "broken.toml").write_text('name = "broken"\nowner = [\n')
        within_window(lambda: any(e["file"] == str(directory / "broken.toml") for e in log_events(mount, "manifest_error")))
        assert not (mount.agents / "broken").exists()
        assert running_pid(mount, "helper") == pid and alive(pid)  # the good one keeps working
        put(directory, "helper.toml", manifest("helper", 0.5))
        within_window(lambda: "temperature=0.5" in (agent / "config").read_text())  # and the watcher goes on

        (directory / "helper.toml").unlink()
        within_window(lambda: not agent.exists() and not alive(pid))
        trash = (mount.root / "kernel" / "trash").read_text().splitlines()[1:]
        assert [line.split()[:3] for line in trash] == [["helper", trash[0].split()[1], str(NOBODY)]]
        assert proc_line(mount, "helper") == {}
        actions = [e["action"] for e in log_events(mount, "manifest") if e["agent"] == "helper"]
        assert actions == ["create", "update", "update", "remove"]
        assert (mount.state / "agents-logs" / "helper.log").exists()


def test_manifests_apply_at_mount_and_processes_end_at_unmount(tmp_path: Path) -> None:
    directory = tmp_path / "manifests"
    directory.mkdir()
    put(directory, "early.toml", manifest("early", 0.2, command="exec sleep 1000"))
    with mounted(tmp_path, "--backend", "fake", "--agents-dir", str(directory)) as mount:
        agent = mount.agents / "early"
        assert agent.exists() and "temperature=0.2" in (agent / "config").read_text()  # there when the mount is ready
        wait_for(lambda: running_pid(mount, "early") is not None)
        pid = running_pid(mount, "early")
        assert pid is not None
    wait_for(lambda: not alive(pid))  # the unmount stopped it
    with mounted(tmp_path, "--backend", "fake", "--agents-dir", str(directory)) as mount:
        assert os.listdir(mount.agents) == ["early"]  # the same agent, adopted by its manifest again
        wait_for(lambda: running_pid(mount, "early") is not None)
        assert [e["action"] for e in log_events(mount, "manifest")] == ["create", "adopt"]  # the log outlives mounts


def test_agents_dir_errors_say_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "mp").mkdir()
    missing = aiosfs("mount", str(tmp_path / "mp"), "--backend", "fake", "--state", str(tmp_path / "s"), "--agents-dir", str(tmp_path / "none"))
    assert missing.returncode == 1 and "mkdir -p" in missing.stderr
    inside = aiosfs("mount", str(tmp_path / "mp"), "--backend", "fake", "--state", str(tmp_path / "s"), "--agents-dir", str(tmp_path / "mp"))
    assert inside.returncode == 1 and "inside the mountpoint" in inside.stderr
    help_text = aiosfs("mount", "--help").stdout
    assert "--agents-dir" in help_text
