"""The benchmark (`bench`, run as scripts/bench): its pure helpers, the mount peer's
client program, and the whole bench end to end on the kernel's fake backend (`--fake`:
no model, a few seconds)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from mounting import needs_fuse, troubles

from bench import mount_client
from bench.report import markdown
from bench.stats import Record, jain, medians, percentile, summarize
from bench.workloads import BUSY_FACTOR, WORKLOADS, FakeVocab, Workload, context_per_sequence, make_plan
from kernel import params

ROOT = Path(__file__).resolve().parent.parent


# -- metrics ----------------------------------------------------------------------------------------
def test_percentile_interpolates_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 100) == 4.0
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_jain_is_one_when_fair_and_one_over_n_when_one_agent_gets_all() -> None:
    assert jain([5.0, 5.0, 5.0]) == pytest.approx(1.0)
    assert jain([8.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    assert jain([1.0, 3.0]) == pytest.approx(0.8)
    assert jain([]) is None
    assert jain([0.0, 0.0]) is None


def test_summarize_counts_tokens_over_the_wall_time() -> None:
    records = [
        Record(0, 0, 100.0, 101.0, 100.2, 10),
        Record(0, 1, 101.0, 102.0, 101.1, 10),
        Record(1, 0, 100.0, 102.0, 100.5, 20),
        Record(1, 1, 102.0, 102.5, error="boom"),
    ]
    s = summarize(records, 100.0, 2, 4)
    assert (s["requests"], s["n_errors"], s["errors"]) == (3, 1, ["boom"])
    assert s["tokens"] == 40
    assert s["wall_s"] == 2.5  # the failed request ends the run too
    assert s["tok_s"] == 16.0
    assert s["per_agent_tok_s"] == [10.0, 10.0]
    assert s["jain"] == 1.0
    assert s["lat_p50"] == 1.0


def test_summarize_priority_reports_agent_zero_and_the_busy_ones() -> None:
    records = [Record(0, 0, 101.0, 102.0, None, 8), Record(1, 0, 100.0, 104.0, None, 40)]
    s = summarize(records, 100.0, 2, 1, priority=True)
    assert (s["high_requests"], s["high_lat_p50"]) == (1, 1.0)
    assert (s["busy_requests"], s["busy_tok_s"]) == (1, 10.0)


def test_medians_make_one_row_per_peer_and_n_with_ratios_to_naive() -> None:
    def run(peer: str, tok_s: float, rep: int) -> dict[str, Any]:
        summary = {"tok_s": tok_s, "lat_p50": 1.0, "lat_p99": 2.0, "n_errors": 0, "requests": 4, "expected_requests": 4}
        return {"workload": "decode-heavy", "agents": 4, "peer": peer, "rep": rep, "summary": summary, "calib_tok_s": 100.0, "extra": {}}

    runs = [run("naive", 10.0, 1), run("naive", 30.0, 2), run("aiosfs-inproc", 40.0, 1), run("aiosfs-inproc", 60.0, 2), run("aiosfs-inproc", 80.0, 3)]
    rows = medians(runs)
    assert [(r["peer"], r["reps"], r["tok_s"]) for r in rows] == [("naive", 2, 20.0), ("aiosfs-inproc", 3, 60.0)]
    assert rows[1]["vs_naive"] == 3.0
    assert rows[1]["p99_p50"] == 2.0


def test_the_tables_show_the_raw_ceiling_and_each_peers_share_of_it() -> None:
    def run(peer: str, tok_s: float) -> dict[str, Any]:
        summary = {"tok_s": tok_s, "lat_p50": 1.0, "lat_p99": 2.0, "ttft_p50": 0.5, "n_errors": 0, "requests": 4, "expected_requests": 4}
        return {"workload": "shared-prefix", "agents": 4, "peer": peer, "rep": 1, "summary": summary, "calib_tok_s": None, "extra": {}}

    rows = medians([run("aiosfs-mount", 30.0), run("raw-batched", 120.0)])
    assert [r["peer"] for r in rows] == ["raw-batched", "aiosfs-mount"]  # the ceiling first
    assert rows[1]["vs_raw-batched"] == 0.25
    meta = {"date": "today", "machine": "m", "model": "/m.gguf", "threads": 2, "reps": 1, "command": "c", "scheduler": None, "slots": None}
    table = markdown(rows, meta, [])
    assert (
        "## shared-prefix (prompt 16–24 user tokens after a ~1600-token system prompt shared by all agents, each request alone, 32 generated)"
        in table
    )
    assert "| agents | peer | tok/s | × raw |" in table
    assert "| 4 | raw-batched | 120.0 | 1.00 |" in table and "| 4 | aiosfs-mount | 30.0 | 0.25 |" in table


# -- workloads ---------------------------------------------------------------------------------------
def test_plans_are_the_same_for_the_same_seed_and_differ_for_another() -> None:
    w = WORKLOADS["decode-heavy"]
    a, b, c = (make_plan(FakeVocab(), w, 3, 2, seed) for seed in (1, 1, 2))
    assert a == b
    assert a.messages != c.messages
    assert [len(m) for m in a.messages] == [2, 2, 2]
    assert all(len(text) == w.user_tokens + 1 for m in a.messages for text in m)  # n fake tokens and a full stop
    assert len({text for m in a.messages for text in m}) == 6


def test_priority_plans_give_the_busy_agents_more_requests() -> None:
    w = WORKLOADS["priority"]
    plan = make_plan(FakeVocab(), w, 3, 2, 1)
    assert [len(m) for m in plan.messages] == [2, 2 * BUSY_FACTOR, 2 * BUSY_FACTOR]
    assert (plan.start_delay(0), plan.start_delay(1)) == (1.0, 0.0)
    assert (plan.priority_of(0), plan.priority_of(1), plan.busy(0), plan.busy(1)) == (9, 0, False, True)


def test_fake_vocab_texts_are_seeded() -> None:
    texts = [FakeVocab().text(random.Random(7), 40) for _ in range(2)]
    assert texts[0] == texts[1]
    assert texts[0][0].isupper() and texts[0].endswith(".")


def test_shared_prefix_plans_share_a_long_system_prompt_and_vary_the_questions() -> None:
    w = WORKLOADS["shared-prefix"]
    plan = make_plan(FakeVocab(), w, 16, w.requests, 1)
    assert (w.max_tokens, w.multi_turn, w.requests) == (32, False, 2)
    assert len(plan.system) in (1600, 1601)  # one system prompt for all: n fake tokens (a space stripped) and a full stop
    questions = [text for m in plan.messages for text in m]
    assert len(questions) == 32 and len(set(questions)) == 32  # one per agent and round
    assert all(16 <= len(q) <= 24 + 1 for q in questions) and len({len(q) for q in questions}) > 1  # 16 to 24 fake tokens
    assert context_per_sequence(w, 2) >= 1600 + 24 + 32 + 64  # system, question, answer and the template fit
    assert plan.warm_system != plan.system and len(plan.warm_system) < 100  # the warm-up caches none of it
    other = make_plan(FakeVocab(), WORKLOADS["multi-turn"], 2, 2, 1)
    assert other.warm_system == other.system  # elsewhere the warm-up is the measured requests' kind


def test_context_per_sequence_grows_with_turns() -> None:
    assert context_per_sequence(WORKLOADS["decode-heavy"], 4) == 512
    multi = WORKLOADS["multi-turn"]
    assert context_per_sequence(multi, 8) > context_per_sequence(multi, 2)
    assert context_per_sequence(multi, 4) % 256 == 0


# -- the mount peer's client program -----------------------------------------------------------------
def test_mount_client_runs_its_requests_on_an_agent_directory(tmp_path: Path) -> None:
    """A plain directory stands in for the agent: the client writes `prompt`, reads
    `output` and `status`, resets through `ctl`, and prints a record per request."""
    for name, text in (("prompt", ""), ("output", "hello world"), ("status", "done 3 tokens\n"), ("ctl", "")):
        (tmp_path / name).write_text(text)
    plan = {"requests": ['{"prompt": "a"}', '{"prompt": "b"}'], "reset": True, "deadline": time.time() + 60, "delay": 0, "stop": ""}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    cmd = [sys.executable, "-m", "bench.mount_client", str(tmp_path), str(tmp_path / "plan.json")]
    result = subprocess.run(cmd, input="go\n", capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "ready"
    records = json.loads(lines[-1])
    assert [(r["index"], r["bytes"], r["status"], r["error"]) for r in records] == [(0, 11, "done 3 tokens", ""), (1, 11, "done 3 tokens", "")]
    assert result.stderr == "xx"
    assert (tmp_path / "prompt").read_text() == '{"prompt": "b"}'
    assert (tmp_path / "ctl").read_text() == "reset\n"


def test_mount_client_stops_at_an_error_and_at_the_stop_file(tmp_path: Path) -> None:
    (tmp_path / "prompt").write_text("")
    (tmp_path / "output").write_text("x")
    (tmp_path / "status").write_text("failed: no\n")
    plan = {"requests": ["a", "b"], "reset": False, "deadline": time.time() + 60, "delay": 0, "stop": ""}
    records = mount_client.run(tmp_path, plan)
    assert [(r["index"], r["error"]) for r in records] == [(0, "status: failed: no")]
    (tmp_path / "stop").touch()
    assert mount_client.run(tmp_path, {**plan, "stop": str(tmp_path / "stop")}) == []


# -- the whole bench, on the fake backend -------------------------------------------------------------
def bench(out: Path, *args: str) -> dict[str, Any]:
    """scripts/bench --fake ARGS from another directory; results.json."""
    cmd = [str(ROOT / "scripts" / "bench"), "--fake", "--reps", "1", "--requests", "2", "--wait-quiet", "0", "--run-timeout", "60", "--out", str(out)]
    result = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=240, cwd=out.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| agents | peer | tok/s |" in result.stdout  # the table is printed
    data: dict[str, Any] = json.loads((out / "results.json").read_text())
    assert not [r for r in data["runs"] if "failure" in r]
    return data


def check_rows(data: dict[str, Any], expected: set[tuple[str, int, str]], max_tokens: dict[str, int]) -> None:
    rows = data["medians"]
    assert {(r["workload"], r["agents"], r["peer"]) for r in rows} == expected
    assert len(rows) == len(expected)  # one row per workload, N and peer
    for row in rows:
        assert row["tok_s"] > 0 and row["lat_p50"] > 0 and row["jain"] > 0.5
        assert (row["errors"], row["incomplete"]) == (0, 0)
    for run in data["runs"]:
        n, summary = run["agents"], run["summary"]
        assert summary["requests"] == n * 2
        assert summary["tokens"] == n * 2 * max_tokens[run["workload"]]  # end-of-generation suppressed: every request runs to max_tokens


def test_bench_runs_the_inproc_peers_on_the_fake_backend(tmp_path: Path) -> None:
    out = tmp_path / "results"
    data = bench(out, "--workloads", "decode-heavy,multi-turn", "--agents", "1,2", "--peers", "aiosfs-inproc,aiosfs-noreuse,naive")
    peers = ("aiosfs-inproc", "aiosfs-noreuse")
    expected = {(w, n, p) for w in ("decode-heavy", "multi-turn") for n in (1, 2) for p in peers}
    check_rows(data, expected, {"decode-heavy": 128, "multi-turn": 64})
    assert data["skipped"] == ["naive: --fake runs only the aiosfs peers"]
    kv = {(r["workload"], r["agents"], r["peer"]): r["prefix_hit_tokens"] for r in data["medians"]}
    assert kv[("multi-turn", 2, "aiosfs-inproc")] > kv[("multi-turn", 2, "aiosfs-noreuse")]  # KV reuse keeps the turns
    table = (out / "results.md").read_text()
    assert "| 2 | aiosfs-inproc |" in table and "× no reuse" in table
    (out / "results.md").unlink()
    result = subprocess.run([str(ROOT / "scripts" / "bench"), "--report", str(out)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (out / "results.md").read_text() == table


@pytest.mark.mount
@needs_fuse
def test_bench_runs_the_mount_peer_on_the_fake_backend(tmp_path: Path) -> None:
    out = tmp_path / "results"
    data = bench(out, "--workloads", "decode-heavy", "--agents", "1,2", "--peers", "aiosfs-mount")
    check_rows(data, {("decode-heavy", n, "aiosfs-mount") for n in (1, 2)}, {"decode-heavy": 128})
    for run in data["runs"]:
        assert run["extra"]["argv"].endswith("--backend fake")
        assert run["extra"]["kernel"]["generated"] >= run["summary"]["tokens"]
    logs = sorted((out / "logs").glob("*-aiosfs-mount.log"))
    assert len(logs) == 2
    for log in logs:  # what `mounted()` checks at teardown: the daemon logged no error
        assert troubles(log.read_text(), []) == []


@pytest.mark.mount
@needs_fuse
def test_bench_runs_the_aios_api_peer_on_the_fake_backend(tmp_path: Path) -> None:
    out = tmp_path / "results"
    data = bench(out, "--workloads", "multi-turn", "--agents", "2", "--requests", "2", "--peers", "aiosfs-aios-api")
    check_rows(data, {("multi-turn", 2, "aiosfs-aios-api")}, {"multi-turn": 64})
    [run] = data["runs"]
    assert run["extra"]["kernel"]["generated"] >= run["summary"]["tokens"] > 0  # every answer went through the gateway to the kernel
    [log] = (out / "logs").glob("*-aiosfs-aios-api.log")
    assert "serving" in log.read_text() and "Traceback" not in log.read_text()


def test_bench_runs_the_shared_prefix_workload_on_the_fake_backend_with_the_kernels_slots(tmp_path: Path) -> None:
    """Every agent sends the same ~1600-token system prompt and its own question, each
    request alone; `--slots default` leaves the slots to the kernel and records them."""
    out = tmp_path / "results"
    data = bench(out, "--workloads", "shared-prefix", "--agents", "2", "--peers", "aiosfs-inproc", "--slots", "default")
    check_rows(data, {("shared-prefix", 2, "aiosfs-inproc")}, {"shared-prefix": 32})
    (run,) = data["runs"]
    prompts = [r["prompt_tokens"] for r in run["records"]]
    assert len(prompts) == 4 and all(1600 < n < 1700 for n in prompts)  # system + question: no earlier turn kept
    assert run["extra"]["slots"] == params.DEFAULT_SLOTS  # what the fake backend ran without --slots
    assert data["meta"]["slots"] == 0
    table = (out / "results.md").read_text()
    assert "## shared-prefix (prompt 16–24 user tokens after a ~1600-token system prompt shared by all agents" in table
    assert "the kernel's default KV slots" in table and "| shared-prefix | 2 | aiosfs-inproc | fifo, 8 |" in table


@pytest.mark.mount
@needs_fuse
def test_bench_runs_the_shared_prefix_workload_through_the_mount(tmp_path: Path) -> None:
    out = tmp_path / "results"
    data = bench(out, "--workloads", "shared-prefix", "--agents", "2", "--peers", "aiosfs-mount", "--slots", "default")
    check_rows(data, {("shared-prefix", 2, "aiosfs-mount")}, {"shared-prefix": 32})
    (run,) = data["runs"]
    assert "--slots" not in run["extra"]["argv"] and "--ctx 1792" in run["extra"]["argv"]
    assert run["extra"]["slots"] == params.DEFAULT_SLOTS  # read back from the mount's `mounted ...` line
    assert run["summary"]["ttft_p50"] > 0


# -- the raw batched-decode peer, on the embedded model -------------------------------------------------
def test_raw_batched_decodes_every_sequence_in_every_step(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two agents, two rounds of 6 tokens: each round prefills both prompts, then decodes
    6 steps with both sequences in every batch; tok/s counts those steps only."""
    from bench.load import Cell
    from bench.peers import raw

    w = Workload("tiny", 0, 8, 6, False, 2)
    plan = make_plan(FakeVocab(), w, 2, 2, 1)
    plan.ctx = 256
    batches: list[list[tuple[int, int, bool]]] = []
    make = raw.make_raw_backend

    def recording(cell: Cell) -> Any:
        backend = make(cell)
        decode = backend.decode

        def record(entries: list[Any]) -> int:
            batches.append([(e.seq, e.pos, e.logits) for e in entries])
            return int(decode(entries))

        backend.decode = record
        return backend

    monkeypatch.setattr(raw, "make_raw_backend", recording)

    class Count:
        n = 0

        def add(self, n: int = 1) -> None:
            self.n += n

    count = Count()
    cell = Cell(plan, model, 2, time.time() + 120, 120, tmp_path, "raw", count, [])
    records, started = raw.run_raw_batched(cell)
    assert sorted((r.agent, r.index) for r in records) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert count.n == 4
    for r in records:
        assert (r.tokens, r.error) == (6, "")
        assert r.prompt_tokens is not None and r.prompt_tokens > 8  # template, system and message
        assert r.first is not None and started <= r.start < r.first < r.end  # the first token at the end of its prefill
    steps = [b for b in batches if len(b) == 2 and all(logits for _, _, logits in b)]
    assert len(steps) == 1 + 2 * 6  # the warm-up step, then max_tokens steps per round
    for step in steps[1:]:
        assert [seq for seq, _, _ in step] == [0, 1]  # every sequence, sorted by id
    prompt = {(r.agent, r.index): r.prompt_tokens for r in records}
    assert [pos for _, pos, _ in steps[1]] == [prompt[(0, 0)], prompt[(1, 0)]]  # the token after each prompt
    assert [pos for _, pos, _ in steps[6]] == [prompt[(0, 0)] + 5, prompt[(1, 0)] + 5]
    extra = cell.extra["raw"]
    assert (extra["rounds"], extra["decode_steps"], extra["decode_tokens"], extra["slots"]) == (2, 12, 24, 2)
    assert cell.extra["tok_s"] == pytest.approx(24 / extra["decode_s"], rel=0.01)


