"""The mount configuration file (`aiosfs mount --config FILE`, TOML): remote
OpenAI-compatible cores next to the local model, and the route for agents that
name no model.

    route = "least-loaded"          # or "default": the local model (the default)

    [[remote]]
    name = "big"                    # what agents write as model=big
    base_url = "http://gpu-box:8080"
    model = "llama-3.1-70b"         # the name the server expects
    max_in_flight = 16              # requests at once; the server batches them
    timeout = 60                    # seconds without progress → ETIMEDOUT
    api_key_env = "OPENAI_API_KEY"  # or api_key_file = "/etc/aiosfs/key" (not world-readable)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from kernel.kernel import ROUTES
from kernel.remote import RemoteConfig


@dataclass(frozen=True)
class MountConfig:
    remotes: tuple[RemoteConfig, ...] = ()
    route: str = "default"


class ConfigError(Exception):
    """The file cannot be used; the message says where and why."""


def load_mount_config(path: Path) -> MountConfig:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"route", "remote"})
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown} (known: route, remote)")
    route = data.get("route", "default")
    if route not in ROUTES:
        raise ConfigError(f"{path}: route {route!r} is not one of {', '.join(ROUTES)}")
    tables = data.get("remote", [])
    if not isinstance(tables, list):
        raise ConfigError(f"{path}: remote must be an array of tables ([[remote]])")
    return MountConfig(tuple(_remote(path, i, t) for i, t in enumerate(tables, 1)), route)


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
