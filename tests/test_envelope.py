"""The request envelope's stateless chat ("messages"), JSON answers ("response_format")
and declared tools (calls returned, not run): parsing, then the kernel with the
FakeBackend. The real model under these grammars is tested through the AIOS gateway
(tests/test_aios_api.py)."""

from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest
import trio
from kernel_helpers import OWNER, answer, ask, mkdir, refused, run, running, submit

from kernel.agents.config import AgentConfig
from kernel.agents.request import parse_request, response_grammar
from kernel.errors import KernelError
from kernel.llm.jobs import JobState
from kernel.syscall import Sys, syscall

BASE = AgentConfig(system="agent's own system")
WEATHER = {
    "type": "function",
    "function": {
        "name": "demo_author/weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": {"type": "object", "properties": {"age": {"type": "integer"}}}}}


def einval(text: str) -> str:
    with pytest.raises(KernelError) as info:
        parse_request(text, BASE)
    assert info.value.errno == errno.EINVAL
    return info.value.message


# -- parsing ---------------------------------------------------------------------------------
def test_messages_are_a_stateless_conversation():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": [{"type": "text", "text": "how "}, {"type": "text", "text": "are you"}]},
    ]
    request = parse_request(json.dumps({"messages": messages, "temperature": 0}), BASE)
    assert request.message == "how are you"
    assert request.history == ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"})
    assert request.config.system == "be brief" and request.config.temperature == 0
    without_system = parse_request(json.dumps({"messages": messages[1:2]}), BASE)
    assert without_system.config.system == "agent's own system" and without_system.history == ()
    assert parse_request(json.dumps({"prompt": "hi"}), BASE).history is None


def test_openai_message_fields_are_accepted_and_tool_calls_kept_as_text():
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    messages = [
        {"role": "user", "content": "x", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
        {"role": "user", "content": "so?"},
    ]
    request = parse_request(json.dumps({"messages": messages}), BASE)
    assert request.history is not None and json.loads(request.history[1]["content"]) == {"tool_calls": calls}


@pytest.mark.parametrize(
    ("envelope", "says"),
    [
        ({"messages": []}, "non-empty list"),
        ({"messages": "hi"}, "non-empty list"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "last message must be the user's"),
        ({"messages": [{"role": "wizard", "content": "a"}]}, "role must be one of"),
        ({"messages": [{"role": "user", "content": 5}]}, '"content" must be'),
        ({"messages": [{"role": "user", "content": "a", "colour": 1}]}, "unknown keys ['colour']"),
        ({"messages": [{"role": "user", "content": "a"}], "prompt": "b"}, "not both"),
        ({"messages": [{"role": "user", "content": "a"}], "system": "x"}, "unknown keys ['system']"),
        ({"prompt": "a", "response_format": {"type": "xml"}}, "response_format must be"),
        ({"prompt": "a", "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "objekt"}}}}, "not a valid JSON Schema"),
        ({"prompt": "a", "response_format": SCHEMA, "tools": [WEATHER]}, "cannot be combined with tools"),
        ({"prompt": "a", "tools": [WEATHER, "calculator"]}, "all names"),
        ({"prompt": "a", "tools": [WEATHER, WEATHER]}, "same name"),
        ({"prompt": "a", "tools": [{"type": "function", "function": {"name": ""}}]}, "the name must be"),
        ({"prompt": "a", "tools": [{"name": "f", "parameters": {"type": 5}}]}, "not a valid JSON Schema"),
        ({"prompt": "a", "tools": [WEATHER], "tool_choice": "calculator"}, "tool_choice 'calculator' is not one of"),
    ],
)
def test_bad_envelopes_are_einval_and_say_why(envelope, says):
    assert says in einval(json.dumps(envelope))


def test_tools_and_tool_choice_forms():
    flat = {"name": "f", "description": "d"}
    request = parse_request(
        json.dumps({"prompt": "a", "tools": [WEATHER, flat], "tool_choice": {"type": "function", "function": {"name": "f"}}}), BASE
    )
    assert [f.name for f in request.config.functions] == ["demo_author/weather", "f"]
    assert request.config.functions[1].schema == {"type": "object", "properties": {}}
    assert request.config.tool_choice == "f" and request.config.tools == ()
    served = parse_request(json.dumps({"prompt": "a", "tools": ["calculator"], "tool_choice": "required"}), BASE)
    assert served.config.tools == ("calculator",) and served.config.functions == ()


def test_response_format_compiles_to_a_grammar():
    assert "root" in response_grammar(SCHEMA) and "age" in response_grammar(SCHEMA)
    assert "root" in response_grammar({"type": "json_object"})
    assert response_grammar({"type": "text"}) == ""
    assert parse_request(json.dumps({"prompt": "a", "response_format": SCHEMA}), BASE).config.grammar == response_grammar(SCHEMA)


# -- in the kernel ------------------------------------------------------------------------------
@pytest.fixture
def kernel(new_kernel):
    return new_kernel()


def test_a_stateless_prompt_neither_reads_nor_extends_the_context(kernel):
    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            await ask(kernel, agent, "remember mango")
            before = list(agent.messages)
            messages = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "uno"}, {"role": "user", "content": "two"}]
            job = await ask(kernel, agent, json.dumps({"messages": messages}))
            return before, agent, job

    before, agent, job = run(body)
    assert job.state is JobState.DONE
    assert job.answer == answer("two", turn=2)  # the fake counts the user turns it saw: the envelope's two, not the context's
    assert all("mango" not in m["content"] for m in job.messages)
    assert agent.messages == before


def test_a_response_format_job_runs_under_its_grammar_and_must_end_in_json(kernel):
    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            good = await ask(kernel, agent, json.dumps({"prompt": "x", "response_format": SCHEMA}))
            await syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "max_tokens=3\n")
            cut = await ask(kernel, agent, json.dumps({"prompt": "x", "response_format": {"type": "json_object"}}))
            return good, cut

    good, cut = run(body)
    assert good.state is JobState.DONE and json.loads(good.answer) == {"answer": "X"}
    assert kernel.cores.default.runtime.grammars[-2] == response_grammar(SCHEMA)  # type: ignore[attr-defined]
    assert cut.state is JobState.ERROR and cut.errno == errno.EIO and "JSON was complete" in cut.message


