"""The syscall table is typed: each entry carries its handler's signature, so a call
with the wrong arguments fails the type check, and a call's result has its type.
Checked by running mypy on small programs, as scripts/test does on the tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = """
from kernel import Caller, Kernel
from kernel.types import Agent
from kernel.syscall import Sys, syscall

async def body(kernel: Kernel, caller: Caller, agent: Agent) -> None:
{lines}
"""


def mypy(lines: list[str], tmp_path: Path) -> str:
    path = tmp_path / "program.py"
    path.write_text(PROGRAM.format(lines="\n".join("    " + line for line in lines)))
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--config-file", str(ROOT / "pyproject.toml"), str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result.stdout + result.stderr


def test_a_call_has_its_handlers_types_and_a_wrong_one_fails_the_check(tmp_path: Path) -> None:
    out = mypy(
        [
            "job = await syscall(kernel, Sys.LLM_SUBMIT, caller, agent, b'hello')",
            "reveal_type(job)",
            "await syscall(kernel, Sys.LLM_SUBMIT, caller, 'not an agent', b'hello')",
            "await syscall(kernel, Sys.AGENT_REMOVE, caller, agent, 'one too many')",
            "attr = await syscall(kernel, Sys.MEMORY_GETATTR, caller, 5)",
            "reveal_type(attr)",
            "await syscall(kernel, Sys.MEMORY_READ, caller, 'a file handle')",
        ],
        tmp_path,
    )
    assert 'Revealed type is "kernel.llm.jobs.Job"' in out, out
    assert 'Revealed type is "kernel.memory.data.Attr"' in out, out  # a memory operation has its store method's types
    assert 'Argument 4 to "syscall" has incompatible type "str"; expected "Agent"' in out, out
    assert 'Too many arguments for "syscall"' in out, out
    assert 'Missing positional arguments "offset", "length" in call to "syscall"' in out, out
    assert ":7: error" not in out and ":11: error" not in out, out  # the right calls pass
