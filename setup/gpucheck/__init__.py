"""`scripts/gpu-check`: one command that answers, on a machine with an NVIDIA GPU, what
the CPU cannot: does llama.cpp build and offload there, do answers stay token-identical
with KV sharing on and off, does the CPU's 64-row prefill tile rule hold, and how do raw
batched decode, the aiosfs kernel and llama-server compare there.

A GPU machine lent for checks may have CUDA's nvcc, CMake and Python but no network and
no FUSE, and what travels to it is limited to 64 MiB. So the check comes in two halves:

* ``scripts/gpu-check --pack DIR`` (here, with network): the llama-cpp-python source
  without its test models and docs, this project, wheels for the pure-Python packages the
  check imports, and the embedded model cut to fit (setup.gpucheck.gguf), in DIR;
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
import sys
import time
from pathlib import Path

from ..kit import Ran as Ran
from ..kit import run_child as run_child
from ..kit import stop_group as stop_group
from ..kit import with_path

ROOT = Path(__file__).resolve().parent.parent.parent  # the project: aiosfs, kernel, setup, bench
LLAMA_CPP_PYTHON = "0.3.36"
MIB = 1 << 20
BUNDLE_LIMIT = 64 * MIB  # what may travel to the GPU machine
STARTED = time.monotonic()


def say(message: str) -> None:
    """Progress, on stderr, with the seconds since the check began."""
    print(f"[gpu-check {time.monotonic() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def child_env(site: Path | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the check's children: the private packages (`site`) and this project first on their path."""
    return with_path({**os.environ, **(extra or {}), "PYTHONUNBUFFERED": "1"}, site, ROOT)
