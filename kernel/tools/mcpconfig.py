"""The configuration of one MCP server whose tools the mount serves (`[[mcp]]` in
`mount --config`, parsed in aiosfs/mountconfig.py): `McpServerConfig`, its
validation, the identity and environment a stdio server runs with, and the
headers of an HTTP one, whose bearer token is read without ever being shown.
"""

from __future__ import annotations

import math
import os
import pwd
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .. import params
from ..keyfile import read_key_file
from .spec import SERVER_NAME

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token
_HEADER_VALUE = re.compile(r"[\x20-\x7e]*")


@dataclass(frozen=True)
class Identity:
    """Who a stdio server runs as: uid and gid (None: the daemon's own) and its HOME."""

    uid: int | None
    gid: int | None
    home: str


@dataclass(frozen=True)
class McpServerConfig:
    """One MCP server: `command` (+ `args`) runs it over stdio, `url` reaches it over
    streamable HTTP. Secrets (`env`, `headers`, the key) never appear in its repr."""

    name: str
    command: str = ""
    args: tuple[str, ...] = ()
    url: str = ""
    env: Mapping[str, str] = field(default_factory=dict, repr=False)  # stdio: more environment variables
    cwd: str = "/"  # stdio: the working directory
    user: str = ""  # stdio, daemon root only: the user (name or uid) it runs as; "": the daemon's
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)  # HTTP: sent with every request
    api_key_file: str = ""  # HTTP: a file (not world-readable) holding a bearer token
    timeout: float = params.TOOL_TIMEOUT_SECONDS  # each call of its tools
    tools: tuple[str, ...] | None = None  # the MCP names of the tools to serve; None: all
    ping: float = params.MCP_PING_SECONDS  # seconds between liveness pings of an idle server; 0: none

    def __post_init__(self) -> None:
        _check(
            isinstance(self.name, str) and SERVER_NAME.fullmatch(self.name) is not None and len(self.name) <= params.MCP_SERVER_NAME_BYTES,
            f"name: {self.name!r} is not [a-z][a-z0-9_-]* of at most {params.MCP_SERVER_NAME_BYTES} bytes",
        )
        _check(bool(self.command) != bool(self.url), "give command (a stdio server) or url (a streamable HTTP server), not both")
        if self.command:
            self._check_stdio()
        else:
            self._check_http()
        _check(
            _is_number(self.timeout, params.TOOL_MAX_TIMEOUT_SECONDS),
            f"timeout: {self.timeout!r} is not in (0, {params.TOOL_MAX_TIMEOUT_SECONDS:g}] seconds",
        )
        _check(_is_number(self.ping, 3600) or self.ping == 0, f"ping: {self.ping!r} is not 0 (off) or in (0, 3600] seconds")
        tools = self.tools
        _check(
            tools is None or (isinstance(tools, tuple) and all(isinstance(t, str) and t for t in tools)), "tools: a list of the server's tool names"
        )

    def _check_stdio(self) -> None:
        _check(isinstance(self.command, str) and "\0" not in self.command, "command: the program to run, a string")
        _check(isinstance(self.args, tuple) and all(isinstance(a, str) and "\0" not in a for a in self.args), "args: a list of strings")
        _check(not self.headers and not self.api_key_file, "headers and api_key_file are for url (HTTP) servers")
        _check(isinstance(self.env, Mapping), "env: a table of strings")
        for key, value in self.env.items():
            _check(isinstance(key, str) and _ENV_NAME.fullmatch(key) is not None, f"env: {key!r} is not a variable name")
            _check(isinstance(value, str) and "\0" not in value, f"env: {key} must be a string")
        _check(isinstance(self.cwd, str) and os.path.isabs(self.cwd), f"cwd: {self.cwd!r} is not an absolute path")
        _check(isinstance(self.user, str), "user: a user name or uid")
        self.identity()  # an unknown user, or one this daemon cannot become, is refused now

    def _check_http(self) -> None:
        _check(isinstance(self.url, str), "url: a string")
        parts = urlsplit(self.url)
        _check(parts.scheme in ("http", "https") and bool(parts.hostname), f"url: {self.url!r} is not an http:// or https:// URL")
        # the URL is shown in kernel/ps and in logs: credentials in it would leak
        _check(parts.username is None and parts.password is None, "url: no credentials in the URL; use headers or api_key_file")
        _check(not self.args and not self.env and not self.user and self.cwd == "/", "args, env, cwd and user are for command (stdio) servers")
        _check(isinstance(self.headers, Mapping), "headers: a table of strings")
        for key, value in self.headers.items():
            _check(isinstance(key, str) and _HEADER_NAME.fullmatch(key) is not None, f"headers: {key!r} is not a header name")
            _check(isinstance(value, str) and _HEADER_VALUE.fullmatch(value) is not None, f"headers: the value of {key} is not printable ASCII")
        has_auth = any(key.lower() == "authorization" for key in self.headers)
        _check(not (self.api_key_file and has_auth), "api_key_file and an Authorization header: give one of them")
        _check(isinstance(self.api_key_file, str), "api_key_file: a path")

    @property
    def transport(self) -> str:
        return "stdio" if self.command else "http"

    def identity(self) -> Identity:
        """Who the server runs as: the daemon's user, or `user` (which needs root)."""
        if not self.user:
            return Identity(None, None, os.environ.get("HOME") or _home(os.geteuid()))
        try:
            entry = pwd.getpwuid(int(self.user)) if self.user.isdigit() else pwd.getpwnam(self.user)
        except (KeyError, OverflowError):
            raise ValueError(f"user: no user {self.user!r} on this system") from None
        if entry.pw_uid == os.geteuid():
            return Identity(None, None, entry.pw_dir)
        _check(os.geteuid() == 0, f"user: only a daemon running as root can run a server as {self.user!r}; leave user out")
        return Identity(entry.pw_uid, entry.pw_gid, entry.pw_dir)

    def environment(self, home: str) -> dict[str, str]:
        """A stdio server's whole environment: PATH (the daemon's), HOME, LANG, then `env`."""
        base = {"PATH": os.environ.get("PATH") or params.TOOL_PATH, "HOME": home, "LANG": "C.UTF-8"}
        return {**base, **self.env}

    def request_headers(self) -> dict[str, str]:
        """An HTTP server's headers, with `Authorization: Bearer KEY` from api_key_file;
        ValueError (never showing the key) when the file cannot be used."""
        headers = dict(self.headers)
        if self.api_key_file:
            headers["Authorization"] = f"Bearer {read_key_file(self.api_key_file)}"
        return headers


def _home(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_dir
    except KeyError:
        return "/"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_number(value: Any, hi: float) -> bool:
    """A number in (0, hi]."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and 0 < value <= hi
