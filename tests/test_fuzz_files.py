"""The file protocol under random and adversarial writes (hypothesis): bytes written
through open, lseek, write and close to every writable file of an agent and of
`kernel/`, as the agent's owner and as another user. Every write is answered with
success or an errno; nothing reaches the daemon's log as a bug or a traceback; and
the mount keeps serving: `kernel/status` answers and a prompt is still answered."""

from __future__ import annotations

import base64
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mounting import Mount, mounted, needs_fuse, needs_root, troubles

pytestmark = [needs_fuse, needs_root]

OTHER_UID = 65534
AGENT_FILES = ("prompt", "call", "ctl", "config", "context", "permissions", "recall", "memory/fuzz.txt", "memory/notes/a.md")
KERNEL_FILES = ("kernel/ctl", "tools/calculator", "tools/memory_write")
HUGE = b"99999999999999999999999999"
ADVERSARIAL = [
    b"cancel " + HUGE + b"\n",
    b"cancel -" + HUGE + b"\n",
    b"cancel 0x10\n",
    b"rollback fuzz.txt " + HUGE + b"\n",
    b"rollback fuzz.txt @" + HUGE + b"\n",
    b"rollback ../../etc/passwd 1\n",
    b"fork \x00x\n",
    b"fork ..\n",
    b"budget reset\n",
    b"reset\nreset\npause\nresume\n",
    b"restore fz " + HUGE + b"\n",
    b"sched rr quantum=" + HUGE + b"\n",
    b"sched priority\nsched fifo\n",
    b"retry " + b"\xff" * 8 + b"\n",
    b"max_tokens=" + HUGE + b"\n",
    b"priority=-" + HUGE + b"\n",
    b"seed=1e309\n",
    b"temperature=nan\n",
    b"tools=" + b"a" * 5000 + b"\n",
    b"system=" + b"\\" * 3 + b"\n",
    b'{"prompt": "x", "max_tokens": ' + HUGE + b"}",
    b'{"prompt": "x", "temperature": 1e400}',
    b'{"prompt": "x", "seed": -' + HUGE + b"}",
    b'{"prompt": "x", "stop": [' + b'"a",' * 100 + b'"b"]}',
    b'{"messages": [{"role": "user", "content": null}]}',
    b'{"messages": [{"role": "user", "content": [{"type": "image"}]}]}',
    b'{"prompt": "x", "tools": [{"name": "' + b"n" * 300 + b'"}]}',
    b'{"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "#"}}}}',
    b'{"prompt": "x", "tool_choice": {"function": {"name": 7}}}',
    b'{"query": "x", "k": ' + HUGE + b"}",
    b'{"query": "' + b"q" * 70000 + b'"}',
    b'{"expression": "9**9**9**9"}',
    b'{"expression": "' + b"(" * 2000 + b'"}',
    b'{"agent": "../..", "arguments": {}}',
    b'{"path": "../../../../etc/shadow", "content": "x"}',
    b'{"role": "user", "content": "' + b"\\ud800" + b'"}\n',
    b"allow_users " + HUGE + b"\n",
    b"max_tokens " + HUGE + b"\nbudget_tokens -1\n",
    b"\x00" * 64,
    b"\xff\xfe\xfd" * 30,
    b"\n" * 1000,
]
FLAGS = (os.O_WRONLY, os.O_WRONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND, os.O_RDWR, os.O_WRONLY | os.O_CREAT)
OFFSETS = (0, 0, 0, 1, 4095, 1 << 31, 1 << 40)

writes = st.tuples(
    st.sampled_from(AGENT_FILES + KERNEL_FILES),
    st.one_of(st.binary(max_size=600), st.sampled_from(ADVERSARIAL), st.builds(bytes.__add__, st.sampled_from(ADVERSARIAL), st.binary(max_size=64))),
    st.sampled_from(FLAGS),
    st.sampled_from(OFFSETS),
    st.integers(min_value=1, max_value=3),  # the data goes in this many write() calls
)


