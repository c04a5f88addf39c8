"""The MCP face of the mount: tools and resources, built on the SDK's MCPServer.

Each tool's input schema comes from its type hints and each description from its
docstring and field descriptions. A failure in the mount comes back as a tool error
(`isError`) whose text is `ERRNO: message`, the message being the agent's `error`
line about it when the kernel wrote one, else the errno's text; arguments that do
not match the schema are tool errors too. Neither stops the server.
"""

from __future__ import annotations

import errno
import functools
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from mcp_types import Resource as MCPResource
from pydantic import BaseModel, Field

from .. import __version__
from ..mountclient import FileError
from .operations import Operations

P = ParamSpec("P")
R = TypeVar("R")

INSTRUCTIONS = """\
aiosfs is an operating system for LLM agents. Each agent is a directory of the mount with \
its own configuration (a system prompt, sampling settings), a conversation (its context) \
and a long-term memory of files (memory/), searchable by recall. Agents share one local \
model, scheduled and batched by the kernel. Everything here is done as the user who runs \
this server: agents and files that user may not use through the mount are refused here too."""

AgentName = Annotated[str, Field(description="The agent's name: its directory under agents/ in the mount")]
MemoryPath = Annotated[str, Field(description="A path relative to the agent's memory/ directory, e.g. notes/today.md")]
MaxTokens = Annotated[int | None, Field(ge=1, le=8192, description="The most tokens the answer may have (default: the agent's config)")]
Temperature = Annotated[float | None, Field(ge=0, le=2, description="Sampling temperature, 0 for greedy (default: the agent's config)")]
READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)
CHANGES = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)


class Agent(BaseModel):
    name: str
    owner_uid: int
    mode: str = Field(description="The agent directory's mode bits, in octal")
    state: str = Field(description="Your latest job's state on this agent: idle, queued, running, suspended, done, error or cancelled")
    job: int | None = Field(description="That job's id")
    can_ask: bool = Field(description="Whether you may submit requests to it")
    can_read: bool = Field(description="Whether you may read its context")


class Agents(BaseModel):
    agents: list[Agent]


class AgentConfig(BaseModel):
    name: str
    config: dict[str, str] = Field(description="The agent's whole config now, key by key")


class Answer(BaseModel):
    answer: str
    job: int | None = Field(default=None, description="The job id of the turn (in the agent's status, events and kernel/ps)")


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class Conversation(BaseModel):
    messages: list[Message]


class MemoryFile(BaseModel):
    path: str
    content: str


class MemoryWritten(BaseModel):
    path: str
    bytes: int = Field(description="The file's size after the write")


class MemoryEntry(BaseModel):
    path: str
    kind: Literal["file", "dir", "symlink"]
    bytes: int


class MemoryListing(BaseModel):
    entries: list[MemoryEntry]
    truncated: bool = Field(description="True when there were more entries than the listing returns")


class Passage(BaseModel):
    rank: int
    path: str
    line: int = Field(description="The line of the file where the passage starts")
    score: float
    text: str


class Passages(BaseModel):
    passages: list[Passage]


class ServedTool(BaseModel):
    name: str
    description: str
    input_schema: dict[str, Any] = Field(description="The JSON Schema of the tool's arguments")


class ServedTools(BaseModel):
    tools: list[ServedTool]


class ToolOutput(BaseModel):
    result: Any = Field(description="The tool's result, any JSON value")


