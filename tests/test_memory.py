"""The memory manager in the kernel: recall into prompts, the recall and rollback
syscalls with their permission checks, and agents that still hold memory."""

from __future__ import annotations

import errno
import json

import pytest
from kernel_helpers import OTHER, OWNER, ask, ctl, mkdir, refused, remember, run, running

from kernel import params
from kernel.cores.backends.fake import FakeBackend
from kernel.errors import KernelError
from kernel.kernel import Kernel
from kernel.memory.manager import RECALL_HEADER
from kernel.storage.database import Storage
from kernel.syscall import Sys, syscall


@pytest.fixture
def kernel(tmp_path):
    made = Kernel(Storage(tmp_path / "aiosfs.db"), FakeBackend())
    yield made
    made.storage.close()
    made.memory.store.close()


NOTES = "Groceries: milk and eggs.\n\nThe access code of the lab door is 4711.\n\nBirthday of Ada in May.\n"


def test_recall_puts_the_matching_passage_into_the_prompt(kernel):
    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            await remember(kernel, agent, "notes.md", NOTES)
            await syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "system=Be brief.\nmemory_recall=on\nmemory_top_k=1\n")
            job = await ask(kernel, agent, "What is the access code of the lab door?")
            plain = await ask(kernel, await mkdir(kernel, "b"), "What is the access code of the lab door?")
            return job, plain, agent.events.since(0)[0].decode()

    job, plain, events = run(body)
    system = job.messages[0]["content"]
    assert system.startswith("Be brief.\n\n" + RECALL_HEADER)
    assert "--- notes.md:3\nThe access code of the lab door is 4711." in system
    assert "Groceries" not in system  # top_k=1: only the best passage
    assert "4711" not in json.dumps(plain.messages)  # another agent, recall off
    recall = [json.loads(line) for line in events.splitlines() if '"recall"' in line]
    assert recall and recall[0]["passages"] == ["notes.md:3"] and recall[0]["job"] == job.id


def test_recall_syscall_ranks_and_checks_read_permission(kernel):
    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            await remember(kernel, agent, "notes.md", NOTES)
            found = await syscall(kernel, Sys.MEMORY_RECALL, OWNER, agent, b"birthday of ada", 3)
            await refused(errno.EACCES, syscall(kernel, Sys.MEMORY_RECALL, OTHER, agent, b"birthday", 3))  # memory/ is 0750
            root = await kernel.memory.root(agent)
            await kernel.memory.run(kernel.memory.store.setattr, root, mode=0o755)
            shared = await syscall(kernel, Sys.MEMORY_RECALL, OTHER, agent, b"birthday", 3)
            return found, shared

    found, shared = run(body)
    assert found[0].text == "Birthday of Ada in May." and found[0].path == "notes.md"
    assert [p.text for p in shared] == ["Birthday of Ada in May."]


def test_rollback_through_ctl_needs_write_permission_and_is_logged(kernel):
    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a", OWNER, 0o777)
            store = kernel.memory.store
            ino = await remember(kernel, agent, "notes.md", "first\n", mode=0o644)
            await remember_again(kernel, ino, "second\n")
            await kernel.memory.run(store.setattr, await kernel.memory.root(agent), mode=0o755)
            await refused(errno.EACCES, ctl(kernel, agent, "rollback notes.md 1", OTHER))  # 0644: not theirs to write
            await refused(errno.ENOENT, ctl(kernel, agent, "rollback notes.md 9"))
            after_refusals = await kernel.memory.run(store.read, ino, 0, 100)
            await ctl(kernel, agent, "rollback notes.md 1")
            return after_refusals, await kernel.memory.run(store.read, ino, 0, 100), (agent.errors.get(OWNER.uid) or [""])[-1]

    after_refusals, restored, error = run(body)
    assert after_refusals == b"second\n" and restored == b"first\n"
    assert error.startswith("ENOENT") and "no version 9" in error
    assert any('"command": "rollback notes.md 1"' in line for line in kernel.audit)


async def remember_again(kernel: Kernel, ino: int, text: str) -> None:
    store = kernel.memory.store
    await kernel.memory.run(store.open, ino, True)
    await kernel.memory.run(store.write, ino, 0, text.encode())
    await kernel.memory.run(store.release, ino)


def test_bad_rollback_lines_change_nothing(kernel):
    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            await refused(errno.EINVAL, ctl(kernel, agent, "rollback"))
            await refused(errno.EINVAL, ctl(kernel, agent, "rollback notes.md @not-a-time"))

    run(body)


def test_rmdir_moves_an_agent_with_its_memory_to_the_trash_and_restore_brings_it_back(kernel):
    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            ino = await remember(kernel, agent, "keep.md", "precious")
            await syscall(kernel, Sys.AGENT_REMOVE, OWNER, "a")
            assert "a" not in kernel.agents
            fresh = await mkdir(kernel, "a")  # the name is free again, with an empty memory/
            assert await kernel.memory.is_empty(fresh)
            await refused(errno.EEXIST, syscall(kernel, Sys.KERNEL_CTL, OWNER, b"restore a\n"))
            await refused(errno.EPERM, syscall(kernel, Sys.KERNEL_CTL, OTHER, b"restore a old-a\n"))
            await syscall(kernel, Sys.KERNEL_CTL, OWNER, b"restore a old-a\n")
            back = kernel.agents["old-a"]
            return back, await kernel.memory.run(kernel.memory.store.read, ino, 0, 100)

    back, data = run(body)
    assert data == b"precious" and back.row.trashed_at is None
    events = [line for line in kernel.audit if '"restore"' in line or '"rmdir"' in line]
    assert len(events) == 2


def test_expired_trash_is_purged_with_its_memory(kernel):
    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            ino = await remember(kernel, agent, "gone.md", "x")
            await syscall(kernel, Sys.AGENT_REMOVE, OWNER, "a")
            assert await kernel.agents.purge_trash() == []  # not yet expired
            purged = await kernel.agents.purge_trash(now=agent.row.trashed_at + params.TRASH_RETENTION_SECONDS + 1)
            await refused(errno.ENOENT, syscall(kernel, Sys.KERNEL_CTL, OWNER, b"restore a\n"))
            return agent, purged, ino

    agent, purged, ino = run(body)
    assert purged == [agent.row.id] and kernel.storage.agents() == []
    with pytest.raises(KernelError):
        kernel.memory.store.getattr(ino)


def test_kernel_stats_include_the_memory_counters(kernel):
    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            await remember(kernel, agent, "n.md", "x" * 100)

    run(body)
    stats = kernel.statistics()
    assert stats["memory_bytes"] == 100 and stats["memory_commits"] >= 1 and stats["memory_versions"] == 1
