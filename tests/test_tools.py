"""The tool manager in the kernel, with the FakeBackend: built-in tools, external
tools from a tools directory, validation, policy, timeouts, concurrency, the
identity tools run with, manifests and `tools reload`, and the audit log."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from kernel_helpers import OTHER, OWNER, ROOT, mkdir, refused, remember, run
from mounting import needs_root

from kernel import params
from kernel.errors import KernelError
from kernel.kernel import Kernel
from kernel.syscall import Sys, syscall
from kernel.tools.builtin import calculate
from kernel.tools.spec import ToolCall, ToolSpec

as_root = needs_root  # tools change identity only when the daemon is root

PRELUDE = """\
#!/usr/bin/env python3
import json, os, sys, time
request = json.load(sys.stdin)
args = request["arguments"]
"""


@pytest.fixture
def tools_dir() -> Iterator[Path]:
    """A tools directory nobody (uid 65534) can reach, as a real one must be."""
    path = Path(tempfile.mkdtemp(prefix="aiosfs-tools-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_kernel(new_kernel):
    return new_kernel


def add_tool(directory: Path, name: str, body: str, **manifest: Any) -> None:
    """A Python tool `NAME.py` (the PRELUDE reads the call) and its manifest `NAME.json`."""
    script = directory / f"{name}.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    script.chmod(0o755)
    spec = {"name": name, "description": f"test tool {name}", "command": [f"./{name}.py"], **manifest}
    (directory / f"{name}.json").write_text(json.dumps(spec))


def audit(kernel: Kernel, event: str) -> list[dict]:
    return [e for e in map(json.loads, kernel.audit) if e["event"] == event]


async def call(kernel: Kernel, name: str, arguments: Any, agent=None, caller=OWNER) -> Any:
    return await syscall(kernel, Sys.TOOL_CALL, caller, agent, name, arguments)


# -- built-ins ------------------------------------------------------------------------------------
def test_calculator_computes_arithmetic():
    assert calculate("2*(3+4)**2") == 98
    assert calculate("7 // 2 + 7 % 2 - -1") == 5
    assert calculate("1/4 + 2**-1") == 0.75
    assert calculate("sqrt(16) + abs(-2) + max(1, 5, 3) - min(4, 2)") == 9.0
    assert calculate("round(pi, 2)") == 3.14 and calculate("floor(e) + ceil(0.1)") == 3
    assert math.isclose(calculate("log(exp(2)) + sin(0) + cos(0) + tan(0)"), 3.0)
    assert calculate("2**4095 // 2**4000") == 2**95  # big integers within the bound are fine


@pytest.mark.parametrize(
    "expression, words",
    [
        ("__import__('os')", "not allowed"),
        ("open('/etc/passwd').read()", "not allowed"),
        ("(1).real", "not allowed"),
        ("x + 1", "'x' is not allowed"),
        ("'a' * 3", "not allowed"),
        ("[1, 2]", "not allowed"),
        ("lambda: 1", "not allowed"),
        ("True + 1", "not allowed"),
        ("9 ** 100000", "exponent"),
        ("9 ** 9000", "bits"),
        ("2 ** 4096 * 2 ** 4096", "bits"),
        ("10.0 ** 400", "too large"),
        ("1 / 0", "division by zero"),
        ("sqrt(-1)", "domain"),
        ("(-8) ** 0.5", "not a real number"),
        ("max()", "max"),
        ("1 +", "not an arithmetic expression"),
    ],
)
def test_calculator_refuses_what_is_not_bounded_arithmetic(expression, words):
    with pytest.raises(KernelError) as info:
        calculate(expression)
    assert info.value.errno == errno.EINVAL and words in info.value.message


def test_calculator_and_clock_through_the_manager(make_kernel):
    kernel = make_kernel()

    async def body():
        result = await call(kernel, "calculator", {"expression": "6*7"})
        before = time.time()
        clock = await call(kernel, "clock", {})
        return result, clock, before

    result, clock, before = run(body)
    assert result == {"result": 42}
    assert set(clock) == {"utc", "unix", "local"}
    assert clock["utc"].endswith("+00:00") and abs(clock["unix"] - before) < 60
    from datetime import datetime

    assert abs(datetime.fromisoformat(clock["local"]).timestamp() - clock["unix"]) < 1
    assert abs(datetime.fromisoformat(clock["utc"]).timestamp() - clock["unix"]) < 1


def test_arguments_are_validated_before_the_tool_runs(make_kernel):
    kernel = make_kernel()
    ran: list[Any] = []

    async def spy(call: ToolCall) -> Any:
        ran.append(call.arguments)
        return {}

    kernel.tools.add(ToolSpec("spy", "", {"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}}, "required": ["n"]}, spy))

    async def body():
        missing = await refused(errno.EINVAL, call(kernel, "calculator", {}))
        wrong = await refused(errno.EINVAL, call(kernel, "calculator", {"expression": 5}))
        extra = await refused(errno.EINVAL, call(kernel, "calculator", {"expression": "1", "x": 1}))
        big = await refused(errno.EINVAL, call(kernel, "spy", {"n": 4}))
        not_object = await refused(errno.EINVAL, call(kernel, "spy", [1]))
        unknown = await refused(errno.ENOENT, call(kernel, "teleport", {}))
        return missing, wrong, extra, big, not_object, unknown

    missing, wrong, extra, big, not_object, unknown = run(body)
    assert missing.message == "calculator: 'expression' is a required property"
    assert wrong.message == "calculator: 5 is not of type 'string' (at expression)"
    assert "Additional properties are not allowed ('x' was unexpected)" in extra.message
    assert big.message == "spy: 4 is greater than the maximum of 3 (at n)"
    assert "is not of type 'object'" in not_object.message
    assert "teleport" in unknown.message
    assert ran == []


def test_a_manifest_schema_must_be_a_valid_schema_of_an_object():
    for schema, words in [
        ({"type": "array"}, "object"),
        ({"type": "object", "properties": {"n": {"type": "integr"}}}, "invalid schema"),
        ([], "object"),
    ]:
        with pytest.raises(ValueError) as info:
            ToolSpec("t", "", schema, calculate_tool)  # type: ignore[arg-type]
        assert words in str(info.value)
    with pytest.raises(ValueError):
        ToolSpec("Bad-Name", "", {"type": "object"}, calculate_tool)


async def calculate_tool(call: ToolCall) -> Any:
    return {}


def test_the_agents_policy_decides_which_tools_it_may_use(make_kernel):
    kernel = make_kernel()

    async def body():
        agent = await mkdir(kernel, "a")
        await syscall(kernel, Sys.PERMISSIONS_WRITE, ROOT, agent, "tools clock memory_read\n")
        denied = await refused(errno.EPERM, call(kernel, "calculator", {"expression": "1"}, agent))
        clock = await call(kernel, "clock", {}, agent)
        free = await call(kernel, "calculator", {"expression": "1+1"})  # acting for nobody: no policy
        direct = await refused(errno.EPERM, kernel.tools.call(OWNER, agent, "calculator", {"expression": "1"}))
        return denied, clock, free, direct

    denied, clock, free, direct = run(body)
    assert "tools clock memory_read" in denied.message and "utc" in clock and free == {"result": 2}
    denials = audit(kernel, "deny")
    assert len(denials) == 2  # one per refusal: via the syscall and via the model's direct call
    assert all(d["syscall"] == "tool_call" and d["agent"] == "a" and d["errno"] == "EPERM" for d in denials)
    assert [t["errno"] for t in audit(kernel, "tool") if "errno" in t] == ["EPERM", "EPERM"]


def test_acting_for_an_agent_needs_write_on_its_prompt(make_kernel):
    kernel = make_kernel()

    async def body():
        agent = await mkdir(kernel, "a")
        await refused(errno.EACCES, call(kernel, "clock", {}, agent, OTHER))
        await call(kernel, "clock", {}, agent, OWNER)
        await call(kernel, "clock", {}, agent, ROOT)
        await syscall(kernel, Sys.AGENT_SETATTR, OWNER, agent, file_modes={"prompt": 0o622})
        return await call(kernel, "clock", {}, agent, OTHER)  # others may make it work now

    assert "utc" in run(body)
    (denial,) = audit(kernel, "deny")
    assert denial["syscall"] == "tool_call" and denial["uid"] == OTHER.uid and denial["errno"] == "EACCES"


# -- memory tools ------------------------------------------------------------------------------
def test_memory_write_then_read_through_the_store(make_kernel):
    kernel = make_kernel()
    store = kernel.memory.store

    async def body():
        agent = await mkdir(kernel, "a")
        wrote = await call(kernel, "memory_write", {"path": "notes.md", "content": "first\n"}, agent)
        await call(kernel, "memory_write", {"path": "notes.md", "content": "second\n"}, agent)
        await call(kernel, "memory_write", {"path": "notes.md", "content": "third\n", "append": True}, agent)
        read = await call(kernel, "memory_read", {"path": "notes.md"}, agent)
        ino = await kernel.memory.run(store.walk, agent.row.id, "notes.md")
        return agent, wrote, read, await kernel.memory.run(store.getattr, ino), await kernel.memory.run(store.versions, agent.row.id)

    agent, wrote, read, attr, versions = run(body)
    assert wrote == {"path": "notes.md", "bytes": 6}
    assert read == {"path": "notes.md", "content": "second\nthird\n"}
    assert (attr.uid, attr.gid, attr.mode & 0o7777, attr.size) == (OWNER.uid, OWNER.gid, 0o644, 13)
    assert [(v.path, v.n, v.size) for v in versions] == [("notes.md", 1, 6), ("notes.md", 2, 7), ("notes.md", 3, 13)]


def test_memory_tools_refuse_what_a_path_must_not_do(make_kernel):
    kernel = make_kernel()
    store = kernel.memory.store

    async def body():
        agent = await mkdir(kernel, "a")
        root = await kernel.memory.root(agent)
        await kernel.memory.run(store.mkdir, root, b"dir", 0o755, OWNER.uid, OWNER.gid)
        await kernel.memory.run(store.symlink, root, b"link", b"/etc/passwd", OWNER.uid, OWNER.gid)
        await kernel.memory.run(store.symlink, root, b"dlink", b"dir", OWNER.uid, OWNER.gid)
        await kernel.memory.run(store.create, root, b"locked", 0o444, OWNER.uid, OWNER.gid)
        write = "memory_write"
        await refused(errno.ELOOP, call(kernel, "memory_read", {"path": "link"}, agent))
        await refused(errno.ELOOP, call(kernel, write, {"path": "link", "content": "x"}, agent))
        await refused(errno.ELOOP, call(kernel, write, {"path": "dlink/x", "content": "x"}, agent))
        await refused(errno.EISDIR, call(kernel, "memory_read", {"path": "dir"}, agent))
        await refused(errno.ENOENT, call(kernel, write, {"path": "missing/x", "content": "x"}, agent))
        await refused(errno.EINVAL, call(kernel, write, {"path": "..", "content": "x"}, agent))
        await refused(errno.EACCES, call(kernel, write, {"path": "locked", "content": "x"}, agent))
        await refused(errno.EINVAL, call(kernel, "memory_read", {"path": "x"}))  # for no agent
        await call(kernel, write, {"path": "dir/../../escape.md", "content": "inside\n"}, agent)  # `..` stops at memory/
        return await call(kernel, "memory_read", {"path": "escape.md"}, agent)

    assert run(body)["content"] == "inside\n"


def test_memory_write_over_the_quota_changes_nothing(make_kernel):
    kernel = make_kernel()

    async def body():
        agent = await mkdir(kernel, "a")
        await syscall(kernel, Sys.PERMISSIONS_WRITE, ROOT, agent, "memory_quota 10\n")
        await call(kernel, "memory_write", {"path": "small", "content": "12345"}, agent)
        await refused(errno.EDQUOT, call(kernel, "memory_write", {"path": "small", "content": "x" * 11}, agent))
        await refused(errno.EDQUOT, call(kernel, "memory_write", {"path": "new", "content": "x" * 6}, agent))
        await refused(errno.ENOENT, call(kernel, "memory_read", {"path": "new"}, agent))
        return await call(kernel, "memory_read", {"path": "small"}, agent)

    assert run(body)["content"] == "12345"
    assert any(d["errno"] == "EDQUOT" for d in audit(kernel, "deny"))


def test_memory_read_returns_at_most_the_limit(make_kernel, monkeypatch):
    kernel = make_kernel()
    monkeypatch.setattr(params, "TOOL_READ_MAX_BYTES", 5)

    async def body():
        agent = await mkdir(kernel, "a")
        await remember(kernel, agent, "long", "abcdé" + "x" * 10)  # é is 2 bytes: the cut splits it
        return await call(kernel, "memory_read", {"path": "long"}, agent)

    assert run(body) == {"path": "long", "content": "abcd"}


def test_memory_search_own_and_shared_memory(make_kernel):
    kernel = make_kernel()

    async def body():
        reader, target = await mkdir(kernel, "reader"), await mkdir(kernel, "target")
        await remember(kernel, reader, "mine.md", "the blue teapot is on the shelf")
        await remember(kernel, target, "theirs.md", "the secret recipe uses saffron")
        own = await call(kernel, "memory_search", {"query": "teapot"}, reader)
        query = {"query": "saffron recipe", "agent": "target", "k": 2}
        await refused(errno.EACCES, call(kernel, "memory_search", query, reader))
        await syscall(kernel, Sys.PERMISSIONS_WRITE, OWNER, target, "share_memory reader\n")
        shared = await call(kernel, "memory_search", query, reader)
        await refused(errno.ENOENT, call(kernel, "memory_search", {"query": "x", "agent": "ghost"}, reader))
        return own, shared

    own, shared = run(body)
    assert [(p["path"], p["line"], p["text"]) for p in own["passages"]] == [("mine.md", 1, "the blue teapot is on the shelf")]
    assert [p["text"] for p in shared["passages"]] == ["the secret recipe uses saffron"]
    assert set(shared["passages"][0]) == {"path", "line", "score", "text"}


# -- external tools --------------------------------------------------------------------------------
ECHO = """\
print(json.dumps({"request": request, "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
                  "cwd": os.getcwd(), "files": os.listdir("."), "env": dict(os.environ)}))
