"""Model-driven tool calls: grammars, step parsing, and the loop in the kernel with
the FakeBackend (which calls a tool when asked `call NAME {JSON}`)."""

from __future__ import annotations

import errno
import json

import pytest
import trio
from kernel_helpers import OWNER, ROOT, ask, ctl, finished, mkdir, refused, run, running, submit

from kernel import params
from kernel.cores.backends.fake import FakeBackend
from kernel.errors import KernelError
from kernel.kernel import Kernel
from kernel.llm.toolloop import parse_step, step_grammar
from kernel.storage.database import Storage
from kernel.syscall import Sys, syscall
from kernel.tools.spec import ToolSpec


@pytest.fixture
def kernel(tmp_path):
    made = Kernel(Storage(tmp_path / "aiosfs.db"), FakeBackend(step_delay=0.001))
    yield made
    made.storage.close()
    made.memory.store.close()


def events_of(agent, kind: str) -> list[dict]:
    return [e for e in map(json.loads, agent.events.since(0)[0].decode().splitlines()) if e["event"] == kind]


def test_step_grammar_offers_calls_and_the_answer_as_asked(kernel):
    specs = [kernel.tools.spec("calculator"), kernel.tools.spec("clock")]
    auto = step_grammar(specs, "auto")
    assert '"\\"calculator\\""' in auto and '"\\"clock\\""' in auto and "answer" in auto
    named = step_grammar(specs, "clock")
    assert "clock" in named and "calculator" not in named and "answer" not in named
    assert "calculator" not in step_grammar(specs, "answer")


def test_parse_step():
    assert parse_step('{"answer": "hi"}') == ("answer", "hi")
    assert parse_step('{"calls": [{"tool": "clock", "arguments": {}}]}') == ("calls", [("clock", {})])
    two = '{"calls": [{"tool": "clock", "arguments": {}}, {"tool": "calculator", "arguments": {"expression": "1"}}]}'
    assert parse_step(two) == ("calls", [("clock", {}), ("calculator", {"expression": "1"})])
    assert parse_step('{"answer": "two\nlines"}') == ("answer", "two\nlines")  # raw newlines: the grammar allows them
    for bad in ('{"answer": "cut sho', "[1]", '{"x": 1}', '{"tool": "clock", "arguments": {}}', '{"calls": []}'):
        with pytest.raises(KernelError) as info:
            parse_step(bad)
        assert info.value.errno == errno.EIO
    cut = '{"calls": [{"tool": "clock", "arguments": {}}, {"tool": "clock", "arguments": {}}, {"tool": "calculator", "arguments": {"expr'
    assert parse_step(cut) == ("calls", [("clock", {})])  # cut by max_tokens: the complete calls, each once
    with pytest.raises(KernelError) as info:  # a core that applies no grammar may make more calls than allowed
        parse_step(two, most=1)
    assert info.value.errno == errno.EIO and "at most 1" in info.value.message


def test_the_model_calls_a_tool_and_answers_with_its_result(kernel):
    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            await syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "tools=calculator clock\n")
            job = await ask(kernel, agent, 'call calculator {"expression": "6*7"}')
            return agent, job

    agent, job = run(body)
    assert job.state.value == "done"
    assert json.loads(job.answer.removeprefix("tool said: ")) == {"tool": "calculator", "ok": True, "result": {"result": 42}}
    calls, results = events_of(agent, "tool_call"), events_of(agent, "tool_result")
    assert calls[0]["tool"] == "calculator" and calls[0]["arguments"] == {"expression": "6*7"} and calls[0]["job"] == job.id
    assert results[0]["ok"] is True and results[0]["id"] == calls[0]["id"] == f"call_{job.id}_1"
    roles = [m["role"] for m in agent.messages]
    assert roles == ["user", "assistant", "tool", "assistant"]  # the turn keeps its tool step
    assert "calculator" in job.messages[0]["content"] and "Arguments:" in job.messages[0]["content"]
    grammars = [g for g in kernel.runtime.grammars if g]
    assert len(grammars) == 2 and "answer" in grammars[1]
    assert any(json.loads(line)["event"] == "tool" for line in kernel.audit)


def test_a_failing_tool_call_is_shown_to_the_model_and_the_loop_goes_on(kernel):
    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            await syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "tools=calculator\n")
            return await ask(kernel, agent, 'call calculator {"expr": "1"}')

    job = run(body)
    result = json.loads(job.answer.removeprefix("tool said: "))
    assert result["ok"] is False and result["errno"] == "EINVAL" and "expression" in result["error"]


def test_the_last_step_may_only_answer(kernel, monkeypatch):
    monkeypatch.setattr(params, "MAX_TOOL_STEPS", 1)

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            await syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "tools=clock\n")
            return await ask(kernel, agent, "call clock {}")

    run(body)
    grammar = [g for g in kernel.runtime.grammars if g][0]
    assert "clock" not in grammar and "answer" in grammar


def test_tool_choice_none_and_unknown_tools(kernel):
    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            await syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "tools=clock\ntool_choice=none\n")
            plain = await ask(kernel, agent, "hello")
            await refused(errno.EINVAL, submit(kernel, agent, '{"prompt": "x", "tool_choice": "calculator"}'))
            await refused(errno.EINVAL, submit(kernel, agent, '{"prompt": "x", "tools": ["teleport"], "tool_choice": "auto"}'))
            await refused(errno.EINVAL, syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "tools=teleport\n"))
            return plain

    assert run(body).answer == "turn 1: HELLO"
    assert all(g is None for g in kernel.runtime.grammars)


