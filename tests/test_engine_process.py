"""The engine in a supervised process of its own (kernel/cores/enginehost.py, kernel/cores/engine.py),
on the fake model: what a crash costs, restarts, the crash loop and `retry`.

These tests kill a real child process with real signals; the kernel runs in-process."""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import time
from pathlib import Path

import pytest
import trio
from kernel_helpers import ROOT, answer, finished, mkdir, producing, refused, run, running, submit
from mounting import gone

from kernel import params
from kernel.cores.enginechild import CRASH_ENV
from kernel.cores.enginehost import EngineDied, EngineProcess, StepTimes
from kernel.cores.pidfiles import stopped
from kernel.cores.wire import EngineSpec
from kernel.errors import KernelError
from kernel.kernel import Kernel
from kernel.llm.jobs import JobState
from kernel.storage.database import Storage
from kernel.syscall import Sys, syscall

SLOW = 0.02  # seconds per fake decode step: long answers keep their jobs in the engine a while


def stop(pid: int) -> None:
    """SIGSTOP, and wait until the process is stopped: the signal takes effect when the
    process is next scheduled, and a call sent before that is still answered."""
    os.kill(pid, signal.SIGSTOP)
    until = time.monotonic() + 10
    while not stopped(pid, traced=False):
        assert time.monotonic() < until, f"process {pid} did not stop"
        time.sleep(0.001)


def started(spec: EngineSpec) -> EngineProcess:
    core = EngineProcess(spec)
    core.start()
    return core


@pytest.fixture
def process_kernel(tmp_path: Path):
    kernels: list[Kernel] = []

    def make(n_slots: int = 4, delay: float = SLOW) -> Kernel:
        core = started(EngineSpec("fake", n_slots=n_slots, n_ctx_seq=2048, fake_delay=delay))
        kernel = Kernel(Storage(tmp_path / "aiosfs.db"), core)
        kernels.append(kernel)
        return kernel

    yield make
    for kernel in kernels:
        kernel.engine.client.close()
        kernel.storage.close()
        kernel.memory.store.close()


def engine_log(kernel: Kernel) -> list[dict]:
    """The `engine` lines of the audit log."""
    return [e for e in (json.loads(line) for line in kernel.audit) if e["event"] == "engine"]


def test_the_engine_runs_in_another_process_and_answers(process_kernel) -> None:
    kernel = process_kernel()
    assert kernel.engine.client.pid != os.getpid()
    assert kernel.engine.client.state == "ready"

    async def body() -> None:
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            jobs = [await submit(kernel, agent, f"question {i}") for i in range(3)]
            for job in jobs:
                await finished(job)
            assert [bytes(job.data).decode() for job in jobs] == [answer(f"question {i}", i + 1) + "\n" for i in range(3)]

    run(body)


def test_a_crash_fails_the_jobs_in_the_engine_keeps_the_queue_and_restarts(process_kernel) -> None:
    kernel = process_kernel(n_slots=2)
    first_pid = kernel.engine.client.pid
    assert first_pid is not None

    async def body() -> None:
        async with running(kernel):
            agents = [await mkdir(kernel, f"a{i}") for i in range(3)]
            long = "x" * 400  # the fake echoes it: about 400 steps
            in_engine = [await submit(kernel, agents[i], long) for i in range(2)]
            queued = await submit(kernel, agents[2], "after the crash")
            for job in in_engine:
                await producing(job)
            assert queued.state is JobState.QUEUED
            os.kill(first_pid, signal.SIGSEGV)
            for job in in_engine:
                await finished(job)
                assert job.state is JobState.ERROR and job.errno == errno.EIO
                assert "engine crashed" in job.message and "SIGSEGV" in job.message
                assert job.data, "the partial answer is kept"
            await finished(queued)
            assert bytes(queued.data).decode() == answer("after the crash") + "\n"
            assert kernel.engine.restarts == 1 and kernel.engine.client.pid not in (None, first_pid)
            status = kernel.status_line()
            assert "engine=ready" in status and "restarts=1" in status and "SIGSEGV" in status

    run(body, timeout=60)
    events = engine_log(kernel)
    assert [e["what"] for e in events] == ["crashed", "restarted"]
    assert "SIGSEGV" in events[0]["reason"] and len(events[0]["jobs"]) == 2 and events[1]["restarts"] == 1


