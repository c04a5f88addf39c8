"""The checks that every real mount's teardown makes (tests/mounting.py) find what they
are there to find: a check that sees nothing lets every mount test pass with a broken
daemon."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from mounting import engine_pids, troubles

RELAYED_CRASH = (
    "2026-01-01 10:00:00,000 WARNING kernel.cores.enginehost: engine fake (pid 42): Fatal Python error: Segmentation fault\n"
    "2026-01-01 10:00:00,001 WARNING kernel.cores.enginehost: engine fake (pid 42): Current thread 0x00007f (most recent call first):\n"
)


def test_a_fatal_error_relayed_from_the_engine_is_trouble() -> None:
    found = troubles(RELAYED_CRASH, [])
    assert len(found) == 1 and "Fatal Python error: Segmentation fault" in found[0]


def test_an_engine_error_is_hidden_only_by_a_pattern_that_names_it() -> None:
    line = "2026-01-01 10:00:00,000 ERROR kernel.cores.enginehost: engine fake (pid 42): ERROR kernel: something broke\n"
    assert troubles(line, [re.compile(r"engine of \S+ crashed: ")]) != []  # the crash report's pattern does not cover it
    assert troubles(line, [re.compile(r"engine fake \(pid \d+\): ERROR kernel: something broke")]) == []


def test_engine_pids_finds_the_engine_children_of_a_process() -> None:
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "kernel.cores.enginehost"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        found = engine_pids(os.getpid())
        assert engine.pid in found and other.pid not in found
    finally:
        for child in (engine, other):
            child.kill()
            child.wait()
