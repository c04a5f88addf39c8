"""Faults in the seams between the kernel's parts: each costs one request, never the
daemon, and each is where the user can see it."""

from __future__ import annotations

import contextlib
import errno
import json
import sqlite3
from collections.abc import Sequence

import pytest
import trio
from kernel_helpers import OWNER, ROOT, answer, ask, mkdir, refused, run, running, submit

from kernel import params
from kernel.cores.backends import BatchEntry
from kernel.cores.backends.fake import FakeBackend
from kernel.llm.jobs import JobState
from kernel.syscall import Sys, syscall

SHIFT = 1000  # the other vocabulary: the fake's byte tokens moved up by this much


class ShiftedFake(FakeBackend):
    """The fake model with another vocabulary: the same text, other token ids."""

    def tokenize(self, text: str) -> list[int]:
        return [b + SHIFT for b in text.encode()]

    def decode(self, entries: Sequence[BatchEntry]) -> int:
        return super().decode([BatchEntry(e.seq, e.token - SHIFT if e.token >= SHIFT else e.token, e.pos, e.logits) for e in entries])


def test_each_local_model_tokenizes_its_own_prompts(new_kernel) -> None:
    other = ShiftedFake()
    kernel = new_kernel(loaders={"other": (lambda: other, True)})

    async def body() -> None:
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            await syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "model=other\n")
            job = await ask(kernel, agent, "which vocabulary")
            assert job.state is JobState.DONE, job.message
            assert job.prompt_tokens and min(job.prompt_tokens) >= SHIFT  # the other model's ids, not the default's bytes
            assert bytes(job.data).decode() == answer("which vocabulary") + "\n"
            default = await mkdir(kernel, "b")
            plain = await ask(kernel, default, "default vocabulary")
            assert max(plain.prompt_tokens) < 256

    run(body)


def test_a_disk_error_while_a_turn_is_recorded_fails_that_job_not_the_daemon(new_kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = new_kernel()
    real = kernel.storage.append_messages

    def broken(agent_id: int, messages: list[dict[str, str]]) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    async def body() -> None:
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            monkeypatch.setattr(kernel.storage, "append_messages", broken)
            job = await ask(kernel, agent, "lost turn")
            assert job.state is JobState.ERROR and job.errno == errno.EIO and "disk I/O error" in job.message
            assert agent.messages == [] and "EIO" in agent.errors[OWNER.uid][-1]
            monkeypatch.setattr(kernel.storage, "append_messages", real)
            after = await ask(kernel, agent, "kept turn")  # the kernel still serves, and the lost turn is not in the context
            assert bytes(after.data).decode() == answer("kept turn", 1) + "\n"
            assert [m["content"] for m in agent.messages] == ["kept turn", answer("kept turn", 1)]
        assert kernel.storage.db.execute("SELECT state, errno FROM jobs WHERE id = ?", [job.id]).fetchone() == ("error", errno.EIO)

    run(body)


def test_a_bug_in_the_tool_loop_fails_that_job_and_the_kernel_goes_on(new_kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    from kernel.llm import toolloop

    kernel = new_kernel()

    def bug(text: str) -> tuple[str, object]:
        raise RuntimeError("a bug in the tool loop")

    async def body() -> None:
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            await syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "tools=clock\n")
            monkeypatch.setattr(toolloop, "parse_step", bug)
            job = await ask(kernel, agent, "what time is it")
            assert job.state is JobState.ERROR and job.errno == errno.EIO and "internal error in the tool loop" in job.message
            monkeypatch.undo()
            await syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "tools=\n")
            after = await ask(kernel, agent, "still there")
            assert after.state is JobState.DONE

    run(body)


