"""API keys for HTTP servers the daemon talks to (remote cores, MCP servers): read
from a file that only its owner may read, and fit to travel in a header. The key
itself is never put in a message."""

from __future__ import annotations

import os
import re
import stat

from . import params

HEADER_SAFE = re.compile(r"[\x21-\x7e]+")  # what an HTTP header value can carry without escaping


def read_key_file(path: str) -> str:
    """The key in a key file: a regular file, not readable by everyone, of ASCII text
    that a header can carry; ValueError (never showing the key) otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"api_key_file: cannot open {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)  # of the file opened, so it cannot be swapped after the check
        _check(stat.S_ISREG(info.st_mode), f"api_key_file: {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        _check(not mode & stat.S_IROTH, f"api_key_file: {path} is readable by everyone (mode {mode:04o}); chmod o-r {path}")
        _check(info.st_size <= params.REMOTE_KEY_MAX_BYTES, f"api_key_file: {path} is over {params.REMOTE_KEY_MAX_BYTES} bytes")
        data = file.read(params.REMOTE_KEY_MAX_BYTES + 1)
    try:
        key = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError(f"api_key_file: {path} is not ASCII text") from None
    _check(key != "", f"api_key_file: {path} is empty")
    _check(HEADER_SAFE.fullmatch(key) is not None, f"api_key_file: the key in {path} has characters an HTTP header cannot carry")
    return key


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