def test_the_policy_decides_which_tools_a_request_may_offer(kernel):
    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            await syscall(kernel, Sys.PERMISSIONS_WRITE, ROOT, agent, "tools clock\n")
            await refused(errno.EPERM, syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "tools=calculator\n"))
            await refused(errno.EPERM, submit(kernel, agent, '{"prompt": "call calculator {}", "tools": ["calculator"]}'))

    run(body)


def test_cancelling_a_tool_job_stops_its_step(kernel):
    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            await syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "tools=clock\n")
            job = await submit(kernel, agent, "x" * 300)  # a long answer: the step runs a while
            while not job.state.finished and (job.step is None or not job.step.data):
                await trio.sleep(0.001)
            assert job.step is not None  # caught while its step generates
            await ctl(kernel, agent, "cancel")
            await finished(job)
            return job

    job = run(body)
    assert job.state.value == "cancelled" and job.errno == errno.ECANCELED


def test_a_reply_may_make_several_calls_unless_parallel_calls_are_off(kernel):
    specs = [kernel.tools.spec("calculator"), kernel.tools.spec("clock")]

    def calls_rule(grammar: str) -> str:
        return next(line for line in grammar.splitlines() if line.startswith("calls ::="))

    several = step_grammar(specs, "required")
    assert calls_rule(several).count("calls-item") == params.MAX_TOOL_CALLS and "answer" not in several
    assert calls_rule(step_grammar(specs, "required", most=1)) == 'calls ::= "[" space calls-item "]" space'  # one call
    named = step_grammar(specs, "clock")
    assert "clock" in named and "calculator" not in named  # a name: calls of that tool only

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            await syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "tools=calculator clock\nparallel_tool_calls=off\n")
            job = await ask(kernel, agent, 'call clock {} ; call calculator {"expression": "1"}')
            return agent, job

    agent, job = run(body)
    assert "parallel_tool_calls=off" in agent.config.render()
    assert "with one call" in job.messages[0]["content"]
    assert job.state.value == "error" and job.errno == errno.EIO and "at most 1" in job.message  # the fake ignores grammars; the kernel does not
    assert step_grammar(specs, "auto", most=1) in kernel.runtime.grammars


def test_the_calls_of_one_reply_run_at_once_and_their_results_keep_the_order_of_the_calls(kernel):
    running_now, most_at_once = [0], [0]

    async def slow(call):
        running_now[0] += 1
        most_at_once[0] = max(most_at_once[0], running_now[0])
        await trio.sleep(call.arguments["seconds"])
        running_now[0] -= 1
        return {"slept": call.arguments["seconds"]}

    schema = {"type": "object", "properties": {"seconds": {"type": "number"}}, "required": ["seconds"]}
    kernel.tools.add(ToolSpec("nap", "Sleeps", schema, slow))

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            await syscall(kernel, Sys.PERMISSIONS_WRITE, ROOT, agent, "tools nap clock\n")
            await syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "tools=nap clock\nmax_tokens=1000\n")
            job = await ask(kernel, agent, 'call nap {"seconds": 0.3} ; call nap {"seconds": 0.01} ; call calculator {"expression": "1"}')
            return agent, job

    agent, job = run(body)
    assert job.state.value == "done", job.message
    assert most_at_once[0] == 2  # both naps ran at the same time
    results = [json.loads(line) for line in job.answer.removeprefix("tool said: ").splitlines()]
    assert [r["tool"] for r in results] == ["nap", "nap", "calculator"]  # in the order of the calls, not of their ends
    assert results[0]["result"] == {"slept": 0.3} and results[1]["result"] == {"slept": 0.01}
    assert results[2]["ok"] is False and results[2]["errno"] == "EPERM"  # not allowed: refused, and the others ran
    calls, ends = events_of(agent, "tool_call"), events_of(agent, "tool_result")
    assert [c["id"] for c in calls] == [f"call_{job.id}_{n}" for n in (1, 2, 3)]
    assert [e["id"] for e in ends][-1] == f"call_{job.id}_1"  # the slow call ended last
    roles = [m["role"] for m in agent.messages]
    assert roles == ["user", "assistant", "tool", "tool", "tool", "assistant"]


def test_declared_tools_may_come_back_as_several_calls(kernel):
    clock = {"name": "clock", "parameters": {"type": "object", "properties": {}}}
    weather = {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            two = {"prompt": 'call weather {"city": "Oslo"} ; call clock {}', "tools": [weather, clock], "tool_choice": "required"}
            called = await ask(kernel, agent, json.dumps(two))
            refused_one = await ask(kernel, agent, json.dumps(two | {"parallel_tool_calls": False}))
            return called, refused_one

    called, one = run(body)
    reply = json.loads(called.answer)
    assert reply["content"] is None
    assert reply["tool_calls"] == [
        {"id": f"call_{called.id}_1", "name": "weather", "arguments": {"city": "Oslo"}},
        {"id": f"call_{called.id}_2", "name": "clock", "arguments": {}},
    ]
    assert one.state.value == "error" and "at most 1" in one.message


def test_a_reply_that_repeats_the_calls_before_it_is_not_run_again(kernel):
    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            await syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "tools=calculator\n")
            return agent, await ask(kernel, agent, 'again call calculator {"expression": "2+2"}')

    agent, job = run(body)
    assert job.state.value == "done"
    assert len(events_of(agent, "tool_call")) == 1  # the repeated reply ran nothing
    grammars = [g for g in kernel.runtime.grammars if g]
    assert len(grammars) == 3 and "calculator" not in grammars[2]  # then a step that may only answer
    assert [m["role"] for m in agent.messages] == ["user", "assistant", "tool", "assistant"]
