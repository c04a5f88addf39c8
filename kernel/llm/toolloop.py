"""Model-driven tool calls: the loop that lets an agent's model call its tools.

A request whose config lists tools (and whose `tool_choice` is not `none`) runs
as up to `MAX_TOOL_STEPS` generations ("steps"), each an internal job in the
engine. Every step is constrained by a llama.cpp grammar derived from the tools'
JSON schemas, so the reply is always one JSON object: one or more calls
`{"calls": [{"tool": NAME, "arguments": {...}}, ...]}` (at most
`MAX_TOOL_CALLS`, or one when `parallel_tool_calls` is off) or an answer
`{"answer": TEXT}`. The calls of one reply run concurrently through the tool
manager, with the agent's policy and each tool's own limits; their results are
appended to the conversation as `tool` messages in the order of the calls, and
the next step sees them. The last step may only answer. The visible job shows the
answer as its output, and each call and result as events.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import re
from collections.abc import Sequence
from typing import Any, Protocol

import trio

from .. import params
from ..agents.config import AgentConfig
from ..cores.coreset import CoreSet
from ..errors import KernelError, errno_name
from ..tools.manager import ToolManager
from ..types import Agent, AuditSink, Caller
from .jobs import Job, JobState

log = logging.getLogger(__name__)


class Host(Protocol):
    """What a tool loop needs from the request path that starts it."""

    cores: CoreSet
    tools: ToolManager
    audit: AuditSink

    def emit(self, job: Job, event: str, **extra: Any) -> None: ...
    def job_caller(self, job: Job) -> Caller: ...
    def end(self, job: Job, state: JobState, code: int, message: str) -> None: ...


ANSWER = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"], "additionalProperties": False}
TOOLS_HEADER = (
    "You can call tools. To call them, reply with only a JSON object "
    '{"calls": [{"tool": NAME, "arguments": {...}}]}, one entry per call; you will then see their results. '
    'To answer, reply with only {"answer": TEXT}. Tools:'
)
ONE_CALL_HEADER = TOOLS_HEADER.replace("one entry per call", "with one call").replace("their results", "its result")


def uses_tools(config: AgentConfig) -> bool:
    """Served tools (run in a loop) or declared ones (the calls are the answer)."""
    return bool(config.tools or config.functions) and config.tool_choice != "none"


def calls_per_reply(config: AgentConfig) -> int:
    return params.MAX_TOOL_CALLS if config.parallel_tool_calls else 1


def with_tools(system: str, specs: Sequence[Any], most: int = params.MAX_TOOL_CALLS) -> str:
    """The system message with the tools block appended."""
    lines = [TOOLS_HEADER if most > 1 else ONE_CALL_HEADER] + [
        f"- {s.name}: {s.description} Arguments: {json.dumps(s.schema, separators=(',', ':'))}" for s in specs
    ]
    return "\n\n".join(part for part in (system, "\n".join(lines)) if part)


def step_grammar(specs: Sequence[Any], choice: str, most: int = params.MAX_TOOL_CALLS) -> str:
    """GBNF for one step: `auto` (calls or an answer), `required` (calls of any
    tool), a tool's name (one call of that tool), or `answer` (the answer only).
    A reply holds 1 to `most` calls."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    if choice == "answer":
        return str(json_schema_to_gbnf(json.dumps(ANSWER)))
    items = [_call_schema(s) for s in specs if choice in ("auto", "required", s.name)]
    if choice not in ("auto", "required"):
        most = 1  # a named tool: that one call
    calls = {
        "type": "object",
        "properties": {"calls": {"type": "array", "items": items[0] if len(items) == 1 else {"oneOf": items}, "minItems": 1, "maxItems": most}},
        "required": ["calls"],
        "additionalProperties": False,
    }
    schema = {"oneOf": [calls, ANSWER]} if choice == "auto" else calls
    return str(json_schema_to_gbnf(json.dumps(schema)))


def _call_schema(spec: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"tool": {"const": spec.name}, "arguments": spec.schema},
        "required": ["tool", "arguments"],
        "additionalProperties": False,
    }


Calls = list[tuple[str, Any]]


