"""Model-driven tool calls: the loop that lets an agent's model call its tools.

A request whose config lists tools (and whose `tool_choice` is not `none`) runs
as up to `MAX_TOOL_STEPS` generations ("steps"), each an internal job in the
engine. Every step is constrained by a llama.cpp grammar derived from the tools'
JSON schemas, so the reply is always one JSON object: a call
`{"tool": NAME, "arguments": {...}}` or an answer `{"answer": TEXT}`. A call is
run by the tool manager with the agent's policy, its result is appended to the
conversation as a `tool` message, and the next step sees it; the last step may
only answer. The visible job shows the answer as its output, and each call and
result as events.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
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
    "You can call tools. To call one, reply with only a JSON object "
    '{"tool": NAME, "arguments": {...}}; you will then see its result. '
    'To answer, reply with only {"answer": TEXT}. Tools:'
)


def uses_tools(config: AgentConfig) -> bool:
    """Served tools (run in a loop) or declared ones (the calls are the answer)."""
    return bool(config.tools or config.functions) and config.tool_choice != "none"


def with_tools(system: str, specs: Sequence[Any]) -> str:
    """The system message with the tools block appended."""
    lines = [TOOLS_HEADER] + [f"- {s.name}: {s.description} Arguments: {json.dumps(s.schema, separators=(',', ':'))}" for s in specs]
    return "\n\n".join(part for part in (system, "\n".join(lines)) if part)


def step_grammar(specs: Sequence[Any], choice: str) -> str:
    """GBNF for one step: `auto` (any call or an answer), `required` (any call), a
    tool's name (that call only), or `answer` (the answer only)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    calls = [_call_schema(s) for s in specs if choice in ("auto", "required", s.name)]
    options = [*calls, ANSWER] if choice == "auto" else [ANSWER] if choice == "answer" else calls
    schema = options[0] if len(options) == 1 else {"oneOf": options}
    return str(json_schema_to_gbnf(json.dumps(schema)))


def _call_schema(spec: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"tool": {"const": spec.name}, "arguments": spec.schema},
        "required": ["tool", "arguments"],
        "additionalProperties": False,
    }


def parse_step(text: str) -> tuple[str, Any]:
    """("answer", text) or ("tool", (name, arguments)); EIO when the reply is not one
    (cut by max_tokens: the grammar allows nothing else)."""
    try:
        reply = json.loads(text, strict=False)
    except ValueError:
        raise KernelError(errno.EIO, f"the model's reply is not complete JSON (max_tokens too small?): {text[:200]!r}") from None
    if isinstance(reply, dict) and isinstance(reply.get("answer"), str):
        return "answer", reply["answer"]
    if isinstance(reply, dict) and isinstance(reply.get("tool"), str):
        return "tool", (reply["tool"], reply.get("arguments", {}))
    raise KernelError(errno.EIO, f"the model's reply is neither a tool call nor an answer: {text[:200]!r}")


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
    messages = list(job.messages)
    tokens = job.prompt_tokens
    config = host.cores.routed(dataclasses.replace(job.config, ignore_eos=False))  # one core for every step; a step ends when its JSON is complete
    for number in range(params.MAX_TOOL_STEPS):
        last = number == params.MAX_TOOL_STEPS - 1
        choice = "answer" if last else job.config.tool_choice if number == 0 else "auto"
        step = await _run_step(host, job, messages, tokens, config, step_grammar(specs, choice))
        if step is None:
            return
        kind, value = parse_step(step.text)
        if kind == "answer":
            _answer(host, job, value)
            return
        if last:
            raise KernelError(errno.EIO, "the model called a tool at the last step, where only an answer is allowed")
        messages = messages + await _call(host, agent, job, step.text, *value)
        tokens = await trio.to_thread.run_sync(prompt_tokens, host, config, messages, limiter=host.cores.call_threads)


async def _declared(host: Host, agent: Agent, job: Job) -> None:
    """Declared tools: one step, whose call (or answer) is the job's output as JSON
    `{"content": TEXT or null, "tool_calls": [{"id", "name", "arguments"}]}`; nothing runs."""
    config = host.cores.routed(dataclasses.replace(job.config, ignore_eos=False))
    step = await _run_step(host, job, list(job.messages), job.prompt_tokens, config, step_grammar(job.config.functions, job.config.tool_choice))
    if step is None:
        return
    kind, value = parse_step(step.text)
    if kind == "answer":
        reply: dict[str, Any] = {"content": value, "tool_calls": []}
    else:
        name, arguments = value
        reply = {"content": None, "tool_calls": [{"id": f"call_{job.id}_1", "name": name, "arguments": arguments}]}
        host.emit(job, "tool_call", tool=name, arguments=arguments)
    _answer(host, job, json.dumps(reply, ensure_ascii=False))


async def _run_step(host: Host, job: Job, messages: list[dict[str, str]], tokens: list[int], config: AgentConfig, grammar: str) -> Job | None:
    """One generation in the engine; None when the job ended (cancelled or failed)."""
    if job.cancel_requested:
        _end(host, job, JobState.CANCELLED, errno.ECANCELED, "cancelled")
        return None
    step = Job(job.id, job.agent, job.uid, job.user_message, messages, tokens, config, job.source, grammar=grammar, parent=job)
    job.step = step
    host.cores.of(step).submit(step)
    while not step.state.finished:
        await step.wait_beyond(len(step.data), 1.0)
    job.step = None
    job.n_generated += step.n_generated
    job.extra_prompt_tokens += len(tokens) if tokens is not job.prompt_tokens else 0
    if step.state is not JobState.DONE:
        _end(host, job, step.state, step.errno, step.message)
        return None
    return step


async def _call(host: Host, agent: Agent, job: Job, text: str, name: str, arguments: Any) -> list[dict[str, str]]:
    """Run one tool call for the job; the messages that record it."""
    host.emit(job, "tool_call", tool=name, arguments=arguments)
    caller = host.job_caller(job)
    try:
        result: dict[str, Any] = {"ok": True, "result": await host.tools.call(caller, agent, name, arguments)}
    except KernelError as exc:
        result = {"ok": False, "errno": errno_name(exc.errno), "error": exc.message}
    host.emit(job, "tool_result", tool=name, ok=result["ok"], **({} if result["ok"] else {"errno": result["errno"]}))
    recorded = [{"role": "assistant", "content": text}, {"role": "tool", "content": json.dumps(result, ensure_ascii=False)}]
    job.tool_messages += recorded
    return recorded


def _answer(host: Host, job: Job, text: str) -> None:
    job.publish(text.encode(), 0)
    _end(host, job, JobState.DONE, 0, "")


def _end(host: Host, job: Job, state: JobState, code: int, message: str) -> None:
    """The job ends as any job does: a prompt job's answer is kept in its context first."""
    host.end(job, state, code, message)
