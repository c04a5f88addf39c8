"""The example agents of examples/ end to end, on a real mount and the embedded model.

Each agent is a program that talks to aiosfs only through files. It runs here twice:
by hand against an agent made with mkdir, and supervised from its own manifest
dropped into the watched `--agents-dir`, as the manifest's owner (uid 65534). The
model's wording varies, so the checks are on structure: the files the agents leave,
their formats, statuses and exit codes, and the numbers the tools compute.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from mounting import Mount, mounted, needs_fuse, wait_for

pytestmark = [needs_fuse, pytest.mark.mount, pytest.mark.model]

AGENTS = Path(__file__).resolve().parent.parent / "examples"
NOBODY = 65534
FOLDERS = ("bash", "c", "python", "node")


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared() -> Iterator[Path]:
    """A directory uid 65534 can read: copies of the agents' folders, the C build, the watched manifests."""
    path = Path(tempfile.mkdtemp(prefix="aiosfs-agents-", dir="/tmp"))
    os.chmod(path, 0o755)
    for folder in FOLDERS:
        shutil.copytree(AGENTS / folder, path / folder, ignore=shutil.ignore_patterns("agent", "*.o"))
    (path / "manifests").mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def fs(tmp_path_factory: pytest.TempPathFactory, model: Path, shared: Path) -> Iterator[Mount]:
    args = ("--model", str(model), "--threads", "2", "--slots", "4", "--ctx", "1024", "--agents-dir", str(shared / "manifests"))
    with mounted(tmp_path_factory.mktemp("agents"), *args) as mount:
        yield mount


