"""`scripts/bench resume`: what hibernated KV caches save an agent's next turn after an
unmount and a remount, or after an engine crash, and what a fork's first turn saves
by starting on its parent's cells (docs/engine.md, "Hibernation: KV on disk").

Through a real mount, N agents (default 4), each with a system prompt of its own of
about --system-tokens (default 1,600) tokens, long, varied and seeded, take --turns
turns (default 2) one at a time. Then one more turn each, timed, after:

- **resume**: an unmount and a mount of the same state (hibernation on, the default
  `--kv-disk`): each agent's conversation is read back from its file;
- **cold**: the same with `aiosfs mount --kv-disk 0`: each conversation is prefilled again;
- **crash**: `kill -SEGV` of the engine process (its pid from `kernel/status`), once it
  serves again: each conversation is read back from its file.

And forks: a new agent given a parent agent's config and context by plain reads and
writes of its files, whose first turn begins with the parent's conversation (the same
uid: it may share the parent's cells): **fork-live** before the interruption (the
parent's cells in RAM), **fork-resume** and **fork-crash** right after it (the
parent's file), and **fork-cold** after the remount with `--kv-disk 0` (nothing to
share: the fresh agent prefills it all). The parents are two more agents with system
prompts of their own, which take the same turns, so that no measured turn shares
cells with another.

A turn's TTFT runs from the write of its prompt to the first byte of its output; its
wall time to the end of the output. Each variant is a fresh state directory; with
--reps they are interleaved (resume, cold, crash, resume, ...), and the table gives
medians over agents and repetitions, and each variant's median TTFT against cold's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .console import err
from .mount_client import request
from .peers.mount import aiosfs_cli, read_stats

VARIANTS = ("resume", "cold", "crash")
FORK_QUESTION = "And what if the customer insists?"
TOPICS = (
    "late deliveries",
    "damaged parcels",
    "refunds for annual plans",
    "invoices in another currency",
    "lost passwords",
    "shared accounts",
    "data exports",
    "accessibility requests",
    "warranty claims",
    "bulk orders",
    "student discounts",
    "changes of address",
    "cancelled subscriptions",
    "gift cards",
    "tax receipts",
    "duplicate charges",
)
ACTIONS = (
    "confirm the order number first",
    "apologise once and briefly",
    "quote the relevant policy by its number",
    "offer the cheapest remedy that solves the problem",
    "ask for a photograph when goods arrived broken",
    "never promise a date the warehouse has not confirmed",
    "escalate to a supervisor after two failed attempts",
    "write the amounts with their currency",
    "summarise the next steps in one sentence",
)
DETAILS = (
    "keep the tone warm but short",
    "mention the reference in every reply",
    "do not reveal internal notes",
    "log the case under its category",
    "check the customer's region before quoting prices",
    "use the customer's preferred name",
    "avoid jargon and abbreviations",
    "close with the opening hours of the desk",
)


def system_prompt(seed: int, n_tokens: int, count: Any) -> str:
    """A seeded handbook of numbered rules, cut at the last rule within `n_tokens` tokens
    (`count`: the model's token count of a text)."""
    rng = random.Random(seed)
    text = f"You are the support desk assistant number {seed} of a mail-order company. Follow the handbook below."
    rule = 1
    while True:
        line = f" Rule {rule}: when a customer writes about {rng.choice(TOPICS)}, {rng.choice(ACTIONS)}; {rng.choice(DETAILS)}."
        if count(text + line) > n_tokens:
            return text
        text += line
        rule += 1


class Mount:
    """`aiosfs mount` of a state directory, as users run it."""

    def __init__(self, base: Path, args: list[str]) -> None:
        self.root, self.state, self.args = base / "mnt", base / "state", args

    def start(self, extra: list[str]) -> None:
        self._cli("mount", str(self.root), "--state", str(self.state), *self.args, *extra)

    def stop(self) -> None:
        self._cli("unmount", str(self.root), timeout=120)

    @staticmethod
    def _cli(*args: str, timeout: float = 300) -> None:
        done = aiosfs_cli(*args, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"aiosfs {args[0]} failed ({done.returncode}): {done.stderr.strip()[-500:]}")

    def stats(self) -> dict[str, float]:
        return read_stats(self.root / "kernel" / "stats")

    def engine_pid(self) -> int | None:
        match = re.search(r"engine=ready pid=(\d+)", (self.root / "kernel" / "status").read_text())
        return int(match.group(1)) if match else None


def turn(agent: Path, question: str) -> dict[str, Any]:
    rec = request(agent, 0, json.dumps({"prompt": question, "max_tokens": 32, "temperature": 0}), False)
    if rec["error"]:
        raise RuntimeError(f"{agent.name}: {rec['error']}")
    return {"ttft_s": rec["first"] - rec["start"], "wall_s": rec["end"] - rec["start"]}


def fork(mount: Mount, parent: str, child: str) -> Path:
    """A new agent with the parent's config and context, copied by plain reads and writes."""
    source, target = mount.root / "agents" / parent, mount.root / "agents" / child
    target.mkdir()
    for name in ("config", "context"):
        (target / name).write_bytes((source / name).read_bytes())
    return target


def timed(mount: Mount, label: str, agents: list[Path], question: str) -> dict[str, Any]:
    """One turn of each agent, one at a time; their times and the engine's counters meanwhile."""
    before = mount.stats()
    times = [turn(agent, question) for agent in agents]
    after = mount.stats()
    keys = ("kv_restores", "kv_restore_tokens", "prompt_tokens", "shared_prefix_tokens", "prefix_hit_tokens")
    return {"label": label, "turns": times, **{key: int(after.get(key, 0) - before.get(key, 0)) for key in keys}}


def interrupt(mount: Mount, variant: str, kv_disk: list[str]) -> None:
    if variant == "crash":
        pid = mount.engine_pid()
        assert pid is not None, "no engine serves"
        os.kill(pid, signal.SIGSEGV)
        deadline = time.monotonic() + 120
        while mount.engine_pid() in (None, pid):
            if time.monotonic() > deadline:
                raise RuntimeError("the engine did not come back after SIGSEGV")
            time.sleep(0.05)
        return
    mount.stop()
    mount.start(kv_disk)


def run_variant(variant: str, args: argparse.Namespace, systems: list[str]) -> list[dict[str, Any]]:
    """Agents a0..aN-1 and the parents p (forked after the interruption) and, in `resume`,
    q (forked before it) take their turns; then the interruption and the timed turns."""
    base = Path(tempfile.mkdtemp(prefix=f"aiosfs-resume-{variant}-"))
    mount = Mount(base, args.mount_args)
    kv_disk = ["--kv-disk", "0"] if variant == "cold" else []
    mount.start(kv_disk)
    results: list[dict[str, Any]] = []
    try:
        names = [f"a{i}" for i in range(args.agents)] + ["p"] + (["q"] if variant == "resume" else [])
        for name, system in zip(names, systems, strict=False):
            (mount.root / "agents" / name).mkdir()
            (mount.root / "agents" / name / "config").write_text(f"system={system}\ntemperature=0\n")
        for t in range(args.turns):
            for name in names:
                turn(mount.root / "agents" / name, f"A customer asks question {t + 1} about {TOPICS[t % len(TOPICS)]}. What do you answer?")
        if variant == "resume":
            results.append(timed(mount, "fork-live", [fork(mount, "q", "live")], FORK_QUESTION))
        interrupt(mount, variant, kv_disk)
        results.append(timed(mount, f"fork-{variant}", [fork(mount, "p", "forked")], FORK_QUESTION))
        agents = [mount.root / "agents" / name for name in names[: args.agents]]
        results.append(timed(mount, variant, agents, "Please summarise your last answer in five words."))
    finally:
        try:
            mount.stop()
        finally:
            shutil.rmtree(base, ignore_errors=True)
    return results


def medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per label: median TTFT and wall time over its turns, summed counters per
    turn, and the TTFT against cold's (fork-cold's for forks)."""
    rows: dict[str, dict[str, Any]] = {}
    for run in runs:
        row = rows.setdefault(run["label"], {"label": run["label"], "turns": [], "kv_restores": 0, "kv_restore_tokens": 0, "prompt_tokens": 0})
        row["turns"] += run["turns"]
        for key in ("kv_restores", "kv_restore_tokens", "prompt_tokens"):
            row[key] += run[key]
    out = []
    for row in rows.values():
        n = len(row["turns"])
        out.append(
            {
                "label": row["label"],
                "turns": n,
                "ttft_s": statistics.median(t["ttft_s"] for t in row["turns"]),
                "wall_s": statistics.median(t["wall_s"] for t in row["turns"]),
                "restores_per_turn": row["kv_restores"] / n,
                "restored_tokens_per_turn": row["kv_restore_tokens"] / n,
                "prefilled_tokens_per_turn": row["prompt_tokens"] / n,
            }
        )
    ttft = {row["label"]: row["ttft_s"] for row in out}
    for row in out:
        base = ttft.get("fork-cold" if row["label"].startswith("fork") else "cold")
        row["speedup_ttft"] = round(base / row["ttft_s"], 1) if base and row["ttft_s"] else None
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| turn after | turns | TTFT s (median) | wall s (median) | TTFT vs cold | restores/turn | restored tokens/turn | prefilled tokens/turn |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = {label: i for i, label in enumerate(["resume", "crash", "cold", "fork-live", "fork-resume", "fork-crash", "fork-cold"])}
    for r in sorted(rows, key=lambda r: order.get(r["label"], 99)):
        lines.append(
            f"| {r['label']} | {r['turns']} | {r['ttft_s']:.3f} | {r['wall_s']:.3f} | {r['speedup_ttft'] or '-'}x | "
            f"{r['restores_per_turn']:.2f} | {r['restored_tokens_per_turn']:.0f} | {r['prefilled_tokens_per_turn']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench resume", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=4, help="agents, each with a system prompt of its own (default: 4)")
    p.add_argument("--system-tokens", type=int, default=1600, help="tokens of each agent's system prompt (default: 1600)")
    p.add_argument("--turns", type=int, default=2, help="turns each agent takes before the interruption (default: 2)")
    p.add_argument("--reps", type=int, default=1, help="repetitions of every variant, interleaved (default: 1)")
    p.add_argument("--threads", type=int, default=2, help="the mount's --threads (default: 2)")
    p.add_argument("--model", type=Path, default=None, help="GGUF model (default: the embedded model)")
    p.add_argument("--backend", choices=["llama", "fake"], default="llama", help="fake: the kernel's test model, no weights (the quick test)")
    p.add_argument("--quick", action="store_true", help="2 agents, 400-token system prompts, 1 turn: a smoke run")
    p.add_argument("--json", type=Path, default=None, help="write every run and the medians here")
    args = p.parse_args(argv)
    if args.quick:
        args.agents, args.system_tokens, args.turns = 2, 400, 1
    args.mount_args = ["--threads", str(args.threads), "--slots", str(args.agents + 4)]  # every agent, parent and fork keeps its cells
    if args.backend == "fake":
        args.mount_args += ["--backend", "fake", "--fake-delay", "0.002"]
        count: Any = len  # the fake model's tokens are bytes
    else:
        from setup.model import default_model_path

        from .workloads import Vocab

        model = args.model or default_model_path()
        args.mount_args += ["--model", str(model)]
        count = Vocab(model).count
    systems = [system_prompt(seed, args.system_tokens, count) for seed in range(args.agents + 2)]  # the agents', then p's and q's
    runs: list[dict[str, Any]] = []
    for rep in range(args.reps):
        for variant in VARIANTS:
            err(f"resume: rep {rep + 1}/{args.reps}, {variant}: {args.agents} agents, {args.turns} turns, ~{args.system_tokens}-token system prompts")
            for result in run_variant(variant, args, systems):
                runs.append({**result, "rep": rep + 1})
                ttfts = ", ".join(f"{t['ttft_s']:.3f}" for t in result["turns"])
                err(f"  {result['label']}: TTFT {ttfts} s; {result['kv_restores']} restores, {result['prompt_tokens']} tokens prefilled")
    rows = medians(runs)
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": runs, "medians": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
