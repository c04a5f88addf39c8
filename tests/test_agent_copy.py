"""Backing up, copying and moving agents with the ordinary tools, on real mounts of
the fake backend (it answers `turn N: <LAST USER MESSAGE IN UPPER CASE>`, N the user
messages it saw, so an answer shows that a copied context reached the model).

`cp -r`, `cp -a`, `tar` and `rsync -a` copy an agent out of the mount and back in
under a new name, between two mounts, and while a long answer is being generated;
`fork NAME` in an agent's ctl does it in one step. Every tool runs with a timeout:
a copy that read a stream to its end would hang.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mounting import IN_CI, Mount, mounted, needs_fuse, sh, wait_for

pytestmark = [needs_fuse, pytest.mark.mount]

COPY_SECONDS = 20  # every copy of an agent ends within this, whatever the agent is doing
TOOLS = ("cp", "tar", "rsync")
DATA = ("config", "context", "permissions")
NOBODY = 65534


@pytest.fixture(scope="module")
def fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    # 10 ms a decode step: a long answer stays in flight for many seconds
    with mounted(tmp_path_factory.mktemp("copy"), "--backend", "fake", "--fake-delay", "0.01") as mount:
        yield mount


@pytest.fixture(scope="module", autouse=True)
def tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        reason = f"{' '.join(missing)} not installed: run scripts/setup (it installs rsync)"
        if IN_CI:
            pytest.fail(f"{reason} (CI=true: copies of agents must be tested)")
        pytest.skip(reason)


def run(script: str, ok: tuple[int, ...] = (0,), timeout: float = COPY_SECONDS) -> subprocess.CompletedProcess[str]:
    """A shell command as a user types it (umask 022, so that cp -r keeps these modes)."""
    started = time.monotonic()
    result = subprocess.run(["bash", "-c", f"umask 022; {script}"], capture_output=True, text=True, timeout=timeout)
    took = time.monotonic() - started
    assert result.returncode in ok, f"{script!r} exited {result.returncode} after {took:.1f} s:\n{result.stderr}"
    return result


def ask(agent: Path, question: str) -> str:
    result = sh(f"echo {shlex.quote(question)} > {agent}/prompt && cat {agent}/output", timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def make_agent(fs: Mount, name: str) -> Path:
    """An agent with a config, a conversation, a policy, memory/ with versions and modes,
    and a file of its own chmod'ed. Its system prompt starts with its name, so that no
    other agent's KV holds its prompt."""
    agent = fs.agent(name)
    system = f"You are {name}, the archivist of a long-lived project. Keep every answer short, plain and exact. " * 4
    (agent / "config").write_text(f"system={system}\ntemperature=0\n")
    assert ask(agent, f"remember {name}") == f"turn 1: REMEMBER {name.upper()}\n"
    (agent / "permissions").write_text("max_queue 4\n")
    memory = agent / "memory"
    (memory / "notes.md").write_text("first draft\n")
    (memory / "notes.md").write_text("the blue door is locked\n")  # a second version
    (memory / "plans").mkdir(mode=0o700)
    (memory / "plans" / "todo.txt").write_text("paint it\n")
    os.chmod(memory / "plans" / "todo.txt", 0o600)
    os.symlink("notes.md", memory / "latest")
    os.chmod(agent / "context", 0o600)
    return agent


def tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry below `root`: (mode, content), or ("link", target)."""
    rows: dict[str, tuple[Any, ...]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        where = str(path.relative_to(root))
        if stat.S_ISLNK(st.st_mode):
            rows[where] = ("link", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            rows[where] = (oct(stat.S_IMODE(st.st_mode)), None)
        else:
            rows[where] = (oct(stat.S_IMODE(st.st_mode)), path.read_bytes())
    return rows


def data(agent: Path) -> dict[str, Any]:
    """What a copy of an agent keeps: its config, context and policy, and memory/ with contents and modes."""
    kept: dict[str, Any] = {name: (agent / name).read_text() for name in DATA}
    kept["memory/"] = tree(agent / "memory")
    return kept


def modes(agent: Path) -> dict[str, str]:
    return {name: oct(stat.S_IMODE(os.stat(agent / name).st_mode)) for name in ("", *DATA, "prompt", "ctl")}


def read_as_copy(path: Path) -> bytes:
    """The file as a copy tool reads it (O_NOFOLLOW): a stream as it is now."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
        return data
    finally:
        os.close(fd)


