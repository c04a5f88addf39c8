"""Step 4 of the GPU check: raw batched decode, the in-process aiosfs kernel and
llama-server on the same model file at B sequences, and what the host costs a step.

It runs the project's benchmark (``python -m bench``: its raw-batched, aiosfs-inproc and
llama-server peers on the decode-heavy workload, one request per agent), so the numbers
mean what docs/benchmarks.md says they mean. llama-server gets ``-ngl 99`` on a GPU
through a small wrapper, since the bench does not pass it. The host-ceiling split comes
from two places: the kernel's counters over the aiosfs-inproc run (plan and boundary,
the runner's Python, sampling, delivery, per engine step), and bench.hostceiling's
in-process run on the fake model, whose steps cost nothing on the device: the host's
own ceiling on this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from . import child_env, run_child, say

PEERS = ("raw-batched", "aiosfs-inproc", "llama-server")
PARTS = ("plan_ipc_s", "runner_python_s", "sample_s", "deliver_s")  # bench.hostceiling.PARTS, without the decode itself


def find_llama_server(explicit: Path | None, built: str | None) -> tuple[Path | None, str]:
    """The llama-server to run: --llama-server, the one step 1 built, one on the PATH, the bench's cache; or why none."""
    from bench.servers import DEFAULT_LLAMA_SERVER

    for candidate, why in ((explicit, "--llama-server"), (Path(built) if built else None, "step 1")):
        if candidate is not None:
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate, why
            return None, f"not run: {candidate} ({why}) is not an executable file"
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path), "PATH"
    if DEFAULT_LLAMA_SERVER.is_file() and os.access(DEFAULT_LLAMA_SERVER, os.X_OK):
        return DEFAULT_LLAMA_SERVER, "scripts/build-llama-server's cache"
    return None, "not run: no llama-server binary in the bundle's build, on the PATH or in scripts/build-llama-server's cache"


def gpu_wrapper(server: Path, work: Path) -> Path:
    """A llama-server that offloads every layer (`-ngl 99`), for the bench, which does not ask for it."""
    wrapper = work / "llama-server-ngl99"
    wrapper.write_text(f'#!/bin/sh\nexec "{server}" -ngl 99 "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def per_step(kernel: dict[str, Any]) -> dict[str, float | None]:
    """The aiosfs-inproc run's milliseconds per engine step: device decode, each host part, the whole step."""
    steps = kernel.get("steps") or 0
    if not steps:
        return {}
    out: dict[str, float | None] = {"decode_ms": round(1000 * (kernel.get("decode_s") or 0.0) / steps, 3)}
    for part in PARTS:
        out[part.removesuffix("_s") + "_ms"] = round(1000 * kernel[part] / steps, 3) if kernel.get(part) is not None else None
    if kernel.get("step_s") is not None:
        out["step_ms"] = round(1000 * kernel["step_s"] / steps, 3)
    return out


def rows_of(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per bench run: peer, B, tok/s, decode ms a step and the host's split."""
    rows = []
    for run in results.get("runs", []):
        extra = run.get("extra") or {}
        summary = run.get("summary") or {}
        row: dict[str, Any] = {"peer": run["peer"], "B": run["agents"], "tok_s": summary.get("tok_s"), "failure": run.get("failure")}
        if summary and summary.get("requests") != summary.get("expected_requests"):  # cut by the run's time limit
            row["incomplete"] = f"{summary.get('requests')} of {summary.get('expected_requests')} requests"
        if run["peer"] == "raw-batched" and extra.get("raw"):
            row["decode_ms"] = extra["raw"].get("ms_per_step")
        if run["peer"] == "aiosfs-inproc" and extra.get("kernel"):
            row.update(per_step(extra["kernel"]))
            row["seqs_per_step"] = extra["kernel"].get("seqs_per_step")
        if extra.get("argv"):
            row["argv"] = extra["argv"]
        rows.append(row)
    return rows


def bench(
    model: Path, agents: list[int], *, threads: int, work: Path, server: Path | None, gpu: bool, timeout: float, site: Path | None
) -> dict[str, Any]:
    """The three peers at each B, through `python -m bench`; its results and our rows."""
    out = work / "bench"
    shutil.rmtree(out, ignore_errors=True)
    peers = [p for p in PEERS if p != "llama-server" or server is not None]
    cmd = [sys.executable, "-m", "bench", "--workloads", "decode-heavy", "--agents", ",".join(map(str, agents)), "--reps", "1"]
    cmd += ["--requests", "1", "--peers", ",".join(peers), "--threads", str(threads), "--model", str(model), "--out", str(out)]
    cmd += ["--wait-quiet", "0", "--run-timeout", str(max(60, int(timeout / 3)))]  # the whole bench is held to `timeout`
    if server is not None:
        cmd += ["--llama-server", str(gpu_wrapper(server, work) if gpu else server)]
    say(f"speed: {', '.join(peers)} at B = {', '.join(map(str, agents))} (python -m bench, log: {out})")
    ran = run_child(cmd, timeout=timeout, env=child_env(site))
    (work / "bench.log").write_text(ran.stdout + "\n" + ran.stderr)
    try:
        results = json.loads((out / "results.json").read_text())
    except (OSError, json.JSONDecodeError):
        why = "out of time" if ran.timed_out else f"exit {ran.returncode}: {ran.tail(3)}"
        return {"verdict": "failed", "detail": f"the bench wrote no results ({why})", "rows": []}
    rows = rows_of(results)
    failed = [r for r in rows if r.get("failure") or r.get("incomplete")]
    verdict = "failed" if len(failed) == len(rows) else ("partial" if failed or ran.returncode != 0 else "ok")
    return {
        "verdict": verdict,
        "detail": f"{len(rows) - len(failed)} of {len(rows)} runs measured"
        + (
            f"; not measured in full: {failed[0]['peer']} B={failed[0]['B']}: {failed[0].get('failure') or failed[0]['incomplete']}" if failed else ""
        ),
        "rows": rows,
        "skipped": results.get("skipped", []),
        "command": " ".join(cmd[1:]),
    }


def ceiling_child(agents: int, tokens: int) -> dict[str, Any]:
    """bench.hostceiling's in-process run on the fake model at zero delay (runs in a child)."""
    from bench.hostceiling import long_request, run_inproc

    return run_inproc(agents, long_request(tokens), agents, 0.0).summary()


def ceiling(agents: list[int], tokens: int, *, timeout: float, site: Path | None) -> list[dict[str, Any]]:
    """The host's ceiling at each number of agents, each in a child (`timeout`: for them all)."""
    rows = []
    for n in agents:
        say(f"speed: host ceiling, fake model, {n} agents x {tokens} tokens")
        cmd = [sys.executable, "-m", "setup.gpucheck", "ceiling", "--agents", str(n), "--tokens", str(tokens)]
        ran = run_child(cmd, timeout=timeout / len(agents), env=child_env(site))
        line = next((x for x in reversed(ran.stdout.splitlines()) if x.startswith("{")), "")
        if ran.returncode == 0 and line:
            r = json.loads(line)
            rows.append(
                {"agents": n, "steps_per_s": r["steps_per_s"], "tok_s": r["tok_per_s"], "step_ms": r["step_ms"], "host_ms": r["host_ms_per_step"]}
            )
        else:
            rows.append({"agents": n, "failure": "timed out" if ran.timed_out else f"exit {ran.returncode}: {ran.tail(3)}"})
    return rows
