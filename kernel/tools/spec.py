"""What a tool is: its spec (name, description, argument schema, limits, how it
runs) and one call as the tool sees it."""

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import jsonschema.exceptions
import trio

from .. import params
from ..types import Agent, Caller

log = logging.getLogger(__name__)

NAME = re.compile(r"[a-z][a-z0-9_]*")  # a built-in or external tool
SERVER_NAME = re.compile(r"[a-z][a-z0-9_-]*")  # an MCP server of the mount's config
MCP_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]+")  # the TOOL of SERVER.TOOL: an MCP tool's name, made a file name
MANIFEST_KEYS = frozenset({"name", "description", "command", "schema", "timeout", "concurrency"})


@dataclass(frozen=True)
class ToolCall:
    """One call as a tool sees it: who asks, for which agent, with what."""

    caller: Caller
    agent: Agent | None
    arguments: dict[str, Any]


Runner = Callable[[ToolCall], Awaitable[Any]]


@dataclass(eq=False)
class ToolSpec:
    name: str
    description: str
    schema: dict[str, Any]
    run: Runner
    timeout: float = params.TOOL_TIMEOUT_SECONDS
    concurrency: int = params.TOOL_CONCURRENCY
    needs_agent: bool = False  # acts on an agent's memory: refused without one
    manifest: Path | None = None  # where an external tool came from; None: built in
    source: str = ""  # what it was made from, so a reload keeps an unchanged tool (and its semaphore)
    server: str = ""  # the MCP server that serves it (named SERVER.TOOL); "" for the others
    validator: jsonschema.Draft202012Validator = field(init=False, repr=False)
    semaphore: trio.Semaphore = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_spec(self.name, self.schema, self.server)
        self.validator = jsonschema.Draft202012Validator(self.schema)
        self.semaphore = trio.Semaphore(self.concurrency)

    def describe(self) -> dict[str, Any]:
        """What `tools/NAME.schema` shows and the model is told."""
        return {"name": self.name, "description": self.description, "schema": self.schema}


def check_spec(name: str, schema: Any, server: str = "") -> None:
    """ValueError unless the name is a tool name (`SERVER.TOOL` for a tool of an MCP
    server) and the schema a valid schema of an object."""
    if not isinstance(name, str) or not name_fits(name, server):
        form = f"{server}.TOOL with TOOL of [A-Za-z0-9_-]" if server else "[a-z][a-z0-9_]*"
        raise ValueError(f"tool name {name!r} must match {form} and be at most {params.TOOL_NAME_BYTES} bytes")
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise ValueError('the schema must describe an object: {"type": "object", "properties": {...}}')
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        raise ValueError(f"invalid schema: {exc.message}") from None


def name_fits(name: str, server: str = "") -> bool:
    """Is `name` a tool's name: `[a-z][a-z0-9_]*`, or `SERVER.TOOL` for a tool of that MCP server?"""
    if not server:
        return NAME.fullmatch(name) is not None and len(name) <= params.TOOL_NAME_BYTES
    prefix, dot, tool = name.partition(".")
    return (
        prefix == server
        and dot == "."
        and SERVER_NAME.fullmatch(server) is not None
        and len(server) <= params.MCP_SERVER_NAME_BYTES
        and MCP_TOOL_NAME.fullmatch(tool) is not None
        and len(tool) <= params.TOOL_NAME_BYTES
    )
