"""MCP servers as tools: names, schemas and results without a server; then real
mounts with real servers (the reference mcp-server-time and mcp-server-git, and
tests/mcp_tools_server.py over stdio and streamable HTTP): calls from bash, validation,
policy, crashes, hangs, a server that never starts, `tools reload`, and the model
calling an MCP tool in its tool loop."""

from __future__ import annotations

import base64
import datetime as dt
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mcp_types as types
import pytest
from mounting import Mount, alive, gone, has_open, mounted, needs_fuse, needs_root, sh, wait_for

from kernel.errors import KernelError
from kernel.tools.mcptools import file_name, input_schema, result_value, tool_specs
from kernel.tools.spec import ToolCall, name_fits

IS_ROOT = os.geteuid() == 0
SERVER = Path(__file__).with_name("mcp_tools_server.py").absolute()
TOKEN = "open-sesame-42"


# -- without a server ------------------------------------------------------------------------------
def test_mcp_tool_names_become_file_names():
    assert file_name("get_current_time") == "get_current_time"
    assert file_name("Odd.Name") == "Odd_Name" and file_name("a/b c") == "a_b_c"
    assert file_name("schema") == "schema_"  # time.schema would read as the schema file of a tool "time"
    assert file_name("x" * 65) == ""
    assert name_fits("time.get_current_time", "time") and name_fits("my-srv.Tool-2", "my-srv")
    assert not name_fits("time.get_current_time")  # a dotted name is only an MCP server's
    assert not name_fits("git.status", "time") and not name_fits("time.a.b", "time") and not name_fits("time.", "time")


def test_input_schemas_are_taken_as_objects_or_left_out():
    assert input_schema({"properties": {"x": {"type": "string"}}}) == {"type": "object", "properties": {"x": {"type": "string"}}}
    for bad, words in (({"type": "string"}, "not an object"), ({"type": "object", "required": 3}, "invalid"), ([], "not a JSON object")):
        with pytest.raises(ValueError, match=words):
            input_schema(bad)


def test_a_listing_becomes_specs_named_server_dot_tool(caplog):
    def tool(name: str, schema: dict[str, Any]) -> types.Tool:
        return types.Tool(name=name, description=f"the {name} tool", input_schema=schema)

    async def never(call: ToolCall) -> Any:
        raise AssertionError("not called")

    listed = [
        tool("ok", {"type": "object"}),
        tool("Odd.Name", {"type": "object"}),
        tool("Odd/Name", {"type": "object"}),  # maps to the same file name: left out
        tool("scalar", {"type": "integer"}),  # not an object: left out
    ]
    specs = tool_specs("srv", listed, None, 7.0, lambda name: never)
    assert [(s.name, s.server, s.timeout) for s in specs] == [("srv.ok", "srv", 7.0), ("srv.Odd_Name", "srv", 7.0)]
    assert "Odd/Name" in caplog.text and "scalar" in caplog.text
    only = tool_specs("srv", listed, ["ok", "missing"], 7.0, lambda name: never)
    assert [s.name for s in only] == ["srv.ok"] and "no tools named missing" in caplog.text


def test_results_become_json_values():
    text = types.TextContent(type="text", text="hello")
    image = types.ImageContent(type="image", data=base64.b64encode(b"12345").decode(), mime_type="image/png")
    resource = types.EmbeddedResource(type="resource", resource=types.TextResourceContents(uri="file:///a.txt", text="body", mime_type="text/plain"))

    def value(**fields: Any) -> Any:
        return result_value("srv.t", types.CallToolResult(**fields))

    assert value(content=[text], structured_content={"a": 1}) == {"a": 1}  # structured content wins
    assert value(content=[text]) == "hello"
    assert value(content=[text, image]) == ["hello", {"type": "image", "mime_type": "image/png", "bytes": 5}]
    assert value(content=[resource]) == {"type": "resource", "uri": "file:///a.txt", "mime_type": "text/plain", "text": "body"}
    assert value(content=[]) is None
    with pytest.raises(KernelError) as info:
        value(content=[types.TextContent(type="text", text="no such zone")], is_error=True)
    assert info.value.errno == errno.EIO and info.value.message == "srv.t: no such zone"


