"""The GPU check's results as markdown: the steps and their verdicts, then a table for
each question (token identity, prefill chunks, throughput and the host's share of a
step), ready to paste into docs/benchmarks.md."""

from __future__ import annotations

from typing import Any

STEPS = ("build", "offload", "identity", "speed")


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(results: dict[str, Any]) -> str:
    steps = results.get("steps", {})
    machine = results.get("machine", {})
    gpus = ", ".join(machine.get("gpus", [])) or "none"
    model = results.get("model", {})
    lines = [
        f"# GPU check ({results.get('mode')}{', quick' if results.get('quick') else ''}), {results.get('date')}",
        "",
        f"GPU: {gpus}; CPU: {machine.get('cpu')} ({machine.get('cores')} cores, {results.get('threads')} used by llama.cpp); "
        f"Python {machine.get('python')}; wall {results.get('wall_s')} s of a {results.get('budget_s')} s budget.",
        f"Model: {model.get('path')} ({model.get('bytes', 0) / 1e6:.1f} MB){'; ' + model['note'] if model.get('note') else ''}.",
        "",
        "| step | verdict | detail |",
        "|---|---|---|",
    ]
    for name in STEPS:
        step = steps.get(name)
        if step is None:
            lines.append(f"| {name} | not reached | |")
        else:
            lines.append(f"| {name} | {step['verdict']} | {str(step.get('detail', '')).replace('|', '/')} |")
    excerpt = (steps.get("build") or {}).get("log_excerpt")
    if excerpt:
        lines += ["", "The build log's first error:", "", "```", excerpt, "```"]
    lines += _identity(steps.get("identity")) + _speed(steps.get("speed"))
    return "\n".join(lines) + "\n"


def _identity(step: dict[str, Any] | None) -> list[str]:
    if not step or step.get("verdict") == "skipped":
        return []
    lines = [
        "",
        f"## Token identity, KV sharing on and off ({step.get('tokens')} greedy tokens an answer)",
        "",
        "| sequences | identical | shared-prefix hits (on) | tokens shared (on) | prompt tokens on / off | differing answers |",
        "|---:|---|---:|---:|---|---|",
    ]
    for run in step.get("runs", []):
        if "error" in run:
            lines.append(f"| {run['sequences']} | {run['error']} | | | | |")
            continue
        on, off = run["on"]["stats"], run["off"]["stats"]
        lines.append(
            f"| {run['sequences']} | {_fmt(run['identical'])} | {_fmt(on.get('shared_prefix_hits'))} | {_fmt(on.get('shared_prefix_tokens'))} | "
            f"{_fmt(on.get('prompt_tokens'))} / {_fmt(off.get('prompt_tokens'))} | {run['differing_answers'] or '-'} |"
        )
    tiles = step.get("tiles", {})
    lines += ["", f"## Prefill in chunks against one ubatch: the tile rule {tiles.get('verdict')}", ""]
    if "rows" not in tiles:
        return [*lines, f"Not measured: {tiles.get('error')}"]
    lines += [
        f"{tiles['prompt_tokens']} prompt tokens; the last token's logits and {tiles['greedy_steps']} greedy tokens after them, "
        f"against the whole prompt in one ubatch. CPU rule: whole {tiles['cpu_tile']}-row tiles; measured here: "
        f"{tiles.get('tile_measured') or 'no chunk size'} (the smallest size whose every multiple tried is identical).",
        "",
        "| chunk rows | logits identical | max abs diff | greedy identical |",
        "|---:|---|---:|---|",
    ]
    for r in tiles["rows"]:
        lines.append(f"| {r['chunk']} | {_fmt(r['logits_identical'])} | {r['max_abs_diff']:g} | {_fmt(r['greedy_identical'])} |")
    company = tiles.get("batch") or []
    if company:
        lines += [
            "",
            f"One sequence's decode ({tiles['prompt_tokens']}-token prompt, then greedy) against the same sequence decoded alone:",
            "",
            "| sharing its ubatch | steps with bit-identical logits | greedy identical |",
            "|---|---:|---|",
        ]
        for c in company:
            lines.append(f"| {c['company']} | {c['logits_identical_steps']} of {c['steps']} | {_fmt(c['greedy_identical'])} |")
    return lines


def _speed(step: dict[str, Any] | None) -> list[str]:
    if not step or step.get("verdict") == "skipped":
        return []
    lines = [
        "",
        "## Throughput: decode-heavy (prompts of ~32 tokens, 128 generated, greedy), one request per agent",
        "",
        f"llama-server: {step.get('llama_server')}. Tok/s as the bench counts them (docs/benchmarks.md): raw-batched over its decode "
        "steps only, the others from the release of all agents to the last token; decode ms/step is llama_decode's time, the host's "
        "parts are the aiosfs kernel's counters per engine step.",
        "",
        "| peer | B | tok/s | decode ms/step | host ms/step: plan+ipc | runner py | sample | deliver | step ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in step.get("rows", []):
        if r.get("failure"):
            lines.append(f"| {r['peer']} | {r['B']} | failed: {r['failure']} | | | | | | |")
            continue
        done = f" ({r['incomplete']})" if r.get("incomplete") else ""
        lines.append(
            f"| {r['peer']} | {r['B']} | {_fmt(r.get('tok_s'), 0)}{done} | {_fmt(r.get('decode_ms'))} | {_fmt(r.get('plan_ipc_ms'), 3)} | "
            f"{_fmt(r.get('runner_python_ms'), 3)} | {_fmt(r.get('sample_ms'), 3)} | {_fmt(r.get('deliver_ms'), 3)} | {_fmt(r.get('step_ms'), 3)} |"
        )
    ceiling = step.get("ceiling", [])
    if ceiling:
        lines += [
            "",
            "Host ceiling (bench.hostceiling in-process, the fake model at zero delay: every millisecond is the host's):",
            "",
            "| agents | steps/s | tok/s | step ms | plan+ipc | runner py | sample | deliver |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in ceiling:
            if c.get("failure"):
                lines.append(f"| {c['agents']} | failed: {c['failure']} | | | | | | |")
                continue
            h = c["host_ms"]
            lines.append(
                f"| {c['agents']} | {c['steps_per_s']:.0f} | {c['tok_s']:.0f} | {c['step_ms']:.3f} | {_fmt(h.get('plan_ipc_s'), 3)} | "
                f"{_fmt(h.get('runner_python_s'), 3)} | {_fmt(h.get('sample_s'), 3)} | {_fmt(h.get('deliver_s'), 3)} |"
            )
    return lines
