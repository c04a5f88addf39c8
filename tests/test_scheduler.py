"""Scheduling policies and context switches, with the deterministic FakeBackend."""

from __future__ import annotations

import errno
import json

import pytest
from kernel_helpers import OWNER, ROOT, answer, ask, ctl, finished, mkdir, producing, refused, run, running, submit

from kernel import params
from kernel.agents.config import AgentConfig
from kernel.cores.backends.fake import FakeBackend
from kernel.cores.enginehost import EngineProcess
from kernel.cores.scheduler import PriorityScheduler, RoundRobinScheduler, Running, Scheduler, make_scheduler
from kernel.cores.wire import EngineSpec
from kernel.kernel import Kernel
from kernel.llm.jobs import Job
from kernel.storage.database import Storage
from kernel.syscall import Sys, syscall


def _kernels(tmp_path, mode: str):
    made: list[Kernel] = []

    def make(scheduler: str = "fifo", *, n_slots: int = 1, step_delay: float = 0.002, **options) -> Kernel:
        if mode == "process":
            core = EngineProcess(EngineSpec("fake", n_slots=n_slots, fake_delay=step_delay))
            core.start()
            kernel = Kernel(Storage(tmp_path / "db"), core, scheduler, **options)
        else:
            kernel = Kernel(Storage(tmp_path / "db"), FakeBackend(n_slots=n_slots, step_delay=step_delay), scheduler, **options)
        made.append(kernel)
        return kernel

    return make, made


@pytest.fixture(params=["inline", "process"])
def make_kernel(tmp_path, request):
    """Kernels on the fake model in this process (lock-step), and in an engine process,
    which runs with two plans in flight (docs/engine.md): every policy must hold on both."""
    make, made = _kernels(tmp_path, request.param)
    yield make
    for kernel in made:
        kernel.engine.client.close()
        kernel.storage.close()


@pytest.fixture
def make_inline_kernel(tmp_path):
    """In this process only: for tests that look inside the fake model (its decode calls, its KV)."""
    make, made = _kernels(tmp_path, "inline")
    yield make
    for kernel in made:
        kernel.storage.close()


def job(n: int, agent: str, priority: int = 0, queued_at: float = 0.0) -> Job:
    return Job(n, agent, 0, "x", [], [1], AgentConfig(priority=priority), queued_at=queued_at or 1e12)


# -- the policies, as plain logic ----------------------------------------------------------


def test_make_scheduler_parses_and_refuses():
    assert make_scheduler("fifo").describe() == "fifo"
    assert make_scheduler("rr").describe() == f"rr quantum={params.DEFAULT_QUANTUM}"
    assert make_scheduler("rr quantum=7").describe() == "rr quantum=7"
    assert make_scheduler("priority").describe() == "priority"
    for bad in ("", "lottery", "rr quantum=0", "rr quantum=x", "rr slice=3", "fifo now"):
        with pytest.raises(ValueError):
            make_scheduler(bad)


def test_fifo_keeps_arrival_order_and_never_preempts():
    policy = Scheduler()
    jobs = [job(i, "flood" if i < 4 else "other") for i in range(5)]
    for j in jobs:
        policy.push(j)
    assert policy.preempt([Running(jobs[0], 10_000)], 0) == []
    assert policy.pick(5) == jobs


def test_round_robin_takes_agents_in_turn():
    policy = RoundRobinScheduler(quantum=4)
    flood = [job(i, "flood") for i in range(4)]
    for j in flood:
        policy.push(j)
    late = job(9, "late")
    policy.push(late)
    assert policy.pick(1) == [flood[0]]
    assert policy.pick(1) == [late]  # not behind the whole flood


def test_round_robin_preempts_only_spent_quanta_when_others_wait():
    policy = RoundRobinScheduler(quantum=4)
    a, b, c = job(1, "a"), job(2, "b"), job(3, "c")
    assert policy.preempt([Running(a, 9)], 0) == []  # nobody waits
    policy.push(c)
    assert policy.preempt([Running(a, 3), Running(b, 4)], 0) == [b]
    assert policy.preempt([Running(a, 5), Running(b, 4)], 1) == []  # a free slot is enough