@pytest.fixture(scope="module")
def c_agent(shared: Path) -> Path:
    """examples/c built with its Makefile and `cc -Wall -Wextra -O2 -Werror`: it must build without a warning."""
    build = shared / "c"
    result = subprocess.run(
        ["make", "-C", str(build), "CC=cc", "CFLAGS=-Wall -Wextra -O2 -Werror"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr
    return build / "agent"


# -- helpers -------------------------------------------------------------------------------
def greedy(agent: Path, max_tokens: int = 48) -> None:
    (agent / "config").write_text(f"temperature=0\nmax_tokens={max_tokens}\n")


def run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def has_words(text: str) -> bool:
    return sum(ch.isalpha() for ch in text) >= 3


class EventLog:
    """The agent's `events`, opened now (so it sees every later event), read without blocking."""

    def __init__(self, agent: Path) -> None:
        self.fd = os.open(agent / "events", os.O_RDONLY | os.O_NONBLOCK)
        self.buffer = b""
        self.events: list[dict[str, Any]] = []

    def poll(self, wait: float) -> list[dict[str, Any]]:
        select.select([self.fd], [], [], wait)  # POLLIN when lines wait; the timeout covers a missed wake-up
        try:
            self.buffer += os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        *lines, self.buffer = self.buffer.split(b"\n")
        new = [json.loads(line) for line in lines if line]
        self.events += new
        return new

    def drain(self) -> list[dict[str, Any]]:
        while self.poll(0.05):
            pass
        return self.events

    def close(self) -> None:
        os.close(self.fd)


class Canceller(threading.Thread):
    """Cancels the agent's `nth` job through its `ctl` as soon as that job's `queued` event shows."""

    def __init__(self, agent: Path, nth: int, timeout: float = 90) -> None:
        super().__init__(daemon=True)
        self.agent, self.nth, self.timeout = agent, nth, timeout
        self.events = EventLog(agent)
        self.cancelled: object = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            seen = 0
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline and self.cancelled is None:
                for event in self.events.poll(0.02):
                    if event["event"] == "queued":
                        seen += 1
                        if seen == self.nth:
                            # EBUSY here means the job ended before the cancel came: the race was lost.
                            (self.agent / "ctl").write_text(f"cancel {event['job']}\n")
                            self.cancelled = event["job"]
                            break
        except BaseException as exc:
            self.error = exc
        finally:
            self.events.close()

    def finish(self) -> object:
        self.join(timeout=self.timeout)
        assert self.error is None, f"cancelling job {self.nth} failed: {self.error!r}"
        assert self.cancelled is not None, f"job {self.nth} was never queued"
        return self.cancelled


def log_events(fs: Mount, event: str, **match: object) -> list[dict[str, Any]]:
    lines = (fs.root / "kernel" / "log").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == event and all(e.get(k) == v for k, v in match.items())]


def supervised(fs: Mount, shared: Path, folder: str) -> Path:
    """Drop the folder's manifest, with workdir pointing at the folder, into the watched
    directory; wait until its process has exited, as uid 65534 and with status 0. The
    agent directory."""
    workdir = shared / folder
    text = (workdir / "manifest.toml").read_text()
    manifest = tomllib.loads(text)
    assert manifest["owner"] == str(NOBODY) and manifest["workdir"] == "." and manifest["restart"] == "never"
    dropped = text.replace('workdir = "."', f"workdir = {json.dumps(str(workdir))}")
    assert dropped != text
    temp = shared / "manifests" / f".{folder}.toml.tmp"
    temp.write_text(dropped)
    os.replace(temp, shared / "manifests" / f"{folder}.toml")  # appears whole, as an editor saves it
    name = str(manifest["name"])
    agent_log = fs.state / "agents-logs" / f"{name}.log"
    try:
        wait_for(lambda: log_events(fs, "proc", agent=name, action="exit"), timeout=90)
    finally:
        output = agent_log.read_text() if agent_log.exists() else "(no log)"
        problems = log_events(fs, "manifest_error") + log_events(fs, "proc", agent=name, action="error")
        assert not problems, problems
    [start] = log_events(fs, "proc", agent=name, action="start")
    [end] = log_events(fs, "proc", agent=name, action="exit")
    assert end["status"] == 0, f"{name} failed; its log:\n{output}"
    assert start["uid"] == NOBODY
    agent = fs.agents / name
    assert os.stat(agent).st_uid == NOBODY
    return agent


def prompt_tokens(fs: Mount) -> int:
    """Prompt tokens the engine has taken so far, prefilled or reused from a cached prefix."""
    stats = dict(line.split(" ", 1) for line in (fs.root / "kernel" / "stats").read_text().splitlines())
    return int(stats["prompt_tokens"]) + int(stats["prefix_hit_tokens"])


def fresh_prompt_tokens(fs: Mount, agent: Path, questions: list[str]) -> int:
    """Prompt tokens of the questions asked each in a new `call` session, with no history."""
    before = prompt_tokens(fs)
    for question in questions:
        fd = os.open(agent / "call", os.O_RDWR)
        try:
            os.write(fd, json.dumps({"prompt": question, "temperature": 0, "max_tokens": 1}).encode())
            while os.read(fd, 65536):
                pass
        finally:
            os.close(fd)
    return prompt_tokens(fs) - before


def check_one_session(fs: Mount, agent: Path, used: int, questions: list[str], first_answer_tokens: int) -> None:
    """The questions took `used` prompt tokens: a conversation kept on one `call`
    descriptor sends the first turn again with the second, so it takes at least the
    first answer's tokens more than the same questions asked in separate sessions."""
    separate = fresh_prompt_tokens(fs, agent, questions)
    assert used - separate >= first_answer_tokens > 0, (used, separate, first_answer_tokens)


def written_by_nobody(path: Path) -> str:
    """The file's text, after checking the process that made it ran as uid 65534 (a new
    file in memory/ takes the uid of the process that created it)."""
    assert os.stat(path).st_uid == NOBODY, f"{path} is owned by uid {os.stat(path).st_uid}"
    return path.read_text()


# -- bash: summarize.sh --------------------------------------------------------------------
LIGHTHOUSE = (AGENTS / "bash" / "sample" / "lighthouse.txt").read_text()
SOURDOUGH = (AGENTS / "bash" / "sample" / "sourdough.txt").read_text()


def check_summaries(directory: Path, done: list[str]) -> list[str]:
    """Each summary is `# NAME`, a blank line and model text; INDEX.md links to each. The index lines."""
    for name in done:
        header, blank, *body = (directory / f"{name}.md").read_text().splitlines()
        assert header == f"# {name}" and blank == "" and has_words(" ".join(body))
    title, blank, *index = (directory / "INDEX.md").read_text().splitlines()
    assert title.startswith("# Summaries of ") and blank == ""
    for name in done:
        assert any(line.startswith(f"- [{name}]({name}.md): ") and has_words(line.split(": ", 1)[1]) for line in index), index
    return index


def test_bash_summarizer_by_hand(fs: Mount, tmp_path: Path) -> None:
    agent = fs.agent("summaries")
    greedy(agent)
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "1-lighthouse.txt").write_text(LIGHTHOUSE)
    (inputs / "2-cancelled.txt").write_text(LIGHTHOUSE * 3)  # a long prefill: time for the cancel to land
    (inputs / "3-huge.txt").write_text("word " * 3000)  # over the 1024-token window: E2BIG at submit
    (inputs / "4-latin1.txt").write_bytes(b"caf\xe9 au lait\n")  # not UTF-8: EINVAL at submit
    (inputs / "5-sourdough.txt").write_text(SOURDOUGH)
    (inputs / "subdir").mkdir()  # not a file: skipped

    canceller = Canceller(agent, nth=2)  # the second job is 2-cancelled.txt's (3 and 4 never become jobs)
    canceller.start()
    result = run(["bash", str(AGENTS / "bash" / "summarize.sh"), "--agent", str(agent), str(inputs)])
    canceller.finish()

    assert result.returncode == 1, result.stderr  # some files failed, and every file was tried
    summaries = agent / "memory" / "summaries"
    assert sorted(os.listdir(summaries)) == ["1-lighthouse.txt.md", "5-sourdough.txt.md", "INDEX.md"]
    index = check_summaries(summaries, ["1-lighthouse.txt", "5-sourdough.txt"])
    assert "- 2-cancelled.txt: failed (ECANCELED)" in index  # `cat output` exited non-zero; `error` said why
    assert "- 3-huge.txt: failed (E2BIG)" in index  # refused at close, which bash does not report: `error` did
    assert "- 4-latin1.txt: failed (EINVAL)" in index
    assert len(index) == 5
    assert "summarize: 3-huge.txt: refused: E2BIG" in result.stderr, result.stderr
    assert "summarize: 2-cancelled.txt: the job failed: ECANCELED" in result.stderr, result.stderr
    assert (agent / "context").read_text() == ""  # `ctl reset` after each file: no turns pile up

    usage = run(["bash", str(AGENTS / "bash" / "summarize.sh"), str(inputs)])
    assert usage.returncode == 2 and "AIOSFS_AGENT_DIR" in usage.stderr


