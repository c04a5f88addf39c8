"""The short chaos soak, as CI runs it: `scripts/soak` on the fake backend, 16
agents for 60 s, one SIGKILL, one SIGSEGV and one SIGSTOP of the engine. The soak decides
its criteria itself (bench/soak/report.py); this test holds it to each of them through
its JSON report, so a failure names the promise that broke."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from mounting import needs_fuse

from kernel.params import ENGINE_STABLE_SECONDS

pytestmark = [needs_fuse, pytest.mark.mount]

SOAK = Path(__file__).resolve().parent.parent / "scripts" / "soak"
SHORT = ["--backend", "fake", "--fake-delay", "0.01", "--duration", "60", "--faults", "3", "--agents", "16"]
# Faults at least a second more than ENGINE_STABLE_SECONDS apart: each engine serves that long first, so
# three faults are no crash loop (which would mark the core failed: kernel/cores/engine.py)
STABLE = int(ENGINE_STABLE_SECONDS)
SHORT += ["--engine-deadline", "3", "--fault-interval", str(STABLE + 1), str(STABLE + 5), "--seed", "22"]


def test_the_short_soak_keeps_every_promise(tmp_path: Path) -> None:
    path = tmp_path / "soak.json"
    result = subprocess.run([str(SOAK), *SHORT, "--json", str(path), "--dir", str(tmp_path / "soak")], capture_output=True, text=True, timeout=420)
    assert path.exists(), f"no report (exit {result.returncode}):\n{result.stdout}\n{result.stderr[-4000:]}"
    report = json.loads(path.read_text())
    broken = [f"{c['criterion']}: {c['detail']}" for c in report["criteria"] if not c["ok"]]
    assert not broken, "\n".join(broken) + "\n\n" + result.stdout
    assert result.returncode == 0, result.stdout
    # what the criteria rest on was really exercised
    assert report["faults_by_kind"] == {"kill": 1, "segv": 1, "stop": 1}
    assert report["jobs"]["done"] > 100 and report["jobs"]["eio"] > 0  # faults hit jobs, and the rest went on
    assert report["jobs"]["failed"] == 0 and report["stuck"] == [] and report["longest_wait_s"] < report["stuck_limit_s"]
    assert sum(report["memory_acknowledged"].values()) > 100 and report["lost_live"] == report["lost_remount"] == []
    assert report["hangs"] == 1 and report["restarts"] == 3  # the SIGSTOP was found by the watchdog, not by the soak
    assert report["audit_engine_events"].get("hung") == 1 and report["audit_engine_events"].get("restarted") == 3
    assert report["daemon_pid_end"] == report["daemon_pid"] and report["unmount_s"] < 15 and report["left_behind"] == []