def test_priority_orders_by_effective_priority_with_aging(monkeypatch):
    monkeypatch.setattr(params, "PRIORITY_AGING_SECONDS", 10.0)
    policy = PriorityScheduler()
    now = 1_000.0
    monkeypatch.setattr("kernel.cores.scheduler.time.time", lambda: now)
    old_low = job(1, "low", priority=0, queued_at=now - 100)  # aged to 10
    high = job(2, "high", priority=5, queued_at=now)
    low = job(3, "low2", priority=1, queued_at=now)
    for j in (low, high, old_low):
        policy.push(j)
    assert policy.pick(3) == [old_low, high, low]


def test_priority_preempts_the_lowest_running_job():
    policy = PriorityScheduler()
    running_low, running_mid = job(1, "a", priority=1), job(2, "b", priority=3)
    urgent = job(3, "c", priority=2, queued_at=1e12)
    policy.push(urgent)
    assert policy.preempt([Running(running_low, 0), Running(running_mid, 0)], 0) == [running_low]
    assert policy.preempt([Running(running_mid, 0)], 0) == []  # not above the running one


def test_aging_never_preempts_equals():
    policy = PriorityScheduler()
    policy.push(job(1, "old", priority=2, queued_at=1.0))  # aged for ages
    assert policy.preempt([Running(job(2, "running", priority=2), 0)], 0) == []


def test_equal_priorities_do_not_thrash(make_kernel):
    kernel = make_kernel("priority")

    async def body():
        async with running(kernel):
            a, b = await mkdir(kernel, "a"), await mkdir(kernel, "b")
            first = await producing(await submit(kernel, a, _long("first ")))
            second = await submit(kernel, b, "second")
            await finished(first)
            await finished(second)
            return first, second

    first, second = run(body)
    assert second.finished_at > first.finished_at and kernel.engine.statistics()["preemptions"] == 0


def test_a_job_paused_while_queued_does_not_start(make_kernel):
    kernel = make_kernel("fifo", n_slots=1)

    async def body():
        async with running(kernel):
            a, b, c = await mkdir(kernel, "a"), await mkdir(kernel, "b"), await mkdir(kernel, "c")
            busy = await producing(await submit(kernel, a, _long("busy ")))
            waiting = await submit(kernel, b, "later")
            await ctl(kernel, b, "pause")
            after = await submit(kernel, c, "after")  # queued behind the paused job: it runs first only if that one sits out
            await finished(busy)
            await finished(after)
            assert not waiting.data and waiting.shown_state == "suspended"
            await ctl(kernel, b, "resume")
            return await finished(waiting), after

    waiting, after = run(body)
    assert waiting.answer == answer("later") and after.answer == answer("after")
    assert waiting.finished_at > after.finished_at


def test_switching_policy_keeps_arrival_order(make_kernel):
    kernel = make_kernel("fifo")

    async def body():
        async with running(kernel):
            agents = [await mkdir(kernel, f"a{i}") for i in range(3)]
            busy = await producing(await submit(kernel, agents[0], _long("busy ")))
            older = await submit(kernel, agents[1], "older")
            await syscall(kernel, Sys.SCHED_SET, ROOT, b"priority\n")
            await syscall(kernel, Sys.SCHED_SET, ROOT, b"fifo\n")
            newer = await submit(kernel, agents[2], "newer")
            for j in (busy, older, newer):
                await finished(j)
            return older, newer

    older, newer = run(body)
    assert older.finished_at < newer.finished_at


# -- the engine switching for real ------------------------------------------------------------


def _long(text: str) -> str:
    return text * 8  # a 100+ token answer from the fake model


