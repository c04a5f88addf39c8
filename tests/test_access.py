"""Who may do what on a real mount, checked as real users against the Linux kernel.

The permission matrix opens every file of an agent and of `kernel/` for reading
and for writing as four users: the agent's owner, a member of its group (through
a supplementary group only), another user and root. The expected outcome comes
from two rules (docs/protocol.md §1, §2): the mode bits, which root bypasses, and
the file class, which holds for root too. Each test collects every mismatch and
fails with the whole table, so one run shows the whole matrix.

The isolation tests check that users who share an agent see only their own
answers, statuses and errors, that `kernel/ps` and the events files never show a
prompt or an answer, and that each open `call` file is its own conversation.

Users are switched in forked children (setgroups, setresgid, setresuid), so the
VFS and aiosfs see real unprivileged credentials.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import pickle
import select
import signal
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
from mounting import Mount, mounted, needs_fuse, needs_root

pytestmark = [needs_fuse, needs_root]


# -- users ---------------------------------------------------------------------------
@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.groups


OWNER = User("owner", 65533, 65533)
MEMBER = User("member", 65532, 65532, (65533,))  # in the owner's group only as a supplementary group
OTHER = User("other", 65534, 65534)
ROOT = User("root", 0, 0)
USERS = (OWNER, MEMBER, OTHER, ROOT)


def become(user: User) -> None:
    os.setgroups(list(user.groups))
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)
    os.umask(0o022)  # fixed, so agent directories come out 0755 whatever the test runner's umask


@dataclass
class Child:
    pid: int
    fd: int
    user: User


def start_as(user: User, action: Callable[[], Any]) -> Child:
    """Run `action` as `user` in a forked child; `finish` collects its (pickled) result."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _child_main(user, action, write_end)
    os.close(write_end)
    return Child(pid, read_end, user)


def _child_main(user: User, action: Callable[[], Any], fd: int) -> NoReturn:
    try:
        try:
            become(user)
            payload: tuple[bool, Any] = (True, action())
        except BaseException:
            payload = (False, traceback.format_exc())
        with os.fdopen(fd, "wb") as out:
            pickle.dump(payload, out)
    finally:
        os._exit(0)  # never return into pytest from a forked child


def finish(child: Child, timeout: float = 60.0) -> Any:
    data = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([child.fd], [], [], left)[0]:
                os.kill(child.pid, signal.SIGKILL)
                raise AssertionError(f"as {child.user.name}: no answer within {timeout} s")
            chunk = os.read(child.fd, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(child.fd)
        os.waitpid(child.pid, 0)
    if not data:
        raise AssertionError(f"as {child.user.name}: the child died without an answer")
    ok, value = pickle.loads(data)
    if not ok:
        raise AssertionError(f"as {child.user.name}:\n{value}")
    return value


def as_user(user: User, action: Callable[[], Any], timeout: float = 60.0) -> Any:
    return finish(start_as(user, action), timeout)


def outcome(action: Callable[[], object]) -> str:
    """What happened: "ok", the errno's name, or what the action says went wrong (a str)."""
    try:
        said = action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return said if isinstance(said, str) else "ok"


def cell(got: str, want: str) -> str:
    return got if got == want else f"{got}(want {want})"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)) for row in [header, *rows])


def read_text(path: Path) -> str:
    return path.read_text()


def write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


# -- the mount -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    # 10 ms a decode step: jobs of a few dozen tokens overlap, and the matrix runs none
    with mounted(tmp_path_factory.mktemp("access"), "--backend", "fake", "--fake-delay", "0.01") as mount:
        yield mount


def make_agent(fs: Mount, name: str, user: User = OWNER, modes: dict[str, int] | None = None) -> Path:
    """`mkdir agents/NAME` as `user`, then chmod as that user (the owner) where asked."""
    path = fs.agents / name

    def create() -> None:
        os.mkdir(path)
        for file, mode in (modes or {}).items():
            os.chmod(path / file if file else path, mode)

    as_user(user, create)
    return path


# -- the open matrix ---------------------------------------------------------------------
@dataclass(frozen=True)
class Node:
    path: str  # relative to the mount root
    cls: str
    mode: int
    owner: tuple[int, int]  # uid, gid


