"""`python -m setup.gpucheck` (what scripts/gpu-check runs): the check, `--pack DIR`, and
the children the check starts (`identity ...`, `ceiling ...`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

USAGE = """Answer the open questions about aiosfs on an NVIDIA GPU in one run:

  1. build llama-cpp-python (and llama-server) for this GPU from the bundle's source
  2. prove the build with every layer offloaded (a child decodes a few tokens)
  3. token identity with KV sharing on and off at 1, 4 and 16 sequences; does the
     CPU's 64-row prefill tile rule hold here, and does batch composition matter?
  4. raw batched decode, the in-process aiosfs kernel and llama-server -ngl 99 -np B
     at B = 1, 16 and 64, with the host's share of a step

Writes gpu-check.json and gpu-check.md (under --out) and prints the tables.

  scripts/gpu-check --pack DIR        here: the bundle for a machine without network (<= 64 MiB)
  sh DIR/gpu-check --out OUT          there: build, then the four steps (<= 9 minutes on one H100)
  scripts/gpu-check --cpu [--quick]   the same steps on the CPU build installed here (no build)
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/gpu-check", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pack", type=Path, metavar="DIR", help="write the bundle into DIR (a new or empty directory) and stop")
    p.add_argument("--cpu", action="store_true", help="run the steps on the CPU build already installed; step 1 is skipped")
    p.add_argument("--quick", action="store_true", help="1 and 4 sequences, few tokens: the short form CI runs")
    p.add_argument("--bundle", type=Path, help="the bundle directory (set by its gpu-check launcher)")
    p.add_argument("--src", type=Path, help="llama-cpp-python source: an sdist or an unpacked tree (default: the bundle's; --pack: download)")
    p.add_argument("--model", type=Path, help="GGUF model (default: the bundle's, else the shipped model)")
    p.add_argument("--out", type=Path, help="where the results go (default: WORK/results)")
    p.add_argument("--work", type=Path, help="work directory: build, private packages (default: /tmp/aiosfs-gpu-check[-cpu])")
    p.add_argument("--budget", type=float, default=540.0, help="seconds the whole check may take (default: 540)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for llama.cpp (default: 2 with --cpu, else up to 8)")
    p.add_argument("--jobs", type=int, default=0, help="parallel build jobs (default: every core)")
    p.add_argument("--llama-server", type=Path, help="llama-server binary for step 4 (default: the one step 1 builds, or one on the PATH)")
    p.add_argument("--no-server", action="store_true", help="do not build llama-server in step 1")
    p.add_argument("--build-only", action="store_true", help="stop after step 1 (a later run can take it with --reuse-build)")
    p.add_argument("--reuse-build", action="store_true", help="step 1 takes the CUDA build an earlier run left in WORK, if there is one")
    p.add_argument("--max-mib", type=float, default=60.0, help="--pack: the bundle's size to fill; the rest of 64 MiB is for what travels beside it")
    p.add_argument("--python-version", default="3.12", help="--pack: the GPU machine's Python, for the compiled wheels (default: 3.12)")
    return p


def ceiling_main(argv: list[str]) -> int:
    from .speed import ceiling_child

    p = argparse.ArgumentParser(prog="python -m setup.gpucheck ceiling")
    p.add_argument("--agents", type=int, default=16)
    p.add_argument("--tokens", type=int, default=500)
    args = p.parse_args(argv)
    print(json.dumps(ceiling_child(args.agents, args.tokens)), flush=True)
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["identity"]:
        from .identity import main as identity_main

        return identity_main(argv[1:])
    if argv[:1] == ["ceiling"]:
        return ceiling_main(argv[1:])
    args = parser().parse_args(argv)
    if args.pack is not None:
        from .pack import pack

        return pack(args)
    from .run import Check

    return Check(args).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