def stats(fs: Mount) -> dict[str, float]:
    lines = (fs.root / "kernel" / "stats").read_text().splitlines()
    return {key: float(value) for key, value in (line.split(" ", 1) for line in lines) if value.replace(".", "", 1).isdigit()}


def is_idle_and_untouched(agent: Path) -> None:
    """No request came of the copy: no job, no error."""
    assert (agent / "status").read_text() == "idle -\n"
    assert (agent / "error").read_text() == ""
    assert os.stat(agent / "output").st_size == 0


def copy_out(tool: str, agent: Path, dest: Path) -> Path:
    if tool == "tar":
        archive = dest.parent / f"{agent.name}.tar"
        run(f"tar -cf {archive} -C {agent.parent} {agent.name}")
        dest.mkdir()
        run(f"tar -xf {archive} -C {dest}")
        return dest / agent.name
    if tool == "rsync -a":
        run(f"rsync -a {agent}/ {dest}/")
        return dest
    run(f"{tool} {agent} {dest}")
    return dest


def copy_in(tool: str, backup: Path, target: Path) -> None:
    if tool == "tar":  # an archive of the backup, extracted under another name
        archive = backup.parent / "backup.tar"
        run(f"tar -cf {archive} -C {backup.parent} {backup.name}")
        run(f"tar -xf {archive} -C {target.parent} --transform 's,^{backup.name},{target.name},'")
    elif tool == "rsync -a":
        run(f"rsync -a {backup}/ {target}/")
    else:
        run(f"{tool} {backup} {target}")


COPIERS = ["cp -r", "cp -a", "tar", "rsync -a"]


@pytest.mark.parametrize("tool", COPIERS)
def test_copy_out_of_the_mount(fs: Mount, tmp_path: Path, tool: str) -> None:
    agent = make_agent(fs, f"out-{tool.replace(' ', '')}")
    status, versions = (agent / "status").read_text(), (agent / "versions").read_text()
    backup = copy_out(tool, agent, tmp_path / "backup")
    assert data(backup) == data(agent)
    if tool != "cp -r":  # the others keep modes
        assert modes(backup) == modes(agent)
    assert (backup / "status").read_text() == status == (agent / "status").read_text()  # reading made no request
    assert (backup / "versions").read_text() == versions
    assert (backup / "output").read_text() == f"turn 1: REMEMBER {agent.name.upper()}\n"
    for name in ("prompt", "ctl", "call", "recall", "events"):
        assert (backup / name).read_bytes() == b"", name
    assert (agent / "error").read_text() == ""


