"""`aiosfs mcp`: the mount as an MCP server, driven by the SDK's own client.

A real mount (the fake backend, and the embedded model for one ask), the server as a
process of its own over stdio (`python -m aiosfs.cli mcp MOUNT`) and over streamable
HTTP (`--listen`), and `mcp.ClientSession` talking to it. Each test checks what came
back and what happened in the mount's files."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult
from mounting import Mount, mounted, needs_fuse, wait_for
from test_access import OTHER

pytestmark = [pytest.mark.mount, needs_fuse]

ROOT = Path(__file__).resolve().parent.parent
TOOLS = {
    "list_agents",
    "create_agent",
    "ask_agent",
    "chat",
    "read_context",
    "write_memory",
    "read_memory",
    "list_memory",
    "search_memory",
    "list_mount_tools",
    "call_mount_tool",
}
TOKEN = "s3cret-token-of-the-mcp-server"
# The server as another user: the interpreter and its packages live where other users
# may not read them (/root), so the child imports everything the server may load while
# it is still root (the SDK and anyio import lazily), then becomes the user.
BECOME = """
import importlib, os, pkgutil, sys, warnings

SKIP = ("test", ".v1", "mypy", "_pytest", "win32", "windows", "hypothesis", "mcp.cli", "__main__")

def load(name):
    if any(part in name for part in SKIP):
        return
    try:
        module = importlib.import_module(name)
    except (Exception, SystemExit):  # optional parts whose dependencies are not installed
        return
    for info in pkgutil.iter_modules(getattr(module, "__path__", None) or []):
        load(name + "." + info.name)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for package in ("encodings", "anyio", "trio", "mcp", "mcp_types", "pydantic", "pydantic_core", "starlette", "sse_starlette", "clients.mcp"):
        load(package)
from aiosfs.cli import main

uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([])
os.setresgid(gid, gid, gid)
os.setresuid(uid, uid, uid)
sys.exit(main(sys.argv[3:]))
"""


class Client:
    """An MCP client session, driven from the test's thread through an anyio portal."""

    def __init__(self, portal: BlockingPortal, session: ClientSession) -> None:
        self.portal = portal
        self.session = session

    def call(self, tool: str, /, timeout: float | None = None, **arguments: Any) -> CallToolResult:
        return self.portal.call(lambda: self.session.call_tool(tool, arguments, read_timeout_seconds=timeout))

    def ok(self, tool: str, /, **arguments: Any) -> Any:
        result = self.call(tool, **arguments)
        assert not result.is_error, result.content
        return result.structured_content

    def error(self, tool: str, /, **arguments: Any) -> str:
        result = self.call(tool, **arguments)
        assert result.is_error and result.structured_content is None, result
        [content] = result.content
        return str(content.text)  # type: ignore[union-attr]

    def tools(self) -> dict[str, Any]:
        return {tool.name: tool for tool in self.portal.call(self.session.list_tools).tools}

    def resources(self) -> list[str]:
        return [str(resource.uri) for resource in self.portal.call(self.session.list_resources).resources]

    def templates(self) -> list[str]:
        return [t.uri_template for t in self.portal.call(self.session.list_resource_templates).resource_templates]

    def read(self, uri: str) -> Any:
        [content] = self.portal.call(self.session.read_resource, uri).contents
        return content


@contextmanager
def connected(transport: AbstractContextManager[Any], portal: BlockingPortal) -> Iterator[Client]:
    with transport as (read, write), portal.wrap_async_context_manager(ClientSession(read, write)) as session:
        portal.call(session.initialize)
        yield Client(portal, session)


@contextmanager
def over_stdio(args: list[str], log: Path) -> Iterator[Client]:
    """A session with `python ARGS` as the server, spawned by the SDK's stdio client."""
    with open(log, "a") as errors, start_blocking_portal("asyncio") as portal:
        params = StdioServerParameters(command=sys.executable, args=args, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})
        with connected(portal.wrap_async_context_manager(stdio_client(params, errlog=errors)), portal) as client:
            yield client
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]


def mcp_args(root: Path, *extra: str) -> list[str]:
    return ["-m", "aiosfs.cli", "mcp", str(root), *extra]


