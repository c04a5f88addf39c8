"""Errors at write() where they can be known there, seen from bash on a real mount.

bash reports a failing write() ("write error: Invalid argument", exit status 1) but
ignores errors from close(): a bad config, permissions, scheduler or ctl line and a
bad prompt must fail the write itself. `error` keeps the last refusals, newest last.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from mounting import Mount, needs_fuse, sh

from kernel import params

pytestmark = [needs_fuse, pytest.mark.mount]

LINE = re.compile(r"^(E[A-Z0-9]+) (-|\d+) (\d+) (.+)$")
WRITE_ERROR = "write error: Invalid argument"


def error_lines(agent: Path) -> list[tuple[str, str, int, str]]:
    """The `error` file as (errno, job id, time, message), oldest first; each line well formed."""
    lines = []
    for line in (agent / "error").read_text().splitlines():
        match = LINE.match(line)
        assert match, f"malformed error line {line!r}"
        lines.append((match[1], match[2], int(match[3]), match[4]))
    return lines


def refused_in_bash(script: str) -> str:
    """Run a bash line that must fail at write(): its stderr."""
    result = sh(script)
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert WRITE_ERROR in result.stderr, result.stderr
    return result.stderr


def test_bad_config_lines_fail_at_write_and_keep_the_config(agent: Path) -> None:
    assert sh(f"echo temperature=0.3 >> {agent}/config").returncode == 0
    kept = (agent / "config").read_text()
    started = int(time.time())
    refused_in_bash(f'echo "max_tokens=-5" >> {agent}/config')
    refused_in_bash(f'echo "temperature=abc" >> {agent}/config')
    refused_in_bash(f'echo "max_tokens=-5" > {agent}/config')  # `>` had emptied it at bash's first flush
    refused_in_bash(f"printf 'top_p=0.5\\nbogus\\n' > {agent}/config")  # one bad line refuses the whole write
    assert (agent / "config").read_text() == kept and "temperature=0.3\n" in kept
    lines = error_lines(agent)
    assert [errno for errno, *_ in lines] == ["EINVAL"] * 4
    assert all(job == "-" and started - 1 <= ts <= time.time() + 1 for _, job, ts, _ in lines)
    assert "max_tokens" in lines[0][3] and "temperature" in lines[1][3] and "max_tokens" in lines[2][3]
    assert "line 2" in lines[3][3] and "bogus" in lines[3][3]


def test_good_config_writes_still_work(agent: Path, tmp_path: Path) -> None:
    written = tmp_path / "config"
    written.write_text("# a whole config\ntemperature=0.2\n\nmax_tokens=40\nsystem=Be terse.\\nVery.\n")
    assert sh(f"cat {written} > {agent}/config").returncode == 0
    config = (agent / "config").read_text()
    assert "temperature=0.2\n" in config and "max_tokens=40\n" in config and "system=Be terse.\\nVery.\n" in config
    assert sh(f"echo top_p=0.5 >> {agent}/config").returncode == 0  # `>>` overrides one key
    config = (agent / "config").read_text()
    assert "top_p=0.5\n" in config and "max_tokens=40\n" in config
    assert sh(f"echo seed=7 > {agent}/config").returncode == 0  # `>` replaces: the rest goes back to defaults
    config = (agent / "config").read_text()
    assert "seed=7\n" in config and f"max_tokens={params.DEFAULT_MAX_TOKENS}\n" in config
    # a line split across writes is checked once it is whole
    assert sh(f"{{ printf 'tempera'; printf 'ture=0.4\\n'; }} >> {agent}/config").returncode == 0
    assert "temperature=0.4\n" in (agent / "config").read_text()
    assert (agent / "error").read_text() == ""


def test_a_refused_write_spoils_the_rest_of_its_commit(agent: Path) -> None:
    kept = (agent / "config").read_text()
    result = sh(f"{{ echo temperature=0.9; echo bogus; echo top_p=0.5; }} >> {agent}/config")  # one open, three writes, one flush
    assert result.returncode == 1 and result.stderr.count(WRITE_ERROR) == 2, result.stderr
    assert (agent / "config").read_text() == kept  # nothing of that commit, before or after the bad line
    assert [errno for errno, *_ in error_lines(agent)] == ["EINVAL"]  # one refusal, recorded once
    assert sh(f"echo temperature=0.9 >> {agent}/config").returncode == 0  # the next open starts afresh
    assert "temperature=0.9\n" in (agent / "config").read_text()
    # bash flushes when it closes each `>&3`: the refused line's commit ends there
    result = sh(f"exec 3>>{agent}/config; echo bogus >&3; echo top_p=0.5 >&3")
    assert result.returncode == 0 and result.stderr.count(WRITE_ERROR) == 1, result.stderr
    assert "top_p=0.5\n" in (agent / "config").read_text()


def test_bad_prompts_fail_at_write(agent: Path) -> None:
    for request in ('{"prompt": 5}', '{"prompt": "hi", "bogus": 1}', '{"prompt": ""}', '{"prompt": "hi", "temperature": "hot"}'):
        refused_in_bash(f"echo '{request}' > {agent}/prompt")
    refused_in_bash(f"printf '\\xff\\xfe bad\\n' > {agent}/prompt")
    refused_in_bash(f"printf 'fine so far \\xc3(\\n' > {agent}/prompt")  # a bad sequence within the write
    assert (agent / "status").read_text() == "idle -\n"  # no job
    lines = error_lines(agent)
    assert [errno for errno, *_ in lines] == ["EINVAL"] * 6
    assert '"prompt" must be a string' in lines[0][3] and "bogus" in lines[1][3] and "empty" in lines[2][3]
    assert "temperature" in lines[3][3] and "UTF-8" in lines[4][3] and "UTF-8" in lines[5][3]
    output = sh(f"cat {agent}/output")  # the uid's last prompt made no job: output says why
    assert output.returncode != 0 and "Invalid argument" in output.stderr


def test_a_character_split_across_writes_is_accepted(agent: Path) -> None:
    result = sh(f"{{ printf 'caf\\xc3'; printf '\\xa9 au lait\\n'; }} > {agent}/prompt && cat {agent}/output")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "turn 1: CAFÉ AU LAIT\n"


def test_an_envelope_in_pieces_is_checked_when_whole(agent: Path) -> None:
    # pieces that never parse alone: the whole document is checked at close, which bash ignores
    assert sh(f"printf '{{\"prompt\": 5' > {agent}/prompt").returncode == 0
    assert error_lines(agent)[-1][0] == "EINVAL" and "JSON" in error_lines(agent)[-1][3]
    assert (agent / "status").read_text() == "idle -\n"
    # the write that completes a bad envelope fails
    refused_in_bash(f"{{ printf '{{\"prompt\": '; printf '5}}\\n'; }} > {agent}/prompt")
    # pieces of a good one make one job
    result = sh(f'{{ printf \'{{"prompt": "he\'; printf \'llo", "max_tokens": 20}}\\n\'; }} > {agent}/prompt && cat {agent}/output')
    assert result.returncode == 0 and result.stdout == "turn 1: HELLO\n", result.stderr


def test_bad_permissions_lines_fail_at_write(agent: Path) -> None:
    assert sh(f"echo 'max_queue 4' > {agent}/permissions").returncode == 0
    kept = (agent / "permissions").read_text()
    refused_in_bash(f"echo 'max_tokens lots' >> {agent}/permissions")
    refused_in_bash(f"echo 'bogus_key 1' > {agent}/permissions")
    assert (agent / "permissions").read_text() == kept and "max_queue" in kept
    lines = error_lines(agent)
    assert [errno for errno, *_ in lines] == ["EINVAL", "EINVAL"]
    assert "max_tokens" in lines[0][3] and "bogus_key" in lines[1][3]


def test_bad_scheduler_lines_fail_at_write(fs: Mount) -> None:
    scheduler = fs.root / "kernel" / "scheduler"
    kept = scheduler.read_text()
    refused_in_bash(f"echo lottery > {scheduler}")
    refused_in_bash(f"echo 'rr quantum=0' > {scheduler}")
    refused_in_bash(f"echo rr >> {scheduler}")  # a second line
    assert scheduler.read_text() == kept
    assert sh(f"echo 'rr quantum=8' > {scheduler}").returncode == 0
    assert scheduler.read_text() == "rr quantum=8\n"
    assert sh(f"echo fifo > {scheduler}").returncode == 0


def test_bad_ctl_lines_fail_at_write(agent: Path) -> None:
    refused_in_bash(f"echo frobnicate > {agent}/ctl")
    refused_in_bash(f"printf 'cancel\\nreset now\\n' > {agent}/ctl")
    lines = error_lines(agent)
    assert [errno for errno, *_ in lines] == ["EINVAL", "EINVAL"] and "frobnicate" in lines[0][3]


def test_error_keeps_the_last_refusals_then_the_jobs_failure(agent: Path) -> None:
    for n in range(params.ERROR_LINES + 2):
        refused_in_bash(f"echo 'key{n}=1' >> {agent}/config")
    lines = error_lines(agent)
    assert len(lines) == params.ERROR_LINES
    assert "key2" in lines[0][3] and f"key{params.ERROR_LINES + 1}" in lines[-1][3]  # the oldest went, newest last
    assert [ts for _, _, ts, _ in lines] == sorted(ts for _, _, ts, _ in lines)
    # an accepted request starts it afresh; what fails afterwards follows, newest last
    long = '{"prompt": "go on", "max_tokens": 4000, "ignore_eos": true}'
    assert sh(f"echo '{long}' > {agent}/prompt").returncode == 0
    assert (agent / "error").read_text() == ""
    job = (agent / "status").read_text().split()[1]
    refused_in_bash(f"echo 'temperature=9' >> {agent}/config")
    cancelled = sh(f"echo cancel > {agent}/ctl && cat {agent}/output > /dev/null")
    assert cancelled.returncode != 0 and "Operation canceled" in cancelled.stderr
    lines = error_lines(agent)
    assert [(errno, job_id) for errno, job_id, _, _ in lines] == [("EINVAL", "-"), ("ECANCELED", job)]


def test_bad_call_writes_fail_at_write(agent: Path) -> None:
    script = f"""exec 3<>{agent}/call
    echo '{{"prompt": "hi", "top_p": 0}}' >&3; a=$?
    printf 'caf\\xe9\\n' >&3; b=$?
    cat {agent}/error
    echo hello >&3; cat <&3; echo "$a $b" """
    result = sh(script)
    assert result.stderr.count(WRITE_ERROR) == 2, result
    *errors, answer, statuses = result.stdout.splitlines()
    assert (answer, statuses) == ("turn 1: HELLO", "1 1")  # the same session goes on
    assert [line.split()[:2] for line in errors] == [["EINVAL", "-"]] * 2
    assert "top_p" in errors[0] and "UTF-8" in errors[1]
    assert (agent / "error").read_text() == ""  # the accepted turn emptied it
