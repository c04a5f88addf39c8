"""The FUSE operations called directly, without a mount.

Each test builds a Kernel over a real SQLite file with the deterministic
FakeBackend, wraps it in `aiosfs.ops.Operations` and calls the async handlers
with a small stand-in for `pyfuse3.RequestContext`. What needs a real mount
(the VFS, default_permissions, bash) is left to the mount tests.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import stat
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyfuse3
import pytest
import trio
import trio.testing
from kernel_helpers import answer, finished, producing, run, running

import aiosfs.ops
from aiosfs.dirtab import Kind, inode
from aiosfs.ops import Operations
from kernel import params
from kernel.agents.config import AgentConfig
from kernel.cores.backends.fake import FakeBackend
from kernel.kernel import Agent, Kernel
from kernel.llm.jobs import Job, JobState
from kernel.storage.database import Storage


@dataclass(frozen=True)
class Ctx:
    """What the handlers read from a pyfuse3.RequestContext. pid 0: never interrupted."""

    uid: int
    gid: int
    pid: int = 0
    umask: int = 0o022


ALICE = Ctx(1000, 1000)
BOB = Ctx(1001, 1001)
ROOT = Ctx(0, 0)

LONG = "a long question that keeps the fake model busy for many decode steps " * 2


@dataclass
class Fields:
    """Stand-in for pyfuse3.SetattrFields, whose attributes are read-only."""

    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False


Body = Callable[[Operations], Awaitable[Any]]


@pytest.fixture
def fs(tmp_path) -> Iterator[Callable[..., Any]]:
    """fs(body, engine=True, **backend_options): run `body(ops)` under trio.

    With engine=False the kernel's engine is not started, so submitted jobs stay
    queued until the body starts it with `running(ops.kernel)`.
    """
    storages: list[Storage] = []

    def go(body: Body, *, engine: bool = True, **backend_options: Any) -> Any:
        kernel = Kernel(Storage(tmp_path / "aiosfs.db"), FakeBackend(**backend_options))
        storages.append(kernel.storage)
        ops = Operations(kernel)

        async def main() -> Any:
            if not engine:
                return await body(ops)
            async with running(kernel):
                return await body(ops)

        return run(main)

    yield go
    for storage in storages:
        storage.close()


@contextlib.contextmanager
def fails(code: int) -> Iterator[None]:
    with pytest.raises(pyfuse3.FUSEError) as info:
        yield
    assert info.value.errno == code, f"expected {errno.errorcode[code]}, got {errno.errorcode.get(info.value.errno, info.value.errno)}"


# -- small clients --------------------------------------------------------------------------


async def resolve(ops: Operations, path: str, ctx: Ctx = ALICE) -> int:
    ino = pyfuse3.ROOT_INODE
    for part in path.split("/"):
        if part:
            ino = (await ops.lookup(ino, part.encode(), ctx)).st_ino
    return ino


async def open_fh(ops: Operations, path: str, flags: int, ctx: Ctx = ALICE) -> int:
    info = await ops.open(await resolve(ops, path, ctx), flags, ctx)
    return info.fh


async def read_all(ops: Operations, fh: int, size: int = 4096) -> bytes:
    data = b""
    while chunk := await ops.read(fh, len(data), size):
        data += chunk
    return data


async def cat(ops: Operations, path: str, ctx: Ctx = ALICE) -> bytes:
    fh = await open_fh(ops, path, os.O_RDONLY, ctx)
    try:
        return await read_all(ops, fh)
    finally:
        await ops.release(fh)


async def echo(ops: Operations, path: str, data: bytes, ctx: Ctx = ALICE, flags: int = os.O_WRONLY) -> None:
    """open, write, flush, release: what `echo data > path` sends."""
    fh = await open_fh(ops, path, flags, ctx)
    try:
        assert await ops.write(fh, 0, data) == len(data)
        await ops.flush(fh)
    finally:
        await ops.release(fh)


async def mkdir(ops: Operations, name: str, ctx: Ctx = ALICE, mode: int = 0o755) -> Agent:
    agents = await resolve(ops, "agents", ctx)
    await ops.mkdir(agents, name.encode(), mode, ctx)
    return ops.kernel.agents[name]


def said(message: str, turn: int = 1) -> bytes:
    """What `output` holds once the job is done: the answer, ended with a newline."""
    return (answer(message, turn) + "\n").encode()


def journal(kernel: Kernel, agent: Agent) -> list[str]:
    """The user message of every job ever committed to the agent, oldest first."""
    rows = kernel.storage.db.execute("SELECT user_message FROM jobs WHERE agent_id = ? ORDER BY id", [agent.row.id]).fetchall()
    return [message for (message,) in rows]


def latest(ops: Operations, agent: Agent, ctx: Ctx = ALICE) -> Job:
    job = ops.kernel.requests.latest_job(agent, ctx.uid)
    assert job is not None
    return job


# -- names and attributes -------------------------------------------------------------------


def test_global_names_and_attributes(fs):
    async def body(ops):
        readme = await ops.lookup(pyfuse3.ROOT_INODE, b"README", ALICE)
        assert readme.st_ino == inode(0, Kind.README) == 2
        assert readme.st_mode == stat.S_IFREG | 0o444
        assert (readme.st_uid, readme.st_gid) == (0, 0)

        kdir = await ops.lookup(pyfuse3.ROOT_INODE, b"kernel", ALICE)
        assert stat.S_ISDIR(kdir.st_mode) and stat.S_IMODE(kdir.st_mode) == 0o555

        status = await ops.lookup(kdir.st_ino, b"status", ALICE)
        assert status.st_ino == inode(0, Kind.K_STATUS)
        assert stat.S_ISREG(status.st_mode)

        agents = await ops.lookup(pyfuse3.ROOT_INODE, b"agents", ALICE)
        assert stat.S_ISDIR(agents.st_mode)
        assert stat.S_IMODE(agents.st_mode) == 0o1777  # sticky: anyone creates, owners remove

        root = await ops.getattr(pyfuse3.ROOT_INODE, ALICE)
        assert stat.S_ISDIR(root.st_mode)
        for attr in (readme, status, root, await ops.getattr(status.st_ino, ALICE)):  # files, and the root (a dead daemon shows at once)
            assert attr.attr_timeout == 0
        for attr in (readme, status):  # names that may change
            assert attr.entry_timeout == 0
        for attr in (kdir, agents):  # the mount's own directories: kept a second (params.DIR_CACHE_SECONDS)
            assert attr.entry_timeout == attr.attr_timeout == params.DIR_CACHE_SECONDS

        for parent, name in [(pyfuse3.ROOT_INODE, b"nope"), (kdir.st_ino, b"README"), (agents.st_ino, b"ghost"), (kdir.st_ino, b"\xff")]:
            with fails(errno.ENOENT):
                await ops.lookup(parent, name, ALICE)

    fs(body)


def test_agent_inodes_pack_agent_id_and_kind(fs):
    async def body(ops):
        first, second = await mkdir(ops, "first"), await mkdir(ops, "second")
        assert first.row.id != second.row.id
        for agent in (first, second):
            directory = await ops.lookup(await resolve(ops, "agents"), agent.name.encode(), ALICE)
            assert directory.st_ino == (agent.row.id << 8) | Kind.AGENT
            for name, kind in [("prompt", Kind.PROMPT), ("output", Kind.OUTPUT), ("ctl", Kind.CTL)]:
                attr = await ops.lookup(directory.st_ino, name.encode(), ALICE)
                assert attr.st_ino == agent.row.id * 256 + int(kind)
                assert (attr.entry_timeout, attr.attr_timeout) == (0, 0)
                assert (attr.st_uid, attr.st_gid) == (ALICE.uid, ALICE.gid)
            with fails(errno.ENOENT):
                await ops.lookup(directory.st_ino, b"README", ALICE)

        modes = {
            name: stat.S_IMODE((await ops.getattr(await resolve(ops, f"agents/first/{name}"), ALICE)).st_mode)
            for name in ("prompt", "output", "call", "status", "error", "context", "config", "ctl")
        }
        assert modes == {
            "prompt": 0o620,
            "output": 0o640,
            "call": 0o660,
            "status": 0o644,
            "error": 0o640,
            "context": 0o640,
            "config": 0o640,
            "ctl": 0o620,
        }

        stale = await resolve(ops, "agents/second/prompt")
        await ops.rmdir(await resolve(ops, "agents"), b"second", ALICE)
        for ino in (stale, inode(0, Kind.PROMPT), inode(first.row.id, Kind.README), 0x1F):
            with fails(errno.ENOENT):
                await ops.getattr(ino, ALICE)

    fs(body)


def test_readdir(fs, monkeypatch):
    listed: list[tuple[bytes, int, int]] = []
    room = [1000]

    def reply(token: Any, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if room[0] <= 0:
            return False
        room[0] -= 1
        listed.append((name, attr.st_ino, next_id))
        return True

    monkeypatch.setattr(aiosfs.ops.pyfuse3, "readdir_reply", reply)

    async def listing(ops: Operations, path: str, start: int = 0, space: int = 1000) -> list[bytes]:
        listed.clear()
        room[0] = space
        fh = await ops.opendir(await resolve(ops, path), ALICE)
        await ops.readdir(fh, start, object())
        await ops.releasedir(fh)
        return [name for name, _, _ in listed]

    async def body(ops):
        assert await listing(ops, "") == [b"README", b"kernel", b"agents", b"tools"]
        assert [ino for _, ino, _ in listed] == [2, 3, 10, 14]
        assert await listing(ops, "", start=1) == [b"kernel", b"agents", b"tools"]
        assert await listing(ops, "", space=2) == [b"README", b"kernel"]
        assert await listing(ops, "kernel") == [b"status", b"stats", b"metrics", b"ps", b"models", b"scheduler", b"log", b"events", b"trash", b"ctl"]

        zeta, alpha = await mkdir(ops, "zeta"), await mkdir(ops, "alpha")
        assert await listing(ops, "agents") == [b"zeta", b"alpha"]  # creation order, resumable by id
        assert [ino for _, ino, _ in listed] == [inode(zeta.row.id, Kind.AGENT), inode(alpha.row.id, Kind.AGENT)]
        assert await listing(ops, "agents", start=listed[0][2]) == [b"alpha"]
        assert await listing(ops, "agents/alpha") == [
            b"prompt",
            b"output",
            b"call",
            b"status",
            b"error",
            b"context",
            b"config",
            b"permissions",
            b"ctl",
            b"events",
            b"versions",
            b"recall",
            b"memory",
        ]

        with fails(errno.ENOTDIR):
            await ops.opendir(await resolve(ops, "README"), ALICE)

    fs(body)


def test_statfs(fs):
    async def body(ops):
        data = await ops.statfs(ALICE)
        assert data.f_namemax == 255 == params.MAX_NAME_BYTES
        assert data.f_bsize == 4096

    fs(body)


# -- agents: mkdir and rmdir -----------------------------------------------------------------


def test_mkdir_creates_an_agent_owned_by_the_caller(fs):
    async def body(ops):
        agents = await resolve(ops, "agents")
        carol = Ctx(1002, 2002, umask=0o027)
        attr = await ops.mkdir(agents, b"helper", 0o777, carol)
        assert stat.S_ISDIR(attr.st_mode)
        assert stat.S_IMODE(attr.st_mode) == 0o750
        assert (attr.st_uid, attr.st_gid) == (1002, 2002)
        assert (attr.entry_timeout, attr.attr_timeout) == (0, params.DIR_CACHE_SECONDS)  # agents come and go; its modes change by chmod
        row = ops.kernel.agents["helper"].row
        assert (row.uid, row.gid, row.mode) == (1002, 2002, 0o750)
        assert [(r.name, r.uid, r.mode) for r in ops.kernel.storage.agents()] == [("helper", 1002, 0o750)]
        assert (await ops.lookup(agents, b"helper", ALICE)).st_ino == attr.st_ino
        assert (await ops.lookup(attr.st_ino, b"prompt", ALICE)).st_uid == 1002

        with fails(errno.EEXIST):
            await ops.mkdir(agents, b"helper", 0o755, ALICE)
        longest = b"n" * 255
        assert (await ops.mkdir(agents, longest, 0o755, ALICE)).st_uid == ALICE.uid

    fs(body)


def test_mkdir_refusals(fs):
    async def body(ops):
        agents = await resolve(ops, "agents")
        agent = await mkdir(ops, "a")
        for parent in (pyfuse3.ROOT_INODE, await resolve(ops, "kernel"), inode(agent.row.id, Kind.AGENT)):
            with fails(errno.EPERM):
                await ops.mkdir(parent, b"x", 0o755, ALICE)
        for name in (b"..", b"."):
            with fails(errno.EINVAL):
                await ops.mkdir(agents, name, 0o755, ALICE)
        with fails(errno.ENAMETOOLONG):
            await ops.mkdir(agents, b"n" * 256, 0o755, ALICE)
        with fails(errno.EINVAL):
            await ops.mkdir(agents, b"caf\xe9", 0o755, ALICE)
        assert sorted(ops.kernel.agents) == ["a"]

    fs(body)


def test_rmdir(fs):
    async def body(ops):
        agents = await resolve(ops, "agents")
        await mkdir(ops, "mine")
        with fails(errno.EPERM):
            await ops.rmdir(agents, b"mine", BOB)
        assert "mine" in ops.kernel.agents
        with fails(errno.ENOENT):
            await ops.rmdir(agents, b"ghost", ALICE)
        with fails(errno.EPERM):
            await ops.rmdir(pyfuse3.ROOT_INODE, b"kernel", ROOT)
        await ops.rmdir(agents, b"mine", ALICE)
        assert "mine" not in ops.kernel.agents
        with fails(errno.ENOENT):
            await ops.lookup(agents, b"mine", ALICE)

        await mkdir(ops, "bobs", BOB)
        await ops.rmdir(agents, b"bobs", ROOT)  # root may remove anyone's agent
        assert [(r.trashed_name, r.trashed_at is not None) for r in ops.kernel.storage.agents()] == [("mine", True), ("bobs", True)]

    fs(body)


def test_rmdir_with_a_running_job_is_ebusy(fs):
    async def body(ops):
        agent = await mkdir(ops, "busy")
        await echo(ops, "agents/busy/prompt", LONG.encode())
        job = await producing(latest(ops, agent))
        assert job.state is JobState.RUNNING
        with fails(errno.EBUSY):
            await ops.rmdir(await resolve(ops, "agents"), b"busy", ALICE)
        assert ops.kernel.agents["busy"] is agent

    fs(body, step_delay=0.02)


def test_structural_changes_are_eperm(fs):
    async def body(ops):
        agent = await mkdir(ops, "a")
        directory = inode(agent.row.id, Kind.AGENT)
        prompt = inode(agent.row.id, Kind.PROMPT)
        for parent in (pyfuse3.ROOT_INODE, directory, await resolve(ops, "agents")):
            with fails(errno.EPERM):
                await ops.create(parent, b"new", 0o644, os.O_WRONLY | os.O_CREAT, ALICE)
            with fails(errno.EPERM):
                await ops.mknod(parent, b"new", stat.S_IFREG | 0o644, 0, ALICE)
            with fails(errno.EPERM):
                await ops.symlink(parent, b"new", b"prompt", ALICE)
            with fails(errno.EPERM):
                await ops.link(prompt, parent, b"new", ALICE)
        with fails(errno.EPERM):
            await ops.unlink(directory, b"prompt", ALICE)
        with fails(errno.EPERM):
            await ops.unlink(pyfuse3.ROOT_INODE, b"README", ROOT)
        with fails(errno.EPERM):
            await ops.rename(directory, b"prompt", directory, b"question", 0, ALICE)
        with fails(errno.EPERM):
            await ops.rename(await resolve(ops, "agents"), b"a", await resolve(ops, "agents"), b"b", 0, ALICE)
        assert sorted(ops.kernel.agents) == ["a"]
        assert (await ops.lookup(directory, b"prompt", ALICE)).st_ino == prompt

    fs(body)


# -- open ---------------------------------------------------------------------------------


def test_open_access_modes_by_class_even_for_root(fs):
    async def body(ops):
        await mkdir(ops, "a")
        read_only = ["README", "kernel/status", "kernel/stats", "kernel/ps", "kernel/models", "kernel/log"]
        read_only += ["agents/a/status", "agents/a/output", "agents/a/error"]
        for path in read_only:
            for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
                with fails(errno.EACCES):
                    await open_fh(ops, path, flags, ROOT)
        for path in ("agents/a/prompt", "agents/a/ctl", "kernel/ctl"):  # control files read empty
            for flags in (os.O_RDONLY, os.O_RDWR):
                fh = await open_fh(ops, path, flags, ROOT)
                assert await ops.read(fh, 0, 4096) == b""
                await ops.release(fh)
        for path in ("", "kernel", "agents", "agents/a"):
            with fails(errno.EISDIR):
                await open_fh(ops, path, os.O_RDONLY, ROOT)
        assert ops.handles == {}

        allowed = [(path, os.O_RDONLY) for path in read_only]
        allowed += [("agents/a/prompt", os.O_WRONLY), ("agents/a/ctl", os.O_WRONLY), ("agents/a/call", os.O_RDWR)]
        allowed += [("agents/a/context", os.O_RDWR), ("agents/a/config", os.O_RDWR), ("kernel/scheduler", os.O_RDWR)]
        for path, flags in allowed:
            info = await ops.open(await resolve(ops, path), flags, ALICE)
            assert info.direct_io is True, path
            assert info.keep_cache is False, path
            assert info.nonseekable is (path == "agents/a/call"), path
            await ops.release(info.fh)
        assert ops.handles == {}

    fs(body)


def test_snapshots_render_at_open(fs):
    async def body(ops):
        assert (await cat(ops, "README")).startswith(b"aiosfs")
        assert (await cat(ops, "kernel/status")).startswith(b"running=0 queued=0 ")
        assert (await cat(ops, "kernel/models")).startswith(b"fake ")
        agent = await mkdir(ops, "a")
        assert await cat(ops, "agents/a/status") == b"idle -\n"
        assert await cat(ops, "agents/a/error") == b""

        fh = await open_fh(ops, "agents/a/status", os.O_RDONLY)
        await echo(ops, "agents/a/prompt", b"hello\n")
        job = await finished(latest(ops, agent))
        assert await read_all(ops, fh, size=2) == b"idle -\n"  # rendered at open, consistent in chunks
        await ops.release(fh)
        assert await cat(ops, "agents/a/status") == f"done {job.id}\n".encode()
        assert await cat(ops, "agents/a/status", BOB) == b"idle -\n"

    fs(body)


# -- prompt: the commit rules -------------------------------------------------------------------


def test_submit_commits_once_per_flush_with_data(fs):
    async def body(ops):
        agent = await mkdir(ops, "a")
        fh = await open_fh(ops, "agents/a/prompt", os.O_WRONLY)
        await ops.flush(fh)  # bash's empty FLUSH before it writes
        assert journal(ops.kernel, agent) == []
        assert ops.kernel.requests.latest_job(agent, ALICE.uid) is None

        assert await ops.write(fh, 0, b"a") == 1
        assert await ops.write(fh, 1, b"b") == 1
        assert journal(ops.kernel, agent) == []  # writes only collect
        await ops.flush(fh)
        assert journal(ops.kernel, agent) == ["ab"]
        await ops.flush(fh)  # a second close of a dup: nothing pending
        assert journal(ops.kernel, agent) == ["ab"]

        await ops.write(fh, 2, b"c")
        await ops.flush(fh)
        assert journal(ops.kernel, agent) == ["ab", "c"]
        await ops.release(fh)
        assert journal(ops.kernel, agent) == ["ab", "c"]

        fh = await open_fh(ops, "agents/a/prompt", os.O_WRONLY)
        await ops.write(fh, 0, b"on release")
        await ops.release(fh)
        assert journal(ops.kernel, agent) == ["ab", "c", "on release"]

        fh = await open_fh(ops, "agents/a/prompt", os.O_WRONLY)
        await ops.write(fh, 0, b"on fsync")
        await ops.fsync(fh, False)
        assert journal(ops.kernel, agent) == ["ab", "c", "on release", "on fsync"]
        await ops.flush(fh)
        await ops.release(fh)
        assert journal(ops.kernel, agent) == ["ab", "c", "on release", "on fsync"]
        assert latest(ops, agent).user_message == "on fsync"

    fs(body)


def test_submit_truncation_clears_pending(fs):
    async def body(ops):
        agent = await mkdir(ops, "a")
        prompt = await resolve(ops, "agents/a/prompt")

        fh = await open_fh(ops, "agents/a/prompt", os.O_WRONLY | os.O_TRUNC)
        await ops.write(fh, 0, b"discarded")
        attr = pyfuse3.EntryAttributes()
        attr.st_size = 0
        await ops.setattr(prompt, attr, Fields(update_size=True), fh, ALICE)
        await ops.flush(fh)
        assert journal(ops.kernel, agent) == []
        await ops.write(fh, 0, b"kept")
        await ops.flush(fh)
        await ops.release(fh)
        assert journal(ops.kernel, agent) == ["kept"]

        await ops.setattr(prompt, attr, Fields(update_size=True), None, ALICE)  # `: > prompt` without a handle
        assert journal(ops.kernel, agent) == ["kept"]

    fs(body)


def test_submit_over_the_size_limit_is_efbig_at_write(fs):
    async def body(ops):
        agent = await mkdir(ops, "a")
        fh = await open_fh(ops, "agents/a/prompt", os.O_WRONLY)
        half = params.MAX_REQUEST_BYTES // 2
        assert await ops.write(fh, 0, b"x" * half) == half
        with fails(errno.EFBIG):
            await ops.write(fh, half, b"x" * (half + 1))
        await ops.flush(fh)
        await ops.release(fh)
        assert journal(ops.kernel, agent) == []

        line = await cat(ops, "agents/a/error")
        assert line.startswith(b"EFBIG - ")
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert await cat(ops, "agents/a/error", BOB) == b""

        fh = await open_fh(ops, "agents/a/prompt", os.O_WRONLY)
        with fails(errno.EFBIG):
            await ops.write(fh, 0, b"y" * (params.MAX_REQUEST_BYTES + 1))
        await ops.release(fh)
        assert journal(ops.kernel, agent) == []

        await echo(ops, "agents/a/prompt", b"small\n")
        assert journal(ops.kernel, agent) == ["small"]
        assert await cat(ops, "agents/a/error") == b""  # a new request clears the caller's error

    fs(body)


def test_a_refusal_at_the_first_write_is_audited_and_recorded(fs):
    async def body(ops):
        from kernel.kernel import Caller
        from kernel.syscall import Sys, syscall

        agent = await mkdir(ops, "a")
        await syscall(ops.kernel, Sys.PERMISSIONS_WRITE, Caller(0, 0), agent, "budget_tokens 1\n")
        await echo(ops, "agents/a/prompt", b"spends the budget\n")
        await finished(agent.latest[ALICE.uid])
        fh = await open_fh(ops, "agents/a/prompt", os.O_WRONLY)
        with fails(errno.EDQUOT):
            await ops.write(fh, 0, b"over budget\n")
        await ops.release(fh)
        denials = [e for e in map(json.loads, ops.kernel.audit) if e["event"] == "deny"]
        assert [(d["syscall"], d["errno"], d["agent"], d["uid"]) for d in denials] == [("llm_admit", "EDQUOT", "a", ALICE.uid)]
        assert (await cat(ops, "agents/a/error")).startswith(b"EDQUOT - ")

    fs(body)


def test_submit_errors_at_flush_are_recorded(fs):
    async def body(ops):
        agent = await mkdir(ops, "a")
        fh = await open_fh(ops, "agents/a/prompt", os.O_WRONLY)
        await ops.write(fh, 0, b'{"prompt": 1')
        with fails(errno.EINVAL):
            await ops.flush(fh)
        await ops.release(fh)  # nothing pending any more: no second attempt
        assert journal(ops.kernel, agent) == []
        assert (await cat(ops, "agents/a/error")).startswith(b"EINVAL - ")

    fs(body)


# -- output ---------------------------------------------------------------------------------


def test_output_is_bound_per_uid(fs):
    async def body(ops):
        agent = await mkdir(ops, "shared", mode=0o777)
        output = await resolve(ops, "agents/shared/output")
        await echo(ops, "agents/shared/prompt", b"from alice\n", ALICE)
        assert await cat(ops, "agents/shared/output", ALICE) == said("from alice")

        await echo(ops, "agents/shared/prompt", b"from bob\n", BOB)
        assert await cat(ops, "agents/shared/output", BOB) == said("from bob", 2)
        assert await cat(ops, "agents/shared/output", ALICE) == said("from alice")
        quiet = await open_fh(ops, "agents/shared/output", os.O_RDONLY | os.O_NONBLOCK, ROOT)
        with fails(errno.EAGAIN):
            await ops.read(quiet, 0, 4096)  # root submitted nothing: not a neighbour's answer
        await ops.release(quiet)

        assert (await ops.getattr(output, ALICE)).st_size == len(said("from alice"))
        assert (await ops.getattr(output, BOB)).st_size == len(said("from bob", 2))
        assert (await ops.getattr(output, ROOT)).st_size == 0
        assert latest(ops, agent, ALICE).uid == ALICE.uid

    fs(body)


def test_output_handle_keeps_its_job_and_streams_in_chunks(fs):
    async def body(ops):
        agent = await mkdir(ops, "a")
        await echo(ops, "agents/a/prompt", b"first\n")
        old = await open_fh(ops, "agents/a/output", os.O_RDONLY)
        await echo(ops, "agents/a/prompt", b"second\n")
        await finished(latest(ops, agent))

        assert await read_all(ops, old, size=3) == said("first")
        assert await ops.read(old, len(said("first")), 3) == b""  # EOF stays EOF
        await ops.release(old)

        new = await open_fh(ops, "agents/a/output", os.O_RDONLY)
        chunks = []
        while chunk := await ops.read(new, sum(map(len, chunks)), 2):
            chunks.append(chunk)
        assert b"".join(chunks) == said("second", 2)
        assert all(len(chunk) <= 2 for chunk in chunks)
        await ops.release(new)

    fs(body, step_delay=0.001)


def test_output_opened_before_the_first_prompt_streams_it(fs):
    async def body(ops):
        await mkdir(ops, "a", mode=0o777)
        got: dict[int, bytes] = {}

        async def reader(ctx: Ctx) -> None:
            fh = await open_fh(ops, "agents/a/output", os.O_RDONLY, ctx)
            got[ctx.uid] = await read_all(ops, fh)
            await ops.release(fh)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader, ALICE)
            nursery.start_soon(reader, BOB)
            await trio.testing.wait_all_tasks_blocked()
            assert got == {}
            await echo(ops, "agents/a/prompt", b"early\n", ALICE)
            while ALICE.uid not in got:
                await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()
            assert got == {ALICE.uid: said("early")}  # bob's reader waits for bob's prompt
            await echo(ops, "agents/a/prompt", b"late\n", BOB)
        assert got[BOB.uid] == said("late", 2)

    fs(body)


def test_nonblocking_read_without_data_is_eagain_and_poll_follows(fs):
    async def body(ops):
        agent = await mkdir(ops, "a")
        output = await resolve(ops, "agents/a/output")
        early = await open_fh(ops, "agents/a/output", os.O_RDONLY | os.O_NONBLOCK)
        with fails(errno.EAGAIN):
            await ops.read(early, 0, 4096)
        assert await ops.poll(output, early, None, ALICE) == 0

        await echo(ops, "agents/a/prompt", b"later\n")  # queued: the engine is not running yet
        job = latest(ops, agent)
        assert job.state is JobState.QUEUED
        bound = await open_fh(ops, "agents/a/output", os.O_RDONLY | os.O_NONBLOCK)
        with fails(errno.EAGAIN):
            await ops.read(bound, 0, 4096)
        assert await ops.poll(output, bound, None, ALICE) == 0
        assert await ops.poll(output, early, None, ALICE) == 0

        async with running(ops.kernel):
            await finished(job)
        assert await ops.poll(output, bound, None, ALICE) == select.POLLIN
        assert await ops.poll(output, early, None, ALICE) == select.POLLIN
        assert await read_all(ops, bound) == said("later")
        assert await ops.poll(output, bound, None, ALICE) == select.POLLIN  # at EOF a read does not block

        status = await open_fh(ops, "agents/a/status", os.O_RDONLY)
        assert await ops.poll(await resolve(ops, "agents/a/status"), status, None, ALICE) & select.POLLIN
        for fh in (early, bound, status):
            await ops.release(fh)

    fs(body, engine=False)


def test_cancelled_job_gives_partial_output_then_one_ecanceled(fs):
    async def body(ops):
        agent = await mkdir(ops, "a")
        full = said(LONG)
        await echo(ops, "agents/a/prompt", LONG.encode())
        fh = await open_fh(ops, "agents/a/output", os.O_RDONLY)
        data = await ops.read(fh, 0, 4096)  # blocks until the first token
        assert data and full.startswith(data)

        await echo(ops, "agents/a/ctl", b"cancel\n")
        errors = []
        while len(errors) < 2:
            try:
                chunk = await ops.read(fh, len(data), 4096)
            except pyfuse3.FUSEError as exc:
                errors.append(exc.errno)
                continue
            if not chunk:
                break
            data += chunk
        assert errors == [errno.ECANCELED]
        assert full.startswith(data) and len(data) < len(full)
        assert await ops.read(fh, len(data), 4096) == b""
        await ops.release(fh)

        job = latest(ops, agent)
        assert job.state is JobState.CANCELLED
        assert await cat(ops, "agents/a/status") == f"cancelled {job.id}\n".encode()
        assert (await cat(ops, "agents/a/error")).startswith(f"ECANCELED {job.id} ".encode())

        late = await open_fh(ops, "agents/a/output", os.O_RDONLY)  # a new reader sees the same ending
        with fails(errno.ECANCELED):
            await ops.read(late, len(data), 4096)
        assert await ops.read(late, len(data), 4096) == b""
        assert await read_all(ops, late) == data
        await ops.release(late)

    fs(body, step_delay=0.02)


# -- call ---------------------------------------------------------------------------------


def test_call_is_a_private_conversation_per_handle(fs):
    async def body(ops):
        agent = await mkdir(ops, "a")
        fh = await open_fh(ops, "agents/a/call", os.O_RDWR)
        assert await ops.write(fh, 0, b"hello\n") == 6
        assert journal(ops.kernel, agent) == []  # the read commits the turn
        assert await read_all(ops, fh) == said("hello")
        assert await ops.read(fh, 0, 4096) == b""

        await ops.write(fh, 0, b"again")
        assert await read_all(ops, fh, size=5) == said("again", 2)

        other = await open_fh(ops, "agents/a/call", os.O_RDWR)
        await ops.write(other, 0, b"other")
        assert await read_all(ops, other) == said("other", 1)

        await ops.write(fh, 0, b"third")
        assert await read_all(ops, fh) == said("third", 3)
        for handle in (fh, other):
            await ops.release(handle)

        assert journal(ops.kernel, agent) == ["hello", "again", "other", "third"]
        assert agent.messages == []
        assert await cat(ops, "agents/a/context") == b""
        assert ops.kernel.storage.messages(agent.row.id) == []

    fs(body)


def test_closing_a_call_cancels_its_running_turn(fs):
    async def body(ops):
        agent = await mkdir(ops, "a")
        fh = await open_fh(ops, "agents/a/call", os.O_RDWR)
        await ops.write(fh, 0, LONG.encode())
        first = await ops.read(fh, 0, 4096)
        assert said(LONG).startswith(first) and first
        job = latest(ops, agent)
        assert job.source == "call" and job.state is JobState.RUNNING
        await ops.release(fh)
        await finished(job)
        assert job.state is JobState.CANCELLED
        assert job.errno == errno.ECANCELED

    fs(body, step_delay=0.02)


# -- ctl ----------------------------------------------------------------------------------


def test_ctl_applies_each_line_in_write(fs):
    async def body(ops):
        agent = await mkdir(ops, "a")
        await echo(ops, "agents/a/context", b"remember this\n", flags=os.O_WRONLY | os.O_APPEND)
        assert agent.messages == [{"role": "user", "content": "remember this"}]

        fh = await open_fh(ops, "agents/a/ctl", os.O_WRONLY)
        for bad in (b"frobnicate\n", b"reset now\n", b"cancel x\n", b"\xff\n"):
            with fails(errno.EINVAL):
                await ops.write(fh, 0, bad)
        assert (await cat(ops, "agents/a/error")).startswith(b"EINVAL ")
        assert len(agent.messages) == 1

        assert await ops.write(fh, 0, b"reset\n") == 6
        assert agent.messages == []
        assert await cat(ops, "agents/a/context") == b""
        assert ops.kernel.storage.messages(agent.row.id) == []

        await echo(ops, "agents/a/context", b"again\n", flags=os.O_WRONLY | os.O_APPEND)
        await echo(ops, "agents/a/prompt", b"queued\n")  # the engine is not running: it stays queued
        job = latest(ops, agent)
        assert job.state is JobState.QUEUED
        assert await ops.write(fh, 0, b"cancel\nreset\n") == 13
        assert job.state is JobState.CANCELLED
        assert agent.messages == []
        await ops.release(fh)

    fs(body, engine=False)


# -- config and context (stored files) -------------------------------------------------------


def test_config_is_validated_at_write_and_flush(fs):
    async def body(ops):
        agent = await mkdir(ops, "a")
        default = AgentConfig().render().encode()
        assert await cat(ops, "agents/a/config") == default
        assert (await ops.getattr(await resolve(ops, "agents/a/config"), ALICE)).st_size == len(default)

        fh = await open_fh(ops, "agents/a/config", os.O_WRONLY | os.O_APPEND)
        with fails(errno.EINVAL):
            await ops.write(fh, 0, b"temperature=banana\n")
        with fails(errno.EINVAL):
            await ops.flush(fh)  # the commit it spoiled is refused as a whole
        await ops.release(fh)
        assert await cat(ops, "agents/a/config") == default
        assert agent.config == AgentConfig()
        assert (await cat(ops, "agents/a/error")).startswith(b"EINVAL - ")

        await echo(ops, "agents/a/config", b"temperature=0.25\n", flags=os.O_WRONLY | os.O_APPEND)
        assert agent.config.temperature == 0.25
        assert b"temperature=0.25\n" in await cat(ops, "agents/a/config")
        assert b"temperature=0.25" in ops.kernel.storage.db.execute("SELECT config FROM agents WHERE id = ?", [agent.row.id]).fetchone()[0].encode()

        fh = await open_fh(ops, "agents/a/config", os.O_WRONLY | os.O_TRUNC)
        await ops.flush(fh)
        await ops.release(fh)
        assert agent.config == AgentConfig()
        assert await cat(ops, "agents/a/config") == default

    fs(body)


def test_config_writes_at_offsets(fs):
    async def body(ops):
        agent = await mkdir(ops, "a")
        fh = await open_fh(ops, "agents/a/config", os.O_RDWR | os.O_TRUNC)
        assert await read_all(ops, fh) == b""
        await ops.write(fh, 0, b"seed=7\n")
        await ops.write(fh, 7, b"max_tokens=9\n")
        assert await read_all(ops, fh) == b"seed=7\nmax_tokens=9\n"
        assert agent.config == AgentConfig()  # nothing is applied before the flush
        await ops.flush(fh)
        await ops.release(fh)
        assert (agent.config.seed, agent.config.max_tokens) == (7, 9)
        fh = await open_fh(ops, "agents/a/config", os.O_WRONLY | os.O_APPEND)
        with fails(errno.EFBIG):
            await ops.write(fh, 0, b"#" * params.MAX_CONFIG_BYTES)
        await ops.release(fh)
        assert (agent.config.seed, agent.config.max_tokens) == (7, 9)

    fs(body)


def test_context_appends_and_truncates(fs):
    async def body(ops):
        agent = await mkdir(ops, "a")
        context = await resolve(ops, "agents/a/context")
        await echo(ops, "agents/a/context", b"plain text\n", flags=os.O_WRONLY | os.O_APPEND)
        assert agent.messages == [{"role": "user", "content": "plain text"}]
        assert await cat(ops, "agents/a/context") == b'{"role": "user", "content": "plain text"}\n'
        await echo(ops, "agents/a/context", b'{"role": "assistant", "content": "noted"}\n', flags=os.O_WRONLY | os.O_APPEND)
        assert [m["role"] for m in agent.messages] == ["user", "assistant"]
        assert ops.kernel.storage.messages(agent.row.id) == agent.messages
        assert (await ops.getattr(context, ALICE)).st_size == len(await cat(ops, "agents/a/context"))

        await echo(ops, "agents/a/prompt", b"what now\n")
        assert await cat(ops, "agents/a/output") == said("what now", 2)  # the model saw the written context

        fh = await open_fh(ops, "agents/a/context", os.O_WRONLY | os.O_TRUNC)
        await ops.flush(fh)
        await ops.release(fh)
        assert agent.messages == []
        assert await cat(ops, "agents/a/context") == b""

        await echo(ops, "agents/a/context", b"one more\n", flags=os.O_WRONLY | os.O_APPEND)
        assert len(agent.messages) == 1
        attr = pyfuse3.EntryAttributes()
        attr.st_size = 0
        result = await ops.setattr(context, attr, Fields(update_size=True), None, ALICE)
        assert result.st_size == 0
        assert agent.messages == []
        assert ops.kernel.storage.messages(agent.row.id) == []

        await echo(ops, "agents/a/context", b"with a handle\n", flags=os.O_WRONLY | os.O_APPEND)
        fh = await open_fh(ops, "agents/a/context", os.O_WRONLY)
        await ops.setattr(context, attr, Fields(update_size=True), fh, ALICE)
        assert len(agent.messages) == 1  # applied at flush
        await ops.flush(fh)
        await ops.release(fh)
        assert agent.messages == []

        fh = await open_fh(ops, "agents/a/context", os.O_WRONLY | os.O_APPEND)
        await ops.write(fh, 0, b'{"role": "wizard", "content": "x"}\n')
        with fails(errno.EINVAL):
            await ops.flush(fh)
        await ops.release(fh)
        assert agent.messages == []

        attr.st_size = 5
        with fails(errno.EINVAL):
            await ops.setattr(context, attr, Fields(update_size=True), None, ALICE)

    fs(body)


# -- chmod and chown --------------------------------------------------------------------------


def test_chmod_persists_and_chown_of_a_file_changes_nothing(fs):
    async def body(ops):
        agent = await mkdir(ops, "a")
        prompt = await resolve(ops, "agents/a/prompt")
        attr = pyfuse3.EntryAttributes()
        attr.st_mode = stat.S_IFREG | 0o600
        result = await ops.setattr(prompt, attr, Fields(update_mode=True), None, ALICE)
        assert result.st_mode == stat.S_IFREG | 0o600
        assert (await ops.getattr(prompt, BOB)).st_mode == stat.S_IFREG | 0o600
        assert stat.S_IMODE((await ops.getattr(await resolve(ops, "agents/a/output"), ALICE)).st_mode) == 0o640
        assert ops.kernel.storage.agents()[0].file_modes == {"prompt": 0o600}

        directory = inode(agent.row.id, Kind.AGENT)
        attr.st_mode = stat.S_IFDIR | 0o700
        assert (await ops.setattr(directory, attr, Fields(update_mode=True), None, ALICE)).st_mode == stat.S_IFDIR | 0o700
        assert ops.kernel.storage.agents()[0].mode == 0o700

        attr.st_uid, attr.st_gid = BOB.uid, BOB.gid
        for fields in (Fields(update_uid=True), Fields(update_gid=True)):  # accepted (copy tools set owners): files follow the directory
            result = await ops.setattr(prompt, attr, fields, None, ROOT)
            assert (result.st_uid, result.st_gid) == (ALICE.uid, ALICE.gid)
        assert (await ops.getattr(prompt, ALICE)).st_uid == ALICE.uid

        result = await ops.setattr(directory, attr, Fields(update_uid=True, update_gid=True), None, ROOT)
        assert (result.st_uid, result.st_gid) == (BOB.uid, BOB.gid)
        assert (await ops.getattr(prompt, ALICE)).st_uid == BOB.uid  # files share the agent's owner
        row = ops.kernel.storage.agents()[0]
        assert (row.uid, row.gid) == (BOB.uid, BOB.gid)

        attr.st_mode = stat.S_IFREG | 0o666
        with fails(errno.EPERM):
            await ops.setattr(await resolve(ops, "README"), attr, Fields(update_mode=True), None, ROOT)
        assert (await ops.getattr(await resolve(ops, "README"), ROOT)).st_mode == stat.S_IFREG | 0o444

    fs(body)


def test_modes_survive_a_restart(fs):
    async def change(ops):
        await mkdir(ops, "a")
        attr = pyfuse3.EntryAttributes()
        attr.st_mode = stat.S_IFREG | 0o604
        await ops.setattr(await resolve(ops, "agents/a/status"), attr, Fields(update_mode=True), None, ALICE)

    async def check(ops):
        assert (await ops.getattr(await resolve(ops, "agents/a/status"), ALICE)).st_mode == stat.S_IFREG | 0o604

    fs(change)
    fs(check)


# -- the catch-all -----------------------------------------------------------------------------


def test_a_bug_in_a_handler_is_eio_and_the_next_operations_work(fs, monkeypatch, caplog):
    def broken() -> str:
        raise RuntimeError("a bug")

    async def body(ops):
        status = await resolve(ops, "kernel/status")
        with monkeypatch.context() as patch:
            patch.setattr(ops.kernel, "status_line", broken)
            with fails(errno.EIO):
                await ops.open(status, os.O_RDONLY, ALICE)
            assert ops.handles == {}
            assert (await cat(ops, "README")).startswith(b"aiosfs")
            await mkdir(ops, "still")
            assert (await ops.getattr(status, ALICE)).st_ino == status
        assert (await cat(ops, "kernel/status")).startswith(b"running=")

    with caplog.at_level("ERROR", logger="aiosfs.ops"):
        fs(body)
    bugs = [r for r in caplog.records if r.name == "aiosfs.ops" and r.levelname == "ERROR"]
    assert len(bugs) == 1
    assert "open" in bugs[0].getMessage()
    assert bugs[0].exc_info is not None and isinstance(bugs[0].exc_info[1], RuntimeError)


def test_unknown_handles_are_ebadf(fs):
    async def body(ops):
        for call in (ops.read(99, 0, 1), ops.write(99, 0, b"x"), ops.flush(99), ops.fsync(99, True)):
            with fails(errno.EBADF):
                await call
        await ops.release(99)  # a release of an unknown handle is harmless

    fs(body)


# -- fixes found by these tests -------------------------------------------------------------


def test_nonblocking_output_opened_before_the_first_job_reads_it(fs):
    async def body(ops):
        await mkdir(ops, "a")
        fh = await open_fh(ops, "agents/a/output", os.O_RDONLY | os.O_NONBLOCK)
        with fails(errno.EAGAIN):
            await ops.read(fh, 0, 100)
        await echo(ops, "agents/a/prompt", b"hi\n")
        await finished(latest(ops, ops.kernel.agents["a"]))
        assert await ops.poll(0, fh, None, ALICE) & select.POLLIN
        assert await read_all(ops, fh) == said("hi")
        await ops.release(fh)

    fs(body)


def test_concurrent_appends_to_context_are_all_kept(fs):
    async def body(ops):
        agent = await mkdir(ops, "a")
        one = await open_fh(ops, "agents/a/context", os.O_WRONLY | os.O_APPEND)
        two = await open_fh(ops, "agents/a/context", os.O_WRONLY | os.O_APPEND)
        await ops.write(one, 0, b"one\n")
        await ops.write(two, 0, b"two\n")
        await echo(ops, "agents/a/prompt", b"meanwhile\n")
        await finished(latest(ops, agent))
        await ops.flush(one)
        await ops.flush(two)
        for fh in (one, two):
            await ops.release(fh)
        contents = [m["content"] for m in agent.messages]
        assert contents == ["meanwhile", answer("meanwhile"), "one", "two"]

    fs(body)


def test_stored_writes_after_rmdir_are_enoent_not_eio(fs):
    async def body(ops):
        agents = await resolve(ops, "agents")
        for name in ("config", "context"):
            await mkdir(ops, "a")
            fh = await open_fh(ops, f"agents/a/{name}", os.O_WRONLY | os.O_APPEND)
            await ops.write(fh, 0, b"temperature=0.1\n")
            await ops.rmdir(agents, b"a", ALICE)
            with fails(errno.ENOENT):
                await ops.flush(fh)
            await ops.release(fh)

    fs(body)


def test_a_bad_ctl_line_applies_nothing(fs):
    async def body(ops):
        agent = await mkdir(ops, "a")
        await echo(ops, "agents/a/context", b"keep me\n", flags=os.O_WRONLY | os.O_APPEND)
        fh = await open_fh(ops, "agents/a/ctl", os.O_WRONLY)
        with fails(errno.EINVAL):
            await ops.write(fh, 0, b"reset\nbogus\n")
        await ops.release(fh)
        assert [m["content"] for m in agent.messages] == ["keep me"]

    fs(body)


def test_events_stream_job_lifecycles_after_open(fs):
    async def body(ops):
        agent = await mkdir(ops, "a")
        await echo(ops, "agents/a/prompt", b"before open\n")
        await finished(latest(ops, agent))
        agent_fh = await open_fh(ops, "agents/a/events", os.O_RDONLY)
        kernel_fh = await open_fh(ops, "kernel/events", os.O_RDONLY, BOB)
        with fails(errno.EACCES):
            await open_fh(ops, "agents/a/events", os.O_WRONLY, ROOT)
        await echo(ops, "agents/a/prompt", b"after open\n")
        job = await finished(latest(ops, agent))
        events = []
        while not events or events[-1]["event"] != "done":
            events += [json.loads(line) for line in (await ops.read(agent_fh, 0, 65536)).splitlines()]
        assert [e["event"] for e in events] == ["queued", "running", "first_token", "done"]
        assert all(e["job"] == job.id for e in events)
        assert events[-1]["tokens"] == job.n_generated and events[-1]["total_ms"] >= events[-1]["ttft_ms"] >= 0
        seen = (await ops.read(kernel_fh, 0, 65536)).decode()
        assert f'"job": {job.id}' in seen and "before open" not in seen and "after open" not in seen  # no content
        nonblocking = await open_fh(ops, "kernel/events", os.O_RDONLY | os.O_NONBLOCK)
        with fails(errno.EAGAIN):
            await ops.read(nonblocking, 0, 100)
        for fh in (agent_fh, kernel_fh, nonblocking):
            await ops.release(fh)

    fs(body)
