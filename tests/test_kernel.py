"""The kernel end to end in-process: syscalls, engine, scheduling and storage,
with the deterministic FakeBackend and a real SQLite file."""

from __future__ import annotations

import errno
import itertools
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
from kernel_helpers import OTHER, OWNER, ROOT, answer, ask, ctl, finished, mkdir, producing, refused, run, running, submit

from kernel import params
from kernel.agents.config import AgentConfig
from kernel.cores.backends.fake import FakeBackend
from kernel.kernel import Kernel
from kernel.llm.jobs import JobState
from kernel.storage.database import Storage
from kernel.syscall import Sys, syscall


@pytest.fixture
def db(tmp_path):
    return tmp_path / "aiosfs.db"


@pytest.fixture
def make_kernel(db):
    """Build kernels on the test's database file; their storage is closed at the end."""
    made: list[Kernel] = []

    def make(**backend_options) -> Kernel:
        kernel = Kernel(Storage(db), FakeBackend(**backend_options))
        made.append(kernel)
        return kernel

    yield make
    for kernel in made:
        kernel.storage.close()


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def first_call_with(backend: FakeBackend, text: str) -> int:
    """Index of the first decode step that fed `text` (part of a prompt) to the model."""
    for index, call in enumerate(backend.decode_calls):
        if text.encode() in bytes(e.token for e in call if e.token < 256):
            return index
    raise AssertionError(f"{text!r} was never decoded")


# -- answers and conversations ------------------------------------------------------------


def test_prompt_gets_the_models_answer(make_kernel):
    kernel = make_kernel()

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "alice")
            job = await ask(kernel, agent, "hello world")
            assert job.state is JobState.DONE
            assert job.errno == 0
            assert job.answer == answer("hello world") == "turn 1: HELLO WORLD"
            assert job.n_generated == len(answer("hello world").encode())
            assert job.source == "prompt"
            assert kernel.requests.latest_job(agent, OWNER.uid) is job
            assert kernel.requests.latest_job(agent, OTHER.uid) is None
            assert agent.active == set()
            row = kernel.storage.latest_job(agent.row.id, OWNER.uid)
            assert (row["id"], row["state"], row["output"], row["user_message"]) == (job.id, "done", job.text.encode(), "hello world")

    run(body)


def test_context_grows_and_is_used(make_kernel):
    kernel = make_kernel()

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "alice")
            first = await ask(kernel, agent, "hello")
            second = await ask(kernel, agent, "and again")
            assert first.answer == answer("hello", turn=1)
            assert second.answer == answer("and again", turn=2)
            assert second.messages == [user("hello"), assistant(first.answer), user("and again")]
            expected = [user("hello"), assistant(first.answer), user("and again"), assistant(second.answer)]
            assert agent.messages == expected
            assert kernel.storage.messages(agent.row.id) == expected

    run(body)


def test_system_message_from_config_reaches_the_model(make_kernel):
    kernel = make_kernel()

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "alice")
            await syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "system=be brief\n")
            job = await ask(kernel, agent, "hi")
            assert job.messages[0] == {"role": "system", "content": "be brief"}
            assert "<|system|>\nbe brief" in bytes(job.prompt_tokens).decode()
            assert job.answer == answer("hi")

    run(body)


def test_call_history_does_not_change_the_agents_context(make_kernel):
    kernel = make_kernel()

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "alice")
            await ask(kernel, agent, "own turn")
            before = list(agent.messages)
            history = [user("one"), assistant("ok"), user("two"), assistant("ok")]
            job = await ask(kernel, agent, "three", history=history)
            assert job.source == "call"
            assert job.answer == answer("three", turn=3)  # the history, not the agent's context, was shown
            assert agent.messages == before
            assert kernel.storage.messages(agent.row.id) == before
            assert history == [user("one"), assistant("ok"), user("two"), assistant("ok")]
            fresh = await ask(kernel, agent, "no history", history=[])
            assert fresh.answer == answer("no history", turn=1)
            assert agent.messages == before

    run(body)