def test_round_robin_interleaves_jobs_on_one_slot(make_kernel):
    kernel = make_kernel("rr quantum=4")

    async def body():
        async with running(kernel):
            a, b = await mkdir(kernel, "a"), await mkdir(kernel, "b")
            first = await submit(kernel, a, _long("first "))
            second = await submit(kernel, b, _long("second "))
            await producing(second)
            assert not first.state.finished  # the second started before the first ended
            await finished(first)
            await finished(second)
            return first, second

    first, second = run(body)
    assert first.answer == answer(_long("first ")) and second.answer == answer(_long("second "))
    stats = kernel.engine.statistics()
    assert stats["preemptions"] >= 4 and stats["swaps_out"] >= 4 and stats["swaps_in"] >= 4 and stats["swap_bytes"] > 0


def test_recompute_past_the_ram_budget_gives_the_same_answers(make_kernel):
    kernel = make_kernel("rr quantum=4", swap_budget=0)

    async def body():
        async with running(kernel):
            a, b = await mkdir(kernel, "a"), await mkdir(kernel, "b")
            jobs = [await submit(kernel, a, _long("alpha ")), await submit(kernel, b, _long("beta "))]
            return [(await finished(j)).answer for j in jobs]

    assert run(body) == [answer(_long("alpha ")), answer(_long("beta "))]
    stats = kernel.engine.statistics()
    assert stats["recomputes"] > 0 and stats["swaps_out"] == 0


def test_priority_job_overtakes_and_the_preempted_one_still_finishes(make_kernel):
    kernel = make_kernel("priority")

    async def body():
        async with running(kernel):
            a, b = await mkdir(kernel, "a"), await mkdir(kernel, "b")
            slow = await producing(await submit(kernel, a, _long("slow ")))
            urgent = await submit(kernel, b, '{"prompt": "urgent", "priority": 9}')
            await finished(urgent)
            assert not slow.state.finished
            await finished(slow)
            return slow, urgent

    slow, urgent = run(body)
    assert urgent.finished_at < slow.finished_at
    assert slow.answer == answer(_long("slow ")) and urgent.answer == answer("urgent")
    assert kernel.engine.statistics()["preemptions"] == 1


def test_priority_holds_lower_jobs_out_of_the_steps_while_urgent_work_runs(make_inline_kernel, monkeypatch):
    monkeypatch.setattr(params, "PRIORITY_AGING_SECONDS", 1e6)  # no aging back in, however slow this machine is
    kernel = make_inline_kernel("priority", n_slots=2)

    async def body():
        async with running(kernel):
            a, b = await mkdir(kernel, "a"), await mkdir(kernel, "b")
            slow = await producing(await submit(kernel, a, _long("slow ") * 2))
            urgent = await submit(kernel, b, json.dumps({"prompt": _long("urgent ").strip(), "priority": 9}))
            await finished(urgent)
            await finished(slow)
            return slow, urgent

    slow, urgent = run(body)
    assert slow.answer == answer(_long("slow ") * 2) and urgent.answer == answer(_long("urgent "))
    # Which sequences each decode step fed: the low job's alone at first, then the urgent one's.
    steps = [{entry.seq for entry in call} for call in kernel.runtime.decode_calls]
    slow_seq = next(iter(steps[0]))
    urgent_steps = [i for i, seqs in enumerate(steps) if seqs - {slow_seq}]
    assert len(urgent_steps) > len(urgent.data)  # its prompt's steps, then one per token
    # Without holding, the low job would share the urgent job's steps; held, it sits out every one
    # of them (it keeps its slot), and goes on after.
    assert [i for i in urgent_steps if slow_seq in steps[i]] == []
    assert any(slow_seq in seqs for seqs in steps[urgent_steps[-1] + 1 :])
    stats = kernel.engine.statistics()
    assert stats["preemptions"] == 0 and stats["held_seq_steps"] > 0


def test_held_low_priority_job_ages_back_into_the_steps(make_kernel, monkeypatch):
    monkeypatch.setattr(params, "PRIORITY_AGING_SECONDS", 0.005)
    kernel = make_kernel("priority", n_slots=2)

    async def body():
        async with running(kernel):
            a, b = await mkdir(kernel, "a"), await mkdir(kernel, "b")
            slow = await producing(await submit(kernel, a, _long("slow ")))
            urgent = await submit(kernel, b, json.dumps({"prompt": _long("urgent ").strip(), "priority": 9}))
            await producing(urgent)
            at_start = len(slow.data)
            await finished(urgent)
            return len(slow.data) - at_start

    assert run(body) > 0  # aged to priority 9 while the urgent job still ran