@contextmanager
def over_http(url: str, headers: dict[str, str]) -> Iterator[Client]:
    with ExitStack() as stack:
        portal = stack.enter_context(start_blocking_portal("asyncio"))
        http = stack.enter_context(portal.wrap_async_context_manager(httpx2.AsyncClient(headers=headers)))
        yield stack.enter_context(connected(portal.wrap_async_context_manager(streamable_http_client(url, http_client=http)), portal))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def mcp(fs: Mount, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    with over_stdio(mcp_args(fs.root), tmp_path_factory.mktemp("mcp") / "server.log") as client:
        yield client


def status(agent: Path) -> tuple[str, int]:
    state, job = agent.joinpath("status").read_text().split()
    return state, int(job)


# -- tools -------------------------------------------------------------------------------
def test_every_tool_is_listed_with_a_description_and_an_input_schema(mcp: Client):
    tools = mcp.tools()
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.description and tool.input_schema["type"] == "object" and tool.output_schema is not None, tool.name
    ask = tools["ask_agent"].input_schema
    assert ask["required"] == ["agent", "message"] and "description" in ask["properties"]["message"]
    assert tools["list_agents"].annotations is not None and tools["list_agents"].annotations.read_only_hint is True


def test_create_agent_makes_the_directory_and_writes_its_config(mcp: Client, fs: Mount):
    made = mcp.ok("create_agent", name="writer", system="You are terse.\nAlways.", config={"temperature": 0, "memory_recall": True})
    agent = fs.agents / "writer"
    assert agent.is_dir() and agent.stat().st_uid == os.getuid()
    config = agent.joinpath("config").read_text()
    assert "system=You are terse.\\nAlways.\n" in config and "temperature=0.0\n" in config and "memory_recall=on\n" in config
    assert made["config"]["system"] == "You are terse.\\nAlways." and made["config"]["max_tokens"] == "256"
    assert mcp.error("create_agent", name="writer").startswith("EEXIST: the agent writer exists")
    again = mcp.ok("create_agent", name="writer", config={"max_tokens": 64}, exist_ok=True)
    assert again["config"]["max_tokens"] == "64" and again["config"]["system"] == "You are terse.\\nAlways."  # `>>`: the rest kept
    mcp.ok("create_agent", name="hidden", private=True)
    assert (fs.agents / "hidden").stat().st_mode & 0o777 == 0o700


def test_list_agents_shows_each_agent_and_the_callers_latest_job(mcp: Client, fs: Mount):
    mcp.ok("create_agent", name="lister")
    mcp.ok("ask_agent", agent="lister", message="ping")
    [agent] = [a for a in mcp.ok("list_agents")["agents"] if a["name"] == "lister"]
    state, job = status(fs.agents / "lister")
    mode = f"{(fs.agents / 'lister').stat().st_mode & 0o7777:04o}"  # 0777 less the server's umask
    assert agent == {"name": "lister", "owner_uid": os.getuid(), "mode": mode, "state": state, "job": job, "can_ask": True, "can_read": True}
    assert state == "done"


def test_ask_agent_is_a_turn_in_the_agents_conversation(mcp: Client, fs: Mount):
    mcp.ok("create_agent", name="talker")
    first = mcp.ok("ask_agent", agent="talker", message="hello there")
    assert first["answer"] == "turn 1: HELLO THERE" and first["job"] == status(fs.agents / "talker")[1]
    assert mcp.ok("ask_agent", agent="talker", message="{not json", max_tokens=64)["answer"] == "turn 2: {NOT JSON"
    messages = mcp.ok("read_context", agent="talker")["messages"]
    assert [m["content"] for m in messages] == ["hello there", "turn 1: HELLO THERE", "{not json", "turn 2: {NOT JSON"]
    assert [json.loads(line) for line in (fs.agents / "talker" / "context").read_text().splitlines()] == messages


def test_chat_is_stateless(mcp: Client, fs: Mount):
    mcp.ok("create_agent", name="chatter")
    messages = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "uno"}, {"role": "user", "content": "two"}]
    assert mcp.ok("chat", agent="chatter", messages=messages, temperature=0)["answer"] == "turn 2: TWO"
    assert (fs.agents / "chatter" / "context").read_text() == "" and mcp.ok("read_context", agent="chatter") == {"messages": []}


