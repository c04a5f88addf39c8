"""Agent manifest files (`DIR/*.toml` of `aiosfs mount --agents-dir DIR`): what one
says, checked (`parse_manifest`), and what the directory holds (`scan`). Pure reading:
the manager that brings the kernel in line with them is services/manifests.py.

    name = "summarizer"            # the agent directory agents/NAME
    owner = "65534"                # uid (or user name) that owns the agent and runs the command
    group, mode, config, permissions, command, workdir, restart, env: docs/tools.md
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernel import VALIDATORS, escape, params, parse_config, parse_policy
from kernel.errors import KernelError
from kernel.syscall import check_agent_name

from .supervisor import RESTART_POLICIES

KEYS = ("name", "owner", "group", "mode", "config", "permissions", "command", "workdir", "restart", "env")
REQUIRED = ("name", "owner")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
KERNEL_ENV = ("AIOSFS_MOUNT", "AIOSFS_AGENT", "AIOSFS_AGENT_DIR")  # set by the kernel; a manifest may not
DEFAULT_MODE = 0o755


class ManifestError(Exception):
    """Why a manifest is skipped, worded for the administrator who wrote it."""


@dataclass(frozen=True)
class Manifest:
    """One agent manifest, validated."""

    name: str
    uid: int
    gid: int
    home: str = "/"  # the owner's home directory, the process's HOME
    mode: int = DEFAULT_MODE
    config: str | None = None  # `key=value` text; None leaves the agent's config as it is
    permissions: str | None = None  # None leaves the agent's policy as it is
    command: tuple[str, ...] = ()  # empty: no process
    workdir: Path = Path("/")
    restart: str = "on-failure"
    env: tuple[tuple[str, str], ...] = ()
    file: str = field(default="", compare=False)  # the file it was read from


# -- parsing -------------------------------------------------------------------------------
def parse_manifest(file: str, data: bytes, directory: Path, known_model: Callable[[str], bool] | None = None) -> Manifest:
    """A manifest file's bytes as a Manifest; ManifestError says what is wrong."""
    if len(data) > params.MANIFEST_MAX_BYTES:
        raise ManifestError(f"the file is over {params.MANIFEST_MAX_BYTES} bytes")
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ManifestError(f"not valid UTF-8 (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"not valid TOML: {exc}") from None
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise ManifestError(f"unknown keys {', '.join(unknown)} (known: {', '.join(KEYS)})")
    missing = [key for key in REQUIRED if key not in table]
    if missing:
        raise ManifestError(f"{' and '.join(missing)} missing (required: {', '.join(REQUIRED)})")
    uid, gid, home = _owner(table["owner"])
    if "group" in table:
        gid = _group(table["group"])
    if gid is None:
        raise ManifestError(f"owner: uid {uid} has no passwd entry, so it has no primary group: give group")
    return Manifest(
        name=_name(table["name"]),
        uid=uid,
        gid=gid,
        home=home,
        mode=_mode(table.get("mode", f"{DEFAULT_MODE:o}")),
        config=_config(table["config"], known_model) if "config" in table else None,
        permissions=_permissions(table["permissions"]) if "permissions" in table else None,
        command=_command(table["command"]) if "command" in table else (),
        workdir=_workdir(table.get("workdir", "."), directory),
        restart=_restart(table.get("restart", "on-failure")),
        env=_env(table.get("env", {})),
        file=file,
    )


def _name(value: Any) -> str:
    if not isinstance(value, str):
        raise ManifestError(f"name: {value!r} is not a string")
    try:
        check_agent_name(value)
    except KernelError as exc:
        raise ManifestError(f"name: {exc.message}") from None
    return value


def _id_number(value: Any, what: str) -> int | None:
    """A uid/gid given as a number (or a string of digits); None for a name."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ManifestError(f"{what}: {value!r} is neither a number nor a name")
    if isinstance(value, str) and not value.isdigit():
        return None
    number = int(value)
    if not 0 <= number < 2**32 - 1:  # (uid_t)-1 means "no change" to the system calls
        raise ManifestError(f"{what}: {number} is not a valid id")
    return number


def _owner(value: Any) -> tuple[int, int | None, str]:
    """The owner's uid, primary gid (None when the uid has no passwd entry) and home."""
    uid = _id_number(value, "owner")
    try:
        entry = pwd.getpwuid(uid) if uid is not None else pwd.getpwnam(value)
    except KeyError:
        if uid is None:
            raise ManifestError(f"owner: no user named {value!r}") from None
        return uid, None, "/"
    return entry.pw_uid, entry.pw_gid, entry.pw_dir or "/"


def _group(value: Any) -> int:
    gid = _id_number(value, "group")
    if gid is not None:
        return gid
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise ManifestError(f"group: no group named {value!r}") from None


def _mode(value: Any) -> int:
    # A string only: a TOML integer 750 would silently be decimal.
    if not isinstance(value, str) or not re.fullmatch(r"[0-7]{1,4}", value):
        raise ManifestError(f'mode: {value!r} is not octal digits in a string, e.g. "0750"')
    return int(value, 8)


def _config(value: Any, known_model: Callable[[str], bool] | None) -> str:
    """The config table as the text of a `config` file, checked by the kernel's parser."""
    if not isinstance(value, dict):
        raise ManifestError(f"config: {value!r} is not a table, e.g. config = {{ temperature = 0 }}")
    lines = []
    for key, item in value.items():
        if key not in VALIDATORS:
            raise ManifestError(f"config: unknown key {key!r} (known: {', '.join(VALIDATORS)})")
        lines.append(f"{key}={_config_value(key, item)}\n")
    text = "".join(lines)
    try:
        parse_config(text, known_model)
    except KernelError as exc:
        raise ManifestError(f"config: {exc.message}") from None
    return text


def _config_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return " ".join(value)
    raise ManifestError(f"config: {key}: {value!r} is not a string, a number, a boolean or a list of strings")


def _permissions(value: Any) -> str:
    if not isinstance(value, str):
        raise ManifestError(f"permissions: {value!r} is not a string of `key value` lines")
    try:
        parse_policy(value)
    except KernelError as exc:
        raise ManifestError(f"permissions: {exc.message}") from None
    return value


def _command(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(arg, str) and arg and "\0" not in arg for arg in value):
        raise ManifestError(f'command: {value!r} is not a list of non-empty strings, e.g. ["bash", "agent.sh"]')
    return tuple(value)


def _workdir(value: Any, directory: Path) -> Path:
    if not isinstance(value, str):
        raise ManifestError(f"workdir: {value!r} is not a string")
    path = Path(os.path.normpath(directory / value))
    if not path.is_dir():
        raise ManifestError(f"workdir: {path} is not a directory")
    return path


def _restart(value: Any) -> str:
    if value not in RESTART_POLICIES:
        raise ManifestError(f"restart: {value!r} is not one of {', '.join(RESTART_POLICIES)}")
    return str(value)


def _env(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ManifestError(f'env: {value!r} is not a table, e.g. env = {{ LOG_LEVEL = "debug" }}')
    pairs = []
    for key, item in value.items():
        if not ENV_NAME.match(key):
            raise ManifestError(f"env: {key!r} is not a variable name")
        if key in KERNEL_ENV:
            raise ManifestError(f"env: {key} is set by the kernel")
        if isinstance(item, bool) or not isinstance(item, str | int | float) or "\0" in str(item):
            raise ManifestError(f"env: {key}: {item!r} is not a string or a number")
        pairs.append((key, str(item)))
    return tuple(sorted(pairs))


# -- reading the directory ---------------------------------------------------------------------
Scanned = dict[str, tuple[str, "Manifest | str | None"]]


def scan(directory: Path, digests: dict[str, str], known_model: Callable[[str], bool] | None = None) -> Scanned:
    """Every manifest file in `directory` (`*.toml`, not hidden): its digest and, when it
    differs from `digests`, the manifest or why it is invalid (None: unchanged).
    Raises OSError when the directory cannot be read. Runs in a worker thread."""
    found: Scanned = {}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.name.endswith(".toml"):
            continue  # editors' swap, backup and lock files
        try:
            if not entry.is_file():
                continue
            with open(entry.path, "rb") as f:
                data = f.read(params.MANIFEST_MAX_BYTES + 1)
        except OSError as exc:
            found[entry.name] = (f"error:{exc.errno}", f"cannot read it: {exc.strerror}")
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digests.get(entry.name) == digest:
            found[entry.name] = (digest, None)
            continue
        try:
            found[entry.name] = (digest, parse_manifest(entry.name, data, directory, known_model))
        except ManifestError as exc:
            found[entry.name] = (digest, str(exc))
    return found