def test_reset_clears_the_context(make_kernel):
    kernel = make_kernel()

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "alice")
            await ask(kernel, agent, "one")
            await ask(kernel, agent, "two")
            assert len(agent.messages) == 4
            await ctl(kernel, agent, "reset")
            assert agent.messages == []
            assert kernel.storage.messages(agent.row.id) == []
            job = await ask(kernel, agent, "three")
            assert job.answer == answer("three", turn=1)

    run(body)


def test_context_write_replaces_the_conversation(make_kernel):
    kernel = make_kernel()

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "alice")
            await ask(kernel, agent, "forgotten")
            await syscall(
                kernel, Sys.CONTEXT_WRITE, OWNER, agent, '{"role": "user", "content": "a"}\n{"role": "assistant", "content": "b"}\nplain note\n'
            )
            assert agent.messages == [user("a"), assistant("b"), user("plain note")]
            assert kernel.storage.messages(agent.row.id) == agent.messages
            job = await ask(kernel, agent, "next")
            assert job.answer == answer("next", turn=3)
            await refused(errno.EINVAL, syscall(kernel, Sys.CONTEXT_WRITE, OWNER, agent, '{"role": "robot", "content": "x"}\n'))
            assert len(agent.messages) == 5  # a refused write changes nothing

    run(body)


def test_long_conversations_keep_the_newest_turns(make_kernel):
    # a window of 200 tokens with 100 reserved for the answer holds one earlier turn
    kernel = make_kernel(n_ctx_seq=200)

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "alice")
            answers = [(await ask(kernel, agent, f"q{n}")).answer for n in range(1, 5)]
            assert answers == [answer("q1", 1), answer("q2", 2), answer("q3", 2), answer("q4", 2)]
            assert len(agent.messages) == 8  # the stored conversation is whole

    run(body)


def test_two_agents_concurrently_get_their_own_answers(make_kernel):
    kernel = make_kernel(step_delay=0.002)
    prompts = {"alice": "apples are red", "bob": "bananas are yellow", "carol": "cherries"}

    async def body():
        async with running(kernel):
            agents = {name: await mkdir(kernel, name) for name in prompts}
            results = {}

            async def one(name: str) -> None:
                results[name] = await ask(kernel, agents[name], prompts[name])

            async with trio.open_nursery() as nursery:
                for name in prompts:
                    nursery.start_soon(one, name)
            for name, text in prompts.items():
                assert results[name].state is JobState.DONE
                assert results[name].answer == answer(text)
                assert agents[name].messages == [user(text), assistant(answer(text))]

    run(body)


# -- the engine: batching and scheduling ------------------------------------------------------


def test_jobs_are_decoded_in_one_batch(make_kernel):
    kernel = make_kernel(n_slots=4)
    backend = kernel.runtime

    async def body():
        names = ["a", "b", "c"]
        agents = [await mkdir(kernel, name) for name in names]
        jobs = [await submit(kernel, agent, f"message for {agent.name}") for agent in agents]  # queued before the engine runs
        assert all(job.state is JobState.QUEUED for job in jobs)
        async with running(kernel):
            for job in jobs:
                await finished(job)
        for job, agent in zip(jobs, agents, strict=True):
            assert job.answer == answer(f"message for {agent.name}")
        seqs_per_step = [len({entry.seq for entry in call}) for call in backend.decode_calls]
        assert max(seqs_per_step) == 3
        # while all three generate, one step decodes one token of each
        assert any(len(call) == 3 and all(e.logits for e in call) for call in backend.decode_calls)
        assert kernel.statistics()["mean_batch"] > 1

    run(body)


def test_a_new_job_joins_a_running_batch(make_kernel):
    kernel = make_kernel(n_slots=2, step_delay=0.002)
    backend = kernel.runtime

    async def body():
        async with running(kernel):
            a = await mkdir(kernel, "a")
            b = await mkdir(kernel, "b")
            long_job = await producing(await submit(kernel, a, "x" * 150))
            assert long_job.state is JobState.RUNNING
            late = await finished(await submit(kernel, b, "late arrival"))
            await finished(long_job)
        assert late.answer == answer("late arrival")
        assert long_job.answer == answer("x" * 150)
        # the late prompt was prefilled in a step that also decoded the long job's next token
        step = backend.decode_calls[first_call_with(backend, "late arrival")]
        assert len({entry.seq for entry in step}) == 2

    run(body)