"""


def test_an_external_tool_gets_the_call_on_stdin_in_a_fresh_directory(make_kernel, tools_dir):
    add_tool(tools_dir, "echo", ECHO, schema={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
    kernel = make_kernel(tools_dir=tools_dir)

    async def body():
        agent = await mkdir(kernel, "a")
        await refused(errno.EINVAL, call(kernel, "echo", {"town": "Oslo"}))
        return await call(kernel, "echo", {"city": "Oslo"}, agent), await call(kernel, "echo", {"city": "Rome"})

    result, second = run(body)
    assert result["request"] == {"tool": "echo", "arguments": {"city": "Oslo"}, "agent": "a", "uid": OWNER.uid}
    assert second["request"]["agent"] is None
    assert result["files"] == [] and result["cwd"] != second["cwd"]  # a new empty directory per run
    assert not os.path.exists(result["cwd"])  # removed afterwards
    assert set(result["env"]) <= {"PATH", "HOME", "LANG", "LC_CTYPE"} and result["env"]["HOME"] == result["cwd"]
    assert result["env"]["PATH"] == params.TOOL_PATH


@as_root
def test_external_tools_run_as_nobody_when_the_daemon_is_root(make_kernel, tools_dir):
    add_tool(tools_dir, "echo", ECHO)
    add_tool(tools_dir, "spy", "print(json.dumps({'readable': os.access(args['path'], os.R_OK)}))")
    kernel = make_kernel(tools_dir=tools_dir)

    async def body():
        who = await call(kernel, "echo", {})
        spied = await call(kernel, "spy", {"path": kernel.storage.path})
        return who, spied

    groups = os.getgroups()
    os.setgroups([0])  # a daemon started from a root shell has root's group: the tool must not keep it
    try:
        who, spied = run(body)
    finally:
        os.setgroups(groups)
    assert (who["uid"], who["gid"]) == (65534, 65534) and 0 not in who["groups"]
    assert spied == {"readable": False}  # the state directory is not the tool's to read


def test_a_slow_tool_is_killed_at_its_timeout(make_kernel, tools_dir):
    marker = f"marker-{uuid.uuid4().hex}"
    add_tool(tools_dir, "sleeper", "time.sleep(60)\nprint('{}')\n", timeout=0.5, command=["./sleeper.py", marker])
    kernel = make_kernel(tools_dir=tools_dir)
    timed_out = run(lambda: refused(errno.ETIMEDOUT, call(kernel, "sleeper", {})))
    assert "0.5 s" in timed_out.message
    still_running = [pid for pid in os.listdir("/proc") if pid.isdigit() and marker.encode() in _cmdline(pid)]
    assert still_running == []
    assert audit(kernel, "tool")[-1]["errno"] == "ETIMEDOUT"


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_a_failing_tool_is_eio_with_what_it_said(make_kernel, tools_dir):
    add_tool(tools_dir, "crash", "sys.stderr.write('the weather service is down\\n')\nsys.exit(3)\n")
    add_tool(tools_dir, "garbage", "print('this is not json')\n")
    add_tool(tools_dir, "killed", "os.kill(os.getpid(), 9)\n")
    kernel = make_kernel(tools_dir=tools_dir)

    async def body():
        crash = await refused(errno.EIO, call(kernel, "crash", {}))
        garbage = await refused(errno.EIO, call(kernel, "garbage", {}))
        killed = await refused(errno.EIO, call(kernel, "killed", {}))
        return crash, garbage, killed

    crash, garbage, killed = run(body)
    assert crash.message == "tool crash exited with status 3: the weather service is down"
    assert "did not print one JSON value" in garbage.message and "this is not json" in garbage.message
    assert "killed by signal 9" in killed.message


def test_too_much_output_is_eio(make_kernel, tools_dir, monkeypatch):
    monkeypatch.setattr(params, "TOOL_OUTPUT_MAX_BYTES", 1000)
    add_tool(tools_dir, "chatty", "print(json.dumps('x' * 5000))\n")
    kernel = make_kernel(tools_dir=tools_dir)
    assert "more than 1000 bytes" in run(lambda: refused(errno.EIO, call(kernel, "chatty", {}))).message


STAMP = """\
start = time.time()
time.sleep(0.3)
print(json.dumps({"start": start, "end": time.time()}))
"""


def test_concurrency_limit_runs_calls_one_after_the_other(make_kernel, tools_dir):
    add_tool(tools_dir, "stamp", STAMP, concurrency=1)
    kernel = make_kernel(tools_dir=tools_dir)

    async def body():
        results: list[dict] = []

        async def one() -> None:
            results.append(await call(kernel, "stamp", {}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            nursery.start_soon(one)
        return sorted(results, key=lambda r: r["start"])

    first, second = run(body, timeout=30)
    assert second["start"] >= first["end"]


def test_waiting_for_a_turn_counts_toward_the_timeout(make_kernel):
    kernel = make_kernel()

    async def slow(call: ToolCall) -> Any:
        await trio.sleep(0.6)
        return "done"

    kernel.tools.add(ToolSpec("slow", "", {"type": "object"}, slow, timeout=1.0, concurrency=1))
    outcomes: list[Any] = []

    async def one() -> None:
        try:
            outcomes.append(await kernel.tools.call(OWNER, None, "slow", {}))
        except KernelError as exc:
            outcomes.append(exc.errno)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            nursery.start_soon(one)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))  # virtual time: no wall-clock asserts
    assert outcomes == ["done", errno.ETIMEDOUT]  # 0.6 s waiting + 0.6 s running > 1.0 s


# -- manifests and reload ----------------------------------------------------------------------------
def test_bad_manifests_are_skipped_with_a_tool_error_line(make_kernel, tools_dir):
    add_tool(tools_dir, "good", "print('{}')\n")
    (tools_dir / "broken.json").write_text("{not json")
    (tools_dir / "missing.json").write_text(json.dumps({"command": ["./nowhere.py"]}))
    (tools_dir / "calculator.json").write_text(json.dumps({"command": ["./good.py"]}))
    (tools_dir / "renamed.json").write_text(json.dumps({"name": "other", "command": ["./good.py"]}))
    (tools_dir / "slowest.json").write_text(json.dumps({"command": ["./good.py"], "timeout": 10_000}))
    (tools_dir / "typo.json").write_text(json.dumps({"command": ["./good.py"], "shema": {}}))
    (tools_dir / "badschema.json").write_text(json.dumps({"command": ["./good.py"], "schema": {"type": "object", "required": "x"}}))
    kernel = make_kernel(tools_dir=tools_dir)
    errors = {Path(e["manifest"]).stem: e["message"] for e in audit(kernel, "tool_error")}
    assert set(errors) == {"broken", "missing", "calculator", "renamed", "slowest", "typo", "badschema"}
    assert "nowhere.py" in errors["missing"] and "built-in" in errors["calculator"] and "shema" in errors["typo"]
    assert [spec.name for _, spec in kernel.tools.served() if spec.manifest is not None] == ["good"]
    assert kernel.tools.tools["calculator"].manifest is None  # the built-in stays


def test_tools_reload_picks_up_changes_and_keeps_indexes(make_kernel, tools_dir):
    add_tool(tools_dir, "alpha", "print(json.dumps('alpha'))\n")
    kernel = make_kernel(tools_dir=tools_dir)
    tools = kernel.tools
    alpha = tools.index("alpha")

    async def reload(caller=ROOT) -> None:
        await syscall(kernel, Sys.KERNEL_CTL, caller, b"tools reload\n")

    async def body():
        add_tool(tools_dir, "beta", "print(json.dumps('beta'))\n")
        await refused(errno.ENOENT, call(kernel, "beta", {}))
        await refused(errno.EPERM, reload(OWNER))
        await reload()
        beta = await call(kernel, "beta", {})
        (tools_dir / "alpha.json").unlink()
        await reload()
        await refused(errno.ENOENT, call(kernel, "alpha", {}))
        gone = (tools.index("alpha"), tools.by_index(alpha))
        add_tool(tools_dir, "alpha", "print(json.dumps('alpha again'))\n")
        await reload()
        return beta, gone, await call(kernel, "alpha", {})

    beta, gone, again = run(body)
    assert beta == "beta" and gone == (None, None) and again == "alpha again"
    assert tools.index("alpha") == alpha and tools.index("beta") == alpha + 1  # indexes last for the mount
    assert [e["external"] for e in audit(kernel, "tools_reload")] == [["alpha", "beta"], ["beta"], ["alpha", "beta"]]


def test_reload_keeps_an_unchanged_tool(make_kernel, tools_dir):
    add_tool(tools_dir, "alpha", "print('1')\n")
    kernel = make_kernel(tools_dir=tools_dir)
    before = kernel.tools.spec("alpha")
    kernel.tools.reload()
    assert kernel.tools.spec("alpha") is before  # its semaphore still counts the calls in flight
    add_tool(tools_dir, "alpha", "print('1')\n", timeout=2)
    kernel.tools.reload()
    assert kernel.tools.spec("alpha") is not before and kernel.tools.spec("alpha").timeout == 2


# -- the audit log ------------------------------------------------------------------------------------
def test_every_call_writes_a_tool_line(make_kernel):
    kernel = make_kernel()

    async def body():
        agent = await mkdir(kernel, "a")
        await call(kernel, "calculator", {"expression": "1+2"})
        await call(kernel, "memory_write", {"path": "big", "content": "y" * 2000}, agent)
        await refused(errno.EINVAL, call(kernel, "calculator", {"expression": "1/0"}, agent))

    run(body)
    ok, big, failed = audit(kernel, "tool")
    assert ok["name"] == "calculator" and ok["agent"] is None and ok["uid"] == OWNER.uid
    assert json.loads(ok["arguments"]) == {"expression": "1+2"} and json.loads(ok["result"]) == {"result": 3}
    assert ok["duration_ms"] >= 0 and "error" not in ok
    assert big["agent"] == "a" and len(big["arguments"]) == params.TOOL_ERROR_CHARS + 1 and big["arguments"].endswith("…")
    assert failed["errno"] == "EINVAL" and failed["error"] == "calculator: division by zero" and "result" not in failed