AGENT_FILES = [
    ("prompt", "submit", 0o620),
    ("output", "growing", 0o640),
    ("call", "rpc", 0o660),
    ("status", "snapshot", 0o644),
    ("error", "snapshot", 0o640),
    ("context", "stored", 0o640),
    ("config", "stored", 0o640),
    ("permissions", "stored", 0o640),
    ("ctl", "ctl", 0o620),
    ("events", "events", 0o640),
    ("versions", "snapshot", 0o640),
    ("recall", "rpc", 0o640),
    ("memory", "dir", 0o750),
]
GLOBAL_FILES = [
    ("README", "snapshot", 0o444),
    ("kernel/status", "snapshot", 0o444),
    ("kernel/stats", "snapshot", 0o444),
    ("kernel/metrics", "snapshot", 0o444),
    ("kernel/ps", "snapshot", 0o444),
    ("kernel/models", "snapshot", 0o444),
    ("kernel/scheduler", "stored", 0o644),
    ("kernel/log", "snapshot", 0o400),
    ("kernel/events", "events", 0o444),
    ("kernel/trash", "snapshot", 0o444),
    ("kernel/ctl", "ctl", 0o222),  # writable by all: owners may restore their agents; each verb checks the caller
]
ACCESS = {"r": os.O_RDONLY, "w": os.O_WRONLY}
CLASS_REFUSES = {"r": set(), "w": {"snapshot", "growing", "events"}}  # rule 2, root included (control files read empty)


def matrix_nodes(agent: str) -> list[Node]:
    owned = [Node(f"agents/{agent}/{name}", cls, mode, (OWNER.uid, OWNER.gid)) for name, cls, mode in AGENT_FILES]
    return owned + [Node(path, cls, mode, (0, 0)) for path, cls, mode in GLOBAL_FILES]


def mode_allows(user: User, mode: int, owner: tuple[int, int], bits: int) -> bool:
    """Rule 1: the owner, group or other bits that apply to `user`; root needs none."""
    if user.is_root:
        return True
    shift = 6 if user.uid == owner[0] else 3 if user.in_group(owner[1]) else 0
    return (mode >> shift) & bits == bits


def expected_open(user: User, node: Node, access: str) -> str:
    if node.cls == "dir" and access == "w":
        return "EISDIR"  # the VFS refuses a write open of a directory before looking at modes
    if not mode_allows(user, node.mode, node.owner, 4 if access == "r" else 2):
        return "EACCES"
    return "EACCES" if node.cls in CLASS_REFUSES[access] else "ok"


def open_close(path: Path, flags: int) -> None:
    os.close(os.open(path, flags))


def try_opens(root: Path, nodes: list[Node]) -> dict[tuple[str, str], str]:
    return {(n.path, a): outcome(functools.partial(open_close, root / n.path, f)) for n in nodes for a, f in ACCESS.items()}


def test_open_matrix(fs: Mount) -> None:
    agent = make_agent(fs, "matrix")
    stored = {name: (agent / name).read_text() for name in ("context", "config", "permissions")}
    nodes = matrix_nodes("matrix")
    results = {user: as_user(user, lambda: try_opens(fs.root, nodes)) for user in USERS}
    mismatches: list[str] = []
    rows: list[list[str]] = []
    for node in nodes:
        mismatches += check_attributes(fs.root / node.path, node)
        row = [f"{node.path} ({node.cls} {node.mode:04o})"]
        for user in USERS:
            for access in ACCESS:
                got, want = results[user][(node.path, access)], expected_open(user, node, access)
                row.append(cell(got, want))
                if got != want:
                    mismatches.append(f"{user.name} open {node.path} O_{'RDONLY' if access == 'r' else 'WRONLY'}: got {got}, want {want}")
        rows.append(row)
    header = ["file", *(f"{u.name}:{a}" for u in USERS for a in ACCESS)]
    mismatches += nothing_submitted(fs, agent, stored)
    assert not mismatches, "\n".join(mismatches) + "\n\n" + table(header, rows)


def check_attributes(path: Path, node: Node) -> list[str]:
    st = os.stat(path)
    got = (st.st_mode & 0o7777, (st.st_uid, st.st_gid))
    want = (node.mode, node.owner)
    return [] if got == want else [f"stat {node.path}: mode/owner {got[0]:04o} {got[1]}, want {want[0]:04o} {want[1]}"]


def nothing_submitted(fs: Mount, agent: Path, stored: dict[str, str]) -> list[str]:
    """Write opens of prompt, call, ctl and the stored files, closed without a write, change nothing."""
    problems = []
    for user in USERS:
        status = as_user(user, lambda: read_text(agent / "status"))  # 0644: everyone may read it
        if status != "idle -\n":
            problems.append(f"{user.name}: status after empty write opens is {status!r}, want 'idle -'")
    for name, before in stored.items():
        if (agent / name).read_text() != before:
            problems.append(f"{name} changed by empty write opens: {(agent / name).read_text()!r}, was {before!r}")
    log = [json.loads(line) for line in (fs.root / "kernel" / "log").read_text().splitlines()]
    problems += [f"kernel/log shows a command from an empty ctl open: {e}" for e in log if e.get("event") == "ctl" and e.get("agent") == agent.name]
    return problems