def test_long_prompts_are_prefilled_in_chunks(make_kernel):
    kernel = make_kernel(n_batch=8)
    backend = kernel.runtime

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "alice")
            job = await ask(kernel, agent, "a prompt much longer than one batch of eight tokens")
        assert job.answer == answer("a prompt much longer than one batch of eight tokens")
        assert all(len(call) <= 8 for call in backend.decode_calls)
        assert len(job.prompt_tokens) > 40

    run(body)


def test_fifo_admission_with_one_slot(make_kernel):
    kernel = make_kernel(n_slots=1)
    backend = kernel.runtime

    async def body():
        agents = [await mkdir(kernel, name) for name in ("c", "a", "b")]
        words = ["first", "second", "third"]
        jobs = [await submit(kernel, agent, word) for agent, word in zip(agents, words, strict=True)]
        async with running(kernel):
            for job in jobs:
                await finished(job)
        assert [job.answer for job in jobs] == [answer(word) for word in words]
        starts = [first_call_with(backend, word) for word in words]
        assert starts == sorted(starts)
        for earlier, later in itertools.pairwise(jobs):
            assert earlier.finished_at <= later.started_at  # one at a time

    run(body)


# -- cancel and remove ----------------------------------------------------------------------------


def test_cancel_a_queued_job(make_kernel):
    kernel = make_kernel(n_slots=1, step_delay=0.005)

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "alice")
            running_job = await producing(await submit(kernel, agent, "running job " * 10))
            queued = await submit(kernel, agent, "queued job")
            assert queued.state is JobState.QUEUED
            await ctl(kernel, agent, f"cancel {queued.id}")
            assert queued.state is JobState.CANCELLED  # at once: it never reached the engine
            assert queued.errno == errno.ECANCELED
            assert queued not in agent.active
            assert agent.errors[OWNER.uid][-1].startswith(f"ECANCELED {queued.id} ")
            await finished(running_job)
            assert running_job.state is JobState.DONE
            assert running_job.answer == answer("running job " * 10)
            assert kernel.storage.db.execute("SELECT state, errno FROM jobs WHERE id = ?", [queued.id]).fetchone() == ("cancelled", errno.ECANCELED)
            assert [m["role"] for m in agent.messages] == ["user", "assistant"]  # the cancelled prompt left no turn

    run(body)


def test_cancel_a_running_job(make_kernel):
    kernel = make_kernel(n_slots=1, step_delay=0.005)
    long_prompt = "y" * 200

    async def body():
        async with running(kernel):
            alice = await mkdir(kernel, "alice")
            bob = await mkdir(kernel, "bob")
            victim = await producing(await submit(kernel, alice, long_prompt))
            waiting = await submit(kernel, bob, "after you")
            assert victim.state is JobState.RUNNING
            await ctl(kernel, alice, "cancel")  # the caller's latest job on alice
            await finished(victim)
            assert victim.state is JobState.CANCELLED
            assert victim.errno == errno.ECANCELED
            assert answer(long_prompt).startswith(victim.answer)
            assert len(victim.answer) < len(answer(long_prompt))
            assert alice.messages == []
            assert alice.errors[OWNER.uid][-1].startswith(f"ECANCELED {victim.id} ")
            await finished(waiting)
            assert waiting.state is JobState.DONE
            assert waiting.answer == answer("after you")
            assert kernel.storage.latest_job(alice.row.id, OWNER.uid)["state"] == "cancelled"

    run(body)


def test_cancel_errors(make_kernel):
    kernel = make_kernel(n_slots=1, step_delay=0.005)

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "alice")
            done = await ask(kernel, agent, "done already")
            mine = await producing(await submit(kernel, agent, "z" * 100))
            await refused(errno.EINVAL, ctl(kernel, agent, "cancel soon"))
            await refused(errno.ENOENT, ctl(kernel, agent, "cancel 99999"))
            await refused(errno.EBUSY, ctl(kernel, agent, f"cancel {done.id}"))  # it exists but has finished
            await refused(errno.EPERM, ctl(kernel, agent, f"cancel {mine.id}", caller=OTHER))
            await ctl(kernel, agent, "cancel all", caller=OTHER)  # not OTHER's jobs: nothing happens
            assert mine in agent.active
            await ctl(kernel, agent, "cancel all")
            await finished(mine)
            assert mine.state is JobState.CANCELLED

    run(body)