def test_memory_is_written_read_listed_and_searched(mcp: Client, fs: Mount):
    mcp.ok("create_agent", name="keeper")
    assert mcp.ok("write_memory", agent="keeper", path="notes/harbour.md", content="The harbour lights are blue.\n") == {
        "path": "notes/harbour.md",
        "bytes": 29,
    }
    mcp.ok("write_memory", agent="keeper", path="notes/harbour.md", content="\nGulls nest on the pier.\n", append=True)
    mcp.ok("write_memory", agent="keeper", path="errands.txt", content="buy rope")
    stored = fs.agents / "keeper" / "memory" / "notes" / "harbour.md"
    assert stored.read_text() == "The harbour lights are blue.\n\nGulls nest on the pier.\n"
    assert mcp.ok("read_memory", agent="keeper", path="notes/harbour.md")["content"] == stored.read_text()
    entries = mcp.ok("list_memory", agent="keeper")["entries"]
    assert [(e["path"], e["kind"]) for e in entries] == [("errands.txt", "file"), ("notes", "dir"), ("notes/harbour.md", "file")]
    assert [e["path"] for e in mcp.ok("list_memory", agent="keeper", path="notes")["entries"]] == ["notes/harbour.md"]
    [hit] = mcp.ok("search_memory", agent="keeper", query="gulls pier", k=1)["passages"]
    assert hit["path"] == "notes/harbour.md" and "Gulls" in hit["text"] and hit["rank"] == 1
    assert mcp.ok("search_memory", agent="keeper", query="zeppelin") == {"passages": []}


def test_the_mounts_tools_are_listed_and_run(mcp: Client, fs: Mount):
    served = {t["name"]: t for t in mcp.ok("list_mount_tools")["tools"]}
    assert {"calculator", "clock", "memory_read", "memory_search", "memory_write"} <= set(served)
    assert served["calculator"]["input_schema"] == json.loads((fs.root / "tools" / "calculator.schema").read_text())["schema"]
    assert mcp.ok("call_mount_tool", tool="calculator", arguments={"expression": "6*7"}) == {"result": {"result": 42}}
    mcp.ok("create_agent", name="tooluser")
    mcp.ok("write_memory", agent="tooluser", path="n.txt", content="hi")
    read = mcp.ok("call_mount_tool", tool="memory_read", arguments={"path": "n.txt"}, agent="tooluser")
    assert read == {"result": {"path": "n.txt", "content": "hi"}}
    assert mcp.error("call_mount_tool", tool="calculator", arguments={"expression": "6*"}).startswith("EINVAL: calculator:")
    assert mcp.error("call_mount_tool", tool="telepathy") == "ENOENT: the mount serves no tool 'telepathy' (list_mount_tools lists them)"


# -- resources ---------------------------------------------------------------------------------
def test_contexts_and_memory_files_are_resources(mcp: Client, fs: Mount):
    name = "res agent ü"  # escaped in URIs
    mcp.ok("create_agent", name=name)
    mcp.ok("ask_agent", agent=name, message="remember me")
    mcp.ok("write_memory", agent=name, path="deep/dir/note.md", content="a note")
    (fs.agents / name / "memory" / "blob.bin").write_bytes(b"\xff\x00\xfe")
    base = "aiosfs://agents/res%20agent%20%C3%BC"
    listed = mcp.resources()
    assert {f"{base}/context", f"{base}/memory/deep/dir/note.md", f"{base}/memory/blob.bin"} <= set(listed)
    assert set(mcp.templates()) == {"aiosfs://agents/{name}/context", "aiosfs://agents/{name}/memory/{+path}"}
    context = mcp.read(f"{base}/context")
    assert context.mime_type == "application/x-ndjson" and json.loads(context.text.splitlines()[0]) == {"role": "user", "content": "remember me"}
    assert mcp.read(f"{base}/memory/deep/dir/note.md").text == "a note"
    assert mcp.read(f"{base}/memory/blob.bin").blob == "/wD+"  # base64 of bytes that are not UTF-8
    with pytest.raises(MCPError, match="ENOENT"):
        mcp.read(f"{base}/memory/missing.md")
    with pytest.raises(MCPError):
        mcp.read(f"{base}/memory/../config")  # refused by the SDK before anything is read


# -- errors ----------------------------------------------------------------------------------
def test_an_errno_failure_is_a_tool_error_with_the_agents_error_line(mcp: Client, fs: Mount):
    mcp.ok("create_agent", name="strict")
    message = mcp.error("chat", agent="strict", messages=[{"role": "assistant", "content": "I speak last"}])
    line = fs.agents.joinpath("strict", "error").read_text().splitlines()[-1]
    assert line.startswith("EINVAL ") and message == "EINVAL: " + line.split(" ", 3)[3] and "the last message must be the user's" in message
    refused = mcp.error("create_agent", name="strict", exist_ok=True, config={"temprature": 1})
    assert refused.startswith("EINVAL: ") and "temprature" in refused
    assert mcp.error("ask_agent", agent="ghost", message="hi") == "ENOENT: there is no agent ghost (list_agents lists them, create_agent makes one)"
    assert mcp.error("read_memory", agent="strict", path="../config") == "EINVAL: '../config' leaves the agent's memory/"
    assert mcp.error("read_memory", agent="strict", path="nothing.md") == "ENOENT: No such file or directory"  # no error line: the errno's text


