"""Native code may crash; the mount must not. Real mounts whose engine process is killed
with real signals, on the embedded model and on the fake one (for the crash loop)."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
from mounting import aiosfs, listed, mounted, needs_fuse, sh, wait_for

from kernel.cores.enginechild import CRASH_ENV

pytestmark = [needs_fuse, pytest.mark.mount]

CRASHED = r"engine of \S+ crashed: "  # the supervisor's report of a crash
SEGFAULT = r"engine \S+ \(pid \d+\): Fatal Python error: Segmentation fault"  # faulthandler's first line, relayed from the engine


def engine_pid(root: Path) -> int:
    match = re.search(r"engine=ready pid=(\d+)", (root / "kernel" / "status").read_text())
    assert match, (root / "kernel" / "status").read_text()
    return int(match.group(1))


def restarts(root: Path) -> int:
    return int(re.search(r"restarts=(\d+)", (root / "kernel" / "status").read_text()).group(1))  # type: ignore[union-attr]


def ps_rows(root: Path) -> list[list[str]]:
    return [line.split() for line in (root / "kernel" / "ps").read_text().splitlines()[1:] if not line.startswith("proc ")]


def engine_events(state: Path) -> list[dict]:
    lines = (state / "audit.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "engine"]


LONG = '{"prompt": "Tell a long story about a lighthouse keeper.", "max_tokens": 400, "temperature": 0, "ignore_eos": true}'


@pytest.mark.model
def test_sigsegv_in_a_batch_of_four_fails_those_four_and_the_mount_goes_on(tmp_path: Path, model: Path) -> None:
    with mounted(tmp_path, "--slots", "4", "--threads", "2") as mount:
        mount.allow_log(CRASHED)
        mount.allow_log(SEGFAULT)
        daemon = mount.daemon_pid()
        first = engine_pid(mount.root)
        agents = [mount.agent(f"a{i}") for i in range(4)]
        for agent in agents:
            (agent / "prompt").write_text(LONG)
        # all four are decoding together: running, each with tokens out
        wait_for(lambda: sum(1 for r in ps_rows(mount.root) if r[3] == "running" and int(r[6]) > 0) == 4, timeout=120, what="4 jobs generating")
        os.kill(first, signal.SIGSEGV)
        for agent in agents:
            out = sh(f"cat {agent}/output")
            assert out.returncode != 0 and "Input/output error" in out.stderr, out
            assert out.stdout, "the partial answer comes first"
            error = (agent / "error").read_text()
            assert error.startswith("EIO ") and "engine crashed" in error and "SIGSEGV" in error, error
            assert (agent / "status").read_text().startswith("error")
        answered = sh(f"echo 'Say hello.' > {agents[0]}/prompt && cat {agents[0]}/output", timeout=180)
        assert answered.returncode == 0 and answered.stdout.strip(), answered
        assert mount.daemon_pid() == daemon and restarts(mount.root) == 1
        assert engine_pid(mount.root) != first
        status = (mount.root / "kernel" / "status").read_text()
        assert "last_crash: killed by SIGSEGV" in status
        assert "restarts=1" in (mount.root / "kernel" / "models").read_text()
        assert re.search(r"engine of smollm2\S* crashed: killed by SIGSEGV.*4 jobs in it failed", mount.log_text())
    events = engine_events(mount.state)
    assert [e["what"] for e in events] == ["crashed", "restarted"] and len(events[0]["jobs"]) == 4


@pytest.mark.model
def test_sigkill_with_jobs_queued_answers_them_after_the_restart(tmp_path: Path, model: Path) -> None:
    with mounted(tmp_path, "--slots", "1", "--threads", "2") as mount:
        mount.allow_log(CRASHED)
        running_agent, *waiting = [mount.agent(f"q{i}") for i in range(3)]
        (running_agent / "prompt").write_text(LONG)
        for agent in waiting:
            (agent / "prompt").write_text('{"prompt": "Name a color.", "max_tokens": 16, "temperature": 0}')
        wait_for(lambda: [r[3] for r in ps_rows(mount.root)] == ["running", "queued", "queued"], timeout=120, what="one running, two queued")
        os.kill(engine_pid(mount.root), signal.SIGKILL)
        assert sh(f"cat {running_agent}/output").returncode != 0
        assert "SIGKILL" in (running_agent / "error").read_text()
        for agent in waiting:
            out = sh(f"cat {agent}/output", timeout=180)
            assert out.returncode == 0 and out.stdout.strip(), out
            assert (agent / "status").read_text().startswith("done")
        assert restarts(mount.root) == 1


def test_a_crash_loop_marks_the_core_failed_and_retry_brings_it_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flag = tmp_path / "engine-crashes-at-load"
    monkeypatch.setenv(CRASH_ENV, f"load@{flag}")  # inherited by the daemon, then by every engine it starts
    with mounted(tmp_path, "--backend", "fake", "--fake-delay", "0.01") as mount:
        mount.allow_log(CRASHED)
        mount.allow_log(SEGFAULT)
        mount.allow_log(r"engine of fake crashed: .*marked failed")
        agent = mount.agent("a")
        daemon = mount.daemon_pid()
        flag.write_text("")
        os.kill(engine_pid(mount.root), signal.SIGSEGV)
        wait_for(lambda: "engine=failed" in (mount.root / "kernel" / "status").read_text(), timeout=60, what="the core marked failed")
        refused = sh(f"echo hello > {agent}/prompt; cat {agent}/output")
        assert refused.returncode != 0
        error = (agent / "error").read_text()
        assert error.startswith("EIO ") and "failed" in error and "retry fake" in error, error
        assert "engine=failed" in (mount.root / "kernel" / "models").read_text()
        flag.unlink()  # the cause is gone
        retried = sh(f"echo 'retry fake' > {mount.root}/kernel/ctl")
        assert retried.returncode == 0, retried.stderr
        answered = sh(f"echo again > {agent}/prompt && cat {agent}/output", timeout=60)
        assert answered.returncode == 0 and answered.stdout == "turn 1: AGAIN\n", answered
        assert mount.daemon_pid() == daemon
        bad = sh(f"echo 'retry fake' > {mount.root}/kernel/ctl")
        assert bad.returncode != 0 and "Invalid argument" in bad.stderr  # it serves: nothing to retry
    assert [e["what"] for e in engine_events(mount.state)] == ["crashed", "crashed", "failed", "retry", "restarted"]


@pytest.mark.model
def test_a_truncated_gguf_is_a_clear_error_and_the_mount_goes_on(tmp_path: Path, model: Path) -> None:
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(model.read_bytes()[: 1 << 20])  # the first MiB of a real model file
    config = tmp_path / "mount.toml"
    config.write_text(f'[[local]]\nname = "broken"\npath = "{bad}"\nload = false\n\n[[local]]\nname = "atstart"\npath = "{bad}"\nload = true\n')
    with mounted(tmp_path, "--config", str(config), "--threads", "2") as mount:
        mount.allow_log(r"loading model (broken|atstart) failed|engine (broken|atstart) \(pid \d+\): ERROR .*llama")
        load = sh(f"echo 'load broken' > {mount.root}/kernel/ctl")
        assert load.returncode != 0 and "Input/output error" in load.stderr
        models = (mount.root / "kernel" / "models").read_text()
        assert "broken llama.cpp - 0 - unloaded" in models and "atstart llama.cpp - 0 - unloaded" in models
        log = (mount.root / "kernel" / "log").read_text()
        failures = [e for e in map(json.loads, log.splitlines()) if e["event"] == "engine" and e.get("what") == "load_failed"]
        assert {e["model"] for e in failures} == {"broken", "atstart"} and all(e["reason"] for e in failures)
        agent = mount.agent("w")
        answered = sh(f"echo 'Say yes.' > {agent}/prompt && cat {agent}/output", timeout=180)
        assert answered.returncode == 0 and answered.stdout.strip()


def test_mount_on_an_engine_that_dies_warming_up_fails_with_the_reason_and_leaves_no_mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "mnt"
    monkeypatch.setenv(CRASH_ENV, "warmup")
    result = aiosfs("mount", str(root), "--backend", "fake", "--state", str(tmp_path / "state"))
    assert result.returncode != 0
    assert "killed by SIGSEGV" in result.stderr and "What to do" in result.stderr, result.stderr
    assert not listed(root) and list(root.iterdir()) == []
    monkeypatch.delenv(CRASH_ENV)
    with mounted(tmp_path, "--backend", "fake") as mount:  # the same state: nothing was left half-made
        assert (mount.root / "kernel" / "status").read_text().startswith("running=")