def test_remove_agent_with_a_running_job_is_ebusy(make_kernel):
    kernel = make_kernel(n_slots=1, step_delay=0.005)

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "alice")
            job = await producing(await submit(kernel, agent, "w" * 100))
            error = await refused(errno.EBUSY, syscall(kernel, Sys.AGENT_REMOVE, OWNER, "alice"))
            assert str(job.id) in error.message
            assert "alice" in kernel.agents
            await ctl(kernel, agent, "cancel all")
            await finished(job)
            await syscall(kernel, Sys.AGENT_REMOVE, OWNER, "alice")
            assert "alice" not in kernel.agents
            assert [r.trashed_name for r in kernel.storage.agents()] == ["alice"]  # in the trash, restorable
            await refused(errno.ENOENT, syscall(kernel, Sys.AGENT_REMOVE, OWNER, "alice"))
            again = await mkdir(kernel, "alice")
            assert again.row.id > agent.row.id

    run(body)


def test_only_the_owner_or_root_may_remove(make_kernel):
    kernel = make_kernel()

    async def body():
        await mkdir(kernel, "alice", caller=OWNER)
        await mkdir(kernel, "bob", caller=OWNER)
        await refused(errno.EPERM, syscall(kernel, Sys.AGENT_REMOVE, OTHER, "alice"))
        assert "alice" in kernel.agents
        await syscall(kernel, Sys.AGENT_REMOVE, OWNER, "alice")
        await syscall(kernel, Sys.AGENT_REMOVE, ROOT, "bob")
        assert kernel.agents == {}

    run(body)


# -- generation limits ------------------------------------------------------------------------------


def test_max_tokens_stops_generation(make_kernel):
    kernel = make_kernel()

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "alice")
            job = await ask(kernel, agent, '{"prompt": "hello world", "max_tokens": 6}')
            assert job.state is JobState.DONE
            assert job.answer == "turn 1"
            assert job.n_generated == 6
            assert job.user_message == "hello world"
            await syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "max_tokens=4\n")
            job = await ask(kernel, agent, "hello again")
            assert job.answer == "turn"
            assert agent.messages[-2:] == [user("hello again"), assistant("turn")]

    run(body)


def test_stop_strings_cut_the_output(make_kernel):
    kernel = make_kernel()

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "alice")
            job = await ask(kernel, agent, '{"prompt": "hello world", "stop": ["WOR", "zzz"]}')
            assert job.state is JobState.DONE
            assert job.answer == "turn 1: HELLO "
            assert agent.messages[-1] == assistant("turn 1: HELLO ")
            # a partial match that does not complete is published after all
            job = await ask(kernel, agent, '{"prompt": "hello world", "stop": "HELP"}', history=[])
            assert job.answer == answer("hello world")
            # a stop string at the very start leaves nothing
            job = await ask(kernel, agent, '{"prompt": "hello", "stop": "turn"}', history=[])
            assert (job.state, job.answer) == (JobState.DONE, "")

    run(body)


def test_utf8_output_is_published_in_whole_characters(make_kernel):
    kernel = make_kernel()
    chunks: list[bytes] = []
    channel = kernel.engine.results

    class Spy:
        def send_nowait(self, deliveries):
            chunks.extend(chunk for _, chunk, _, _ in deliveries)
            channel.send_nowait(deliveries)

    kernel.engine.results = Spy()
    message = "héllo wörld ✓"

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "alice")
            job = await ask(kernel, agent, message)
            assert job.answer == answer(message) == "turn 1: HÉLLO WÖRLD ✓"
            assert job.n_generated == len(answer(message).encode()) > len(answer(message))
            for chunk in chunks:
                chunk.decode("utf-8")  # strict: no chunk ends inside a character
            assert b"" in chunks  # some tokens held back half a character
            cut = await ask(kernel, agent, '{"prompt": "héllo wörld ✓", "stop": "WÖR"}', history=[])
            assert cut.answer == "turn 1: HÉLLO "

    run(body)