def parse_step(text: str, most: int = params.MAX_TOOL_CALLS) -> tuple[str, Any]:
    """("answer", text) or ("calls", [(name, arguments), ...]); EIO when the reply is
    neither, or makes more than `most` calls (a core that does not apply grammars).

    The grammar allows nothing else, but `max_tokens` may cut a reply: a list of calls
    cut short keeps the calls that were complete. A call identical to an earlier one of
    the same reply (name and arguments) is dropped: small models repeat themselves."""
    try:
        reply = json.loads(text, strict=False)
    except ValueError:
        reply = {"calls": _complete_calls(text)}
        if not reply["calls"]:
            raise KernelError(errno.EIO, f"the model's reply is not complete JSON (max_tokens too small?): {text[:200]!r}") from None
    if isinstance(reply, dict) and isinstance(reply.get("answer"), str):
        return "answer", reply["answer"]
    calls = reply.get("calls") if isinstance(reply, dict) else None
    if isinstance(calls, list) and calls and all(isinstance(c, dict) and isinstance(c.get("tool"), str) for c in calls):
        distinct: Calls = []
        for call in calls:
            if (call["tool"], call.get("arguments", {})) not in distinct:
                distinct.append((call["tool"], call.get("arguments", {})))
        if len(distinct) > most:
            raise KernelError(errno.EIO, f"the model made {len(distinct)} tool calls in one reply; at most {most} are allowed")
        return "calls", distinct
    raise KernelError(errno.EIO, f"the model's reply is neither tool calls nor an answer: {text[:200]!r}")


CALLS_START = re.compile(r'\{\s*"calls"\s*:\s*\[')


def _complete_calls(text: str) -> list[Any]:
    """The complete items of a `{"calls": [...` reply that was cut short."""
    start = CALLS_START.match(text)
    if start is None:
        return []
    decoder, at = json.JSONDecoder(strict=False), start.end()
    items: list[Any] = []
    while True:
        try:
            item, at = decoder.raw_decode(text, at + len(text[at:]) - len(text[at:].lstrip()))
        except ValueError:
            return items
        items.append(item)
        rest = text[at:].lstrip()
        if not rest.startswith(","):
            return items
        at = len(text) - len(rest) + 1


def prompt_tokens(host: Host, config: AgentConfig, messages: list[dict[str, str]]) -> list[int]:
    vocabulary = host.cores.vocabulary(config)
    tokens: list[int] = vocabulary.chat_tokens(messages)
    window = vocabulary.info.n_ctx_seq
    if len(tokens) + params.MIN_PROMPT_ROOM > window:
        raise KernelError(errno.E2BIG, f"with the tool results the prompt is {len(tokens)} tokens; the window is {window}")
    return tokens


async def run_tool_loop(host: Host, agent: Agent, job: Job) -> None:
    """Drive `job` through its steps to an answer, an error or a cancel."""
    try:
        await (_declared if job.config.functions else _steps)(host, agent, job)
    except KernelError as exc:
        _end(host, job, JobState.ERROR, exc.errno, exc.message)
    except trio.Cancelled:
        raise
    except Exception:  # a bug must fail the job, not the kernel
        log.exception("internal error in the tool loop of job %d", job.id)
        if job.step is not None and not job.step.state.finished:
            host.cores.of(job.step).cancel(job.step)  # its step must not run on for nobody
        host.audit("error", agent=agent.name, job=job.id, message="internal error in the tool loop")
        _end(host, job, JobState.ERROR, errno.EIO, "internal error in the tool loop (see the aiosfs log)")


async def _steps(host: Host, agent: Agent, job: Job) -> None:
    specs = [host.tools.spec(name) for name in job.config.tools]
    most = calls_per_reply(job.config)
    messages = list(job.messages)
    tokens = job.prompt_tokens
    config = host.cores.routed(dataclasses.replace(job.config, ignore_eos=False))  # one core for every step; a step ends when its JSON is complete
    made: Calls = []  # the calls of the step before
    for number in range(params.MAX_TOOL_STEPS):
        last = number == params.MAX_TOOL_STEPS - 1
        choice = "answer" if last else job.config.tool_choice if number == 0 else "auto"
        step = await _run_step(host, job, messages, tokens, config, step_grammar(specs, choice, most))
        if step is None:
            return
        kind, value = parse_step(step.text, most)
        if kind == "answer":
            _answer(host, job, value)
            return
        if last:
            raise KernelError(errno.EIO, "the model called a tool at the last step, where only an answer is allowed")
        if value == made:  # the same calls again: their results are already there, so the next step answers
            step = await _run_step(host, job, messages, tokens, config, step_grammar(specs, "answer", most))
            if step is not None:
                _answer(host, job, parse_step(step.text)[1])
            return
        made = value
        messages = messages + await _run_calls(host, agent, job, value)
        tokens = await trio.to_thread.run_sync(prompt_tokens, host, config, messages, limiter=host.cores.call_threads)


