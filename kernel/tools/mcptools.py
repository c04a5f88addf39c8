"""What an MCP server's tools become in the mount: a `ToolSpec` named `SERVER.TOOL`
for each tool of its listing, and the JSON value of each call's result.

A tool's MCP name becomes the TOOL of its file name: a character outside
`[A-Za-z0-9_-]` becomes `_`, and `schema` becomes `schema_` (`SERVER.schema` would
read as the schema file of a tool named SERVER). A name that is then empty, too
long or taken by another tool of the server is left out, as is a tool whose input
schema is not a valid JSON Schema of an object (one without a `type` is taken as
an object's). Each is a log line.
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import jsonschema
import jsonschema.exceptions
import mcp_types as types

from .. import params
from ..errors import KernelError
from .spec import Runner, ToolSpec

log = logging.getLogger(__name__)

_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_-]")


def file_name(tool: str) -> str:
    """The TOOL of `SERVER.TOOL` for an MCP tool's name ("" when none fits)."""
    name = _NOT_IN_NAME.sub("_", tool)
    if name == "schema":
        name = "schema_"
    return name if len(name) <= params.TOOL_NAME_BYTES else ""


def tool_specs(
    server: str, listed: Sequence[types.Tool], wanted: Sequence[str] | None, timeout: float, runner: Callable[[str], Runner]
) -> list[ToolSpec]:
    """The specs of a server's listed tools (those in `wanted`, when given);
    `runner(mcp_name)` makes the run of one."""
    if wanted is not None:
        missing = sorted(set(wanted) - {tool.name for tool in listed})
        if missing:
            log.warning("MCP server %s has no tools named %s (its config's tools)", server, ", ".join(missing))
        listed = [tool for tool in listed if tool.name in wanted]
    if len(listed) > params.MCP_MAX_TOOLS:
        log.warning("MCP server %s lists %d tools: only the first %d are served", server, len(listed), params.MCP_MAX_TOOLS)
        listed = listed[: params.MCP_MAX_TOOLS]
    specs: dict[str, ToolSpec] = {}
    for tool in listed:
        try:
            spec = _spec(server, tool, timeout, runner)
        except ValueError as exc:
            log.warning("MCP server %s: tool %r left out: %s", server, tool.name, exc)
            continue
        if spec.name in specs:
            log.warning("MCP server %s: tool %r left out: its name %s is taken by another of its tools", server, tool.name, spec.name)
            continue
        specs[spec.name] = spec
    return list(specs.values())


def _spec(server: str, tool: types.Tool, timeout: float, runner: Callable[[str], Runner]) -> ToolSpec:
    name = file_name(tool.name)
    if not name:
        raise ValueError(f"no file name fits it (at most {params.TOOL_NAME_BYTES} characters of A-Z a-z 0-9 _ -)")
    if name != tool.name:
        log.info("MCP server %s: tool %r is served as %s.%s", server, tool.name, server, name)
    schema = input_schema(tool.input_schema)
    description = tool.description or tool.title or ""
    source = json.dumps([tool.name, description, schema], sort_keys=True, default=str)
    return ToolSpec(f"{server}.{name}", description, schema, runner(tool.name), timeout, source=source, server=server)


def input_schema(schema: Any) -> dict[str, Any]:
    """The tool's input schema as the tool manager takes it; ValueError says why not."""
    if not isinstance(schema, dict):
        raise ValueError("its input schema is not a JSON object")
    schema = dict(schema)
    schema.setdefault("type", "object")
    if schema["type"] != "object":
        raise ValueError(f"its input schema describes {schema['type']!r}, not an object")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        raise ValueError(f"its input schema is invalid: {exc.message}") from None
    return schema


def result_value(name: str, result: types.CallToolResult) -> Any:
    """A call's value: the structured content when the server gives it, else the
    content (one text as a string; several items as a list; what is not text
    described); EIO with the server's text when it reports an error."""
    if result.is_error:
        text = " ".join(block.text for block in result.content if isinstance(block, types.TextContent)).strip()
        raise KernelError(errno.EIO, f"{name}: {_cut(text) or 'the server reported an error'}")
    if result.structured_content is not None:
        value: Any = result.structured_content
    else:
        items = [content_value(block) for block in result.content]
        value = None if not items else items[0] if len(items) == 1 else items
    if len(json.dumps(value, ensure_ascii=False, default=str)) > params.TOOL_OUTPUT_MAX_BYTES:
        raise KernelError(errno.EIO, f"{name}: the result is over {params.TOOL_OUTPUT_MAX_BYTES} bytes")
    return value


def content_value(block: Any) -> Any:
    """One content item: a text is its string; anything else a description of it."""
    if isinstance(block, types.TextContent):
        return block.text
    if isinstance(block, types.ImageContent | types.AudioContent):
        return {"type": block.type, "mime_type": block.mime_type, "bytes": _decoded_size(block.data)}
    if isinstance(block, types.ResourceLink):
        return {"type": "resource_link", "uri": str(block.uri), "name": block.name, "mime_type": block.mime_type}
    if isinstance(block, types.EmbeddedResource):
        resource = block.resource
        described: dict[str, Any] = {"type": "resource", "uri": str(resource.uri), "mime_type": resource.mime_type}
        if isinstance(resource, types.TextResourceContents):
            described["text"] = resource.text
        else:
            described["bytes"] = _decoded_size(resource.blob)
        return described
    return {"type": str(getattr(block, "type", "unknown"))}


def _decoded_size(data: str) -> int | None:
    try:
        return len(base64.b64decode(data, validate=True))
    except (binascii.Error, ValueError):
        return None


def _cut(text: str) -> str:
    return text if len(text) <= params.TOOL_ERROR_CHARS else text[: params.TOOL_ERROR_CHARS] + "…"