def test_max_tokens_inside_a_character_still_gives_utf8(make_kernel):
    kernel = make_kernel()

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "alice")
            # the answer is "turn 1: É": the 9th byte is the first half of É
            job = await ask(kernel, agent, '{"prompt": "é", "max_tokens": 9}')
            assert job.state is JobState.DONE
            text = bytes(job.data).decode("utf-8")
            assert text.startswith("turn 1: ")
            assert "É" not in text

    run(body)


# -- refused requests ------------------------------------------------------------------------------


def test_non_utf8_request_is_einval_and_recorded(make_kernel):
    kernel = make_kernel()

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "alice")
            error = await refused(errno.EINVAL, submit(kernel, agent, b"caf\xe9 au lait"))
            assert "UTF-8" in error.message
            line = agent.errors[OWNER.uid][-1]
            assert line.startswith("EINVAL - ")
            assert "UTF-8" in line
            assert OTHER.uid not in agent.errors
            assert kernel.storage.latest_job(agent.row.id, OWNER.uid) is None
            assert agent.active == set()
            await ask(kernel, agent, "café au lait")
            assert OWNER.uid not in agent.errors  # a good request clears the error file

    run(body)


def test_oversized_request_is_efbig(make_kernel):
    kernel = make_kernel()

    async def body():
        agent = await mkdir(kernel, "alice")
        await refused(errno.EFBIG, submit(kernel, agent, b"x" * (params.MAX_REQUEST_BYTES + 1)))
        assert agent.errors[OWNER.uid][-1].startswith("EFBIG - ")
        assert agent.active == set()

    run(body)


def test_prompt_too_long_for_the_window_is_e2big(make_kernel):
    kernel = make_kernel(n_ctx_seq=64)

    async def body():
        agent = await mkdir(kernel, "alice")
        await refused(errno.E2BIG, submit(kernel, agent, "x" * 64))
        assert agent.errors[OWNER.uid][-1].startswith("E2BIG - ")

    run(body)


@pytest.mark.parametrize("request_text", ["", "   \n", '{"prompt": ""}'])
def test_empty_prompt_is_einval(make_kernel, request_text):
    kernel = make_kernel()

    async def body():
        agent = await mkdir(kernel, "alice")
        await refused(errno.EINVAL, submit(kernel, agent, request_text))

    run(body)


@pytest.mark.parametrize(
    "request_text", ['{"prompt": "hi", "system": "x"}', "{broken", '{"prompt": "hi", "model": "gpt-99"}', '{"prompt": "hi", "stop": [""]}']
)
def test_bad_envelope_is_einval(make_kernel, request_text):
    kernel = make_kernel()

    async def body():
        agent = await mkdir(kernel, "alice")
        await refused(errno.EINVAL, submit(kernel, agent, request_text))
        assert agent.errors[OWNER.uid][-1].startswith("EINVAL - ")

    run(body)


def test_queue_limit_per_agent_is_eagain(make_kernel, monkeypatch):
    monkeypatch.setattr(params, "MAX_QUEUED_PER_AGENT", 2)
    kernel = make_kernel()

    async def body():
        # the engine is not running, so every job stays queued
        alice = await mkdir(kernel, "alice")
        bob = await mkdir(kernel, "bob")
        await submit(kernel, alice, "one")
        await submit(kernel, alice, "two")
        await refused(errno.EAGAIN, submit(kernel, alice, "three"))
        assert alice.errors[OWNER.uid][-1].startswith("EAGAIN - ")
        assert len(alice.active) == 2
        await submit(kernel, bob, "other agents are not affected")
        await ctl(kernel, alice, "cancel all")
        assert alice.active == set()
        await submit(kernel, alice, "room again")

    run(body)


def test_queue_limit_of_the_kernel_is_eagain(make_kernel, monkeypatch):
    monkeypatch.setattr(params, "MAX_QUEUED_TOTAL", 2)
    kernel = make_kernel()

    async def body():
        agents = [await mkdir(kernel, name) for name in ("a", "b", "c")]
        await submit(kernel, agents[0], "one")
        await submit(kernel, agents[1], "two")
        await refused(errno.EAGAIN, submit(kernel, agents[2], "three"))

    run(body)