def test_aging_lets_low_priority_progress(make_kernel, monkeypatch):
    monkeypatch.setattr(params, "PRIORITY_AGING_SECONDS", 0.05)
    kernel = make_kernel("priority")

    async def body():
        async with running(kernel):
            busy, meek_agent = await mkdir(kernel, "busy"), await mkdir(kernel, "meek")
            urgent = '{"prompt": "urgent", "priority": 9}'
            stream = [await submit(kernel, busy, urgent, history=[])]
            meek = await submit(kernel, meek_agent, '{"prompt": "meek", "priority": 0}')
            while not meek.state.finished and len(stream) < 200:  # fresh urgent work keeps arriving
                stream.append(await submit(kernel, busy, urgent, history=[]))
                await finished(stream[-2])
            return meek, stream

    meek, stream = run(body)
    assert meek.answer == answer("meek")
    assert len(stream) < 200  # it ran while urgent work was still arriving


def test_flooding_agent_does_not_starve_another_under_rr(make_kernel):
    kernel = make_kernel("rr quantum=64")

    async def body():
        async with running(kernel):
            flood, quiet = await mkdir(kernel, "flood"), await mkdir(kernel, "quiet")
            jobs = [await submit(kernel, flood, f"flood {i}", history=[]) for i in range(6)]
            lone = await submit(kernel, quiet, "lone")
            await finished(lone)
            return jobs, lone

    jobs, lone = run(body)
    assert sum(1 for j in jobs if j.finished_at and j.finished_at < lone.finished_at) <= 2


def test_pause_leaves_the_job_out_and_resume_finishes_it(make_kernel):
    kernel = make_kernel("fifo", n_slots=2)

    async def body():
        async with running(kernel):
            a, b = await mkdir(kernel, "a"), await mkdir(kernel, "b")
            paused = await producing(await submit(kernel, a, _long("pause me ")))
            await ctl(kernel, a, "pause")
            # The other job's steps all start after the pause: once its first token is here, so is
            # every token of the steps before, and the paused job must not grow from then on.
            other = await producing(await submit(kernel, b, "meanwhile"))
            frozen = len(paused.data)
            await finished(other)
            assert len(paused.data) == frozen and paused.shown_state == "suspended"
            await ctl(kernel, a, "resume")
            await finished(paused)
            return paused, other

    paused, other = run(body)
    assert paused.answer == answer(_long("pause me ")) and other.answer == answer("meanwhile")


def test_a_paused_job_gives_up_its_slot_to_waiting_work(make_kernel):
    kernel = make_kernel("fifo", n_slots=1)

    async def body():
        async with running(kernel):
            a, b = await mkdir(kernel, "a"), await mkdir(kernel, "b")
            paused = await producing(await submit(kernel, a, _long("parked ")))
            await ctl(kernel, a, "pause")
            other = await ask(kernel, b, "through")  # gets the only slot
            assert not paused.state.finished
            await ctl(kernel, a, "resume")
            return await finished(paused), other

    paused, other = run(body)
    assert paused.answer == answer(_long("parked ")) and other.answer == answer("through")
    assert kernel.engine.statistics()["swaps_out"] >= 1


def test_next_turn_reuses_the_cached_prefix(make_kernel):
    for reuse in (True, False):
        kernel = make_kernel("fifo", n_slots=2, kv_reuse=reuse)

        async def body(kernel=kernel, name=f"talker{reuse}"):
            async with running(kernel):
                agent = await mkdir(kernel, name)
                await ask(kernel, agent, "first turn")
                return await ask(kernel, agent, "second turn")

        second = run(body)
        assert second.answer == answer("second turn", turn=2)
        hits = kernel.engine.statistics()["prefix_hit_tokens"]
        assert (hits > 20) if reuse else (hits == 0)
        kernel.storage.close()