def test_bash_summarizer_from_its_manifest(fs: Mount, shared: Path) -> None:
    agent = supervised(fs, shared, "bash")
    summaries = agent / "memory" / "summaries"
    assert sorted(os.listdir(summaries)) == ["INDEX.md", "lighthouse.txt.md", "sourdough.txt.md"]
    for name in os.listdir(summaries):
        written_by_nobody(summaries / name)
    assert len(check_summaries(summaries, ["lighthouse.txt", "sourdough.txt"])) == 2
    assert "You summarise texts" in (agent / "config").read_text()  # the manifest's config applied


# -- C: agent.c ----------------------------------------------------------------------------
def log_entries(agent: Path) -> list[list[str]]:
    path = agent / "memory" / "log.txt"
    text = path.read_text() if path.exists() else ""
    return [entry.splitlines() for entry in text.split("\n\n") if entry]


def test_c_agent_by_hand(fs: Mount, c_agent: Path) -> None:
    agent = fs.agent("asking")
    greedy(agent)
    result = run([str(c_agent), "-a", str(agent), "What", "is", "the", "capital", "of", "France?"])
    assert result.returncode == 0, result.stderr
    assert has_words(result.stdout)
    [entry] = log_entries(agent)
    assert entry[0] == "Q: What is the capital of France?" and entry[-1].startswith("status: done ")
    assert has_words("\n".join(entry[1:-1])) and entry[1].startswith("A: ")
    assert result.stdout.strip() == "\n".join(entry[1:-1])[3:].strip()  # the answer as streamed

    refused = run([str(c_agent), "-a", str(agent), "word " * 3000])
    assert refused.returncode == 1
    assert f"close (the request was refused) {agent}/prompt: E2BIG" in refused.stderr  # which file, which errno
    assert len(log_entries(agent)) == 1  # nothing to log: no job was made

    greedy(agent, max_tokens=300)
    canceller = Canceller(agent, nth=1)
    canceller.start()
    cancelled = run([str(c_agent), "-a", str(agent), "Write a long story about a lighthouse keeper."])
    job = canceller.finish()
    assert cancelled.returncode == 1  # status is not done
    assert f"read {agent}/output: ECANCELED" in cancelled.stderr
    assert log_entries(agent)[-1][-1] == f"status: cancelled {job}"

    usage = run([str(c_agent)])
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_c_agent_from_its_manifest(fs: Mount, shared: Path, c_agent: Path) -> None:
    agent = supervised(fs, shared, "c")
    text = written_by_nobody(agent / "memory" / "log.txt")
    [entry] = [e.splitlines() for e in text.split("\n\n") if e]
    assert entry[0] == "Q: What is the capital of France?" and entry[-1].startswith("status: done ")
    assert has_words("\n".join(entry[1:-1]))