@pytest.mark.parametrize(
    ("tool", "arguments", "says"),
    [
        ("ask_agent", {"agent": 5}, "validation error"),
        ("search_memory", {"agent": "strict", "query": "x", "k": 99}, "less than or equal to 20"),
        ("chat", {"agent": "strict", "messages": [{"role": "wizard", "content": "hi"}]}, "validation error"),
        ("create_agent", {"name": "../etc"}, "EINVAL: '../etc' is not an agent name"),
        ("no_such_tool", {}, "Unknown tool"),
    ],
)
def test_bad_arguments_are_tool_errors_and_the_server_goes_on(mcp: Client, tool: str, arguments: dict[str, Any], says: str):
    assert says in mcp.error(tool, **arguments)
    assert "agents" in mcp.ok("list_agents")


# -- waiting: timeouts and cancellation ---------------------------------------------------------
def test_a_turn_past_the_timeout_is_cancelled(fs: Mount, tmp_path: Path):
    agent = fs.agents / "slowpoke"
    with over_stdio(mcp_args(fs.root, "--timeout", "1"), tmp_path / "server.log") as mcp:
        mcp.ok("create_agent", name="slowpoke", config={"ignore_eos": True, "max_tokens": 8192})
        started = time.monotonic()
        message = mcp.error("ask_agent", agent="slowpoke", message="count to a million")
        assert message.startswith("ETIMEDOUT: no answer within 1 s") and time.monotonic() - started < 30
        wait_for(lambda: status(agent)[0] == "cancelled", 30, "the turn to be cancelled")
        first = status(agent)[1]
        assert mcp.error("chat", agent="slowpoke", messages=[{"role": "user", "content": "again"}]).startswith("ETIMEDOUT")
        wait_for(lambda: status(agent)[0] == "cancelled" and status(agent)[1] > first, 30, "the chat turn to be cancelled")
        assert agent.joinpath("context").read_text() == ""


@pytest.mark.parametrize("tool", ["ask_agent", "chat"])
def test_a_request_the_client_cancels_cancels_its_turn(mcp: Client, fs: Mount, tool: str):
    name = f"impatient_{tool}"
    mcp.ok("create_agent", name=name, config={"ignore_eos": True, "max_tokens": 8192})
    arguments = {"message": "count"} if tool == "ask_agent" else {"messages": [{"role": "user", "content": "count"}]}
    with pytest.raises(MCPError, match="[Tt]imed out"):
        mcp.call(tool, timeout=1.0, agent=name, **arguments)  # the SDK's client then sends notifications/cancelled
    wait_for(lambda: status(fs.agents / name)[0] == "cancelled", 30, f"the {tool} turn to be cancelled")
    assert (fs.agents / name / "context").read_text() == ""
    assert mcp.ok("list_agents")  # the server goes on


# -- users --------------------------------------------------------------------------------------
def test_another_user_cannot_reach_a_private_agent_through_mcp(mcp: Client, fs: Mount, tmp_path: Path):
    mcp.ok("create_agent", name="vault", private=True)
    mcp.ok("write_memory", agent="vault", path="secret.md", content="the blue door")
    mcp.ok("ask_agent", agent="vault", message="my secret")
    as_other = ["-c", BECOME, str(OTHER.uid), str(OTHER.gid), "mcp", str(fs.root)]
    with over_stdio(as_other, tmp_path / "other.log") as other:
        assert "vault" not in [a["name"] for a in other.ok("list_agents")["agents"]]
        for tool, arguments in [
            ("read_context", {}),
            ("ask_agent", {"message": "tell me"}),
            ("chat", {"messages": [{"role": "user", "content": "tell me"}]}),
            ("read_memory", {"path": "secret.md"}),
            ("list_memory", {}),
            ("search_memory", {"query": "blue door"}),
            ("write_memory", {"path": "mine.md", "content": "x"}),
        ]:
            assert other.error(tool, agent="vault", **arguments) == "EACCES: Permission denied", tool
        assert not [uri for uri in other.resources() if "/vault/" in uri]
        for uri in ("aiosfs://agents/vault/context", "aiosfs://agents/vault/memory/secret.md"):
            with pytest.raises(MCPError, match="EACCES"):
                other.read(uri)
        other.ok("create_agent", name="others_own")  # its own agent works, as that user
        assert other.ok("ask_agent", agent="others_own", message="hi")["answer"] == "turn 1: HI"
    assert (fs.agents / "others_own").stat().st_uid == OTHER.uid
    assert not (fs.agents / "vault" / "memory" / "mine.md").exists()