def test_cached_sequences_give_way_to_new_agents(make_kernel):
    kernel = make_kernel("fifo", n_slots=2)

    async def body():
        async with running(kernel):
            agents = [await mkdir(kernel, f"a{i}") for i in range(4)]
            for agent in agents:
                await ask(kernel, agent, "hello")
            return [await ask(kernel, agent, "again") for agent in agents]

    assert [j.answer for j in run(body)] == [answer("again", turn=2)] * 4
    stats = kernel.engine.statistics()
    assert stats["cache_evictions"] >= 2 and stats["prefix_hit_tokens"] > 0


def test_cancel_frees_the_slot_for_the_next_job(make_inline_kernel):
    kernel = make_inline_kernel("fifo", n_slots=1, kv_reuse=False)

    async def body():
        async with running(kernel):
            a, b = await mkdir(kernel, "a"), await mkdir(kernel, "b")
            doomed = await producing(await submit(kernel, a, _long("doomed ")))
            waiting = await submit(kernel, b, "next")
            await ctl(kernel, a, "cancel")
            await finished(doomed)
            await finished(waiting)
            return doomed, waiting

    doomed, waiting = run(body)
    assert doomed.errno == errno.ECANCELED and waiting.answer == answer("next")
    assert kernel.engine.statistics()["running"] == 0
    assert kernel.runtime._seqs == {}  # the fake's KV: every sequence cleared


def test_scheduler_switch_at_run_time_is_root_only_and_kept(make_kernel):
    kernel = make_kernel("fifo")

    async def body():
        async with running(kernel):
            await refused(errno.EPERM, syscall(kernel, Sys.SCHED_SET, OWNER, b"priority\n"))
            await refused(errno.EINVAL, syscall(kernel, Sys.SCHED_SET, ROOT, b"lottery\n"))
            await syscall(kernel, Sys.SCHED_SET, ROOT, b"rr quantum=8\n")
            agent = await mkdir(kernel, "a")
            return await ask(kernel, agent, "still works")

    assert run(body).answer == answer("still works")
    assert kernel.engine.scheduler.describe() == "rr quantum=8"
    assert kernel.status_line().split()[2] == "sched=rr,quantum=8"
    restarted = Kernel(kernel.storage, FakeBackend())
    assert restarted.engine.scheduler.describe() == "rr quantum=8"


def test_a_bug_in_a_step_fails_those_jobs_and_the_engine_goes_on(make_inline_kernel, monkeypatch):
    kernel = make_inline_kernel("fifo", n_slots=2)
    real_decode = kernel.runtime.decode
    calls = {"n": 0}

    def flaky(entries):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("a bug")
        return real_decode(entries)

    monkeypatch.setattr(kernel.runtime, "decode", flaky)

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            victim = await ask(kernel, agent, "victim")
            survivor = await ask(kernel, agent, "survivor")
            return victim, survivor

    victim, survivor = run(body)
    assert victim.errno == errno.EIO and "internal error" in victim.message
    assert survivor.answer == answer("survivor")
    assert kernel.engine.statistics()["engine_errors"] == 1


def test_kernel_ctl_sched_is_root_only_and_checks_every_line(make_kernel):
    kernel = make_kernel("fifo")

    async def body():
        await refused(errno.EPERM, syscall(kernel, Sys.KERNEL_CTL, OWNER, b"sched priority\n"))
        await refused(errno.EINVAL, syscall(kernel, Sys.KERNEL_CTL, ROOT, b"sched priority\nreboot\n"))
        await refused(errno.EINVAL, syscall(kernel, Sys.KERNEL_CTL, ROOT, b"sched lottery\n"))
        assert kernel.engine.scheduler.describe() == "fifo"
        await syscall(kernel, Sys.KERNEL_CTL, ROOT, b"sched rr quantum=5\n")

    run(body)
    assert kernel.engine.scheduler.describe() == "rr quantum=5"
