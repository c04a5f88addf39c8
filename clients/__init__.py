"""Clients of a mount: programs that use nothing but its files, as the user who runs
them, so the mount's permissions are theirs too. `aios/` is `aiosfs aios-api` (the
AIOS kernel's HTTP protocol), `mcp/` is `aiosfs mcp` (the Model Context Protocol);
`mountclient.py` is their file I/O, and `httpauth.py` the bearer token both HTTP
servers require off loopback. They import neither the kernel nor the filesystem."""

from __future__ import annotations

import importlib.metadata

try:
    __version__ = importlib.metadata.version("aiosfs")
except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
    __version__ = "0"
