"""A request as written to `prompt` or `call`: plain text, or a JSON envelope.

    text                                  the user message, with the agent's config
    {"prompt": TEXT, SETTINGS...}         the user message, with the config changed by SETTINGS
    {"messages": [...], SETTINGS...}      a stateless chat: the conversation is the envelope's,
                                          and the agent's context is neither read nor changed

SETTINGS are the config keys of ENVELOPE_KEYS, checked by the config's validators, and:
  "response_format"  {"type": "json_schema", "json_schema": {"name", "schema"}} or
                     {"type": "json_object"}: the answer is JSON matching the schema,
                     enforced by a grammar compiled here (a schema that does not compile
                     is EINVAL before anything is queued);
  "tools"            names of served tools (run by the kernel's tool loop), or function
                     declarations {"type": "function", "function": {"name", "description",
                     "parameters"}} (or the inner object alone): the model's calls are
                     returned as JSON, not run; "tool_choice" is then auto, none, required
                     or a declared name;
  "parallel_tool_calls"  true (the default): a reply may make several calls; false: one.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .. import params
from ..errors import KernelError
from ..text import loads
from ..types import Message
from .config import AgentConfig, Function, check_model, validate

ENVELOPE_KEYS = (
    "temperature",
    "top_p",
    "max_tokens",
    "seed",
    "stop",
    "priority",
    "model",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "ignore_eos",
    "response_format",
)
ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id"}  # OpenAI's; only role and content are used
CHOICES = ("auto", "none", "required")


@dataclass(frozen=True)
class Request:
    """What a request asks: the user message, the config it runs with, and for a
    stateless chat the conversation before the message (None: the agent's context,
    or the `call` session's)."""

    message: str
    config: AgentConfig
    history: tuple[Message, ...] | None = None


def parse_request(text: str, base: AgentConfig, known_models: Callable[[str], bool] | None = None) -> Request:
    """Split a request into its message, config and conversation.

    Text that starts with `{` must be JSON; an object with "prompt" or "messages" is an
    envelope. Any other text (a JSON array, an object without either key) is the message.
    """
    if not text.lstrip().startswith("{"):
        return Request(text, base)
    try:
        obj = loads(text, "envelope")
    except json.JSONDecodeError as exc:
        raise KernelError(errno.EINVAL, f"request starts with '{{' but is not valid JSON: {exc}") from None
    if not isinstance(obj, dict) or not ("prompt" in obj or "messages" in obj):
        return Request(text, base)
    if "prompt" in obj and "messages" in obj:
        raise KernelError(errno.EINVAL, 'envelope: give "prompt" or "messages", not both')
    unknown = sorted(set(obj) - set(ENVELOPE_KEYS) - {"prompt", "messages"})
    if unknown:
        raise KernelError(errno.EINVAL, f"envelope: unknown keys {unknown} (known: prompt or messages, {', '.join(ENVELOPE_KEYS)})")
    config = _settings(obj, base, known_models)
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise KernelError(errno.EINVAL, 'envelope: "prompt" must be a string')
        return Request(obj["prompt"], config)
    system, history, message = _conversation(obj["messages"])
    if system is not None:
        config = replace(config, system=system)
    return Request(message, config, history)


def parse_envelope(text: str, base: AgentConfig, known_models: Callable[[str], bool] | None = None) -> tuple[str, AgentConfig]:
    """(user message, effective config) of a request, for callers that need no more."""
    request = parse_request(text, base, known_models)
    return request.message, request.config


def _settings(obj: dict[str, Any], base: AgentConfig, known_models: Callable[[str], bool] | None) -> AgentConfig:
    changes: dict[str, Any] = {}
    for key, value in obj.items():
        if key in ("prompt", "messages", "tools", "tool_choice", "response_format"):
            continue
        changes[key] = validate(key, value, "envelope")
    check_model(changes.get("model", ""), known_models)
    if "tools" in obj:
        changes.update(_tools(obj["tools"]))
    if "tool_choice" in obj:
        changes["tool_choice"] = _tool_choice(obj["tool_choice"], changes.get("functions", ()))
    if "response_format" in obj:
        changes["grammar"] = response_grammar(obj["response_format"])
    config = replace(base, **changes)
    if config.grammar and (config.tools or config.functions) and config.tool_choice != "none":
        raise KernelError(errno.EINVAL, 'envelope: response_format cannot be combined with tools (drop one, or set "tool_choice": "none")')
    return config


# -- the conversation of a stateless chat --------------------------------------------------
def _conversation(value: Any) -> tuple[str | None, tuple[Message, ...], str]:
    """(system message or None, the turns before the last message, the last user message)."""
    if not isinstance(value, list) or not value:
        raise KernelError(errno.EINVAL, 'envelope: "messages" must be a non-empty list of {"role", "content"} objects')
    messages = [_message(item, number) for number, item in enumerate(value, 1)]
    if messages[-1]["role"] != "user":
        raise KernelError(errno.EINVAL, f'envelope: the last message must be the user\'s (role "user"), not {messages[-1]["role"]!r}')
    head = 0
    while messages[head]["role"] == "system":
        head += 1
    system = "\n\n".join(m["content"] for m in messages[:head]) if head else None
    return system, tuple(messages[head:-1]), messages[-1]["content"]


def _message(item: Any, number: int) -> Message:
    where = f"envelope: message {number}"
    if not isinstance(item, dict):
        raise KernelError(errno.EINVAL, f'{where}: expected {{"role": ..., "content": ...}}')
    unknown = sorted(set(item) - MESSAGE_KEYS)
    if unknown:
        raise KernelError(errno.EINVAL, f"{where}: unknown keys {unknown} (known: {', '.join(sorted(MESSAGE_KEYS))})")
    role = item.get("role")
    if role not in ROLES:
        raise KernelError(errno.EINVAL, f"{where}: role must be one of {', '.join(ROLES)}, not {role!r}")
    return {"role": role, "content": _content(item, where)}


def _content(item: dict[str, Any], where: str) -> str:
    """A message's text: a string, a list of text parts, or (an assistant's tool calls) null."""
    content = item.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    if content is None and item.get("tool_calls"):
        return json.dumps({"tool_calls": item["tool_calls"]}, ensure_ascii=False)
    raise KernelError(errno.EINVAL, f'{where}: "content" must be a string or a list of {{"type": "text", "text": ...}} parts')


# -- tools: served names, or declared functions -------------------------------------------
def _tools(value: Any) -> dict[str, Any]:
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        if len(value) > params.MAX_DECLARED_TOOLS:
            raise KernelError(errno.EINVAL, f"envelope: at most {params.MAX_DECLARED_TOOLS} declared tools")
        functions = tuple(_function(item, number) for number, item in enumerate(value, 1))
        names = [f.name for f in functions]
        if len(set(names)) != len(names):
            raise KernelError(errno.EINVAL, "envelope: two declared tools have the same name")
        return {"functions": functions, "tools": ()}
    if isinstance(value, list) and any(isinstance(item, dict) for item in value):
        raise KernelError(errno.EINVAL, "envelope: tools must be all names (served tools) or all declarations, not both")
    if value is None:
        return {"tools": ()}
    return {"tools": validate("tools", value, "envelope")}


def _function(item: dict[str, Any], number: int) -> Function:
    where = f"envelope: tool {number}"
    body = item.get("function") if item.get("type") == "function" else item
    if not isinstance(body, dict):
        raise KernelError(errno.EINVAL, f'{where}: expected {{"type": "function", "function": {{"name", "description", "parameters"}}}}')
    name, description = body.get("name"), body.get("description", "")
    if not isinstance(name, str) or not 0 < len(name.encode()) <= params.MAX_TOOL_NAME_BYTES or not name.isprintable():
        raise KernelError(errno.EINVAL, f"{where}: the name must be printable text of 1 to {params.MAX_TOOL_NAME_BYTES} bytes")
    if not isinstance(description, str):
        raise KernelError(errno.EINVAL, f"{where}: the description must be text")
    schema = body.get("parameters", {"type": "object", "properties": {}})
    _compile(schema, f"{where} ({name}): parameters")
    return Function(name, description, json.dumps(schema, separators=(",", ":"), ensure_ascii=False))


def _tool_choice(value: Any, functions: tuple[Function, ...]) -> str:
    """auto, none, required, or a tool's name (also as OpenAI's {"type": "function", "function": {"name"}})."""
    if isinstance(value, dict) and isinstance(value.get("function"), dict):
        value = value["function"].get("name")
    if not functions:
        return str(validate("tool_choice", value, "envelope"))
    names = [f.name for f in functions]
    if value not in (*CHOICES, *names):
        raise KernelError(errno.EINVAL, f"envelope: tool_choice {value!r} is not one of {', '.join([*CHOICES, *names])}")
    return str(value)


# -- response_format -------------------------------------------------------------------
def response_grammar(value: Any) -> str:
    """The GBNF that makes the answer JSON matching the response_format's schema ("" for text)."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return ""
    if kind == "json_object":
        schema = value.get("schema", {"type": "object"})
    elif kind == "json_schema" and isinstance(value.get("json_schema"), dict) and "schema" in value["json_schema"]:
        schema = value["json_schema"]["schema"]
    else:
        raise KernelError(
            errno.EINVAL,
            'envelope: response_format must be {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}, '
            '{"type": "json_object"} or {"type": "text"}',
        )
    return _compile(schema, "response_format")


def _compile(schema: Any, where: str) -> str:
    """GBNF for a JSON Schema; EINVAL when it is not a valid schema or cannot be compiled."""
    import jsonschema
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    if not isinstance(schema, dict):
        raise KernelError(errno.EINVAL, f"{where}: a JSON Schema must be an object")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise KernelError(errno.EINVAL, f"{where}: not a valid JSON Schema: {exc.message}") from None
    try:
        return str(json_schema_to_gbnf(json.dumps(schema)))
    except Exception as exc:  # the converter raises what it meets: KeyError, ValueError, RecursionError...
        raise KernelError(errno.EINVAL, f"{where}: this schema cannot be compiled to a grammar ({type(exc).__name__}: {exc})") from None
