"""Real mounts driven by bash and Python, with the fast deterministic backend.

The fake backend answers `turn N: <LAST USER MESSAGE IN UPPER CASE>`; the real
model is exercised in test_e2e_model.py.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounting import Mount, aiosfs, alive, blocked_reading, dead, has_open, mounted, needs_fuse, sh, wait_for

from aiosfs.cli import CLEAN_EXIT
from aiosfs.mount import MountError, unmount

pytestmark = [needs_fuse, pytest.mark.mount]


def test_tree_and_readme(fs: Mount) -> None:
    assert sorted(os.listdir(fs.root)) == ["README", "agents", "kernel", "tools"]
    assert set(os.listdir(fs.root / "kernel")) >= {"status", "stats", "ps", "models"}
    assert "agents/NAME/prompt" in (fs.root / "README").read_text()
    assert oct(os.stat(fs.agents).st_mode & 0o7777) == oct(0o1777)
    status = (fs.root / "kernel" / "status").read_text()
    assert status.startswith("running=") and "sched=fifo" in status and "model=fake" in status


def test_mkdir_ls_rmdir(fs: Mount) -> None:
    result = sh(f"cd {fs.agents} && mkdir alpha && ls alpha && ls -ld alpha && rmdir alpha && ls")
    assert result.returncode == 0, result.stderr
    assert "prompt" in result.stdout and "output" in result.stdout and "ctl" in result.stdout
    assert "alpha" not in os.listdir(fs.agents)


def test_echo_prompt_cat_output(agent: Path) -> None:
    result = sh(f"cd {agent} && echo 'hello there' > prompt && cat output && cat status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "turn 1: HELLO THERE"  # the answer ends with a newline
    assert lines[1].startswith("done ")


def test_multi_turn_context_and_reset(agent: Path) -> None:
    assert sh(f"cd {agent} && echo one > prompt && cat output >/dev/null && echo two > prompt").returncode == 0
    assert (agent / "output").read_text() == "turn 2: TWO\n"
    messages = [json.loads(line) for line in (agent / "context").read_text().splitlines()]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "one"
    assert sh(f": > {agent}/context").returncode == 0
    assert (agent / "context").read_text() == ""
    assert sh(f"echo 'remember me' >> {agent}/context && echo three > {agent}/prompt && cat {agent}/output").stdout == "turn 2: THREE\n"
    assert sh(f"echo reset > {agent}/ctl").returncode == 0
    assert (agent / "context").read_text() == ""


def test_commit_rules(agent: Path) -> None:
    script = f"""
    cd {agent}
    {{ echo a; echo b; }} > prompt; cat status
    exec 3>prompt; echo c >&3; echo d >&3; exec 3>&-
    cat status; cat output
    """
    result = sh(script)
    assert result.returncode == 0, result.stderr
    first, second, output = result.stdout.splitlines()[:3]
    assert int(second.split()[1]) == int(first.split()[1]) + 2  # a+b one job, c and d one each
    assert output == "turn 3: D"  # d waited for the answer to c: one conversation, in order


def test_reader_started_before_prompt_streams_it(agent: Path) -> None:
    reader = subprocess.Popen(["cat", str(agent / "output")], stdout=subprocess.PIPE, text=True)
    wait_for(lambda: blocked_reading(reader.pid, agent / "output"), what="cat to block in its read")  # waiting for the first request, like a pipe
    assert reader.poll() is None
    (agent / "prompt").write_text("late")
    out, _ = reader.communicate(timeout=30)
    assert out == "turn 1: LATE\n"


def test_a_reader_that_is_behind_gets_all_that_is_ready_in_one_read(agent: Path) -> None:
    message = "catch up " * 20  # within the default max_tokens
    (agent / "prompt").write_text(message)
    fd = os.open(agent / "output", os.O_RDONLY)
    try:
        first = os.read(fd, 1)  # the first token: the answer is being generated
        wait_for(lambda: (agent / "status").read_text().startswith("done"), what="the answer to finish")
        rest = os.read(fd, 1 << 16)  # one read: every byte generated since, not one token
        assert first + rest == f"turn 1: {message.strip().upper()}\n".encode()
        assert os.read(fd, 1 << 16) == b""
    finally:
        os.close(fd)


def test_two_agents_at_once(fs: Mount) -> None:
    names = ["twin-a", "twin-b"]
    for name in names:
        fs.agent(name)
    procs = [
        subprocess.Popen(["bash", "-c", f"cd {fs.agents / n} && echo 'i am {n}' > prompt && cat output"], stdout=subprocess.PIPE, text=True)
        for n in names
    ]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert outputs == [f"turn 1: I AM {n.upper()}\n" for n in names]


def test_python_plain_syscalls_and_call_sessions(agent: Path) -> None:
    fd = os.open(agent / "call", os.O_RDWR)
    try:
        os.write(fd, b"first question")
        assert _read_all(fd) == b"turn 1: FIRST QUESTION\n"
        os.write(fd, b"follow-up")
        assert _read_all(fd) == b"turn 2: FOLLOW-UP\n"
        other = os.open(agent / "call", os.O_RDWR)
        os.write(other, b"private")
        assert _read_all(other) == b"turn 1: PRIVATE\n"
        os.close(other)
        with pytest.raises(OSError) as seek:
            os.lseek(fd, 0, os.SEEK_SET)
        assert seek.value.errno == errno.ESPIPE
    finally:
        os.close(fd)
    assert (agent / "context").read_text() == ""  # call sessions never touch the agent's context


def _read_all(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    return data


def test_class_rules_hold_for_root(agent: Path, fs: Mount) -> None:
    for path, flags in [
        (agent / "output", os.O_WRONLY),
        (agent / "status", os.O_WRONLY),
        (fs.root / "kernel" / "status", os.O_WRONLY),
    ]:
        with pytest.raises(PermissionError):
            os.close(os.open(path, flags))
    result = sh(f"echo x > {agent}/output")
    assert result.returncode != 0 and "Permission denied" in result.stderr
    for path in (agent / "prompt", agent / "ctl", fs.root / "kernel" / "ctl"):  # control files read empty
        for flags in (os.O_RDONLY, os.O_RDWR):
            fd = os.open(path, flags)
            try:
                assert os.read(fd, 4096) == b""
            finally:
                os.close(fd)
    assert (agent / "status").read_text() == "idle -\n"  # reading them made no request


def test_bad_input_errnos_and_error_file(agent: Path, fs: Mount) -> None:
    with pytest.raises(FileNotFoundError):
        (fs.agents / "nobody" / "prompt").write_text("x")
    fd = os.open(agent / "prompt", os.O_WRONLY)
    with pytest.raises(OSError) as big:
        os.write(fd, b"x" * (256 * 1024 + 1))
    assert big.value.errno == errno.EFBIG
    os.close(fd)
    assert (agent / "error").read_text().startswith("EFBIG - ")
    # non-UTF-8: the write fails; the error file keeps both refusals, newest last
    result = sh(f"printf '\\xff\\xfe bad' > {agent}/prompt; cat {agent}/error")
    assert "printf: write error: Invalid argument" in result.stderr
    first, last = result.stdout.splitlines()
    assert first.startswith("EFBIG - ") and last.startswith("EINVAL - ") and "UTF-8" in last
    with pytest.raises(OSError) as envelope:
        (agent / "prompt").write_text("{not json")
    assert envelope.value.errno == errno.EINVAL
    # config: a bad line is refused and the old config kept
    (agent / "config").write_text("temperature=0.5\n")
    with pytest.raises(OSError) as bad_config:
        with open(agent / "config", "a") as config:
            config.write("nonsense=1\n")
    assert bad_config.value.errno == errno.EINVAL
    assert "temperature=0.5" in (agent / "config").read_text()
    with pytest.raises(OSError) as ctl:
        (agent / "ctl").write_text("frobnicate\n")
    assert ctl.value.errno == errno.EINVAL
    with pytest.raises(OSError) as long_name:
        (fs.agents / ("n" * 256)).mkdir()
    assert long_name.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError) as bad_name:
        os.mkdir(fs.agents / "bad\udcffname")
    assert bad_name.value.errno == errno.EINVAL
    # and the mount still serves
    assert sh(f"echo fine > {agent}/prompt && cat {agent}/output").stdout == "turn 1: FINE\n"


def test_structural_changes_refused(agent: Path) -> None:
    for script in [f"rm {agent}/prompt", f"mv {agent}/prompt {agent}/p2", f"touch {agent}/newfile", f"mkdir {agent}/sub"]:
        result = sh(script)
        assert result.returncode != 0 and "Operation not permitted" in result.stderr, script


def test_config_applies_to_requests(agent: Path) -> None:
    sh(f"echo 'max_tokens=5' >> {agent}/config")
    assert "max_tokens=5" in (agent / "config").read_text()
    assert sh(f"echo 'abcdefghij' > {agent}/prompt; cat {agent}/output").stdout == "turn \n"
    (agent / "prompt").write_text(json.dumps({"prompt": "xyz", "max_tokens": 8}))
    assert (agent / "output").read_text() == "turn 2: \n"


@pytest.fixture(scope="module")
def slow_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mounted(tmp_path_factory.mktemp("slow"), "--backend", "fake", "--fake-delay", "0.05") as mount:
        yield mount


def test_cancel_running_job_fails_the_reader(slow_fs: Mount) -> None:
    agent = slow_fs.agent("slowpoke")
    (agent / "prompt").write_text("x" * 200)  # a long answer at 50 ms a token
    reader = subprocess.Popen(["cat", str(agent / "output")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: os.stat(agent / "output").st_size > 0)  # the answer has started
    assert (agent / "status").read_text().startswith("running")
    with pytest.raises(OSError) as busy:
        agent.rmdir()
    assert busy.value.errno == errno.EBUSY
    (agent / "ctl").write_text("cancel\n")
    out, err = reader.communicate(timeout=30)
    assert reader.returncode != 0 and "canceled" in err.lower()
    assert out and ("turn 1: " + "X" * 200).startswith(out)  # the partial answer, then the error
    assert (agent / "status").read_text().startswith("cancelled")
    assert (agent / "error").read_text().startswith("ECANCELED ")
    agent.rmdir()


def interruptible() -> None:
    """In the child before exec: SIGINT as a terminal gives it. A run started in the
    background of a shell (`cmd &`, CI) ignores SIGINT, and an ignored signal is inherited:
    such a `cat` would never see Ctrl-C, whatever the filesystem does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_term_and_kill_release_a_blocked_reader(agent: Path) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        reader = subprocess.Popen(["cat", str(agent / "output")], preexec_fn=interruptible)
        wait_for(lambda reader=reader: blocked_reading(reader.pid, agent / "output"), what="cat to block in its read")
        started = time.monotonic()
        reader.send_signal(sig)
        reader.wait(timeout=10)
        assert time.monotonic() - started < 5