def test_stat_sizes_are_what_a_read_returns(fs: Mount) -> None:
    """tar copies st_size bytes: every file's size is what a copy reads of it."""
    agent = make_agent(fs, "sizes")
    for path in [*sorted(p for p in agent.iterdir() if p.is_file()), *(fs.root / "kernel").iterdir(), fs.root / "README"]:
        if path.name in ("metrics", "stats", "status", "ps", "log") and path.parent.name == "kernel":
            continue  # live counters: their text changes from one moment to the next
        size, text = os.stat(path).st_size, read_as_copy(path)
        assert size == len(text), f"{path}: st_size {size}, read {len(text)} bytes"
        assert os.stat(path).st_blocks == -(-size // 512), path


@pytest.mark.parametrize("tool", COPIERS)
def test_copy_back_into_the_mount_under_a_new_name(fs: Mount, tmp_path: Path, tool: str) -> None:
    source = make_agent(fs, f"orig-{tool.replace(' ', '')}")
    backup = copy_out("cp -a", source, tmp_path / "backup")
    target = fs.agents / f"restored-{tool.replace(' ', '')}"
    copy_in(tool, backup, target)
    assert data(target) == data(source)
    if tool != "cp -r":
        assert modes(target) == modes(source)
    is_idle_and_untouched(target)  # the copied prompt, ctl, output, status… did nothing
    assert "1 24 " in (target / "versions").read_text()  # the copy of notes.md is its first version
    assert ask(target, "what is behind the door") == "turn 2: WHAT IS BEHIND THE DOOR\n"  # the copied context reached the model
    again = target.parent / f"{target.name}-again"  # and a copy of the restored agent restores as well
    copy_in(tool, copy_out("cp -a", target, tmp_path / "second"), again)
    assert data(again) == data(target)


def test_cp_in_the_mount_is_a_warm_copy(fs: Mount) -> None:
    source = make_agent(fs, "warm")
    before = stats(fs)
    run(f"cp -r {source} {fs.agents / 'warm-copy'}")
    copy = fs.agents / "warm-copy"
    assert data(copy) == data(source)
    is_idle_and_untouched(copy)
    assert ask(copy, "and now") == "turn 2: AND NOW\n"
    after = stats(fs)
    # the copy's first prompt started on the original's cached cells: its system prompt and first turn
    assert after["shared_prefix_hits"] == before["shared_prefix_hits"] + 1
    assert after["shared_prefix_tokens"] - before["shared_prefix_tokens"] >= 256


def test_copy_between_two_mounts(fs: Mount, tmp_path_factory: pytest.TempPathFactory) -> None:
    source = make_agent(fs, "traveller")
    with mounted(tmp_path_factory.mktemp("second"), "--backend", "fake", "--fake-delay", "0.002") as other:
        there = other.agents / "traveller"
        run(f"cp -a {source} {there}")
        assert data(there) == data(source)
        assert modes(there) == modes(source)
        is_idle_and_untouched(there)
        assert ask(there, "where am i") == "turn 2: WHERE AM I\n"
        back = fs.agents / "traveller-back"
        run(f"rsync -a {there}/ {back}/")  # and back, with the turn it took there
        assert data(back) == data(there)
        assert ask(back, "home again") == "turn 3: HOME AGAIN\n"


def test_copies_of_an_agent_with_a_job_running_end_in_time(fs: Mount, tmp_path: Path) -> None:
    agent = make_agent(fs, "busy")
    with open(agent / "config", "a") as config:
        config.write("ignore_eos=on\nmax_tokens=8192\n")  # generates until its window is full: many seconds
    (agent / "prompt").write_text("talk until the window is full")
    wait_for(lambda: (agent / "status").read_text().startswith("running") and os.stat(agent / "output").st_size > 0, what="the answer to stream")
    started = time.monotonic()
    run(f"cp -r {agent} {tmp_path / 'cp'}")
    run(f"cp -a {agent} {tmp_path / 'cpa'}")
    run(f"tar -cf {tmp_path / 'busy.tar'} -C {fs.agents} busy", ok=(0, 1))  # 1: "file changed as we read it"
    run(f"rsync -a {agent}/ {tmp_path / 'rsync'}/")
    took = time.monotonic() - started
    assert took < COPY_SECONDS
    assert (agent / "status").read_text().startswith("running"), "the copies waited for the job"
    (agent / "ctl").write_text("cancel all\n")
    wait_for(lambda: (agent / "status").read_text().startswith("cancelled"), what="the job to be cancelled")
    copied, final = (tmp_path / "cp" / "output").read_bytes(), read_as_copy(agent / "output")
    assert copied and final.startswith(copied) and final.startswith(b"turn 2: T")
    for copy in ("cp", "cpa", "rsync"):
        assert (tmp_path / copy / "config").read_text() == (agent / "config").read_text()
        assert tree(tmp_path / copy / "memory") == tree(agent / "memory")
    run(f"cp -r {tmp_path / 'cp'} {fs.agents / 'busy-copy'}")
    is_idle_and_untouched(fs.agents / "busy-copy")


def test_what_copies_write_is_never_a_request(fs: Mount) -> None:
    agent = fs.agent("sink")
    (agent / "config").write_text("temperature=0\n")
    run(f"cd {agent} && cp /dev/null prompt && : > ctl && truncate -s 0 ctl prompt && cp /dev/null ctl")
    for name, text in (("prompt", b"hello"), ("ctl", b"cancel all\n"), ("output", b"x"), ("status", b"done 7\n")):
        fd = os.open(agent / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # as cp -r and tar -x write
        os.write(fd, text)
        os.close(fd)
    is_idle_and_untouched(agent)
    assert stat.S_IMODE(os.stat(agent / "prompt").st_mode) == 0o600  # the create's mode, as a new file's (tar sets no other)

    # rsync's way: a scratch file, renamed over the file
    for name, text in ((".prompt.Ab12Cd", "hello\n"), (".config.Ef34Gh", "temperature=0.5\n"), (".ctl.Ij56Kl", "reset\n")):
        (agent / name).write_text(text)
        os.chmod(agent / name, 0o640)
        os.rename(agent / name, agent / name.split(".")[1])
    is_idle_and_untouched(agent)
    assert "temperature=0.5\n" in (agent / "config").read_text()
    assert stat.S_IMODE(os.stat(agent / "prompt").st_mode) == 0o640  # the rename carried the mode, as on a disk
    assert not [p for p in os.listdir(agent) if p.startswith(".")]

    bad = agent / ".config.bad"
    bad.write_text("no such key\n")
    with pytest.raises(OSError) as refused:
        os.rename(bad, agent / "config")
    assert refused.value.errno == errno.EINVAL
    assert bad.read_text() == "no such key\n" and "temperature=0.5\n" in (agent / "config").read_text()
    assert (agent / "error").read_text().startswith("EINVAL - ")
    os.unlink(bad)
    assert not bad.exists()

    fd = os.open(agent / "config", os.O_WRONLY | os.O_CREAT | os.O_EXCL)  # tar -x of a config replaces it
    os.write(fd, b"temperature=0.25\n")
    os.close(fd)
    assert "temperature=0.25\n" in (agent / "config").read_text()
    for make in (lambda: (agent / "notes").write_text("x"), lambda: os.mkdir(agent / "sub")):
        with pytest.raises(PermissionError):
            make()  # files are kept in memory/
    os.mkdir(agent / "memory", 0o777)  # as cp -r recreates it: the agent's own memory/, as it was
    os.makedirs(agent / "memory", exist_ok=True)
    assert stat.S_IMODE(os.stat(agent / "memory").st_mode) == 0o750  # a mkdir -p does not open it to others
    assert (agent / "status").read_text() == "idle -\n"


def test_fork_copies_the_agent_with_its_versions_and_shares_its_kv(fs: Mount) -> None:
    parent = make_agent(fs, "parent")
    before = stats(fs)
    assert sh(f'echo "fork child" > {parent}/ctl').returncode == 0
    child = fs.agents / "child"
    assert data(child) == data(parent)
    assert modes(child) == modes(parent)
    assert (child / "versions").read_text() == (parent / "versions").read_text()
    is_idle_and_untouched(child)
    assert (os.stat(child).st_uid, os.stat(child / "memory" / "notes.md").st_uid) == (os.getuid(), os.getuid())

    assert sh(f'echo "rollback notes.md 1" > {child}/ctl').returncode == 0  # the versions came along
    assert (child / "memory" / "notes.md").read_text() == "first draft\n"
    assert (parent / "memory" / "notes.md").read_text() == "the blue door is locked\n"

    assert ask(child, "who am i") == "turn 2: WHO AM I\n"
    after = stats(fs)
    assert after["shared_prefix_hits"] == before["shared_prefix_hits"] + 1
    assert after["shared_prefix_tokens"] - before["shared_prefix_tokens"] >= 256

    taken = sh(f'echo "fork child" > {parent}/ctl')
    assert taken.returncode == 1 and "File exists" in taken.stderr
    assert (parent / "error").read_text().splitlines()[-1].startswith("EEXIST - ")
    for bad in ("a/b", ".."):
        refused = sh(f'echo "fork {bad}" > {parent}/ctl')
        assert refused.returncode == 1 and "Invalid argument" in refused.stderr
    log = [json.loads(line) for line in (fs.root / "kernel" / "log").read_text().splitlines()]
    assert any(e["event"] == "fork" and e["agent"] == "child" and e["source"] == "parent" for e in log)
    assert any(e["event"] == "ctl" and e.get("command") == "fork child" for e in log)


@pytest.mark.usefixtures("require_root")
def test_fork_needs_the_right_to_read_the_agent(fs: Mount) -> None:
    agent = make_agent(fs, "guarded")  # root's
    os.chmod(agent / "ctl", 0o666)  # others may write its ctl, which alone is not enough

    def fork_as_nobody() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", f'echo "fork theirs" > {agent}/ctl'],
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=30,
        )

    memory = agent / "memory"
    # each step lets the other user read one more part, and the fork is still refused
    steps = [(agent, 0o711), (agent, 0o755), *((agent / name, 0o644) for name in DATA), (memory, 0o755), (memory / "plans", 0o755)]
    for path, mode in steps:
        os.chmod(path, mode)
        refused = fork_as_nobody()
        assert refused.returncode == 1 and "Permission denied" in refused.stderr, (path, refused.stderr)
        last = json.loads((fs.root / "kernel" / "log").read_text().splitlines()[-1])  # a denial is audited
        assert (last["event"], last["uid"], last["errno"], last["agent"]) == ("deny", NOBODY, "EACCES", "guarded"), last
        assert not (fs.agents / "theirs").exists()
    os.chmod(memory / "plans" / "todo.txt", 0o644)
    allowed = fork_as_nobody()
    assert allowed.returncode == 0, allowed.stderr
    theirs = fs.agents / "theirs"
    assert os.stat(theirs).st_uid == NOBODY and os.stat(theirs / "memory" / "plans" / "todo.txt").st_uid == NOBODY
    assert data(theirs) == data(agent)


@pytest.fixture
def user_home() -> Iterator[Path]:
    """A directory of uid 65534's own, which it can reach (pytest's are root's only)."""
    home = Path(tempfile.mkdtemp(prefix="aiosfs-home-", dir="/tmp"))
    os.chmod(home, 0o755)
    os.chown(home, NOBODY, NOBODY)
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.usefixtures("require_root")
def test_a_user_backs_up_and_restores_their_own_agent(fs: Mount, user_home: Path) -> None:
    """As an ordinary user (uid 65534), with every tool: out of the mount and back in."""
    home = user_home
    mine = fs.agents / "mine"
    script = f"""
    set -e
    mkdir {mine}
    echo "system=You are the user's own agent, kept for a long time; answer in few words, always." > {mine}/config
    echo "remember me" > {mine}/prompt
    cat {mine}/output
    echo "a note" > {mine}/memory/note.md
    cd {home}
    cp -a {mine} cp-a
    tar -cf mine.tar -C {fs.agents} mine
    rsync -a {mine}/ rsync/
    cp -r cp-a {fs.agents}/mine-cp
    tar -xf mine.tar -C {fs.agents} --transform 's,^mine,mine-tar,'
    rsync -a rsync/ {fs.agents}/mine-rsync/
    echo again > {fs.agents}/mine-cp/prompt
    cat {fs.agents}/mine-cp/output
    """
    result = subprocess.run(
        ["bash", "-c", f"umask 022; {script}"], user=NOBODY, group=NOBODY, extra_groups=[], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "turn 1: REMEMBER ME\nturn 2: AGAIN\n"
    for name in ("mine-cp", "mine-tar", "mine-rsync"):
        copy = fs.agents / name
        assert os.stat(copy).st_uid == NOBODY, name
        if name != "mine-cp":  # its first prompt is in its context now
            assert data(copy) == data(mine), name
            umask = 0o022 if name == "mine-tar" else 0  # tar applies a user's umask, as on any disk
            assert modes(copy) == {file: oct(int(mode, 8) & ~umask) for file, mode in modes(mine).items()}, name
        assert (copy / "memory" / "note.md").read_text() == "a note\n"
