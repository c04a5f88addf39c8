"""`scripts/gpu-check`: one command that answers, on a machine with an NVIDIA GPU, what
the CPU cannot: does llama.cpp build and offload there, do answers stay token-identical
with KV sharing on and off, does the CPU's 64-row prefill tile rule hold, and how do raw
batched decode, the aiosfs kernel and llama-server compare there.

A GPU machine lent for checks may have CUDA's nvcc, CMake and Python but no network and
no FUSE, and what travels to it is limited to 64 MiB. So the check comes in two halves:

* ``scripts/gpu-check --pack DIR`` (here, with network): the llama-cpp-python source
  without its test models and docs, this project, wheels for the pure-Python packages the
  check imports, and the embedded model cut to fit (aiosfs.gpucheck.gguf), in DIR;
* ``sh DIR/gpu-check`` (there): builds llama-cpp-python (and llama-server, from the
  same build tree) for that GPU's architecture into a private directory, then runs the
  four steps, each in child processes, and writes JSON and a markdown table.

``scripts/gpu-check --cpu`` runs the same steps on the CPU build already installed (no
build), and ``--quick`` makes it short; tests/test_gpucheck.py runs both in CI, so the
check cannot rot while no GPU is at hand.

Modules: run (the steps, their deadlines, the results), build (steps 1 and 2),
identity (step 3, run in a child), speed (step 4), report (the markdown), pack (the
bundle), gguf (the model's layers).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the project: aiosfs, kernel, bench
LLAMA_CPP_PYTHON = "0.3.36"
MIB = 1 << 20
BUNDLE_LIMIT = 64 * MIB  # what may travel to the GPU machine
STARTED = time.monotonic()


def say(message: str) -> None:
    """Progress, on stderr, with the seconds since the check began."""
    print(f"[gpu-check {time.monotonic() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def child_env(site: Path | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the check's children: the private packages (`site`) and this project first on their path."""
    paths = [str(p) for p in (site, ROOT) if p is not None]
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Ran:
    """How a child process ended."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool

    def tail(self, lines: int = 20) -> str:
        return "\n".join((self.stderr or self.stdout).rstrip().splitlines()[-lines:])


def run_child(cmd: Sequence[str], *, timeout: float, env: dict[str, str] | None = None, cwd: Path | None = None) -> Ran:
    """Run `cmd`, capture it, never wait past `timeout` (its process group is killed then)."""
    started = time.monotonic()
    proc = subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace", env=env, cwd=cwd, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout))
        return Ran(proc.returncode, out, err, time.monotonic() - started, False)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        out, err = proc.communicate()
        return Ran(proc.returncode, out, err, time.monotonic() - started, True)


def stop_group(proc: subprocess.Popen[str], grace: float = 15.0) -> None:
    """SIGTERM to the child's process group (the bench then stops its workers and servers), SIGKILL after `grace`."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
