#!/usr/bin/env python3
"""A planning agent that talks to aiosfs through files only (open/read/write/close).

    planner.py [--agent AGENT_DIR] [--json] [--max-tokens N] [--expression EXPR] TASK

AGENT_DIR defaults to $AIOSFS_AGENT_DIR (set by the manifest supervisor); the mount
is the directory two levels above it. The steps:

1. Plan: ask the model for a short plan through the agent's `call` file. One file
   descriptor stays open for the whole run, so every question is a turn of the same
   private conversation.
2. Tools: the arithmetic of the task (the longest expression such as `12 * 4.5` in it,
   or --expression) goes to `tools/calculator`, and `tools/clock` gives the time, both
   with the `{"agent": NAME, "arguments": {...}}` envelope.
3. Memory: a note (time, task, plan, result) is appended to `memory/notes.md`; then
   `recall` is queried with the task, which brings back this note and those of
   earlier runs, and they go into the next turn of the conversation, which asks
   for the first thing to do.

A final report goes to stdout (JSON with --json). Requests are envelopes with
temperature 0 and a small max_tokens, so runs are repeatable. Errors name the file and
the errno, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# A number, then at least one operator and number: "12 * 4.5", "(3 + 4) * 2".
EXPRESSION = re.compile(r"\(*\s*\d+(?:\.\d+)?(?:\s*\)*\s*(?:\*\*|//|[-+*/%])\s*\(*\s*\d+(?:\.\d+)?)+\s*\)*")


class AgentError(Exception):
    """A file operation on the mount failed; the message names the file and the errno."""


def failed(action: str, path: Path, exc: OSError, detail: str = "") -> AgentError:
    """`read /mnt/agents/a/call: ECANCELED (Operation canceled); partial answer: '...'`"""
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return AgentError(f"{action} {path}: {name} ({exc.strerror}){f'; {detail}' if detail else ''}")


def read_to_eof(fd: int, path: Path) -> str:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError as exc:
            raise failed("read", path, exc, f"partial answer: {data.decode(errors='replace')!r}") from None
        if not chunk:
            return data.decode()
        data += chunk


def read_line(fd: int, path: Path) -> str:
    """One JSON line of a tool. Not to EOF: after an error line the next read fails with its errno."""
    data = b""
    while not data.endswith(b"\n"):
        try:
            chunk = os.read(fd, 65536)
        except OSError as exc:
            raise failed("read", path, exc) from None
        if not chunk:
            break
        data += chunk
    return data.decode()


def read_small(path: Path) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise failed("read", path, exc) from None


class Session:
    """The agent's `call` file, open for the whole run: one private conversation."""

    def __init__(self, agent: Path, max_tokens: int) -> None:
        self.path = agent / "call"
        self.agent = agent
        self.max_tokens = max_tokens
        self.transcript: list[dict[str, str]] = []  # the turns of this conversation, in order
        try:
            self.fd = os.open(self.path, os.O_RDWR)
        except OSError as exc:
            raise failed("open", self.path, exc) from None

    def ask(self, text: str) -> str:
        request = json.dumps({"prompt": text, "temperature": 0, "max_tokens": self.max_tokens})
        try:
            os.write(self.fd, request.encode())
        except OSError as exc:
            raise failed("write", self.path, exc) from None
        try:
            answer = read_to_eof(self.fd, self.path)  # the first read commits the turn
        except AgentError as exc:
            raise AgentError(f"{exc}; {self.agent / 'error'}: {self.last_error()}") from None
        self.transcript.append({"question": text, "answer": answer.strip()})
        return answer.strip()

    def last_error(self) -> str:
        try:
            lines = read_small(self.agent / "error").strip().splitlines()  # the newest refusal is last
            return lines[-1] if lines else "(empty)"
        except AgentError as exc:
            return str(exc)

    def close(self) -> None:
        os.close(self.fd)