# -- Python: planner.py --------------------------------------------------------------------
PLANNER = str(AGENTS / "python" / "planner.py")


def check_report(report: dict[str, Any], expression: str, result: float) -> None:
    assert has_words(str(report["plan"])) and has_words(str(report["next_step"]))
    assert report["calculation"] == {"expression": expression, "result": result}
    clock = report["clock"]
    assert isinstance(clock, dict) and datetime.fromisoformat(clock["utc"]).tzinfo is not None
    assert [has_words(t["question"]) and has_words(t["answer"]) for t in report["transcript"]] == [True, True]
    assert report["transcript"][0]["answer"] == report["plan"] and report["transcript"][1]["answer"] == report["next_step"]


def test_python_planner_by_hand(fs: Mount) -> None:
    agent = fs.agent("planning")
    events = EventLog(agent)
    try:
        before = prompt_tokens(fs)
        first = run([sys.executable, PLANNER, "--agent", str(agent), "--json", "Plan a picnic for 12 guests; food costs 12 * 4.5 euros"])
        used = prompt_tokens(fs) - before
        assert first.returncode == 0, first.stderr
        report = json.loads(first.stdout)
        check_report(report, "12 * 4.5", 54.0)
        assert any("12 * 4.5 = 54.0" in p["text"] for p in report["recalled"])  # the note just written, recalled
        plan_tokens = next(e["tokens"] for e in events.drain() if e["event"] == "done")
        check_one_session(fs, agent, used, [t["question"] for t in report["transcript"]], int(plan_tokens))

        second = run([sys.executable, PLANNER, "--agent", str(agent), "--json", "Plan the picnic drinks: 3 * (4 + 4) bottles"])
        assert second.returncode == 0, second.stderr
        report = json.loads(second.stdout)
        check_report(report, "3 * (4 + 4)", 24)
        texts = [p["text"] for p in report["recalled"]]
        assert any("= 24" in t for t in texts) and any("12 * 4.5 = 54.0" in t for t in texts)  # and the first run's note
        done = [e for e in events.drain() if e["event"] == "done"]
        assert len(done) == 2 + 2 + 2  # two model turns per run, and the two separate sessions of the check
    finally:
        events.close()

    notes = (agent / "memory" / "notes.md").read_text().split("\n\n")
    assert [n.splitlines()[-1] for n in notes if n] == ["Arithmetic: 12 * 4.5 = 54.0", "Arithmetic: 3 * (4 + 4) = 24"]
    assert (agent / "context").read_text() == ""  # the turns went through `call`, which is private
    calls = log_events(fs, "tool", agent="planning")
    assert [e["name"] for e in calls] == ["calculator", "clock"] * 2  # through the envelope, acting for the agent

    (agent / "permissions").write_text("tools clock\n")  # the policy now forbids the calculator
    denied = run([sys.executable, PLANNER, "--agent", str(agent), "Plan 2 + 2"])
    assert denied.returncode == 1 and f"call {fs.root}/tools/calculator: EPERM" in denied.stderr