# -- on a real mount -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def servers(fs: Mount) -> dict[str, dict[str, str]]:
    """The `mcp` lines of kernel/ps: name → {transport, pid, state, restarts, tools}."""
    rows = {}
    for line in (fs.root / "kernel" / "ps").read_text().splitlines():
        if line.startswith("mcp "):
            _, name, *pairs = line.split()
            rows[name] = dict(pair.split("=", 1) for pair in pairs)
    return rows


def wait_ready(fs: Mount, *names: str, timeout: float = 60) -> None:
    wait_for(lambda: all(servers(fs).get(n, {}).get("state") == "ready" for n in names), timeout, f"MCP servers {names} ready")


def call(fs: Mount, tool: str, request: object) -> tuple[dict[str, Any], str]:
    """(the answer line, cat's exit status line) of one call written to tools/TOOL from bash."""
    result = sh(f"exec 3<>{fs.root}/tools/{tool}; echo '{json.dumps(request)}' >&3; cat <&3; echo \"rc=$?\"")
    line, status = result.stdout.splitlines()
    return json.loads(line), status


def audit(fs: Mount, event: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, (fs.root / "kernel" / "log").read_text().splitlines()) if e["event"] == event]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("repo")
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    (path / "untracked-notes.txt").write_text("not added\n")
    return path


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """tests/mcp_tools_server.py over streamable HTTP, checking a bearer token: (url, key file)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(SERVER), "--http", str(port), "--token", TOKEN], stderr=subprocess.DEVNULL)
    key = tmp_path_factory.mktemp("key") / "web.key"
    key.write_text(TOKEN + "\n")
    key.chmod(0o600)
    try:
        wait_for(lambda: listening(port), 30, "the HTTP MCP server to listen")
        yield f"http://127.0.0.1:{port}/mcp", key
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def fs(tmp_path_factory: pytest.TempPathFactory, repo: Path, web: tuple[str, Path]) -> Iterator[Mount]:
    url, key = web
    base = tmp_path_factory.mktemp("mcp")
    tables = [
        'name = "time"\ncommand = "mcp-server-time"\nargs = ["--local-timezone", "UTC"]\n',
        f'name = "git"\ncommand = "mcp-server-git"\nargs = ["--repository", "{repo}"]\n',
        f'name = "test"\ncommand = "{sys.executable}"\nargs = ["{SERVER}"]\ntimeout = 2\nping = 1\n',
        f'name = "crashy"\ncommand = "{sys.executable}"\nargs = ["{SERVER}"]\ntools = ["sleep", "pid"]\n',
        f'name = "web"\nurl = "{url}"\napi_key_file = "{key}"\n',
        f'name = "badkey"\nurl = "{url}"\nheaders = {{ Authorization = "Bearer wrong" }}\n',
    ]
    if IS_ROOT:
        tables.append('name = "whoami"\ncommand = "/bin/sh"\nargs = ["-c", "id -u >&2; echo HOME=$HOME >&2; exit 3"]\nuser = "nobody"\n')
    config = base / "aiosfs.toml"
    config.write_text("".join(f"[[mcp]]\n{table}\n" for table in tables))
    with mounted(base, "--backend", "fake", "--config", str(config)) as mount:
        yield mount


@needs_fuse
@pytest.mark.mount
def test_the_time_server_answers_in_a_named_zone(fs: Mount) -> None:
    wait_ready(fs, "time")
    assert {"time.get_current_time", "time.get_current_time.schema", "time.convert_time"} <= set(os.listdir(fs.root / "tools"))
    answer, status = call(fs, "time.get_current_time", {"timezone": "Asia/Tokyo"})
    assert status == "rc=0" and answer["ok"] is True, answer
    result = answer["result"]
    assert result["timezone"] == "Asia/Tokyo"
    when = dt.datetime.fromisoformat(result["datetime"])
    assert when.utcoffset() == dt.timedelta(hours=9)
    assert abs((when - dt.datetime.now(dt.UTC)).total_seconds()) < 120
    lines = [e for e in audit(fs, "tool") if e["name"] == "time.get_current_time"]
    assert lines and json.loads(lines[-1]["arguments"]) == {"timezone": "Asia/Tokyo"} and "Asia/Tokyo" in lines[-1]["result"]


@needs_fuse
@pytest.mark.mount
def test_the_schema_file_is_the_servers_input_schema(fs: Mount) -> None:
    wait_ready(fs, "time")
    described = json.loads((fs.root / "tools" / "time.get_current_time.schema").read_text())
    assert described["name"] == "time.get_current_time" and "time" in described["description"].lower()
    assert described["schema"]["type"] == "object" and described["schema"]["required"] == ["timezone"]
    assert described["schema"]["properties"]["timezone"]["type"] == "string"


@needs_fuse
@pytest.mark.mount
def test_a_bad_argument_is_einval_before_the_server_is_called(fs: Mount) -> None:
    wait_ready(fs, "test")
    before, _ = call(fs, "test.calls", {})
    answer, status = call(fs, "test.sleep", {"seconds": "long"})
    assert answer["ok"] is False and answer["errno"] == "EINVAL" and "'long' is not of type 'number'" in answer["error"] and status == "rc=1"
    after, _ = call(fs, "test.calls", {})
    assert after["result"]["result"] == before["result"]["result"] + 1  # only the second count reached it
    error, _ = call(fs, "test.fail", {"message": "no such thing"})  # the server's isError
    assert error["errno"] == "EIO" and "no such thing" in error["error"]


@needs_fuse
@pytest.mark.mount
def test_the_git_server_sees_an_untracked_file(fs: Mount, repo: Path) -> None:
    wait_ready(fs, "git")
    answer, status = call(fs, "git.git_status", {"repo_path": str(repo)})
    assert status == "rc=0" and answer["ok"] is True, answer
    assert "untracked-notes.txt" in answer["result"] and "Untracked" in answer["result"]


@needs_fuse
@pytest.mark.mount
def test_names_results_and_the_tools_filter(fs: Mount) -> None:
    wait_ready(fs, "test", "crashy")
    tools = set(os.listdir(fs.root / "tools"))
    assert "test.Odd_Name" in tools and "test.fail" in tools
    assert {n for n in tools if n.startswith("crashy.")} == {"crashy.sleep", "crashy.pid", "crashy.sleep.schema", "crashy.pid.schema"}
    odd, _ = call(fs, "test.Odd_Name", {})
    assert odd == {"ok": True, "result": {"result": "odd"}}  # the structured content, as the server wraps a str
    picture, _ = call(fs, "test.picture", {})
    assert picture["result"] == [{"type": "image", "mime_type": "image/png", "bytes": 67}, "one pixel"]
    assert servers(fs)["crashy"]["tools"] == "2" and servers(fs)["test"]["transport"] == "stdio"


@needs_fuse
@pytest.mark.mount
def test_tools_come_and_go_when_the_server_says_they_changed(fs: Mount) -> None:
    wait_ready(fs, "test")
    tools = fs.root / "tools"
    assert "test.grown" not in os.listdir(tools)
    assert call(fs, "test.grow", {})[0]["ok"] is True
    wait_for(lambda: "test.grown" in os.listdir(tools), 10, "test.grown to appear")
    assert call(fs, "test.grown", {})[0]["result"] == {"result": "grown"}
    assert call(fs, "test.shrink", {})[0]["ok"] is True
    wait_for(lambda: "test.grown" not in os.listdir(tools), 10, "test.grown to go")
    with pytest.raises(FileNotFoundError):
        os.open(tools / "test.grown", os.O_RDWR)


@needs_fuse
@pytest.mark.mount
def test_the_policy_applies_to_mcp_tools(fs: Mount) -> None:
    wait_ready(fs, "time")
    for name, tools in (("limited", "calculator"), ("timely", "calculator time.get_current_time")):
        fs.agent(name)
        (fs.agents / name / "permissions").write_text(f"tools {tools}\n")
    refused, status = call(fs, "time.get_current_time", {"agent": "limited", "arguments": {"timezone": "UTC"}})
    assert refused["errno"] == "EPERM" and "time.get_current_time is not allowed" in refused["error"] and status == "rc=1"
    denials = [e for e in audit(fs, "deny") if e.get("agent") == "limited"]
    assert denials and "time.get_current_time" in denials[-1]["message"]
    allowed, _ = call(fs, "time.get_current_time", {"agent": "timely", "arguments": {"timezone": "UTC"}})
    assert allowed["ok"] is True and allowed["result"]["timezone"] == "UTC"
    assert audit(fs, "tool")[-1]["agent"] == "timely"


@needs_fuse
@pytest.mark.mount
def test_a_server_killed_during_a_call_restarts(fs: Mount) -> None:
    wait_ready(fs, "crashy")
    first = servers(fs)["crashy"]
    assert first["restarts"] == "0"
    pid = int(first["pid"])
    ino = os.stat(fs.root / "tools" / "crashy.sleep").st_ino
    script = f'exec 3<>{fs.root}/tools/crashy.sleep; echo \'{{"seconds": 30}}\' >&3; cat <&3; echo "rc=$?"'
    caller = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: servers(fs)["crashy"]["calls"] == "1", 10, "the call to be in flight")
    os.kill(pid, signal.SIGKILL)
    out, err = caller.communicate(timeout=20)
    line, status = out.splitlines()
    assert json.loads(line)["errno"] == "EIO" and "stopped during the call" in json.loads(line)["error"] and status == "rc=1"
    assert "crashy.sleep" in os.listdir(fs.root / "tools")  # listed while it restarts, with the same inode
    wait_for(lambda: servers(fs)["crashy"]["state"] == "ready" and servers(fs)["crashy"]["restarts"] == "1", 20, "crashy to restart")
    again, status = call(fs, "crashy.pid", {})
    assert status == "rc=0" and again["result"]["result"] == int(servers(fs)["crashy"]["pid"]) != pid
    assert os.stat(fs.root / "tools" / "crashy.sleep").st_ino == ino
    assert any(e["server"] == "crashy" and e["action"] == "exit" for e in audit(fs, "mcp"))


@needs_fuse
@pytest.mark.mount
def test_a_call_past_its_timeout_is_etimedout_and_a_hung_server_restarts(fs: Mount) -> None:
    wait_ready(fs, "test")
    before = servers(fs)["test"]
    started = time.monotonic()
    answer, status = call(fs, "test.sleep", {"seconds": 20})
    assert answer["errno"] == "ETIMEDOUT" and status == "rc=1" and time.monotonic() - started < 10
    quick, _ = call(fs, "test.sleep", {"seconds": 0})  # the server was kept: it answers the next call
    assert quick["ok"] is True and servers(fs)["test"]["restarts"] == before["restarts"]
    assert (fs.root / "kernel" / "status").read_text().count("test:ready") == 1
    pid = int(before["pid"])
    os.kill(pid, signal.SIGSTOP)  # hung for good: its pings go unanswered
    try:
        wait_for(lambda: servers(fs)["test"]["state"] != "ready", 10, "the hung server to be noticed")
        stopped, _ = call(fs, "test.pid", {})
        assert stopped["errno"] == "EIO" and "not running" in stopped["error"]
        wait_for(lambda: servers(fs)["test"]["state"] == "ready", 20, "the hung server to be replaced")
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGCONT)
    assert gone(pid, 5)  # killed, not left stopped
    assert int(servers(fs)["test"]["restarts"]) == int(before["restarts"]) + 1
    assert call(fs, "test.pid", {})[0]["ok"] is True


@needs_fuse
@pytest.mark.mount
def test_an_http_server_with_a_bearer_token(fs: Mount) -> None:
    wait_ready(fs, "web")
    answer, status = call(fs, "web.pid", {})
    assert status == "rc=0" and isinstance(answer["result"]["result"], int)
    row = servers(fs)["web"]
    assert row["transport"] == "http" and row["pid"] == "-" and row["tools"] == "8"
    wait_for(lambda: servers(fs)["badkey"]["state"] == "failed", 20, "the server refusing a wrong token to fail")
    assert "badkey:failed" in (fs.root / "kernel" / "status").read_text() and "HTTP 401 Unauthorized" in fs.log_text()
    assert TOKEN not in fs.log_text() and TOKEN not in (fs.root / "kernel" / "log").read_text()


@needs_fuse
@pytest.mark.mount
def test_tools_reload_keeps_mcp_tools(fs: Mount) -> None:
    wait_ready(fs, "time")
    ino = os.stat(fs.root / "tools" / "time.get_current_time").st_ino
    assert sh(f"echo 'tools reload' > {fs.root}/kernel/ctl").returncode == 0
    assert "time.get_current_time" in os.listdir(fs.root / "tools")
    assert os.stat(fs.root / "tools" / "time.get_current_time").st_ino == ino
    assert call(fs, "time.get_current_time", {"timezone": "UTC"})[0]["ok"] is True


@needs_fuse
@pytest.mark.mount
@needs_root
def test_a_server_runs_as_its_user_with_its_stderr_in_the_log(fs: Mount) -> None:
    wait_for(lambda: any(e["server"] == "whoami" and e["action"] == "fail" for e in audit(fs, "mcp")), 20, "whoami to fail")
    failure = next(e for e in audit(fs, "mcp") if e["server"] == "whoami" and e["action"] == "fail")
    assert "65534" in failure["message"] and "HOME=/nonexistent" in failure["message"]  # `id -u` said so, on its stderr
    assert re.search(r"MCP server whoami could not start: .*its last stderr: 65534", fs.log_text())


# -- mounts of their own ---------------------------------------------------------------------------
@needs_fuse
@pytest.mark.mount
def test_a_server_that_never_starts_leaves_the_mount_serving(tmp_path: Path) -> None:
    config = tmp_path / "aiosfs.toml"
    config.write_text('[[mcp]]\nname = "nothere"\ncommand = "aiosfs-no-such-mcp-server"\n\n[[mcp]]\nname = "time"\ncommand = "mcp-server-time"\n')
    with mounted(tmp_path, "--backend", "fake", "--config", str(config)) as fs:
        wait_ready(fs, "time")
        status = (fs.root / "kernel" / "status").read_text()
        assert "mcp=nothere:failed,time:ready" in status
        assert "MCP server nothere could not start: command 'aiosfs-no-such-mcp-server' not found" in fs.log_text()
        answer, _ = call(fs, "calculator", {"expression": "6*7"})
        assert answer == {"ok": True, "result": {"result": 42}}
        row = servers(fs)["nothere"]
        assert (row["transport"], row["pid"], row["state"], row["tools"]) == ("stdio", "-", "failed", "0")
        pid = int(servers(fs)["time"]["pid"])
    assert gone(pid, 5), "the unmount left the MCP server running"


@needs_fuse
@pytest.mark.mount
@pytest.mark.model
def test_the_model_calls_an_mcp_tool_in_its_tool_loop(tmp_path: Path, model: Path) -> None:
    config = tmp_path / "aiosfs.toml"
    config.write_text('[[mcp]]\nname = "time"\ncommand = "mcp-server-time"\n')
    args = ("--model", str(model), "--threads", "2", "--slots", "2", "--ctx", "1024", "--config", str(config))
    with mounted(tmp_path, *args) as fs:
        wait_ready(fs, "time")
        agent = fs.agent("clockwork")
        settings = ["temperature=0", "max_tokens=96", "tools=time.get_current_time", "tool_choice=time.get_current_time"]
        (agent / "config").write_text("\n".join([*settings, "system=Use the tool to tell the time."]) + "\n")
        events = subprocess.Popen(["bash", "-c", _UNTIL_END.format(events=agent / "events")], stdout=subprocess.PIPE, text=True)
        wait_for(lambda: has_open(events.pid, agent / "events"), 10, "the events reader to open")
        result = sh(f"echo 'What time is it in Tokyo (Asia/Tokyo)?' > {agent}/prompt && cat {agent}/output && cat {agent}/status", timeout=300)
        assert result.returncode == 0, result.stderr
        seen = [json.loads(line) for line in events.communicate(timeout=60)[0].splitlines()]
        lines = [e for e in audit(fs, "tool") if e["agent"] == "clockwork"]
    calls = [e for e in seen if e["event"] == "tool_call"]
    results = [e for e in seen if e["event"] == "tool_result"]
    assert calls and calls[0]["tool"] == "time.get_current_time" and set(calls[0]["arguments"]) == {"timezone"}
    assert results and results[0]["tool"] == "time.get_current_time"
    assert results[0]["ok"] or results[0]["errno"] == "EIO"  # a zone the server does not know is its error, shown to the model
    assert seen[-1]["event"] == "done"
    assert lines and {e["name"] for e in lines} == {"time.get_current_time"}  # the audit line of each call
    assert json.loads(lines[0]["arguments"]) == calls[0]["arguments"] and len(lines) == len(calls)


_UNTIL_END = """while read -r line; do echo "$line"; case "$line" in *'"event": "done"'*|*'"event": "failed"'*) break;; esac; done < {events}"""