# -- agents, config and ctl -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("a/b", errno.EINVAL),
        ("..", errno.EINVAL),
        (".", errno.EINVAL),
        ("", errno.EINVAL),
        ("nul\0byte", errno.EINVAL),
        ("x" * 256, errno.ENAMETOOLONG),
        ("é" * 128, errno.ENAMETOOLONG),  # 256 bytes in UTF-8
    ],
)
def test_bad_agent_names(make_kernel, name, code):
    kernel = make_kernel()

    async def body():
        await refused(code, mkdir(kernel, name))
        assert kernel.agents == {}
        assert kernel.storage.agents() == []

    run(body)


def test_good_agent_names_and_duplicates(make_kernel):
    kernel = make_kernel()

    async def body():
        longest = "x" * 255
        for name in (longest, "日本語", ".hidden", "a b"):
            agent = await mkdir(kernel, name, mode=0o750)
            assert (agent.name, agent.row.uid, agent.row.gid, agent.row.mode) == (name, OWNER.uid, OWNER.gid, 0o750)
        await refused(errno.EEXIST, mkdir(kernel, "日本語", caller=OTHER))
        assert sorted(row.name for row in kernel.storage.agents()) == sorted([longest, "日本語", ".hidden", "a b"])

    run(body)


@pytest.mark.parametrize("line", ["explode", "reset now", "", "CANCEL"])
def test_unknown_ctl_command_is_einval(make_kernel, line):
    kernel = make_kernel()

    async def body():
        agent = await mkdir(kernel, "alice")
        await refused(errno.EINVAL, ctl(kernel, agent, line))
        assert agent.errors[OWNER.uid][-1].startswith("EINVAL - ")

    run(body)


def test_config_write_is_validated_and_stored(make_kernel):
    kernel = make_kernel()

    async def body():
        agent = await mkdir(kernel, "alice")
        await syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "temperature=0\nmodel=fake\n")
        assert agent.config == AgentConfig(temperature=0.0, model="fake")
        assert kernel.storage.agents()[0].config == agent.config.render()
        error = await refused(errno.EINVAL, syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "model=no-such-model\n"))
        assert "no-such-model" in error.message
        await refused(errno.EINVAL, syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "temperature=0.5\nbogus=1\n"))
        await refused(errno.EFBIG, syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "#" * (params.MAX_CONFIG_BYTES + 1)))
        assert agent.config == AgentConfig(temperature=0.0, model="fake")  # refused writes change nothing
        assert agent.errors[OWNER.uid][-1].startswith("EFBIG - ")

    run(body)


def test_unknown_syscall_is_enosys(make_kernel):
    kernel = make_kernel()

    async def body():
        await refused(errno.ENOSYS, syscall(kernel, "no_such_call", OWNER))  # type: ignore[arg-type]

    run(body)


# -- restart ------------------------------------------------------------------------------------------


def test_restart_keeps_agents_config_and_context(make_kernel):
    first = make_kernel(n_slots=1, step_delay=0.005)
    state = {}

    async def before_restart():
        async with running(first):
            agent = await mkdir(first, "alice", mode=0o700)
            await syscall(first, Sys.CONFIG_WRITE, OWNER, agent, "system=be brief\nmax_tokens=200\n")
            done = await ask(first, agent, "hello")
            other = await ask(first, agent, "from another user", caller=OTHER, history=[])
            interrupted = await producing(await submit(first, agent, "v" * 150))
            queued = await submit(first, agent, "never started")
            state.update(agent=agent, done=done, other=other, interrupted=interrupted, queued=queued)
        # stopping the engine fails what was still queued
        assert queued.state is JobState.ERROR
        assert queued.errno == errno.EIO

    run(before_restart)
    first.storage.close()

    second = make_kernel()
    agent = second.agents["alice"]
    old = state["agent"]
    assert (agent.row.id, agent.row.uid, agent.row.mode) == (old.row.id, OWNER.uid, 0o700)
    assert agent.config == AgentConfig(system="be brief", max_tokens=200)
    assert agent.messages == [user("hello"), assistant(answer("hello"))]
    # the job that was running when the kernel stopped is marked failed
    row = second.storage.db.execute("SELECT state, errno, message FROM jobs WHERE id = ?", [state["interrupted"].id]).fetchone()
    assert row[0] == "error" and row[1] == errno.EIO and "stopped" in row[2]
    # output/status of each uid are found in the journal
    latest = second.requests.latest_job(agent, OWNER.uid)
    assert (latest.id, latest.state) == (state["queued"].id, JobState.ERROR)
    other = second.requests.latest_job(agent, OTHER.uid)
    assert (other.id, other.state, other.text) == (state["other"].id, JobState.DONE, answer("from another user") + "\n")

    async def after_restart():
        async with running(second):
            job = await ask(second, agent, "again")
            assert job.answer == answer("again", turn=2)
            assert job.messages[0] == {"role": "system", "content": "be brief"}

    run(after_restart)