def test_python_planner_from_its_manifest(fs: Mount, shared: Path) -> None:
    agent = supervised(fs, shared, "python")
    notes = written_by_nobody(agent / "memory" / "notes.md")
    assert notes.startswith("## ") and "Arithmetic: 12 * 4.5 = 54.0" in notes
    calls = log_events(fs, "tool", agent="planner")
    assert [(e["name"], e["uid"]) for e in calls] == [("calculator", NOBODY), ("clock", NOBODY)]


# -- Node.js: agent.js ---------------------------------------------------------------------
NODE_AGENT = str(AGENTS / "node" / "agent.js")
NODE_QUESTIONS = ["Name one planet of the solar system.", "Tell me one fact about that planet."]


def check_node_summary(summary: dict[str, Any], agent: Path) -> None:
    turns = summary["turns"]
    assert isinstance(turns, list) and [t["question"] for t in turns] == NODE_QUESTIONS
    assert all(has_words(t["answer"]) for t in turns)
    assert all(t["eagain"] >= 1 for t in turns)  # non-blocking reads: "not yet" before each answer
    assert str(summary["status"]).startswith("done ") and summary["file"] == str(agent / "call")


def test_node_agent_by_hand(fs: Mount) -> None:
    agent = fs.agent("chatting")
    events = EventLog(agent)
    try:
        before = prompt_tokens(fs)
        result = run(["node", NODE_AGENT, "--agent", str(agent), *NODE_QUESTIONS])
        used = prompt_tokens(fs) - before
        assert result.returncode == 0, result.stderr
        done = [e for e in events.drain() if e["event"] == "done"]
    finally:
        events.close()
    summary = json.loads((agent / "memory" / "node.json").read_text())
    check_node_summary(summary, agent)
    answers = [t["answer"] for t in summary["turns"]]
    assert result.stdout == "".join(f"Q: {q}\nA: {a}\n" for q, a in zip(NODE_QUESTIONS, answers, strict=True))
    assert len(done) == 2 and (agent / "context").read_text() == ""  # two turns, both on `call`
    check_one_session(fs, agent, used, NODE_QUESTIONS, int(done[0]["tokens"]))  # on one descriptor

    missing = run(["node", NODE_AGENT, "--agent", str(fs.agents / "nobody-here")])
    assert missing.returncode == 1 and f"{fs.agents}/nobody-here/call: missing" in missing.stderr


def test_node_agent_from_its_manifest(fs: Mount, shared: Path) -> None:
    agent = supervised(fs, shared, "node")
    check_node_summary(json.loads(written_by_nobody(agent / "memory" / "node.json")), agent)


# -- found on the way ----------------------------------------------------------------------
def test_running_is_reported_when_the_job_gets_its_slot(fs: Mount) -> None:
    """protocol.md §2.7 and §6: `running` is the job first given a slot, where its prefill
    starts, and wait_ms is queued → slot. On an idle engine a job gets a slot at once, so
    its wait must be a small part of its time to first token, which includes the prefill
    of a long prompt (here about 400 tokens, one decode step)."""
    agent = fs.agent("timing")
    events = EventLog(agent)
    try:
        request = {"prompt": "Summarize in one sentence.\n\n" + LIGHTHOUSE * 4, "temperature": 0, "max_tokens": 8}
        (agent / "prompt").write_text(json.dumps(request))
        assert (agent / "output").read_text()
        seen = {e["event"]: e for e in events.drain()}
    finally:
        events.close()
    wait_ms, ttft_ms = seen["running"]["wait_ms"], seen["first_token"]["ttft_ms"]
    assert wait_ms < ttft_ms / 2, (wait_ms, ttft_ms)
