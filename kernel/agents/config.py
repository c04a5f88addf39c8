"""Agent configuration: `key=value` lines, validated as a whole.

The same validators check the per-request overrides of a JSON envelope, so a value
that `config` refuses is refused in an envelope too.
"""

from __future__ import annotations

import errno
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import params
from ..errors import KernelError


def _float_in(lo: float, hi: float, lo_open: bool = False) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a number") from None
        if number != number or number > hi or number < lo or (lo_open and number == lo):
            bound = "(" if lo_open else "["
            raise ValueError(f"{number} is outside {bound}{lo}, {hi}]")
        return number

    return check


def _int_in(lo: int, hi: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not an integer")
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not an integer") from None
        if not lo <= number <= hi:
            raise ValueError(f"{number} is outside [{lo}, {hi}]")
        return number

    return check


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not text")
    return value


def _unescape(value: str) -> str:
    """`\\n` is a newline and `\\\\` a backslash in one-line config values."""
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _switch(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("on", "true", "yes", "1"):
        return True
    if text in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"{value!r} is not on/off")


def _names(value: Any) -> tuple[str, ...]:
    if isinstance(value, list):
        items = [str(v) for v in value]
    else:
        items = str(value).replace(",", " ").split()
    return tuple(items)


def _tool_choice(value: Any) -> str:
    text = str(value).strip()
    if not re.fullmatch(r"[a-z][a-z0-9_-]{0,63}(\.[A-Za-z0-9_-]{1,64})?", text):
        raise ValueError(f"{value!r} is not auto, none, required or a tool name")
    return text


def _stop(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise ValueError("stop must be a string or a list of non-empty strings")
    if len(items) > params.MAX_STOP_STRINGS:
        raise ValueError(f"at most {params.MAX_STOP_STRINGS} stop strings")
    if any(len(s.encode()) > params.MAX_STOP_BYTES for s in items):
        raise ValueError(f"a stop string is longer than {params.MAX_STOP_BYTES} bytes")
    return tuple(items)


def _choice(*options: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"{value!r} is not one of: {', '.join(options)}")
        return str(value)

    return check


# key → validator; the order here is the order `config` is rendered in.
VALIDATORS: dict[str, Callable[[Any], Any]] = {
    "system": _text,
    "temperature": _float_in(0.0, 2.0),
    "top_p": _float_in(0.0, 1.0, lo_open=True),
    "max_tokens": _int_in(1, params.MAX_TOKENS_LIMIT),
    "seed": _int_in(-1, 2**32 - 1),
    "model": _text,
    "priority": _int_in(0, 9),
    "tools": _names,
    "memory_recall": _switch,
    "memory_top_k": _int_in(1, params.MAX_MEMORY_TOP_K),
    "tool_choice": _tool_choice,
    "parallel_tool_calls": _switch,
    "ignore_eos": _switch,
    "on_restart": _choice("requeue", "fail"),
}


@dataclass(frozen=True)
class Function:
    """A tool a request declares (its envelope's "tools" as objects): the model may
    call it, and the call is returned to the client instead of being run."""

    name: str
    description: str
    parameters: str  # its JSON Schema, as JSON text

    @property
    def schema(self) -> Any:
        return json.loads(self.parameters)


@dataclass(frozen=True)
class AgentConfig:
    """An agent's settings; `seed=-1` means a fresh random seed per job."""

    system: str = ""
    temperature: float = params.DEFAULT_TEMPERATURE
    top_p: float = params.DEFAULT_TOP_P
    max_tokens: int = params.DEFAULT_MAX_TOKENS
    seed: int = -1
    model: str = ""
    priority: int = 0
    tools: tuple[str, ...] = ()
    memory_recall: bool = False
    memory_top_k: int = params.DEFAULT_MEMORY_TOP_K  # passages recalled into each prompt
    tool_choice: str = "auto"  # auto | none | required | a tool's name (the first step must call it)
    parallel_tool_calls: bool = True  # a reply may make several calls (MAX_TOOL_CALLS); off: one
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks)
    on_restart: str = "requeue"  # what a restart does to an unfinished prompt job: requeue | fail
    stop: tuple[str, ...] = field(default=())
    functions: tuple[Function, ...] = ()  # declared tools: calls are returned, not run (envelope only)
    grammar: str = ""  # GBNF of the envelope's response_format: the answer is JSON that matches it

    def render(self) -> str:
        """The `config` file: every key with its effective value."""
        lines = []
        for key in VALIDATORS:
            value = getattr(self, key)
            if isinstance(value, bool):
                value = "on" if value else "off"
            elif isinstance(value, tuple):
                value = " ".join(value)
            elif isinstance(value, str):
                value = escape(value)
            lines.append(f"{key}={value}")
        return "\n".join(lines) + "\n"


def parse_config(text: str, known_models: Callable[[str], bool] | None = None) -> AgentConfig:
    """Parse a whole `config` file; raise EINVAL naming the first bad line.

    Blank lines and `#` comments are ignored; a later line for the same key wins,
    so `echo key=value >> config` overrides the rendered value.
    """
    values: dict[str, Any] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep:
            raise KernelError(errno.EINVAL, f"config line {number}: expected key=value, got {line!r}")
        if key not in VALIDATORS:
            known = ", ".join(VALIDATORS)
            raise KernelError(errno.EINVAL, f"config line {number}: unknown key {key!r} (known: {known})")
        values[key] = validate(key, _unescape(value.strip()), f"config line {number}")
    check_model(values.get("model", ""), known_models)
    return AgentConfig(**values)


def validate(key: str, value: Any, where: str) -> Any:
    """A config or envelope value checked by its validator; EINVAL names where it was."""
    check = _stop if key == "stop" else VALIDATORS[key]
    try:
        return check(value)
    except ValueError as exc:
        raise KernelError(errno.EINVAL, f"{where}: {key}: {exc}") from None


def check_model(name: str, known_models: Callable[[str], bool] | None) -> None:
    if name and known_models is not None and not known_models(name):
        raise KernelError(errno.EINVAL, f"unknown model {name!r}: see kernel/models")