# -- the operation matrix ------------------------------------------------------------------
Op = tuple[str, Callable[[], object], str]  # row label, action, expected outcome


def create_file(path: Path) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))


def owned_by(path: Path, user: User) -> str | None:
    st = os.stat(path)
    return None if (st.st_uid, st.st_gid) == (user.uid, user.gid) else f"owner {st.st_uid}:{st.st_gid}"


def operations(fs: Mount, user: User) -> list[Op]:
    closed = fs.agents / "ops"  # 0755: only its owner (and root) may change names in it
    opened = fs.agents / "ops-open"  # 0777: the VFS lets everyone through, so aiosfs answers
    mine = fs.agents / f"ops-by-{user.name}"
    victim = fs.agents / ("victim-of-other" if user == OWNER else "victim-of-owner")
    manages = user.is_root or user == OWNER  # w+x on `closed`, may chmod it
    memory = (OWNER.uid, OWNER.gid)

    def memory_op(bits: int) -> str:
        # memory/ is 0750: searching it needs x as well as the bits asked for
        return "ok" if mode_allows(user, 0o750, memory, bits | 1) else "EACCES"

    chown_to = (OWNER.uid, OWNER.gid) if user.is_root else (OTHER.uid, OTHER.gid) if user == OWNER else (user.uid, user.gid)
    return [
        ("mkdir agents/NAME (own agent)", lambda: os.mkdir(mine), "ok"),
        ("  owned by its creator", lambda: owned_by(mine, user), "ok"),
        ("rmdir own empty agent", lambda: os.rmdir(mine), "ok"),
        ("rmdir another user's agent", lambda: os.rmdir(victim), "ok" if user.is_root else "EPERM"),
        ("unlink prompt (agent 0777)", lambda: os.unlink(opened / "prompt"), "EPERM"),
        ("rename prompt (agent 0777)", lambda: os.rename(opened / "prompt", opened / "renamed"), "EPERM"),
        ("create a file (agent 0777)", lambda: create_file(opened / f"new-{user.name}"), "EPERM"),
        ("mkdir in an agent (0777)", lambda: os.mkdir(opened / f"sub-{user.name}"), "EPERM"),
        ("unlink prompt (agent 0755)", lambda: os.unlink(closed / "prompt"), "EPERM" if manages else "EACCES"),
        ("rename prompt (agent 0755)", lambda: os.rename(closed / "prompt", closed / "renamed"), "EPERM" if manages else "EACCES"),
        ("create a file in memory/", lambda: create_file(closed / "memory" / f"by-{user.name}"), memory_op(2)),
        ("list memory/", lambda: os.listdir(closed / "memory"), memory_op(4)),
        ("chmod the agent dir", lambda: os.chmod(closed, 0o755), "ok" if manages else "EPERM"),
        ("chmod prompt", lambda: os.chmod(closed / "prompt", 0o620), "ok" if manages else "EPERM"),
        ("chown the agent dir", lambda: os.chown(closed, *chown_to), "ok" if user.is_root else "EPERM"),
        ("chown prompt (to its owner)", lambda: os.chown(closed / "prompt", OWNER.uid, OWNER.gid), "ok" if manages else "EPERM"),
        ("chmod kernel/scheduler", lambda: os.chmod(fs.root / "kernel" / "scheduler", 0o644), "EPERM"),
    ]


def run_operations(fs: Mount, user: User) -> list[tuple[str, str, str]]:
    return [(label, outcome(action), want) for label, action, want in operations(fs, user)]


def test_operation_matrix(fs: Mount) -> None:
    make_agent(fs, "ops")
    make_agent(fs, "ops-open", modes={"": 0o777})
    make_agent(fs, "victim-of-owner")
    make_agent(fs, "victim-of-other", OTHER)
    results = {user: as_user(user, functools.partial(run_operations, fs, user)) for user in USERS}  # root last: it removes a victim
    labels = [label for label, _, _ in results[OWNER]]
    rows = [[label, *(cell(got, want) for _, got, want in (results[u][i] for u in USERS))] for i, label in enumerate(labels)]
    mismatches = [f"{u.name} {label}: got {got}, want {want}" for u in USERS for label, got, want in results[u] if got != want]
    assert not mismatches, "\n".join(mismatches) + "\n\n" + table(["operation", *(u.name for u in USERS)], rows)


