"""Text of the snapshot files: README, kernel/* and an agent's status/error."""

from __future__ import annotations

import datetime as dt
import time

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from kernel import Agent, Caller, Kernel, params

README = """\
aiosfs: an operating system for LLM agents, in the filesystem.

  mkdir agents/NAME                      create an agent (owned by you)
  echo "question" > agents/NAME/prompt   queue a request (returns once queued)
  cat agents/NAME/output                 stream your latest answer; exits when done
  cat agents/NAME/status                 "<state> <job-id>"
  cat agents/NAME/error                  your last errors on this agent, newest last
  cat agents/NAME/context                the conversation, JSON Lines; ': >' resets it
  echo "temperature=0" >> agents/NAME/config
  echo cancel > agents/NAME/ctl          also: "cancel all", "cancel ID", "pause", "resume", "reset"
  exec 3<>agents/NAME/call               a private conversation per open file
  cat agents/NAME/events                 job events as they happen (JSON Lines)
  echo "notes" > agents/NAME/memory/a.md  memory/ is a real directory tree, kept in SQLite
  cat agents/NAME/versions               kept versions of memory files; undo with
  echo "rollback a.md 2" > agents/NAME/ctl
  exec 3<>agents/NAME/recall             write a query, read ranked memory passages
  echo memory_recall=on >> agents/NAME/config   put recalled passages into each prompt
  echo "budget_tokens 10000" > agents/NAME/permissions   policy beyond mode bits (root sets limits)
  exec 3<>tools/calculator; echo '{"expression": "6*7"}' >&3; cat <&3   call a tool; tools/NAME.schema says how
  echo "fork NEW" > agents/NAME/ctl      a copy of the agent (config, context, memory/ with versions)
  cp -a agents/NAME ~/backup/            back up; cp, tar and rsync copy agents out and back in
  rmdir agents/NAME                      moves the agent to kernel/trash; undo with
  echo "restore NAME" > kernel/ctl       (the owner or root, for 7 days)
  cat kernel/status                      the kernel at a glance; kernel/stats, kernel/ps for more
  cat kernel/metrics                     the counters for Prometheus (mount --metrics HOST:PORT serves them)
  echo "rr quantum=32" > kernel/scheduler   (root) fifo | rr [quantum=N] | priority

A request is plain text, or a JSON envelope {"prompt": ..., "temperature": ...,
"max_tokens": ..., "seed": ..., "stop": [...]}. The full protocol is in
docs/protocol.md of the aiosfs sources.
"""


def agent_status(kernel: Kernel, agent: Agent, caller: Caller) -> str:
    job = kernel.requests.latest_job(agent, caller.uid)
    if job is None:
        return "idle -\n"
    return f"{job.shown_state} {job.id}\n"


def agent_error(agent: Agent, caller: Caller) -> str:
    """The caller's last refusals and job failures on this agent, newest last."""
    return "".join(line + "\n" for line in agent.errors.get(caller.uid, ()))


def kernel_stats(kernel: Kernel) -> str:
    return "".join(f"{key} {value}\n" for key, value in kernel.statistics().items())


def kernel_metrics(registry: CollectorRegistry) -> str:
    """The Prometheus text exposition format (kernel/metrics.py), on the trio thread."""
    return generate_latest(registry).decode()


def kernel_ps(kernel: Kernel, caller: Caller) -> str:
    """Every active job, then every agent process, then every MCP server
    (`mcp NAME transport=stdio|http pid=N|- state=starting|ready|restarting|failed restarts=N tools=N calls=N`, calls in flight);
    other users' jobs are listed without their content."""
    lines = ["id agent uid state priority wait_ms tokens\n"]
    now = time.time()
    jobs = sorted((j for a in kernel.agents.values() for j in a.active), key=lambda j: j.id)
    for job in jobs:
        waited = (job.started_at or now) - job.queued_at
        lines.append(f"{job.id} {job.agent} {job.uid} {job.shown_state} {job.config.priority} {int(waited * 1000)} {job.n_generated}\n")
    for provider in kernel.ps_providers:  # e.g. the agent processes of mount --agents-dir
        lines.extend(f"{line}\n" for line in provider())
    lines.extend(f"{line}\n" for line in kernel.mcp.ps_lines())
    return "".join(lines)


def kernel_models(kernel: Kernel) -> str:
    """One line per LLM core: `NAME BACKEND WHERE CONTEXT DEVICE STATE [default] running=N queued=N gpu_layers=N`,
    then the configured local models that are not loaded."""
    lines = []
    for name, core in kernel.cores.items():
        info = core.info
        default = " default" if core is kernel.engine else ""
        local = kernel.cores.local(name)
        engine = (
            ""
            if local is None
            else f" {local.describe()}" + (f" last_crash={local.last_crash.split(';')[0].replace(' ', '_')}" if local.last_crash else "")
        )
        lines.append(
            f"{name} {info.backend} {info.path} {info.n_ctx_seq} {info.device} loaded{default} "
            f"running={core.running()} queued={len(core.queue.queued())} gpu_layers={info.gpu_layers}{engine}\n"
        )
    for name in kernel.cores.unloaded():
        lines.append(f"{name} llama.cpp - 0 - unloaded running=0 queued=0 gpu_layers=0\n")
    return "".join(lines)


def kernel_log(kernel: Kernel) -> str:
    return "".join(line + "\n" for line in kernel.audit)


def kernel_trash(kernel: Kernel) -> str:
    """Removed agents that `restore NAME` in kernel/ctl can bring back, oldest first."""
    lines = ["name id uid removed restorable_until\n"]
    for row in sorted(kernel.agents.trash.values(), key=lambda r: r.trashed_at or 0):
        removed = row.trashed_at or 0
        until = removed + params.TRASH_RETENTION_SECONDS
        lines.append(f"{row.trashed_name} {row.id} {row.uid} {_iso(removed)} {_iso(until)}\n")
    return "".join(lines)


def _iso(stamp: float) -> str:
    return dt.datetime.fromtimestamp(stamp, dt.UTC).isoformat(timespec="seconds")


async def versions(kernel: Kernel, agent: Agent, caller: Caller) -> str:
    """`versions`: one kept version per line, `VERSION BYTES TIME PATH` (path last: it may hold spaces)."""
    rows = await kernel.memory.versions(caller, agent)
    lines = ["version bytes time path\n"]
    for v in rows:
        lines.append(f"{v.n} {v.size} {_iso(v.committed)} {v.path}\n")
    return "".join(lines)
