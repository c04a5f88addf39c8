"""Measure how much of one model's capacity many agents get through aiosfs.

Peers, on the same model file with the same thread count, started, warmed up and
measured one after another, interleaved per repetition (A B C A B C):

  raw-batched       the ceiling, no server: the kernel's llama.cpp backend, one context with N sequences,
                    each round's prompts prefilled, then max_tokens steps with all N in every batch;
                    tok/s over those decode steps only (a fresh worker process)
  naive             one llama_cpp.Llama, one request at a time (one serving thread, FIFO)
  llama_cpp.server  python -m llama_cpp.server under N concurrent streaming HTTP clients
  llama-server      llama.cpp's C++ server, -np N --cont-batching (scripts/build-llama-server)
  aiosfs-inproc     the aiosfs kernel in-process (a fresh worker process), through its syscall table
  aiosfs-noreuse    the same with KV reuse turned off (by default only in multi-turn: what reuse gains)
  aiosfs-mount      aiosfs mounted, N processes doing `echo > prompt; cat output` (the headline)
  aiosfs-aios-api   aiosfs mounted with `aiosfs aios-api` on it, N threads posting AIOS /query chats
                    (stateless: each request carries its conversation); no streaming, so no TTFT

Workloads (seeded, fixed lengths, greedy, end-of-generation suppressed):

  decode-heavy      prompt ~32 tokens, 128 generated
  prefill-heavy     prompt ~512 tokens, 32 generated
  multi-turn        shared ~256-token system prompt, each turn adds ~64 user tokens, 64 generated
  priority          as decode-heavy; agent 0 (priority=9, scheduler `priority` on the aiosfs peers)
                    starts 1 s after N-1 busy agents (priority 0) and runs its requests; the busy
                    ones stop starting requests once it is done. Measures agent 0's latency
                    against its own at N=1, and what the busy agents still get
  shared-prefix     the same ~1600-token system prompt for every agent, a 16-24-token question each,
                    32 generated, 2 requests per agent, each request alone (system + question);
                    warmed up on another system prompt, so the first round finds none of it cached

The aiosfs peers use one KV slot per agent and the kernel's default scheduler (fifo;
`priority` in the priority workload) unless --slots and --scheduler say otherwise
(--slots default: the kernel's own number of slots, recorded per run).

Examples:

  scripts/bench --quick
  scripts/bench --workloads decode-heavy --agents 1,4,8,16 --reps 3
  scripts/bench --workloads multi-turn --agents 4 --requests 4
  scripts/bench --workloads priority --agents 1,8
  scripts/bench --workloads decode-heavy --agents 16 --slots 8 --scheduler 'rr quantum=32' --peers aiosfs-inproc,aiosfs-mount
  scripts/bench --workloads shared-prefix --agents 16 --reps 1 --peers raw-batched,llama-server,aiosfs-mount

Results: DIR/results.json (every run and the medians), DIR/results.md (the table,
also printed) and DIR/throughput.png (tokens/s and p99 latency against agents; in
priority the busy agents' tokens/s and the high-priority latency p50).
"""

from __future__ import annotations

import os
from pathlib import Path

from setup.kit import with_path

ROOT = Path(__file__).resolve().parent.parent  # the repository: aiosfs, kernel and this package


def child_env() -> dict[str, str]:
    """The environment of the processes the bench starts (workers, mount clients, the
    aiosfs CLI): this repository first on their import path."""
    return with_path(dict(os.environ), ROOT)