# -- isolation -------------------------------------------------------------------------------
SHARED = {"": 0o777, "prompt": 0o666, "output": 0o644}  # every user may prompt and read the agent


def prompt_and_read(agent: Path, message: str, go: int) -> tuple[str, str, str]:
    os.read(go, 1)  # start together with the others
    write_text(agent / "prompt", message)
    before = read_text(agent / "status")
    return before, read_text(agent / "output"), read_text(agent / "status")


def read_events_until(path: Path, agent: str, ends: int, ready: int) -> list[dict[str, Any]]:
    """Every event of `agent` until `ends` jobs have ended; `ready` is told once the file is open."""
    lines: list[dict[str, Any]] = []
    with open(path, "rb", buffering=0) as events:
        os.write(ready, b"!")
        pending = b""
        while sum(e["event"] in ("done", "error", "cancelled") for e in lines) < ends:
            pending += events.read(65536) or b""
            *complete, pending = pending.split(b"\n")
            lines += [json.loads(raw) for raw in complete if raw]
            lines = [e for e in lines if e.get("agent") == agent]
    return lines


def watch_events(user: User, path: Path, agent: str, ends: int) -> Child:
    ready_r, ready_w = os.pipe()
    child = start_as(user, lambda: read_events_until(path, agent, ends, ready_w))
    os.close(ready_w)
    ready = select.select([ready_r], [], [], 30)[0] and os.read(ready_r, 1)
    os.close(ready_r)
    assert ready, f"{user.name} could not open {path}"
    return child


def test_users_sharing_an_agent_see_only_their_own_answers(fs: Mount) -> None:
    agent = make_agent(fs, "duet", modes=SHARED)
    watcher = watch_events(ROOT, agent / "events", "duet", ends=3)
    messages = {OWNER: "owner says alpha", MEMBER: "member says bravo", OTHER: "other says charlie"}
    go_r, go_w = os.pipe()
    children = {user: start_as(user, functools.partial(prompt_and_read, agent, message, go_r)) for user, message in messages.items()}
    os.write(go_w, b"x" * len(children))
    results = {user: finish(child) for user, child in children.items()}
    os.close(go_r)
    os.close(go_w)
    queued = {e["job"]: e["uid"] for e in finish(watcher) if e["event"] == "queued"}
    turns = set()
    for user, (before, output, after) in results.items():
        job = int(after.split()[1])
        assert after == f"done {job}\n" and before.split()[1] == str(job), (user.name, before, after)
        assert queued.get(job) == user.uid, f"{user.name}'s status names job {job}, queued for uid {queued.get(job)}"
        turn, _, answer = output.partition(": ")
        assert answer == messages[user].upper() + "\n", f"{user.name} read {output!r}"
        turns.add(turn)
    assert turns == {"turn 1", "turn 2", "turn 3"}  # three turns of one conversation, each read by its author
    assert len({int(after.split()[1]) for _, _, after in results.values()}) == 3


def prompt_and_answer(agent: Path, message: str) -> str:
    write_text(agent / "prompt", message)
    return read_text(agent / "output")


def submit_then_pause(agent: Path, message: str) -> str:
    write_text(agent / "prompt", message)
    write_text(agent / "ctl", "pause\n")
    return read_text(agent / "status")


def test_ps_and_events_never_show_prompts_or_answers(fs: Mount) -> None:
    agent = make_agent(fs, "secretive")
    kernel_watch = watch_events(OTHER, fs.root / "kernel" / "events", "secretive", ends=2)
    agent_watch = watch_events(MEMBER, agent / "events", "secretive", ends=2)  # 0640: the group may read
    answered = as_user(OWNER, lambda: prompt_and_answer(agent, "quokka whispers"))
    assert answered == "turn 1: QUOKKA WHISPERS\n"
    status = as_user(OWNER, lambda: submit_then_pause(agent, "zanzibar " * 60))  # a long answer, held by pause
    job = status.split()[1]
    ps = as_user(OTHER, lambda: read_text(fs.root / "kernel" / "ps"))
    as_user(OWNER, lambda: write_text(agent / "ctl", "cancel all\n"))
    mine = [line.split() for line in ps.splitlines() if line.split()[:1] == [job]]
    assert mine and mine[0][1:4] == ["secretive", str(OWNER.uid), "suspended"], ps
    assert "zanzibar" not in ps.lower()
    for watcher, who in ((kernel_watch, "kernel/events"), (agent_watch, "agents/secretive/events")):
        events = finish(watcher)
        text = json.dumps(events).lower()
        assert "quokka" not in text and "zanzibar" not in text, f"{who} shows request or answer text: {text}"
        assert {e["uid"] for e in events} == {OWNER.uid} and str(job) in {str(e["job"]) for e in events}, f"{who}: {events}"
        assert [e["event"] for e in events][-1] == "cancelled"