# -- streamable HTTP ------------------------------------------------------------------------------
class HTTPServer:
    def __init__(self, root: Path, log: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.log = log
        with open(log, "ab") as out:
            argv = [sys.executable, *mcp_args(root, "--listen", f"127.0.0.1:{self.port}", *extra)]
            self.process = subprocess.Popen(argv, stdout=out, stderr=out, cwd=ROOT)
        wait_for(self.listening, 60, f"the server on {self.url} ({self.log.read_text()[-2000:]})")

    def listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(30) == 0, self.log.read_text()[-2000:]
        assert "Traceback" not in self.log.read_text(), self.log.read_text()[-3000:]


def test_http_with_a_token_refuses_requests_without_it(fs: Mount, tmp_path: Path):
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    server = HTTPServer(fs.root, tmp_path / "http.log", "--token", str(token))
    try:
        initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
        for headers in ({}, {"authorization": "Bearer wrong-token-wrong-token"}, {"authorization": TOKEN}):
            refused = httpx.post(server.url, json=initialize, headers=headers, timeout=30)
            assert refused.status_code == 401 and "bearer token is required" in refused.json()["detail"], headers
        with over_http(server.url, {"Authorization": f"Bearer {TOKEN}"}) as mcp:
            assert set(mcp.tools()) == TOOLS
            assert mcp.ok("call_mount_tool", tool="calculator", arguments={"expression": "2**10"}) == {"result": {"result": 1024}}
            mcp.ok("create_agent", name="web")
            assert mcp.ok("ask_agent", agent="web", message="over http")["answer"] == "turn 1: OVER HTTP"
    finally:
        server.stop()


def test_http_on_loopback_needs_no_token(fs: Mount, tmp_path: Path):
    server = HTTPServer(fs.root, tmp_path / "http.log")
    try:
        with over_http(server.url, {}) as mcp:
            assert "agents" in mcp.ok("list_agents")
    finally:
        server.stop()


def test_an_exposed_address_without_a_token_is_refused_at_start(fs: Mount, tmp_path: Path):
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *mcp_args(fs.root, *args)], capture_output=True, text=True, timeout=60, cwd=ROOT)

    exposed = run("--listen", f"0.0.0.0:{free_port()}")
    assert exposed.returncode != 0 and "not a loopback address" in exposed.stderr and "--token FILE" in exposed.stderr
    weak = tmp_path / "weak"
    weak.write_text("short")
    weak.chmod(0o600)
    assert "at least 16 characters" in run("--listen", f"0.0.0.0:{free_port()}", "--token", str(weak)).stderr
    assert run("--token", str(weak)).returncode == 2  # a token guards --listen only
    unmounted = subprocess.run([sys.executable, *mcp_args(tmp_path)], capture_output=True, text=True, timeout=60, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert unmounted.returncode != 0 and "is not a live aiosfs mount" in unmounted.stderr


# -- the embedded model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_fs(tmp_path_factory: pytest.TempPathFactory, model: Path) -> Iterator[Mount]:
    with mounted(tmp_path_factory.mktemp("model"), "--model", str(model), "--threads", "2", "--slots", "2", "--ctx", "512") as mount:
        yield mount


@pytest.mark.model
def test_an_agent_on_the_embedded_model_answers(model_fs: Mount, tmp_path: Path):
    with over_stdio(mcp_args(model_fs.root), tmp_path / "server.log") as mcp:
        mcp.ok("create_agent", name="geo", system="You are a helpful assistant.", config={"temperature": 0, "max_tokens": 24})
        answer = mcp.ok("ask_agent", agent="geo", message="What is the capital of France?")["answer"]
        assert "Paris" in answer
        assert mcp.ok("read_context", agent="geo")["messages"][1] == {"role": "assistant", "content": answer}