async def _declared(host: Host, agent: Agent, job: Job) -> None:
    """Declared tools: one step, whose calls (or answer) are the job's output as JSON
    `{"content": TEXT or null, "tool_calls": [{"id", "name", "arguments"}, ...]}`; nothing runs."""
    config = host.cores.routed(dataclasses.replace(job.config, ignore_eos=False))
    most = calls_per_reply(job.config)
    step = await _run_step(host, job, list(job.messages), job.prompt_tokens, config, step_grammar(job.config.functions, job.config.tool_choice, most))
    if step is None:
        return
    kind, value = parse_step(step.text, most)
    reply: dict[str, Any] = {"content": value if kind == "answer" else None, "tool_calls": []}
    for name, arguments in value if kind == "calls" else ():
        reply["tool_calls"].append({"id": _call_id(job), "name": name, "arguments": arguments})
        host.emit(job, "tool_call", id=reply["tool_calls"][-1]["id"], tool=name, arguments=arguments)
    _answer(host, job, json.dumps(reply, ensure_ascii=False))


async def _run_step(host: Host, job: Job, messages: list[dict[str, str]], tokens: list[int], config: AgentConfig, grammar: str) -> Job | None:
    """One generation in the engine; None when the job ended (cancelled or failed)."""
    if job.cancel_requested:
        _end(host, job, JobState.CANCELLED, errno.ECANCELED, "cancelled")
        return None
    step = Job(job.id, job.agent, job.uid, job.user_message, messages, tokens, config, job.source, grammar=grammar, parent=job)
    job.step = step
    host.cores.submit(step)
    await step.ended()
    job.step = None
    job.n_generated += step.n_generated
    job.extra_prompt_tokens += len(tokens) if tokens is not job.prompt_tokens else 0
    if step.state is not JobState.DONE:
        _end(host, job, step.state, step.errno, step.message)
        return None
    return step


async def _run_calls(host: Host, agent: Agent, job: Job, calls: Calls) -> list[dict[str, str]]:
    """Run one reply's calls at once (each tool's semaphore and the policy still
    apply); the messages that record them: the calls as run, then their results in
    the order of the calls."""
    ids = [_call_id(job) for _ in calls]
    for call_id, (name, arguments) in zip(ids, calls, strict=True):
        host.emit(job, "tool_call", id=call_id, tool=name, arguments=arguments)
    results: list[dict[str, Any]] = [{} for _ in calls]
    async with trio.open_nursery() as nursery:
        for index, (call_id, (name, arguments)) in enumerate(zip(ids, calls, strict=True)):
            nursery.start_soon(_call, host, agent, job, call_id, name, arguments, results, index)
    reply = json.dumps({"calls": [{"tool": name, "arguments": arguments} for name, arguments in calls]}, ensure_ascii=False)
    recorded = [{"role": "assistant", "content": reply}] + [{"role": "tool", "content": json.dumps(r, ensure_ascii=False)} for r in results]
    job.tool_messages += recorded
    return recorded


async def _call(host: Host, agent: Agent, job: Job, call_id: str, name: str, arguments: Any, results: list[dict[str, Any]], index: int) -> None:
    """One call; its result (or error) lands at its index, and as a `tool_result` event when it ends."""
    try:
        result: dict[str, Any] = {"tool": name, "ok": True, "result": await host.tools.call(host.job_caller(job), agent, name, arguments)}
    except KernelError as exc:
        result = {"tool": name, "ok": False, "errno": errno_name(exc.errno), "error": exc.message}
    results[index] = result
    host.emit(job, "tool_result", id=call_id, tool=name, ok=result["ok"], **({} if result["ok"] else {"errno": result["errno"]}))


def _call_id(job: Job) -> str:
    """The next call id of a job: `call_JOB_N`, N counting its calls from 1."""
    job.calls_made += 1
    return f"call_{job.id}_{job.calls_made}"


def _answer(host: Host, job: Job, text: str) -> None:
    job.publish(text.encode(), 0)
    _end(host, job, JobState.DONE, 0, "")


def _end(host: Host, job: Job, state: JobState, code: int, message: str) -> None:
    """The job ends as any job does: a prompt job's answer is kept in its context first."""
    host.end(job, state, code, message)