def two_sessions(agent: Path) -> list[bytes]:
    first, second = os.open(agent / "call", os.O_RDWR), os.open(agent / "call", os.O_RDWR)
    try:
        answers = []
        for fd, message in ((first, b"alpha"), (second, b"bravo"), (first, b"charlie"), (second, b"delta"), (second, b"echo")):
            os.write(fd, message)
            answers.append(read_to_eof(fd))
        return answers
    finally:
        os.close(first)
        os.close(second)


def read_to_eof(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    return data


def test_call_sessions_are_private_to_each_open_file(fs: Mount) -> None:
    agent = make_agent(fs, "sessions")
    answers = as_user(OWNER, lambda: two_sessions(agent))
    # the turn number counts the user messages of that fd's conversation only
    assert answers == [b"turn 1: ALPHA\n", b"turn 1: BRAVO\n", b"turn 2: CHARLIE\n", b"turn 2: DELTA\n", b"turn 3: ECHO\n"]
    member = as_user(MEMBER, lambda: two_sessions(agent))  # call is 0660: the group has its own sessions too
    assert member == answers
    assert (agent / "context").read_text() == ""


def oversized_prompt(agent: Path) -> None:
    fd = os.open(agent / "prompt", os.O_WRONLY)
    try:
        os.write(fd, b"x" * (256 * 1024 + 1))
    finally:
        os.close(fd)


def test_error_file_shows_each_user_only_their_own(fs: Mount) -> None:
    agent = make_agent(fs, "mistakes", modes={"prompt": 0o666, "ctl": 0o222, "error": 0o644})
    causes: dict[User, Callable[[], object]] = {
        OWNER: lambda: write_text(agent / "prompt", "{not json"),
        MEMBER: lambda: write_text(agent / "ctl", "frobnicate\n"),
        OTHER: lambda: oversized_prompt(agent),
    }
    for user, cause in causes.items():
        assert as_user(user, functools.partial(outcome, cause)) in ("EINVAL", "EFBIG")
    errors = {user: as_user(user, lambda: read_text(agent / "error")) for user in USERS}
    assert errors[OWNER].startswith("EINVAL - ") and "ctl" not in errors[OWNER], errors
    assert errors[MEMBER].startswith("EINVAL - ") and "frobnicate" in errors[MEMBER], errors
    assert errors[OTHER].startswith("EFBIG - "), errors
    assert errors[ROOT] == "", errors
    assert len(set(errors.values())) == len(USERS)


# -- recall and rollback through a supplementary group ----------------------------------------
def recall_or_errno(agent: Path, query: str) -> str:
    """The passages `recall` answers for `query`, or the errno that refused them."""
    fd = os.open(agent / "recall", os.O_RDWR)
    try:
        os.write(fd, query.encode())
        return read_to_eof(fd).decode()
    except OSError as exc:
        return errno.errorcode[exc.errno or 0]
    finally:
        os.close(fd)


def test_group_member_may_recall_and_roll_back_memory(fs: Mount) -> None:
    agent = make_agent(fs, "notebook", modes={"recall": 0o666, "ctl": 0o222})

    def write_notes() -> None:
        for text in ("the heron nests by the lake\n", "the heron left the lake\n"):
            write_text(agent / "memory" / "notes.md", text)
        os.chmod(agent / "memory" / "notes.md", 0o664)

    as_user(OWNER, write_notes)
    got = {user.name: as_user(user, lambda: recall_or_errno(agent, "heron")) for user in USERS}
    # memory/ is 0750: the group may search and read it, others may not
    assert all('"path": "notes.md"' in got[name] for name in ("owner", "member", "root")), got
    assert got["other"] == "EACCES", got
    rolled = as_user(MEMBER, lambda: outcome(lambda: write_text(agent / "ctl", "rollback notes.md 1\n")))
    assert rolled == "ok"
    assert (agent / "memory" / "notes.md").read_text() == "the heron nests by the lake\n"