def exchange(path: Path, request: bytes, read: Callable[[int, Path], str]) -> str:
    """One rpc session: open the file, write the request, read the reply, close."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise failed("open", path, exc) from None
    try:
        try:
            os.write(fd, request)
        except OSError as exc:
            raise failed("write", path, exc) from None
        return read(fd, path)
    finally:
        os.close(fd)


def call_tool(tools: Path, agent_name: str, tool: str, arguments: dict[str, Any]) -> Any:
    """Write the envelope to tools/NAME, read the one JSON line back."""
    path = tools / tool
    line = exchange(path, json.dumps({"agent": agent_name, "arguments": arguments}).encode(), read_line)
    try:
        reply = json.loads(line)
    except ValueError:
        raise AgentError(f"read {path}: not a JSON line: {line[:200]!r}") from None
    if not reply.get("ok"):
        raise AgentError(f"call {path}: {reply.get('errno')} ({reply.get('error')})")
    return reply["result"]


def append_note(memory: Path, text: str) -> Path:
    path = memory / "notes.md"
    try:
        with open(path, "a", encoding="utf-8") as f:  # committed (and versioned) at close
            f.write(text)
    except OSError as exc:
        raise failed("append to", path, exc) from None
    return path


def recall(agent: Path, query: str) -> list[dict[str, Any]]:
    """Ranked passages of memory/ for the query, from the agent's `recall` file."""
    text = exchange(agent / "recall", query.encode(), read_to_eof)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def one_line(text: str) -> str:
    return " ".join(text.split())


def run(agent: Path, task: str, expression: str | None, max_tokens: int) -> dict[str, Any]:
    for name in ("call", "recall", "memory"):
        if not (agent / name).exists():
            raise AgentError(f"{agent / name}: missing (is {agent} an aiosfs agent directory?)")
    mount = agent.parent.parent
    tools = mount / "tools"
    name = agent.name
    session = Session(agent, max_tokens)
    try:
        # 1. the plan
        plan = session.ask(f"Write a short plan, at most three numbered steps, for this task: {task}")

        # 2. the tools: the arithmetic and the time
        if expression is None:
            found = [m.group(0).strip() for m in EXPRESSION.finditer(task)]
            expression = max(found, key=len) if found else None
        calculation = None
        if expression:
            calculation = {"expression": expression, "result": call_tool(tools, name, "calculator", {"expression": expression})["result"]}
        clock = call_tool(tools, name, "clock", {})

        # 3. memory: write a note, recall the notes about this task, use them in the next turn
        note = f"## {clock['utc']} {one_line(task)}\nPlan: {one_line(plan)}\n"  # one paragraph: one recall passage
        if calculation:
            note += f"Arithmetic: {calculation['expression']} = {calculation['result']}\n"
        note += "\n"
        notes = append_note(agent / "memory", note)
        passages = recall(agent, task)
        recalled = "\n".join(f"- {one_line(p['text'])}" for p in passages) or "- (none)"
        facts = f"The calculator says {calculation['expression']} = {calculation['result']}. " if calculation else ""
        next_step = session.ask(f"{facts}Notes from earlier:\n{recalled}\nIn one sentence, what is the first thing to do now?")
    finally:
        session.close()
    return {
        "agent": name,
        "task": task,
        "plan": plan,
        "calculation": calculation,
        "clock": clock,
        "notes": str(notes),
        "recalled": passages,
        "next_step": next_step,
        "transcript": session.transcript,
    }


def report_text(report: dict[str, Any]) -> str:
    lines = [f"Task: {report['task']}", "", "Plan:", report["plan"], ""]
    if report["calculation"]:
        lines.append(f"Calculator: {report['calculation']['expression']} = {report['calculation']['result']}")
    lines.append(f"Clock: {report['clock']['utc']}")
    lines.append(f"Notes: appended to {report['notes']}; recalled {len(report['recalled'])} passages:")
    lines += [f"  {p['path']}:{p['line']} {one_line(p['text'])[:100]}" for p in report["recalled"]]
    lines += ["", "Next step:", report["next_step"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plan a task with an aiosfs agent, its tools and its memory.")
    parser.add_argument("task", nargs="+", help="the task, e.g. 'Plan a picnic for 12 guests at 4.5 euros each: 12 * 4.5'")
    parser.add_argument("--agent", default=os.environ.get("AIOSFS_AGENT_DIR"), help="the agent directory (default: $AIOSFS_AGENT_DIR)")
    parser.add_argument("--expression", help="the arithmetic for the calculator (default: found in the task)")
    parser.add_argument("--max-tokens", type=int, default=int(os.environ.get("PLANNER_MAX_TOKENS", "64")), help="tokens per answer (default 64)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if not args.agent:
        parser.error("no agent directory: pass --agent DIR or set AIOSFS_AGENT_DIR")
    try:
        report = run(Path(args.agent), " ".join(args.task), args.expression, args.max_tokens)
    except AgentError as exc:
        print(f"planner: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else report_text(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
