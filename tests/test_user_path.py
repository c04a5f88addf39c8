"""The README's path for an ordinary user, end to end: a real mount, the embedded model, bash.

A user made for the test (`useradd`, removed after it) types in bash: `aiosfs mount ~/aios`
with neither `--state` nor `--model`; `mkdir` an agent, a prompt and its answer; a file in
`memory/` and `recall`; `tools/calculator`; `aiosfs unmount`; and a second mount that brings
back the agent, its conversation and its memory. On the way the test checks what that path
rests on:
- the mount is the user's: a process without capabilities can mount FUSE only through the
  set-uid `fusermount3`; the daemon and its engine run as the user with no capabilities; the
  mount carries `user_id=UID`, and `allow_other` only where /etc/fuse.conf says
  `user_allow_other` (without it even root is refused);
- the state is in the user's home (`~/.local/state/aiosfs/<mountpoint>`, everything in it the
  user's), and the default model is found in the user's data directory
  (`~/.local/share/aiosfs/models`);
- the agent and its memory files are owned by the user.

How the user runs the project. The test runs as root; the user must run the same interpreter,
installed packages (llama-cpp-python, pyfuse3) and source. On machines like CI's they are under
/root (pyenv), mode 0700, which no other uid can enter. The test does not open /root (a mode
change or an ACL would expose every world-readable file under it, and would outlive a test
that is killed), copy the interpreter (1.3 GB with its packages) or build another environment
(llama-cpp-python compiles for minutes). It bind-mounts read-only just what the user cannot
reach into its own directory under /tmp: the interpreter's prefix (with LD_LIBRARY_PATH for
libpython, whose RUNPATH names /root) and, when the checkout is out of reach too, the source
tree (on PYTHONPATH). Where the user can already run the interpreter and import the project
(a system Python, a checkout in /home), nothing is bound. `aiosfs` on the user's PATH is a
two-line stand-in for the installed console script, whose `#!` line names the path under /root.
The binds need no package and no network, only root, which making a user needs anyway.

The user's commands run under `setpriv --reuid --regid --init-groups` in a clean login
environment (HOME, USER, PATH; no XDG variables), so every default is the user's own. Root only
prepares (the user, its home, the binds, a copy of the shipped model where
`python3 -m setup.model fetch` puts it, as there is no network here) and looks (the mount
table, /proc, the files).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mounting import IN_CI, Daemon, Mount, listed

import aiosfs
from aiosfs.mount import MountError, check_fuse, slug, user_allow_other
from setup.model import SHIPPED_MODEL_FILE

SOURCE = Path(aiosfs.__file__).resolve().parent.parent
PACKAGES = "import llama_cpp, pyfuse3, trio"  # the interpreter and what is installed in it
PROJECT = "import aiosfs.cli, kernel, services"  # the source
MOUNT_ARGS = "--threads 2 --slots 2 --ctx 1024"  # small, as the other tests on the embedded model
AGENT = "~/aios/agents/x"
QUESTION = "What is the capital of France?"
NOTE = "The lab door code is 4711."


def unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the ordinary user's path must be tested)")
    pytest.skip(reason)


@dataclass
class Login:
    """An ordinary user's shell: `bash -c` with the user's credentials and login environment."""

    name: str
    uid: int
    gid: int
    home: Path
    env: dict[str, str] = field(default_factory=dict)

    def sh(self, script: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        argv = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "bash", "-c", script]
        return subprocess.run(argv, env=self.env, cwd=self.home, umask=0o022, capture_output=True, text=True, timeout=timeout)

    def ok(self, script: str, timeout: float = 300) -> str:
        result = self.sh(script, timeout)
        assert result.returncode == 0, f"as {self.name}: `{script}` exited {result.returncode}:\n{result.stdout}{result.stderr}"
        return result.stdout

    def owner(self, path: str) -> str:
        return self.ok(f"stat -c %u:%g {path}").strip()


def bind(source: Path, target: Path) -> None:
    """A read-only view of `source` at `target` (two steps: older mounts ignore `ro` on a bind)."""
    target.mkdir()
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True, capture_output=True)


def processes_of(uid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            status = (entry / "status").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        match = re.search(r"^Uid:\s+(\d+)", status, re.M)
        if match and int(match.group(1)) == uid:
            pids.append(int(entry.name))
    return pids


def give_interpreter(login: Login, base: Path, binds: list[Path]) -> str:
    """Make this interpreter and the project usable by the user (see the module's docstring);
    returns the interpreter's path as the user sees it."""
    python = sys.executable
    if login.sh(f"{python} -c '{PACKAGES}'").returncode != 0:
        prefix = base / "python"
        bind(Path(sys.prefix), prefix)
        binds.append(prefix)
        python = str(prefix / Path(sys.executable).relative_to(sys.prefix))
        login.env["LD_LIBRARY_PATH"] = str(prefix / "lib")
    where = f"{python} -c '{PROJECT}; print(aiosfs.cli.__file__)'"
    found = login.sh(where)
    if found.returncode != 0 or Path(found.stdout.strip()).resolve().parent.parent != SOURCE:  # out of reach, or another copy
        source = base / "src"
        bind(SOURCE, source)
        binds.append(source)
        login.env["PYTHONPATH"] = str(source)
        found = login.sh(where)
    if found.returncode != 0 or Path(found.stdout.strip()).parent.parent not in (SOURCE, base / "src"):
        pytest.fail(f"the user {login.name} cannot run {sys.executable} and import this checkout ({SOURCE}), even through bind mounts:\n{found}")
    return python


def clean_up(name: str, uid: int | None, base: Path, binds: list[Path]) -> None:
    """Undo the fixture, whatever the test left: mounts, the user's processes, binds, user, files."""
    if listed(base / "home" / "aios"):
        subprocess.run(["fusermount3", "-uz", str(base / "home" / "aios")], check=False, capture_output=True)
    if uid is not None:
        for pid in processes_of(uid):  # a user made for this test: all its processes are the test's
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for point in reversed(binds):
        if subprocess.run(["umount", str(point)], check=False, capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], check=False, capture_output=True)
    if uid is not None:
        subprocess.run(["userdel", name], check=False, capture_output=True)
    if not any(listed(point) for point in binds):  # never delete through a bind of the interpreter
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def login(require_fuse: None, model: Path) -> Iterator[Login]:
    """A new ordinary user with a home under /tmp, the project usable, and the shipped model in
    its data directory."""
    if os.geteuid() != 0:
        unavailable("making a user and bind mounts needs root")
    for tool in ("useradd", "userdel", "setpriv", "mount", "umount", "fusermount3"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is not installed: run scripts/setup (fusermount3 is in fuse3; useradd in passwd; setpriv in util-linux)")
    base = Path(tempfile.mkdtemp(prefix="aiosfs-user-", dir="/tmp"))
    os.chmod(base, 0o755)
    name = f"aiosfs-user-{os.getpid()}"
    home = base / "home"
    uid: int | None = None
    binds: list[Path] = []
    try:
        home.mkdir()
        made = subprocess.run(
            ["useradd", "--no-create-home", "--home-dir", str(home), "--shell", "/bin/bash", "--user-group", name], capture_output=True, text=True
        )
        assert made.returncode == 0, f"useradd {name} failed: {made.stderr}"
        entry = pwd.getpwnam(name)
        uid = entry.pw_uid
        os.chown(home, entry.pw_uid, entry.pw_gid)
        os.chmod(home, 0o700)
        env = {"HOME": str(home), "USER": name, "LOGNAME": name, "SHELL": "/bin/bash", "LANG": "C.UTF-8"}
        user = Login(name, entry.pw_uid, entry.pw_gid, home, env)
        python = give_interpreter(user, base, binds)
        bin_dir = base / "bin"
        bin_dir.mkdir()
        (bin_dir / "aiosfs").write_text(f'#!/bin/sh\nexec {python} -m aiosfs.cli "$@"\n')
        (bin_dir / "aiosfs").chmod(0o755)
        os.symlink(python, bin_dir / "python3")
        env["PATH"] = f"{bin_dir}:/usr/local/bin:/usr/bin:/bin"
        models = home / ".local" / "share" / "aiosfs" / "models"
        user.ok(f"mkdir -p {models}")
        shutil.copyfile(model, models / SHIPPED_MODEL_FILE)
        os.chown(models / SHIPPED_MODEL_FILE, entry.pw_uid, entry.pw_gid)
        yield user
    finally:
        clean_up(name, uid, base, binds)


class UserMount(Mount):
    """`aiosfs mount ~/aios` typed by the user with the default state directory and model;
    `aiosfs unmount` as the user at the end, with the checks of `Mount.stop`."""

    def __init__(self, login: Login) -> None:
        root = login.home / "aios"
        super().__init__(root, login.home / ".local" / "state" / "aiosfs" / slug(root), MOUNT_ARGS.split())
        self.login = login
        self.said = ""  # what `aiosfs mount` printed

    def command(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.login.sh(" ".join(["aiosfs", *args]), timeout)

    def is_dead(self) -> bool:  # root may not enter a mount without allow_other: the user asks
        return "Transport endpoint is not connected" in self.login.sh(f"stat {self.root}/kernel").stderr

    def start(self) -> subprocess.CompletedProcess[str]:
        if self.log_start is None:
            self.log_start = self.log.stat().st_size if self.log.exists() else 0
        result = self.login.sh(f"aiosfs mount ~/aios {MOUNT_ARGS}")
        assert result.returncode == 0, f"`aiosfs mount ~/aios` as {self.login.name} failed:\n{result.stdout}{result.stderr}"
        self.said = result.stderr
        self.daemons.append(Daemon(self.daemon_pid()))
        return result


@contextmanager
def user_mounted(login: Login) -> Iterator[UserMount]:
    mount = UserMount(login)
    mount.start()
    try:
        yield mount
    finally:
        mount.stop()


def credentials(pid: int) -> tuple[set[int], set[int], int]:
    """A process's uids (real, effective, saved, fs), gids and effective capabilities."""
    status = Path(f"/proc/{pid}/status").read_text()

    def field_of(name: str) -> list[str]:
        match = re.search(rf"^{name}:\s+(.*)$", status, re.M)
        assert match, f"no {name} in /proc/{pid}/status"
        return match.group(1).split()

    return {int(v) for v in field_of("Uid")}, {int(v) for v in field_of("Gid")}, int(field_of("CapEff")[0], 16)


def check_users_mount(mount: UserMount, login: Login) -> None:
    """The mount is the user's own, made through fusermount3, served by the user's processes."""
    with open("/proc/self/mounts") as table:
        entries = [line.split() for line in table if line.split()[1] == str(mount.root)]
    assert len(entries) == 1, f"{mount.root} is not in the mount table once: {entries}"
    _, _, fstype, options, *_ = entries[0]
    opts = options.split(",")
    assert fstype == "fuse.aiosfs", entries[0]
    assert f"user_id={login.uid}" in opts and f"group_id={login.gid}" in opts, f"not the user's mount: {options}"
    assert {"nosuid", "nodev"} <= set(opts), f"fusermount3 makes a user's mount nosuid,nodev: {options}"
    assert ("allow_other" in opts) == user_allow_other(), f"allow_other is only for a user when /etc/fuse.conf allows it: {options}"
    if not user_allow_other():
        assert "only this user can use it (no allow_other)" in mount.said, mount.said
        with pytest.raises(PermissionError):
            os.stat(mount.root / "agents")  # root included: nobody else may enter
    engine = re.search(r"engine ready \(pid (\d+)\)", mount.said)
    assert engine, f"`aiosfs mount` did not name its engine process:\n{mount.said}"
    for pid in (mount.daemons[-1].pid, int(engine.group(1))):
        uids, gids, caps = credentials(pid)
        assert uids == {login.uid} and gids == {login.gid}, f"process {pid} runs as uids {uids}, gids {gids}, not as {login.name}"
        assert caps == 0, f"process {pid} has capabilities {caps:#x}: it could mount without fusermount3"
    assert f"state {mount.state}" in mount.said, f"the state should be in the user's home, {mount.state}:\n{mount.said}"


def context_of(login: Login) -> list[dict[str, str]]:
    return [json.loads(line) for line in login.ok(f"cat {AGENT}/context").splitlines()]


def ask(login: Login, question: str) -> str:
    """A prompt typed in bash and its answer read back; the job ends `done`."""
    login.ok(f"echo '{question}' > {AGENT}/prompt")
    answer = login.ok(f"cat {AGENT}/output").strip()
    assert answer, f"an empty answer to {question!r}"
    status = login.ok(f"cat {AGENT}/status").split()
    assert status[:1] == ["done"], f"the job is {status}, not done"
    return answer


def recall(login: Login, query: str) -> list[dict[str, object]]:
    out = login.ok(f"exec 3<>{AGENT}/recall; echo '{query}' >&3; cat <&3")
    return [json.loads(line) for line in out.splitlines()]


def check_memory(login: Login, owner: str) -> None:
    assert login.ok(f"cat {AGENT}/memory/notes.md") == NOTE + "\n"
    assert login.owner(f"{AGENT}/memory/notes.md") == owner
    passages = recall(login, "door code")
    assert passages and passages[0]["path"] == "notes.md" and NOTE in str(passages[0]["text"]), passages


def test_ordinary_user_mounts_asks_remembers_and_remounts(login: Login) -> None:
    owner = f"{login.uid}:{login.gid}"
    models = login.home / ".local" / "share" / "aiosfs" / "models"
    assert login.ok("python3 -m setup.model path").strip() == str(models / SHIPPED_MODEL_FILE), "the default model is not the user's"

    with user_mounted(login) as mount:
        check_users_mount(mount, login)
        login.ok(f"mkdir {AGENT} && echo max_tokens=32 >> {AGENT}/config && echo temperature=0 >> {AGENT}/config")
        assert login.owner(AGENT) == owner, "the agent is not the user's"
        answer = ask(login, QUESTION)
        conversation = context_of(login)
        assert [(turn["role"], turn["content"].strip()) for turn in conversation] == [("user", QUESTION), ("assistant", answer)]

        login.ok(f"echo '{NOTE}' > {AGENT}/memory/notes.md")
        check_memory(login, owner)

        reply = login.ok("""exec 4<>~/aios/tools/calculator; echo '{"expression": "6*7"}' >&4; cat <&4""")
        assert json.loads(reply) == {"ok": True, "result": {"result": 42}}
    # stop(): `aiosfs unmount ~/aios` as the user; the daemon ended cleanly, its log is clean
    assert not listed(mount.root)
    assert not (login.home / ".local" / "share" / "aiosfs" / "run" / f"{slug(mount.root)}.pid").exists()
    assert mount.state.stat().st_mode & 0o777 == 0o700
    for path in [mount.state, *mount.state.rglob("*")]:
        assert (path.stat().st_uid, path.stat().st_gid) == (login.uid, login.gid), f"{path} in the state directory is not the user's"
    assert {"aiosfs.db", "memory.db", "aiosfs.log"} <= {p.name for p in mount.state.iterdir()}

    with user_mounted(login) as again:
        check_users_mount(again, login)
        assert login.ok("ls ~/aios/agents").split() == ["x"]
        assert login.owner(AGENT) == owner
        assert context_of(login) == conversation, "the conversation did not survive the remount"
        check_memory(login, owner)
        ask(login, "And of Germany?")
        grown = context_of(login)
        assert grown[:2] == conversation and [turn["role"] for turn in grown[2:]] == ["user", "assistant"], grown
    assert not listed(again.root)


def test_a_user_who_cannot_open_dev_fuse_is_told_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    """/dev/fuse as a container may leave it (0600, root's only): `aiosfs mount` says so before it
    starts anything, instead of a traceback from the daemon."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: path != "/dev/fuse" and real_access(path, mode, **kw))
    with pytest.raises(MountError, match=r"/dev/fuse \(mode 0\d{3}\) is not readable and writable by you.*chmod 0666 /dev/fuse"):
        check_fuse()
