"""The results: DIR/results.md (the tables), DIR/throughput.png, and --report."""

from __future__ import annotations

import contextlib
import json
import os
import platform
from pathlib import Path
from typing import Any

from .console import err, fmt, pct
from .stats import CALIB_TOLERANCE, FOREIGN_TOLERANCE, medians
from .workloads import HIGH_DELAY_S, HIGH_PRIORITY, KERNEL_SLOTS, PEERS, WORKLOADS, Calibrator, Workload


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any], skipped: list[str]) -> str:
    lines = [
        f"# aiosfs benchmark, {meta['date']}",
        "",
        f"Machine: {meta['machine']}. Model: `{Path(meta['model']).name}`. Threads: {meta['threads']}. "
        f"Repetitions: {meta['reps']} (medians). Command: `{meta['command']}`",
        "",
        f"aiosfs peers: scheduler {_scheduler_text(meta.get('scheduler'))}, {_slots_text(meta.get('slots'))}"
        + " (--scheduler, --slots; llama-server always runs with -np N, raw-batched with N sequences).",
        "",
    ]
    if meta.get("calib_median"):
        lines += [
            f"Calibration (one sequence, {Calibrator.TOKENS} greedy tokens, before every run): median {meta['calib_median']} tok/s, "
            f"range {meta['calib_min']}–{meta['calib_max']}. A run is noisy when its calibration is off by more than "
            f"{CALIB_TOLERANCE:.0%} or other processes used more than {FOREIGN_TOLERANCE:.0%} of the CPUs while it measured "
            '(column "others", the largest share among the repetitions kept); noisy runs are dropped when another repetition is left.',
            "",
        ]
    for workload in dict.fromkeys(r["workload"] for r in rows):
        w = WORKLOADS[workload]
        group = [r for r in rows if r["workload"] == workload]
        lines += priority_table(w, group) if w.priority else workload_table(w, group)
        lines.append("")
    kernel_rows = [r for r in rows if r["mean_batch"] is not None]
    if kernel_rows:
        lines += [
            "### aiosfs kernel counters (from `kernel/stats`, medians over repetitions)",
            "",
            "| workload | agents | peer | scheduler, slots | tokens per step | sequences sampled per step | ms in `llama_decode` per step "
            "| engine Python ms per step | wall ms outside `llama_decode` per step | share of wall in `llama_decode` "
            "| tok/s inside `llama_decode` | prefix-hit tokens | preemptions |",
            "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in kernel_rows:
            policy = f"{r.get('scheduler') or '–'}, {r.get('slots') or '–'}"
            lines.append(
                f"| {r['workload']} | {r['agents']} | {r['peer']} | {policy} | {fmt(r['mean_batch'], 1)} | {fmt(r['seqs_per_step'], 1)} | "
                f"{fmt(r['ms_per_step'])} | {fmt(r['engine_py_ms_per_step'], 3)} | {fmt(r['overhead_ms_per_step'])} | {fmt(r['decode_share'])} | "
                f"{fmt(r['decode_tok_s'], 1)} | {fmt(r['prefix_hit_tokens'], 0)} | {fmt(r['preemptions'], 0)} |"
            )
        lines.append("")
    for note in skipped:
        lines.append(f"\nSkipped: {note}")
    return "\n".join(lines) + "\n"


def _slots_text(slots: int | None) -> str:
    if slots is None:
        return "one KV slot per agent"
    if slots == KERNEL_SLOTS:
        return "the kernel's default KV slots (what each run got: the counters' table)"
    return f"{slots} KV slots"


def _scheduler_text(spec: str | None) -> str:
    if spec:
        return f"`{spec}`"
    return "the kernel's default (`fifo`; `priority` in the priority workload)"


def _flags(r: dict[str, Any]) -> str:
    """Errors, incomplete and noisy runs, after the peer's name."""
    flag = ""
    if r["errors"] or r["incomplete"]:
        flag = f" ⚠ {r['errors']} errors, {r['incomplete']} incomplete runs"
    if r["calib_off"]:
        flag += " ⚠ noisy"
    return flag


def _reps(r: dict[str, Any]) -> str:
    return f"{r['reps']}" + (f" (+{r['dropped']} dropped)" if r["dropped"] else "")


def workload_table(w: Workload, rows: list[dict[str, Any]]) -> list[str]:
    reuse = any(r["peer"] == "aiosfs-noreuse" for r in rows)  # the column "× no reuse" when that peer ran
    raw = any(r["peer"] == "raw-batched" for r in rows)  # the column "× raw" when the ceiling ran
    system = ""
    if w.system_tokens:
        system = f" after a ~{w.system_tokens}-token system prompt" + (
            ", turns kept" if w.multi_turn else " shared by all agents, each request alone"
        )
    lines = [f"## {w.name} (prompt {w.user_text} user tokens{system}, {w.max_tokens} generated)", ""]
    if raw:
        lines += [
            "raw-batched: llama.cpp's batched decode with no server (the kernel's backend, N sequences in every step); "
            "its tok/s counts its decode steps only (prefills outside), its TTFT is the end of its prompt's prefill, the prompts "
            "prefilled one after another. × raw: a peer's tok/s divided by raw-batched's, same N.",
            "",
        ]
    if reuse:
        lines += ["× no reuse: the aiosfs peer's tok/s divided by aiosfs-noreuse's (the same kernel with KV reuse turned off), same N.", ""]
    lines += [
        "| agents | peer | tok/s |"
        + (" × raw |" if raw else "")
        + " × naive | × llama-server |"
        + (" × no reuse |" if reuse else "")
        + " latency p50 (s) | p99 (s) | p99/p50 | TTFT p50 (s) | TTFT p99 (s) | Jain | tokens per step | others | reps |",
        "|---:|---|---:|" + ("---:|" if raw else "") + "---:|---:|" + ("---:|" if reuse else "") + "---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['agents']} | {r['peer']}{_flags(r)} | {fmt(r['tok_s'], 1)} | "
            + (f"{fmt(r.get('vs_raw-batched'))} | " if raw else "")
            + f"{fmt(r['vs_naive'])} | {fmt(r['vs_llama-server'])} | "
            + (f"{fmt(r.get('vs_noreuse'))} | " if reuse else "")
            + f"{fmt(r['lat_p50'])} | {fmt(r['lat_p99'])} | {fmt(r.get('p99_p50'))} | {fmt(r['ttft_p50'])} | {fmt(r['ttft_p99'])} | "
            f"{fmt(r['jain'], 3)} | {fmt(r['mean_batch'], 1)} | {pct(r['foreign_cpu'])} | {_reps(r)} |"
        )
    return lines


def priority_table(w: Workload, rows: list[dict[str, Any]]) -> list[str]:
    return [
        f"## {w.name} (one high-priority agent among N−1 busy ones; prompt {w.user_text} user tokens, {w.max_tokens} generated)",
        "",
        f"Agent 0 (`priority={HIGH_PRIORITY}` on the aiosfs peers, the others 0; the other peers have no priorities) starts "
        f"{HIGH_DELAY_S:g} s after the busy agents and runs its requests; the busy agents start no new request once it is done. "
        "× unloaded: its latency p50 divided by the same peer's at N=1. Busy agents tok/s: their generated tokens from the start "
        "to their last finished request.",
        "",
        "| agents | peer | high-priority latency p50 (s) | × unloaded (N=1) | high-priority p99 (s) | busy agents tok/s | tok/s (all) | others | reps |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ] + [
        f"| {r['agents']} | {r['peer']}{_flags(r)} | {fmt(r.get('high_lat_p50'))} | {fmt(r.get('vs_unloaded'))} | {fmt(r.get('high_lat_p99'))} | "
        f"{fmt(r.get('busy_tok_s'), 1)} | {fmt(r['tok_s'], 1)} | {pct(r['foreign_cpu'])} | {_reps(r)} |"
        for r in rows
    ]


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        err("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return False
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    if not workloads:
        return False
    fig, axes = plt.subplots(len(workloads), 2, figsize=(11, 4 * len(workloads)), squeeze=False)
    for i, workload in enumerate(workloads):
        panels = (("tok_s", "generated tokens/s (total)"), ("lat_p99", "request latency p99 (s)"))
        if WORKLOADS[workload].priority:
            panels = (("busy_tok_s", "busy agents' tokens/s"), ("high_lat_p50", "high-priority latency p50 (s)"))
        for j, (key, label) in enumerate(panels):
            ax = axes[i][j]
            for peer in PEERS:
                points = sorted((r["agents"], r[key]) for r in rows if r["workload"] == workload and r["peer"] == peer and r[key] is not None)
                if points:
                    raw = peer == "raw-batched"  # the ceiling, dashed: no server, its tok/s over decode steps only
                    name = f"{peer} (decode steps only)" if raw and key == "tok_s" else peer
                    ax.plot([p[0] for p in points], [p[1] for p in points], "--" if raw else "-", marker="o", label=name)
            ax.set_xscale("log", base=2)
            ns = sorted({r["agents"] for r in rows if r["workload"] == workload})
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.set_xlabel("agents (N)")
            ax.set_ylabel(label)
            ax.set_title(f"{workload}: {label}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = ""
    with contextlib.suppress(OSError):
        text = open("/proc/cpuinfo").read()
        flags = "AVX-512" if "avx512f" in text else ("AVX2" if "avx2" in text else "no AVX2")
    mem = ""
    with contextlib.suppress(OSError):
        kb = int(open("/proc/meminfo").readline().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    return f"{cpu}, {os.cpu_count()} cores ({flags}){mem}, Linux {platform.release()}, Python {platform.python_version()}"


def report(out_dir: Path) -> int:
    """Render the table and the plot again from a results.json (medians recomputed)."""
    data = json.loads((out_dir / "results.json").read_text())
    rows = medians(data["runs"])
    meta = data["meta"]
    if meta.get("calib_median"):
        meta["calib_median"] = round(meta["calib_median"], 1)
    table = markdown(rows, meta, data.get("skipped", []))
    (out_dir / "results.md").write_text(table)
    plot(rows, out_dir / "throughput.png")
    print(table)
    return 0
