"""A hung engine is not a dead one: real mounts whose engine process is stopped with
SIGSTOP (as a stuck GPU driver would leave it), at every point where the daemon waits on
it. The watchdog must find it, kill it and start another; no user's process may wait
on it without a bound; unmount must end it.

The mounts run the fake model with a short deadline (`--engine-deadline`), so the
waits are short; what is asserted is behaviour at the files and processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from mounting import Mount, aiosfs, alive, blocked_reading, engine_pids, gone, listed, mounted, needs_fuse, sh, troubles, wait_for

from aiosfs.cli import CLEAN_EXIT
from kernel.cores.enginechild import CRASH_ENV

pytestmark = [needs_fuse, pytest.mark.mount]

DEADLINE = 2.0  # the watchdog's floor in these mounts; the fake model's steps are far shorter
HUNG = r"engine fake \(pid \d+\) hung: no progress for [\d.]+ s \(.*\); killing it|engine of fake hung: the engine hung: "
LONG = '{"prompt": "go", "max_tokens": 4000, "ignore_eos": true}'  # about 40 s at the fake model's 0.01 s a step


def status(mount: Mount) -> str:
    return (mount.root / "kernel" / "status").read_text()


def engine_pid(mount: Mount) -> int:
    match = re.search(r"engine=ready pid=(\d+)", status(mount))
    assert match, status(mount)
    return int(match.group(1))


def hangs(mount: Mount) -> int:
    return int(re.search(r"hangs=(\d+)", status(mount)).group(1))  # type: ignore[union-attr]


def engine_events(mount: Mount) -> list[dict]:
    lines = (mount.state / "audit.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "engine"]


def replaced(mount: Mount, old: int) -> bool:
    """Is a new engine serving, the stopped one gone?"""
    match = re.search(r"engine=ready pid=(\d+)", status(mount))
    return match is not None and int(match.group(1)) != old and not alive(old)


def generating(mount: Mount) -> bool:
    """Has a running job given out tokens? (kernel/ps: the state is column 4, tokens column 7)"""
    rows = [line.split() for line in (mount.root / "kernel" / "ps").read_text().splitlines()[1:] if not line.startswith("proc ")]
    return any(row[3] == "running" and int(row[6]) > 0 for row in rows)


def write_prompt(agent: Path, text: str) -> subprocess.CompletedProcess[str]:
    """Write a prompt from a program that sees close()'s error (bash ignores it): the
    request is queued when close() returns."""
    script = f"with open({str(agent / 'prompt')!r}, 'w') as f: f.write({text!r})"
    return subprocess.run(["python3", "-c", script], capture_output=True, text=True, timeout=60)


def hang_mount(tmp_path: Path, *args: str) -> AbstractContextManager[Mount]:
    return mounted(tmp_path, "--backend", "fake", "--fake-delay", "0.01", "--engine-deadline", str(DEADLINE), *args)


def test_sigstop_during_generation_fails_the_job_with_the_hang_and_the_queue_runs_on(tmp_path: Path) -> None:
    with hang_mount(tmp_path, "--slots", "1") as mount:
        mount.allow_log(HUNG)
        running, queued = mount.agent("running"), mount.agent("queued")
        (running / "prompt").write_text(LONG)
        wait_for(lambda: generating(mount), what="the long job generating")
        (queued / "prompt").write_text("after the hang")  # waits for the one slot
        stopped = engine_pid(mount)
        os.kill(stopped, signal.SIGSTOP)
        started = time.monotonic()
        out = sh(f"cat {running}/output")
        waited = time.monotonic() - started
        assert out.returncode != 0 and "Input/output error" in out.stderr, out
        assert out.stdout, "the partial answer comes first"
        assert waited < 10 * DEADLINE, f"the reader waited {waited:.1f} s on a stopped engine"
        error = (running / "error").read_text()
        assert error.startswith("EIO ") and "the engine hung: no progress for" in error and "(a step)" in error, error
        assert (running / "status").read_text().startswith("error")
        seen = status(mount)
        assert f"pid={stopped}" not in seen, f"kernel/status still names the stopped engine: {seen}"
        assert re.search(r"engine=(hung|restarting|ready) ", seen) and "hangs=1" in seen, seen
        # the queued job was never in the engine: it runs on the next one
        answered = sh(f"cat {queued}/output", timeout=60)
        assert answered.returncode == 0 and answered.stdout == "turn 1: AFTER THE HANG\n", answered
        assert not alive(stopped)
        with pytest.raises(ProcessLookupError):  # killed and reaped: nothing of it can answer late
            os.kill(stopped, signal.SIGCONT)
        assert "restarts=1" in status(mount) and "last_crash: the engine hung" in status(mount)
    events = engine_events(mount)
    assert [e["what"] for e in events] == ["hung", "restarted"], events
    assert len(events[0]["jobs"]) == 1 and "no progress for" in events[0]["reason"]


def test_sigstop_while_idle_is_found_without_anyone_waiting(tmp_path: Path) -> None:
    with hang_mount(tmp_path) as mount:
        mount.allow_log(HUNG)
        agent = mount.agent("a")
        stopped = engine_pid(mount)
        os.kill(stopped, signal.SIGSTOP)
        wait_for(lambda: replaced(mount, stopped), timeout=15 * DEADLINE, what="the idle stopped engine replaced")
        assert hangs(mount) == 1 and "(an idle look)" in status(mount)
        answered = sh(f"echo hello > {agent}/prompt && cat {agent}/output", timeout=60)
        assert answered.returncode == 0 and answered.stdout == "turn 1: HELLO\n", answered
        assert not (agent / "error").read_text()  # nobody's job was lost to it
    assert [e["what"] for e in engine_events(mount)] == ["hung", "restarted"]


def test_a_prompt_written_to_a_stopped_engine_returns_within_the_deadline(tmp_path: Path) -> None:
    with hang_mount(tmp_path, "--engine-deadline", "4") as mount:  # longer than the idle look's first chance
        mount.allow_log(HUNG)
        agent = mount.agent("a")
        stopped = engine_pid(mount)
        os.kill(stopped, signal.SIGSTOP)
        started = time.monotonic()
        write = write_prompt(agent, "hello")
        waited = time.monotonic() - started
        assert waited < 3 * 4, f"a prompt write waited {waited:.1f} s on a stopped engine"
        if write.returncode == 0:  # queued: it is answered by the next engine
            out = sh(f"cat {agent}/output", timeout=60)
            assert out.returncode == 0 and out.stdout == "turn 1: HELLO\n", out
        else:  # refused: with the hang as the reason, and nothing queued
            assert "Input/output error" in write.stderr, write.stderr
            error = (agent / "error").read_text()
            assert error.startswith("EIO - ") and re.search(r"the engine hung|is (hung|restarting)", error), error
        wait_for(lambda: replaced(mount, stopped), timeout=15 * DEADLINE, what="the stopped engine replaced")
        answered = sh(f"echo again > {agent}/prompt && cat {agent}/output", timeout=60)
        assert answered.returncode == 0 and answered.stdout.endswith("AGAIN\n"), answered


def test_sigstop_during_tokenize_fails_that_write_with_eio_and_the_next_one_is_answered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flag = tmp_path / "hang-in-tokenize"
    monkeypatch.setenv(CRASH_ENV, f"hang:tokenize@{flag}")  # the engine stops itself while it tokenizes
    with hang_mount(tmp_path) as mount:
        mount.allow_log(HUNG)
        agent = mount.agent("a")
        flag.write_text("")
        stopped = engine_pid(mount)
        started = time.monotonic()
        write = write_prompt(agent, "hello")
        waited = time.monotonic() - started
        assert waited < 5 * DEADLINE, f"the write waited {waited:.1f} s"
        assert write.returncode != 0 and "Input/output error" in write.stderr, write
        error = (agent / "error").read_text()
        assert error.startswith("EIO - ") and "the engine hung: no progress for" in error, error
        flag.unlink()
        wait_for(lambda: replaced(mount, stopped), timeout=15 * DEADLINE, what="the stopped engine replaced")
        answered = sh(f"echo hello > {agent}/prompt && cat {agent}/output", timeout=60)
        assert answered.returncode == 0 and answered.stdout == "turn 1: HELLO\n", answered
        assert hangs(mount) == 1


def test_an_engine_that_hangs_warming_up_fails_the_mount_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "mnt"
    monkeypatch.setenv(CRASH_ENV, "hang:warmup")
    result = aiosfs("mount", str(root), "--backend", "fake", "--engine-deadline", "1", "--state", str(tmp_path / "state"), timeout=120)
    assert result.returncode != 0
    assert "the engine hung: no progress for" in result.stderr and "(warming up)" in result.stderr, result.stderr
    assert not listed(root)
    assert not any(b"hang:warmup" in environ for environ in engine_environs()), "the hung engine was left behind"


def engine_environs() -> list[bytes]:
    """The environments of the engine processes on this machine."""
    found = []
    for pid in subprocess.run(["pgrep", "-f", "kernel.cores.enginehost"], capture_output=True, text=True).stdout.split():
        try:
            found.append(Path(f"/proc/{pid}/environ").read_bytes())
        except OSError:
            pass
    return found


def test_a_reader_killed_while_the_engine_is_stopped_goes_at_once(tmp_path: Path) -> None:
    with mounted(tmp_path, "--backend", "fake", "--fake-delay", "0.01", "--engine-deadline", "600") as mount:  # no watchdog to help
        agent = mount.agent("a")
        (agent / "prompt").write_text(LONG)
        reader = subprocess.Popen(["cat", str(agent / "output")], stdout=subprocess.DEVNULL)
        stopped = engine_pid(mount)
        try:
            wait_for(lambda: (agent / "status").read_text().startswith("running"), what="the job running")
            os.kill(stopped, signal.SIGSTOP)
            wait_for(lambda: blocked_reading(reader.pid, agent / "output"), what="cat to block in its read")
            started = time.monotonic()
            reader.kill()
            reader.wait(timeout=10)
            assert time.monotonic() - started < 5
            assert "engine=ready" in status(mount)  # the watchdog had no part in it
        finally:
            os.kill(stopped, signal.SIGCONT)


def test_unmount_with_a_stopped_engine_finishes_and_leaves_no_engine(tmp_path: Path) -> None:
    with hang_mount(tmp_path, "--engine-deadline", "60") as mount:  # the watchdog would take longer than the unmount may
        agent = mount.agent("a")
        (agent / "prompt").write_text(LONG)
        wait_for(lambda: (agent / "status").read_text().startswith("running"), what="the job running")
        daemon = mount.daemon_pid()
        (stopped,) = engine_pids(daemon)
        os.kill(stopped, signal.SIGSTOP)
        mount.expect_death()  # it ends here, not at the teardown: its clean exit is asserted below
        started = time.monotonic()
        result = mount.command("unmount", str(mount.root), timeout=60)
        took = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        assert took < 15, f"unmount took {took:.1f} s with a stopped engine"
        assert gone(daemon, timeout=5) and gone(stopped, timeout=5), "the daemon or its engine outlived the unmount"
    assert f"{CLEAN_EXIT} (pid {daemon})" in mount.log_text()
    assert troubles(mount.log_text(), []) == []


def test_an_engine_left_stopped_by_a_daemon_that_died_is_ended_by_the_next_mount(tmp_path: Path) -> None:
    with hang_mount(tmp_path, "--engine-deadline", "60") as mount:
        (stopped,) = engine_pids(mount.daemon_pid())
        os.kill(stopped, signal.SIGSTOP)
        mount.kill()  # SIGKILL: the daemon cannot end its engine, and a stopped engine never reads the EOF
        assert alive(stopped), "the stopped engine should outlive its daemon"
        subprocess.run(["fusermount3", "-uz", str(mount.root)], check=True)
        mount.start()  # the same state directory
        assert gone(stopped, timeout=5), "the next mount left the old engine running"
        assert re.search(rf"killed engine process {stopped}, left running by a daemon of this state directory that died", mount.log_text())
        agent = mount.agent("a")
        answered = sh(f"echo hello > {agent}/prompt && cat {agent}/output", timeout=60)
        assert answered.returncode == 0 and answered.stdout == "turn 1: HELLO\n", answered
