"""The configuration of a remote LLM core (kernel/cores/remote.py): `RemoteConfig`, its
validation, and `load_api_key`, which reads the key a config names without ever showing it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .. import params
from ..keyfile import HEADER_SAFE, read_key_file

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class RemoteConfig:
    """One remote core. `base_url` is the server's root (`http://host:port`); a trailing
    `/v1` is dropped because `/v1/chat/completions` is added to it."""

    name: str  # the core's name in kernel/models and in `model=`
    base_url: str
    model: str  # the model name the server expects in requests
    max_in_flight: int = params.REMOTE_MAX_IN_FLIGHT
    timeout: float = params.REMOTE_TIMEOUT_SECONDS
    api_key_env: str = ""  # environment variable holding the key, or ""
    api_key_file: str = ""  # file holding the key (not readable by others), or ""
    retries: int = params.REMOTE_RETRIES
    backoff: float = params.REMOTE_BACKOFF_SECONDS

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and _NAME.fullmatch(self.name) is not None, f"name: {self.name!r} is not 1-64 of A-Z a-z 0-9 . _ : -")
        object.__setattr__(self, "base_url", _check_url(self.base_url))
        _check(isinstance(self.model, str) and self.model.strip() != "", "model: the server's model name is required")
        _check(
            _is_int(self.max_in_flight, 1, params.REMOTE_MAX_IN_FLIGHT_LIMIT),
            f"max_in_flight: {self.max_in_flight!r} is outside [1, {params.REMOTE_MAX_IN_FLIGHT_LIMIT}]",
        )
        _check(
            _is_number(self.timeout, 0, params.REMOTE_MAX_TIMEOUT_SECONDS, lo_open=True),
            f"timeout: {self.timeout!r} is not in (0, {params.REMOTE_MAX_TIMEOUT_SECONDS:g}] seconds",
        )
        _check(_is_int(self.retries, 0, 100), f"retries: {self.retries!r} is outside [0, 100]")
        _check(_is_number(self.backoff, 0, 60), f"backoff: {self.backoff!r} is not in [0, 60] seconds")
        _check(not (self.api_key_env and self.api_key_file), "api_key_env and api_key_file: give one of them, not both")
        _check(not self.api_key_env or _ENV_NAME.fullmatch(self.api_key_env) is not None, f"api_key_env: {self.api_key_env!r} is not a variable name")

    @property
    def endpoint(self) -> str:
        return self.base_url + "/v1/chat/completions"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _is_number(value: Any, lo: float, hi: float, lo_open: bool = False) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool) or not lo <= value <= hi:
        return False  # NaN fails the range test too
    return not (lo_open and value == lo)


def _check_url(url: Any) -> str:
    """The normalized base URL; ValueError names what is wrong with it."""
    _check(isinstance(url, str) and url != "", "base_url: required, e.g. http://127.0.0.1:8000")
    parts = urlsplit(url)
    _check(parts.scheme in ("http", "https"), f"base_url: {url!r} is not an http:// or https:// URL")
    _check(bool(parts.hostname), f"base_url: {url!r} has no host")
    # a URL is shown in kernel/models and in logs: credentials in it would leak
    _check(parts.username is None and parts.password is None, "base_url: no credentials in the URL; use api_key_env or api_key_file")
    _check(not parts.query and not parts.fragment, f"base_url: {url!r} must not have a query or fragment")
    try:
        _ = parts.port  # raises on a bad port
    except ValueError:
        raise ValueError(f"base_url: {url!r} has a bad port") from None
    base = url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def load_api_key(config: RemoteConfig) -> str | None:
    """The key the config names, or None; ValueError (never showing the key) otherwise."""
    if config.api_key_env:
        key = os.environ.get(config.api_key_env, "").strip()
        _check(key != "", f"api_key_env: the environment variable {config.api_key_env} is not set or empty")
    elif config.api_key_file:
        key = read_key_file(config.api_key_file)
    else:
        return None
    _check(HEADER_SAFE.fullmatch(key) is not None, "the API key has characters an HTTP header cannot carry")
    return key
