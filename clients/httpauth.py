"""Who may talk to the HTTP servers that act as their user in a mount.

`aiosfs aios-api` and `aiosfs mcp --listen` do everything in the mount as the user
who runs them, so whoever reaches their port acts as that user. Both follow one
rule: an address that is not loopback is refused unless a bearer token guards it,
and the token is one word of at least MIN_TOKEN_CHARS characters read from a file
that not everyone may read.
"""

from __future__ import annotations

import hmac
import ipaddress
import stat
from collections.abc import Iterable
from pathlib import Path

MIN_TOKEN_CHARS = 16


def is_loopback(listen: str) -> bool:
    """Is HOST of `HOST:PORT` (an IPv6 host in brackets) this machine's loopback?"""
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: Path, command: str) -> str:
    """The token in `path`; SystemExit naming `command` when it cannot be read, others
    may read it, or it is too weak."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        token = path.read_text().strip()
    except OSError as exc:
        raise SystemExit(f"{command}: cannot read the token file {path}: {exc.strerror}") from None
    if mode & stat.S_IROTH:
        raise SystemExit(f"{command}: the token file {path} is readable by everyone (mode {mode:04o}): chmod o-r {path}")
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise SystemExit(f"{command}: the token in {path} must be one word of at least {MIN_TOKEN_CHARS} characters")
    return token


def guard(listen: str, token_file: Path | None, command: str) -> str | None:
    """The token that guards `listen` (None: none is needed); SystemExit for a
    non-loopback address without one."""
    token = read_token(token_file, command) if token_file is not None else None
    if token is None and not is_loopback(listen):
        raise SystemExit(
            f"{command}: {listen} is not a loopback address: without --token FILE anyone who reaches it "
            "would act as you in the mount. Give --token FILE, or listen on 127.0.0.1."
        )
    return token


def bearer_matches(headers: Iterable[tuple[bytes, bytes]], token: str) -> bool:
    """Does an ASGI request's `Authorization` header carry `Bearer TOKEN`? (constant time)"""
    given = dict(headers).get(b"authorization", b"").decode("latin-1")
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())
