"""The mount configuration file (`aiosfs mount --config FILE`, TOML): remote
OpenAI-compatible cores next to the local model, the route for agents that
name no model, and MCP servers whose tools the mount serves.

    route = "least-loaded"          # or "default": the local model (the default)

    [[remote]]
    name = "big"                    # what agents write as model=big
    base_url = "http://gpu-box:8080"
    model = "llama-3.1-70b"         # the name the server expects
    max_in_flight = 16              # requests at once; the server batches them
    timeout = 60                    # seconds without progress → ETIMEDOUT
    api_key_env = "OPENAI_API_KEY"  # or api_key_file = "/etc/aiosfs/key" (not world-readable)

    [[local]]                       # more GGUF models in this process, besides --model
    name = "coder"
    path = "/models/qwen2.5-coder-1.5b.Q4_0.gguf"
    threads = 2                     # default: --threads
    gpu_layers = 0                  # default: all layers when llama.cpp has a GPU
    ctx = 4096                      # tokens per sequence (default: --ctx)
    slots = 4                       # sequences decoded together (default: --slots)
    load = false                    # load later with `echo load coder > kernel/ctl` (default: true)

    [[mcp]]                         # an MCP server: its tools are tools/time.get_current_time, ...
    name = "time"                   # [a-z][a-z0-9_-]*, the SERVER of SERVER.TOOL
    command = "mcp-server-time"     # a stdio server: the program (looked up in PATH) ...
    args = ["--local-timezone", "UTC"]  # ... and its arguments
    env = { TZ = "UTC" }            # more environment (besides PATH, HOME, LANG)
    cwd = "/srv"                    # its working directory (default: /)
    user = "nobody"                 # run as this user (a daemon running as root only; default: the daemon's)
    timeout = 20                    # seconds per call (default: the tools' 10)
    tools = ["get_current_time"]    # the tools to serve (default: all it lists)
    ping = 10                       # seconds between pings of an idle server; 0: none

    [[mcp]]
    name = "search"
    url = "https://mcp.example.com/mcp"    # a streamable HTTP server
    headers = { "X-Team" = "infra" }       # sent with every request
    api_key_file = "/etc/aiosfs/search.key"  # sent as "Authorization: Bearer KEY" (not world-readable)
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from kernel import ROUTES, McpServerConfig, RemoteConfig


@dataclass(frozen=True)
class LocalModel:
    """One more GGUF model in the daemon; None/0 take the mount's own values."""

    name: str
    path: Path
    threads: int = 0
    gpu_layers: int | None = None
    ctx: int = 0
    slots: int = 0
    load: bool = True  # at mount; else at `load NAME` in kernel/ctl


@dataclass(frozen=True)
class MountConfig:
    remotes: tuple[RemoteConfig, ...] = ()
    locals: tuple[LocalModel, ...] = ()
    route: str = "default"
    mcp: tuple[McpServerConfig, ...] = ()


class ConfigError(Exception):
    """The file cannot be used; the message says where and why."""


def load_mount_config(path: Path) -> MountConfig:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"route", "remote", "local", "mcp"})
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown} (known: route, remote, local, mcp)")
    route = data.get("route", "default")
    if route not in ROUTES:
        raise ConfigError(f"{path}: route {route!r} is not one of {', '.join(ROUTES)}")
    remotes = tuple(_remote(path, i, t) for i, t in enumerate(_tables(path, data, "remote"), 1))
    locals_ = tuple(_local(path, i, t) for i, t in enumerate(_tables(path, data, "local"), 1))
    names = [m.name for m in remotes] + [m.name for m in locals_]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{path}: model names used twice: {', '.join(twice)}")
    servers = tuple(_mcp(path, i, t) for i, t in enumerate(_tables(path, data, "mcp"), 1))
    names = [s.name for s in servers]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{path}: MCP server names used twice: {', '.join(twice)}")
    return MountConfig(remotes, locals_, route, servers)


def _tables(path: Path, data: dict[str, object], key: str) -> list[object]:
    tables = data.get(key, [])
    if not isinstance(tables, list):
        raise ConfigError(f"{path}: {key} must be an array of tables ([[{key}]])")
    return tables


def _local(path: Path, number: int, table: object) -> LocalModel:
    where = f"{path}: local #{number}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} is not a table")
    known = {f.name for f in fields(LocalModel)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown} (known: {', '.join(sorted(known))})")
    if not isinstance(table.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", table["name"]):
        raise ConfigError(f"{where}: name must be 1-64 of A-Z a-z 0-9 . _ : -")
    model = Path(str(table.get("path", "")))
    if not model.is_file():
        raise ConfigError(f"{where}: no model file at {model!s}")
    for key in ("threads", "ctx", "slots"):
        if not isinstance(table.get(key, 0), int) or table.get(key, 0) < 0:
            raise ConfigError(f"{where}: {key} must be a whole number")
    if not isinstance(table.get("load", True), bool):
        raise ConfigError(f"{where}: load must be true or false")
    return LocalModel(**{**table, "path": model.absolute()})


def _remote(path: Path, number: int, table: object) -> RemoteConfig:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: remote #{number} is not a table")
    known = {f.name for f in fields(RemoteConfig)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{path}: remote #{number}: unknown keys {unknown} (known: {', '.join(sorted(known))})")
    try:
        return RemoteConfig(**table)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: remote #{number}: {exc}") from None


def _mcp(path: Path, number: int, table: object) -> McpServerConfig:
    """One `[[mcp]]` table; lists become tuples, and the error names the table."""
    where = f"{path}: mcp #{number}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} is not a table")
    if isinstance(table.get("name"), str):
        where += f" ({table['name']})"
    known = {f.name for f in fields(McpServerConfig)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown} (known: {', '.join(sorted(known))})")
    values = dict(table)
    for key in ("args", "tools"):
        if key in values:
            if not isinstance(values[key], list):
                raise ConfigError(f"{where}: {key} must be a list of strings")
            values[key] = tuple(values[key])
    for key in ("env", "headers"):
        if not isinstance(values.get(key, {}), dict):
            raise ConfigError(f"{where}: {key} must be a table of strings")
    if "name" not in values:
        raise ConfigError(f"{where}: name is required")
    try:
        return McpServerConfig(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
