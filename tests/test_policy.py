"""The permissions policy and the access manager: ceilings, budgets, queue and
priority caps, shared memory, owner-only writes and the audit log."""

from __future__ import annotations

import errno
import json

import pytest
from kernel_helpers import OTHER, OWNER, ROOT, ask, ctl, mkdir, refused, remember, run, running, submit

from kernel.access.policy import Policy, parse_policy
from kernel.errors import KernelError
from kernel.kernel import Kernel
from kernel.syscall import Sys, syscall


@pytest.fixture
def make_kernel(new_kernel):
    return new_kernel


def audit(kernel: Kernel, event: str) -> list[dict]:
    return [e for e in map(json.loads, kernel.audit) if e["event"] == event]


async def permit(kernel: Kernel, agent, text: str, caller=ROOT) -> None:
    await syscall(kernel, Sys.PERMISSIONS_WRITE, caller, agent, text)


def test_parse_policy_validates_every_line():
    policy = parse_policy("tools calculator, clock  # a comment\nbudget_tokens 500\n\nshare_memory bob\n")
    assert policy == Policy(tools=("calculator", "clock"), budget_tokens=500, share_memory=("bob",))
    for bad, word in (
        ("budget 5", "unknown key"),
        ("max_queue 0", "max_queue"),
        ("priority_max 10", "priority_max"),
        ("memory_quota -1", "memory_quota"),
    ):
        with pytest.raises(KernelError) as info:
            parse_policy(bad)
        assert info.value.errno == errno.EINVAL and word in info.value.message and "line 1" in info.value.message


def test_an_owner_stays_within_roots_ceiling(make_kernel):
    kernel = make_kernel()

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            await permit(kernel, agent, "budget_tokens 1000\ntools calculator clock\npriority_max 5\n")
            await permit(kernel, agent, "budget_tokens 400\ntools clock\n", OWNER)  # lowering is fine
            lowered = agent.policy
            await refused(errno.EPERM, permit(kernel, agent, "budget_tokens 5000\n", OWNER))
            await refused(errno.EPERM, permit(kernel, agent, "tools calculator shell\n", OWNER))
            await refused(errno.EPERM, permit(kernel, agent, "max_queue 2\n", OTHER))  # not the owner
            await refused(errno.EINVAL, permit(kernel, agent, "budget_tokens many\n", OWNER))
            return lowered, agent

    lowered, agent = run(body)
    assert lowered == Policy(tools=("clock",), budget_tokens=400, priority_max=5)  # priority_max: root's, kept
    assert agent.policy == lowered  # refused writes changed nothing
    text = kernel.agents.permissions_text(agent)
    assert "budget_tokens 400  # root's limit: 1000; spent: 0" in text
    denials = audit(kernel, "deny")
    assert len(denials) == 3 and {d["uid"] for d in denials} == {OWNER.uid, OTHER.uid}
    assert all(d["syscall"] == "permissions_write" and d["agent"] == "a" for d in denials)
    assert [p["syscall"] for p in audit(kernel, "privileged")] == ["permissions_write"]


def test_the_policy_survives_a_remount_with_its_ceiling(make_kernel):
    first = make_kernel()

    async def setup():
        async with running(first):
            agent = await mkdir(first, "a")
            await permit(first, agent, "budget_tokens 1000\n")
            await permit(first, agent, "budget_tokens 10\n", OWNER)

    run(setup)
    first.storage.close()
    again = make_kernel()
    agent = again.agents["a"]
    assert agent.policy.budget_tokens == 10 and agent.ceiling.budget_tokens == 1000
    assert any(e["event"] == "privileged" for e in map(json.loads, again.audit))  # the audit log is kept on disk


def test_budget_is_spent_then_edquot_until_root_resets_it(make_kernel):
    kernel = make_kernel()

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            await permit(kernel, agent, "budget_tokens 30\n")
            job = await ask(kernel, agent, "hello")
            spent = agent.row.spent_tokens
            await refused(errno.EDQUOT, submit(kernel, agent, "again"))
            await refused(errno.EPERM, ctl(kernel, agent, "budget reset"))
            await ctl(kernel, agent, "budget reset", ROOT)
            await ask(kernel, agent, "again")
            return job, spent

    job, spent = run(body)
    assert spent == len(job.prompt_tokens) + job.n_generated > 30
    assert kernel.storage.agents()[0].spent_tokens > 0


def test_queue_priority_and_max_tokens_caps(make_kernel):
    kernel = make_kernel()

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            await permit(kernel, agent, "max_queue 1\npriority_max 3\nmax_tokens 50\n")
            await refused(errno.EPERM, submit(kernel, agent, '{"prompt": "x", "priority": 4}'))
            await refused(errno.EPERM, syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "priority=9\n"))
            await ctl(kernel, agent, "pause")
            capped = await submit(kernel, agent, '{"prompt": "x", "priority": 3, "max_tokens": 500}')
            await refused(errno.EAGAIN, submit(kernel, agent, "y"))
            await ctl(kernel, agent, "cancel all")
            return capped

    assert run(body).config.max_tokens == 50


def test_config_is_for_the_owner_and_root_only(make_kernel):
    kernel = make_kernel()

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            await refused(errno.EPERM, syscall(kernel, Sys.CONFIG_WRITE, OTHER, agent, "temperature=0\n"))
            await syscall(kernel, Sys.CONFIG_WRITE, ROOT, agent, "temperature=0\n")
            return agent

    assert run(body).config.temperature == 0


def test_memory_quota_from_the_policy_reaches_the_store(make_kernel):
    kernel = make_kernel()

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            await permit(kernel, agent, "memory_quota 10\n")
            store = kernel.memory.store
            ino = (await kernel.memory.run(store.create, await kernel.memory.root(agent), b"f", 0o644, 0, 0)).ino
            await kernel.memory.run(store.open, ino, False)
            await refused(errno.EDQUOT, kernel.memory.run(store.write, ino, 0, b"x" * 11))
            await kernel.memory.run(store.write, ino, 0, b"x" * 10)
            await permit(kernel, agent, "")  # no quota line: the mount's default again
            await kernel.memory.run(store.write, ino, 10, b"y")
            await kernel.memory.run(store.release, ino)

    run(body)


def test_cross_agent_recall_needs_the_targets_share(make_kernel):
    kernel = make_kernel()

    async def body():
        async with running(kernel):
            reader, target = await mkdir(kernel, "reader"), await mkdir(kernel, "target")
            await remember(kernel, target, "n.md", "the secret recipe uses saffron")
            query = json.dumps({"query": "saffron recipe", "agent": "target"}).encode()
            await refused(errno.EACCES, syscall(kernel, Sys.MEMORY_RECALL, OWNER, reader, query))
            await permit(kernel, target, "share_memory reader\n", OWNER)
            found = await syscall(kernel, Sys.MEMORY_RECALL, OWNER, reader, query)
            await refused(errno.EINVAL, syscall(kernel, Sys.MEMORY_RECALL, OWNER, reader, b'{"agent": "target"}'))
            return found

    found = run(body)
    assert [p.text for p in found] == ["the secret recipe uses saffron"]
    assert audit(kernel, "deny")[0]["syscall"] == "memory_recall"