def test_declared_tools_return_the_call_and_run_nothing(kernel):
    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            called = await ask(
                kernel, agent, json.dumps({"prompt": 'call demo_author/weather {"city": "Oslo"}', "tools": [WEATHER], "tool_choice": "required"})
            )
            answered = await ask(kernel, agent, json.dumps({"prompt": "just talk", "tools": [WEATHER]}))
            return called, answered

    called, answered = run(body)
    reply = json.loads(called.answer)
    assert reply == {"content": None, "tool_calls": [{"id": f"call_{called.id}_1", "name": "demo_author/weather", "arguments": {"city": "Oslo"}}]}
    assert json.loads(answered.answer) == {"content": "JUST TALK", "tool_calls": []}
    assert '"\\"answer\\""' not in kernel.cores.default.runtime.grammars[0]  # type: ignore[attr-defined]  # required: a call, never an answer


def test_a_refused_envelope_queues_nothing(kernel):
    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            await refused(errno.EINVAL, submit(kernel, agent, json.dumps({"messages": [{"role": "assistant", "content": "x"}]})))
            await trio.sleep(0)
            return agent

    agent = run(body)
    assert not agent.active and agent.messages == []


# -- through a mount -------------------------------------------------------------------------------
@pytest.mark.mount
def test_stateless_chats_leave_the_call_session_and_the_context_alone(agent):
    def read_all(fd: int) -> bytes:
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
        return data

    fd = os.open(agent / "call", os.O_RDWR)
    try:
        os.write(fd, b"first")
        assert read_all(fd) == b"turn 1: FIRST\n"
        chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
        os.write(fd, json.dumps({"messages": chat}).encode())
        assert read_all(fd) == b"turn 2: C\n"  # the envelope's two user turns, not the session's
        os.write(fd, b"second")
        assert read_all(fd) == b"turn 2: SECOND\n"  # the session goes on from its own first turn
    finally:
        os.close(fd)
    subprocess.run(["bash", "-c", f"echo kept > {agent}/prompt && cat {agent}/output"], check=True, capture_output=True, timeout=60)
    before = (agent / "context").read_text()
    out = subprocess.run(
        ["bash", "-c", f"echo '{json.dumps({'messages': chat})}' > {agent}/prompt && cat {agent}/output"], capture_output=True, text=True, timeout=60
    )
    assert out.stdout == "turn 2: C\n" and (agent / "context").read_text() == before


def test_a_request_checked_at_its_last_write_is_not_parsed_again_at_its_commit(kernel, monkeypatch):
    """The JSON schema of a response_format compiles to a grammar: once per request,
    unless the agent's config changed between the write and the commit."""
    parses: list[str] = []
    parse = kernel.requests.parse

    def counted(agent, text):
        parses.append(text)
        return parse(agent, text)

    monkeypatch.setattr(kernel.requests, "parse", counted)
    data = json.dumps({"prompt": "a person", "response_format": SCHEMA}).encode()

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            parsed = await syscall(kernel, Sys.LLM_ADMIT, OWNER, agent, data=data, prompt=True)
            job = await syscall(kernel, Sys.LLM_SUBMIT, OWNER, agent, data, parsed=parsed)
            once = len(parses)
            parsed = await syscall(kernel, Sys.LLM_ADMIT, OWNER, agent, data=data, prompt=True)
            await syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "temperature=0.5\n")  # the config changed since the write
            again = await syscall(kernel, Sys.LLM_SUBMIT, OWNER, agent, data, parsed=parsed)
            return job, once, again

    job, once, again = run(body)
    assert once == 1 and job.config.grammar
    assert len(parses) == 3 and again.config.temperature == 0.5  # parsed again, with the config of the commit