def mount_errors(tool: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """A FileError becomes the tool's error result, `ERRNO: message`, without the
    SDK's "Error executing tool" prefix; the SDK still sees the tool's own signature."""

    @functools.wraps(tool)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await tool(*args, **kwargs)
        except FileError as exc:
            return CallToolResult(content=[TextContent(type="text", text=str(exc))], is_error=True)  # type: ignore[return-value]

    return wrapper


def _overrides(max_tokens: int | None, temperature: float | None) -> dict[str, Any]:
    return {key: value for key, value in (("max_tokens", max_tokens), ("temperature", temperature)) if value is not None}


def _config_value(value: str | int | float | bool) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


class AiosfsServer(MCPServer[Any]):
    """MCPServer whose resource listing also names what the mount holds now."""

    def __init__(self, ops: Operations) -> None:
        super().__init__("aiosfs", title="aiosfs", instructions=INSTRUCTIONS, version=__version__)
        self.ops = ops

    async def list_resources(self) -> list[MCPResource]:
        listed = [
            MCPResource(
                uri=uri,
                name=name,
                mime_type="application/x-ndjson" if kind == "context" else "text/plain",
                description="The agent's conversation, one JSON message per line" if kind == "context" else "A file of the agent's memory/",
            )
            for uri, name, kind in await self.ops.resources()
        ]
        return [*await super().list_resources(), *listed]


def build(ops: Operations) -> AiosfsServer:
    server = AiosfsServer(ops)

    @server.tool(annotations=READ_ONLY)
    @mount_errors
    async def list_agents() -> Agents:
        """List the agents you may use (those whose directory you may enter), with your latest job's state on each."""
        return Agents.model_validate({"agents": await ops.agents()})

    @server.tool(annotations=CHANGES)
    @mount_errors
    async def create_agent(
        name: AgentName,
        system: Annotated[str | None, Field(description="The agent's system prompt")] = None,
        config: Annotated[
            dict[str, str | int | float | bool] | None,
            Field(description="More config keys: temperature, top_p, max_tokens, seed, model, priority, tools, memory_recall, memory_top_k, ..."),
        ] = None,
        private: Annotated[bool, Field(description="Only you (and root) may use it: mode 0700")] = False,
        exist_ok: Annotated[bool, Field(description="If the agent exists, set the config given on it instead of failing")] = False,
    ) -> AgentConfig:
        """Create an agent (a directory of the mount, owned by you) with a system prompt and
        config. The keys given replace those keys only; the others keep their defaults."""
        lines = {"system": system} if system is not None else {}
        lines |= {key: _config_value(value) for key, value in (config or {}).items()}
        return AgentConfig(name=name, config=await ops.create(name, lines, private, exist_ok))

    @server.tool(annotations=CHANGES)
    @mount_errors
    async def ask_agent(
        agent: AgentName,
        message: Annotated[str, Field(description="Your message: the next user turn of the agent's conversation")],
        max_tokens: MaxTokens = None,
        temperature: Temperature = None,
    ) -> Answer:
        """Ask an agent in its own conversation: the agent sees its context (earlier turns) and
        its system prompt, and the question and answer are added to its context. Waits for
        the whole answer."""
        answer, job = await ops.ask(agent, message, _overrides(max_tokens, temperature))
        return Answer(answer=answer, job=job)

    @server.tool(annotations=CHANGES)
    @mount_errors
    async def chat(
        agent: AgentName,
        messages: Annotated[list[Message], Field(min_length=1, description="The whole conversation; the last message must be the user's")],
        max_tokens: MaxTokens = None,
        temperature: Temperature = None,
        json_schema: Annotated[
            dict[str, Any] | None, Field(description="A JSON Schema the answer must match: it is then JSON, generated under a grammar")
        ] = None,
    ) -> Answer:
        """A stateless chat with an agent's model and config: the messages given are the whole
        conversation (a leading system message replaces the agent's system prompt); the
        agent's context is neither read nor changed."""
        envelope: dict[str, Any] = {"messages": [m.model_dump() for m in messages]} | _overrides(max_tokens, temperature)
        if json_schema is not None:
            envelope["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": json_schema}}
        return Answer(answer=await ops.chat(agent, envelope))

    @server.tool(annotations=READ_ONLY)
    @mount_errors
    async def read_context(agent: AgentName) -> Conversation:
        """Read an agent's conversation (its context): the messages its next turn will see."""
        text = await ops.context(agent)
        return Conversation.model_validate({"messages": [json.loads(line) for line in text.splitlines() if line.strip()]})

    @server.tool(annotations=CHANGES)
    @mount_errors
    async def write_memory(
        agent: AgentName,
        path: MemoryPath,
        content: Annotated[str, Field(description="The text to write")],
        append: Annotated[bool, Field(description="Add to the end of the file instead of replacing it")] = False,
    ) -> MemoryWritten:
        """Write a file in an agent's long-term memory (memory/), making its directories as
        needed. Each write is kept as a version, and the file is found by search_memory."""
        return MemoryWritten(path=path, bytes=await ops.write_memory(agent, path, content, append))

    @server.tool(annotations=READ_ONLY)
    @mount_errors
    async def read_memory(agent: AgentName, path: MemoryPath) -> MemoryFile:
        """Read a text file of an agent's memory/."""
        data = await ops.read_memory(agent, path)
        try:
            return MemoryFile(path=path, content=data.decode())
        except UnicodeDecodeError:
            raise FileError(
                errno.EINVAL, f"{path} is not UTF-8 text ({len(data)} bytes): read it as the resource aiosfs://agents/NAME/memory/PATH"
            ) from None

    @server.tool(annotations=READ_ONLY)
    @mount_errors
    async def list_memory(
        agent: AgentName, path: Annotated[str, Field(description="A directory under memory/ (default: all of it)")] = ""
    ) -> MemoryListing:
        """List the files and directories of an agent's memory/ (or of a directory in it), recursively."""
        entries, truncated = await ops.list_memory(agent, path)
        return MemoryListing.model_validate({"entries": entries, "truncated": truncated})

    @server.tool(annotations=READ_ONLY)
    @mount_errors
    async def search_memory(
        agent: AgentName,
        query: Annotated[str, Field(min_length=1, description="Words to look for")],
        k: Annotated[int, Field(ge=1, le=20, description="How many passages at most")] = 3,
    ) -> Passages:
        """Search an agent's memory/ (recall): the passages of its files that best match the
        query (BM25), best first, among the files you may read."""
        return Passages.model_validate({"passages": await ops.recall(agent, query, k)})

    @server.tool(annotations=READ_ONLY)
    @mount_errors
    async def list_mount_tools() -> ServedTools:
        """List the tools the mount serves (tools/ in the mount), with the JSON Schema of each one's arguments."""
        served = [{"name": t["name"], "description": t.get("description", ""), "input_schema": t["schema"]} for t in await ops.tools()]
        return ServedTools.model_validate({"tools": served})

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, open_world_hint=True))
    @mount_errors
    async def call_mount_tool(
        tool: Annotated[str, Field(description="The tool's name, as list_mount_tools gives it")],
        arguments: Annotated[dict[str, Any] | None, Field(description="The tool's arguments, matching its schema")] = None,
        agent: Annotated[str | None, Field(description="Act for this agent (its policy applies; the memory tools need one)")] = None,
    ) -> ToolOutput:
        """Run one of the mount's tools (tools/NAME) and return its result. The arguments are
        checked against the tool's schema first."""
        return ToolOutput(result=await ops.run_tool(tool, arguments or {}, agent))

    @server.resource(
        "aiosfs://agents/{name}/context",
        name="context",
        title="An agent's conversation",
        description="The agent's context: its conversation, one JSON message {role, content} per line",
        mime_type="application/x-ndjson",
    )
    async def context_resource(name: str) -> str:
        try:
            return await ops.context(name)
        except FileError as exc:
            raise _resource_error(exc) from None

    @server.resource(
        "aiosfs://agents/{name}/memory/{+path}",
        name="memory",
        title="A file of an agent's memory",
        description="A file under the agent's memory/ directory (bytes when it is not UTF-8 text)",
        mime_type="text/plain",
    )
    async def memory_resource(name: str, path: str) -> str | bytes:
        try:
            data = await ops.read_memory(name, path)
        except FileError as exc:
            raise _resource_error(exc) from None
        try:
            return data.decode()
        except UnicodeDecodeError:
            return data

    return server


def _resource_error(exc: FileError) -> ResourceError:
    return ResourceNotFoundError(str(exc)) if exc.errno == errno.ENOENT else ResourceError(str(exc))
