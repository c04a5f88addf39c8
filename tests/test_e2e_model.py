"""End to end on the real embedded model: a real mount driven by bash and Python."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounting import Mount, mounted, needs_fuse, sh, wait_for

pytestmark = [needs_fuse, pytest.mark.mount, pytest.mark.model]


@pytest.fixture(scope="module")
def fs(tmp_path_factory: pytest.TempPathFactory, model: Path) -> Iterator[Mount]:
    with mounted(tmp_path_factory.mktemp("model"), "--model", str(model), "--threads", "2", "--slots", "4", "--ctx", "1024") as mount:
        yield mount


def greedy(agent: Path, *extra: str) -> None:
    lines = ["temperature=0", "max_tokens=48", *extra]
    (agent / "config").write_text("\n".join(lines) + "\n")


def test_readme_walkthrough(fs: Mount) -> None:
    script = f"""
    set -e
    mkdir {fs.agents}/writer
    echo "system=You are terse." >> {fs.agents}/writer/config
    echo "temperature=0" >> {fs.agents}/writer/config
    echo "Name three prime numbers." > {fs.agents}/writer/prompt
    cat {fs.agents}/writer/output
    cat {fs.agents}/writer/status
    """
    result = sh(script, timeout=300)
    assert result.returncode == 0, result.stderr
    *answer, status = result.stdout.strip().splitlines()
    assert any(ch.isdigit() for ch in "".join(answer))
    assert status.split()[0] == "done"
    messages = [json.loads(line) for line in (fs.agents / "writer" / "context").read_text().splitlines()]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["content"] == "\n".join(answer)


def test_two_agents_at_once_get_their_own_answers(fs: Mount) -> None:
    questions = {"geo": "What is the capital of France?", "it": "What is the capital of Italy?"}
    for name in questions:
        greedy(fs.agent(name))
    procs = {
        name: subprocess.Popen(["bash", "-c", f"cd {fs.agents / name} && echo '{q}' > prompt && cat output"], stdout=subprocess.PIPE, text=True)
        for name, q in questions.items()
    }
    answers = {name: p.communicate(timeout=300)[0] for name, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values())
    assert "paris" in answers["geo"].lower()
    assert "rome" in answers["it"].lower()
    stats = dict(line.split(" ", 1) for line in (fs.root / "kernel" / "stats").read_text().splitlines())
    assert int(stats["generated"]) > 0 and float(stats["tokens_per_s"]) > 0


def kernel_stats(fs: Mount) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in (fs.root / "kernel" / "stats").read_text().splitlines())


def test_concurrent_agents_are_decoded_in_one_batch(fs: Mount) -> None:
    names = ["batch-a", "batch-b", "batch-c"]
    request = json.dumps({"prompt": "Count slowly.", "temperature": 0, "max_tokens": 48, "ignore_eos": True})
    for name in names:
        fs.agent(name)
    before = kernel_stats(fs)  # the mount's counters are lifetime ones: this run is the difference
    for name in names:  # queued within milliseconds of each other; each answer takes 48 steps
        (fs.agents / name / "prompt").write_text(request)
    outputs = [(fs.agents / name / "output").read_text() for name in names]
    after = kernel_stats(fs)
    assert all(outputs)
    steps, seqs, generated = (int(after[key]) - int(before[key]) for key in ("steps", "batch_seqs", "generated"))
    assert generated == 3 * 48 and steps > 0
    # One sequence a step would make seqs == steps. Batched, more than one whole answer's worth
    # of tokens (48) was decoded in steps shared with another sequence (about 96 when all three overlap).
    assert seqs - steps > 48, f"{seqs} sequences in {steps} steps"


def test_output_streams_before_the_answer_is_done(fs: Mount) -> None:
    agent = fs.agent("streamer")
    greedy(agent, "max_tokens=200")
    fd = os.open(agent / "output", os.O_RDONLY)
    try:
        (agent / "prompt").write_text("Write a long story about a lighthouse keeper.")
        first = os.read(fd, 4096)
        state_at_first_bytes = (agent / "status").read_text().split()[0]
        rest = b""
        while chunk := os.read(fd, 4096):
            rest += chunk
    finally:
        os.close(fd)
    assert first and state_at_first_bytes == "running"
    assert len(first + rest) > len(first)
    assert (agent / "status").read_text().split()[0] == "done"


def test_multi_turn_and_call_sessions(fs: Mount) -> None:
    agent = fs.agent("talker")
    greedy(agent)
    assert sh(f"cd {agent} && echo 'My favourite fruit is the mango.' > prompt && cat output > /dev/null", timeout=300).returncode == 0
    recalled = sh(f"cd {agent} && echo 'What did I just tell you?' > prompt && cat output", timeout=300)
    assert recalled.returncode == 0 and "mango" in recalled.stdout.lower(), recalled.stdout  # the second turn saw the first
    roles = [json.loads(line)["role"] for line in (agent / "context").read_text().splitlines()]
    assert roles == ["user", "assistant"] * 2
    answers = []
    fd = os.open(agent / "call", os.O_RDWR)
    try:
        for question in (b"What did I just tell you?", b"Now say goodbye."):
            os.write(fd, question)
            answer = b""
            while chunk := os.read(fd, 65536):
                answer += chunk
            answers.append(answer.decode())
    finally:
        os.close(fd)
    assert all(answer.strip() for answer in answers)
    assert "mango" not in answers[0].lower(), answers[0]  # a call session is a conversation of its own: it never saw the mango
    assert len((agent / "context").read_text().splitlines()) == 4  # call turns stay private


def test_cancel_and_bad_input_keep_the_mount_serving(fs: Mount) -> None:
    agent = fs.agent("victim")
    greedy(agent, "max_tokens=400")
    (agent / "prompt").write_text("Count from one to two hundred in words.")
    reader = subprocess.Popen(["cat", str(agent / "output")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (agent / "status").read_text().split()[0] == "running", timeout=120, what="the job to run")
    (agent / "ctl").write_text("cancel\n")
    _, err = reader.communicate(timeout=60)
    assert reader.returncode != 0 and "canceled" in err.lower()
    refused = sh(f"printf '\\xff' > {agent}/prompt; cat {agent}/error")
    assert "write error: Invalid argument" in refused.stderr and refused.stdout.splitlines()[-1].startswith("EINVAL")
    result = sh(f"echo 'Say yes.' > {agent}/prompt && cat {agent}/output", timeout=300)
    assert result.returncode == 0 and result.stdout.strip()


def test_remount_keeps_the_conversation(tmp_path: Path, model: Path) -> None:
    args = ("--model", str(model), "--threads", "2", "--slots", "2", "--ctx", "1024")
    with mounted(tmp_path, *args) as mount:
        agent = mount.agent("keeper")
        greedy(agent)
        assert sh(f"echo 'Remember the word: tangerine.' > {agent}/prompt && cat {agent}/output", timeout=300).returncode == 0
        context = (agent / "context").read_text()
    with mounted(tmp_path, *args) as mount:
        agent = mount.agents / "keeper"
        assert (agent / "context").read_text() == context
        assert "temperature=0.0" in (agent / "config").read_text()
        recalled = sh(f"echo 'What is the word I asked you to remember?' > {agent}/prompt && cat {agent}/output", timeout=300)
        assert recalled.returncode == 0 and "tangerine" in recalled.stdout.lower(), recalled.stdout  # the first mount's turn reached the model
        assert len((agent / "context").read_text().splitlines()) == 4


def test_the_model_calls_a_tool_under_its_grammar(fs: Mount) -> None:
    agent = fs.agent("calculating")
    greedy(agent, "tools=calculator", "tool_choice=calculator", "max_tokens=96", "system=Use the calculator for arithmetic.")
    result = sh(f"echo 'What is 1234 * 5678?' > {agent}/prompt && cat {agent}/output && cat {agent}/status", timeout=300)
    assert result.returncode == 0, result.stderr
    answer, status = result.stdout.strip().rsplit("\n", 1)
    assert status.startswith("done")
    assert "7006652" in answer  # the tool's result reached the answer
    messages = [json.loads(line) for line in (agent / "context").read_text().splitlines()]
    [call] = json.loads(messages[1]["content"])["calls"]  # the grammar made it well-formed JSON; a named tool: one call
    assert call["tool"] == "calculator" and "1234" in call["arguments"]["expression"]
    assert json.loads(messages[2]["content"]) == {"tool": "calculator", "ok": True, "result": {"result": 7006652}}


def test_the_model_makes_two_calls_in_one_reply(fs: Mount) -> None:
    agent = fs.agent("two_calls")
    greedy(agent, "tools=calculator clock", "tool_choice=required", "max_tokens=160", "system=Use the tools. Call every tool you need at once.")
    result = sh(f"echo 'What is 12*7, and what time is it now?' > {agent}/prompt && cat {agent}/output && cat {agent}/status", timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().rsplit("\n", 1)[1].startswith("done")
    messages = [json.loads(line) for line in (agent / "context").read_text().splitlines()]
    calls = json.loads(messages[1]["content"])["calls"]
    assert [c["tool"] for c in calls] == ["calculator", "clock"] and calls[0]["arguments"]["expression"].replace(" ", "") == "12*7"
    results = [json.loads(m["content"]) for m in messages[2:4]]
    assert [m["role"] for m in messages[2:4]] == ["tool", "tool"]
    assert results[0] == {"tool": "calculator", "ok": True, "result": {"result": 84}}  # the results in the order of the calls
    assert results[1]["tool"] == "clock" and results[1]["ok"] is True and "utc" in results[1]["result"]