def crash(make_kernel: Callable[..., Kernel], setup: Callable[[Kernel], Awaitable[Any]]) -> Any:
    """Run `setup` on a kernel whose engine never runs, then drop that kernel the way a
    killed daemon is dropped: its jobs stay queued in the journal."""
    kernel = make_kernel()
    result = run(lambda: setup(kernel))
    kernel.storage.close()
    return result


def journal(kernel: Kernel, job_id: int) -> dict:
    return kernel.storage.db["jobs"].get(job_id)


def recovery_lines(kernel: Kernel) -> list[dict]:
    lines = [json.loads(line) for line in kernel.audit]
    return [{"requeued": line["requeued"], "failed": line["failed"]} for line in lines if line["event"] == "recovery"]


def job_events(kernel: Kernel, job_id: int) -> list[str]:
    text, _ = kernel.events.since(0)
    return [event["event"] for event in map(json.loads, text.decode().splitlines()) if event["job"] == job_id]


def test_prompt_jobs_left_by_a_crash_are_requeued_under_their_ids(make_kernel):
    async def setup(kernel):
        agent = await mkdir(kernel, "alice")
        await syscall(kernel, Sys.CONTEXT_WRITE, OWNER, agent, "from before\n")
        first = await submit(kernel, agent, '{"prompt": "first", "max_tokens": 7}')
        second = await submit(kernel, agent, "second\n")
        return first.id, second.id

    first_id, second_id = crash(make_kernel, setup)
    kernel = make_kernel(step_delay=0.002)
    agent = kernel.agents["alice"]

    async def body():
        await syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "max_tokens=9\n")  # changed while the daemon was down
        async with running(kernel):
            latest = kernel.requests.latest_job(agent, OWNER.uid)
            assert (latest.id, latest.state) == (second_id, JobState.QUEUED)  # waits for the first, as after submit
            assert latest in agent.active
            await finished(latest)
        return latest

    latest = run(body)
    # the envelope and the config of now apply; each turn saw the one before it
    assert (latest.state, latest.text) == (JobState.DONE, "turn 3: S\n")
    expected = [user("from before"), user("first"), assistant("turn 2:"), user("second"), assistant("turn 3: S")]
    assert agent.messages == expected
    assert kernel.storage.messages(agent.row.id) == expected
    first, second = journal(kernel, first_id), journal(kernel, second_id)
    assert (first["state"], first["output"], first["restarts"]) == ("done", b"turn 2:\n", 1)
    assert (second["state"], second["output"], second["restarts"]) == ("done", b"turn 3: S\n", 1)
    assert (first["request"], second["request"]) == ('{"prompt": "first", "max_tokens": 7}', "second\n")
    assert job_events(kernel, first_id) == ["requeued", "running", "first_token", "done"]
    assert job_events(kernel, second_id)[0] == "requeued"
    assert recovery_lines(kernel) == [{"requeued": [first_id, second_id], "failed": []}]


def test_call_jobs_left_by_a_crash_fail_with_eio(make_kernel):
    async def setup(kernel):
        agent = await mkdir(kernel, "alice")
        call = await submit(kernel, agent, "private", caller=OTHER, history=[user("earlier"), assistant("ok")])
        prompt = await submit(kernel, agent, "kept")
        return call.id, prompt.id

    call_id, prompt_id = crash(make_kernel, setup)
    kernel = make_kernel()
    agent = kernel.agents["alice"]

    async def body():
        async with running(kernel):
            failed = kernel.requests.latest_job(agent, OTHER.uid)
            assert (failed.id, failed.state, failed.errno) == (call_id, JobState.ERROR, errno.EIO)
            assert "call" in failed.message
            assert agent.errors[OTHER.uid][-1].startswith(f"EIO {call_id} ")
            kept = await finished(kernel.requests.latest_job(agent, OWNER.uid))
            assert (kept.id, kept.answer) == (prompt_id, answer("kept"))

    run(body)
    row = journal(kernel, call_id)
    assert (row["state"], row["errno"], row["restarts"]) == ("error", errno.EIO, 0)
    assert agent.messages == [user("kept"), assistant(answer("kept"))]
    assert recovery_lines(kernel) == [{"requeued": [prompt_id], "failed": [call_id]}]


