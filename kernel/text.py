"""What callers write, read as values: JSON whose strings are all encodable as UTF-8,
and decimal numbers that fit the journal. Each refusal is EINVAL naming what was
wrong, so that a bad write is the writer's error, never a bug further in."""

from __future__ import annotations

import errno
import json
import re
from typing import Any

from .errors import KernelError

MAX_ID = 2**63 - 1  # the largest INTEGER SQLite stores: job ids, version numbers
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")  # a \uD800-\uDFFF escape: half a pair, or a pair


def loads(text: str, what: str) -> Any:
    """The JSON value of `text`; ValueError as json raises it for text that is not
    JSON, and EINVAL for a string holding half a surrogate pair ("\\ud800" alone),
    which no UTF-8 text can carry."""
    value = json.loads(text)
    if _SURROGATE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise KernelError(errno.EINVAL, f"{what}: a string holds half of a UTF-16 surrogate pair (\\ud800-\\udfff alone); send text") from None
    return value


def decimal(text: str) -> int | None:
    """An ASCII decimal number of at most MAX_ID, or None (also for other scripts' digits)."""
    if not text.isascii() or not text.isdigit():
        return None
    number = int(text)
    return number if number <= MAX_ID else None