@needs_fuse
def test_host_ceiling_quick_runs_every_part_and_its_counts_add_up(tmp_path: Path) -> None:
    out = tmp_path / "host-ceiling.json"
    run = subprocess.run(
        [str(ROOT / "scripts" / "bench"), "host-ceiling", "--quick", "--json", str(out)], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr
    results = {r["kind"]: r for r in json.loads(out.read_text())}
    assert set(results) == {"long-mount", "long-inproc", "short-mount"}
    for kind in ("long-mount", "long-inproc"):
        long = results[kind]
        assert long["jobs"] == 4 and long["tokens"] >= 4 * 200, long  # the fake model echoes each 200-character prompt
        assert long["steps"] >= 200 and long["steps_per_s"] > 0, long
        assert 0 <= long["host_ms_per_step"]["plan_ipc_s"] <= long["step_ms"], long
    assert results["short-mount"]["jobs"] == 50 and results["short-mount"]["jobs_per_s"] > 0
    assert "| long-mount | 4 |" in run.stdout


@needs_fuse
def test_resume_quick_restores_after_a_remount_and_a_crash_and_forks_share(tmp_path: Path) -> None:
    out = tmp_path / "resume.json"
    run = subprocess.run(
        [str(ROOT / "scripts" / "bench"), "resume", "--quick", "--backend", "fake", "--json", str(out)], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr
    rows = {r["label"]: r for r in json.loads(out.read_text())["medians"]}
    assert set(rows) == {"resume", "crash", "cold", "fork-live", "fork-resume", "fork-crash", "fork-cold"}
    assert rows["resume"]["turns"] == rows["cold"]["turns"] == rows["crash"]["turns"] == 2
    for label in ("resume", "crash", "fork-resume", "fork-crash"):  # read back from disk, most of the conversation
        assert rows[label]["restores_per_turn"] == 1 and rows[label]["restored_tokens_per_turn"] > 3 * rows[label]["prefilled_tokens_per_turn"], rows
    for label in ("cold", "fork-cold", "fork-live"):  # --kv-disk 0, and a fork of cells still in RAM
        assert rows[label]["restores_per_turn"] == 0, rows
    assert rows["cold"]["prefilled_tokens_per_turn"] > 400 > rows["resume"]["prefilled_tokens_per_turn"]  # the whole conversation again
    assert rows["fork-live"]["prefilled_tokens_per_turn"] < rows["fork-cold"]["prefilled_tokens_per_turn"] - 300  # shared in RAM
    assert "| resume | 2 |" in run.stdout and "| fork-cold | 1 |" in run.stdout