def test_a_crash_loop_marks_the_core_failed_until_retry(process_kernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = process_kernel(n_slots=1)
    flag = tmp_path / "crash-at-load"
    monkeypatch.setenv(CRASH_ENV, f"load@{flag}")  # restarted engines die while the flag exists
    monkeypatch.setattr(params, "ENGINE_BACKOFF_SECONDS", 0.05)

    async def body() -> None:
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            busy = await submit(kernel, agent, "y" * 300)
            await producing(busy)
            waiting = await submit(kernel, agent, "waits in the queue")
            flag.write_text("")
            assert kernel.engine.client.pid is not None
            os.kill(kernel.engine.client.pid, signal.SIGKILL)
            await finished(busy)
            assert busy.errno == errno.EIO and "SIGKILL" in busy.message
            await finished(waiting)  # the core failed: the queue gets EIO with the reason
            assert waiting.errno == errno.EIO and "failed" in waiting.message and "retry" in waiting.message
            assert kernel.engine.client.state == "failed"
            error = await refused(errno.EIO, submit(kernel, agent, "while failed"))
            assert "crashed" in error.message and "SIGSEGV" in error.message
            assert "engine=failed" in kernel.status_line()
            flag.unlink()  # the cause is gone
            await syscall(kernel, Sys.KERNEL_CTL, ROOT, f"retry {kernel.runtime.info.name}\n".encode())
            again = await finished(await submit(kernel, agent, "back"))
            assert again.state is JobState.DONE and bytes(again.data).decode().endswith("BACK\n")
            assert kernel.engine.client.state == "ready"

    run(body, timeout=60)
    whats = [e["what"] for e in engine_log(kernel)]
    assert whats == ["crashed", "crashed", "failed", "retry", "restarted"], whats


def test_crashes_apart_with_a_stable_engine_between_are_no_loop(process_kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = process_kernel(n_slots=1)
    monkeypatch.setattr(params, "ENGINE_BACKOFF_SECONDS", 0.05)
    monkeypatch.setattr(params, "ENGINE_STABLE_SECONDS", 0.3)  # 10 s in a mount

    async def body() -> None:
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            for crash in range(params.ENGINE_CRASH_LOOP + 1):  # one more than a loop
                job = await producing(await submit(kernel, agent, '{"prompt": "x", "max_tokens": 2000, "ignore_eos": true}'))
                await trio.sleep(0.4)  # the engine serves long enough to count as stable
                assert kernel.engine.client.pid is not None
                os.kill(kernel.engine.client.pid, signal.SIGKILL)
                await finished(job)
                assert job.errno == errno.EIO, job.message
                served = await finished(await submit(kernel, agent, f"after {crash}"))
                assert served.state is JobState.DONE, served.message
            assert kernel.engine.restarts == params.ENGINE_CRASH_LOOP + 1

    run(body, timeout=60)
    assert "failed" not in [e["what"] for e in engine_log(kernel)]


def test_retry_is_refused_for_a_core_that_serves(process_kernel) -> None:
    kernel = process_kernel()

    async def body() -> None:
        async with running(kernel):
            await refused(errno.EINVAL, syscall(kernel, Sys.KERNEL_CTL, ROOT, f"retry {kernel.runtime.info.name}\n".encode()))
            await refused(errno.ENOENT, syscall(kernel, Sys.KERNEL_CTL, ROOT, b"retry nosuchmodel\n"))

    run(body)


def test_a_bad_model_file_is_a_clear_error_not_a_crash(tmp_path: Path) -> None:
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(EngineDied) as info:
        started(EngineSpec("llama", model=str(bad), n_slots=1, n_ctx_seq=256))
    reason = info.value.reason
    assert "killed by" not in reason and "exited with" not in reason, f"the engine died instead of refusing the file: {reason}"
    assert "GGUF" in reason or "load" in reason, reason


def test_a_crash_while_warming_up_is_reported_with_the_signal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CRASH_ENV, "warmup")
    with pytest.raises(EngineDied) as info:
        started(EngineSpec("fake", n_slots=1))
    assert "killed by SIGSEGV" in info.value.reason and "crashing at warmup" in info.value.reason


def test_tokenize_waits_for_a_restarting_engine(process_kernel) -> None:
    kernel = process_kernel()
    core = kernel.engine.client

    async def body() -> None:
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            assert core.pid is not None
            os.kill(core.pid, signal.SIGKILL)
            with trio.fail_after(30):
                job = await finished(await submit(kernel, agent, "hello"))
            assert bytes(job.data).decode() == answer("hello") + "\n"

    run(body, timeout=60)


def test_the_deadline_follows_the_slowest_recent_step() -> None:
    times = StepTimes(window=4, windows=2)
    for seconds in (0.1, 0.3, 0.2, 0.1):  # one window, whose slowest is 0.3
        times.add(seconds)
    assert times.slowest() == 0.3
    for _ in range(8):  # two more windows of 0.1: the slow one is no longer recent
        times.add(0.1)
    assert times.slowest() == 0.1
    core = EngineProcess(EngineSpec("fake"), deadline=2.0)
    assert core.deadline() == 2.0  # the floor, before any step
    for _ in range(3):
        core._times.add(0.1)
    assert core.deadline() == params.ENGINE_DEADLINE_FACTOR * 0.1  # 5 s: a slower step, a longer deadline
    core._times.add(60.0)  # a step slowed down by a busy machine
    assert core.deadline() == params.ENGINE_DEADLINE_CAP_FACTOR * 2.0


def test_a_stopped_engine_is_declared_hung_killed_and_replaced(process_kernel) -> None:
    """An in-process kernel on a real engine process, stopped with SIGSTOP while a job generates."""
    kernel = process_kernel(n_slots=2)
    core = kernel.engine.client
    core.floor = 1.0  # the watchdog's deadline, short for the test

    async def body() -> None:
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            job = await producing(await submit(kernel, agent, '{"prompt": "x", "max_tokens": 2000, "ignore_eos": true}'))
            frozen = core.pid
            assert frozen is not None
            stop(frozen)
            await finished(job)
            assert job.state is JobState.ERROR and job.errno == errno.EIO
            assert job.message.startswith("the engine hung: no progress for 1 s (a step)"), job.message
            again = await finished(await submit(kernel, agent, "again"))
            assert bytes(again.data).decode() == answer("again") + "\n"  # a failed turn does not extend the context
            assert core.pid != frozen and core.hangs == 1
            assert kernel.engine.statistics()["engine_hangs"] == 1
            assert [e["what"] for e in engine_log(kernel)] == ["hung", "restarted"]

    run(body, timeout=60)


def test_a_call_too_large_for_the_socket_to_a_stopped_engine_is_a_hang_in_bounded_time() -> None:
    core = EngineProcess(EngineSpec("fake", n_slots=1), deadline=1.0)
    core.start()
    try:
        assert core.pid is not None
        stop(core.pid)
        with pytest.raises(KernelError) as info:
            core.tokenize("x" * 4_000_000)  # more than the socket buffers: the send itself blocks
        assert info.value.errno == errno.EIO and "the engine hung: no progress for 1 s (a tokenize call)" in info.value.message
        assert core.state == "hung" and core.hangs == 1
        assert gone(core.pid, timeout=5), "the hung engine was not killed"
    finally:
        core.close()


def test_a_stopped_engine_is_found_at_the_floor_even_when_slow_steps_raised_the_deadline() -> None:
    core = EngineProcess(EngineSpec("fake", n_slots=1), deadline=1.0)
    core.start()
    try:
        core._times.add(10.0)  # a slow step, as on a busy machine: the deadline is at its cap
        assert core.deadline() == params.ENGINE_DEADLINE_CAP_FACTOR * 1.0
        assert core.pid is not None
        stop(core.pid)
        started = time.monotonic()
        with pytest.raises(KernelError) as info:
            core.tokenize("hello")
        waited = time.monotonic() - started
        assert "the engine hung" in info.value.message
        assert waited < core.deadline(), f"a stopped engine was waited for {waited:.1f} s, its full deadline"
    finally:
        core.close()


def test_a_result_goes_back_while_the_next_step_is_on_the_device() -> None:
    """The engine's side (kernel/cores/enginechild.py): with the next plan already there,
    a step's result is sent after that plan's batch is queued, so the send overlaps the
    device; a step in which a job ends is sent at once; nothing is held when no plan waits."""
    from socket import socketpair

    from kernel.agents.config import AgentConfig
    from kernel.cores.backends.fake import FakeBackend
    from kernel.cores.channel import Channel
    from kernel.cores.enginechild import _Serving
    from kernel.cores.wire import Admit, Plan, StepResult

    backend = FakeBackend(n_slots=2, step_delay=0.05)
    sent: list[bool] = []  # for each result: whether the device was busy when it was sent

    class Watched(Channel):
        def send(self, message: object, until: float | None = None) -> None:
            if isinstance(message, StepResult):
                sent.append(time.perf_counter() < backend._device_until)
            super().send(message, until)

    near, far = socketpair()
    engine, daemon = Watched(near), Channel(far)
    serving = _Serving(backend, engine)
    config = AgentConfig(max_tokens=4, temperature=0)
    plans = [Plan(start=[Admit(1, "a", list(b"hello"), config, 0)])] + [Plan() for _ in range(5)]
    for plan in plans:
        daemon.send(plan)
    for _ in plans:
        serving.step(engine.recv())
    serving.send_held()
    results = [daemon.recv() for _ in plans]
    ended = next(i for i, r in enumerate(results) if any(end is not None for *_, end in r.outputs))
    assert ended == 3 and sent[:ended] == [True] * ended  # held, then sent during the next step's device time
    assert sent[ended] is False  # a step that ends a job goes back at once
    assert len(b"".join(text for r in results for _, text, _, _ in r.outputs)) == 4  # max_tokens tokens, none lost
    serving.step(Plan())  # no plan waits: sent at once
    assert sent[-1] is False and serving.held is None
    near.close()
    far.close()


def test_the_engine_goes_on_by_itself_while_the_next_plan_is_late() -> None:
    """The engine's side: after a plan that allows `free_steps`, an engine that finds no
    plan waiting takes that many steps on its own with the same jobs, each result marked
    `free`; a job left out (paused) is not stepped; a plan that allows none gets none."""
    import threading
    from socket import socketpair

    from kernel.agents.config import AgentConfig
    from kernel.cores.backends.fake import FakeBackend
    from kernel.cores.channel import Channel
    from kernel.cores.enginechild import _Serving
    from kernel.cores.wire import STOP, Admit, Plan

    near, far = socketpair()
    engine, daemon = Channel(near), Channel(far)
    serving = _Serving(FakeBackend(n_slots=2), engine)
    thread = threading.Thread(target=serving.serve, daemon=True)
    thread.start()

    def results(n: int) -> list:
        return [daemon.recv(until=time.monotonic() + 10) for _ in range(n)]

    def nothing_more() -> bool:
        return not select.select([far], [], [], 0.3)[0]

    try:
        config = AgentConfig(max_tokens=200, temperature=0)
        daemon.send(Plan(start=[Admit(1, "a", list(b"<|user|>\nhello<|end|>\n<|assistant|>\n"), config, 0)], free_steps=3))
        got = results(4)
        assert [r.free for r in got] == [False, True, True, True]
        assert all(r.outputs and r.outputs[0][0] == 1 for r in got)  # each step gave the job a token
        assert got[-1].stats["free_steps"] == 3
        assert nothing_more()  # the three are spent: the engine waits for the daemon
        daemon.send(Plan(paused={1}, free_steps=3))  # left out: nothing to go on with
        assert results(1)[0].free is False and nothing_more()
        daemon.send(Plan(free_steps=0))
        assert results(1)[0].outputs and nothing_more()
        daemon.send(STOP)
        thread.join(10)
        assert not thread.is_alive()
    finally:
        near.close()
        far.close()


def test_steps_the_engine_took_on_its_own_reach_the_jobs(process_kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon that plans slowly: the engine goes on by itself, the daemon applies those
    results as they come, and every token reaches the reader in order."""
    kernel = process_kernel(n_slots=2, delay=0.001)
    engine = kernel.engine
    plan = engine._plan

    def slow_plan():  # a trio thread busy with readers holds the GIL this long
        time.sleep(0.02)
        return plan()

    monkeypatch.setattr(engine, "_plan", slow_plan)

    async def body() -> None:
        async with running(kernel):
            agents = [await mkdir(kernel, name) for name in ("a", "b")]
            jobs = [await submit(kernel, agent, "say something long " * 3) for agent in agents]
            for job in jobs:
                await finished(job)
            for job in jobs:
                assert bytes(job.data).decode() == answer("say something long " * 3) + "\n"

    run(body, timeout=60)
    assert kernel.statistics()["free_steps"] > 0


@pytest.mark.parametrize("where", ["process", "inline"])
def test_a_bug_in_the_engine_loop_costs_the_jobs_in_it_not_the_mount(process_kernel, tmp_path: Path, monkeypatch, where: str) -> None:
    """An exception other than the engine's death in the daemon's engine loop (here in
    applying a step's result) is handled as a crash: the jobs in the engine end with
    EIO and the reason, the engine starts again, and the next request is answered."""
    from kernel.cores.backends.fake import FakeBackend
    from kernel.cores.engine import Engine

    kernel = process_kernel(n_slots=2) if where == "process" else Kernel(Storage(tmp_path / "inline.db"), FakeBackend(n_slots=2, step_delay=SLOW))
    apply = Engine._apply
    armed = [True]

    def broken(self: Engine, result: object) -> None:
        if armed[0] and any(text for _, text, _, _ in result.outputs):  # type: ignore[attr-defined]
            armed[0] = False
            raise ValueError("a bug in applying a step")
        apply(self, result)  # type: ignore[arg-type]

    monkeypatch.setattr(Engine, "_apply", broken)

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            hit = await submit(kernel, agent, "x" * 200)
            await finished(hit)
            after = await submit(kernel, agent, "still there?")
            await finished(after)
            return hit, after

    hit, after = run(body)
    assert hit.state is JobState.ERROR and hit.errno == errno.EIO and "a bug in applying a step" in hit.message
    assert after.state is JobState.DONE and after.answer == answer("still there?", 1)  # the failed turn is not in the context
    assert kernel.engine.stats["engine_crashes"] == 1 and engine_log(kernel)[0]["what"] == "crashed"
    if where == "inline":
        kernel.storage.close()
        kernel.memory.store.close()
