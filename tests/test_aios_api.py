"""`aiosfs aios-api`: the AIOS kernel's wire protocol, on a real mount with the embedded
model. Each test posts the JSON bodies the Cerebrum SDK sends (../shared/design/
aios-protocol.md, appendix A) to a gateway process and checks what comes back, and
what happened in the mount."""

from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from mounting import Mount, mounted, wait_for
from test_access import OTHER, OWNER, User

from clients.mountclient import FileError, dir_name, unescape

TOKENS = 24  # max_new_tokens of the tests' chats: short answers keep the module quick
WEATHER = {
    "type": "function",
    "function": {
        "name": "demo_author/weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {
    "type": "function",
    "function": {"name": "demo_author/clock", "description": "The current time", "parameters": {"type": "object", "properties": {}}},
}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Gateway:
    """One `aiosfs aios-api` process, as root or (forked, setuid) as another user."""

    def __init__(self, root: Path, log: Path, user: User | None = None, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        argv = ["aios-api", str(root), "--listen", f"127.0.0.1:{self.port}", *extra]
        out = open(log, "ab")
        if user is None:
            self.process: subprocess.Popen[bytes] | None = subprocess.Popen([sys.executable, "-m", "aiosfs.cli", *argv], stdout=out, stderr=out)
            self.pid = self.process.pid
        else:
            self.process = None
            self.pid = _fork_as(user, argv, out.fileno())
        out.close()

    def wait_ready(self, headers: dict[str, str] | None = None) -> None:
        def up() -> bool:
            try:
                return httpx.get(self.url + "/status", headers=headers, timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 60, f"the gateway on {self.url} (log: {self.log.read_text()[-2000:]})")

    def post(self, body: Any, timeout: float = 300, **kwargs: Any) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(
            self.url + "/query", content=content, headers={"content-type": "application/json"} | kwargs.pop("headers", {}), timeout=timeout
        )

    def query(self, body: dict[str, Any]) -> Any:
        response = self.post(body)
        assert response.status_code == 200, response.text
        return response.json()

    def stop(self) -> None:
        os.kill(self.pid, signal.SIGTERM)
        if self.process is not None:
            assert self.process.wait(30) == 0, self.log.read_text()[-2000:]
        else:
            _, status = os.waitpid(self.pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, self.log.read_text()[-2000:]
        assert "Traceback" not in self.log.read_text(), self.log.read_text()[-3000:]


def _fork_as(user: User, argv: list[str], log_fd: int) -> int:
    """The gateway in a child that became `user`. The interpreter and its packages live
    where other users may not read them (/root), so the child imports what the gateway
    uses while it is still root (hypercorn imports its protocols at import time), then
    runs the command in the process it forked."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        import encodings.idna  # noqa: F401

        import hypercorn.config  # noqa: F401
        import hypercorn.trio  # noqa: F401

        import clients.aios.server  # noqa: F401
        from aiosfs.cli import main

        os.setgroups(list(user.groups))
        os.setgid(user.gid)
        os.setuid(user.uid)
        code = main(argv)
    except BaseException as exc:  # noqa: B036 (whatever happens, the child must not return into pytest)
        os.write(2, f"gateway child failed: {exc!r}\n".encode())
    finally:
        os._exit(code)


def llm(agent: str, messages: list[dict[str, str]], action: str = "chat", **fields: Any) -> dict[str, Any]:
    """An llm query exactly as the SDK sends it: every field present."""
    data = {
        "query_class": "llm",
        "llms": None,
        "messages": messages,
        "tools": None,
        "action_type": action,
        "temperature": 0.0,
        "max_new_tokens": TOKENS,
        "message_return_type": "text",
        "response_format": None,
    } | fields
    return {"query_type": "llm", "agent_name": agent, "query_data": data}


def memory(agent: str, op: str, **params: Any) -> dict[str, Any]:
    return {"query_type": "memory", "agent_name": agent, "query_data": {"query_class": "memory", "operation_type": op, "params": params}}


def storage(agent: str, op: str, **params: Any) -> dict[str, Any]:
    return {"query_type": "storage", "agent_name": agent, "query_data": {"query_class": "storage", "params": params, "operation_type": op}}


def tool(agent: str, *calls: dict[str, Any]) -> dict[str, Any]:
    return {"query_type": "tool", "agent_name": agent, "query_data": {"query_class": "tool", "tool_calls": list(calls)}}


def envelope_keys(body: dict[str, Any]) -> None:
    assert set(body) == {"response", "start_times", "end_times", "waiting_times", "turnaround_times"}


def stats(mount: Mount) -> dict[str, float]:
    return {k: float(v) for k, v in (line.split() for line in (mount.root / "kernel" / "stats").read_text().splitlines())}


# -- names ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a1", "demo_author/geo", "100%/x", ".", "..", "...", "é/ü", "a\0b", "%2F"])
def test_agent_names_map_to_directory_names_reversibly(name: str):
    directory = dir_name(name)
    assert "/" not in directory and "\0" not in directory and directory not in (".", "..")
    assert unescape(directory) == name


def test_names_that_cannot_be_directories_are_refused():
    for name, code in (("", errno.EINVAL), ("x" * 200 + "/" * 30, errno.ENAMETOOLONG)):
        with pytest.raises(FileError) as info:
            dir_name(name)
        assert info.value.errno == code


# -- the mount and its gateway ---------------------------------------------------------------
@pytest.fixture(scope="module")
def fs(require_fuse: None, tmp_path_factory: pytest.TempPathFactory, model: Path) -> Iterator[Mount]:
    base = tmp_path_factory.mktemp("aios")
    with mounted(base, "--model", str(model), "--threads", "2", "--slots", "8", "--ctx", "1024") as mount:
        yield mount


@pytest.fixture(scope="module")
def api(fs: Mount, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = Gateway(fs.root, tmp_path_factory.mktemp("gateway") / "gateway.log")
    gateway.wait_ready()
    yield gateway
    gateway.stop()


# -- llm ---------------------------------------------------------------------------------------
def test_chat_answers_statelessly_in_the_agents_own_directory(api: Gateway, fs: Mount):
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is the capital of France?"}]
    body = api.query(llm("demo_author/geo", messages))
    envelope_keys(body)
    response = body["response"]
    assert response["response_class"] == "llm" and response["finished"] is True and response["error"] is None
    assert response["status_code"] == 200 and response["tool_calls"] is None
    assert isinstance(response["response_message"], str) and "Paris" in response["response_message"]
    agent = fs.agents / "demo_author%2Fgeo"  # "/" in a name is escaped, reversibly
    assert agent.is_dir() and agent.stat().st_uid == 0
    assert (agent / "context").read_text() == ""  # the conversation was the query's, not the agent's


def test_json_output_parses_and_matches_its_schema(api: Gateway):
    messages = [{"role": "user", "content": "Make up a person. Reply with their name and age as JSON."}]
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    query = llm("json_agent", messages, "chat_with_json_output", tools=[], message_return_type="json", response_format=response_format)
    query["query_data"]["max_new_tokens"] = 64
    response = api.query(query)["response"]
    assert response["error"] is None, response
    jsonschema.validate(json.loads(response["response_message"]), PERSON)


def test_tool_call_output_names_a_tool_from_the_list(api: Gateway, fs: Mount):
    messages = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
    query = llm("tool_agent", messages, "chat_with_tool_call_output", tools=[WEATHER, CLOCK])
    query["query_data"]["max_new_tokens"] = 48
    response = api.query(query)["response"]
    assert response["error"] is None and response["response_message"] is None, response
    calls = response["tool_calls"]
    assert calls and len({c["id"] for c in calls}) == len(calls), calls  # every call the model made, each with its own id
    for call in calls:
        assert call["name"] in ("demo_author/weather", "demo_author/clock") and call["id"].startswith("call_")
        schema = WEATHER if call["name"] == "demo_author/weather" else CLOCK
        jsonschema.validate(call["parameters"], schema["function"]["parameters"])  # type: ignore[index]
    assert "not run" not in (fs.agents / "tool_agent" / "error").read_text()


def test_call_tool_runs_the_chosen_tool_in_the_kernel(api: Gateway):
    messages = [{"role": "user", "content": "What time is it?"}]
    body = api.query(llm("clock_agent", messages, "call_tool", tools=[CLOCK]))
    envelope_keys(body)
    response = body["response"]
    assert response["response_class"] == "tool" and response["finished"] is True, response
    assert set(json.loads(response["response_message"])) == {"utc", "unix", "local"}  # the built-in clock's result


def test_operate_file_runs_the_models_storage_operation_and_sums_it_up(api: Gateway, fs: Mount):
    agent = fs.agents / "file_agent"
    agent.mkdir()
    events = os.open(agent / "events", os.O_RDONLY | os.O_NONBLOCK)  # a reader sees the events after its open
    try:
        messages = [{"role": "user", "content": "Create a directory called reports."}]
        query = llm("file_agent", messages, "operate_file")
        query["query_data"]["max_new_tokens"] = 48
        response = api.post(query)
        lines = os.read(events, 1 << 20).decode().splitlines()
    finally:
        os.close(events)
    assert response.status_code == 200
    summary = response.json()
    assert isinstance(summary, str) and summary  # a bare string, as the AIOS kernel answers
    calls = [e for e in map(json.loads, lines) if e["event"] == "tool_call"]
    made = [c for c in calls if c["tool"] in ("create_dir", "create_file", "write")]
    assert made, calls  # the model was asked to create something, and did
    for call in made:  # and it is there, in the agent's memory/
        arguments = call["arguments"]
        path = agent / "memory" / (arguments.get("dir_path") or arguments.get("file_path") or "").lstrip("/")
        assert path.is_dir() if call["tool"] == "create_dir" else path.is_file(), (call, sorted(p.name for p in (agent / "memory").rglob("*")))


def test_an_llm_error_comes_back_in_band(api: Gateway):
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}
    response = api.post(llm("bad_agent", [{"role": "user", "content": "hi"}], "chat_with_json_output", response_format=bad_schema))
    assert response.status_code == 200
    body = response.json()["response"]
    assert body["status_code"] == 400 and body["response_message"] is None
    assert body["error"].startswith("EINVAL") and "not a valid JSON Schema" in body["error"]


# -- memory ------------------------------------------------------------------------------------
def test_memories_are_files_found_by_retrieval_with_their_ids(api: Gateway, fs: Mount):
    added = api.query(memory("notes", "add_memory", content="The quarterly planning meeting is on Thursday at noon.", metadata={"tags": ["work"]}))
    envelope_keys(added)
    memory_id = added["response"]["memory_id"]
    assert added["response"]["success"] is True and added["response"]["error"] is None
    api.query(memory("notes", "add_memory", content="Buy oat milk and coffee beans.", metadata={}))
    stored = fs.agents / "notes" / "memory" / "aios" / "memories" / f"{memory_id}.md"
    assert stored.read_text() == "The quarterly planning meeting is on Thursday at noon."

    got = api.query(memory("notes", "get_memory", memory_id=memory_id))["response"]
    assert got["content"] == stored.read_text() and got["metadata"]["tags"] == ["work"] and len(got["metadata"]["timestamp"]) == 12

    found = api.query(memory("notes", "retrieve_memory", content="when is the planning meeting", k=3))["response"]
    assert found["success"] is True
    assert found["search_results"][0]["memory_id"] == memory_id and "Thursday" in found["search_results"][0]["content"]

    api.query(memory("notes", "update_memory", memory_id=memory_id, metadata={"tags": ["moved"]}, content=None))
    kept = api.query(memory("notes", "get_memory", memory_id=memory_id))["response"]
    assert kept["content"] == stored.read_text() and kept["metadata"]["tags"] == ["moved"]
    api.query(memory("notes", "update_memory", memory_id=memory_id, content="The meeting moved to Friday."))
    assert stored.read_text() == "The meeting moved to Friday."

    assert api.query(memory("notes", "remove_memory", memory_id=memory_id))["response"]["success"] is True
    gone = api.query(memory("notes", "get_memory", memory_id=memory_id))["response"]
    assert gone["success"] is False and gone["error"] == "Memory not found"
    assert api.query(memory("notes", "remove_memory", memory_id=memory_id))["response"]["success"] is False


def test_an_agentic_memory_is_annotated_by_the_model_and_found_by_its_tags(api: Gateway, fs: Mount):
    note = "Maria prefers window seats on long flights and always books the early train to Porto."
    added = api.query(memory("travel", "add_agentic_memory", content=note, metadata={"tags": ["itinerary"]}))["response"]
    assert added["success"] is True, added
    got = api.query(memory("travel", "get_memory", memory_id=added["memory_id"]))["response"]
    metadata = got["metadata"]
    assert got["content"] == note and metadata["tags"] == ["itinerary"]  # what the caller gave wins
    assert isinstance(metadata["keywords"], list) and len(metadata["keywords"]) <= 5 and isinstance(metadata["context"], str)
    found = api.query(memory("travel", "retrieve_memory", content="itinerary", k=1))["response"]["search_results"]
    assert [hit["memory_id"] for hit in found] == [added["memory_id"]]
    bad = api.query(memory("travel", "add_memory", content="x", metadata="tags=a"))["response"]
    assert bad["success"] is False and "metadata must be an object" in bad["error"]


# -- storage -----------------------------------------------------------------------------------
def test_a_file_written_is_read_back_retrieved_and_rolled_back(api: Gateway, fs: Mount):
    say = lambda op, **params: api.query(storage("writer", op, **params))["response"]["response_message"]  # noqa: E731
    assert say("mount", root_dir="/project") == "File system mounted successfully for agent: writer"
    root = fs.agents / "writer" / "memory" / "project"
    assert say("create_dir", dir_path="docs").startswith("Directory has been created successfully at: ")
    assert say("create_file", file_path="docs/plan.txt") == f"File has been created successfully at: {root / 'docs' / 'plan.txt'}"
    assert say("create_file", file_path="docs/plan.txt") == f"File already exists at: {root / 'docs' / 'plan.txt'}"
    say("write", file_path="docs/plan.txt", content="first draft about the lighthouse")
    say("write", file_path="docs/plan.txt", content="second draft about the harbour")
    assert say("read", file_path="docs/plan.txt") == "second draft about the harbour"
    assert (root / "docs" / "plan.txt").read_text() == "second draft about the harbour"

    found = json.loads(say("retrieve", query_text="harbour", n=2, keywords=None))
    assert found[0]["metadata"]["file_path"] == str(root / "docs" / "plan.txt") and "harbour" in found[0]["document_summary"]
    assert say("retrieve", query_text="zeppelin") == "No documents found"

    assert say("rollback", file_path="docs/plan.txt", n=1).startswith("Successfully rolled back the file")
    assert say("read", file_path="docs/plan.txt") == "first draft about the lighthouse"
    shared = json.loads(say("share", file_path="docs/plan.txt"))
    assert shared["file_path"] == str(root / "docs" / "plan.txt") and shared["share_link"].startswith("file://")

    escape = api.query(storage("writer", "read", file_path="../../../../etc/passwd"))["response"]
    assert escape["status_code"] == 403 and "leaves the agent's storage" in escape["response_message"]
    directory = api.query(storage("writer", "read", file_path="docs"))["response"]
    assert directory["status_code"] == 400 and "EISDIR" in directory["error"]
    missing = api.query(storage("writer", "read", file_path="nothing.txt"))["response"]
    assert missing["status_code"] == 404 and missing["response_message"].startswith("Error in read: ENOENT")


# -- tools, models, status ---------------------------------------------------------------------------
def test_tool_queries_run_served_tools(api: Gateway):
    body = api.query(tool("calc", {"name": "demo_author/calculator", "parameters": {"expression": "6*7"}}))
    envelope_keys(body)
    assert body["response"]["response_class"] == "tool" and json.loads(body["response"]["response_message"]) == {"result": 42}
    bad = api.query(tool("calc", {"name": "calculator", "parameters": {"expression": "6*"}}))["response"]
    assert bad["finished"] is False and bad["response_message"].startswith("Tool calling error: EINVAL")
    nameless = api.query(tool("calc", {"parameters": {"expression": "1"}}))["response"]
    assert nameless["status_code"] == 400 and "needs a name" in nameless["error"]
    unknown = api.query(tool("calc", {"name": "demo_author/arxiv", "parameters": {"query": "AIOS"}}))["response"]
    assert unknown["status_code"] == 404 and "no tool 'demo_author/arxiv'" in unknown["error"]
    calls = [{"name": "calculator", "parameters": {"expression": f"{n}*{n}"}} for n in range(1, 6)]
    several = api.query(tool("calc", *calls))["response"]  # run at once, answered in the order of the calls
    assert [json.loads(line) for line in several["response_message"].splitlines()] == [{"result": n * n} for n in range(1, 6)]


def test_llms_list_and_status(api: Gateway):
    llms = httpx.get(api.url + "/core/llms/list", timeout=30).json()
    assert llms["status"] == "success" and llms["llms"][0]["backend"] == "llama.cpp" and llms["llms"][0]["name"].startswith("smollm2")
    assert httpx.get(api.url + "/status", timeout=30).json() == {"status": "ok"}


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"{not json", 422, "not JSON"),
        (b"[1, 2]", 422, "JSON object"),
        (json.dumps({"query_type": "telepathy", "agent_name": "a", "query_data": {}}).encode(), 422, "query_type must be one of"),
        (json.dumps(llm("a", [{"role": "user", "content": "hi"}], "dance")).encode(), 422, "unknown action_type 'dance'"),
        (json.dumps(memory("a", "forget_everything")).encode(), 422, "unknown memory operation_type"),
        (json.dumps({"query_type": "llm", "agent_name": "", "query_data": {}}).encode(), 422, "agent_name"),
        (b"{" + b" " * (5 << 20) + b"}", 413, "at most"),
        (json.dumps({"query_type": "llm", "agent_name": "a", "query_data": "chat"}).encode(), 422, "query_data must be an object"),
        (json.dumps(llm("a", {"role": "user", "content": "hi"})).encode(), 422, "messages must be a list"),  # type: ignore[arg-type]
        (json.dumps(memory("a", "add_memory") | {"query_data": {"operation_type": "add_memory", "params": [1]}}).encode(), 422, "params must be"),
        (json.dumps(tool("a") | {"query_data": {"tool_calls": {"name": "calculator"}}}).encode(), 422, "tool_calls must be"),
        (json.dumps(tool("a") | {"query_data": {"tool_calls": [1, 2]}}).encode(), 422, "tool_calls must be"),
    ],
)
def test_bad_queries_get_a_clear_error_and_the_gateway_goes_on(api: Gateway, body: bytes, status: int, says: str):
    response = api.post(body)
    assert response.status_code == status and says in response.json()["detail"], response.text
    assert httpx.get(api.url + "/status", timeout=30).json() == {"status": "ok"}


def test_unknown_paths_are_404_and_wrong_methods_405(api: Gateway):
    missing = httpx.get(api.url + "/nowhere", timeout=30)
    assert missing.status_code == 404 and "POST /query" in missing.json()["detail"]
    for method, path in (("GET", "/query"), ("POST", "/status"), ("DELETE", "/core/llms/list")):
        wrong = httpx.request(method, api.url + path, timeout=30)
        assert wrong.status_code == 405 and "takes" in wrong.json()["detail"], (method, path, wrong.text)
    assert httpx.get(api.url + "/status", timeout=30).json() == {"status": "ok"}


def test_a_body_over_the_limit_without_a_length_is_refused_as_it_arrives(api: Gateway):
    """Chunked transfer encoding: there is no Content-Length to refuse it by, so the
    gateway counts as the body arrives, and answers 413 before the client is done."""
    import select

    head = b"POST /query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n" % (1 << 20) + b"x" * (1 << 20) + b"\r\n"
    answer, sent = b"", 0
    with socket.create_connection(("127.0.0.1", api.port), timeout=30) as client:
        client.sendall(head)
        while sent < 64 and not answer:
            try:
                client.sendall(chunk)
                sent += 1
            except OSError:  # it answered and closed while we were sending
                pass
            if select.select([client], [], [], 0.05)[0] or sent == 64:
                answer = client.recv(65536)
                while answer and b"}" not in answer.partition(b"\r\n\r\n")[2]:  # its head and its body may come apart
                    more = client.recv(65536)
                    if not more:
                        break
                    answer += more
    assert answer.startswith(b"HTTP/1.1 413") and b"the most a query may have" in answer, answer[:300]
    assert sent < 64  # refused while the client was still sending
    assert httpx.get(api.url + "/status", timeout=30).json() == {"status": "ok"}


def test_a_reply_that_is_no_tool_call_is_an_error_in_band_not_a_500():
    """Where a tool call is expected, whatever the model answered comes back as an llm error."""
    import trio

    from clients.aios.queries import Queries

    class Client:
        async def agent(self, name: str) -> Path:
            return Path("/nonexistent") / name

        async def call(self, agent: Path, envelope: dict[str, Any], since: float = 0) -> str:
            return "Sure! I would call the weather tool.\n"

    queries = Queries(Client())  # type: ignore[arg-type]
    data = llm("a", [{"role": "user", "content": "weather?"}], "chat_with_tool_call_output", tools=[WEATHER])["query_data"]
    response = trio.run(queries.handle, "llm", "a", data)["response"]
    assert response["status_code"] == 500 and "not a tool call" in response["error"] and response["tool_calls"] is None


def test_a_refused_request_says_why_in_band(api: Gateway):
    response = api.query(llm("a", [{"role": "assistant", "content": "I speak last"}]))["response"]
    assert response["status_code"] == 400 and "the last message must be the user's" in response["error"]


# -- many agents at once --------------------------------------------------------------------------
def test_eight_agents_at_once_are_all_answered_in_shared_batches(api: Gateway, fs: Mount):
    before = stats(fs)
    questions = [
        f"Name one animal that lives in the {place}." for place in ("sea", "desert", "jungle", "arctic", "forest", "river", "mountains", "savanna")
    ]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(lambda q: api.query(llm(f"crowd{q[0]}", [{"role": "user", "content": q[1]}])), enumerate(questions)))
    assert all(b["response"]["error"] is None and b["response"]["response_message"] for b in bodies), bodies
    after = stats(fs)
    seqs, steps = after["batch_seqs"] - before["batch_seqs"], after["steps"] - before["steps"]
    assert seqs / steps > 2, f"{seqs:.0f} sequences in {steps:.0f} steps: the agents were not batched together"


def test_a_client_that_goes_away_cancels_its_turn(api: Gateway, fs: Mount):
    agent = fs.agents / "impatient"
    agent.mkdir()
    (agent / "config").write_text("ignore_eos=on\n")  # the answer runs to the window: far longer than the client waits
    events = os.open(agent / "events", os.O_RDONLY | os.O_NONBLOCK)
    body = json.dumps(llm("impatient", [{"role": "user", "content": "Count to a thousand."}], max_new_tokens=900)).encode()
    request = f"POST /query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    seen: list[str] = []
    try:
        with socket.create_connection(("127.0.0.1", api.port), timeout=30) as client:
            client.sendall(request.encode() + body)
            wait_for(lambda: seen.extend(json.loads(line)["event"] for line in _ready(events)) or "first_token" in seen, 120, "the turn to generate")
        # the client is gone while its turn generates
        wait_for(lambda: seen.extend(json.loads(line)["event"] for line in _ready(events)) or "cancelled" in seen, 60, "the turn to be cancelled")
    finally:
        os.close(events)
    assert "done" not in seen and (agent / "context").read_text() == ""


def _ready(fd: int) -> list[str]:
    try:
        return os.read(fd, 1 << 16).decode().splitlines()
    except BlockingIOError:
        return []


# -- access --------------------------------------------------------------------------------------
def test_two_users_gateways_cannot_reach_each_others_agents(fs: Mount, tmp_path: Path):
    alice, bob = Gateway(fs.root, tmp_path / "alice.log", OWNER), Gateway(fs.root, tmp_path / "bob.log", OTHER)
    try:
        alice.wait_ready()
        bob.wait_ready()
        memory_id = alice.query(memory("diary", "add_memory", content="my secret is the blue door", metadata={}))["response"]["memory_id"]
        alice.query(storage("diary", "write", file_path="private.txt", content="for alice only"))
        agent = fs.agents / "diary"
        assert (agent.stat().st_uid, agent.stat().st_gid) == (OWNER.uid, OWNER.gid)

        stolen = bob.query(memory("diary", "get_memory", memory_id=memory_id))["response"]
        assert stolen["success"] is False and stolen["content"] is None and "EACCES" in stolen["error"]
        assert bob.query(memory("diary", "retrieve_memory", content="secret door", k=3))["response"]["success"] is False
        read = bob.query(storage("diary", "read", file_path="private.txt"))["response"]
        assert read["status_code"] == 403 and "for alice" not in read["response_message"]
        chat = bob.query(llm("diary", [{"role": "user", "content": "what is the secret?"}]))["response"]
        assert chat["status_code"] == 403 and chat["response_message"] is None

        mine = alice.query(memory("diary", "get_memory", memory_id=memory_id))["response"]
        assert mine["content"] == "my secret is the blue door"
        assert bob.query(memory("bobs", "add_memory", content="bob's own", metadata={}))["response"]["success"] is True
        assert (fs.agents / "bobs").stat().st_uid == OTHER.uid
    finally:
        alice.stop()
        bob.stop()


def test_a_token_is_required_when_given_and_off_loopback(fs: Mount, tmp_path: Path):
    token = tmp_path / "token"
    token.write_text("s3cret-token-of-the-gateway\n")
    token.chmod(0o600)
    guarded = Gateway(fs.root, tmp_path / "guarded.log", None, "--token", str(token))
    try:
        guarded.wait_ready({"authorization": "Bearer s3cret-token-of-the-gateway"})
        assert httpx.get(guarded.url + "/status", timeout=30).status_code == 401
        assert httpx.get(guarded.url + "/core/llms/list", timeout=30).status_code == 401
        assert guarded.post(tool("t", {"name": "calculator", "parameters": {"expression": "1+1"}})).status_code == 401  # no token at all
        assert (
            guarded.post(
                tool("t", {"name": "calculator", "parameters": {"expression": "1+1"}}), headers={"authorization": "Bearer wrong"}
            ).status_code
            == 401
        )
        ok = guarded.post(
            tool("t", {"name": "calculator", "parameters": {"expression": "1+1"}}), headers={"authorization": "Bearer s3cret-token-of-the-gateway"}
        )
        assert ok.status_code == 200 and json.loads(ok.json()["response"]["response_message"]) == {"result": 2}
    finally:
        guarded.stop()
    exposed = subprocess.run(
        [sys.executable, "-m", "aiosfs.cli", "aios-api", str(fs.root), "--listen", f"0.0.0.0:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert exposed.returncode != 0 and "not a loopback address" in exposed.stderr and "--token FILE" in exposed.stderr
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "weak").write_text("short\n")
    (tmp_path / "two words").write_text("s3cret-token-of the-gateway\n")
    (tmp_path / "shown").write_text("s3cret-token-of-the-gateway\n")
    for name in ("empty", "weak", "two words"):
        (tmp_path / name).chmod(0o600)
    (tmp_path / "shown").chmod(0o644)
    for name, says in [
        ("missing", "cannot read the token file"),
        ("empty", "at least 16 characters"),
        ("weak", "at least 16 characters"),
        ("two words", "one word"),
        ("shown", "readable by everyone"),
    ]:
        bad = subprocess.run(
            [sys.executable, "-m", "aiosfs.cli", "aios-api", str(fs.root), "--listen", f"127.0.0.1:{free_port()}", "--token", str(tmp_path / name)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode != 0 and says in bad.stderr, (name, bad.stderr)


def test_the_gateway_refuses_what_is_not_a_mount(tmp_path: Path):
    result = subprocess.run([sys.executable, "-m", "aiosfs.cli", "aios-api", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "is not a live aiosfs mount" in result.stderr  # and at once: it serves nothing


def test_an_agent_written_for_aios_runs_with_only_the_kernel_url_changed(api: Gateway, fs: Mount):
    agent = Path(__file__).resolve().parent.parent / "examples" / "aios" / "agent.py"
    result = subprocess.run(
        [sys.executable, str(agent), "Lisbon"], capture_output=True, text=True, timeout=600, env=os.environ | {"CEREBRUM_KERNEL_URL": api.url}
    )
    assert result.returncode == 0 and "all steps worked" in result.stdout, result.stdout + result.stderr
    assert (fs.agents / "example%2Fday_planner" / "memory" / "trips" / "lisbon.md").read_text().startswith("# Lisbon\n")