def test_a_refusal_at_the_first_write_is_audited(new_kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = new_kernel()
    monkeypatch.setattr(params, "MAX_QUEUED_PER_AGENT", 1)

    async def body() -> None:
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            await syscall(kernel, Sys.PERMISSIONS_WRITE, ROOT, agent, "budget_tokens 1\n")
            await ask(kernel, agent, "spends the budget")
            await refused(errno.EDQUOT, syscall(kernel, Sys.LLM_ADMIT, OWNER, agent))
            denials = [e for e in map(json.loads, kernel.audit) if e["event"] == "deny"]
            assert [(d["syscall"], d["errno"], d["agent"], d["uid"]) for d in denials] == [("llm_admit", "EDQUOT", "a", OWNER.uid)]
            assert agent.errors[OWNER.uid][-1].startswith("EDQUOT")
            await syscall(kernel, Sys.AGENT_CTL, ROOT, agent, "budget reset")
            await submit(kernel, agent, "queued")
            await refused(errno.EAGAIN, syscall(kernel, Sys.LLM_ADMIT, OWNER, agent))  # not a denial: no deny line
            assert len([e for e in map(json.loads, kernel.audit) if e["event"] == "deny"]) == 1

    run(body)


# -- SQLite commits never run on the trio thread -----------------------------------------------
def test_the_storage_refuses_a_commit_on_the_trio_thread(tmp_path) -> None:
    from kernel.storage.database import Storage

    storage = Storage(tmp_path / "aiosfs.db")

    async def commit_here() -> None:
        storage.set_setting("scheduler", "fifo")

    with pytest.raises(RuntimeError, match="trio thread"):
        trio.run(commit_here)
    storage.set_setting("scheduler", "fifo")  # outside a trio run (the journal writer's thread) it commits
    assert storage.setting("scheduler", "") == "fifo"
    storage.close()


def test_every_commit_of_a_busy_kernel_runs_on_the_journal_writer(new_kernel) -> None:
    """Every syscall that writes the journal, run by a kernel whose storage notes the thread
    of each commit: none is the trio thread, and all are the one writer thread."""
    import threading

    from kernel.storage import database

    kernel = new_kernel()
    threads: list[int] = []
    real = database.transaction

    @contextlib.contextmanager
    def noted(conn):
        threads.append(threading.get_ident())
        with real(conn):
            yield

    async def body() -> None:
        trio_thread = threading.get_ident()
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            await syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "max_tokens=8\n")
            await syscall(kernel, Sys.PERMISSIONS_WRITE, ROOT, agent, "max_tokens 100\n")
            await syscall(kernel, Sys.AGENT_SETATTR, OWNER, agent, mode=0o750)
            await ask(kernel, agent, "one")
            await syscall(kernel, Sys.CONTEXT_WRITE, OWNER, agent, "")
            await ask(kernel, agent, "two", caller=ROOT, history=[])  # a call turn
            await syscall(kernel, Sys.SCHED_SET, ROOT, "rr")
            await syscall(kernel, Sys.AGENT_REMOVE, OWNER, "a")
            await syscall(kernel, Sys.KERNEL_CTL, OWNER, "restore a")
        assert threads and trio_thread not in threads
        assert len(set(threads)) == 1  # one writer: the journal's order is the order of the requests

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(database, "transaction", noted)
        run(body)


def test_an_answer_that_ends_after_the_request_path_stopped_keeps_its_turn(new_kernel) -> None:
    """A core's last delivery may land when no task can wait for the writer: the turn and the
    end are still written, in order, and the conversation has the turn."""
    from kernel.llm.jobs import Job

    kernel = new_kernel()

    async def make() -> object:
        async with running(kernel):
            return await mkdir(kernel, "a")

    agent = run(make)
    job = Job(1, "a", OWNER.uid, "late", [], [], agent.config, "prompt")
    kernel.writer.post(kernel.storage.journal_job, agent.row.id, OWNER.uid, "prompt", "late", 0.0, "late")
    job.publish(b"an answer", 2)
    kernel.requests.results.end(job, JobState.DONE, 0, "")
    assert job.state is JobState.DONE and agent.messages == [{"role": "user", "content": "late"}, {"role": "assistant", "content": "an answer"}]
    kernel.writer.close()  # runs what was posted
    assert kernel.storage.messages(agent.row.id) == agent.messages
    assert kernel.storage.db.execute("SELECT state FROM jobs WHERE id = 1").fetchone() == ("done",)