def test_on_restart_fail_fails_unfinished_prompt_jobs(make_kernel):
    async def setup(kernel):
        agent = await mkdir(kernel, "alice")
        await syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "on_restart=fail\n")
        return (await submit(kernel, agent, "doomed")).id

    job_id = crash(make_kernel, setup)
    kernel = make_kernel()
    agent = kernel.agents["alice"]
    assert agent.config.on_restart == "fail"

    async def body():
        async with running(kernel):
            job = kernel.requests.latest_job(agent, OWNER.uid)
            assert (job.id, job.state, job.errno, job.message) == (job_id, JobState.ERROR, errno.EIO, "the kernel restarted before this job finished")

    run(body)
    assert journal(kernel, job_id)["state"] == "error"
    assert agent.messages == []
    assert recovery_lines(kernel) == [{"requeued": [], "failed": [job_id]}]


def test_on_restart_is_a_config_key_only(make_kernel):
    kernel = make_kernel()

    async def body():
        agent = await mkdir(kernel, "alice")
        assert "on_restart=requeue\n" in agent.config.render()
        await syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "on_restart=fail\n")
        assert "on_restart=fail\n" in agent.config.render()
        error = await refused(errno.EINVAL, syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "on_restart=retry\n"))
        assert "on_restart" in error.message
        await refused(errno.EINVAL, submit(kernel, agent, '{"prompt": "hi", "on_restart": "fail"}'))

    run(body)


def test_a_job_restarted_too_often_is_failed(make_kernel):
    async def setup(kernel):
        ids = []
        for name, restarts in (("hopeful", params.MAX_JOB_RESTARTS - 1), ("tired", params.MAX_JOB_RESTARTS)):
            job = await submit(kernel, await mkdir(kernel, name), f"from {name}")
            kernel.storage.db.execute("UPDATE jobs SET restarts = ? WHERE id = ?", [restarts, job.id])
            ids.append(job.id)
        return ids

    hopeful_id, tired_id = crash(make_kernel, setup)
    kernel = make_kernel()

    async def body():
        async with running(kernel):
            hopeful = await finished(kernel.requests.latest_job(kernel.agents["hopeful"], OWNER.uid))
            tired = kernel.requests.latest_job(kernel.agents["tired"], OWNER.uid)
        return hopeful, tired

    hopeful, tired = run(body)
    assert (hopeful.id, hopeful.answer) == (hopeful_id, answer("from hopeful"))
    assert journal(kernel, hopeful_id)["restarts"] == params.MAX_JOB_RESTARTS
    assert (tired.id, tired.state, tired.errno) == (tired_id, JobState.ERROR, errno.EIO)
    assert "MAX_JOB_RESTARTS" in tired.message
    assert journal(kernel, tired_id)["restarts"] == params.MAX_JOB_RESTARTS
    assert recovery_lines(kernel) == [{"requeued": [hopeful_id], "failed": [tired_id]}]


def test_jobs_journaled_without_their_request_fail_at_restart(make_kernel):
    first = make_kernel()
    agent_id = first.storage.create_agent("old", OWNER.uid, OWNER.gid, 0o755).id
    job_id = first.storage.journal_job(agent_id, OWNER.uid, "prompt", "lost", 1.0, None)  # as before requests were journaled
    first.storage.close()
    second = make_kernel()

    async def body():
        async with running(second):
            pass

    run(body)
    row = journal(second, job_id)
    assert (row["state"], row["errno"], row["message"]) == ("error", errno.EIO, "the kernel restarted before this job finished")
    assert second.requests.latest_job(second.agents["old"], OWNER.uid).state is JobState.ERROR
    assert recovery_lines(second) == [{"requeued": [], "failed": [job_id]}]
