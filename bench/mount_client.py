"""One agent's client of the aiosfs-mount peer, in its own process: `echo "$request" >
prompt; cat output`, request after request, as a shell user would.

    python -m bench.mount_client AGENT_DIR PLAN_JSON

PLAN_JSON holds {"requests": [envelope, ...], "reset": bool, "deadline": time.time(),
"delay": s, "stop": path or ""}. The client prints `ready`, waits for a line on stdin
(go), sleeps `delay`, then runs the requests until the deadline passes or the `stop`
file exists, writing one `x` to stderr per finished request (for the progress line)
and, at the end, one JSON line on stdout: a record per request. Standard library only,
so that it starts fast.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

WRITE = os.O_WRONLY | os.O_TRUNC


def put(path: Path, data: bytes, flags: int = WRITE) -> None:
    fd = os.open(path, flags)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_output(path: Path, rec: dict[str, Any]) -> None:
    """`cat output`: the time of the first byte and the number of bytes into `rec`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            if rec["first"] is None:
                rec["first"] = time.time()
            rec["bytes"] += len(chunk)
    finally:
        os.close(fd)


def request(agent_dir: Path, index: int, data: str, reset: bool) -> dict[str, Any]:
    """One request: its record (times, bytes, status; `error` empty when it went well)."""
    rec: dict[str, Any] = {"index": index, "start": time.time(), "first": None, "bytes": 0, "error": ""}
    try:
        put(agent_dir / "prompt", data.encode())  # echo "$request" > prompt
        read_output(agent_dir / "output", rec)  # cat output
        rec["end"] = time.time()
        rec["status"] = (agent_dir / "status").read_text().strip()
        if not rec["status"].startswith("done"):
            rec["error"] = "status: " + rec["status"]
        if reset:
            put(agent_dir / "ctl", b"reset\n", os.O_WRONLY)  # echo reset > ctl
    except OSError as exc:
        rec["end"] = time.time()
        rec["error"] = f"{type(exc).__name__}: {exc}"
    return rec


def run(agent_dir: Path, plan: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for index, data in enumerate(plan["requests"]):
        if time.time() > plan["deadline"] or (plan["stop"] and os.path.exists(plan["stop"])):
            break
        rec = request(agent_dir, index, data, plan["reset"])
        out.append(rec)
        sys.stderr.write("x")  # one mark per request, for the progress line
        sys.stderr.flush()
        if rec["error"]:
            break
    return out


def main(argv: list[str]) -> int:
    agent_dir, plan_path = Path(argv[0]), Path(argv[1])
    plan = json.loads(plan_path.read_text())
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()  # go
    time.sleep(plan["delay"])
    out = run(agent_dir, plan)
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
