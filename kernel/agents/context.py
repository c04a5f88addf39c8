"""The context manager: what the model sees for a request, and the `context` file.

Window policy: the prompt is the system message, the conversation and the new user
message, rendered with the model's chat template. When it does not fit in the
sequence's context minus the room reserved for the answer (`max_tokens`, at most
half the window), the oldest turns are dropped whole, oldest first, until it fits;
the stored conversation is never changed by this. If the system message and the
new message alone do not fit, the request fails with E2BIG.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Sequence

from .. import params
from ..cores.backends import Vocabulary
from ..errors import KernelError
from ..text import loads
from ..types import Message
from .config import AgentConfig
from .request import ROLES


def build_prompt(backend: Vocabulary, config: AgentConfig, history: Sequence[Message], user_message: str) -> tuple[list[Message], list[int]]:
    """Return (messages sent, prompt tokens) for one request, trimmed to the window."""
    window = backend.info.n_ctx_seq
    room = max(params.MIN_PROMPT_ROOM, min(config.max_tokens, window // 2))
    head = [{"role": "system", "content": config.system}] if config.system else []
    turns = list(history)
    while True:
        messages = head + turns + [{"role": "user", "content": user_message}]
        tokens = backend.chat_tokens(messages)
        if len(tokens) + room <= window:
            return messages, tokens
        if not turns:
            if len(tokens) + params.MIN_PROMPT_ROOM <= window:
                return messages, tokens  # fits, with less room for the answer
            raise KernelError(errno.E2BIG, f"the prompt is {len(tokens)} tokens; the model's window is {window} per agent")
        turns = _drop_oldest_turn(turns)


def _drop_oldest_turn(turns: list[Message]) -> list[Message]:
    """Drop the first message and whatever answers it, up to the next user message."""
    rest = turns[1:]
    while rest and rest[0]["role"] != "user":
        rest = rest[1:]
    return rest


def render_context(messages: Sequence[Message]) -> str:
    return "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in messages)


def parse_context(text: str) -> list[Message]:
    """Parse a written `context` file.

    Lines holding a JSON object {"role", "content"} are messages; a run of other
    lines is one user message (so `echo hi >> context` adds a user message).
    """
    messages: list[Message] = []
    plain: list[str] = []

    def flush_plain() -> None:
        body = "\n".join(plain).strip("\n")
        if body.strip():
            messages.append({"role": "user", "content": body})
        plain.clear()

    # Only "\n" ends a line: str.splitlines() would also split at U+2028, U+0085 and
    # the like, which json.dumps(ensure_ascii=False) leaves unescaped in a content.
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.lstrip().startswith("{"):
            plain.append(line)
            continue
        flush_plain()
        messages.append(_parse_message(line, number))
    flush_plain()
    return messages


def _parse_message(line: str, number: int) -> Message:
    try:
        obj = loads(line, f"context line {number}")
    except json.JSONDecodeError as exc:
        raise KernelError(errno.EINVAL, f"context line {number}: not valid JSON: {exc}") from None
    if not isinstance(obj, dict) or set(obj) - {"role", "content"} or not isinstance(obj.get("content"), str):
        raise KernelError(errno.EINVAL, f'context line {number}: expected {{"role": ..., "content": "..."}}')
    if obj.get("role") not in ROLES:
        raise KernelError(errno.EINVAL, f"context line {number}: role must be one of {', '.join(ROLES)}")
    return {"role": obj["role"], "content": obj["content"]}