def write_once(root: Path, target: str, data: bytes, flags: int, offset: int, pieces: int) -> int:
    """open, lseek, write (in pieces), close: 0, or the errno of the first call that failed."""
    path = root / "agents" / "fz" / target if not target.startswith(("kernel/", "tools/")) else root / target
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        return exc.errno or -1
    failed = 0
    try:
        if offset:
            os.lseek(fd, offset, os.SEEK_SET)
        size = max(1, len(data) // pieces)
        for at in range(0, len(data), size):
            os.write(fd, data[at : at + size])
    except OSError as exc:
        failed = exc.errno or -1
    try:
        os.close(fd)
    except OSError as exc:
        failed = failed or exc.errno or -1
    return failed


class Stranger:
    """A process that has become another user (it was forked as root, so it needs no
    import after dropping root: the interpreter lives where that user may not read),
    doing the writes it is sent, one JSON line each way."""

    def __init__(self, root: Path, uid: int) -> None:
        to_child, self._send = os.pipe()
        self._receive, from_child = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                os.close(self._send)
                os.close(self._receive)
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                with os.fdopen(to_child, "r") as requests, os.fdopen(from_child, "w") as answers:
                    for line in requests:
                        target, data, flags, offset, pieces = json.loads(line)
                        answers.write(f"{write_once(root, target, base64.b64decode(data), flags, offset, pieces)}\n")
                        answers.flush()
                code = 0
            finally:
                os._exit(code)
        os.close(to_child)
        os.close(from_child)
        self._answers = os.fdopen(self._receive, "r")

    def write(self, target: str, data: bytes, flags: int, offset: int, pieces: int) -> int:
        os.write(self._send, (json.dumps([target, base64.b64encode(data).decode(), flags, offset, pieces]) + "\n").encode())
        return int(self._answers.readline())

    def close(self) -> None:
        os.close(self._send)
        self._answers.close()
        os.waitpid(self.pid, 0)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mounted(tmp_path_factory.mktemp("fuzz"), "--backend", "fake", "--fake-delay", "0.001") as mount:
        agent = mount.agents / "fz"
        agent.mkdir()
        os.chmod(agent, 0o755)
        (agent / "memory" / "notes").mkdir()
        yield mount


def serving(mount: Mount) -> None:
    """The mount answers, and its log holds no bug or traceback."""
    assert (mount.root / "kernel" / "status").read_text().startswith("running=")
    text = mount.log.read_text(errors="replace")[mount.log_start or 0 :]
    assert not [line for line in text.splitlines() if "Traceback" in line or "bug in" in line], list(troubles(text, mount.allowed))[:3]


# The same examples on every run, so that CI is reproducible; AIOSFS_FUZZ_RANDOM=1 explores new ones.
DERANDOMIZE = not os.environ.get("AIOSFS_FUZZ_RANDOM")
KNOWN = {getattr(errno, name) for name in dir(errno) if name.startswith("E")}


def answered(code: int) -> None:
    assert code == 0 or code in KNOWN, f"not an errno: {code}"
    assert code != errno.ENOTCONN, "the mount went away"


@settings(
    max_examples=700,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
    derandomize=DERANDOMIZE,
)
@given(write=writes)
def test_random_writes_as_the_owner_are_answered_and_the_mount_serves(fuzzed: Mount, write: tuple[Any, ...]) -> None:
    answered(write_once(fuzzed.root, *write))


def test_every_adversarial_write_to_every_file_is_answered(fuzzed: Mount) -> None:
    for target in AGENT_FILES + KERNEL_FILES:
        for data in ADVERSARIAL:
            answered(write_once(fuzzed.root, target, data, os.O_WRONLY | os.O_TRUNC, 0, 1))
    serving(fuzzed)


def test_random_writes_as_another_user_are_answered_and_the_mount_serves(fuzzed: Mount) -> None:
    stranger = Stranger(fuzzed.root, OTHER_UID)
    try:

        @settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None, derandomize=DERANDOMIZE)
        @given(write=writes)
        def as_stranger(write: tuple[Any, ...]) -> None:
            answered(stranger.write(*write))

        as_stranger()
    finally:
        stranger.close()


def test_after_the_fuzz_the_mount_still_answers(fuzzed: Mount) -> None:
    """Last in the module: whatever the writes did, an agent can still be asked."""
    agent = fuzzed.agent("after")
    (agent / "prompt").write_text("still there?\n")
    assert "STILL THERE?" in (agent / "output").read_text()
    serving(fuzzed)
