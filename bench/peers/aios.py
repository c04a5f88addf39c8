"""The aiosfs-aios-api peer: aiosfs mounted, `aiosfs aios-api` on it, and N clients posting
the AIOS kernel's `/query` bodies (a stateless chat each: the client keeps the conversation,
as AIOS agents do). What the HTTP gateway costs on top of the mount."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ..load import Cell, closed_loop_threads
from ..servers import free_port, server_process
from ..stats import Record, counter_delta
from .mount import make_agents, read_stats, start_mount, stop_mount


def run_aios_api(cell: Cell) -> tuple[list[Record], float]:
    import httpx

    if not os.path.exists("/dev/fuse"):
        raise RuntimeError("/dev/fuse is missing: this machine cannot mount FUSE filesystems")
    plan = cell.plan
    base = Path(tempfile.mkdtemp(prefix="aiosfs-bench-", dir="/tmp"))
    os.chmod(base, 0o755)
    mountpoint, state = base / "mnt", base / "state"
    mountpoint.mkdir()
    try:
        start_mount(cell, mountpoint, state)
        make_agents(cell, mountpoint)  # configured (system, greedy, end-of-generation suppressed) and warmed up through the mount
        port = free_port()
        argv = [sys.executable, "-m", "aiosfs.cli", "aios-api", str(mountpoint), "--listen", f"127.0.0.1:{port}"]
        with server_process(argv, cell.log_file("aiosfs-aios-api"), f"http://127.0.0.1:{port}/status"):
            timeout = httpx.Timeout(connect=10, read=max(60.0, cell.timeout), write=30, pool=30)
            with httpx.Client(limits=httpx.Limits(max_connections=plan.n_agents + 2), timeout=timeout) as client:

                def one(agent: int, messages: list[dict[str, str]], max_tokens: int) -> tuple[Record, str]:
                    data = {"query_class": "llm", "messages": messages, "action_type": "chat", "temperature": 0.0, "max_new_tokens": max_tokens}
                    start = time.time()
                    reply = client.post(f"http://127.0.0.1:{port}/query", json={"query_type": "llm", "agent_name": f"a{agent}", "query_data": data})
                    end = time.time()
                    response = reply.json()["response"] if reply.status_code == 200 else {"error": f"HTTP {reply.status_code}: {reply.text[:200]}"}
                    if response.get("error"):
                        raise RuntimeError(response["error"])
                    return Record(agent, 0, start, end, None, max_tokens), response["response_message"]  # no streaming: no first-token time

                before = read_stats(mountpoint / "kernel" / "stats")
                records, started = closed_loop_threads(cell, one)
                wall = max((r.end for r in records), default=started) - started
                cell.extra["kernel"] = counter_delta(before, read_stats(mountpoint / "kernel" / "stats"), wall)
                return records, started
    finally:
        stop_mount(cell, mountpoint, state)
        shutil.rmtree(base, ignore_errors=True)