def test_poll_wakes_on_output(agent: Path) -> None:
    fd = os.open(agent / "output", os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(BlockingIOError):
            os.read(fd, 100)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        assert poller.poll(100) == []
        (agent / "prompt").write_text("ping")
        assert poller.poll(10_000) != []
    finally:
        os.close(fd)


def test_poll_wakes_a_call_reader_when_its_answer_comes(agent: Path) -> None:
    """`call` is always writable: a reader waiting for POLLIN must still be woken."""
    fd = os.open(agent / "call", os.O_RDWR | os.O_NONBLOCK)
    try:
        os.write(fd, b"ping")
        answer = b""
        for _ in range(100):
            try:
                chunk = os.read(fd, 100)  # the first read commits the turn
            except BlockingIOError:
                waited = time.monotonic()
                select.select([fd], [], [], 60)  # without a wake-up it returns at its timeout
                assert time.monotonic() - waited < 60, "no wake-up for the answer: select ran to its timeout"
                continue
            if not chunk:
                break
            answer += chunk
        assert answer == b"turn 1: PING\n"
    finally:
        os.close(fd)


def test_other_user_owns_its_agent(fs: Mount) -> None:
    script = f"cd {fs.agents} && mkdir mine && echo hi > mine/prompt && cat mine/output && stat -c '%u %a' mine"
    result = sh(f'setpriv --reuid 65534 --regid 65534 --clear-groups bash -c "{script}"')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "turn 1: HI" and lines[1].split()[0] == "65534"
    root_agent = fs.agent("roots")
    denied = sh(f"setpriv --reuid 65534 --regid 65534 --clear-groups bash -c 'echo hi > {root_agent}/prompt'")
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    denied = sh(f"setpriv --reuid 65534 --regid 65534 --clear-groups rmdir {root_agent}")
    assert denied.returncode != 0


def fuse_requests(fs: Mount) -> dict[str, float]:
    """aiosfs_fuse_requests_total by operation, read from kernel/metrics."""
    found: dict[str, float] = {}
    for line in (fs.root / "kernel" / "metrics").read_text().splitlines():
        if line.startswith("aiosfs_fuse_requests_total{"):
            labels, _, value = line.rpartition(" ")
            found[labels.split('op="')[1].split('"')[0]] = float(value)
    return found


def test_a_path_walk_asks_only_for_the_agent_and_the_file(fs: Mount) -> None:
    """The VFS keeps the mount's own directories for a second (params.DIR_CACHE_SECONDS):
    a walk to agents/NAME/FILE asks for the root's attributes (so that a dead daemon
    shows at once), NAME (agents come and go) and FILE, not for agents/ or the agent
    directory's attributes again."""
    prompt = fs.agent("walk") / "prompt"
    os.stat(prompt)
    base = fuse_requests(fs)
    idle = fuse_requests(fs)  # what a read of kernel/metrics asks itself
    walks = 20
    for _ in range(walks):
        os.stat(prompt)
    after = fuse_requests(fs)
    asked = {op: after.get(op, 0) - idle.get(op, 0) - (idle.get(op, 0) - base.get(op, 0)) for op in ("lookup", "getattr")}
    # uncached, each walk was 3 lookups and 4 getattrs (root, agents/, walk/ and the file)
    assert asked["lookup"] <= 2 * walks + 4 and asked["getattr"] <= 2 * walks + 4, asked


def test_a_chmod_or_chown_of_an_agent_directory_applies_at_once(fs: Mount) -> None:
    """What the VFS keeps of a directory is what the daemon answered its chmod/chown with."""
    agent = fs.agent("kept")
    nobody = "setpriv --reuid 65534 --regid 65534 --clear-groups"
    assert sh(f"{nobody} cat {agent}/status").returncode == 0  # 755: others may read
    os.chmod(agent, 0o700)
    denied = sh(f"{nobody} cat {agent}/status")
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    os.chown(agent, 65534, 65534)
    assert sh(f"{nobody} cat {agent}/status").returncode == 0  # now nobody's own


def test_remount_keeps_agents_config_and_context(tmp_path: Path) -> None:
    with mounted(tmp_path, "--backend", "fake") as mount:
        agent = mount.agent("keeper")
        assert sh(f"cd {agent} && echo 'temperature=0.2' >> config && echo 'hold this' > prompt && cat output").returncode == 0
        context = (agent / "context").read_text()
        os.chmod(agent / "output", 0o600)
    with mounted(tmp_path, "--backend", "fake") as mount:
        agent = mount.agents / "keeper"
        assert os.listdir(mount.agents) == ["keeper"]
        assert "temperature=0.2" in (agent / "config").read_text()
        assert (agent / "context").read_text() == context
        assert (agent / "output").read_text() == "turn 1: HOLD THIS\n"
        assert os.stat(agent / "output").st_mode & 0o777 == 0o600
        assert sh(f"echo again > {agent}/prompt && cat {agent}/output").stdout == "turn 2: AGAIN\n"


def test_cli_errors_say_what_to_do(tmp_path: Path) -> None:
    created = tmp_path / "new" / "mp"  # a missing mountpoint is made, as `mount --mkdir` does
    made = aiosfs("mount", str(created), "--backend", "fake", "--state", str(tmp_path / "s0"))
    try:
        assert made.returncode == 0 and f"created the mountpoint {created}" in made.stderr, made.stderr
        assert (created / "kernel" / "status").read_text().startswith("running=")
    finally:
        assert aiosfs("unmount", str(created)).returncode == 0
    (created / "left").write_text("x")
    busy = aiosfs("mount", str(created), "--backend", "fake", "--state", str(tmp_path / "s0"))
    assert busy.returncode == 1 and "not empty" in busy.stderr
    (tmp_path / "mp").mkdir()
    no_model = aiosfs("mount", str(tmp_path / "mp"), "--model", str(tmp_path / "none.gguf"), "--state", str(tmp_path / "s"))
    assert no_model.returncode == 1 and "scripts/setup" in no_model.stderr
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    state = aiosfs("mount", str(tmp_path / "mp"), "--backend", "fake", "--state", str(not_a_dir / "state"))
    assert state.returncode == 1 and "cannot write the state directory" in state.stderr and "--state" in state.stderr
    status = aiosfs("status", str(tmp_path / "mp"))
    assert status.returncode == 1 and "not an aiosfs mount" in status.stderr


def test_busy_and_dead_mounts(tmp_path: Path) -> None:
    with mounted(tmp_path, "--backend", "fake") as mount:
        again = aiosfs("mount", str(mount.root), "--backend", "fake", "--state", str(tmp_path / "other"))
        assert again.returncode == 1 and "already" in again.stderr
        assert aiosfs("status", str(mount.root)).stdout.startswith("running=")
        mount.kill()
        assert dead(mount.root)
        restarted = mount.start()
        assert "cleaned a dead mount" in restarted.stderr
        assert (mount.root / "kernel" / "status").read_text().startswith("running=")


def test_a_job_survives_a_killed_daemon(tmp_path: Path) -> None:
    with mounted(tmp_path, "--backend", "fake", "--fake-delay", "0.05") as mount:
        agent = mount.agent("survivor")
        (agent / "prompt").write_text("y" * 40)  # about 50 tokens at 50 ms each
        job_id = (agent / "status").read_text().split()[1]
        wait_for(lambda: os.stat(agent / "output").st_size > 0)
        assert (agent / "status").read_text() == f"running {job_id}\n"
        mount.kill()
        assert "cleaned a dead mount" in mount.start().stderr
        result = sh(f"cat {agent}/output && cat {agent}/status")
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"turn 1: {'Y' * 40}\ndone {job_id}\n"  # the whole answer, once, under the same id
        assert [json.loads(line)["role"] for line in (agent / "context").read_text().splitlines()] == ["user", "assistant"]


def test_scheduler_file_events_and_top(fs: Mount) -> None:
    sched = fs.root / "kernel" / "scheduler"
    assert sched.read_text() == "fifo\n"
    assert sh(f"echo 'rr quantum=16' > {sched}").returncode == 0
    assert sched.read_text() == "rr quantum=16\n" and "sched=rr,quantum=16 " in (fs.root / "kernel" / "status").read_text()
    bad = sh(f"echo lottery > {sched}; cat {sched}")
    assert bad.stdout == "rr quantum=16\n"  # refused, the old policy kept
    denied = sh(f"setpriv --reuid 65534 --regid 65534 --clear-groups bash -c 'echo fifo > {sched}'")
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    assert sh(f"echo fifo > {sched}").returncode == 0
    agent = fs.agent("watched")
    watcher = subprocess.Popen(["head", "-n", "4", str(agent / "events")], stdout=subprocess.PIPE, text=True)
    wait_for(lambda: has_open(watcher.pid, agent / "events"), what="head to open events")  # it shows what happens from its open on
    assert sh(f"echo hi > {agent}/prompt && cat {agent}/output").returncode == 0
    events = [json.loads(line)["event"] for line in watcher.communicate(timeout=30)[0].splitlines()]
    assert events == ["queued", "running", "first_token", "done"]
    top = aiosfs("top", str(fs.root), "--once")
    assert top.returncode == 0 and top.stdout.startswith("running=") and "mean_batch=" in top.stdout and "id agent uid state" in top.stdout


NOBODY = "setpriv --reuid 65534 --regid 65534 --clear-groups"


def test_trash_and_restore_survive_a_remount(tmp_path: Path) -> None:
    with mounted(tmp_path, "--backend", "fake") as mount:
        made = sh(
            f"cd {mount.agents} && {NOBODY} bash -c 'mkdir notes && echo keep me > notes/memory/a.md && echo hi > notes/prompt && cat notes/output'"
        )
        assert made.returncode == 0, made.stderr
        removed = sh(f"{NOBODY} rmdir {mount.agents}/notes")
        assert removed.returncode == 0, removed.stderr
        assert "notes" not in os.listdir(mount.agents)
        trash = (mount.root / "kernel" / "trash").read_text().splitlines()
        assert trash[1].split()[:3] == ["notes", trash[1].split()[1], "65534"]
    with mounted(tmp_path, "--backend", "fake") as mount:
        assert (mount.root / "kernel" / "trash").read_text().splitlines()[1].startswith("notes ")
        stranger = sh(f"setpriv --reuid 65533 --regid 65533 --clear-groups bash -c 'echo restore notes > {mount.root}/kernel/ctl'")
        assert stranger.returncode != 0 and "Operation not permitted" in stranger.stderr
        restored = sh(f"{NOBODY} bash -c 'echo restore notes > {mount.root}/kernel/ctl'")
        assert restored.returncode == 0, restored.stderr
        agent = mount.agents / "notes"
        assert (agent / "memory" / "a.md").read_text() == "keep me\n"
        assert sh(f"{NOBODY} cat {agent}/output").stdout == "turn 1: HI\n"
        assert os.stat(agent).st_uid == 65534
        log = [json.loads(line) for line in (mount.root / "kernel" / "log").read_text().splitlines()]
        events = [e["event"] for e in log]
        assert "rmdir" in events and "restore" in events  # the audit log outlived the first mount
        assert any(e["event"] == "deny" and e["uid"] == 65533 and e["syscall"] == "kernel_ctl" for e in log)


def test_permissions_file_limits_an_owner(fs: Mount) -> None:
    made = sh(f"cd {fs.agents} && {NOBODY} mkdir limited")
    assert made.returncode == 0, made.stderr
    agent = fs.agents / "limited"
    (agent / "permissions").write_text("budget_tokens 40\nmax_queue 4\n")  # root sets the ceiling
    sh(f"{NOBODY} bash -c 'echo budget_tokens 100000 > {agent}/permissions'")  # EPERM at close, which bash ignores
    assert "budget_tokens 40" in (agent / "permissions").read_text()  # nothing changed
    error = sh(f"{NOBODY} cat {agent}/error").stdout
    assert error.startswith("EPERM") and "above root's limit 40" in error
    lowered = sh(f"{NOBODY} bash -c 'echo budget_tokens 30 > {agent}/permissions && cat {agent}/permissions'")
    assert lowered.returncode == 0 and "budget_tokens 30  # root's limit: 40; spent: 0" in lowered.stdout
    assert "max_queue     4" in lowered.stdout  # left out by the owner: root's value stays
    first = sh(f"{NOBODY} bash -c 'echo one > {agent}/prompt && cat {agent}/output'")
    assert first.returncode == 0, first.stderr
    spent = sh(f"{NOBODY} bash -c 'echo two > {agent}/prompt'")
    assert spent.returncode != 0 and "Disk quota exceeded" in spent.stderr
    assert sh(f"{NOBODY} bash -c 'echo budget reset > {agent}/ctl'").returncode != 0
    assert sh(f"echo budget reset > {agent}/ctl && {NOBODY} bash -c 'echo two > {agent}/prompt && cat {agent}/output'").returncode == 0
    os.chmod(agent / "config", 0o666)
    other = sh(f"setpriv --reuid 65533 --regid 65533 --clear-groups bash -c 'echo temperature=0 > {agent}/config'")
    assert "temperature=0.7" in (agent / "config").read_text() and "Operation not permitted" in other.stderr  # EPERM at write


def test_output_after_a_refused_prompt_is_that_refusal_not_an_older_answer(agent: Path) -> None:
    assert sh(f"echo first > {agent}/prompt && cat {agent}/output").stdout == "turn 1: FIRST\n"
    refused = sh(f"printf '\\xff bad' > {agent}/prompt; cat {agent}/output")  # EINVAL at the write
    assert refused.returncode != 0 and "Invalid argument" in refused.stderr and "FIRST" not in refused.stdout
    assert sh(f"cat {agent}/error").stdout.startswith("EINVAL - ")
    assert sh(f"echo second > {agent}/prompt && cat {agent}/output").stdout == "turn 2: SECOND\n"  # accepted: output follows again


# -- the mount fixture's teardown: a test fails when its daemon did not live and stop as it should --

LOGGED_BUG = "2000-01-01 00:00:00,000 ERROR kernel.engine: engine step failed\nTraceback (most recent call last):\nRuntimeError: a bug\n"


def test_teardown_fails_a_test_whose_daemon_died(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception) as failure:
        with mounted(tmp_path, "--backend", "fake") as mount:
            os.kill(mount.daemon_pid(), signal.SIGKILL)  # not announced with expect_death()
            wait_for(lambda: dead(mount.root))
    message = str(failure.value)
    assert "stopped during the test" in message and "dead (ENOTCONN)" in message and "never wrote" in message, message
    assert not dead(mount.root) and not os.path.ismount(mount.root)  # cleaned up all the same


def test_teardown_fails_a_test_whose_daemon_stopped_on_its_own(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match="stopped during the test"):
        with mounted(tmp_path, "--backend", "fake") as mount:
            pid = mount.daemon_pid()
            os.kill(pid, signal.SIGTERM)  # it unmounts itself and ends cleanly, but nobody asked for that
            wait_for(lambda: not alive(pid))


def test_teardown_fails_on_an_error_in_this_mounts_log_unless_allowed(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception) as failure:
        with mounted(tmp_path, "--backend", "fake") as mount:
            with open(mount.log, "a") as log:
                log.write(LOGGED_BUG)
    assert "engine step failed" in str(failure.value) and "RuntimeError: a bug" in str(failure.value)
    with mounted(tmp_path, "--backend", "fake") as mount:  # the last mount's part of the log is not this one's
        assert LOGGED_BUG in mount.log.read_text()
        with open(mount.log, "a") as log:
            log.write(LOGGED_BUG)
        mount.allow_log(r"ERROR kernel\.engine: engine step failed")


def test_unmount_fails_while_the_daemon_still_runs(tmp_path: Path) -> None:
    with mounted(tmp_path, "--backend", "fake") as mount:
        pid = mount.daemon_pid()
        held = os.open(mount.root / "kernel" / "status", os.O_RDONLY)  # a lazy unmount leaves the daemon serving it
        try:
            with pytest.raises(MountError, match=f"daemon \\(pid {pid}\\) is still running after 1 s"):
                unmount(mount.root, True, sys.stderr, timeout=1)
            assert os.read(held, 100).startswith(b"running=")
        finally:
            os.close(held)
        wait_for(lambda: f"{CLEAN_EXIT} (pid {pid})" in mount.log_text())  # the last file closed: it ends
        mount.start()  # for the teardown to unmount
